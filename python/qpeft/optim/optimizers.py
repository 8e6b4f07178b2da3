"""The qpeft.optim classes: bitsandbytes' 8-bit and paged optimizers, with its constructor arguments and defaults.

Differences from bitsandbytes 0.50.2, on purpose:
- one semantics on every device: its CUDA kernel's (exact-nearest requantization with the sign fix, decoupled
  decay after the Adam step); its CPU path rounds through a 65536-bin table and decays before the step;
- a non-finite gradient (or a g*g overflowing fp32) zeroes that element's states and leaves its parameter on
  every optimizer (bitsandbytes' Lion, 32-bit and CPU paths let one Inf turn a whole block of parameters NaN);
- one multi-tensor launch per parameter group, on the current stream, no synchronize per parameter;
- paged states are real CUDA tensors in a PyTorch memory pool, freed with the optimizer, recreated (paged) by
  load_state_dict, paged from `page_min_size` elements (bitsandbytes: 1e5), with `evict()`;
- `capturable=True` (torch's name) makes step() CUDA-graph capturable: steps and lr as device tensors;
- FSDP2 (DTensor) parameters work: states on the local shard, min_8bit_size decided on the whole parameter,
  DCP's optimizer state dicts (bitsandbytes passes DTensors to its kernels, bitsandbytes #1633; _sharded.py).
As in bitsandbytes, `Adam8bit(weight_decay > 0)` decays decoupled (as AdamW), not by L2 in the gradient.
Unsupported bitsandbytes arguments raise: amsgrad=True, optim_bits other than the default, args (use param groups).
"""
from __future__ import annotations

from ._base import PAGE_MIN_SIZE, Optimizer8bitBase

__all__ = ["AdamW8bit", "Adam8bit", "Lion8bit", "PagedAdamW", "PagedAdamW8bit", "PagedLion8bit"]


def _reject_bnb_only(cls: str, amsgrad: bool = False, optim_bits: int = 32, args=None) -> None:
    if amsgrad:
        raise ValueError(f"{cls}: amsgrad=True is not supported (bitsandbytes' 8-bit Adam does not support it either)")
    if optim_bits != 32:
        raise ValueError(f"{cls}: optim_bits must be 32 (the default; bitsandbytes' {cls} accepts only that value, "
                         f"the state precision is fixed by the class), got {optim_bits}")
    if args is not None:
        raise ValueError(f"{cls}: args (bitsandbytes' argparse override) is not supported; set per-group options "
                         f"through param groups")


class _Adam(Optimizer8bitBase):
    kind = "adam"
    _bits = 8

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, is_paged=False, page_min_size=PAGE_MIN_SIZE,
                 *, capturable=False):
        _reject_bnb_only(type(self).__name__, amsgrad, optim_bits, args)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay),
                         bits=self._bits, min_8bit_size=min_8bit_size, is_paged=is_paged, page_min_size=page_min_size,
                         capturable=capturable)


class AdamW8bit(_Adam):
    """8-bit AdamW (bitsandbytes.optim.AdamW8bit): m and v as uint8 codes with one fp32 absmax per 256 elements
    for parameters of >= min_8bit_size elements, fp32 states below; 2 + 8/256 = 2.03 state bytes per parameter.

    page_min_size (qpeft only): with is_paged=True, states of parameters with at least this many elements are
    paged (default 4096). capturable (torch.optim.Adam's argument, keyword-only; bitsandbytes has none): step() can
    be captured in a CUDA graph and replayed, the step counts and the lr living on the device (see _base)."""


class Adam8bit(_Adam):
    """bitsandbytes.optim.Adam8bit: weight decay defaults to 0 and, when set, decays decoupled like AdamW."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, is_paged=False, page_min_size=PAGE_MIN_SIZE,
                 *, capturable=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size, is_paged,
                         page_min_size, capturable=capturable)


class PagedAdamW8bit(_Adam):
    """AdamW8bit with paged states (is_paged=True); on CPU it is AdamW8bit and says so once."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, page_min_size=PAGE_MIN_SIZE,
                 *, capturable=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size, True,
                         page_min_size, capturable=capturable)


class PagedAdamW(_Adam):
    """AdamW with fp32 states, paged (bitsandbytes.optim.PagedAdamW); on CPU unpaged, and says so once."""

    _bits = 32

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 optim_bits=32, args=None, min_8bit_size=4096, page_min_size=PAGE_MIN_SIZE,
                 *, capturable=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size, True,
                         page_min_size, capturable=capturable)


class Lion8bit(Optimizer8bitBase):
    """8-bit Lion (bitsandbytes.optim.Lion8bit): p = p*(1 - lr*wd) - lr*sign(b1*m + (1-b1)*g); m = b2*m + (1-b2)*g,
    m as uint8 codes (signed dynamic map, one fp32 absmax per 256 elements): 1.03 state bytes per parameter."""

    kind = "lion"

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, args=None, min_8bit_size=4096,
                 is_paged=False, page_min_size=PAGE_MIN_SIZE,
                 *, capturable=False):
        _reject_bnb_only(type(self).__name__, args=args)
        # eps is unused by Lion; bitsandbytes keeps eps=0.0 in its groups, so its loaders find the same keys
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=0.0, weight_decay=weight_decay), bits=8,
                         min_8bit_size=min_8bit_size, is_paged=is_paged, page_min_size=page_min_size,
                         capturable=capturable)


class PagedLion8bit(Lion8bit):
    """Lion8bit with paged states; on CPU it is Lion8bit and says so once."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, args=None, min_8bit_size=4096,
                 page_min_size=PAGE_MIN_SIZE,
                 *, capturable=False):
        super().__init__(params, lr, betas, weight_decay, args, min_8bit_size, True, page_min_size,
                         capturable=capturable)
