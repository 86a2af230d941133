"""attngen: generated cuTile sliding-window attention prefill kernels.

    import attngen
    attn = attngen.get_kernel(window=4096, gqa=4)
    o = attn(q, k, v)          # q: (B, H, S, D), k/v: (B, H // 4, S, D), fp16/bf16 CUDA
"""

__version__ = "0.1.0"

from .mask import Mask, MaskError  # noqa: E402
from .spec import SpecError  # noqa: E402
from .registry import (AttentionKernel, KernelNotFound, get_kernel,  # noqa: E402
                       get_layer_kernels, registry)

__all__ = ["__version__", "get_kernel", "get_layer_kernels", "registry", "AttentionKernel",
           "KernelNotFound", "Mask", "MaskError", "SpecError"]
