"""FlashAttention's Python API on attngen's kernels: code written for ``flash_attn`` switches
by one import (``from attngen.flash_attn import flash_attn_func, flash_attn_varlen_func``).

The functions take FlashAttention's arguments and give its results:

* ``flash_attn_func(q, k, v, ...)``: q (B, S_q, H, D), k and v (B, S_k, H_kv, D);
  ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
  ...)``: packed sequences, q (total_q, H, D), k and v (total_k, H_kv, D); and the
  ``kvpacked`` / ``qkvpacked`` forms of both.
* ``causal`` and ``window_size=(left, right)`` (``-1``: unbounded) as FlashAttention defines
  them, queries aligned to the *end* of the keys (bottom-right): query ``i`` of ``S_q`` sees
  key ``j`` of ``S_k`` iff ``i + S_k - S_q - left <= j <= i + S_k - S_q + right`` (and
  ``j <= i + S_k - S_q`` when causal).  With more queries than keys, a causal call's first
  ``S_q - S_k`` rows see no key and give 0, as FlashAttention's do.
* ``softmax_scale``, ``softcap`` (0: none), ``deterministic`` (True: the deterministic
  backward; False: as ``torch.use_deterministic_algorithms`` says), and, as an attngen
  extension, ``sinks`` (one logit per query head, gpt-oss).

* A paged KV cache: ``flash_attn_varlen_func(..., block_table=, seqused_k=)`` and
  ``flash_attn_with_kvcache`` (contiguous or paged cache, new keys appended in place, rotated
  when given ``rotary_cos``/``rotary_sin``; a contiguous cache's rows picked by
  ``cache_batch_idx``), the calls serving engines make; inference only.
* ``return_attn_probs=True`` returns ``(out, softmax_lse, None)``, what FlashAttention
  returns without dropout; ``flash_attn_with_kvcache(..., return_softmax_lse=True)``
  ``(out, softmax_lse)``.

What attngen does not compute raises :class:`attngen.ArgumentError` naming it: dropout,
ALiBi, ``cache_leftpad``, and one-sided windows without causality (``(left, -1)`` or
``(-1, right)`` with ``causal=False``).  Calls differentiate (except over a paged cache) and
trace like every attngen call (``torch.compile``, CUDA graphs).  FlashAttention 3's and 4's
arguments are :mod:`attngen.integrations.flash_attn3`'s and :mod:`~attngen.integrations.flash_attn4`'s.
"""

from __future__ import annotations

import torch

from ..core.mask import Mask
from ..core.support import ArgumentError
from ..runtime.registry import AttentionKernel, get_kernel

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
           "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache", "mask_of"]


def mask_of(causal: bool, window_size=(-1, -1)) -> Mask:
    """attngen's :class:`~attngen.Mask` for FlashAttention's ``causal`` and ``window_size``."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2 or \
            not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size):
        raise ArgumentError(f"window_size must be (left, right), each -1 (unbounded) or >= 0, "
                            f"got {window_size!r}")
    left, right = (None if w == -1 else w for w in window_size)
    if causal or right == 0:           # right = 0 sees no later key: the causal band
        return Mask(True, left)
    if (left is None) != (right is None):
        raise ArgumentError(f"window_size={tuple(window_size)} without causal=True is a window open "
                            f"on one side only, which attngen does not compute; use causal=True, "
                            f"or bound both sides")
    return Mask(False, left, right)


def _refuse(dropout_p, alibi_slopes) -> None:
    if dropout_p:
        raise ArgumentError(f"dropout_p={dropout_p}: attngen computes attention without dropout")
    if alibi_slopes is not None:
        raise ArgumentError("alibi_slopes: attngen has no ALiBi bias")


def refuse_given(api: str, **arguments) -> None:
    """Each of ``api``'s ``arguments`` that attngen does not compute, refused by name when
    given (not None)."""
    for name, value in arguments.items():
        if value is not None:
            raise ArgumentError(f"{name}: attngen's {api} does not take it")


_kernels: dict[tuple, AttentionKernel] = {}


def _kernel(mask: Mask, gqa: int, softcap: float | None, sinks: bool, chunked: bool = False,
            varlen: bool = False, paged: bool = False) -> AttentionKernel:
    """The callable for these semantics, made once per process."""
    key = (mask, gqa, softcap, sinks, chunked, varlen, paged)
    if key not in _kernels:
        _kernels[key] = get_kernel(mask, gqa=gqa, softcap=softcap, sinks=sinks, chunked=chunked,
                                   varlen=varlen, paged=paged)
    return _kernels[key]


def gqa_of(heads: int, kv_heads: int) -> int:
    """Query heads per key/value head, refused unless the query heads fill whole groups."""
    if kv_heads < 1 or heads % kv_heads:
        raise ArgumentError(f"{heads} query heads over {kv_heads} key/value heads: the query heads must be "
                            f"a multiple of the key/value heads")
    return heads // kv_heads


def _gqa(q, k) -> int:
    return gqa_of(q.shape[-2], k.shape[-2])


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                    sinks=None):
    """FlashAttention's ``flash_attn_func``: q (B, S_q, H, D), k, v (B, S_k, H_kv, D) -> out
    (B, S_q, H, D); with ``return_attn_probs``, ``(out, softmax_lse, None)`` as FlashAttention
    returns them without dropout (:func:`_with_lse`).  See the module docstring for the window
    and what is refused."""
    _refuse(dropout_p, alibi_slopes)
    mask = mask_of(causal, window_size)
    if q.dim() != 4 or k.dim() != 4:
        raise ArgumentError(f"q and k must be (B, S, H, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    seq_q, seq_k = q.shape[1], k.shape[1]
    extra = seq_q - seq_k
    if extra > 0:                          # more queries than keys
        if not mask.causal:
            raise ArgumentError(f"{seq_q} queries over {seq_k} keys without causal=True: attngen "
                                f"takes at most as many queries as keys there")
        head = q.new_zeros(q.shape[0], extra, q.shape[2], v.shape[-1])   # rows that see no key
        tail = flash_attn_func(q[:, extra:], k, v, 0.0, softmax_scale, causal, window_size, softcap,
                               None, deterministic, return_attn_probs, sinks=sinks)
        if not return_attn_probs:
            return torch.cat([head, tail], dim=1)
        out, lse, _ = tail        # the rows that see no key: +inf, or their sink's logit alone
        unseen = (lse.new_full((*lse.shape[:2], extra), float("inf")) if sinks is None
                  else sinks.detach().float()[None, :, None].expand(lse.shape[0], -1, extra))
        return torch.cat([head, out], dim=1), torch.cat([unseen, lse], dim=2), None
    kernel = _kernel(mask, _gqa(q, k), softcap or None, sinks is not None, seq_q < seq_k, False)
    result = kernel(q, k, v, layout="bshd", scale=softmax_scale, sinks=sinks,
                    deterministic=deterministic or None, return_lse=return_attn_probs)
    return _with_lse(result) if return_attn_probs else result


def _with_lse(result, packed: bool = False):
    """FlashAttention's ``return_attn_probs`` answer without dropout: ``(out, softmax_lse,
    None)``, the log-sum-exp of each query row's scaled (and capped) scores, natural log,
    fp32, (B, H, S_q), or (H, total_q) for packed sequences; sinks are included, and a row
    that sees no key has +inf, as FlashAttention 2 writes (with sinks, its sink's logit).  It
    carries no gradient (neither does FlashAttention's: its backward ignores it)."""
    out, lse = result
    return out, (lse.t().contiguous() if packed else lse), None


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                             *, sinks=None):
    """``flash_attn_func`` with kv (B, S_k, 2, H_kv, D)."""
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs, sinks=sinks)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                              *, sinks=None):
    """``flash_attn_func`` with qkv (B, S, 3, H, D)."""
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs, sinks=sinks)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False,
                           block_table=None, *, seqused_k=None, sinks=None, out=None, num_splits=0):
    """FlashAttention's ``flash_attn_varlen_func``: packed sequences, sequence ``b`` the rows
    ``cu_seqlens[b]:cu_seqlens[b+1]`` (int32), its queries the last of its keys; each sequence
    needs at least as many keys as queries.  ``max_seqlen_q`` and ``max_seqlen_k`` are trusted
    (no host synchronization).

    With ``block_table`` (B, max_pages) int32, ``k`` and ``v`` are a paged cache (pages,
    page_size, H_kv, D) and sequence ``b``'s keys are its first ``seqused_k[b]`` positions
    (FlashAttention 3's argument; without it, ``cu_seqlens_k``'s differences, as
    FlashAttention 2 reads them), position ``p`` in page ``block_table[b, p // page_size]``.
    Inference only; more queries than keys give zero rows (causal).  ``num_splits`` (a paged
    cache only, as ``flash_attn_with_kvcache`` takes it): 0 picks how many programs share a
    sequence's keys, n forces n.  ``out``, as serving engines pass it: the output is written
    there (q's shape and dtype) and returned.  ``return_attn_probs``: ``(out, softmax_lse,
    None)`` (:func:`_with_lse`)."""
    _refuse(dropout_p, alibi_slopes)
    _check_num_splits(num_splits)
    mask = mask_of(causal, window_size)
    if block_table is not None:
        if q.dim() != 3 or k.dim() != 4:
            raise ArgumentError(f"with block_table, q must be (total, H, D) and k a paged cache "
                                f"(pages, page_size, H_kv, D), got {tuple(q.shape)} and {tuple(k.shape)}")
        if seqused_k is None:
            seqused_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
        kernel = _kernel(mask, _gqa(q, k), softcap or None, sinks is not None, paged=True)
        result = kernel(q, k, v, cu_seqlens_q, seqused_k, block_table, max_seqlen_q, scale=softmax_scale,
                        sinks=sinks, out=out, splits=num_splits or None, return_lse=return_attn_probs)
        return _with_lse(result, packed=True) if return_attn_probs else result
    if seqused_k is not None:
        raise ArgumentError("seqused_k without block_table: attngen reads key lengths from "
                            "cu_seqlens_k for contiguous keys; pass block_table for a paged cache")
    if num_splits > 1:
        raise ArgumentError(f"num_splits={num_splits}: attngen splits a sequence's keys over programs "
                            f"only for a paged cache (block_table)")
    if q.dim() != 3 or k.dim() != 3:
        raise ArgumentError(f"q and k must be (total, H, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    same = cu_seqlens_q is cu_seqlens_k    # else the queries are the last of each sequence's keys
    kernel = _kernel(mask, _gqa(q, k), softcap or None, sinks is not None, not same, True)
    result = kernel(q, k, v, cu_seqlens_q, None if same else cu_seqlens_k, max_seqlen_q,
                    max_seqlen_k=None if same else max_seqlen_k, scale=softmax_scale, sinks=sinks, out=out,
                    deterministic=deterministic or None, return_lse=return_attn_probs)
    return _with_lse(result, packed=True) if return_attn_probs else result


def flash_attn_combine(out_partial, lse_partial, out=None, out_dtype=None):
    """Attention over split keys merged, as FlashAttention 3's and 4's ``flash_attn_combine``:
    ``out_partial`` (splits, B, S, H, D) or (splits, total_q, H, D), each split's normalized
    output, and ``lse_partial`` (splits, B, S, H) or (splits, total_q, H) fp32, its log-sum-exp
    (natural log; -inf where a row sees no key of the split).  Returns ``(out, lse)``: the
    splits weighted by ``exp(lse_s - lse)`` (into ``out`` when given, else ``out_dtype``,
    default out_partial's), and ``lse`` (B, S, H) or (total_q, H), +inf for a row that sees no
    key at all (its output 0)."""
    if lse_partial.shape != out_partial.shape[:-1] or out_partial.dim() not in (4, 5):
        raise ArgumentError(f"out_partial must be (splits, B, S, H, D) or (splits, total_q, H, D) and "
                            f"lse_partial its shape without D, got {tuple(out_partial.shape)} and "
                            f"{tuple(lse_partial.shape)}")
    lse = torch.logsumexp(lse_partial.float(), dim=0)
    seen = lse > float("-inf")
    weights = torch.exp(lse_partial.float() - torch.where(seen, lse, 0.0)).unsqueeze(-1)
    # a split in which a row sees no key has weight 0, whatever its partial output holds
    merged = torch.where(weights > 0, weights * out_partial.float(), 0.0).sum(dim=0)
    if out is None:
        return merged.to(out_dtype or out_partial.dtype), lse.masked_fill(~seen, float("inf"))
    return out.copy_(merged), lse.masked_fill(~seen, float("inf"))


def _check_num_splits(num_splits) -> None:
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ArgumentError(f"num_splits must be 0 (automatic) or a positive int, got {num_splits!r}")


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                                    softcap=0.0, alibi_slopes=None, deterministic=False,
                                    return_attn_probs=False, *, sinks=None):
    """``flash_attn_varlen_func`` with kv (total_k, 2, H_kv, D)."""
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                                  deterministic, return_attn_probs, sinks=sinks)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                     deterministic=False, return_attn_probs=False, *, sinks=None):
    """``flash_attn_varlen_func`` with qkv (total, 3, H, D) and one set of offsets."""
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen,
                                  max_seqlen, dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs, sinks=sinks)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False, *, sinks=None):
    """FlashAttention's ``flash_attn_with_kvcache``: q (B, S_q, H, D) over a KV cache, either
    contiguous (B_cache, S_cache, H_kv, D) or paged (pages, page_size, H_kv, D) with
    ``block_table`` (B, max_pages) int32.  Sequence ``b`` has ``cache_seqlens[b]`` cached keys
    (an int for all, or a (B,) int32 tensor; None: the whole cache).  ``k``, ``v`` (B, S_new,
    H_kv, D), when given, are written into the cache in place after them, and attended to.
    The queries are the last of the keys (decode: S_q = 1).  ``num_splits`` 0 picks how many
    programs share a sequence's keys; n forces n.  Nothing synchronizes with the host: a CUDA
    graph can capture the call (lengths stay on the device; they are trusted, not checked).

    ``cache_batch_idx`` (B,) int32, a contiguous cache only: sequence ``b``'s keys are row
    ``cache_batch_idx[b]`` of the cache (default: row ``b``).

    ``rotary_cos``, ``rotary_sin`` (S_rotary, R / 2), with ``k`` and ``v`` only, S_rotary at
    least the cache's length: the first R dimensions of ``k`` are rotated at positions
    ``cache_seqlens[b] + i`` before they are written, and those of ``q`` too when causal or
    windowed (else every query at ``cache_seqlens[b]``).  ``rotary_interleaved`` rotates the
    pairs (0, 1), (2, 3), ... (GPT-J); False rotates (i, i + R / 2) (GPT-NeoX).  The rotation
    is computed in fp32 and rounded to q's dtype.

    ``return_softmax_lse``: ``(out, softmax_lse)``, the log-sum-exp (B, H, S_q) as
    :func:`_with_lse` describes it.

    Refused (:class:`attngen.ArgumentError`): ``cache_leftpad``, ALiBi."""
    refuse_given("flash_attn_with_kvcache", cache_leftpad=cache_leftpad, alibi_slopes=alibi_slopes)
    _check_num_splits(num_splits)
    mask = mask_of(causal, window_size)
    if q.dim() != 4 or k_cache.dim() != 4 or tuple(k_cache.shape) != tuple(v_cache.shape):
        raise ArgumentError(f"q must be (B, S_q, H, D) and k_cache, v_cache one 4-D shape, got "
                            f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    batch, seq_q = q.shape[:2]
    device = q.device
    if block_table is None:          # a contiguous cache: sequence b's one page is its row
        block_table = contiguous_cache_table(cache_batch_idx, batch, k_cache.shape[0], device)
    elif cache_batch_idx is not None:
        raise ArgumentError("cache_batch_idx with block_table: a paged cache finds each sequence's "
                            "pages through block_table alone")
    page = k_cache.shape[1]
    if cache_seqlens is None:
        cache_seqlens = block_table.shape[1] * page - (0 if k is None else k.shape[1])
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    if (k is None) != (v is None):
        raise ArgumentError("k and v are written into the cache together: pass both or neither")
    seqused_k = cache_seqlens.to(torch.int32)
    rotary = _rotary_tables(rotary_cos, rotary_sin, k is not None, q.shape[-1], block_table.shape[1] * page)
    if k is not None:
        if k.dim() != 4 or k.shape[0] != batch or tuple(k.shape) != tuple(v.shape):
            raise ArgumentError(f"k and v must be (B, S_new, H_kv, D) with B = {batch}, got "
                                f"{tuple(k.shape)} and {tuple(v.shape)}")
        positions = seqused_k[:, None].long() + torch.arange(k.shape[1], device=device)
        if rotary:
            k = _rotate(k, *rotary, positions, rotary_interleaved)
            along = causal or tuple(window_size) != (-1, -1)   # else every query sits at the first new key
            at = seqused_k[:, None].long() + (torch.arange(seq_q, device=device) if along else 0)
            q = _rotate(q, *rotary, at.expand(batch, seq_q), rotary_interleaved)
        pages = block_table.long().gather(1, positions // page)
        k_cache[pages, positions % page] = k
        v_cache[pages, positions % page] = v
        seqused_k = seqused_k + k.shape[1]
    kernel = _kernel(mask, _gqa(q, k_cache), softcap or None, sinks is not None, paged=True)
    rows, cu_q = as_packed(q)
    result = kernel(rows, k_cache, v_cache, cu_q, seqused_k, block_table, seq_q, scale=softmax_scale,
                    sinks=sinks, splits=num_splits or None, check=False, return_lse=return_softmax_lse)
    out, lse = result if return_softmax_lse else (result, None)
    out = out.view(batch, seq_q, *out.shape[1:])
    return (out, lse.view(batch, seq_q, -1).transpose(1, 2).contiguous()) if return_softmax_lse else out


def as_packed(q):
    """Batched queries (B, S_q, H, D) as packed sequences of S_q rows each, the form the paged
    kernels take: (q (B * S_q, H, D), cu_seqlens_q)."""
    batch, seq_q = q.shape[:2]
    cu_q = torch.arange(0, (batch + 1) * seq_q, seq_q, dtype=torch.int32, device=q.device)
    return q.reshape(batch * seq_q, *q.shape[2:]), cu_q


def contiguous_cache_table(cache_batch_idx, batch: int, rows: int, device) -> torch.Tensor:
    """The block table of a contiguous cache, whose rows are one page each: sequence b reads
    row ``cache_batch_idx[b]`` (trusted), or row b."""
    if cache_batch_idx is None:
        if rows != batch:
            raise ArgumentError(f"a contiguous cache holds one row per sequence: q has {batch}, "
                                f"k_cache {rows} (pass cache_batch_idx to pick the rows)")
        return torch.arange(batch, dtype=torch.int32, device=device)[:, None]
    if cache_batch_idx.shape != (batch,) or cache_batch_idx.dtype.is_floating_point:
        raise ArgumentError(f"cache_batch_idx must be ({batch},) integers, one cache row per sequence, "
                            f"got {tuple(cache_batch_idx.shape)} {cache_batch_idx.dtype}")
    return cache_batch_idx.to(torch.int32)[:, None]


def _rotary_tables(cos, sin, appending: bool, head_dim: int, capacity: int):
    """(cos, sin) checked as FlashAttention takes them, or None without rotary embedding."""
    if cos is None and sin is None:
        return None
    if cos is None or sin is None:
        raise ArgumentError("rotary_cos and rotary_sin come together: pass both or neither")
    if not appending:
        raise ArgumentError("rotary_cos/rotary_sin rotate the new keys: pass k and v with them")
    if cos.dim() != 2 or cos.shape != sin.shape or not 0 < 2 * cos.shape[1] <= head_dim:
        raise ArgumentError(f"rotary_cos and rotary_sin must be one (S_rotary, R / 2) shape with "
                            f"R <= head_dim {head_dim}, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.shape[0] < capacity:
        raise ArgumentError(f"rotary_cos has {cos.shape[0]} positions; the cache holds {capacity}: "
                            f"the tables must cover every position of it")
    return cos, sin


def _rotate(x, cos, sin, positions, interleaved: bool):
    """x (B, S, H, D) with its first 2 * cos.shape[1] dimensions rotated at ``positions``
    (B, S), in fp32 (or x's wider dtype), rounded back to x's dtype."""
    half, work = cos.shape[1], torch.promote_types(x.dtype, torch.float32)
    c, s = (t[positions].to(work).unsqueeze(2) for t in (cos, sin))    # (B, S, 1, R / 2)
    part = x[..., :2 * half].to(work)
    if interleaved:
        even, odd = part[..., 0::2], part[..., 1::2]
        turned = torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2)
    else:
        low, high = part[..., :half], part[..., half:]
        turned = torch.cat((low * c - high * s, high * c + low * s), dim=-1)
    return torch.cat((turned.to(x.dtype), x[..., 2 * half:]), dim=-1)
