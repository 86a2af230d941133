"""The `attngen` command."""

from __future__ import annotations

import argparse
import sys
import time

from .core.version import __version__


def _build(args) -> int:
    from .generate.build import BuildError, build
    from .generate.spec import load_files, unique_kernels

    specs = load_files(args.specs)            # every spec validated before anything is written
    kernels = unique_kernels(specs)
    archs = [] if args.no_compile else args.arch
    say = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    say(f"attngen {__version__}: {len(specs)} spec(s) -> {len(kernels)} variant(s) in {args.out}")
    start = time.perf_counter()
    try:
        report = build(specs, args.out, archs or (), jobs=args.jobs, all_kernels=args.all,
                       progress=None if args.quiet else _Bar())
    except BuildError as exc:
        print(f"attngen: error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    later = (f"; {report.deferred} kernel(s) left to first need (--all compiles them now)"
             if report.deferred else "")
    if report.did_nothing:
        say(f"up to date: nothing to do ({elapsed:.1f}s){later}")
    else:
        say(f"done in {elapsed:.1f}s: {len(report.written)} variant(s) written, "
            f"{report.cubins} kernel(s) compiled{later}")
    if args.quiet:
        return 0
    spills = {kernel.name: _spills(args.out, kernel.name) for kernel in kernels}
    for spec in specs:
        print(f"{spec.name} ({spec.source}):")
        for kernel in spec.kernels:
            seconds = report.compiled.get(kernel.name, {})
            times = "  ".join(f"{arch} {s:.1f}s" for arch, s in seconds.items())
            print(f"  {kernel.name}  {times or '(cached)' if archs else '(not compiled)'}"
                  + (f"  spills: {', '.join(spills[kernel.name])}" if spills[kernel.name] else ""))
    if spilling := sum(map(len, spills.values())):
        say(f"note: {spilling} kernel(s) spill registers to local memory (bytes a thread above): they "
            "compute the same answers, slower. The forward kernels take a spec's `tiles:` (a lower "
            "occupancy or smaller blocks avoid spills; docs/spec.md), the backward kernels the tables "
            "in attngen/core/tuning.py")
    return 0


def _spills(out, name: str) -> list[str]:
    """The built kernels of variant ``name`` that spill registers: "<suffix or forward> <arch>
    <bytes a thread> B", read from their cubins."""
    from pathlib import Path

    from .generate.cubin import kernel_info

    found = []
    for cubin in sorted(Path(out, name).glob(f"{name}*.cubin")):
        kernel, arch = cubin.name.removesuffix(".cubin").rsplit(".", 1)
        spilled = kernel_info(cubin).local_bytes
        if spilled:
            found.append(f"{kernel.removeprefix(name) or 'forward'} {arch} {spilled} B")
    return found


class _Bar:
    """`attngen build`'s live progress: kernels done of all, elapsed, ETA (tqdm, on stderr)."""

    def __init__(self):
        self.bar = None

    def start(self, total: int, what: str) -> None:
        from tqdm import tqdm

        print(f"compiling {total} kernel(s): {what}", file=sys.stderr)
        self.bar = tqdm(total=total, unit="kernel", file=sys.stderr, dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}")

    def tick(self) -> None:
        self.bar.refresh()                  # the clock runs between finished kernels too

    def done(self, label: str, seconds: float) -> None:
        self.bar.set_postfix_str(f"{label} {seconds:.1f}s", refresh=False)
        self.bar.update()

    def failed(self, label: str, error: str) -> None:
        self.bar.write(f"FAILED {label}: {error}", file=sys.stderr)
        self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _list(args) -> int:
    from .runtime.registry import Registry

    reg = Registry([args.out] if args.out else None)
    kernels = sorted(reg.kernels(), key=lambda k: k.name)
    for kernel in kernels:
        print(f"{kernel.name}\n    {kernel.describe()}")
    for name, entry in sorted(reg.specs().items()):
        if entry.layers is not None:
            print(f"model {name}: {len(entry.layers)} layers, gqa {entry.gqa}, "
                  f"head_dim {entry.head_dim} ({entry.source})")
    if not kernels:
        print(f"no kernels in {', '.join(str(p) for p in reg.paths)}; run `attngen build SPEC...`",
              file=sys.stderr)
    return 0


def _spec(args) -> int:
    import os
    import tempfile

    from .integrations.hfconfig import spec_from_hf_config

    text = spec_from_hf_config(args.from_hf_config, args.name, args.dtype)
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return 0
    # whole file or nothing: write beside the target, then rename over it
    target = os.path.abspath(args.output)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".attngen-spec-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"wrote {args.output}; build it with: attngen build {args.output}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .core.support import DTYPES
    from .generate.build import DEFAULT_ARCHS
    from .generate.store import default_out

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:                 # its own parser: run / tune / plot / model
        from .bench.cli import main as bench_main
        return bench_main(argv[1:])

    parser = argparse.ArgumentParser(prog="attngen", description=__doc__)
    parser.add_argument("--version", action="version", version=f"attngen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="generate (and compile) the kernels of variant specs")
    p.add_argument("specs", nargs="+", metavar="SPEC", help="YAML spec files")
    p.add_argument("--out", default=default_out(),
                   help="output directory (default: %(default)s; env ATTNGEN_BUILD_DIR)")
    p.add_argument("--arch", action="append", default=None,
                   help=f"compile ahead of time for this GPU arch; repeatable "
                        f"(default: {' '.join(DEFAULT_ARCHS)})")
    p.add_argument("--no-compile", action="store_true", help="generate only, compile nothing")
    p.add_argument("-j", "--jobs", type=int, default=None, help="parallel compiles (default: cores)")
    p.add_argument("--all", action="store_true",
                   help="compile every kernel now, the 64-bit twins too (default: those run on "
                        "first need)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=_build)

    sub.add_parser("bench", help="time attngen against SDPA and FlexAttention; tune tiles; whole "
                                 "models (attngen bench {run,tune,plot,model} --help)")

    p = sub.add_parser("list", help="show the built kernels and model specs the registry sees")
    p.add_argument("--out", default=None, help="build directory (default: ATTNGEN_PATH or the default)")
    p.set_defaults(func=_list)

    p = sub.add_parser("spec", help="write the YAML model spec of a transformers model")
    p.add_argument("--from-hf-config", required=True, metavar="CONFIG",
                   help="config.json, a model directory, or a model id in the local HF cache")
    p.add_argument("--name", help="spec name (default: from the model id or folder)")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                   help="kernel dtype, repeatable (default: the config's, else bf16)")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    p.set_defaults(func=_spec)

    args = parser.parse_args(argv)
    if args.command == "build":
        args.arch = args.arch or list(DEFAULT_ARCHS)
    from .generate.spec import SpecError
    from .generate.store import StoreError
    try:
        return args.func(args)
    except SpecError as exc:
        print(f"attngen: error: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"attngen: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("attngen: interrupted; the previous output is intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
