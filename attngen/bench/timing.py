"""Timing one pass (forward, backward, or both) of every implementation of a shape at each
sequence length: medians (p20/p80 too) of ``triton.testing.do_bench`` or of CUDA-graph
replays, effective TFLOP/s and extra memory, as long-format rows."""

from __future__ import annotations

from dataclasses import asdict

from ..core.variant import KernelSpec
from ..core.version import environment
from .presets import DEFAULT_PEERS, Shape, implementations, make_inputs, output_error
from .report import table

def cuda_graph(fn):
    """Capture ``fn()`` in a CUDA graph after one warm-up call on a side stream (which builds,
    loads and compiles what it needs); returns ``(graph, outputs)``: ``graph.replay()``
    recomputes ``outputs`` in place from the current contents of ``fn``'s input tensors."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


QUANTILES = (0.2, 0.5, 0.8)


def _time(fn, graph: bool = False):
    """p20, p50, p80 of ``fn`` in microseconds: ``do_bench`` (L2 flushed before each call), or
    with ``graph`` a CUDA graph of one call replayed back to back (no host launch cost, no L2
    flush), timed by CUDA events over rounds of 10 replays."""
    import torch
    import triton

    if not graph:
        got = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=list(QUANTILES))
        return tuple(t * 1e3 for t in got)      # ms -> us
    replays, rounds = 10, 30
    g, _ = cuda_graph(fn)
    for _ in range(replays):
        g.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(rounds)]
    for start, end in events:
        start.record()
        for _ in range(replays):
            g.replay()
        end.record()
    torch.cuda.synchronize()
    times = torch.tensor([s.elapsed_time(e) * 1e3 / replays for s, e in events])
    return tuple(torch.quantile(times, q).item() for q in QUANTILES)


def _extra_memory(fn, out_bytes: int) -> int:
    """Peak device memory one call allocates beyond its output, in bytes."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - out_bytes
    del result
    return max(0, extra)


PASSES = ("fwd", "bwd", "fwd+bwd")
#: FLOPs of a pass as a multiple of the forward's (the backward's five matmuls against two)
PASS_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def _pass(fn, which: str, q, k, v, sinks):
    """A zero-argument callable timing ``which`` of ``fn`` (the forward), and its output.
    ``bwd`` runs the backward of one recorded forward again and again (retain_graph)."""
    import torch

    if which == "fwd":
        return fn, fn()
    inputs = [t for t in (q, k, v, sinks) if t is not None]
    if which == "bwd":
        out = fn()
        dout = torch.randn_like(out)
        return (lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)), out
    # fwd+bwd: the output to check is computed without recording: an autograd graph kept alive
    # here would pin the inputs' AccumulateGrad nodes to this stream, and a CUDA-graph capture
    # of the step (--graph) fails when it has to wait on them
    with torch.no_grad():
        out = fn()
    dout = torch.randn_like(out)
    return (lambda: torch.autograd.grad(fn(), inputs, dout)), out


def bench(shape: Shape, names=DEFAULT_PEERS, spec: KernelSpec | None = None, say=print,
          which: str = "fwd", graph: bool = False) -> list[dict]:
    """Time every implementation at every sequence length of ``shape`` for one pass (``fwd``,
    ``bwd`` or ``fwd+bwd``), with ``graph`` as CUDA-graph replays; one dict per row.  attngen
    runs ``spec`` (default: the shape's tuned kernel, ``shape.spec()``)."""
    import torch

    rows = []
    env = environment()
    # the tuned kernel for the shape, not whichever built variant happens to match it
    spec = spec or shape.spec()
    for seq in shape.seqs:
        q, k, v, sinks = make_inputs(shape, seq)
        if which != "fwd":       # before the peers are built: SDPA's repeated K/V must be in the graph
            for t in (q, k, v, sinks):
                if t is not None:
                    t.requires_grad_(True)
        pairs = shape.mask.pairs(seq, seq + shape.prefix)
        flops = 4 * shape.head_dim * pairs * shape.batch * shape.heads * PASS_FLOPS[which]
        io_bytes = (2 * q.numel() + 2 * k.numel()) * q.element_size()
        impls = implementations(shape, seq, q, k, v, sinks, spec, names)
        base = None
        for name, forward in impls.items():
            fn, out = _pass(forward, which, q, k, v, sinks)
            torch.cuda.synchronize()
            # peers that compute full causal attention are not expected to match the window
            err = output_error(out.detach(), q.detach(), k.detach(), v.detach(),
                         None if sinks is None else sinks.detach(), shape) \
                if name in ("attngen", "attngen-det", "flex", "sdpa-band") else None
            p20, p50, p80 = _time(fn, graph)
            extra = _extra_memory(fn, 0 if which != "fwd" else out.numel() * out.element_size())
            del out, fn
            if name == "attngen":
                base = p50
            row = {**env, "shape": shape.label, "batch": shape.batch, "heads": shape.heads,
                   "heads_kv": shape.heads_kv, "head_dim": shape.head_dim, "window": shape.window,
                   "dtype": shape.dtype, "seq": seq, "prefix": shape.prefix, "softcap": shape.softcap,
                   "sinks": shape.sinks, "impl": name, "pass": which,
                   "timing": "cuda-graph" if graph else "do_bench", "us_p20": p20, "us_p50": p50,
                   "us_p80": p80, "tflops": flops / (p50 * 1e-6) / 1e12,
                   "io_gb_s": io_bytes / (p50 * 1e-6) / 1e9, "extra_mem_bytes": extra,
                   "rel_err": err, "tiles": asdict(spec.tiles) if name == "attngen" else None}
            rows.append(row)
        for row in rows[-len(impls):]:
            row["attngen_speedup"] = row["us_p50"] / base if base else None
        say(table(rows[-len(impls):], header=seq == shape.seqs[0]))
        del q, k, v
        torch.cuda.empty_cache()
    return rows
