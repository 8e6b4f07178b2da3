"""L3: DoRA on a frozen dense or 4-bit base (`dora_linear`) and its weight norm (`dora_weight_norm`).

PEFT's DoRA (tuners/lora/dora.py, DoraLinearLayer.forward), with the base output `result = x W^T + bias`:

    n      = ||W + s B A||_row                 detached (DoRA paper section 4.3: a constant in backward)
    g      = m / n                             m: the learned magnitude (out_features,)
    y      = result + (g - 1) * (drop(x) W^T) + g * s * B A drop(x)

Without dropout (or in eval) drop(x) = x and this is y = g * (x W^T + s (x A^T) B^T) + bias: qpeft's fused LoRA
op (one base GEMM with the LoRA epilogue) scaled per output column, plus the bias. With dropout the base GEMM
runs twice (on x and on drop(x)), as in PEFT. The norm of a 4-bit W comes from `qpeft::dora_weight_norm`, which
streams the packed weight once and never materialises W or W + s B A; a dense W's from two small GEMMs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import dora as _dora_ops  # noqa: F401  (registers qpeft::dora_weight_norm)
from .lora import _nf4_parts, lora_linear
from .nf4_matmul import nf4_matmul_parts

__all__ = ["dora_linear", "dora_weight_norm"]


def _dense_weight(base) -> torch.Tensor | None:
    if isinstance(base, nn.Linear):
        return base.weight
    if isinstance(base, torch.Tensor):
        return base
    return None


@torch.no_grad()
def dora_weight_norm(base, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 (out_features,) = ||W + scale * B @ A|| per output row, with no gradient (DoRA detaches it).

    base: the frozen weight W (N, K): a dense tensor, an nn.Linear, a (packed, QuantState) pair or a QLinearNF4.
    A (r, K), B (N, r): any float dtype, read as fp32. A 4-bit W is never dequantized into memory."""
    A, B = A.detach(), B.detach()
    weight = _dense_weight(base)
    if weight is not None:
        if weight.dim() != 2 or tuple(A.shape) != (A.shape[0], weight.shape[1]) or B.shape != (weight.shape[0],
                                                                                               A.shape[0]):
            raise ValueError(f"dora_weight_norm: weight {tuple(weight.shape)}, A {tuple(A.shape)} and B "
                             f"{tuple(B.shape)} do not fit (W (N, K), A (r, K), B (N, r))")
        return torch.linalg.vector_norm(torch.addmm(weight.float(), B.float(), A.float(), alpha=scale), dim=1)
    parts = _nf4_parts(base)
    if parts is None:
        raise ValueError(f"dora_weight_norm: base must be a weight tensor, an nn.Linear, a (packed, QuantState) pair "
                         f"or a QLinearNF4, got {type(base).__name__}")
    packed, absmax, code, blocksize, N, K, nested_absmax, nested_code, offset = parts
    return torch.ops.qpeft.dora_weight_norm(packed.reshape(-1), absmax, code, blocksize, N, K, nested_absmax,
                                            nested_code, offset, A.contiguous(), B.contiguous(), float(scale))


def _no_bias(base):
    """The base weight alone (lora_linear adds a module's own bias when given the module)."""
    weight = _dense_weight(base)
    if weight is not None:
        return weight
    if isinstance(base, nn.Module) and hasattr(base, "quant_state"):
        return (base.weight, base.quant_state)
    return base


def _base_matmul(x: torch.Tensor, base, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ bias) in x's dtype, differentiable in x."""
    weight = _dense_weight(base)
    if weight is not None:
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    packed, absmax, code, blocksize, N, K, nested_absmax, nested_code, offset = _nf4_parts(base)
    return nf4_matmul_parts(x, packed, absmax, code, blocksize, N, K, nested_absmax, nested_code, offset, bias=bias)


def dora_linear(x: torch.Tensor, base, A: torch.Tensor, B: torch.Tensor, scale: float, magnitude: torch.Tensor,
                bias: torch.Tensor | None = None, dropout_p: float = 0.0, training: bool = False, *,
                weight_norm: torch.Tensor | None = None) -> torch.Tensor:
    """DoRA linear layer (PEFT's math; see the module docstring). Returns (..., N) in x's dtype.

    x (..., K) fp32/fp16/bf16; base as for `lora_linear` (a dense weight in x's dtype, an nn.Linear, a
    (packed, QuantState) pair or a QLinearNF4; its bias is NOT taken implicitly: pass `bias`);
    A (r, K), B (N, r), magnitude (N,): any float dtype, gradients in their dtypes (x, A, B, magnitude);
    dropout_p: on the adapter input, only when `training`; weight_norm: ||W + s B A||_row if already known
    (fp32 (N,)), else computed here."""
    if not isinstance(magnitude, torch.Tensor) or magnitude.dim() != 1:
        raise ValueError(f"dora_linear: magnitude must be a 1-D tensor (out_features,), got "
                         f"{getattr(magnitude, 'shape', type(magnitude))}")
    if weight_norm is None:
        weight_norm = dora_weight_norm(base, A, B, scale)
    if weight_norm.shape != magnitude.shape:
        raise ValueError(f"dora_linear: magnitude has shape {tuple(magnitude.shape)} but the layer has "
                         f"{weight_norm.shape[0]} output features")
    g = magnitude.float() / weight_norm.detach()  # fp32 (N,)
    if not (training and dropout_p > 0.0):
        u = lora_linear(x, _no_bias(base), A, B, scale)  # x W^T + s (x A^T) B^T, one fused call
        y = u * g  # fp32 (type promotion): u is rounded once, by its GEMM
        if bias is not None:
            y = y + bias
        return y.to(x.dtype)
    # dropout: PEFT's three terms, the base GEMM on x (with bias) and on drop(x)
    xd = F.dropout(x, dropout_p, training=True)
    base_out = _base_matmul(x, base, bias)
    t = _base_matmul(xd, base, None)
    lora = F.linear(F.linear(xd.to(A.dtype), A), B) * scale
    y = base_out + (g - 1) * t + g * lora
    return y.to(x.dtype)
