"""`attngen bench` and `attngen tune`: attngen against the kernels a user would otherwise pick.

For one shape and a list of sequence lengths, on the current GPU and in one process:

* ``attngen``     the generated kernel for the shape (tiles from the tuned table, or ``--tiles``);
* ``sdpa-flash``  PyTorch SDPA, flash backend, *full* causal (GQA heads expanded first);
* ``sdpa-cudnn``  PyTorch SDPA, cuDNN backend, *full* causal (GQA heads expanded first);
* ``flex``        FlexAttention, compiled, with the same window as a ``BlockMask``, ``enable_gqa``;
* ``sdpa-band``   PyTorch SDPA with an explicit boolean band mask (where S x S fits: S <= 16384).

Times are medians (p20/p80 too) of ``triton.testing.do_bench`` with warm-up excluded (or, with
``--graph``, of replays of a CUDA graph of the pass, which leave out the host's launch cost), on
fresh random inputs; before timing, each implementation's output is checked against the float64
reference on the first and last query rows.  Effective TFLOP/s count only the attended
(query, key) pairs: ``4 * D * pairs * B * H`` for the forward, 2.5 times that for the backward
(``--pass bwd`` times the backward of one recorded forward; ``--pass fwd+bwd`` both; extra
memory then counts everything a pass allocates, the gradients included).  Rows go to a long-format JSON file; ``plot``
draws them (needs matplotlib).  ``tune`` times candidate tile shapes for a shape and prints
the best, for ``attngen/tuning.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, replace

from .mask import Mask
from .support import DTYPES
from .tuning import Tiles
from .variant import Features, KernelSpec
from .version import environment

CHECK_ROWS = 256        # query rows checked at each end of the sequence
PEERS = ("attngen", "attngen-det", "sdpa-flash", "sdpa-cudnn", "flex", "sdpa-band")
#: attngen-det is attngen with the deterministic backward: timed only when asked for
DEFAULT_PEERS = tuple(p for p in PEERS if p != "attngen-det")


@dataclass(frozen=True)
class Shape:
    label: str
    heads: int
    heads_kv: int
    head_dim: int
    window: int | None
    dtype: str
    seqs: tuple[int, ...]
    batch: int = 1
    softcap: float | None = None
    sinks: bool = False
    prefix: int = 0          # cached keys before the queries (chunked prefill)

    @property
    def mask(self) -> Mask:
        return Mask.from_window(self.window, causal=True)

    def spec(self, tiles: Tiles | None = None) -> KernelSpec:
        """The attngen kernel for the shape: every tile from the tuned tables, or ``tiles``
        for the forward's."""
        return KernelSpec.tuned(self.mask, self.heads // self.heads_kv, self.head_dim, self.dtype,
                                Features(self.softcap, self.sinks, chunked=self.prefix > 0), tiles)

    @property
    def plain(self) -> bool:
        """Computes what full-causal SDPA and FlexAttention compute (up to the window)."""
        return self.softcap is None and not self.sinks and not self.prefix


PRESETS = {
    "A": Shape("A mistral-7b", 32, 8, 128, 4096, "fp16", (4096, 8192, 16384, 32768)),
    "B": Shape("B gemma3-4b local", 8, 4, 256, 1024, "bf16", (4096, 8192, 16384, 32768)),
    "B'": Shape("B' gemma3-27b local", 32, 16, 128, 1024, "bf16", (4096, 8192, 16384, 32768)),
    "C": Shape("C gpt-oss local", 64, 8, 64, 128, "bf16", (4096, 8192, 16384, 32768)),
    "C16": Shape("C gpt-oss local fp16", 64, 8, 64, 128, "fp16", (4096, 8192, 16384, 32768)),
    # features: what each costs over the plain kernel of the same shape
    "C-sinks": Shape("C gpt-oss local + sinks", 64, 8, 64, 128, "bf16", (8192, 32768), sinks=True),
    "G2": Shape("gemma2-9b local", 16, 8, 256, 4096, "bf16", (8192, 32768)),
    "G2-softcap": Shape("gemma2-9b local + softcap", 16, 8, 256, 4096, "bf16", (8192, 32768), softcap=50.0),
    "A-chunk": Shape("A mistral-7b, chunk after 28k prefix", 32, 8, 128, 4096, "fp16", (1024, 4096),
                     prefix=28672),
}


DEFAULT_PRESETS = ("A", "B", "B'", "C", "C16")


def parse_window(text: str) -> int | str:
    """``--window``: a positive number of keys, or ``full``."""
    if text == "full":
        return text
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"a window is a positive integer or 'full', got {text!r}")
    return int(text)


def parse_tiles(text: str) -> Tiles:
    """The inverse of ``Tiles.tag``: ``128x64o2c1p8`` -> Tiles(128, 64, 2, 1, pack=8)."""
    import re

    match = re.fullmatch(r"(\d+)x(\d+)o(\d+)c(\d+)(?:p(\d+))?(?:w(\d+))?", text)
    if not match:
        raise argparse.ArgumentTypeError(
            f"tiles look like 128x64o2c1, 128x64o2c1p8 or 128x128o1c1w8 (BMxBN, o occupancy, c CTAs "
            f"per cluster, p query heads per tile, w worker warps), got {text!r}")
    bm, bn, occ, ctas, pack, warps = match.groups()
    try:
        return Tiles(int(bm), int(bn), int(occ), int(ctas), int(pack or 1),
                     int(warps) if warps else None)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _inputs(shape: Shape, seq: int):
    import torch

    dtype = getattr(torch, DTYPES[shape.dtype])
    make = lambda h, s: torch.randn(shape.batch, h, s, shape.head_dim, device="cuda",  # noqa: E731
                                    dtype=torch.float32).to(dtype)
    q = make(shape.heads, seq)
    if shape.softcap is not None:
        q = q * (shape.softcap / 4)          # scores large enough for the cap to matter
    sinks = torch.randn(shape.heads, device="cuda") if shape.sinks else None
    return q, make(shape.heads_kv, seq + shape.prefix), make(shape.heads_kv, seq + shape.prefix), sinks


def _implementations(shape: Shape, seq: int, q, k, v, sinks, spec: KernelSpec, names):
    """name -> zero-argument callable returning the output, for the requested peers."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    impls = {}
    group = shape.heads // shape.heads_kv
    if {"attngen", "attngen-det"} & set(names):
        from .registry import default_registry

        extra = {"sinks": sinks} if shape.sinks else {}
        attn = default_registry.ensure(spec)
        if "attngen" in names:
            impls["attngen"] = lambda: attn(q, k, v, deterministic=False, **extra)
        if "attngen-det" in names:
            impls["attngen-det"] = lambda: attn(q, k, v, deterministic=True, **extra)
    if not shape.plain:
        names = [n for n in names if n == "flex"] if not shape.sinks else []
    needs_expanded = {"sdpa-flash", "sdpa-cudnn", "sdpa-band"} & set(names)
    if needs_expanded:
        ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                          ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        if name in names:
            def run(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
            impls[name] = run
    if "sdpa-band" in names and seq <= 16384:
        i = torch.arange(seq, device="cuda")
        band = shape.mask.visible(i[:, None], i[None, :])
        impls["sdpa-band"] = lambda: F.scaled_dot_product_attention(q, ke, ve, attn_mask=band)
    if "flex" in names:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        from .reference import softcapped

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        flex = torch.compile(flex_attention, dynamic=False)
        mask, prefix, cap = shape.mask, shape.prefix, shape.softcap

        def mask_mod(b, h, q_idx, kv_idx):
            return mask.visible(q_idx + prefix, kv_idx)

        def score_mod(score, b, h, q_idx, kv_idx):
            return softcapped(score, cap)
        block_mask = create_block_mask(mask_mod, None, None, seq, seq + prefix, device="cuda")
        mods = {"score_mod": score_mod} if cap is not None else {}
        impls["flex"] = lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True, **mods)
    return impls


def _error(out, q, k, v, sinks, shape: Shape) -> float:
    """Relative error of ``out`` against the float64 reference on the first and last rows."""
    from .reference import attention

    seq = q.shape[2]
    errs = []
    for start in sorted({0, max(0, seq - CHECK_ROWS)}):
        stop = min(seq, start + CHECK_ROWS)
        ref = attention(q[:, :, start:stop], k, v, shape.mask, q_offset=shape.prefix + start,
                        softcap=shape.softcap, sinks=sinks)
        got = out[:, :, start:stop].double()
        errs.append(((got - ref).norm() / ref.norm()).item())
    return max(errs) if all(math.isfinite(e) for e in errs) else float("nan")


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
        q, k, v, sinks = _inputs(shape, seq)
        if which != "fwd":       # before the peers are built: SDPA's repeated K/V must be in the graph
            for t in (q, k, v, sinks):
                if t is not None:
                    t.requires_grad_(True)
        pairs = shape.mask.pairs(seq, seq + shape.prefix)
        flops = 4 * shape.head_dim * pairs * shape.batch * shape.heads * PASS_FLOPS[which]
        io_bytes = (2 * q.numel() + 2 * k.numel()) * q.element_size()
        impls = _implementations(shape, seq, q, k, v, sinks, spec, names)
        base = None
        for name, forward in impls.items():
            fn, out = _pass(forward, which, q, k, v, sinks)
            torch.cuda.synchronize()
            # peers that compute full causal attention are not expected to match the window
            err = _error(out.detach(), q.detach(), k.detach(), v.detach(),
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


def table(rows: list[dict], header: bool = True) -> str:
    lines = []
    if header and rows:
        r = rows[0]
        lines.append(f"\n{r['shape']}: B={r['batch']} H={r['heads']} HKV={r['heads_kv']} "
                     f"D={r['head_dim']} W={r['window']} {r['dtype']} on {r['gpu']}, "
                     f"pass {r.get('pass', 'fwd')}"
                     f"{', CUDA-graph replays' if r.get('timing') == 'cuda-graph' else ''}")
        lines.append(f"{'S':>6} {'impl':<11} {'us (p50)':>10} {'TFLOP/s':>8} {'GB/s':>7} "
                     f"{'attngen x':>9} {'extra MB':>9} {'rel err':>8}")
    for r in rows:
        err = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        speed = "-" if r.get("attngen_speedup") is None else f"{r['attngen_speedup']:.2f}"
        lines.append(f"{r['seq']:>6} {r['impl']:<11} {r['us_p50']:>10.1f} {r['tflops']:>8.0f} "
                     f"{r['io_gb_s']:>7.0f} {speed:>9} {r['extra_mem_bytes'] / 2**20:>9.1f} {err:>8}")
    return "\n".join(lines)


def tune(shape: Shape, candidates: list[Tiles], say=print, backward: bool = False,
         deterministic: bool = False, dq: bool = False, dkdv: bool = False) -> list[dict]:
    """Time each candidate tile config of the attngen kernel for ``shape``: the forward's, or
    with ``backward`` a backward kernel's (the shape's tuned spec with the candidate in that
    kernel's tiles, timing the backward pass): the fused kernel's, or with ``deterministic``
    the deterministic mode's dK/dV and dQ kernels (with ``dq`` dQ's alone, with ``dkdv``
    dK/dV's alone; the other keeps its tuned tiles).  The tuned tables are never changed."""
    if dq and dkdv:
        raise ValueError("dq and dkdv each tune one backward kernel: give at most one")
    if (dq or dkdv) and not deterministic:
        raise ValueError("dq and dkdv tune the deterministic mode's kernels: give deterministic too")
    tuned = shape.spec()
    # the spec fields a candidate stands in for
    fields = (["tiles"] if not backward else ["fused_tiles"] if not deterministic
              else ["dq_tiles"] if dq else ["dkdv_tiles"] if dkdv else ["dq_tiles", "dkdv_tiles"])
    rows = []
    for tiles in candidates:
        try:
            spec = replace(tuned, **{name: tiles for name in fields})
            got = bench(shape, names=("attngen-det" if deterministic else "attngen",), spec=spec,
                        say=lambda _: None, which="bwd" if backward else "fwd")
            for r in got:
                r["tiles"] = asdict(tiles)
        except Exception as exc:    # noqa: BLE001 - a config the compiler rejects is a result
            say(f"{shape.label}: {tiles.tag}: failed: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        rows += got
        times = "  ".join(f"S={r['seq']}: {r['us_p50']:.1f}us {r['tflops']:.0f}TF err {r['rel_err']:.1e}"
                          for r in got)
        say(f"{shape.label}: {tiles.tag}  {times}")
    if rows:
        best = min(candidates, key=lambda t: sum(r["us_p50"] for r in rows if r["tiles"] == asdict(t))
                   if any(r["tiles"] == asdict(t) for r in rows) else math.inf)
        default = getattr(tuned, fields[-1])
        what = ("" if not backward else "fused backward " if not deterministic else "dQ " if dq
                else "dK/dV " if dkdv else "deterministic backward ")
        say(f"{shape.label}: best {what}{best.tag} (table: {default.tag if default else 'none'})")
    return rows


DEFAULT_CANDIDATES = ["128x128o2c2", "128x128o2c1", "128x128o1c1", "128x64o2c1", "128x64o2c2",
                      "64x64o4c1", "64x64o2c1", "64x128o2c1", "64x32o4c1", "128x32o2c1",
                      "64x64o1c1", "64x128o1c1"]


def plot(rows: list[dict], path: str) -> None:
    from .plots import panels, save

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = panels(len(shapes), 5)
    for ax, label in zip(axes, shapes):
        sub = [r for r in rows if r["shape"] == label]
        for impl in dict.fromkeys(r["impl"] for r in sub):
            pts = [(r["seq"], r["tflops"]) for r in sub if r["impl"] == impl]
            ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(label)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("effective TFLOP/s (attended pairs)")
        ax.legend()
    save(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="attngen bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "tune"):
        p = sub.add_parser(name)
        p.add_argument("--preset", action="append", choices=list(PRESETS),
                       help=f"shape presets (repeatable); default: {' '.join(DEFAULT_PRESETS)}")
        p.add_argument("--seq", type=int, nargs="+", help="override the sequence lengths")
        p.add_argument("--window", type=parse_window,
                       help="override the window: W (the W most recent keys) or 'full' (full causal)")
        p.add_argument("--json", help="write the rows here (long format)")
        if name == "run":
            p.add_argument("--impl", nargs="+", choices=PEERS, default=list(DEFAULT_PEERS),
                           help="implementations to time (attngen-det: attngen's deterministic "
                                "backward; not timed unless named)")
            p.add_argument("--tiles", type=parse_tiles, help="attngen tiles, e.g. 128x64o2c1")
            p.add_argument("--pass", dest="which", choices=PASSES, default="fwd",
                           help="what to time: the forward, the backward of one forward, or both "
                                "(TFLOP/s count the backward as 2.5 x the forward's FLOPs)")
            p.add_argument("--graph", action="store_true",
                           help="time replays of a CUDA graph of the pass instead of do_bench's "
                                "launches (no host cost; no L2 flush between calls)")
            p.add_argument("--plot", help="also draw the rows to this PNG")
        else:
            p.add_argument("--candidates", type=parse_tiles, nargs="+",
                           default=[parse_tiles(t) for t in DEFAULT_CANDIDATES])
            p.add_argument("--backward", action="store_true",
                           help="tune the fused backward kernel's tiles (timing the backward pass)")
            p.add_argument("--deterministic", action="store_true",
                           help="with --backward: the deterministic mode's dK/dV and dQ kernels instead")
            which = p.add_mutually_exclusive_group()
            which.add_argument("--dq", action="store_true",
                               help="with --backward --deterministic: the dQ kernel's tiles alone")
            which.add_argument("--dkdv", action="store_true",
                               help="with --backward --deterministic: the dK/dV kernel's tiles alone")
    p = sub.add_parser("plot", help="draw a JSON file written by `run`")
    p.add_argument("json")
    p.add_argument("png")
    sub.add_parser("model", add_help=False,
                   help="whole transformers models, attention switched (attngen bench model --help)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["model"]:               # its own parser: attngen/bench_model.py
        from .bench_model import main as model_main
        return model_main(argv[1:])
    args = parser.parse_args(argv)

    if args.command == "plot":
        with open(args.json) as fh:
            plot(json.load(fh)["rows"], args.png)
        return 0
    if args.command == "run" and args.graph and args.which == "bwd":
        parser.error("--graph times fwd or fwd+bwd: a captured backward needs its forward in the graph")
    import torch
    if not torch.cuda.is_available():
        print("attngen bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    shapes = [PRESETS[p] for p in (args.preset or DEFAULT_PRESETS)]
    if args.seq:
        shapes = [replace(s, seqs=tuple(args.seq)) for s in shapes]
    if args.window is not None:
        shapes = [replace(s, window=None if args.window == "full" else args.window) for s in shapes]
    rows = []
    for shape in shapes:
        if args.command == "run":
            rows += bench(shape, names=args.impl, spec=shape.spec(args.tiles), which=args.which,
                          graph=args.graph)
        else:
            if (args.dq or args.dkdv or args.deterministic) and not args.backward:
                parser.error("--deterministic, --dq and --dkdv tune backward kernels: give --backward too")
            if (args.dq or args.dkdv) and not args.deterministic:
                parser.error(f"--{'dq' if args.dq else 'dkdv'} tunes a deterministic-mode kernel: "
                             "give --deterministic too")
            rows += tune(shape, args.candidates, backward=args.backward, deterministic=args.deterministic,
                         dq=args.dq, dkdv=args.dkdv)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"command": " ".join(["attngen bench", *(argv or sys.argv[1:])]),
                       "rows": rows}, fh, indent=1)
    if args.command == "run" and args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
