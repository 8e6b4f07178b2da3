"""L3: `RMSNormFunction` over `qpeft::rms_norm*` and the public functional `rms_norm`.

Matches the RMSNorm modules of transformers exactly in its upcast order (reference/rmsnorm.py has the math):
    LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm (also q_norm / k_norm over the head dim):
        rms_norm(x, module.weight, module.variance_epsilon)                       # offset 0, casting "llama"
    GemmaRMSNorm, Gemma2RMSNorm, Gemma3RMSNorm (weights stored as w with the scale 1 + w):
        rms_norm(x, module.weight, module.eps, offset=1.0, casting="gemma")
Saved for backward: x as given (no fp32 copy), the weight and rstd (4 bytes per row). The eager modules save an
fp32 copy of x plus the normalised x (Llama: in x's dtype, Gemma: in fp32): per element of a bf16 x that is 6
(Llama) or 8 (Gemma) bytes against our 2 (tests/ops/test_rmsnorm.py::test_saved_bytes_vs_eager counts them).
"""
from __future__ import annotations

import math

import torch

from ..ops import rmsnorm as _ops  # noqa: F401  (registers qpeft::rms_norm*)
from ..reference.rmsnorm import CASTINGS

__all__ = ["rms_norm", "RMSNormFunction"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class RMSNormFunction(torch.autograd.Function):
    """forward(x2d (M, H) contiguous, weight (H,), eps, offset, casting) -> y (M, H)."""

    @staticmethod
    def forward(ctx, x2d, weight, eps: float, offset: float, casting: str):
        y, rstd = torch.ops.qpeft.rms_norm(x2d, weight, eps, offset, casting)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.offset, ctx.casting = offset, casting
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        dx, dw = torch.ops.qpeft.rms_norm_backward(dy.contiguous(), x2d, weight, rstd, ctx.offset, ctx.casting)
        need_x, need_w = ctx.needs_input_grad[:2]
        return dx if need_x else None, dw if need_w else None, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0,
             casting: str = "llama") -> torch.Tensor:
    """RMSNorm over the last dimension, fused forward and backward (one Triton kernel each on a GPU).

    x: (..., H) float32/float16/bfloat16, any strides (made contiguous). weight: (H,) float, on x's device.
    eps: added to the mean square (HF: `variance_epsilon` / `eps`). offset: the scale is offset + weight
    (Gemma: 1.0). casting: "llama" (round the normalised x to x.dtype, then multiply by the weight in torch's
    promoted dtype) or "gemma" (multiply in fp32, round once to x.dtype); see the module docstring for which
    transformers class is which. Returns (..., H), differentiable in x and weight.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS:
        raise TypeError(f"x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalised one)")
    H = x.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.dtype not in _FLOATS:
        raise TypeError(f"weight must be a float32/float16/bfloat16 tensor, got "
                        f"{getattr(weight, 'dtype', type(weight))}")
    if tuple(weight.shape) != (H,):
        raise ValueError(f"weight must have shape ({H},) for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if not (isinstance(offset, (int, float)) and math.isfinite(offset)):
        raise ValueError(f"offset must be a finite float, got {offset!r}")
    if casting not in CASTINGS:
        raise ValueError(f"casting must be one of {CASTINGS}, got {casting!r}")
    y = RMSNormFunction.apply(x.reshape(-1, H).contiguous(), weight.contiguous(), float(eps), float(offset), casting)
    return y.reshape(x.shape)
