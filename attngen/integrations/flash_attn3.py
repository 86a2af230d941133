"""FlashAttention 3's Python API (``flash_attn_interface``, the Hopper build) on attngen's
kernels: code written for it switches by one import
(``from attngen.flash_attn_interface import flash_attn_func, flash_attn_varlen_func``).

FlashAttention 3 orders and names its arguments differently from FlashAttention 2 (no
``dropout_p``; ``page_table`` for ``block_table``; FP8 descales, ``qv``, ``attention_chunk``)
and returns ``(out, softmax_lse)`` for ``return_attn_probs=True``.  The functions here take
its arguments and run the FlashAttention 2-shaped implementations of
:mod:`attngen.integrations.flash_attn`, with the same window convention, more-queries-than-keys
rule, log-sum-exp and ``sinks`` extension.

* ``flash_attn_combine`` merges outputs over split keys by their log-sum-exps.
* ``get_scheduler_metadata`` checks a planned ``flash_attn_with_kvcache`` call's shape and
  returns None: attngen's calls plan their own work, on the device, at no host cost.
* Speed hints (``num_splits`` except over a KV cache, ``pack_gqa``, ``sm_margin``,
  ``scheduler_metadata``) are accepted and left to attngen: they do not change the result.
* What attngen does not compute raises :class:`attngen.ArgumentError` naming it: ``qv``,
  the FP8 descales, ``attention_chunk``, ``seqused_q`` / ``seqused_k`` over contiguous keys,
  ``cache_leftpad``, ``cu_seqlens_k_new``, ``rotary_seqlens``, and new keys (``k``, ``v``)
  or rotary tables with packed queries (``cu_seqlens_q``) in ``flash_attn_with_kvcache``.
"""

from __future__ import annotations

import torch

from ..core.support import PAGE_ROWS, ArgumentError, check_head_dim, dtype_name
from . import flash_attn as fa2

__all__ = ["flash_attn_combine", "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_with_kvcache", "get_scheduler_metadata"]

flash_attn_combine = fa2.flash_attn_combine


def _refuse(attention_chunk, **given) -> None:
    """Each FlashAttention 3 argument attngen does not compute, refused by name when given."""
    if attention_chunk:
        raise ArgumentError(f"attention_chunk={attention_chunk}: attngen has no chunked local attention")
    fa2.refuse_given("FlashAttention 3 API", **given)


def _out_and_lse(result, return_attn_probs: bool):
    """FlashAttention 3's answer: ``out``, or ``(out, softmax_lse)``."""
    return result[:2] if return_attn_probs else result


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                    v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                    pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False, *, sinks=None):
    """FlashAttention 3's ``flash_attn_func``: q (B, S_q, H, D), k, v (B, S_k, H_kv, D) -> out,
    or ``(out, softmax_lse)`` (B, H, S_q) with ``return_attn_probs``."""
    _refuse(attention_chunk, qv=qv, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    result = fa2.flash_attn_func(q, k, v, 0.0, softmax_scale, causal, window_size, softcap, None, deterministic,
                                 return_attn_probs, sinks=sinks)
    return _out_and_lse(result, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, softmax_scale=None, causal=False, q_descale=None, k_descale=None,
                              v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0,
                              deterministic=False, num_heads_q=None, sm_margin=0, return_attn_probs=False, *,
                              sinks=None):
    """``flash_attn_func`` on one tensor: qkv (B, S, 3, H, D), or with ``num_heads_q`` (B, S,
    H + 2 H_kv, D), the query heads first, then the keys', then the values'."""
    if num_heads_q is None:
        q, k, v = qkv.unbind(dim=2)
    else:
        kv_heads, rest = divmod(qkv.shape[2] - num_heads_q, 2)
        if rest or kv_heads <= 0:
            raise ArgumentError(f"qkv has {qkv.shape[2]} heads: with num_heads_q={num_heads_q} the rest must "
                                f"be two equal groups (keys, values)")
        q, k, v = qkv.split([num_heads_q, kv_heads, kv_heads], dim=2)
    return flash_attn_func(q, k, v, softmax_scale, causal, None, q_descale, k_descale, v_descale, window_size,
                           attention_chunk, softcap, 1, None, deterministic, sm_margin, return_attn_probs,
                           sinks=sinks)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
                           seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None,
                           k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0,
                           num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0,
                           return_attn_probs=False, *, sinks=None):
    """FlashAttention 3's ``flash_attn_varlen_func``: packed sequences, q (total_q, H, D), k, v
    (total_k, H_kv, D), sequence b's rows ``cu_seqlens[b]:cu_seqlens[b+1]``, its queries the
    last of its keys; ``(out, softmax_lse)`` (H, total_q) with ``return_attn_probs``."""
    _refuse(attention_chunk, seqused_q=seqused_q, seqused_k=seqused_k, qv=qv, q_descale=q_descale,
            k_descale=k_descale, v_descale=v_descale)
    result = fa2.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0,
                                        softmax_scale, causal, window_size, softcap, None, deterministic,
                                        return_attn_probs, sinks=sinks)
    return _out_and_lse(result, return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, page_table=None,
                            cu_seqlens_q=None, cu_seqlens_k_new=None, max_seqlen_q=None, rotary_seqlens=None,
                            q_descale=None, k_descale=None, v_descale=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), attention_chunk=0, softcap=0.0, rotary_interleaved=True,
                            scheduler_metadata=None, num_splits=0, pack_gqa=None, sm_margin=0,
                            return_softmax_lse=False, *, sinks=None):
    """FlashAttention 3's ``flash_attn_with_kvcache``: as FlashAttention 2's (new keys written
    in place, rotary tables, ``cache_batch_idx``; see
    :func:`attngen.integrations.flash_attn.flash_attn_with_kvcache`) with the pages named
    ``page_table``; ``(out, softmax_lse)`` with ``return_softmax_lse``.

    With ``cu_seqlens_q`` (and ``max_seqlen_q``), q is packed (total_q, H, D), sequence b's
    queries the last of its ``cache_seqlens[b]`` cached keys (a serving engine's call, keys
    already in the cache): the log-sum-exp is then (H, total_q)."""
    _refuse(attention_chunk, qv=qv, cache_leftpad=cache_leftpad, cu_seqlens_k_new=cu_seqlens_k_new,
            rotary_seqlens=rotary_seqlens, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    if cu_seqlens_q is None:
        return fa2.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                                           cache_batch_idx, None, page_table, softmax_scale, causal, window_size,
                                           softcap, rotary_interleaved, None, num_splits, return_softmax_lse,
                                           sinks=sinks)
    if k is not None or v is not None or rotary_cos is not None or rotary_sin is not None:
        raise ArgumentError("k, v or rotary tables with cu_seqlens_q: write the new keys into the cache first, "
                            "then call with the packed queries")
    if cache_seqlens is None or isinstance(cache_seqlens, int):
        raise ArgumentError("cu_seqlens_q needs cache_seqlens, a (B,) int32 tensor of each sequence's keys")
    if page_table is None:                # a contiguous cache: each sequence's row is its one page
        page_table = fa2.contiguous_cache_table(cache_batch_idx, cache_seqlens.shape[0], k_cache.shape[0], q.device)
    elif cache_batch_idx is not None:
        raise ArgumentError("cache_batch_idx with page_table: a paged cache finds each sequence's pages "
                            "through page_table alone")
    result = fa2.flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q, None, max_seqlen_q, None, 0.0,
                                        softmax_scale, causal, window_size, softcap, None, False,
                                        return_softmax_lse, page_table, seqused_k=cache_seqlens, sinks=sinks,
                                        num_splits=num_splits)
    return _out_and_lse(result, return_softmax_lse)


def get_scheduler_metadata(batch_size, max_seqlen_q, max_seqlen_k, num_heads_q, num_heads_kv, headdim,
                           cache_seqlens, qkv_dtype=torch.bfloat16, headdim_v=None, cu_seqlens_q=None,
                           cu_seqlens_k_new=None, cache_leftpad=None, page_size=None, max_seqlen_k_new=0,
                           causal=False, window_size=(-1, -1), attention_chunk=0, has_softcap=False,
                           num_splits=0, pack_gqa=None, sm_margin=0):
    """FlashAttention 3's ``get_scheduler_metadata``: in FlashAttention, how a later
    ``flash_attn_with_kvcache`` call of this shape divides its work, computed ahead (a serving
    engine calls it once a step and passes the result as ``scheduler_metadata``).  attngen's
    calls divide their work themselves, on the device, so there is nothing to compute: this
    returns None, which ``scheduler_metadata=`` takes, as FlashAttention's other backends do.

    It checks what attngen would refuse in that call, so that an engine learns it when it
    plans rather than at the first step: the head dim and dtype attngen has kernels for,
    values as wide as keys (``headdim_v``), whole KV-head groups, pages of a multiple of 16
    keys, the window, and the arguments attngen does not compute (``attention_chunk``,
    ``cache_leftpad``, ``cu_seqlens_k_new``)."""
    _refuse(attention_chunk, cache_leftpad=cache_leftpad, cu_seqlens_k_new=cu_seqlens_k_new)
    check_head_dim(headdim)
    if headdim_v is not None and headdim_v != headdim:
        raise ArgumentError(f"headdim_v={headdim_v}: attngen's values are as wide as its keys ({headdim})")
    if dtype_name(qkv_dtype) is None:
        raise ArgumentError(f"qkv_dtype={qkv_dtype}: attngen's kernels take torch.float16 or torch.bfloat16")
    fa2.gqa_of(num_heads_q, num_heads_kv)
    if page_size is not None and (page_size < 1 or page_size % PAGE_ROWS):
        raise ArgumentError(f"page_size={page_size}: attngen's paged kernels take pages of a multiple of "
                            f"{PAGE_ROWS} keys")
    fa2.mask_of(causal, window_size)
    return None
