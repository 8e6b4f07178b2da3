"""Autograd for y = x @ W^T + bias with a frozen 4-bit W, and the public functional `nf4_matmul`.

The backward needs only dx = dy @ W (the same fused dequantization, transposed access) and
dbias = dy.sum(0); the 4-bit weight gets no gradient. Only the packed weight and its (tiny) statistics
are saved for backward, never a dequantized weight: for a 4096 x 14336 layer that is 30 MB instead of
117 MB in bf16.
"""
from __future__ import annotations

import torch

from ..ops import nf4_matmul as _ops  # noqa: F401  (registers torch.ops.qpeft.nf4_matmul*)
from ..reference.nf4_matmul import NESTED_BLOCKSIZE

__all__ = ["nf4_matmul", "NF4MatmulFunction"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class NF4MatmulFunction(torch.autograd.Function):
    """forward(x2d (M, K), packed, absmax, code, blocksize, N, nested_absmax, nested_code, offset, bias) -> (M, N)."""

    @staticmethod
    def forward(ctx, x2d, packed, absmax, code, blocksize, N, nested_absmax, nested_code, offset, bias):
        ctx.blocksize = blocksize
        ctx.K = x2d.shape[1]
        ctx.has_bias = bias is not None
        ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code, offset)
        return torch.ops.qpeft.nf4_matmul(x2d, packed, absmax, code, blocksize, N, nested_absmax, nested_code,
                                          offset, bias, None, None, 0.0)

    @staticmethod
    def backward(ctx, dy):
        packed, absmax, code, nested_absmax, nested_code, offset = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.qpeft.nf4_matmul_dx(dy, packed, absmax, code, ctx.blocksize, ctx.K, nested_absmax,
                                               nested_code, offset, None, None, 0.0)
        if ctx.has_bias and ctx.needs_input_grad[9]:
            dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)  # fp32 sum: M can be 16k rows
        return dx, None, None, None, None, None, None, None, None, dbias


def weight_args(packed: torch.Tensor, state) -> tuple:
    """(packed_u8, absmax, code, blocksize, N, K, nested_absmax, nested_code, offset) from a QuantState
    (qpeft's or bitsandbytes', same fields). Raises ValueError on a state the kernels cannot use."""
    if state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"state.quant_type must be 'nf4' or 'fp4', got {state.quant_type!r}")
    if len(state.shape) != 2:
        raise ValueError(f"state.shape must be 2-D (out_features, in_features), got {tuple(state.shape)}")
    N, K = int(state.shape[0]), int(state.shape[1])
    if packed.dtype != torch.uint8:  # bnb quant_storage: the same bytes viewed as another dtype
        packed = packed.view(torch.uint8)
    state2 = getattr(state, "state2", None)
    if state2 is not None:
        if state2.blocksize != NESTED_BLOCKSIZE:
            raise ValueError(f"state.state2.blocksize must be {NESTED_BLOCKSIZE}, got {state2.blocksize}")
        nested = (state2.absmax, state2.code, state.offset)
    else:
        nested = (None, None, None)
    return (packed, state.absmax, state.code, int(state.blocksize), N, K, *nested)


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, state, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T + bias, where W (N, K) is the 4-bit weight (`packed`, `state`).

    x: (..., K) float16 / bfloat16 / float32 (any strides); packed: uint8 [(N*K+1)//2, 1] (or bnb's
    quant_storage view of the same bytes); state: QuantState with shape (N, K), nf4 or fp4, optionally
    double-quantized; bias: (N,) (cast to x's dtype). Returns (..., N) in x's dtype, fp32 accumulation.
    Differentiable in x and bias.
    """
    return nf4_matmul_parts(x, *weight_args(packed, state), bias=bias)


def nf4_matmul_parts(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                     blocksize: int, N: int, K: int, nested_absmax: torch.Tensor | None = None,
                     nested_code: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """`nf4_matmul` on the decoded pieces of the weight (what QLinearNF4 holds as buffers)."""
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"x must have shape (..., {K}) to match the weight ({N}, {K}), got {tuple(x.shape)}")
    if packed.device != x.device:
        raise ValueError(f"x is on {x.device} but the weight is on {packed.device}")
    if bias is not None:
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
        bias = bias.to(x.dtype)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, K).contiguous()
    y = NF4MatmulFunction.apply(x2d, packed.contiguous(), absmax, code, blocksize, N, nested_absmax, nested_code,
                                offset, bias)
    return y.reshape(*lead, N)
