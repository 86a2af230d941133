"""`attngen build`: specs -> generated variant packages, cubins and a manifest, atomically.

Layout of an output directory::

    manifest.json                 what the registry reads
    <canonical name>/             one package per distinct kernel
        __init__.py kernel.py launcher.py test_<name>.py <name><suffix>.<arch>.cubin

A build works in a staging directory under the lock ``.lock`` and only then moves its
results into place and swaps the manifest, so a failed or interrupted build leaves the
previous output as it was.  Every file lands by one rename: a reader sees a whole file or
none.  A package's sources are a function of its canonical name (which covers the spec, the
generator, the templates, cuTile and tileiras), so a package a reader loads is never
rewritten: a build only adds cubins to it, or repairs what a killed build left.  What a killed
build leaves -- its staging directory, a half-removed package -- the next build clears or
completes by itself.  Files are written only when their content changes and cubins compiled
only when missing: a repeated build with unchanged specs does no work.  By default only the
kernels :func:`attngen.core.variant.compiled_by_default` names are compiled; the launchers compile
the others when a call first needs them (``all_kernels`` compiles everything).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..core.variant import KernelSpec, compiled_by_default
from .aot import check_arch, export
from .codegen import load_package, render
from .spec import Spec, unique_kernels
from .store import (MANIFEST, KernelEntry, Manifest, SpecEntry, StoreError, cubin_name, locked,
                    manifest_text, read_manifest)

DEFAULT_ARCHS = ("sm_90",)
STAGING = ".staging-"
# a package directory's name: a canonical name, which ends with the kernel's 8-digit hash
PACKAGE_RE = re.compile(r"[a-z][a-z0-9_]*_[0-9a-f]{8}")


class BuildError(StoreError):
    """A build that failed; the previous output is intact."""


class Progress:
    """What a build reports as it goes; the default says nothing.  `attngen build` shows a
    live bar (:mod:`attngen.cli`)."""

    def start(self, total: int, what: str) -> None:
        """``total`` kernels are about to compile (``what`` says which, for whom)."""

    def tick(self) -> None:
        """Called about once a second while compiles run (a bar's clock)."""

    def done(self, label: str, seconds: float) -> None:
        """One kernel compiled in ``seconds``."""

    def failed(self, label: str, error: str) -> None:
        """One kernel failed to compile."""

    def close(self) -> None:
        """No more compiles."""


@dataclass
class Report:
    out: Path
    kernels: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)           # variants whose files changed
    compiled: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> arch -> s
    cubins: int = 0                                             # kernels compiled (all archs)
    deferred: int = 0                  # kernels left to first need (`all_kernels` compiles them)

    @property
    def did_nothing(self) -> bool:
        return not self.written and not self.compiled


def build(specs: Iterable[Spec], out: Path, archs: Iterable[str] = DEFAULT_ARCHS, *,
          keep_existing: bool = False, jobs: int | None = None, all_kernels: bool = False,
          progress: Progress | None = None) -> Report:
    """Generate (and, for each arch, compile) every kernel the specs need into ``out``.

    Compiles the kernels :func:`attngen.core.variant.compiled_by_default` names, or with
    ``all_kernels`` every kernel of every variant; a cubin already built is never compiled
    again.  ``keep_existing`` adds to the manifest instead of replacing it (the on-demand
    cache).
    """
    specs = list(specs)
    archs = tuple(dict.fromkeys(check_arch(a) for a in archs))
    kernels = unique_kernels(specs)
    out = Path(out)
    progress = progress or Progress()
    report = Report(out, [k.name for k in kernels])
    with locked(out):
        _clear_leftovers(out)
        old = _readable_manifest(out)
        staging = Path(tempfile.mkdtemp(prefix=STAGING, dir=out))
        trash = staging / "trash"
        trash.mkdir()
        try:
            moves = _stage(kernels, out, staging, archs, report)
            cubins = _compile(kernels, out, staging, archs, report, jobs, all_kernels, progress)
            manifest = _manifest(specs, kernels, archs, old, report, keep_existing)
            for src, dst in moves:                 # commit: nothing above touched `out`
                if src.is_dir():
                    if dst.exists():               # the remains of an interrupted removal
                        os.replace(dst, trash / dst.name)
                    os.replace(src, dst)
                else:
                    dst.parent.mkdir(exist_ok=True)
                    os.replace(src, dst)
            for name, cubin in cubins:
                os.replace(staging / "cubins" / cubin, out / name / cubin)
            if manifest != old:
                tmp = staging / MANIFEST
                tmp.write_text(manifest_text(manifest))
                os.replace(tmp, out / MANIFEST)
            dead = set(old.kernels) - set(manifest.kernels)
            if not keep_existing:                  # and packages no manifest lists any more
                dead |= {p.name for p in out.iterdir() if p.is_dir() and PACKAGE_RE.fullmatch(p.name)
                         and p.name not in manifest.kernels}
            for name in dead:                      # out of sight first, then deleted
                if (out / name).exists():
                    os.replace(out / name, trash / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return report


def _clear_leftovers(out: Path) -> None:
    """Delete the staging directories of builds that were killed (under the lock: no build
    is running)."""
    for path in out.glob(STAGING + "*"):
        shutil.rmtree(path, ignore_errors=True)


def _readable_manifest(out: Path) -> Manifest:
    """The manifest, or an empty one when it cannot be read (the build rewrites it)."""
    try:
        return read_manifest(out)
    except StoreError:
        return Manifest()


def _stage(kernels, out, staging, archs, report) -> list[tuple[Path, Path]]:
    """Render every variant; stage what differs from ``out``. Returns (staged, final) moves."""
    moves = []
    for spec in kernels:
        files = render(spec, archs)
        final = out / spec.name
        if not (final / "__init__.py").exists():
            target = staging / spec.name
            target.mkdir()
            for filename, text in files.items():
                (target / filename).write_text(text)
            for cubin in final.glob("*.cubin") if final.is_dir() else ():
                shutil.copy2(cubin, target / cubin.name)     # what an interrupted build left
            moves.append((target, final))
            report.written.append(spec.name)
            continue
        changed = False
        for filename, text in files.items():
            path = final / filename
            if not path.exists() or path.read_text() != text:
                staged = staging / "files" / spec.name / filename
                staged.parent.mkdir(parents=True, exist_ok=True)
                staged.write_text(text)
                moves.append((staged, path))
                changed = True
        if changed:
            report.written.append(spec.name)
    return moves


def _compile(kernels, out, staging, archs, report, jobs, all_kernels, progress) -> list[tuple[str, str]]:
    """Compile each missing cubin; returns (variant, cubin file) pairs staged in ``staging/cubins``."""
    todo, deferred = [], 0
    for spec in kernels:
        where = staging / spec.name if (staging / spec.name).exists() else out / spec.name
        for arch in archs:
            for suffix in spec.kernels:
                if not (all_kernels or compiled_by_default(suffix)):
                    deferred += 1
                elif not (where / cubin_name(spec.name + suffix, arch)).exists():
                    todo.append((spec, arch, suffix, where))
    report.deferred = deferred
    if not todo:
        return []
    (staging / "cubins").mkdir()
    workers = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    progress.start(len(todo), f"{len({s.name for s, *_ in todo})} variant(s) for {', '.join(archs)} "
                              f"in {workers} process(es)")
    failures, built = [], []
    # The cuTile front end is Python: compile in processes, not threads.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(_export_one, where, spec.as_dict(), suffix, arch, staging / "cubins"):
                   (spec, arch, suffix) for spec, arch, suffix, where in todo}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            progress.tick()
            for future in finished:
                spec, arch, suffix = futures[future]
                label = f"{spec.name}{suffix} ({arch})"
                try:
                    seconds = future.result()
                except BrokenProcessPool as exc:
                    raise BuildError(f"a compile worker died: {exc}") from exc
                except Exception as exc:     # noqa: BLE001 - reported with the kernel's name
                    failures.append(f"{label}: {type(exc).__name__}: {exc}")
                    progress.failed(label, f"{type(exc).__name__}: {exc}")
                    continue
                times = report.compiled.setdefault(spec.name, {})
                times[arch] = round(times.get(arch, 0.0) + seconds, 2)
                report.cubins += 1
                built.append((spec.name, cubin_name(spec.name + suffix, arch)))
                progress.done(label, seconds)
    except BaseException:                 # Ctrl-C, a dead worker: drop the queued compiles
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        pool.shutdown()
        progress.close()
    if failures:
        raise BuildError("compilation failed; the previous output is intact:\n  "
                         + "\n  ".join(failures))
    return built


def _export_one(directory: Path, spec_dict: dict, suffix: str, arch: str, output: Path) -> float:
    """Compile one kernel of a generated variant into ``output`` (a worker process)."""
    spec = KernelSpec.from_dict(spec_dict)
    start = time.perf_counter()
    try:
        module = load_package(directory).kernel
    except Exception as exc:
        raise RuntimeError(f"generated code does not import: {type(exc).__name__}: {exc}") from None
    export(getattr(module, spec.name + suffix), spec, arch,
           str(output / cubin_name(spec.name + suffix, arch)), spec.kernels[suffix])
    return time.perf_counter() - start


def _manifest(specs, kernels, archs, old: Manifest, report, keep_existing) -> Manifest:
    entries = dict(old.kernels) if keep_existing else {}
    for spec in kernels:
        before = old.kernels.get(spec.name)
        seconds = dict(before.compile_seconds) if before else {}
        seconds.update(report.compiled.get(spec.name, {}))
        cubins = tuple(archs)
        if keep_existing and before:
            cubins = tuple(sorted(set(before.cubins) | set(archs)))
        entries[spec.name] = KernelEntry(spec.name, spec, cubins,
                                         {a: seconds[a] for a in cubins if a in seconds})
    spec_entries = dict(old.specs) if keep_existing else {}
    spec_entries.update({s.name: SpecEntry.of(s) for s in specs})
    return Manifest(entries, spec_entries)
