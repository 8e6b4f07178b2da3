"""L3: `GLUFunction` over `qpeft::glu*` and the public functionals `swiglu`, `geglu`, `glu_activation`.

The gated MLP of Llama / Mistral / Qwen2 / Qwen3 (SwiGLU, `act_fn = ACT2FN["silu"]`) and Gemma 2 / 3 (GeGLU,
`ACT2FN["gelu_pytorch_tanh"]`) computes  down_proj(act_fn(gate_proj(x)) * up_proj(x)); the middle part is
    glu_activation(gate_proj(x), up_proj(x), config.hidden_act)       # or swiglu(g, u) / geglu(g, u, "tanh")
Saved for backward: gate and up only (act(gate) is recomputed in the backward kernel). Eager saves gate, up and
act(gate): I values per token fewer here (bf16, Llama-3-8B: 28 KiB per token per layer).
"""
from __future__ import annotations

import torch

from ..ops import swiglu as _ops  # noqa: F401  (registers qpeft::glu*)
from ..reference.swiglu import glu_activation_name

__all__ = ["swiglu", "geglu", "glu_activation", "GLUFunction"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class GLUFunction(torch.autograd.Function):
    """forward(gate, up (contiguous, one shape and dtype), activation canonical name) -> act(gate) * up."""

    @staticmethod
    def forward(ctx, gate, up, activation: str):
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return torch.ops.qpeft.glu(gate, up, activation)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dg, du = torch.ops.qpeft.glu_backward(dh.contiguous(), gate, up, ctx.activation)
        return dg if ctx.needs_input_grad[0] else None, du if ctx.needs_input_grad[1] else None, None


def glu_activation(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """act(gate) * up, fused forward and backward.

    gate, up: tensors of one shape and dtype (float32/float16/bfloat16), on one device, any strides.
    activation: an HF activation name: "silu" / "swish" (SwiGLU), "gelu_pytorch_tanh" / "gelu_tanh" (GeGLU, tanh
        approximation, Gemma), "gelu" (GeGLU, exact erf). Anything else raises ValueError.
    Returns act(gate) * up in gate's dtype, differentiable in gate and up.
    """
    name = glu_activation_name(activation)
    for n, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOATS:
            raise TypeError(f"{n} must be a float32/float16/bfloat16 tensor, got {getattr(t, 'dtype', type(t))}")
    if up.shape != gate.shape:
        raise ValueError(f"up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    if up.dtype != gate.dtype:
        raise TypeError(f"up must have gate's dtype {gate.dtype}, got {up.dtype}")
    if up.device != gate.device:
        raise ValueError(f"up is on {up.device} but gate is on {gate.device}")
    return GLUFunction.apply(gate.contiguous(), up.contiguous(), name)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (Llama, Mistral, Qwen2, Qwen3 MLPs); see `glu_activation`."""
    return glu_activation(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(gate) * up: approximate="tanh" as F.gelu (Gemma's gelu_pytorch_tanh) or "none" (exact erf)."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', got {approximate!r}")
    return glu_activation(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu")
