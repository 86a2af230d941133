"""What attngen supports, stated once.  The YAML reader, the value types, ``get_kernel``, the
transformers integration, ``hfconfig``, the launchers and the AOT signature all ask here.

=============  ==========================================================================
head_dim       64, 80, 96, 128, 256 (80 and 96 run in tiles padded to 128)
dtype          fp16, bf16 (the spec names; :data:`DTYPES` maps them to torch / cuTile)
gqa            a positive integer: query heads per KV head (1 = MHA; H = MQA)
layout         ``bhsd`` (B, H, S, D) or ``bshd`` (B, S, H, D); packed sequences are (T, H, D)
features       softcap, sinks, chunked, varlen, paged, in any combination (paged implies
               chunked and varlen, and has no backward)
tiles          ``pack`` (query heads per tile) must divide gqa; varlen forces pack 1 (not paged)
page size      a paged cache's keys per page: a multiple of :data:`PAGE_ROWS` (16)
=============  ==========================================================================
"""

from __future__ import annotations

import math

HEAD_DIMS = (64, 80, 96, 128, 256)
DTYPES = {"fp16": "float16", "bf16": "bfloat16"}   # spec name -> torch / cuda.tile attribute
LAYOUTS = ("bhsd", "bshd")
LOG2E = 1.4426950408889634                          # the kernels work in exp2 / log2 units
#: a paged kernel over pages smaller than its KV block (the ``_pieces`` kernels) loads keys
#: PAGE_ROWS at a time, each piece inside one page: page sizes are multiples of it (vLLM's
#: default page holds 16 keys)
PAGE_ROWS = 16
#: every stride of the arrays the kernels load, but the unit last one, is a multiple of this
#: many bytes: tensors of head_dim-long rows are so by construction, and attngen pads the
#: per-row statistics it allocates (:func:`attngen.runtime.inputs.row_stats`).  The built
#: kernels assume it, as cuTile assumes it of a call whose tensors have it: without it the
#: tile compiler cannot load through TMA and emits 3-5x the code (docs/architecture.md)
STRIDE_BYTES = 16


class ArgumentError(ValueError):
    """An argument attngen cannot accept: a window (:class:`~attngen.core.mask.MaskError`, a
    subclass), gqa, head_dim, dtype, softcap, scale, a feature flag, deterministic or layout.
    ``get_kernel`` raises it for every bad argument; a ValueError, as before it existed."""


def check_positive_number(value, what: str) -> float:
    """A finite number > 0 (softmax scale, softcap), as a float."""
    try:
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) \
            and math.isfinite(value) and value > 0
    except OverflowError:                                   # an int beyond float range
        ok = False
    if not ok:
        raise ArgumentError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


def check_gqa(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ArgumentError(f"gqa must be a positive integer (query heads per KV head), got {value!r}")
    return value


def check_head_dim(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in HEAD_DIMS:
        raise ArgumentError(f"head_dim must be one of {list(HEAD_DIMS)}, got {value!r}")
    return value


def check_dtype(value) -> str:
    if not isinstance(value, str) or value not in DTYPES:
        raise ArgumentError(f"dtype must be one of {list(DTYPES)}, got {value!r}")
    return value


def check_deterministic(value) -> bool | None:
    """The backward's mode: None (follow ``torch.use_deterministic_algorithms``), True or False."""
    if value is not None and not isinstance(value, bool):
        raise ArgumentError(f"deterministic must be True, False or None, got {value!r}")
    return value


def dtype_name(torch_dtype) -> str | None:
    """The spec name of a torch dtype or its name (``torch.bfloat16``, ``"bfloat16"`` ->
    ``"bf16"``); None if attngen has no kernels for it."""
    name = str(torch_dtype).removeprefix("torch.")
    return next((short for short, full in DTYPES.items() if full == name), None)


def forced_pack(varlen: bool, paged: bool = False) -> int | None:
    """The ``tiles.pack`` a feature combination forces: packed sequences take one head a tile
    (a paged variant's kernels pack heads: they address query rows head by head)."""
    return 1 if varlen and not paged else None


def check_layout(layout) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ArgumentError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def seq_axis(layout: str) -> int:
    """The sequence axis of a 4-D tensor in ``layout`` (2 in ``bhsd``, 1 in ``bshd``); the
    head axis is the other of 1 and 2."""
    return 2 if check_layout(layout) == "bhsd" else 1


def bhsd(t, layout: str):
    """A (B, H, S, D) view of a tensor in ``layout``; no copy."""
    return t if check_layout(layout) == "bhsd" else t.transpose(1, 2)


def at_least_fp32(t):
    """``t`` in fp32 at least (float64 stays float64): the precision of the sums done in
    PyTorch beside the kernels (the sinks' gradient, context parallelism's merge)."""
    import torch

    return t.to(torch.promote_types(t.dtype, torch.float32))
