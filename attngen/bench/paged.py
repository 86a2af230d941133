"""`attngen bench paged`: attngen over a paged K/V cache, as a serving engine calls it.

  prefill  packed prefill of B sequences, keys read through a shuffled block table of pages
           of P keys, against the same packed prefill on contiguous keys (the same family of
           kernel, varlen): what paging costs.
  decode   one query per sequence over a paged cache, for each batch size, context and
           window: attngen, and SDPA and FlexAttention over the same keys copied contiguous
           (the copy not timed: their best case).  Also attngen's achieved bandwidth: the
           bytes it must read (each sequence's keys and values in its window, the queries and
           the output) over its time, as a fraction of the card's peak.
  mixed    one call over a batch mixing prefill chunks and decode steps.

Shape: a preset's heads, head_dim and window (``--preset``; default A, Mistral-7B's attention:
32 query heads, 8 KV heads, head_dim 128, W = 4096), in bf16 as engines serve it; plain
presets only (no softcap, sinks or prefix: the peers compute neither).  Times are medians of
``triton.testing.do_bench`` (L2 flushed before each call), in microseconds.
"""

from __future__ import annotations

from ..core.mask import Mask
from ..core.reference import page_table, scatter_pages
from ..core.variant import Features, KernelSpec
from ..runtime.registry import default_registry, get_kernel
from .presets import PRESETS, Shape, parse_tiles

#: the shape timed unless asked otherwise: Mistral-7B's attention
DEFAULT = PRESETS["A"]


def _one_per_shape() -> dict[str, Shape]:
    """The plain presets, the first of each shape (C16 is C in fp16; every one runs in bf16)."""
    shapes: dict[str, Shape] = {}
    for name, shape in PRESETS.items():
        key = (shape.heads, shape.heads_kv, shape.head_dim, shape.window)
        if shape.plain and all(key != (s.heads, s.heads_kv, s.head_dim, s.window) for s in shapes.values()):
            shapes[name] = shape
    return shapes


#: the presets ``--preset`` takes
SHAPES = _one_per_shape()

#: HBM bandwidth by device name, bytes/s (datasheet peaks)
PEAK = {"H200": 4.8e12, "H100": 3.35e12}


def _peak(name: str) -> float | None:
    return next((v for k, v in PEAK.items() if k in name), None)


def paged_inputs(lengths, q_lens, page: int, dtype, seed: int = 0, shape: Shape = DEFAULT):
    """q (packed), a shuffled paged cache holding ``lengths`` keys per sequence, cu_seqlens_q,
    seqused_k, block_table, and the same keys packed contiguous (k, v, cu_seqlens_k), with the
    heads and head_dim of ``shape``."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)
    pages = sum(-(-n // page) for n in lengths)
    table = page_table(lengths, page, torch.randperm(pages, device="cuda", generator=gen).to(torch.int32))
    k = torch.randn(sum(lengths), shape.heads_kv, shape.head_dim, device="cuda", generator=gen).to(dtype)
    v = torch.randn(sum(lengths), shape.heads_kv, shape.head_dim, device="cuda", generator=gen).to(dtype)
    k_cache, v_cache = (scatter_pages(x, lengths, table, pages, page, fill=0.0) for x in (k, v))
    cu_q = torch.tensor([0, *q_lens], device="cuda").cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_q[-1]), shape.heads, shape.head_dim, device="cuda", generator=gen).to(dtype)
    used = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    return q, k_cache, v_cache, cu_q, used, table, k, v, cu_k


def _median(fn) -> float:
    """Median of ``triton.testing.do_bench`` in microseconds."""
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def _paged_kernel(shape: Shape, window, tiles=None):
    """attngen's paged callable for ``shape``'s heads and ``window``; with ``tiles``, the
    launcher of the kernel with those forward tiles instead of the tuned ones."""
    gqa = shape.heads // shape.heads_kv
    if tiles is None:
        return get_kernel(window, gqa=gqa, head_dim=shape.head_dim, dtype="bf16", paged=True)
    spec = KernelSpec.tuned(Mask.from_window(window, True), gqa, shape.head_dim, "bf16",
                            Features(paged=True), tiles=tiles)
    return default_registry.module(spec).launch


def prefill(shape: Shape = DEFAULT, seqs=(8192,), batch: int = 4, pages=(16, 64, 256), tiles=None,
            say=print) -> list[dict]:
    import torch


    rows = []
    window = shape.window
    contiguous = get_kernel(window, gqa=shape.heads // shape.heads_kv, head_dim=shape.head_dim, dtype="bf16",
                            varlen=True)
    paged = _paged_kernel(shape, window, tiles)
    for seq in seqs:
        for page in pages:
            q, kc, vc, cu_q, used, table, k, v, cu_k = paged_inputs([seq] * batch, [seq] * batch, page,
                                                                    torch.bfloat16, shape=shape)
            ref = contiguous(q, k, v, cu_q, max_seqlen_q=seq)
            got = paged(q, kc, vc, cu_q, used, table, seq, check=False)
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            t_contiguous = _median(lambda: contiguous(q, k, v, cu_q, max_seqlen_q=seq))
            t_paged = _median(lambda: paged(q, kc, vc, cu_q, used, table, seq, check=False))
            row = {"bench": "prefill", "shape": shape.label, "seq": seq, "batch": batch, "page": page,
                   "window": window,
                   "contiguous_us": t_contiguous, "paged_us": t_paged, "ratio": t_paged / t_contiguous,
                   "diff_vs_contiguous": err}
            say(f"prefill B{batch} S{seq} W{window} page {page:>3}: contiguous {t_contiguous:8.1f} us, "
                f"paged {t_paged:8.1f} us ({row['ratio']:.3f}x), outputs differ by {err:.1e}")
            rows.append(row)
    return rows


def decode(shape: Shape = DEFAULT, batches=(1, 16, 64, 256), contexts=(8192, 32768), page: int = 16,
           peers=("sdpa", "flex"), tiles=None, splits=(None,), say=print) -> list[dict]:
    """Decode steps over ``shape``'s window and over the whole context; ``splits``: the key
    splits to time each shape with (None: the launcher's choice), peers timed once a shape."""
    import torch
    import torch.nn.functional as F


    name = torch.cuda.get_device_name()
    peak = _peak(name)
    rows = []
    heads, heads_kv, head_dim = shape.heads, shape.heads_kv, shape.head_dim
    for window in (shape.window, None):
        kernel = _paged_kernel(shape, window, tiles)
        flex_fn = None
        if "flex" in peers:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex_fn = torch.compile(flex_attention, dynamic=False)
        for context in contexts:
            for batch in batches:
                if batch * context * heads_kv * head_dim * 2 * 2 * 2 > 40e9:   # caches + copies
                    continue
                q, kc, vc, cu_q, used, table, k, v, _ = paged_inputs([context] * batch, [1] * batch, page,
                                                                     torch.bfloat16, shape=shape)
                seen = context if window is None else min(window, context)
                moved = batch * seen * heads_kv * head_dim * 2 * 2 + 2 * q.numel() * 2
                for split in splits[:-1]:
                    t = _median(lambda: kernel(q, kc, vc, cu_q, used, table, 1, check=False, splits=split))
                    rows.append(_decode_row(shape, batch, context, window, page, split, t, moved, peak))
                    say(f"decode B{batch:>3} ctx {context:>5} W{window or 'full'} splits {split or 'auto'}: "
                        f"attngen {t:8.1f} us ({rows[-1]['GB/s']:.0f} GB/s)")
                t = _median(lambda: kernel(q, kc, vc, cu_q, used, table, 1, check=False, splits=splits[-1]))
                row = _decode_row(shape, batch, context, window, page, splits[-1], t, moved, peak)
                # peers over the same keys, contiguous (B, H_kv, keys, D): the window's last keys
                kk = k.view(batch, context, heads_kv, head_dim)[:, context - seen:].transpose(1, 2).contiguous()
                vv = v.view(batch, context, heads_kv, head_dim)[:, context - seen:].transpose(1, 2).contiguous()
                qq = q.view(batch, 1, heads, head_dim).transpose(1, 2)
                ours = kernel(q, kc, vc, cu_q, used, table, 1, check=False)
                if "sdpa" in peers:
                    sdpa = F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True)
                    row["diff_vs_sdpa"] = ((ours.float() - sdpa.transpose(1, 2).reshape(ours.shape).float()).norm()
                                           / sdpa.float().norm()).item()
                    row["sdpa_us"] = _median(lambda: F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=True))
                if flex_fn is not None:
                    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx >= 0, None, None, 1, seen,
                                                   device="cuda")
                    try:
                        row["flex_us"] = _median(lambda: flex_fn(qq, kk, vv, block_mask=block_mask,
                                                                 enable_gqa=True))
                    except Exception as exc:      # an inductor failure is a result, not the end of the bench
                        row["flex_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                        say(f"  flex failed: {row['flex_error']}")
                say(f"decode B{batch:>3} ctx {context:>5} W{window or 'full'} splits {splits[-1] or 'auto'}: "
                    f"attngen {t:8.1f} us "
                    f"({row['GB/s']:.0f} GB/s" + (f", {row['of_peak']:.0%} of {name}'s peak" if peak else "")
                    + ")" + "".join(f", {p} {row[p + '_us']:.1f} us" for p in peers if p + "_us" in row))
                rows.append(row)
    return rows


def _decode_row(shape, batch, context, window, page, splits, t, moved, peak) -> dict:
    return {"bench": "decode", "shape": shape.label, "batch": batch, "context": context, "window": window, "page": page,
            "splits": splits, "attngen_us": t, "GB/s": moved / t * 1e-3,
            "of_peak": None if peak is None else moved / (t * 1e-6) / peak}


def mixed(shape: Shape = DEFAULT, context: int = 8192, prefills: int = 4, chunk: int = 512, decodes: int = 60,
          page: int = 16, tiles=None, say=print) -> list[dict]:
    import torch


    window = shape.window
    kernel = _paged_kernel(shape, window, tiles)
    lengths = [context] * (prefills + decodes)
    q_lens = [chunk] * prefills + [1] * decodes
    q, kc, vc, cu_q, used, table, *_ = paged_inputs(lengths, q_lens, page, torch.bfloat16, shape=shape)
    t = _median(lambda: kernel(q, kc, vc, cu_q, used, table, chunk, check=False))
    say(f"mixed: {prefills} prefill chunks of {chunk} + {decodes} decode steps at context {context}, "
        f"W{window}, page {page}: {t:.1f} us")
    return [{"bench": "mixed", "shape": shape.label, "context": context, "prefills": prefills, "chunk": chunk,
             "decodes": decodes, "page": page, "window": window, "attngen_us": t}]


def add_arguments(p) -> None:
    p.add_argument("--preset", default="A", choices=list(SHAPES),
                   help="the shape: a plain preset's heads, head_dim and window (default A, Mistral-7B)")
    p.add_argument("--only", nargs="+", choices=["prefill", "decode", "mixed"],
                   help="what to time (default: all three)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256], help="decode batch sizes")
    p.add_argument("--context", type=int, nargs="+", default=[8192, 32768], help="decode contexts")
    p.add_argument("--page", type=int, nargs="+", default=[16, 64, 256], help="prefill page sizes")
    p.add_argument("--tiles", type=parse_tiles, help="attngen tiles, e.g. 128x64o2c1p4")
    p.add_argument("--splits", type=int, nargs="+",
                   help="decode: time each shape with these key splits too (default: the launcher's choice)")
    p.add_argument("--json", help="write the rows here")


def run(args, say=print) -> list[dict]:
    which = args.only or ["prefill", "decode", "mixed"]
    shape = SHAPES[args.preset]
    rows = []
    if "prefill" in which:
        rows += prefill(shape, pages=tuple(args.page), tiles=args.tiles, say=say)
    if "decode" in which:
        rows += decode(shape, batches=tuple(args.batch), contexts=tuple(args.context), tiles=args.tiles,
                       splits=(*(args.splits or ()), None), say=say)
    if "mixed" in which:
        rows += mixed(shape, tiles=args.tiles, say=say)
    return rows
