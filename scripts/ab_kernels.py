"""Time two generated builds of the same plain variant against each other (GPU).

    python scripts/ab_kernels.py BEFORE_DIR AFTER_DIR --heads 32 --seq 8192 32768 [--batch 2] [--backward]

BEFORE_DIR / AFTER_DIR are variant directories written by `attngen build` (e.g. one built
from an older commit with `git worktree`, one from HEAD).  Both get the same fresh random
inputs and are timed in interleaved rounds of `triton.testing.do_bench`; the median round is
reported.  Plain variants only (no sinks, chunked or varlen arguments): it measures whether a
template change slowed them.

The forward (default) is called through the public launcher (`launch`), so the grid, GQA
packing and batch are the variant's own, and the two outputs must be bit-identical.  With
``--backward`` it times the launchers' `backward` on one forward's output and log-sum-exp
(both from AFTER_DIR's `forward`) and a random dO, and reports how far BEFORE's gradients are
from AFTER's (identical bits are not required: a change may reorder a sum).
"""
import argparse
import importlib
import pathlib

import torch
import triton

from attngen.codegen import load_package
from attngen.support import DTYPES
from attngen.variant import KernelSpec


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=pathlib.Path)
    p.add_argument("after", type=pathlib.Path)
    p.add_argument("--heads", type=int, required=True, help="query heads H")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--backward", action="store_true", help="time the backward kernels instead")
    args = p.parse_args()

    packages = {"before": load_package(args.before.resolve()), "after": load_package(args.after.resolve())}
    launchers = {tag: importlib.import_module(pkg.__name__ + ".launcher") for tag, pkg in packages.items()}
    specs = {tag: KernelSpec.from_dict(pkg.SPEC) for tag, pkg in packages.items()}
    if specs["before"] != specs["after"]:
        raise SystemExit(f"not the same variant: {specs['before'].describe()} vs {specs['after'].describe()}")
    spec = specs["before"]
    f = spec.features
    if f.sinks or f.chunked or f.varlen:
        raise SystemExit("plain variants only (no sinks, chunked or varlen arguments)")
    dtype = getattr(torch, DTYPES[spec.dtype])
    for seq in args.seq:
        q = torch.randn(args.batch, args.heads, seq, spec.head_dim, device="cuda", dtype=dtype)
        k = torch.randn(args.batch, args.heads // spec.gqa, seq, spec.head_dim, device="cuda", dtype=dtype)
        v = torch.randn_like(k)
        if args.backward:
            out, lse, res = launchers["after"].forward(q, k, v)
            dout = torch.randn_like(out)
            runs = {tag: (lambda m=m: m.backward(q, k, v, out, lse, res, dout)) for tag, m in launchers.items()}
            grads = {tag: run() for tag, run in runs.items()}
            torch.cuda.synchronize()
            same = ", ".join(f"{name} {_rel(b, a):.1e}" for name, b, a in
                             zip(("dq", "dk", "dv"), grads["before"], grads["after"]))
            same = f"gradients before vs after: {same}"
        else:
            outs = {tag: torch.empty_like(q) for tag in packages}
            runs = {tag: (lambda pkg=pkg, o=outs[tag]: pkg.launch(q, k, v, out=o)) for tag, pkg in packages.items()}
            for run in runs.values():
                run()
            torch.cuda.synchronize()
            if not torch.equal(outs["before"], outs["after"]):
                raise SystemExit(f"S={seq}: the two kernels' outputs differ")
            same = "outputs identical"
        times = {tag: [] for tag in runs}
        for _ in range(args.rounds):
            for tag in times:
                times[tag].append(triton.testing.do_bench(runs[tag], warmup=25, rep=100) * 1e3)
        med = {tag: sorted(t)[len(t) // 2] for tag, t in times.items()}
        print(f"S={seq}: before {med['before']:.1f} us, after {med['after']:.1f} us "
              f"({(med['after'] / med['before'] - 1) * 100:+.1f} %), {same}; rounds "
              f"before {[round(t, 1) for t in times['before']]} after {[round(t, 1) for t in times['after']]}")


if __name__ == "__main__":
    main()
