"""Reference attention: what every kernel is checked against.

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


def _check(q, k, v):
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected 4-D q, k, v with k.shape == v.shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads {q.shape[1]} are not a multiple of KV heads {k.shape[1]}")


def _softmax_rows(scores: torch.Tensor, visible: torch.Tensor, softcap: float | None = None,
                  sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Masked softmax over the last dim; ``sinks`` (broadcastable to scores[..., :1]) join
    the denominator only (gpt-oss); ``softcap`` caps the scores before the mask (Gemma 2)."""
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        sink = sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return torch.nan_to_num(probs, nan=0.0)     # rows with no visible key


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
    scale = d ** -0.5 if scale is None else scale
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
        scores = torch.einsum("bhgqd,bhkd->bhgqk", qg[:, :, :, i0:i1], k[:, :, lo:hi]) * scale
        probs = _softmax_rows(scores, mask.visible(rows, cols), softcap, sink)
        og[:, :, :, i0:i1] = torch.einsum("bhgqk,bhkd->bhgqd", probs, v[:, :, lo:hi])
    return out if layout == "bhsd" else out.transpose(1, 2)


def dense(q, k, v, mask: Mask, *, scale: float | None = None, layout: str = "bhsd",
          q_offset: int = 0, softcap: float | None = None, sinks: torch.Tensor | None = None,
          dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Full (S_q x S_k) masked softmax; O(S^2) memory, for checking :func:`attention`."""
    q, k, v = (bhsd(t, layout).to(dtype) for t in (q, k, v))
    _check(q, k, v)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rows = q_offset + torch.arange(q.shape[2], device=q.device)[:, None]
    cols = torch.arange(k.shape[2], device=q.device)[None, :]
    sink = None if sinks is None else sinks.to(dtype).reshape(1, -1, 1, 1)
    probs = _softmax_rows(q @ k.transpose(-1, -2) * scale, mask.visible(rows, cols), softcap, sink)
    out = probs @ v
    return out if layout == "bhsd" else out.transpose(1, 2)


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
