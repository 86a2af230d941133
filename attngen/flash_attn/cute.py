"""``attngen.flash_attn.cute``: FlashAttention 4's Python API (its ``flash_attn.cute`` module)
on attngen's kernels (the implementation lives in :mod:`attngen.integrations.flash_attn4`)."""

from ..integrations.flash_attn4 import flash_attn_combine, flash_attn_func, flash_attn_varlen_func

__all__ = ["flash_attn_combine", "flash_attn_func", "flash_attn_varlen_func"]
