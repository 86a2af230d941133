"""Attention in PyTorch: the reference every kernel is checked against, and the one home of
the math every PyTorch path of attngen shares (the transformers integration's decode step
and fallback, context parallelism's reference runner, the bench).

The math, in the order it is applied: the default softmax scale (:func:`resolve_scale`),
scores -> softcap (:func:`softcapped`) -> mask (:func:`logits`) -> sink column -> softmax
(:func:`probabilities`) -> output (:func:`attend`).

:func:`attention` is banded: it walks the queries in chunks and multiplies each chunk
only with the keys its rows can see (``Mask.key_range``), so memory is O(S * W) rather
than O(S^2).  :func:`dense` is the plain masked softmax over the full score matrix; the
tests check one against the other.  Both compute in float64 unless told otherwise, take
GQA/MQA by head arithmetic (no repeated KV heads in memory beyond one chunk), and give a
row with no visible key an output of zeros.
"""

from __future__ import annotations

import torch

from .mask import Mask
from .support import bhsd


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale: ``scale``, or by default ``head_dim ** -0.5`` (every attngen entry
    point's default)."""
    return head_dim ** -0.5 if scale is None else scale


def softcapped(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma 2's logit cap, ``softcap * tanh(scores / softcap)``; the scores as they are
    without one.  Its derivative is ``1 - (capped / softcap) ** 2``."""
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


def logits(scores: torch.Tensor, visible: torch.Tensor | None, softcap: float | None = None,
           fill: float = float("-inf")) -> torch.Tensor:
    """Scaled scores capped (``softcap``), then masked: where ``visible`` (a boolean tensor
    broadcastable to ``scores``; None: every key) is false the logit is ``fill``."""
    scores = softcapped(scores, softcap)
    return scores if visible is None else scores.masked_fill(~visible, fill)


def with_sink_column(logits: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """``logits`` with the sink logits as one more column (gpt-oss): ``sinks`` is broadcastable
    to ``logits[..., :1]`` (one per query head, shaped by the caller's head layout).  The sink
    joins the softmax's denominator and adds no value."""
    if sinks is None:
        return logits
    return torch.cat([logits, sinks.to(logits.dtype).expand(*logits.shape[:-1], 1)], dim=-1)


def probabilities(scores: torch.Tensor, visible: torch.Tensor | None = None, *,
                  softcap: float | None = None, sinks: torch.Tensor | None = None,
                  fill: float = float("-inf"), dtype: torch.dtype | None = None) -> torch.Tensor:
    """The attention probabilities over the keys (last dim) of scaled scores: capped, masked
    (:func:`logits`), softmaxed with the sinks' column (:func:`with_sink_column`) in ``dtype``
    (default the scores'), the sink's column dropped.  With the default ``fill`` a row with
    no visible key and no sink gets probabilities 0 (as PyTorch's SDPA gives); transformers'
    eager code fills with the dtype's lowest finite value, where such a row attends to every
    key alike."""
    probs = torch.softmax(with_sink_column(logits(scores, visible, softcap, fill), sinks), dim=-1, dtype=dtype)
    if sinks is not None:
        return probs[..., :-1]
    if visible is not None and fill == float("-inf"):
        probs = probs.masked_fill(~visible.any(-1, keepdim=True), 0.0)
    return probs


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None = None, *,
           scale: float | None = None, softcap: float | None = None, sinks: torch.Tensor | None = None,
           fill: float = float("-inf"), dtype: torch.dtype | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` over the last two dims, batch dims broadcast (a GQA group's
    query heads may share one K/V head by a dim of 1): :func:`probabilities` computed in
    ``dtype`` (default the scores'), cast to ``v``'s dtype for the product."""
    scores = (q @ k.transpose(-1, -2)).to(dtype or q.dtype) * resolve_scale(scale, q.shape[-1])
    probs = probabilities(scores, visible, softcap=softcap, sinks=sinks, fill=fill, dtype=dtype)
    return probs.to(v.dtype) @ v


def _check(q, k, v):
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected 4-D q, k, v with k.shape == v.shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of KV heads {k.shape[1]}")


def attention(q, k, v, mask: Mask, *, scale: float | None = None, layout: str = "bhsd",
              q_offset: int = 0, softcap: float | None = None, sinks: torch.Tensor | None = None,
              chunk: int = 256, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Banded reference; returns ``dtype`` in the layout of ``q``.

    Query ``t`` of ``q`` is the token at position ``q_offset + t``: ``S_k - S_q`` for a
    chunk of queries after a cached prefix, or the start of a slice of the queries checked
    on its own.  ``sinks`` has one logit per query head.
    """
    q, k, v = (bhsd(t, layout).to(dtype) for t in (q, k, v))
    _check(q, k, v)
    batch, heads, seq_q, d = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = resolve_scale(scale, d)
    out = torch.zeros(batch, heads, seq_q, v.shape[-1], dtype=dtype, device=q.device)
    qg = q.reshape(batch, kv_heads, group, seq_q, d)
    og = out.view(batch, kv_heads, group, seq_q, v.shape[-1])
    sink = None if sinks is None else sinks.to(dtype).reshape(1, kv_heads, group, 1, 1)
    for i0 in range(0, seq_q, chunk):
        i1 = min(i0 + chunk, seq_q)
        lo, hi = mask.key_range(q_offset + i0, q_offset + i1, seq_k)
        if hi <= lo:
            continue
        rows = torch.arange(q_offset + i0, q_offset + i1, device=q.device)[:, None]
        cols = torch.arange(lo, hi, device=q.device)[None, :]
        og[:, :, :, i0:i1] = attend(qg[:, :, :, i0:i1], k[:, :, None, lo:hi], v[:, :, None, lo:hi],
                                    mask.visible(rows, cols), scale=scale, softcap=softcap, sinks=sink)
    return bhsd(out, layout)


def dense(q, k, v, mask: Mask, *, scale: float | None = None, layout: str = "bhsd",
          q_offset: int = 0, softcap: float | None = None, sinks: torch.Tensor | None = None,
          dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Full (S_q x S_k) masked softmax; O(S^2) memory, for checking :func:`attention`."""
    q, k, v = (bhsd(t, layout).to(dtype) for t in (q, k, v))
    _check(q, k, v)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    rows = q_offset + torch.arange(q.shape[2], device=q.device)[:, None]
    cols = torch.arange(k.shape[2], device=q.device)[None, :]
    sink = None if sinks is None else sinks.to(dtype).reshape(1, -1, 1, 1)
    out = attend(q, k, v, mask.visible(rows, cols), scale=scale, softcap=softcap, sinks=sink)
    return bhsd(out, layout)


def logsumexp(q, k, mask: Mask, *, scale: float | None = None, layout: str = "bhsd", q_offset: int = 0,
              softcap: float | None = None, sinks: torch.Tensor | None = None,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Each query row's ``log(sum_j exp(logit_j))`` over the keys it sees (scaled, capped
    scores; the sink's logit one more term), (B, H, S_q) in ``dtype``; -inf for a row that
    sees no key and has no sink.  Dense, as :func:`dense`."""
    q, k = (bhsd(t, layout).to(dtype) for t in (q, k))
    _check(q, k, k)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    rows = q_offset + torch.arange(q.shape[2], device=q.device)[:, None]
    cols = torch.arange(k.shape[2], device=q.device)[None, :]
    scores = (q @ k.transpose(-1, -2)) * resolve_scale(scale, q.shape[-1])
    sink = None if sinks is None else sinks.to(dtype).reshape(1, -1, 1, 1)
    return torch.logsumexp(with_sink_column(logits(scores, mask.visible(rows, cols), softcap), sink), dim=-1)


def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, mask: Mask, **kwargs) -> torch.Tensor:
    """Packed sequences: q (total_q, H, D), k/v (total_k, HKV, D); sequence ``b`` is rows
    ``cu[b]:cu[b+1]``, its queries the last ones of its keys.  No sequence sees another."""
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=kwargs.get("dtype", torch.float64),
                      device=q.device)
    for b in range(len(cu_q) - 1):
        (q0, q1), (k0, k1) = cu_q[b:b + 2], cu_k[b:b + 2]
        if q1 > q0:
            out[q0:q1] = attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], mask,
                                   layout="bshd", q_offset=(k1 - k0) - (q1 - q0), **kwargs)[0]
    return out


def varlen_logsumexp(q, k, cu_seqlens_q, cu_seqlens_k, mask: Mask, **kwargs) -> torch.Tensor:
    """:func:`logsumexp` of packed sequences (as :func:`varlen` lays them out): (total_q, H)."""
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = torch.empty(q.shape[:2], dtype=kwargs.get("dtype", torch.float64), device=q.device)
    for (q0, q1), (k0, k1) in zip(zip(cu_q, cu_q[1:]), zip(cu_k, cu_k[1:])):
        out[q0:q1] = logsumexp(q[None, q0:q1], k[None, k0:k1], mask, layout="bshd",
                               q_offset=(k1 - k0) - (q1 - q0), **kwargs)[0].t()
    return out


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor,
                 seqused_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys (or values) of each sequence of a paged cache, packed as ``varlen`` takes them.

    ``cache`` is (num_blocks, block_size, HKV, D): page ``p`` holds ``block_size`` consecutive
    positions.  Row ``b`` of ``block_table`` (B, max_blocks) lists sequence ``b``'s pages in
    order (page ``block_table[b, j]`` holds its positions ``j * block_size ..``); pages may be
    in any order and shared by several sequences.  Sequence ``b`` has ``seqused_k[b]`` keys,
    so only its first ``cdiv(seqused_k[b], block_size)`` entries are read and the last page
    may be partly filled.  Returns (packed (sum(seqused_k), HKV, D), cu_seqlens_k (B + 1,
    int32)).  Raises ``ValueError`` for a table, length or page index that does not fit."""
    if cache.dim() != 4:
        raise ValueError(f"a paged cache is (num_blocks, block_size, HKV, D), got {tuple(cache.shape)}")
    if block_table.dim() != 2 or block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be (B, max_blocks) int32, got {tuple(block_table.shape)} "
                         f"{block_table.dtype}")
    num_blocks, block_size = cache.shape[:2]
    lengths = seqused_k.tolist()
    if seqused_k.shape != (block_table.shape[0],):
        raise ValueError(f"seqused_k must be ({block_table.shape[0]},), one length per row of "
                         f"block_table, got {tuple(seqused_k.shape)}")
    parts = []
    for b, length in enumerate(lengths):
        pages = -(-length // block_size)
        if length < 0 or pages > block_table.shape[1]:
            raise ValueError(f"sequence {b}: {length} keys need {pages} pages of {block_size}, "
                             f"block_table has {block_table.shape[1]} a row")
        used = block_table[b, :pages].long()
        if pages and (used.min() < 0 or used.max() >= num_blocks):
            raise ValueError(f"sequence {b}: block_table names a page outside 0..{num_blocks - 1}")
        parts.append(cache[used].reshape(pages * block_size, *cache.shape[2:])[:length])
    cu = torch.tensor([0] + lengths, device=cache.device).cumsum(0).to(torch.int32)
    return torch.cat(parts) if parts else cache.new_empty(0, *cache.shape[2:]), cu


def page_table(lengths, page: int, order: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """A block table for sequences of ``lengths`` keys in pages of ``page``: sequence ``b``
    takes the next ``cdiv(lengths[b], page)`` pages of ``order`` (a sequence of page numbers,
    e.g. a permutation) in turn; entries past a sequence's pages are -1.  (B, ``width``)
    int32 on ``order``'s device; ``width`` defaults to the most pages a sequence needs, plus
    one."""
    counts = [-(-n // page) for n in lengths]
    width = max(counts + [0]) + 1 if width is None else width
    table = torch.full((len(lengths), width), -1, dtype=torch.int32, device=order.device)
    taken = 0
    for b, count in enumerate(counts):
        table[b, :count] = order[taken:taken + count]
        taken += count
    return table


def scatter_pages(packed: torch.Tensor, lengths, block_table: torch.Tensor, pages: int, page: int,
                  fill: float = float("nan")) -> torch.Tensor:
    """The inverse of :func:`gather_pages`: a cache of ``pages`` pages of ``page`` slots,
    (pages, page, HKV, D), holding sequence ``b``'s rows of ``packed`` (sum(lengths), HKV, D)
    at its positions through ``block_table``, and ``fill`` in every other slot.  Sequences
    written later win a page two of them share."""
    cache = packed.new_full((pages, page, *packed.shape[1:]), fill)
    start = 0
    for b, n in enumerate(lengths):
        pos = torch.arange(n, device=packed.device)
        cache[block_table[b].long()[pos // page], pos % page] = packed[start:start + n]
        start += n
    return cache


def paged(q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, mask: Mask, **kwargs) -> torch.Tensor:
    """Attention over a paged K/V cache (:func:`gather_pages`): packed queries q (total_q, H, D),
    sequence ``b``'s queries the last ``cu_seqlens_q[b+1] - cu_seqlens_q[b]`` of its
    ``seqused_k[b]`` keys (a decode step is one query).  Keyword arguments as for
    :func:`attention`."""
    k, cu_k = gather_pages(k_cache, block_table, seqused_k)
    v, _ = gather_pages(v_cache, block_table, seqused_k)
    return varlen(q, k, v, cu_seqlens_q, cu_k, mask, **kwargs)
