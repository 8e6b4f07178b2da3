"""Pure-PyTorch gated activations of the LLaMA-style MLP: the CPU path, the fallback and the oracle of the Triton
kernel.

    h = act(gate) * up            gate, up (M, I) from gate_proj / up_proj; h feeds down_proj
    activation "silu"       SwiGLU: act(g) = g sigmoid(g)                        (ACT2FN["silu"] / ["swish"])
               "gelu_tanh"  GeGLU:  act(g) = g/2 (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))
                                                                              (ACT2FN["gelu_pytorch_tanh"], Gemma)
               "gelu"       GeGLU:  act(g) = g/2 (1 + erf(g / sqrt(2)))      (ACT2FN["gelu"], exact erf)
    backward: dgate = dh * up * act'(gate);  dup = dh * act(gate)   (act(gate) recomputed, never stored)
Math in fp32 (fp64 inputs stay fp64), rounded once to gate's dtype (eager rounds act(g) and then the product).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["GLU_ACTIVATIONS", "CANONICAL", "glu_activation_name", "glu_ref", "glu_backward_ref", "act_ref",
           "act_grad_ref"]

# HF activation names (config.hidden_act / hidden_activation) -> the op's canonical name
GLU_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
                   "gelu": "gelu"}
CANONICAL = ("silu", "gelu_tanh", "gelu")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def glu_activation_name(activation: str) -> str:
    """The canonical name of an HF activation name; ValueError naming `activation` for any other."""
    try:
        return GLU_ACTIVATIONS[activation]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be one of {sorted(GLU_ACTIVATIONS)}, got {activation!r}") from None


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def act_ref(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(g)
    if activation == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    return F.gelu(g)


def act_grad_ref(g: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(g) / dg, elementwise (the formulas of the Triton kernel)."""
    if activation == "silu":
        s = torch.sigmoid(g)
        return s * (1 + g * (1 - s))
    if activation == "gelu_tanh":
        inner = _SQRT_2_OVER_PI * (g + 0.044715 * g ** 3)
        t = torch.tanh(inner)
        return 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * g * g)
    return 0.5 * (1 + torch.erf(g / math.sqrt(2.0))) + g * torch.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)


def glu_ref(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    acc = _acc(gate)
    return (act_ref(gate.to(acc), activation) * up.to(acc)).to(gate.dtype)


def glu_backward_ref(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) in gate's / up's dtype."""
    acc = _acc(gate)
    g, u, d = gate.to(acc), up.to(acc), dh.to(acc)
    dgate = d * u * act_grad_ref(g, activation)
    dup = d * act_ref(g, activation)
    return dgate.to(gate.dtype), dup.to(up.dtype)
