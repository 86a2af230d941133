"""Host time of one attngen call, next to the same call through the torch.library ops and
next to PyTorch SDPA (GPU).

    python scripts/host_time.py [--rounds 3] [--calls 200]

The inputs are small (B=1, H64/8, S=256, D=64, bf16) so the GPU is idle: each reading is the
median wall time of one call (``time.perf_counter``, then a sync outside the timing), i.e.
what the Python launcher, the op dispatch and autograd cost on the CPU.  Rounds interleave
the calls; the median round is printed with all rounds.  docs/performance.md, "Host time of one call".
"""
import argparse
import time

import torch
import torch.nn.functional as F

import attngen


def host_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        torch.cuda.synchronize()
    return sorted(times)[len(times) // 2] * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()

    def make(heads):
        return torch.randn(1, heads, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    q, k, v = make(64), make(8), make(8)
    dout = torch.randn_like(q)
    attn = attngen.get_kernel(window=128, gqa=8, head_dim=64, dtype="bf16")
    plain = [t.detach() for t in (q, k, v)]
    rest = (None, None, None, None, None, None, "bhsd")   # sinks, offsets, lengths, scale, layout

    def grads(out):
        return torch.autograd.grad(out, (q, k, v), dout)

    cases = {
        "inference, through the op attngen::attention": lambda: torch.ops.attngen.attention(attn.key, *plain, *rest),
        "inference, attn(q, k, v)": lambda: attn(*plain),
        "fwd+bwd, through attngen::attention_fwd's autograd": lambda: grads(
            torch.ops.attngen.attention_fwd(attn.key, q, k, v, *rest)[0]),
        "fwd+bwd, attn(q, k, v)": lambda: grads(attn(q, k, v)),
        "fwd+bwd, SDPA (full causal, GQA)": lambda: grads(
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
    }
    readings = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            readings[name].append(host_us(fn, args.calls))
    print(f"host time per call on {torch.cuda.get_device_name()}, median of {args.calls} calls")
    for name, r in readings.items():
        print(f"{name:<52} {sorted(r)[len(r) // 2]:7.1f} us  (rounds {[round(x) for x in r]})")


if __name__ == "__main__":
    main()
