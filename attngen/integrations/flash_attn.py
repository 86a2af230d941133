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

What attngen does not compute raises :class:`attngen.ArgumentError` naming it: dropout,
ALiBi, ``return_attn_probs``, a paged cache (``block_table``), and one-sided windows without
causality (``(left, -1)`` or ``(-1, right)`` with ``causal=False``).  Calls differentiate and
trace like every attngen call (``torch.compile``, CUDA graphs).
"""

from __future__ import annotations

import torch

from ..core.mask import Mask
from ..core.support import ArgumentError
from ..runtime.registry import AttentionKernel, get_kernel

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
           "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func",
           "flash_attn_varlen_qkvpacked_func", "mask_of"]


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


def _refuse(dropout_p, alibi_slopes, return_attn_probs, block_table=None) -> None:
    if dropout_p:
        raise ArgumentError(f"dropout_p={dropout_p}: attngen computes attention without dropout")
    if alibi_slopes is not None:
        raise ArgumentError("alibi_slopes: attngen has no ALiBi bias")
    if return_attn_probs:
        raise ArgumentError("return_attn_probs: attngen does not return the attention probabilities")
    if block_table is not None:
        raise ArgumentError("block_table: attngen's kernels do not read a paged KV cache yet")


_kernels: dict[tuple, AttentionKernel] = {}


def _kernel(mask: Mask, gqa: int, softcap: float | None, sinks: bool, chunked: bool,
            varlen: bool) -> AttentionKernel:
    """The callable for these semantics, made once per process."""
    key = (mask, gqa, softcap, sinks, chunked, varlen)
    if key not in _kernels:
        _kernels[key] = get_kernel(mask, gqa=gqa, softcap=softcap, sinks=sinks, chunked=chunked,
                                   varlen=varlen)
    return _kernels[key]


def _gqa(q, k) -> int:
    heads, kv_heads = q.shape[-2], k.shape[-2]
    if kv_heads == 0 or heads % kv_heads:
        raise ArgumentError(f"q has {heads} heads, k {kv_heads}: the query heads must be a multiple "
                            f"of the key/value heads")
    return heads // kv_heads


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                    sinks=None):
    """FlashAttention's ``flash_attn_func``: q (B, S_q, H, D), k, v (B, S_k, H_kv, D) -> out
    (B, S_q, H, D).  See the module docstring for the window and what is refused."""
    _refuse(dropout_p, alibi_slopes, return_attn_probs)
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
                               None, deterministic, sinks=sinks)
        return torch.cat([head, tail], dim=1)
    kernel = _kernel(mask, _gqa(q, k), softcap or None, sinks is not None, seq_q < seq_k, False)
    return kernel(q, k, v, layout="bshd", scale=softmax_scale, sinks=sinks,
                  deterministic=deterministic or None)


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
                           block_table=None, *, sinks=None):
    """FlashAttention's ``flash_attn_varlen_func``: packed sequences, sequence ``b`` the rows
    ``cu_seqlens[b]:cu_seqlens[b+1]`` (int32), its queries the last of its keys; each sequence
    needs at least as many keys as queries.  ``max_seqlen_q`` and ``max_seqlen_k`` are trusted
    (no host synchronization)."""
    _refuse(dropout_p, alibi_slopes, return_attn_probs, block_table)
    mask = mask_of(causal, window_size)
    if q.dim() != 3 or k.dim() != 3:
        raise ArgumentError(f"q and k must be (total, H, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    same = cu_seqlens_q is cu_seqlens_k    # else the queries are the last of each sequence's keys
    kernel = _kernel(mask, _gqa(q, k), softcap or None, sinks is not None, not same, True)
    return kernel(q, k, v, cu_seqlens_q, None if same else cu_seqlens_k, max_seqlen_q,
                  max_seqlen_k=None if same else max_seqlen_k, scale=softmax_scale, sinks=sinks,
                  deterministic=deterministic or None)


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
