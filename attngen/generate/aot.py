"""Ahead-of-time compilation of generated kernels with cuTile's exporter (no GPU needed)."""

from __future__ import annotations

import re

from ..core.support import DTYPES, STRIDE_BYTES

ARCH_RE = re.compile(r"^sm_\d{2,3}[a-z]?$")


def check_arch(arch: str) -> str:
    if not isinstance(arch, str) or not ARCH_RE.match(arch):
        raise ValueError(f"arch must look like sm_90 or sm_100, got {arch!r}")
    return arch


def signature(spec, params=None):
    """A kernel's signature as the generated launcher launches it, from its parameters
    (default: the inference kernel's, ``spec.params``): fp16/bf16 arrays, fp32 accumulators
    and fp32 row statistics with a unit last stride and every other stride a multiple of
    :data:`~attngen.core.support.STRIDE_BYTES` (the head_dim-long rows also a multiple of 16
    elements long), 16-byte aligned (64-bit shapes and strides for the ``*64`` kinds); a paged
    variant's fp32 partials, alike; 1-D fp32 / int32 arrays; the 2-D int32 block table (4-byte
    aligned, any strides: any row slice of a table); fp32 and int32 scalars.  These are the
    assumptions cuTile itself makes of a call whose tensors have these properties, so a
    built kernel is the kernel cuTile would compile for the call (TMA loads included)."""
    import cuda.tile as ct
    from cuda.tile.compilation import (ArrayConstraint, CallingConvention, KernelSignature,
                                       ScalarConstraint)

    def array(dtype, ndim, index_dtype=ct.int32, *, head_rows=False, aligned=True):
        """``head_rows``: the last axis is head_dim long (a multiple of 16); ``aligned``: the
        strides and base address are multiples of STRIDE_BYTES (else of the element)."""
        lead = STRIDE_BYTES // (dtype.bitwidth // 8) if aligned else 1
        return ArrayConstraint(dtype, ndim, index_dtype=index_dtype, stride_lower_bound_incl=0,
                               alias_groups=(), may_alias_internally=False,
                               stride_constant=(None,) * (ndim - 1) + (1,),
                               stride_divisible_by=(lead,) * (ndim - 1) + (1,),
                               shape_divisible_by=(1,) * (ndim - 1) + (16 if head_rows else 1,),
                               base_addr_divisible_by=STRIDE_BYTES if aligned else 4)

    packed, io = spec.features.varlen, getattr(ct, DTYPES[spec.dtype])
    n = 3 if packed else 4
    kinds = {"io": lambda: array(io, n, head_rows=True), "acc": lambda: array(ct.float32, n, head_rows=True),
             "rows": lambda: array(ct.float32, n - 1),
             "io64": lambda: array(io, n, ct.int64, head_rows=True),
             "acc64": lambda: array(ct.float32, n, ct.int64, head_rows=True),
             "rows64": lambda: array(ct.float32, n - 1, ct.int64),
             "part": lambda: array(ct.float32, 4, head_rows=True),
             "part64": lambda: array(ct.float32, 4, ct.int64, head_rows=True),
             "partrows": lambda: array(ct.float32, 3), "partrows64": lambda: array(ct.float32, 3, ct.int64),
             "f32[]": lambda: array(ct.float32, 1, aligned=False), "i32[]": lambda: array(ct.int32, 1, aligned=False),
             "i32[,]": lambda: array(ct.int32, 2, aligned=False),
             "f32": lambda: ScalarConstraint(ct.float32), "i32": lambda: ScalarConstraint(ct.int32)}
    return KernelSignature([kinds[p.kind]() for p in (spec.params if params is None else params)],
                           calling_convention=CallingConvention.cutile_python_v2())


def export(kernel, spec, arch: str, output, params=None) -> None:
    """Write the cubin of ``kernel`` (a ``@ct.kernel`` taking ``params``, by default the
    inference kernel's) for ``arch`` to ``output``."""
    from cuda.tile.compilation import export_kernel

    export_kernel(kernel, [signature(spec, params)], output, gpu_code=check_arch(arch),
                  output_format="cubin")
