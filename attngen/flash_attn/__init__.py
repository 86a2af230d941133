"""``attngen.flash_attn``: FlashAttention's Python API on attngen's kernels (the implementation
lives in :mod:`attngen.integrations.flash_attn`); FlashAttention 4's is ``attngen.flash_attn.cute``,
as its own is ``flash_attn.cute``."""

from ..integrations.flash_attn import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                                      flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                                      flash_attn_varlen_qkvpacked_func, flash_attn_with_kvcache)

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
           "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
           "flash_attn_with_kvcache"]
