"""L2 ops for the bottleneck adapter block (+ fakes) and its autograd Function.

    qpeft::bottleneck_adapter(Tensor x, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up,
                              str activation, float scale) -> (Tensor y, Tensor h_pre)
        x (M, H); w_down (R, H); w_up (H, R); y = x + scale * (act(x w_down^T + b_down) w_up^T + b_up) in x.dtype;
        h_pre (M, R) fp32, the pre-activation saved for the backward.
    qpeft::bottleneck_adapter_backward(Tensor dy, Tensor x, Tensor h_pre, Tensor w_down, Tensor w_up,
                                       str activation, float scale)
        -> (Tensor dx, Tensor dw_down, Tensor db_down, Tensor dw_up, Tensor db_up)

Implementations: Triton (fused, see triton_kernels/bottleneck.py) or the PyTorch reference; there is no
CUDA C++ version (cuda=False in `_backend.select`). The autograd Function is in qpeft/autograd/bottleneck.py.
"""
from __future__ import annotations

import torch
from torch.library import custom_op, register_fake

import qpeft._backend as _backend  # not `from .. import`: that would trigger qpeft.__getattr__ (index build)
from ..reference.bottleneck import (activation_id, bottleneck_adapter_backward_ref, bottleneck_adapter_ref)

__all__: list[str] = []  # ops register on import; the functional is qpeft.autograd.bottleneck.bottleneck_adapter


def _use_triton(x: torch.Tensor, w_down: torch.Tensor) -> bool:
    if _backend.select("bottleneck_adapter", x.device, cuda=False) != "triton":
        return False
    from qpeft.triton_kernels.bottleneck import MAX_BOTTLENECK

    return w_down.shape[0] <= MAX_BOTTLENECK  # larger bottlenecks: reference (register budget, see kernel)


@custom_op("qpeft::bottleneck_adapter", mutates_args=())
def _bottleneck_adapter_op(x: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None, w_up: torch.Tensor,
                           b_up: torch.Tensor | None, activation: str, scale: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(x, w_down):
        from qpeft.triton_kernels.bottleneck import bottleneck_adapter_triton

        return bottleneck_adapter_triton(x, w_down, b_down, w_up, b_up, activation_id(activation), scale)
    return bottleneck_adapter_ref(x, w_down, b_down, w_up, b_up, activation, scale)


@register_fake("qpeft::bottleneck_adapter")
def _(x, w_down, b_down, w_up, b_up, activation, scale):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D (M, H), got {x.dim()}-D")
    torch._check(w_down.dim() == 2 and w_down.shape[1] == x.shape[1],
                 lambda: f"w_down must be (R, {x.shape[1]}), got {tuple(w_down.shape)}")
    torch._check(tuple(w_up.shape) == (x.shape[1], w_down.shape[0]),
                 lambda: f"w_up must be ({x.shape[1]}, {w_down.shape[0]}), got {tuple(w_up.shape)}")
    return torch.empty_like(x), x.new_empty((x.shape[0], w_down.shape[0]), dtype=torch.float32)


@custom_op("qpeft::bottleneck_adapter_backward", mutates_args=())
def _bottleneck_adapter_backward_op(dy: torch.Tensor, x: torch.Tensor, h_pre: torch.Tensor, w_down: torch.Tensor,
                                    w_up: torch.Tensor, activation: str, scale: float
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_triton(x, w_down):
        from qpeft.triton_kernels.bottleneck import bottleneck_adapter_backward_triton

        return bottleneck_adapter_backward_triton(dy, x, h_pre, w_down, w_up, activation_id(activation), scale)
    return bottleneck_adapter_backward_ref(dy, x, h_pre, w_down, w_up, activation, scale)


@register_fake("qpeft::bottleneck_adapter_backward")
def _(dy, x, h_pre, w_down, w_up, activation, scale):
    torch._check(dy.shape == x.shape, lambda: f"dy {tuple(dy.shape)} must match x {tuple(x.shape)}")
    R, H = w_down.shape
    return (torch.empty_like(x), w_down.new_empty((R, H)), w_down.new_empty((R,)),
            w_up.new_empty((H, R)), w_up.new_empty((H,)))
