"""Context parallelism, the two ways to attend a rank's first L = W - 1 queries to its left
halo (docs/distributed.md), timed on one GPU with the halo already in place (the exchange is
overlapped either way; this measures the computation that differs):

* pieces (what attngen.distributed does): the middle queries L.. over the local keys, then
  the edge queries 0..L-1 over [halo | their local keys], one chunked launch each;
* lse-merge: every query over the local keys, then the edge queries over the halo keys alone
  (keys at or after the query's kernel position: the window's other side), the two partial
  results merged through their log-sum-exp; the backward runs both parts' kernels with the
  merged output and log-sum-exp.

Both forward + backward are checked against one chunked launch over [halo | local] and timed
(CUDA events, median of --reps).

    python scripts/cp_merge_ab.py [--local 131072] [--window 4096] [--heads 32] [--kv-heads 8]
        [--head-dim 128] [--dtype fp16]
"""
import argparse
import statistics

import torch

import attngen
from attngen.mask import Mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--local", type=int, default=131072, help="the rank's chunk length")
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="fp16")
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    dtype = torch.float16 if a.dtype == "fp16" else torch.bfloat16
    n, L, gqa = a.local, a.window - 1, a.heads // a.kv_heads
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(h, s):
        return torch.randn((1, h, s, a.head_dim), generator=gen, device="cuda").to(dtype)
    q, dout = rand(a.heads, n), rand(a.heads, n)
    k_all, v_all = rand(a.kv_heads, L + n), rand(a.kv_heads, L + n)     # [halo | local]
    k, v, hk, hv = k_all[:, :, L:], v_all[:, :, L:], k_all[:, :, :L], v_all[:, :, :L]
    ops = torch.ops.attngen

    def key(mask):
        return attngen.get_kernel(mask, gqa=gqa, chunked=True).key
    causal, other_side = key(Mask(True, L)), key(Mask(False, 0, L - 1))

    def fwd(variant, qq, kk, vv):
        return ops.attention_fwd(variant, qq, kk, vv, None, None, None, None, None, None, "bhsd")

    def bwd(variant, qq, kk, vv, out, lse, res, do):
        return ops.attention_bwd(variant, qq, kk, vv, out, lse, res, do, None, None, None, None, None, None,
                                 "bhsd")

    def pieces():
        o_mid, lse_mid, r_mid = fwd(causal, q[:, :, L:], k, v)
        ke, ve = torch.cat([hk, k[:, :, :L]], 2), torch.cat([hv, v[:, :, :L]], 2)
        o_edge, lse_edge, r_edge = fwd(causal, q[:, :, :L], ke, ve)
        out = torch.cat([o_edge, o_mid], 2)
        dq = torch.empty_like(q)
        gq, gk, gv, _ = bwd(causal, q[:, :, :L], ke, ve, out[:, :, :L], lse_edge, r_edge, dout[:, :, :L])
        dq[:, :, :L] = gq
        dhk, dhv = gk[:, :, :L], gv[:, :, :L]
        gq, dk, dv, _ = bwd(causal, q[:, :, L:], k, v, out[:, :, L:], lse_mid, r_mid, dout[:, :, L:])
        dq[:, :, L:] = gq
        dk[:, :, :L] += gk[:, :, L:]
        dv[:, :, :L] += gv[:, :, L:]
        return out, dq, torch.cat([dhk, dk], 2), torch.cat([dhv, dv], 2)

    def merged():
        out, lse, res = fwd(causal, q, k, v)
        o_h, lse_h, _ = fwd(other_side, q[:, :, :L], hk, hv)
        lse_e = torch.logaddexp2(lse[:, :, :L], lse_h)
        out = out.clone()
        out[:, :, :L] = (out[:, :, :L].float() * torch.exp2(lse[:, :, :L] - lse_e)[..., None]
                         + o_h.float() * torch.exp2(lse_h - lse_e)[..., None]).to(dtype)
        lse = lse.clone()
        lse[:, :, :L] = lse_e
        dq, dk, dv, _ = bwd(causal, q, k, v, out, lse, res, dout)
        gq, dhk, dhv, _ = bwd(other_side, q[:, :, :L], hk, hv, out[:, :, :L], lse[:, :, :L], res, dout[:, :, :L])
        dq[:, :, :L] += gq
        return out, dq, torch.cat([dhk, dk], 2), torch.cat([dhv, dv], 2)

    def whole():
        out, lse, res = fwd(causal, q, k_all, v_all)
        dq, dk, dv, _ = bwd(causal, q, k_all, v_all, out, lse, res, dout)
        return out, dq, dk, dv

    ref = whole()
    for name, fn in (("pieces", pieces), ("lse-merge", merged), ("one launch", whole)):
        got = fn()
        errs = [((x.float() - y.float()).norm() / y.float().norm()).item() for x, y in zip(got, ref)]
        times = []
        for _ in range(a.reps):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        print(f"{name:>10}: fwd+bwd {statistics.median(times):.2f} ms (median of {a.reps}); rel diff vs "
              f"one launch: out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e}", flush=True)


if __name__ == "__main__":
    main()
