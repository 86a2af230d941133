"""Ahead-of-time compilation of generated kernels with cuTile's exporter (no GPU needed)."""

from __future__ import annotations

import re

ARCH_RE = re.compile(r"^sm_\d{2,3}[a-z]?$")


def check_arch(arch: str) -> str:
    if not isinstance(arch, str) or not ARCH_RE.match(arch):
        raise ValueError(f"arch must look like sm_90 or sm_100, got {arch!r}")
    return arch


def signature(spec):
    """The launch every generated launcher makes: Q, K, V, Out ((B, H, S, D), or
    (total, H, D) when varlen), then the fp32 sinks, the int32 cu_seqlens, the scale."""
    import cuda.tile as ct
    from cuda.tile.compilation import (ArrayConstraint, CallingConvention, KernelSignature,
                                       ScalarConstraint)

    def array(dtype, ndim, unit_last=True):
        return ArrayConstraint(dtype, ndim, index_dtype=ct.int32, stride_lower_bound_incl=0,
                               alias_groups=(), may_alias_internally=False,
                               stride_constant=(None,) * (ndim - 1) + (1 if unit_last else None,),
                               base_addr_divisible_by=16 if ndim > 1 else 4)

    f = spec.features
    data = array({"fp16": ct.float16, "bf16": ct.bfloat16}[spec.dtype], 3 if f.varlen else 4)
    params = [data] * 4
    if f.sinks:
        params.append(array(ct.float32, 1))
    if f.varlen:
        params += [array(ct.int32, 1)] * (2 if f.chunked else 1)
    params.append(ScalarConstraint(ct.float32))
    return KernelSignature(params, calling_convention=CallingConvention.cutile_python_v1())


def export(kernel, spec, arch: str, output) -> None:
    """Write the cubin of ``kernel`` (a ``@ct.kernel``) for ``arch`` to ``output``."""
    from cuda.tile.compilation import export_kernel

    export_kernel(kernel, [signature(spec)], output, gpu_code=check_arch(arch),
                  output_format="cubin")
