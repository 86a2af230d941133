"""attngen: generated cuTile sliding-window attention prefill kernels.

    import attngen
    attn = attngen.get_kernel(window=4096, gqa=4)
    o = attn(q, k, v)          # q: (B, H, S, D), k/v: (B, H // 4, S, D), fp16/bf16 CUDA
"""

from .core.mask import Mask, MaskError
from .core.support import ArgumentError
from .core.version import __version__
from .generate.spec import SpecError
from .runtime.inputs import InputError
from .runtime.registry import AttentionKernel, KernelNotFound, default_registry, get_kernel, get_layer_kernels


def register_transformers(name: str = "attngen") -> None:
    """Register attngen as ``attn_implementation=name`` in HuggingFace transformers."""
    from .integrations.transformers import register
    register(name)


__all__ = ["__version__", "get_kernel", "get_layer_kernels", "register_transformers",
           "default_registry", "AttentionKernel", "KernelNotFound", "InputError",
           "ArgumentError", "Mask", "MaskError", "SpecError"]
