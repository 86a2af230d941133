"""Context parallelism on real devices: attngen.distributed against one process on the whole
sequence (output and dq, dk, dv), and the time of one forward + backward: per rank with the
halo exchange, the same rank's computation alone (one chunked launch over [halo | local] with
the halo already in place, no communication), and one GPU on the whole sequence (means of
--reps steps).

    torchrun --nproc_per_node 2 scripts/cp_check.py [--seq 4096] [--window 1024] [--dtype fp16]
    # shape A at 256k: --seq 262144 --window 4096 --heads 32 --kv-heads 8 --head-dim 128 --dtype fp16
    # a bidirectional window {left: 127, right: 64}: --bidirectional 127 64
    # --profile DIR: each rank writes its step's torch.profiler table (DIR/rank<r>.txt)

The exchange is timed twice: with the chunk lengths gathered by the call (its all_gather and
the host's wait for it) and with ``lengths=`` given.

On GPUs (NCCL) both sides run attngen's kernels: the ranks attngen.distributed's parts, the
reference process the plain kernel over the whole sequence.  Without GPUs it runs on the CPU
with gloo, the ranks' float64 emulation of the kernels against the float64 reference (a
check of this script).
"""
import argparse
import os
import time

import torch
import torch.distributed as dist

import attngen
from attngen.core import reference
from attngen import distributed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=4096, help="the whole sequence")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--bidirectional", type=int, nargs=2, metavar=("LEFT", "RIGHT"),
                   help="a bidirectional window {left, right} in place of the causal --window")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--profile", metavar="DIR")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = (torch.bfloat16 if args.dtype == "bf16" else torch.float16) if cuda else torch.float64
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

    if args.bidirectional:
        window, causal = {"left": args.bidirectional[0], "right": args.bidirectional[1]}, False
    else:
        window, causal = args.window, True
    mask = attngen.Mask.from_window(window, causal)
    lengths = [bounds[r + 1] - bounds[r] for r in range(world)]

    def step(given=None):
        out = distributed.attention(*mine, window=window, causal=causal, lengths=given)
        grads = torch.autograd.grad(out, mine, dout[:, :, a:b])
        return out, grads

    def timed(fn) -> float:
        fn()
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        return (time.perf_counter() - start) / args.reps * 1e3

    out, grads = step()
    cp_ms = timed(step)
    given_ms = timed(lambda: step(lengths))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            step(lengths)
            if cuda:
                torch.cuda.synchronize()
        os.makedirs(args.profile, exist_ok=True)
        with open(os.path.join(args.profile, f"rank{rank}.txt"), "w") as f:
            f.write(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total",
                                              row_limit=40))
        prof.export_chrome_trace(os.path.join(args.profile, f"rank{rank}.json"))

    # the same rank's computation with its halo already in place: what the exchange adds to
    lo, hi = mask.key_range(a, b, args.seq)
    alone = [q[:, :, a:b].clone().requires_grad_(), k[:, :, lo:hi].clone().requires_grad_(),
             v[:, :, lo:hi].clone().requires_grad_()]
    # one launch of the chunked kernel over [left halo | local | right halo] (on the CPU: the reference)
    alone_mask = distributed._shifted(mask, hi - b)
    run = attngen.get_kernel(alone_mask, gqa=args.heads // args.kv_heads, chunked=True) if cuda else \
        (lambda qq, kk, vv: reference.attention(qq, kk, vv, alone_mask, q_offset=kk.shape[2] - qq.shape[2]))
    alone_ms = timed(lambda: torch.autograd.grad(run(*alone), alone, dout[:, :, a:b]))

    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    one = attngen.get_kernel(mask, gqa=args.heads // args.kv_heads) if cuda else \
        (lambda qq, kk, vv: reference.attention(qq, kk, vv, mask))
    ref = one(*whole)
    ref_grads = torch.autograd.grad(ref, whole, dout)
    one_ms = timed(lambda: torch.autograd.grad(one(*whole), whole, dout))
    with torch.no_grad():           # inference: the pieces run the inference kernels
        inferred = distributed.attention(*mine, window=window, causal=causal)
    errs = [((x.float() - y[:, :, a:b].float()).norm() / y[:, :, a:b].float().norm()).item()
            for x, y in zip((out, *grads, inferred), (ref, *ref_grads, ref))]
    print(f"rank {rank}/{world} on {torch.cuda.get_device_name() if cuda else 'cpu'}: positions "
          f"{a}..{b - 1}; rel diff vs one process: out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} "
          f"dv {errs[3]:.1e}, inference out {errs[4]:.1e}; fwd+bwd {cp_ms:.2f} ms with the exchange ({given_ms:.2f} ms with lengths "
          f"given), {alone_ms:.2f} ms its computation "
          f"alone, one GPU on the whole sequence {one_ms:.2f} ms (ratio {cp_ms / one_ms:.3f})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
