"""Autograd for every generated variant: one ``torch.autograd.Function`` over a variant's
``forward`` (which also saves the rows' log-sum-exp) and ``backward`` (the generated
delta, dK/dV and dQ kernels).  A generated launcher routes a call here when autograd records
it; otherwise it runs the inference kernel, which saves nothing."""

from __future__ import annotations

import torch

from .support import LOG2E


class VariantAttention(torch.autograd.Function):
    """``apply(variant, options, q, k, v, sinks, *offsets)``: ``variant`` is the generated
    launcher module, ``options`` its keyword arguments (scale, layout, max_seqlen_q),
    ``offsets`` the cu_seqlens of packed sequences."""

    @staticmethod
    def forward(ctx, variant, options, q, k, v, sinks, *offsets):
        extra = {} if sinks is None else {"sinks": sinks}
        out, lse = variant.forward(q, k, v, *offsets, **options, **extra)
        ctx.variant, ctx.options = variant, options
        ctx.save_for_backward(q, k, v, sinks, out, lse, *offsets)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, sinks, out, lse, *offsets = ctx.saved_tensors
        extra = {} if sinks is None else {"sinks": sinks}
        dq, dk, dv, dsinks = ctx.variant.backward(q, k, v, out, lse, dout, *offsets,
                                                  **ctx.options, **extra)
        return (None, None, dq, dk, dv, dsinks, *(None for _ in offsets))


def sink_grad(sinks: torch.Tensor, lse: torch.Tensor, p_dp: torch.Tensor, head_axis: int):
    """The gradient of the sink logits.  A sink takes probability mass p_sink =
    exp(sink - lse) of its row and adds no value, so d loss / d sink = -p_sink * sum_j P_j dP_j
    summed over the head's rows.  ``p_dp`` is that sum, accumulated in fp32 by the dQ kernel
    (rowsum(dO * O) is the same number in exact arithmetic, but O rounded to fp16/bf16 makes
    it too coarse for a sum over every row); ``lse`` is in log2 units."""
    shape = [1] * lse.dim()
    shape[head_axis] = -1
    p_sink = torch.exp2(sinks.float().reshape(shape) * LOG2E - lse)
    axes = [a for a in range(lse.dim()) if a != head_axis]
    return (-(p_sink * p_dp).sum(dim=axes)).to(sinks.dtype)
