"""L2 ops of the gated MLP activations (stem `swiglu`: SwiGLU and both GeGLUs): schema, fake, backend choice.

    qpeft::glu(Tensor gate, Tensor up, str activation) -> Tensor h             h = act(gate) * up, gate's dtype
    qpeft::glu_backward(Tensor dh, Tensor gate, Tensor up, str activation) -> (Tensor dgate, Tensor dup)
gate, up, dh: contiguous, one shape (any rank), float32/float16/bfloat16; gate and up of one dtype.
activation: "silu" | "gelu_tanh" | "gelu" (canonical names; the functional maps HF's names onto them).
Semantics in reference/swiglu.py. Triton on CUDA tensors (or under the interpreter), else the reference.
"""
from __future__ import annotations

import torch
from torch.library import custom_op, register_fake

from .._backend import select as _select_backend  # not `from .. import _backend`: qpeft.__getattr__
from ..reference import swiglu as ref

__all__: list[str] = []  # ops are reached as torch.ops.qpeft.glu*; the functionals are qpeft.swiglu / geglu

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check(gate: torch.Tensor, up: torch.Tensor, activation: str) -> None:
    torch._check(activation in ref.CANONICAL, lambda: f"activation must be one of {ref.CANONICAL}, got {activation!r}")
    torch._check(gate.dtype in _FLOATS, lambda: f"gate must be float32/float16/bfloat16, got {gate.dtype}")
    torch._check(up.dtype == gate.dtype, lambda: f"up must have gate's dtype {gate.dtype}, got {up.dtype}")
    torch._check(up.shape == gate.shape,
                 lambda: f"up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    torch._check(up.device == gate.device, lambda: f"up is on {up.device} but gate is on {gate.device}")
    torch._check(gate.is_contiguous() and up.is_contiguous(), lambda: "gate and up must be contiguous")


def _triton(t: torch.Tensor) -> bool:
    return _select_backend("glu", t.device, cuda=False) == "triton"


@custom_op("qpeft::glu", mutates_args=())
def glu(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    _check(gate, up, activation)
    if _triton(gate):
        from qpeft.triton_kernels.swiglu import glu_triton

        return glu_triton(gate, up, activation)
    return ref.glu_ref(gate, up, activation)


@register_fake("qpeft::glu")
def _(gate, up, activation):
    _check(gate, up, activation)
    return torch.empty_like(gate)


def _check_backward(dh, gate, up, activation) -> None:
    _check(gate, up, activation)
    torch._check(dh.shape == gate.shape,
                 lambda: f"dh must have gate's shape {tuple(gate.shape)}, got {tuple(dh.shape)}")
    torch._check(dh.dtype in _FLOATS, lambda: f"dh must be float32/float16/bfloat16, got {dh.dtype}")
    torch._check(dh.is_contiguous(), lambda: "dh must be contiguous")
    torch._check(dh.device == gate.device, lambda: f"dh is on {dh.device} but gate is on {gate.device}")


@custom_op("qpeft::glu_backward", mutates_args=())
def glu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    _check_backward(dh, gate, up, activation)
    if _triton(gate):
        from qpeft.triton_kernels.swiglu import glu_backward_triton

        return glu_backward_triton(dh, gate, up, activation)
    return ref.glu_backward_ref(dh, gate, up, activation)


@register_fake("qpeft::glu_backward")
def _(dh, gate, up, activation):
    _check_backward(dh, gate, up, activation)
    return torch.empty_like(gate), torch.empty_like(up)
