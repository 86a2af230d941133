"""Context parallelism on real devices: attngen.distributed against one process on the whole
sequence (output and dq, dk, dv), and the time of one forward + backward.

    torchrun --nproc_per_node 2 scripts/cp_check.py [--seq 4096] [--window 1024]

On GPUs (NCCL) both sides run attngen's kernels: the ranks the chunked kernel over their
[halo | local] keys, the reference process the plain kernel over the whole sequence.  Without
GPUs it runs on the CPU with gloo and the float64 reference (a check of this script).
"""
import argparse
import os
import time

import torch
import torch.distributed as dist

import attngen
from attngen import reference
from attngen import distributed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=4096, help="the whole sequence")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float64
    gen = torch.Generator().manual_seed(0)
    shape = lambda h: (1, h, args.seq, args.head_dim)  # noqa: E731
    q, k, v = (torch.randn(shape(h), generator=gen).to(device, dtype)
               for h in (args.heads, args.kv_heads, args.kv_heads))
    dout = torch.randn(shape(args.heads), generator=gen).to(device, dtype)
    # unequal chunks: the first rank holds a little more
    bounds = [0] + [args.seq * (r + 1) // world + (64 if r < world - 1 else 0) for r in range(world)]
    bounds[-1] = args.seq
    a, b = bounds[rank], bounds[rank + 1]
    mine = [t[:, :, a:b].clone().requires_grad_() for t in (q, k, v)]

    def step():
        out = distributed.attention(*mine, window=args.window)
        grads = torch.autograd.grad(out, mine, dout[:, :, a:b])
        return out, grads

    out, grads = step()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(5):
        step()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    cp_ms = (time.perf_counter() - start) / 5 * 1e3

    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    if cuda:
        ref = attngen.get_kernel(window=args.window, gqa=args.heads // args.kv_heads)(*whole)
    else:
        ref = reference.attention(*whole, attngen.Mask.from_window(args.window))
    ref_grads = torch.autograd.grad(ref, whole, dout)
    errs = [((x.float() - y[:, :, a:b].float()).norm() / y[:, :, a:b].float().norm()).item()
            for x, y in zip((out, *grads), (ref, *ref_grads))]
    print(f"rank {rank}/{world} on {torch.cuda.get_device_name() if cuda else 'cpu'}: positions "
          f"{a}..{b - 1}; rel diff vs one process: out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} "
          f"dv {errs[3]:.1e}; fwd+bwd {cp_ms:.2f} ms", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
