"""L2 ops of RMSNorm (`qpeft::rms_norm`, `qpeft::rms_norm_backward`): schema, fake, backend choice.

    qpeft::rms_norm(Tensor x, Tensor weight, float eps, float offset, str casting) -> (Tensor y, Tensor rstd)
        x (M, H) contiguous fp32/fp16/bf16, weight (H,) any float dtype; y (M, H) in
        reference.rmsnorm.rms_norm_out_dtype(x, weight, casting); rstd (M,) fp32 (what the backward needs)
    qpeft::rms_norm_backward(Tensor dy, Tensor x, Tensor weight, Tensor rstd, float offset, str casting)
        -> (Tensor dx (M, H) x.dtype, Tensor dw (H,) weight.dtype)
casting "llama" | "gemma"; semantics in reference/rmsnorm.py. Triton on CUDA tensors (or under the interpreter),
the reference on the CPU and for rows wider than triton_kernels.rmsnorm.MAX_HIDDEN; no CUDA C++ kernel.
"""
from __future__ import annotations

import torch
from torch.library import custom_op, register_fake

from .._backend import select as _select_backend  # not `from .. import _backend`: qpeft.__getattr__
from ..reference import rmsnorm as ref

__all__: list[str] = []  # ops are reached as torch.ops.qpeft.rms_norm*; the functional is qpeft.rms_norm

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _use_triton(x: torch.Tensor) -> bool:
    if _select_backend("rms_norm", x.device, cuda=False) != "triton":
        return False
    from qpeft.triton_kernels.rmsnorm import MAX_HIDDEN

    return x.shape[-1] <= MAX_HIDDEN


def _check(x: torch.Tensor, weight: torch.Tensor, casting: str) -> None:
    torch._check(x.dim() == 2, lambda: f"x must be 2-D (M, H), got shape {tuple(x.shape)}")
    torch._check(x.dtype in _FLOATS, lambda: f"x must be float32/float16/bfloat16, got {x.dtype}")
    torch._check(x.is_contiguous(), lambda: "x must be contiguous")
    torch._check(tuple(weight.shape) == (x.shape[1],),
                 lambda: f"weight must have shape ({x.shape[1]},), got {tuple(weight.shape)}")
    torch._check(weight.dtype in _FLOATS, lambda: f"weight must be float32/float16/bfloat16, got {weight.dtype}")
    torch._check(weight.is_contiguous(), lambda: "weight must be contiguous")
    torch._check(weight.device == x.device, lambda: f"weight is on {weight.device} but x is on {x.device}")
    torch._check(casting in ref.CASTINGS, lambda: f"casting must be one of {ref.CASTINGS}, got {casting!r}")


@custom_op("qpeft::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting: str
             ) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, weight, casting)
    if _use_triton(x):
        from qpeft.triton_kernels.rmsnorm import rms_norm_triton

        return rms_norm_triton(x, weight, eps, offset, casting == "llama",
                               ref.rms_norm_out_dtype(x.dtype, weight.dtype, casting))
    return ref.rms_norm_ref(x, weight, eps, offset, casting)


@register_fake("qpeft::rms_norm")
def _(x, weight, eps, offset, casting):
    _check(x, weight, casting)
    return (x.new_empty(x.shape, dtype=ref.rms_norm_out_dtype(x.dtype, weight.dtype, casting)),
            x.new_empty((x.shape[0],), dtype=torch.float32))


def _check_backward(dy, x, weight, rstd, casting) -> None:
    _check(x, weight, casting)
    torch._check(dy.shape == x.shape, lambda: f"dy must have x's shape {tuple(x.shape)}, got {tuple(dy.shape)}")
    torch._check(dy.is_contiguous(), lambda: "dy must be contiguous")
    torch._check(dy.dtype in _FLOATS, lambda: f"dy must be float32/float16/bfloat16, got {dy.dtype}")
    torch._check(rstd.dtype == torch.float32 and tuple(rstd.shape) == (x.shape[0],),
                 lambda: f"rstd must be float32 ({x.shape[0]},), got {rstd.dtype} {tuple(rstd.shape)}")


@custom_op("qpeft::rms_norm_backward", mutates_args=())
def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
                      casting: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_backward(dy, x, weight, rstd, casting)
    if _use_triton(x):
        from qpeft.triton_kernels.rmsnorm import rms_norm_backward_triton

        return rms_norm_backward_triton(dy, x, weight, rstd, offset, casting == "llama")
    return ref.rms_norm_backward_ref(dy, x, weight, rstd, offset, casting)


@register_fake("qpeft::rms_norm_backward")
def _(dy, x, weight, rstd, offset, casting):
    _check_backward(dy, x, weight, rstd, casting)
    return torch.empty_like(x), weight.new_empty(weight.shape)
