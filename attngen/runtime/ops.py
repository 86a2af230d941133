"""attngen's kernels as PyTorch operators, so torch.compile and CUDA graphs can take them.

``torch.library`` custom ops run every generated variant; each takes the variant as its
first argument, a string (a generated launcher's ``NAME``, or the key of an
:class:`attngen.AttentionKernel`, which picks the kernel for the tensors' head_dim and dtype
when the op runs):

* ``attngen::attention``       inference: the output, nothing saved;
* ``attngen::attention_out``   the same into a caller's ``out`` (which it mutates);
* ``attngen::attention_fwd``   the output, each query row's log-sum-exp and (variants with
  sinks; else empty) the output's rounding residual, with a registered autograd formula that
  runs ``attngen::attention_bwd`` (dq, dk, dv, dsinks);
* ``attngen::paged_attention`` and ``attngen::paged_attention_out``: a paged variant over a
  paged K/V cache (inference only), the shape of call a serving engine makes per layer;
  ``attngen::paged_attention_lse`` the same with each query row's log-sum-exp.

The backward is the head dim's faster one, measured: at head_dim 256 a fused kernel that adds
dQ atomically (the last bits of dQ may differ run to run), elsewhere two kernels that write
each element once.  It is deterministic (identical bits every run) when asked for, with
``deterministic=True``, or when ``torch.use_deterministic_algorithms(True)`` is on when the
forward runs.

Each op has a fake implementation (shapes, strides and dtypes only), so ``torch.compile(...,
fullgraph=True)`` traces through an attngen call without running it, and ``aot_autograd``
sees the backward as one op too.  :func:`attention` picks: when autograd records the call,
the op's autograd formula as an autograd.Function, else inference.  In eager mode on plain
tensors it runs the implementations behind the ops directly (``_DirectAttention`` when
autograd records), which costs a fraction of the host time of the ops' Python dispatch;
anything that traces gets the ops (``_Attention``).

The real implementations validate the inputs and launch (``attngen.runtime.inputs``, the generated
launcher).  Nothing on the path synchronizes with the host, except reading packed sequences'
``cu_seqlens`` when ``max_seqlen_q`` (and, for a chunked variant's backward, ``max_seqlen_k``)
is not given: pass them to capture packed calls in a CUDA graph.
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Callable, Optional

import torch
from torch import Tensor

from ..core.support import LOG2E, at_least_fp32, bhsd, check_positive_number, dtype_name
from . import inputs
from .inputs import InputError, natural_lse, no_out_with_grad, row_stats, wants_grad

_targets: dict[str, ModuleType | Callable[[int, str], ModuleType]] = {}


def register_variant(module: ModuleType) -> None:
    """Make a generated launcher module callable by its ``NAME`` (done when it is imported)."""
    _targets[module.NAME] = module


def register_resolver(key: str, resolve: Callable[[int, str], ModuleType]) -> None:
    """Make ``key`` callable: ``resolve(head_dim, dtype)`` returns the launcher module that
    runs it (an :class:`attngen.AttentionKernel` registers itself so)."""
    _targets[key] = resolve


def _module(variant: str, q: Tensor) -> ModuleType:
    """The launcher module that runs ``variant`` for ``q``: every run of an op finds it here."""
    target = _targets.get(variant)
    if target is None:
        raise InputError(f"no attngen variant {variant!r} in this process: get its callable with "
                         f"attngen.get_kernel (or import its generated launcher) first")
    if not isinstance(target, ModuleType) and q.device.type not in inputs.KERNEL_DEVICES:
        # before the resolver picks (and maybe generates) a kernel that could not run here
        raise InputError(f"{variant}: q is on {q.device}; this kernel runs on CUDA tensors")
    return target if isinstance(target, ModuleType) else target(q.shape[-1], dtype_name(q.dtype))


def _options(module: ModuleType, scale, sinks) -> dict:
    """The keyword arguments every launcher function takes: the scale, and sinks where the
    variant has them."""
    return {"scale": scale, **({"sinks": sinks} if module.SPEC["features"]["sinks"] else {})}


def _resolve(variant: str, q: Tensor, sinks, cu_q, cu_k, max_q, max_k, scale, layout):
    """The launcher module that runs ``variant`` for ``q``, and the extra positional and
    keyword arguments its functions (``infer``, ``forward``, ``backward``) take."""
    module = _module(variant, q)
    return (module, *_arguments(module, sinks, cu_q, cu_k, max_q, max_k, scale, layout))


def _arguments(module: ModuleType, sinks, cu_q, cu_k, max_q, max_k, scale, layout) -> tuple[tuple, dict]:
    """The extra positional and keyword arguments of ``module``'s functions."""
    options = _options(module, scale, sinks)
    if module.SPEC["features"]["varlen"]:
        return (cu_q, cu_k), {**options, "max_seqlen_q": max_q, "max_seqlen_k": max_k}
    return (), {**options, "layout": layout}


# -- inference --------------------------------------------------------------------------
def _infer(variant: str, q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor],
           cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
           max_seqlen_q: Optional[int], max_seqlen_k: Optional[int], scale: Optional[float],
           layout: str) -> Tensor:
    module, offsets, options = _resolve(variant, q, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, scale, layout)
    return module.infer(q, k, v, *offsets, **options)


_attention = torch.library.custom_op("attngen::attention", mutates_args=())(_infer)


@_attention.register_fake
def _(variant, q, k, v, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, layout):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _infer_out(variant: str, q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor],
               cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
               max_seqlen_q: Optional[int], max_seqlen_k: Optional[int], scale: Optional[float],
               layout: str, out: Tensor) -> None:
    module, offsets, options = _resolve(variant, q, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, scale, layout)
    module.infer(q, k, v, *offsets, **options, out=out)


_attention_out = torch.library.custom_op("attngen::attention_out", mutates_args=("out",))(_infer_out)


@_attention_out.register_fake
def _(variant, q, k, v, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, layout, out):
    return None


# -- training ---------------------------------------------------------------------------
def _rows(q: Tensor, packed: bool, layout: str) -> tuple[int, ...]:
    """The shape of the log-sum-exp: one fp32 per query row, (B, H, S) or (total_q, H)."""
    return tuple(q.shape[:2]) if packed else tuple(bhsd(q, layout).shape[:3])


def _forward(variant: str, q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor],
             cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
             max_seqlen_q: Optional[int], max_seqlen_k: Optional[int], scale: Optional[float],
             layout: str) -> tuple[Tensor, Tensor, Tensor]:
    module, offsets, options = _resolve(variant, q, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, scale, layout)
    return module.forward(q, k, v, *offsets, **options)


_attention_fwd = torch.library.custom_op("attngen::attention_fwd", mutates_args=())(_forward)


@_attention_fwd.register_fake
def _(variant, q, k, v, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, layout):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    packed = cu_seqlens_q is not None
    res = q.new_empty(0) if sinks is None else q.new_empty(q.shape if packed else bhsd(q, layout).shape)
    return out, row_stats(_rows(q, packed, layout), q.device), res


def _gradients(variant: str, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
               res: Tensor, dout: Tensor, sinks: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
               cu_seqlens_k: Optional[Tensor], max_seqlen_q: Optional[int],
               max_seqlen_k: Optional[int], scale: Optional[float], layout: str,
               deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dsinks); dsinks is empty for a variant without sinks."""
    module, offsets, options = _resolve(variant, q, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, scale, layout)
    dq, dk, dv, dsinks = module.backward(q, k, v, out, lse, res, dout, *offsets, **options,
                                         deterministic=deterministic)
    return dq, dk, dv, q.new_empty(0) if dsinks is None else dsinks


_attention_bwd = torch.library.custom_op("attngen::attention_bwd", mutates_args=())(_gradients)


@_attention_bwd.register_fake
def _(variant, q, k, v, out, lse, res, dout, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, scale, layout, deterministic=False):
    if cu_seqlens_q is not None:
        grads = [torch.empty_like(t) for t in (q, k, v)]
    else:   # the backward allocates (B, H, S, D) and returns views in the inputs' layout
        grads = [bhsd(torch.empty_like(bhsd(t, layout)), layout) for t in (q, k, v)]
    return (*grads, q.new_empty(0) if sinks is None else torch.empty_like(sinks))


def _setup_context(ctx, inputs, output):
    variant, q, k, v, sinks, cu_q, cu_k, max_q, max_k, scale, layout = inputs
    out, lse, res = output
    ctx.mark_non_differentiable(lse, res)
    ctx.save_for_backward(q, k, v, sinks, out, lse, res, cu_q, cu_k)
    ctx.options = (variant, max_q, max_k, scale, layout)
    ctx.direct = False
    ctx.deterministic = torch.are_deterministic_algorithms_enabled()


def _backward(ctx, dout, _dlse, _dres):
    q, k, v, sinks, out, lse, res, cu_q, cu_k = ctx.saved_tensors
    variant, max_q, max_k, scale, layout = ctx.options
    if ctx.direct and _direct(dout):
        # the launcher _DirectAttention's forward ran, given back what it took and returned:
        # only dout is new, and the launcher checks it
        offsets, options = _arguments(ctx.module, sinks, cu_q, cu_k, max_q, max_k, scale, layout)
        dq, dk, dv, dsinks = ctx.module.backward(q, k, v, out, lse, res, dout, *offsets, **options,
                                                 deterministic=ctx.deterministic, check=False)
    else:
        dq, dk, dv, dsinks = torch.ops.attngen.attention_bwd(variant, q, k, v, out, lse, res, dout, sinks, cu_q,
                                                             cu_k, max_q, max_k, scale, layout, ctx.deterministic)
    return (None, dq, dk, dv, None if sinks is None else dsinks, None, None, None, None, None, None)


# the op stays differentiable for whoever calls it directly (torch.ops users, opcheck) ...
_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _Attention(torch.autograd.Function):
    """... and :func:`attention` records the same formula through this autograd.Function when
    anything traces (torch.compile, torch.func transforms, dispatch modes), which traces to the
    ops."""

    @staticmethod
    def forward(deterministic, *args):
        return torch.ops.attngen.attention_fwd(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs[1:], output)
        ctx.deterministic = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        return (None, *_backward(ctx, *grads))


# autograd.Function.apply binds each call's arguments to ``forward``'s signature, which
# inspect.signature computes anew every time unless the function carries it: 25 us of host
# time a training call, computed here once
_Attention.forward.__signature__ = inspect.signature(_Attention.forward)


class _DirectAttention(torch.autograd.Function):
    """The same formula for eager calls on plain tensors (see :func:`_direct`), running the
    launchers without the ops.  It is written in the older style, ``forward(ctx, ...)``: for
    a Function with a ``setup_context``, apply binds every call's arguments to ``forward``'s
    signature, 9 us of host time a training call (CPU, 2026-12-04); transforms, which need
    ``setup_context``, never reach this one.  Its forward finds the launcher once; the backward
    runs that launcher's ``backward`` without checking again what its ``forward`` took and
    returned (8.7 us of host time a training call, CPU, 2026-12-05)."""

    @staticmethod
    def forward(ctx, deterministic, *args):
        variant, q, k, v, sinks, cu_q, cu_k, max_q, max_k, scale, layout = args
        ctx.module, offsets, options = _resolve(variant, q, sinks, cu_q, cu_k, max_q, max_k, scale, layout)
        output = ctx.module.forward(q, k, v, *offsets, **options)
        _setup_context(ctx, args, output)
        ctx.direct, ctx.deterministic = True, deterministic
        return output

    @staticmethod
    def backward(ctx, *grads):
        return (None, *_backward(ctx, *grads))


def _direct(*tensors) -> bool:
    """Whether a call may run the generated launcher itself rather than through its op: in
    eager mode, on plain tensors.  An op's Python dispatch and autograd wrappers cost more host
    time than the launch (docs/performance.md, "Host time of one call"); torch.compile, fake tensors,
    dispatch modes and torch.func transforms need the ops and get them."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return (not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack()
            and all(t is None or (type(t) is Tensor and not wrapped(t)) for t in tensors))


def _check_scale(variant: str, scale: float | None) -> None:
    """A call's ``scale`` (None: the kernel's default) is a positive number."""
    if scale is not None:
        try:
            check_positive_number(scale, "scale")
        except ValueError as exc:
            raise InputError(f"{variant}: {exc}") from None


def attention(variant: str, q: Tensor, k: Tensor, v: Tensor, *, sinks: Tensor | None = None,
              cu_seqlens_q: Tensor | None = None, cu_seqlens_k: Tensor | None = None,
              max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
              scale: float | None = None, layout: str = "bhsd", out: Tensor | None = None,
              deterministic: bool | None = None, return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Run ``variant`` (see the module docstring): differentiably when autograd records the call
    (``out=`` is then refused), else inference; in eager mode without the ops' dispatch.  The
    backward is deterministic when ``deterministic`` is true, or when it is None and
    ``torch.use_deterministic_algorithms(True)`` is on; ``deterministic=False`` asks for the
    default backward whatever the global setting.  ``return_lse``: (out, lse), each query row's
    log-sum-exp over the scaled (and capped) scores it sees, sinks included, fp32, (B, H, S_q)
    or (total_q, H) for packed sequences (:func:`~attngen.runtime.inputs.natural_lse`); the
    call then runs the training forward, which computes it.  Gradients do not flow through it
    (the kernels save it for the backward, which does not differentiate it)."""
    _check_scale(variant, scale)
    args = (variant, q, k, v, sinks, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, layout)
    direct = _direct(q, k, v, sinks, cu_seqlens_q, cu_seqlens_k, out)
    if wants_grad(q, k, v, sinks):
        no_out_with_grad(out, variant)
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        result, lse, _ = (_DirectAttention if direct else _Attention).apply(bool(deterministic), *args)
        return (result, natural_lse(lse)) if return_lse else result
    if return_lse:
        result, lse, _ = (_forward if direct else torch.ops.attngen.attention_fwd)(*args)
        if out is not None:
            result = out.copy_(result)
        return result, natural_lse(lse)
    if out is None:
        return (_infer if direct else torch.ops.attngen.attention)(*args)
    (_infer_out if direct else torch.ops.attngen.attention_out)(*args, out)
    return out


# -- a paged K/V cache (serving) ------------------------------------------------------------
def _paged_infer(variant: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor,
                 seqused_k: Tensor, block_table: Tensor, sinks: Optional[Tensor],
                 max_seqlen_q: Optional[int], scale: Optional[float], splits: Optional[int],
                 check: Optional[bool], out: Optional[Tensor] = None, return_lse: bool = False):
    module = _module(variant, q)
    return module.infer(q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, max_seqlen_q=max_seqlen_q,
                        **_options(module, scale, sinks), out=out, splits=splits, check=check,
                        return_lse=return_lse)


@torch.library.custom_op("attngen::paged_attention", mutates_args=())
def _paged(variant: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor,
           seqused_k: Tensor, block_table: Tensor, sinks: Optional[Tensor], max_seqlen_q: Optional[int],
           scale: Optional[float], splits: Optional[int], check: Optional[bool]) -> Tensor:
    return _paged_infer(variant, q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, sinks,
                        max_seqlen_q, scale, splits, check)


@_paged.register_fake
def _(variant, q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, sinks, max_seqlen_q, scale,
      splits, check):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("attngen::paged_attention_out", mutates_args=("out",))
def _paged_out(variant: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor,
               seqused_k: Tensor, block_table: Tensor, sinks: Optional[Tensor], max_seqlen_q: Optional[int],
               scale: Optional[float], splits: Optional[int], check: Optional[bool], out: Tensor) -> None:
    _paged_infer(variant, q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, sinks, max_seqlen_q,
                 scale, splits, check, out)


@_paged_out.register_fake
def _(variant, q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, sinks, max_seqlen_q, scale,
      splits, check, out):
    return None


@torch.library.custom_op("attngen::paged_attention_lse", mutates_args=())
def _paged_lse(variant: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor,
               seqused_k: Tensor, block_table: Tensor, sinks: Optional[Tensor], max_seqlen_q: Optional[int],
               scale: Optional[float], splits: Optional[int], check: Optional[bool]) -> tuple[Tensor, Tensor]:
    return _paged_infer(variant, q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, sinks,
                        max_seqlen_q, scale, splits, check, return_lse=True)


@_paged_lse.register_fake
def _(variant, q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, sinks, max_seqlen_q, scale,
      splits, check):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            q.new_empty(q.shape[:2], dtype=torch.float32))


def paged_attention(variant: str, q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor,
                    seqused_k: Tensor, block_table: Tensor, *, max_seqlen_q: int | None = None,
                    sinks: Tensor | None = None, scale: float | None = None, out: Tensor | None = None,
                    splits: int | None = None, check: bool | None = None,
                    return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Run the paged ``variant`` (see its launcher's ``launch``) through ``attngen::paged_attention``
    (or ``attngen::paged_attention_out`` into ``out``, ``attngen::paged_attention_lse`` for
    ``return_lse``); in eager mode on plain tensors without the ops' dispatch.  Inference
    only: an input that requires grad is refused."""
    if wants_grad(q, k_cache, v_cache, sinks):
        raise InputError(f"{variant}: a paged cache has no backward; call under torch.no_grad() "
                         f"(or detach the inputs)")
    _check_scale(variant, scale)
    args = (variant, q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, sinks, max_seqlen_q, scale,
            splits, check)
    if _direct(q, k_cache, v_cache, cu_seqlens_q, seqused_k, block_table, sinks, out):
        return _paged_infer(*args, out, return_lse)
    if return_lse:
        result, lse = torch.ops.attngen.paged_attention_lse(*args)
        return (result if out is None else out.copy_(result)), lse
    if out is None:
        return torch.ops.attngen.paged_attention(*args)
    torch.ops.attngen.paged_attention_out(*args, out)
    return out


def sink_grad(sinks: Tensor, lse: Tensor, delta: Tensor, head_axis: int) -> Tensor:
    """The gradient of the sink logits.  A sink takes probability mass p_sink =
    exp(sink - lse) of its row and adds no value, so d loss / d sink = -p_sink * sum_j P_j dP_j
    summed over the head's rows.  That row sum is ``delta`` = rowsum(dO * O), which the
    backward computes in fp32 from the fp32 output (Out + its rounding residual): from O
    rounded to fp16/bf16 it would be too coarse for a sum over every row.  ``lse`` is in log2
    units."""
    shape = [1] * lse.dim()
    shape[head_axis] = -1
    p_sink = torch.exp2(at_least_fp32(sinks).reshape(shape) * LOG2E - lse)
    axes = [a for a in range(lse.dim()) if a != head_axis]
    return (-(p_sink * delta).sum(dim=axes)).to(sinks.dtype)
