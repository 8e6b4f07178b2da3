"""Autograd over the bottleneck adapter ops (L3) and the public differentiable functional."""
from __future__ import annotations

import torch

from ..ops import bottleneck as _ops  # noqa: F401  (registers qpeft::bottleneck_adapter*)
from ..reference.bottleneck import activation_id

__all__ = ["bottleneck_adapter", "BottleneckAdapterFunction"]


class BottleneckAdapterFunction(torch.autograd.Function):
    """Autograd over the two L2 ops; x is 2-D contiguous (the functional below makes it so)."""

    @staticmethod
    def forward(ctx, x, w_down, b_down, w_up, b_up, activation: str, scale: float):
        y, h_pre = torch.ops.qpeft.bottleneck_adapter(x, w_down, b_down, w_up, b_up, activation, scale)
        ctx.save_for_backward(x, h_pre, w_down, w_up)
        ctx.activation, ctx.scale = activation, scale
        ctx.has_bd, ctx.has_bu = b_down is not None, b_up is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h_pre, w_down, w_up = ctx.saved_tensors
        dx, dwd, dbd, dwu, dbu = torch.ops.qpeft.bottleneck_adapter_backward(
            dy.contiguous(), x, h_pre, w_down, w_up, ctx.activation, ctx.scale)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dwd if need[1] else None, dbd if (need[2] and ctx.has_bd) else None,
                dwu if need[3] else None, dbu if (need[4] and ctx.has_bu) else None, None, None)


def bottleneck_adapter(x: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None, w_up: torch.Tensor,
                       b_up: torch.Tensor | None, activation: str = "relu", scale: float = 1.0) -> torch.Tensor:
    """Fused adapter block y = x + scale * (act(x @ w_down^T + b_down) @ w_up^T + b_up), differentiable.

    x: (..., H) fp32/fp16/bf16 (any strides: made contiguous); w_down (R, H), w_up (H, R), biases (R,)/(H,)
    or None, all in x's dtype and on x's device. Returns (..., H) in x.dtype.
    """
    activation_id(activation)  # raises ValueError naming `activation`
    H = x.shape[-1]
    if w_down.dim() != 2 or w_down.shape[1] != H:
        raise ValueError(f"w_down must be (R, {H}) for x (..., {H}), got {tuple(w_down.shape)}")
    R = w_down.shape[0]
    if tuple(w_up.shape) != (H, R):
        raise ValueError(f"w_up must be ({H}, {R}), got {tuple(w_up.shape)}")
    for name, b, n in (("b_down", b_down, R), ("b_up", b_up, H)):
        if b is not None and tuple(b.shape) != (n,):
            raise ValueError(f"{name} must be ({n},), got {tuple(b.shape)}")
    for name, t in (("w_down", w_down), ("w_up", w_up), ("b_down", b_down), ("b_up", b_up)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} dtype must equal x.dtype ({x.dtype}), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on x's device ({x.device}), got {t.device}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x dtype must be float32, float16 or bfloat16, got {x.dtype}")
    shape = x.shape
    y = BottleneckAdapterFunction.apply(x.reshape(-1, H).contiguous(), w_down.contiguous(),
                                        None if b_down is None else b_down.contiguous(), w_up.contiguous(),
                                        None if b_up is None else b_up.contiguous(), activation, float(scale))
    return y.reshape(shape)
