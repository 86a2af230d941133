"""Tensors past 2^31 elements (GPU): a >= 512k-token prefill of shape A and its backward.

    python scripts/long_context_check.py [--seq 524416] [--layout bhsd bshd packed] [--forward-only]

Shape A (H32/8, D128, W4096, fp16), one sequence: at S = 524 416, q holds more than 2^31
elements, so the launcher takes the kernels' 64-bit-indexed twins.  Prints the relative
errors against the float64 reference (attngen.testing.long_context_errors: the first and last
256 rows' outputs, dq of the last rows, dk and dv of the last keys) and the times.
"""
import argparse
import time

import torch

from attngen.testing import long_context_errors


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=524416)
    p.add_argument("--layout", nargs="+", default=["bhsd", "bshd", "packed"])
    p.add_argument("--forward-only", action="store_true")
    args = p.parse_args()
    for layout in args.layout:
        t0 = time.perf_counter()
        long_context_errors(args.seq, layout, backward=not args.forward_only, say=print)
        torch.cuda.synchronize()
        print(f"  {time.perf_counter() - t0:.1f} s (compiling included on first use)", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
