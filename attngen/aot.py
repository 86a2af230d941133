"""Ahead-of-time compilation of generated kernels with cuTile's exporter (no GPU needed)."""

from __future__ import annotations

import re

ARCH_RE = re.compile(r"^sm_\d{2,3}[a-z]?$")


def check_arch(arch: str) -> str:
    if not isinstance(arch, str) or not ARCH_RE.match(arch):
        raise ValueError(f"arch must look like sm_90 or sm_100, got {arch!r}")
    return arch


def signature(spec):
    """The launch every generated launcher makes: four (B, H, S, D) arrays and a float."""
    import cuda.tile as ct
    from cuda.tile.compilation import (ArrayConstraint, CallingConvention, KernelSignature,
                                       ScalarConstraint)

    dtype = {"fp16": ct.float16, "bf16": ct.bfloat16}[spec.dtype]
    array = ArrayConstraint(dtype, 4, index_dtype=ct.int32, stride_lower_bound_incl=0,
                            alias_groups=(), may_alias_internally=False,
                            stride_constant=(None, None, None, 1), base_addr_divisible_by=16)
    return KernelSignature([array, array, array, array, ScalarConstraint(ct.float32)],
                           calling_convention=CallingConvention.cutile_python_v1())


def export(kernel, spec, arch: str, output) -> None:
    """Write the cubin of ``kernel`` (a ``@ct.kernel``) for ``arch`` to ``output``."""
    from cuda.tile.compilation import export_kernel

    export_kernel(kernel, [signature(spec)], output, gpu_code=check_arch(arch),
                  output_format="cubin")
