"""Time generated builds of the same plain variant against each other (GPU).

    python scripts/ab_kernels.py BEFORE_DIR AFTER_DIR [AFTER_DIR ...] --heads 32 --seq 8192 32768
        [--batch 2] [--backward]

BEFORE_DIR / AFTER_DIR are variant directories written by `attngen build` (e.g. one built
from an older commit with `git worktree`, one from HEAD, or hand-edited copies of one build:
the directories may hold packages of the same name).  All get the same fresh random inputs
and are timed in interleaved rounds of `triton.testing.do_bench`; the median round is
reported, each AFTER against BEFORE.  Plain variants only (no sinks, chunked or varlen
arguments): it measures whether a template change slowed them.

The forward (default) is called through the public launcher (`launch`), so the grid, GQA
packing and batch are the variant's own, and the outputs must be bit-identical to BEFORE's.
With ``--backward`` it times the launchers' `backward` on one forward's output and
log-sum-exp (from BEFORE's `forward`) and a random dO, and reports how far each AFTER's
gradients are from BEFORE's (identical bits are not required: a change may reorder a sum).
"""
import argparse
import pathlib

import torch

from attngen.generate.codegen import load_package
from attngen.core.support import DTYPES
from attngen.core.variant import KernelSpec


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=pathlib.Path)
    p.add_argument("after", type=pathlib.Path, nargs="+")
    p.add_argument("--heads", type=int, required=True, help="query heads H")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backward", action="store_true", help="time the backward kernels instead")
    args = p.parse_args()
    import triton  # on the GPU machine; --help works without it

    dirs = {"before": args.before, **{f"after {d}": d for d in args.after}}
    # each package's own launcher: same-named packages replace each other in sys.modules
    launchers = {tag: load_package(d.resolve()).launcher for tag, d in dirs.items()}
    specs = {tag: KernelSpec.from_dict(m.SPEC) for tag, m in launchers.items()}
    spec = specs["before"]
    for tag, other in specs.items():
        if other != spec:
            raise SystemExit(f"not the same variant: {spec.describe()} vs {tag}: {other.describe()}")
    f = spec.features
    if f.sinks or f.chunked or f.varlen:
        raise SystemExit("plain variants only (no sinks, chunked or varlen arguments)")
    dtype = getattr(torch, DTYPES[spec.dtype])
    for seq in args.seq:
        q = torch.randn(args.batch, args.heads, seq, spec.head_dim, device="cuda", dtype=dtype)
        k = torch.randn(args.batch, args.heads // spec.gqa, seq, spec.head_dim, device="cuda", dtype=dtype)
        v = torch.randn_like(k)
        if args.backward:
            out, lse, res = launchers["before"].forward(q, k, v)
            dout = torch.randn_like(out)
            runs = {tag: (lambda m=m: m.backward(q, k, v, out, lse, res, dout)) for tag, m in launchers.items()}
            results = {tag: run() for tag, run in runs.items()}
        else:
            outs = {tag: torch.empty_like(q) for tag in launchers}
            runs = {tag: (lambda m=m, o=outs[tag]: m.launch(q, k, v, out=o)) for tag, m in launchers.items()}
            results = {tag: (run(), outs[tag])[1:] for tag, run in runs.items()}
        torch.cuda.synchronize()

        def same(tag):
            if args.backward:
                return "gradients vs before: " + ", ".join(
                    f"{name} {_rel(a, b):.1e}" for name, a, b in zip(("dq", "dk", "dv"), results[tag],
                                                                     results["before"]))
            if not torch.equal(results[tag][0], results["before"][0]):
                raise SystemExit(f"S={seq}: {tag}'s output differs from before's")
            return "output identical"

        times = {tag: [] for tag in runs}
        for _ in range(args.rounds):
            for tag in times:
                times[tag].append(triton.testing.do_bench(runs[tag], warmup=25, rep=100) * 1e3)
        med = {tag: sorted(t)[len(t) // 2] for tag, t in times.items()}
        print(f"S={seq}: before {med['before']:.1f} us, rounds {[round(t, 1) for t in times['before']]}")
        for tag in list(runs)[1:]:
            print(f"  {tag}: {med[tag]:.1f} us ({(med[tag] / med['before'] - 1) * 100:+.1f} %), {same(tag)}; "
                  f"rounds {[round(t, 1) for t in times[tag]]}")


if __name__ == "__main__":
    main()
