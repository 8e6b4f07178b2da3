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

__all__ = ["dora_linear", "dora_delta", "dora_weight_norm", "adapters_in_peft_order"]


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
        N, K = weight.shape if weight.dim() == 2 else (-1, -1)
        if A.dim() != 2 or A.shape[1] != K or B.dim() != 2 or tuple(B.shape) != (N, A.shape[0]):
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


def _gain(magnitude: torch.Tensor, weight_norm: torch.Tensor) -> torch.Tensor:
    if not isinstance(magnitude, torch.Tensor) or magnitude.dim() != 1:
        raise ValueError(f"dora: magnitude must be a 1-D tensor (out_features,), got "
                         f"{getattr(magnitude, 'shape', type(magnitude))}")
    if weight_norm.shape != magnitude.shape:
        raise ValueError(f"dora: magnitude has shape {tuple(magnitude.shape)} but the layer has "
                         f"{weight_norm.shape[0]} output features")
    return magnitude.float() / weight_norm.detach()  # fp32 (N,)


def dora_delta(result: torch.Tensor, x: torch.Tensor, base, A: torch.Tensor, B: torch.Tensor, scale: float,
               magnitude: torch.Tensor, bias: torch.Tensor | None = None, dropout_p: float = 0.0,
               training: bool = False, *, weight_norm: torch.Tensor | None = None) -> torch.Tensor:
    """What PEFT's DoraLinearLayer.forward adds to `result` (the layer's output so far: the base output with its
    bias, plus any adapter applied before this one), step by step as PEFT computes it:
    (g - 1) * base_result + g * s * B A drop(x), base_result = result - bias without dropout (PEFT reuses the
    running result there), drop(x) W^T with it. For several active adapters in PEFT's order; one DoRA adapter
    alone is `dora_linear` (fused). x in the adapters' dtype, as PEFT casts it; returns fp32 or x's dtype."""
    if weight_norm is None:
        weight_norm = dora_weight_norm(base, A, B, scale)
    g = _gain(magnitude, weight_norm)
    if training and dropout_p > 0.0:
        x = F.dropout(x, dropout_p, training=True)
        base_result = _base_matmul(x, base, None)
    else:
        base_result = result if bias is None else result - bias
    lora = F.linear(F.linear(x.to(A.dtype), A), B)
    return (g - 1) * base_result + g * lora * scale


def dora_linear(x: torch.Tensor, base, A: torch.Tensor, B: torch.Tensor, scale: float, magnitude: torch.Tensor,
                bias: torch.Tensor | None = None, dropout_p: float = 0.0, training: bool = False, *,
                weight_norm: torch.Tensor | None = None) -> torch.Tensor:
    """DoRA linear layer (PEFT's math; see the module docstring). Returns (..., N) in x's dtype.

    x (..., K) fp32/fp16/bf16; base as for `lora_linear` (a dense weight in x's dtype, an nn.Linear, a
    (packed, QuantState) pair or a QLinearNF4; its bias is NOT taken implicitly: pass `bias`);
    A (r, K), B (N, r), magnitude (N,): any float dtype, gradients in their dtypes (x, A, B, magnitude);
    dropout_p: on the adapter input, only when `training`; weight_norm: ||W + s B A||_row if already known
    (fp32 (N,)), else computed here."""
    if weight_norm is None:
        weight_norm = dora_weight_norm(base, A, B, scale)
    g = _gain(magnitude, weight_norm)
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


def adapters_in_peft_order(result: torch.Tensor, x: torch.Tensor, base, bias: torch.Tensor | None, adapters,
                           training: bool) -> torch.Tensor:
    """Several active adapters on one layer, at least one of them DoRA: PEFT's LoRA forward step by step. `result`
    is the base output (with `bias`); each adapter (A, B, scale, dropout_p, magnitude or None, lora_bias or None)
    is applied in order on x cast to its dtype: plain LoRA adds scale * (B A drop(x) + lora_bias), DoRA adds
    `dora_delta` of the running result (so it rescales the earlier adapters' terms too, as PEFT does). Each
    step's sum is kept in result's dtype, as PEFT casts it back."""
    for A, B, scale, p, magnitude, lora_bias in adapters:
        xa = x.to(A.dtype)
        if magnitude is not None:
            delta = dora_delta(result, xa, base, A, B, scale, magnitude, bias=bias, dropout_p=p, training=training)
        else:
            delta = F.linear(F.linear(F.dropout(xa, p, training=training), A), B, lora_bias) * scale
        result = (result + delta).to(result.dtype)
    return result
