"""FlashAttention 4's Python API (``flash_attn.cute``, the CuTe DSL build) on attngen's
kernels: code written for it switches by one import
(``from attngen.flash_attn.cute import flash_attn_func, flash_attn_varlen_func``).

FlashAttention 4 differs from FlashAttention 2 in its arguments and answers, and the
functions here take and give its own, running the FlashAttention 2-shaped implementations
of :mod:`attngen.integrations.flash_attn` (same window convention, more-queries-than-keys
rule and log-sum-exp):

* ``window_size=(left, right)`` with ``None`` for unbounded;
* ``learnable_sink`` (one logit per query head) is attngen's ``sinks``, with its gradient;
* every call returns ``(out, lse)``: ``lse`` is the log-sum-exp, natural log, (B, H, S_q) or
  (H, total_q), when ``return_lse=True`` or when autograd records the call (as FlashAttention 4
  computes it then), else None; no gradient flows through it;
* ``flash_attn_varlen_func`` takes a paged cache (``page_table`` with ``seqused_k``),
  queries packed by ``cu_seqlens_q`` or batched (B, S_q, H, D);
* ``flash_attn_combine`` merges outputs over split keys by their log-sum-exps.

Speed hints (``num_splits`` for contiguous keys, ``pack_gqa``) are accepted and left to
attngen.  What attngen does not compute raises :class:`attngen.ArgumentError` naming it:
``score_mod``, ``mask_mod``, block sparsity, ``aux_tensors``, ``seqused_q``, and
``seqused_k`` over contiguous keys.
"""

from __future__ import annotations

from ..core.support import ArgumentError
from ..runtime.inputs import wants_grad
from . import flash_attn as fa2

__all__ = ["flash_attn_combine", "flash_attn_func", "flash_attn_varlen_func"]

flash_attn_combine = fa2.flash_attn_combine

API = "FlashAttention 4 API"      # how refusals name it


def _window(window_size) -> tuple[int, int]:
    """FlashAttention 4's ``(left, right)``, None unbounded, as FlashAttention 2's (-1)."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ArgumentError(f"window_size must be (left, right), each None (unbounded) or >= 0, "
                            f"got {window_size!r}")
    return tuple(-1 if w is None else w for w in window_size)


def _lse_wanted(return_lse: bool, *tensors) -> bool:
    """Whether a call returns its log-sum-exp: when asked for, or when autograd records the
    call (the training forward computes it anyway, and FlashAttention 4 returns it then)."""
    return bool(return_lse) or wants_grad(*tensors)


def _pair(result, with_lse: bool):
    """``(out, lse)`` from FlashAttention 2's answer (``(out, softmax_lse, None)`` or out)."""
    return result[:2] if with_lse else (result, None)


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None,
                    softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, mask_mod=None,
                    full_block_cnt=None, full_block_idx=None, mask_block_cnt=None, mask_block_idx=None,
                    block_size=None, return_lse=False):
    """FlashAttention 4's ``flash_attn_func``: q (B, S_q, H, D), k, v (B, S_k, H_kv, D) ->
    ``(out, lse)``."""
    fa2.refuse_given(API, mask_mod=mask_mod, full_block_cnt=full_block_cnt, full_block_idx=full_block_idx,
                     mask_block_cnt=mask_block_cnt, mask_block_idx=mask_block_idx, block_size=block_size)
    with_lse = _lse_wanted(return_lse, q, k, v, learnable_sink)
    return _pair(fa2.flash_attn_func(q, k, v, 0.0, softmax_scale, causal, _window(window_size), softcap, None,
                                     deterministic, with_lse, sinks=learnable_sink), with_lse)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                           seqused_q=None, seqused_k=None, page_table=None, softmax_scale=None, causal=False,
                           window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1,
                           pack_gqa=None, deterministic=False, score_mod=None, mask_mod=None,
                           block_sparse_tensors=None, cu_total_m_blocks=None, cu_total_n_blocks=None,
                           aux_tensors=None, return_lse=False):
    """FlashAttention 4's ``flash_attn_varlen_func`` -> ``(out, lse)``: packed sequences (q
    (total_q, H, D), k, v (total_k, H_kv, D), sequence b's rows ``cu_seqlens[b]:cu_seqlens[b+1]``,
    its queries the last of its keys), or a paged cache (``page_table`` (B, max_pages) int32,
    k, v (pages, page_size, H_kv, D), sequence b's keys its first ``seqused_k[b]``) under
    queries packed by ``cu_seqlens_q`` or batched (B, S_q, H, D); without offsets,
    ``flash_attn_func``.  Over a paged cache, inference only."""
    fa2.refuse_given(API, seqused_q=seqused_q, score_mod=score_mod, mask_mod=mask_mod,
                     block_sparse_tensors=block_sparse_tensors, cu_total_m_blocks=cu_total_m_blocks,
                     cu_total_n_blocks=cu_total_n_blocks, aux_tensors=aux_tensors)
    window = _window(window_size)
    if page_table is not None:
        if cu_seqlens_k is not None or seqused_k is None:
            raise ArgumentError("page_table takes each sequence's key count as seqused_k, not cu_seqlens_k")
        batched = cu_seqlens_q is None
        if batched:         # (B, S_q, H, D) queries: the same call, packed
            batch, seq_q = q.shape[:2]
            (q, cu_seqlens_q), max_seqlen_q = fa2.as_packed(q), seq_q
        out, lse = _pair(fa2.flash_attn_varlen_func(q, k, v, cu_seqlens_q, None, max_seqlen_q, None, 0.0,
                                                    softmax_scale, causal, window, softcap, None, False,
                                                    return_lse, page_table, seqused_k=seqused_k,
                                                    sinks=learnable_sink, num_splits=num_splits), return_lse)
        if batched:       # back to (B, S_q, H, D), and the log-sum-exp (B, H, S_q)
            out = out.view(batch, seq_q, *out.shape[1:])
            lse = None if lse is None else lse.view(-1, batch, seq_q).transpose(0, 1).contiguous()
        return out, lse
    if seqused_k is not None:
        raise ArgumentError("seqused_k over contiguous keys: attngen reads their lengths from cu_seqlens_k; "
                            "pass page_table for a paged cache")
    if cu_seqlens_q is None and cu_seqlens_k is None:
        return flash_attn_func(q, k, v, softmax_scale, causal, window_size, learnable_sink, softcap,
                               deterministic=deterministic, return_lse=return_lse)
    with_lse = _lse_wanted(return_lse, q, k, v, learnable_sink)
    return _pair(fa2.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0,
                                            softmax_scale, causal, window, softcap, None, deterministic, with_lse,
                                            sinks=learnable_sink), with_lse)
