"""``attngen.flash_attn_interface``: FlashAttention 3's Python API (its ``flash_attn_interface``
module) on attngen's kernels (the implementation lives in
:mod:`attngen.integrations.flash_attn3`)."""

from .integrations.flash_attn3 import (flash_attn_combine, flash_attn_func, flash_attn_qkvpacked_func,
                                       flash_attn_varlen_func, flash_attn_with_kvcache, get_scheduler_metadata)

__all__ = ["flash_attn_combine", "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_with_kvcache", "get_scheduler_metadata"]
