"""`attngen build`: specs -> generated variant packages, cubins and a manifest, atomically.

Layout of an output directory::

    manifest.json                 what the registry reads
    <canonical name>/             one package per distinct kernel
        __init__.py kernel.py launcher.py test_<name>.py <name>.<arch>.cubin

A build works in a staging directory under the lock ``.lock`` and only then moves its
results into place and swaps the manifest, so a failed or interrupted build leaves the
previous output as it was.  Files are written only when their content changes and cubins
compiled only when missing: a repeated build with unchanged specs does no work.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .aot import check_arch, export
from .codegen import load_package, render
from .spec import Spec, unique_kernels
from .store import (MANIFEST, KernelEntry, Manifest, SpecEntry, StoreError, cubin_name, cubin_names,
                    locked, manifest_text, read_manifest)
from .variant import KernelSpec

DEFAULT_ARCHS = ("sm_90",)


class BuildError(StoreError):
    """A build that failed; the previous output is intact."""


@dataclass
class Report:
    out: Path
    kernels: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)           # variants whose files changed
    compiled: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> arch -> s

    @property
    def did_nothing(self) -> bool:
        return not self.written and not self.compiled


def build(specs: Iterable[Spec], out: Path, archs: Iterable[str] = DEFAULT_ARCHS, *,
          keep_existing: bool = False, jobs: int | None = None,
          progress: Callable[[str], None] | None = None) -> Report:
    """Generate (and, for each arch, compile) every kernel the specs need into ``out``.

    ``keep_existing`` adds to the manifest instead of replacing it (the on-demand cache).
    """
    specs = list(specs)
    archs = tuple(dict.fromkeys(check_arch(a) for a in archs))
    kernels = unique_kernels(specs)
    out = Path(out)
    say = progress or (lambda _msg: None)
    report = Report(out, [k.name for k in kernels])
    with locked(out):
        old = read_manifest(out)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
        try:
            moves = _stage(kernels, out, staging, archs, report)
            _compile(kernels, out, staging, archs, report, jobs, say)
            manifest = _manifest(specs, kernels, archs, old, report, keep_existing)
            for src, dst in moves:                 # commit: nothing above touched `out`
                if src.is_dir():
                    os.replace(src, dst)
                else:
                    dst.parent.mkdir(exist_ok=True)
                    os.replace(src, dst)
            for spec in kernels:
                for arch in report.compiled.get(spec.name, {}):
                    for cubin in cubin_names(spec, arch):
                        os.replace(staging / "cubins" / cubin, out / spec.name / cubin)
            if manifest != old:
                tmp = staging / MANIFEST
                tmp.write_text(manifest_text(manifest))
                os.replace(tmp, out / MANIFEST)
            for name in set(old.kernels) - set(manifest.kernels):
                shutil.rmtree(out / name, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return report


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


def _compile(kernels, out, staging, archs, report, jobs, say) -> None:
    todo = [(spec, arch) for spec in kernels for arch in archs
            if not all((out / spec.name / c).exists() for c in cubin_names(spec, arch))]
    if not todo:
        return
    (staging / "cubins").mkdir()
    workers = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    say(f"compiling {len(todo)} variant(s) ({sum(len(spec.kernels) for spec, _ in todo)} kernels) "
        f"for {', '.join(archs)} in {workers} process(es)")
    where = {spec.name: staging / spec.name if (staging / spec.name).exists() else out / spec.name
             for spec, _ in todo}
    failures = []
    # The cuTile front end is Python: compile in processes, not threads.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [((spec, arch), pool.submit(_export_one, where[spec.name], spec.as_dict(), arch,
                                               staging / "cubins"))
                   for spec, arch in todo]
        for done, ((spec, arch), future) in enumerate(futures, 1):
            try:
                seconds = future.result()
            except Exception as exc:     # noqa: BLE001 - reported with the variant's name
                if isinstance(exc, BrokenProcessPool):
                    raise BuildError(f"a compile worker died: {exc}") from exc
                failures.append(f"{spec.name} ({arch}): {type(exc).__name__}: {exc}")
                say(f"[{done}/{len(todo)}] FAILED {spec.name} for {arch}")
                continue
            report.compiled.setdefault(spec.name, {})[arch] = round(seconds, 2)
            say(f"[{done}/{len(todo)}] {spec.name}  {arch}  {seconds:.1f}s")
    if failures:
        raise BuildError("compilation failed; the previous output is intact:\n  "
                         + "\n  ".join(failures))


def _export_one(directory: Path, spec_dict: dict, arch: str, output: Path) -> float:
    """Compile every kernel of one generated variant into ``output`` (a worker process)."""
    spec = KernelSpec.from_dict(spec_dict)
    start = time.perf_counter()
    try:
        module = load_package(directory).kernel
    except Exception as exc:
        raise RuntimeError(f"generated code does not import: {type(exc).__name__}: {exc}") from None
    for suffix, params in spec.kernels.items():
        export(getattr(module, spec.name + suffix), spec, arch,
               str(output / cubin_name(spec.name + suffix, arch)), params)
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
