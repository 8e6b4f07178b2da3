"""Gated activations (SwiGLU, GeGLU tanh / erf) in Triton, forward and backward (semantics:
qpeft/reference/swiglu.py).

Elementwise over the (M, I) gate/up pair, flattened: the forward reads gate and up once and writes h (eager:
act(gate) is written and read back, 5 passes of M x I instead of 3); the backward recomputes act(gate) from
gate instead of loading a stored copy, and writes dgate and dup in one pass (eager: 4 kernels). fp32 math,
one rounding per output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["glu_triton", "glu_backward_triton", "ACTIVATION_IDS"]

ACTIVATION_IDS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
_BLOCK = 2048  # elements per program: 16 per thread at 4 warps

# tl.constexpr: Triton 3.6 refuses plain Python globals inside @triton.jit functions; keep them right of a
# tensor (in the Triton 3.9 interpreter constexpr * tensor wraps the tensor in a constexpr)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _tanh(x):
    # tl has no tanh on every backend (the interpreter included); tanh(x) = 2 sigmoid(2x) - 1
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr, GRAD: tl.constexpr):
    """(act(g), act'(g) if GRAD else act(g))."""
    if ACT == 0:
        s = tl.sigmoid(g)
        a = g * s
        d = a
        if GRAD:
            d = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        t = _tanh((g + 0.044715 * g * g * g) * _SQRT_2_OVER_PI)
        a = 0.5 * g * (1.0 + t)
        d = a
        if GRAD:
            d = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * (1.0 + 3.0 * 0.044715 * g * g) * _SQRT_2_OVER_PI
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(g * _INV_SQRT_2))
        a = g * cdf
        d = a
        if GRAD:
            d = cdf + g * tl.exp(-0.5 * g * g) * _INV_SQRT_2PI
    return a, d


@triton.jit
def _glu_fwd_kernel(g_ptr, u_ptr, h_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT, False)
    tl.store(h_ptr + offs, (a * u).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, d = _act_and_grad(g, ACT, True)
    tl.store(dg_ptr + offs, (dh * u * d).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dh * a).to(du_ptr.dtype.element_ty), mask=mask)


def _check(*tensors: torch.Tensor) -> None:
    shape = tensors[0].shape
    for t in tensors:
        if t.shape != shape or not t.is_contiguous():
            raise ValueError(f"gate, up (and dh) must be contiguous tensors of one shape, got {tuple(t.shape)}")


def glu_triton(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """h = act(gate) * up in gate's dtype."""
    _check(gate, up)
    h = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _glu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, h, n, ACT=ACTIVATION_IDS[activation], BLOCK=_BLOCK,
                                                   num_warps=4)
    return h


def glu_backward_triton(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: str
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) in gate's / up's dtypes."""
    _check(dh, gate, up)
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _glu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dh, gate, up, dg, du, n, ACT=ACTIVATION_IDS[activation],
                                                   BLOCK=_BLOCK, num_warps=4)
    return dg, du
