"""Time two generated kernels of the same plain variant against each other (GPU).

    python scripts/ab_kernels.py BEFORE_DIR AFTER_DIR --heads 32 --seq 8192 32768

BEFORE_DIR / AFTER_DIR are variant directories written by `attngen build` (e.g. one built
from an older commit with `git worktree`, one from HEAD).  Both kernels get the same fresh
random inputs; their outputs must be bit-identical; they are timed in interleaved rounds of
`triton.testing.do_bench` and the median round is reported.  Plain variants only (no
sinks, chunked or varlen arguments): it measures whether a template change slowed them.
"""
import argparse
import importlib.util
import math
import pathlib

import cuda.tile as ct
import torch
import triton

from attngen.launch import scale_arg


def load(directory: pathlib.Path):
    spec = importlib.util.spec_from_file_location(directory.name, directory / "kernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, getattr(module, directory.name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=pathlib.Path)
    p.add_argument("after", type=pathlib.Path)
    p.add_argument("--heads", type=int, required=True, help="query heads H")
    p.add_argument("--seq", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    (mod_a, kern_a), (mod_b, kern_b) = load(args.before), load(args.after)
    for name in ("HEAD_DIM", "BLOCK_M", "GROUP"):
        if getattr(mod_a, name) != getattr(mod_b, name):
            raise SystemExit(f"the kernels differ in {name}: not the same variant")
    dtype = torch.bfloat16 if "_bf16_" in args.before.name else torch.float16
    d, bm, group = mod_a.HEAD_DIM, mod_a.BLOCK_M, mod_a.GROUP
    for seq in args.seq:
        q = torch.randn(1, args.heads, seq, d, device="cuda", dtype=dtype)
        k = torch.randn(1, args.heads // group, seq, d, device="cuda", dtype=dtype)
        v = torch.randn_like(k)
        runs, outs = {}, {}
        for tag, kern in (("before", kern_a), ("after", kern_b)):
            out = outs[tag] = torch.empty_like(q)
            launch_args = (q, k, v, out, scale_arg(None, d))
            runs[tag] = lambda kern=kern, a=launch_args: ct.launch(
                torch.cuda.current_stream(), (math.ceil(seq / bm), args.heads, 1), kern, a)
            runs[tag]()
        torch.cuda.synchronize()
        if not torch.equal(outs["before"], outs["after"]):
            raise SystemExit(f"S={seq}: the two kernels' outputs differ")
        times = {"before": [], "after": []}
        for _ in range(args.rounds):
            for tag in times:
                times[tag].append(triton.testing.do_bench(runs[tag], warmup=25, rep=100) * 1e3)
        med = {tag: sorted(t)[len(t) // 2] for tag, t in times.items()}
        print(f"S={seq}: before {med['before']:.1f} us, after {med['after']:.1f} us "
              f"({(med['after'] / med['before'] - 1) * 100:+.1f} %), outputs identical; rounds "
              f"before {[round(t, 1) for t in times['before']]} after {[round(t, 1) for t in times['after']]}")


if __name__ == "__main__":
    main()
