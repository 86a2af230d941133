"""Host time of one attngen call, next to the same call through the torch.library ops and
next to PyTorch SDPA (GPU).

    python scripts/host_time.py [--rounds 3] [--calls 200] [--breakdown]

The inputs are small (B=1, H64/8, S=256, D=64, bf16) so the GPU is idle: each reading is the
median wall time of one call (``time.perf_counter``, then a sync outside the timing), i.e.
what the Python launcher, the op dispatch and autograd cost on the CPU.  Rounds interleave
the calls; the median round is printed with all rounds.  docs/performance.md, "Host time of one call".

Two readings run the backward on the calling thread (``torch.autograd.set_multithreading_enabled(False)``)
instead of autograd's device thread, attngen's and SDPA's.

``--breakdown`` also times the parts of one eager training call alone, the same way: a
CUDA allocation, the device/stream lookup, each kernel launch of the step replayed with the
arguments it had, the launcher's forward and backward called from the main thread, autograd's
cost for a Function that launches nothing, and the launcher's backward run from inside such a
Function (on autograd's device thread) once a step and many times in a row, so that a reading
says where the call's host time goes.
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
    p.add_argument("--breakdown", action="store_true", help="also time the parts of a training call")
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

    def on_this_thread(step):
        with torch.autograd.set_multithreading_enabled(False):
            return step()

    cases = {
        "inference, through the op attngen::attention": lambda: torch.ops.attngen.attention(attn.key, *plain, *rest),
        "inference, attn(q, k, v)": lambda: attn(*plain),
        "fwd+bwd, through attngen::attention_fwd's autograd": lambda: grads(
            torch.ops.attngen.attention_fwd(attn.key, q, k, v, *rest)[0]),
        "fwd+bwd, attn(q, k, v)": lambda: grads(attn(q, k, v)),
        "fwd+bwd, SDPA (full causal, GQA)": lambda: grads(
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
        # autograd runs a CUDA backward on its device thread; this runs it on the caller's
        "fwd+bwd, attn(q, k, v), backward on the calling thread": lambda: on_this_thread(
            lambda: grads(attn(q, k, v))),
        "fwd+bwd, SDPA, backward on the calling thread": lambda: on_this_thread(lambda: grads(
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))),
    }
    readings = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            readings[name].append(host_us(fn, args.calls))
    print(f"host time per call on {torch.cuda.get_device_name()}, median of {args.calls} calls")
    for name, r in readings.items():
        print(f"{name:<52} {sorted(r)[len(r) // 2]:7.1f} us  (rounds {[round(x) for x in r]})")
    if args.breakdown:
        breakdown(attn, q, k, v, dout, args.calls)


def breakdown(attn, q, k, v, dout, calls: int) -> None:
    """The parts of one eager training call ``attn(q, k, v)`` + backward, each timed alone."""
    import cuda.tile as ct
    from attngen.runtime import ops
    from attngen.runtime.inputs import row_stats

    module = ops._module(attn.key, q)
    plain = [t.detach() for t in (q, k, v)]
    out, lse, res = module.forward(*plain)
    launches = []
    real_launch = module.ct.launch

    def record(stream, grid, kernel, args):
        launches.append((grid, kernel, args))
        return real_launch(stream, grid, kernel, args)

    module.ct.launch = record
    try:
        module.forward(*plain)
        module.backward(*plain, out, lse, res, dout)
    finally:
        module.ct.launch = real_launch
    torch.cuda.synchronize()

    class Probe(torch.autograd.Function):
        """A Function whose forward only allocates and whose backward only allocates too
        (autograd's own cost) or runs the launcher's backward as an eager training call does
        (trusting its inputs), where autograd runs a backward: its device thread."""
        @staticmethod
        def forward(ctx, launcher_backward, q, k, v):
            ctx.launcher_backward = launcher_backward
            return torch.empty_like(q)

        @staticmethod
        def backward(ctx, grad):
            if ctx.launcher_backward:
                return (None, *module.backward(*plain, out, lse, res, dout, check=False)[:3])
            return None, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    class Loop(torch.autograd.Function):
        """A Function whose backward times the launcher's backward run many times in a row on
        autograd's device thread (the thread stays busy between the calls)."""
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            Loop.reading = host_us(lambda: module.backward(*plain, out, lse, res, dout, check=False), calls)
            return grad

    def in_a_row_on_autograds_thread():
        x = torch.zeros(1, device=q.device, requires_grad=True)
        torch.autograd.grad(Loop.apply(x), x, torch.ones_like(x))
        return Loop.reading

    def on(device):
        with torch.cuda.device(device):
            return torch.cuda.current_stream()

    parts = {
        "torch.empty_like(q) on the GPU": lambda: torch.empty_like(q),
        "row_stats (a padded fp32 row buffer)": lambda: row_stats(lse.shape, q.device),
        "torch.cuda.device + current_stream": lambda: on(q.device),
        **{f"ct.launch alone: {kernel.name[len(module.NAME):] or '(inference)'}, grid {grid}": (
            lambda g=grid, kn=kernel, a=args: ct.launch(torch.cuda.current_stream(), g, kn, a))
           for grid, kernel, args in launches},
        "launcher forward (main thread)": lambda: module.forward(*plain),
        "launcher backward (main thread)": lambda: module.backward(*plain, out, lse, res, dout),
        "  trusting its inputs (check=False, as eager autograd)": lambda: module.backward(
            *plain, out, lse, res, dout, check=False),
        "autograd step, a Function that launches nothing": lambda: torch.autograd.grad(
            Probe.apply(False, q, k, v), (q, k, v), dout),
        "  + the launcher's backward in its backward": lambda: torch.autograd.grad(
            Probe.apply(True, q, k, v), (q, k, v), dout),
        "whole step, attn(q, k, v) + autograd.grad": lambda: torch.autograd.grad(
            attn(q, k, v), (q, k, v), dout),
    }
    print(f"\nparts of one training call, median of {calls} calls each (us)")
    for name, fn in parts.items():
        print(f"{name:<60} {host_us(fn, calls):7.1f}")
    print(f"{'  the launcher backward, in a row on autograd thread':<60} {in_a_row_on_autograds_thread():7.1f}")


if __name__ == "__main__":
    main()
