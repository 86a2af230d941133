"""Input checks shared by every generated launcher."""

from __future__ import annotations

import math

import torch

LOG2E = 1.4426950408889634
LAYOUTS = ("bhsd", "bshd")


class InputError(ValueError):
    """Tensors a kernel cannot take; the message names the kernel and the problem."""


def scale_log2(scale: float | None, head_dim: int) -> float:
    """Softmax scale (default ``head_dim ** -0.5``) with log2(e) folded in, for ``exp2``."""
    if scale is None:
        scale = head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
            or scale <= 0:
        raise InputError(f"scale must be a positive finite number, got {scale!r}")
    return float(scale) * LOG2E


def prepare(q, k, v, out, *, layout: str, head_dim: int, dtype: torch.dtype, group: int, name: str):
    """Validate ``q, k, v`` (and ``out``) and return (B, H, S, D) views of all four plus ``out``.

    Nothing is copied: a (B, S, H, D) tensor becomes a transposed view.
    """
    def fail(message):
        raise InputError(f"{name}: {message}")

    if layout not in LAYOUTS:
        fail(f"layout must be one of {LAYOUTS}, got {layout!r}")
    tensors = {"q": q, "k": k, "v": v}
    for label, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            fail(f"{label} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            fail(f"{label} must be 4-D ({'B, H, S, D' if layout == 'bhsd' else 'B, S, H, D'}), "
                 f"got shape {tuple(t.shape)}")
        if t.dtype != dtype:
            fail(f"{label} has dtype {t.dtype}; this kernel takes {dtype}")
        if t.stride(-1) != 1:
            fail(f"{label} must have a unit stride in its last (head) dimension, "
                 f"got strides {t.stride()}")
    views = {label: (t if layout == "bhsd" else t.transpose(1, 2)) for label, t in tensors.items()}
    q4, k4, v4 = views["q"], views["k"], views["v"]
    (batch, heads, seq, d), (kb, kv_heads, seq_k, kd) = q4.shape, k4.shape
    if tuple(k4.shape) != tuple(v4.shape):
        fail(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if d != head_dim or kd != head_dim:
        fail(f"head_dim must be {head_dim}, got q {d} and k {kd}")
    if kb != batch:
        fail(f"batch sizes differ: q {batch}, k {kb}")
    if seq_k != seq:
        fail(f"prefill takes as many keys as queries, got {seq} queries and {seq_k} keys")
    if heads % group:
        fail(f"this kernel has {group} query heads per KV head; q has {heads} heads, "
             f"not a multiple of {group}")
    if kv_heads * group != heads:
        fail(f"this kernel has {group} query head(s) per KV head: q has {heads} heads, "
             f"so k and v need {heads // group}, got {kv_heads}")

    for label, t in tensors.items():
        if not t.is_cuda:
            fail(f"{label} is on {t.device}; this kernel runs on CUDA tensors")
    if len({t.device for t in tensors.values()}) != 1:
        fail(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")

    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        if not isinstance(out, torch.Tensor):
            fail(f"out must be a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != tuple(q.shape) or out.dtype != dtype or out.device != q.device:
            fail(f"out must match q: shape {tuple(q.shape)}, {dtype}, {q.device}; got "
                 f"{tuple(out.shape)}, {out.dtype}, {out.device}")
        if out.stride(-1) != 1:
            fail(f"out must have a unit stride in its last dimension, got strides {out.stride()}")
    o4 = out if layout == "bhsd" else out.transpose(1, 2)
    return q4, k4, v4, o4, out
