"""Pure-PyTorch bottleneck adapter block: the CPU path, the fallback and the oracle for the fused kernel.

    h = x @ w_down^T + b_down          (M, R)   pre-activation, kept in fp32 for the backward
    y = x + scale * (act(h) @ w_up^T + b_up)   (M, H)

x: (M, H) row-major, w_down (R, H), w_up (H, R), biases (R,) / (H,) or None, all in x's dtype.
Everything is computed in fp32 and rounded to x's dtype once at the end (the fused kernel accumulates
in fp32 too), so the reference is the fp32 math on the given inputs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "activation_id", "activation_ref", "activation_grad_ref",
           "bottleneck_adapter_ref", "bottleneck_adapter_backward_ref"]

# Name -> id shared with the Triton kernel (a constexpr there). AdapterHub spells SiLU "swish".
ACTIVATIONS = {"identity": 0, "linear": 0, "relu": 1, "swish": 2, "silu": 2, "gelu": 3,
               "gelu_new": 4, "gelu_tanh": 4, "tanh": 5}

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def activation_id(name: str) -> int:
    try:
        return ACTIVATIONS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None


def activation_ref(h: torch.Tensor, activation: str) -> torch.Tensor:
    a = activation_id(activation)
    if a == 0:
        return h
    if a == 1:
        return torch.relu(h)
    if a == 2:
        return F.silu(h)
    if a == 3:
        return F.gelu(h)
    if a == 4:
        return F.gelu(h, approximate="tanh")
    return torch.tanh(h)


def activation_grad_ref(h: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(h) / dh, elementwise (same formulas as the Triton kernel)."""
    a = activation_id(activation)
    if a == 0:
        return torch.ones_like(h)
    if a == 1:
        return (h > 0).to(h.dtype)
    if a == 2:
        s = torch.sigmoid(h)
        return s * (1 + h * (1 - s))
    if a == 3:
        cdf = 0.5 * (1 + torch.erf(h / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)
        return cdf + h * pdf
    if a == 4:
        t = torch.tanh(_SQRT_2_OVER_PI * (h + 0.044715 * h ** 3))
        return 0.5 * (1 + t) + 0.5 * h * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * h * h)
    t = torch.tanh(h)
    return 1 - t * t


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # fp32 for fp16/bf16/fp32 inputs; fp64 inputs stay fp64 (tests use that as the high-precision oracle).
    return torch.promote_types(x.dtype, torch.float32)


def bottleneck_adapter_ref(x: torch.Tensor, w_down: torch.Tensor, b_down: torch.Tensor | None,
                           w_up: torch.Tensor, b_up: torch.Tensor | None, activation: str,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (M, H) in x.dtype, h_pre (M, R) fp32 (fp64 for fp64 x)) for x (M, H)."""
    ct = _compute_dtype(x)
    x32 = x.to(ct)
    h = F.linear(x32, w_down.to(ct), None if b_down is None else b_down.to(ct))
    up = F.linear(activation_ref(h, activation), w_up.to(ct), None if b_up is None else b_up.to(ct))
    return (x32 + scale * up).to(x.dtype), h


def bottleneck_adapter_backward_ref(dy: torch.Tensor, x: torch.Tensor, h_pre: torch.Tensor, w_down: torch.Tensor,
                                    w_up: torch.Tensor, activation: str, scale: float):
    """(dx, dw_down, db_down, dw_up, db_up) for the block above; h_pre is the fp32 pre-activation.

    dx = dy + (scale * dy @ w_up * act'(h)) @ w_down; weight grads are the usual outer products.
    """
    ct = _compute_dtype(x)
    dy32, x32, h_pre = dy.to(ct), x.to(ct), h_pre.to(ct)
    a = activation_ref(h_pre, activation)
    da = scale * (dy32 @ w_up.to(ct))                        # (M, R)
    dh = da * activation_grad_ref(h_pre, activation)         # (M, R)
    dx = dy32 + dh @ w_down.to(ct)                           # (M, H)
    dw_up = scale * (dy32.t() @ a)                           # (H, R)
    db_up = scale * dy32.sum(0)                              # (H,)
    dw_down = dh.t() @ x32                                   # (R, H)
    db_down = dh.sum(0)                                      # (R,)
    wdt = w_down.dtype
    return dx.to(x.dtype), dw_down.to(wdt), db_down.to(wdt), dw_up.to(w_up.dtype), db_up.to(w_up.dtype)
