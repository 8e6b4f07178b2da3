"""qpeft.optim: 8-bit and paged optimizers, drop-in for bitsandbytes.optim's (same arguments, defaults and
state_dict layout), with one fused multi-tensor update (torch.ops.qpeft.optim_8bit_step) on every backend.

    AdamW8bit, Adam8bit, Lion8bit       8-bit states (uint8 codes + one fp32 absmax per 256 elements)
    PagedAdamW8bit, PagedLion8bit       the same, states paged between GPU and host memory
    PagedAdamW                          fp32 states, paged
On CPU the paged classes are their unpaged twins (they say so once). See optimizers.py for the differences
from bitsandbytes and reference/optim_8bit.py for the exact update.
"""
from .optimizers import Adam8bit, AdamW8bit, Lion8bit, PagedAdamW, PagedAdamW8bit, PagedLion8bit

__all__ = ["AdamW8bit", "Adam8bit", "Lion8bit", "PagedAdamW", "PagedAdamW8bit", "PagedLion8bit"]
