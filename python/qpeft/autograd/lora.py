"""L3: `LoraFunction` (fused LoRA forward/backward over the `qpeft::` ops) and the public `lora_linear`.

    y = x W^T + bias + scale * (dropout(x) A^T) B^T        x (..., K), W (N, K), A (r, K), B (N, r)

Forward: xa = drop(x) A^T (one small pass over x, fp32 (M, r)), then the base GEMM (dense: qpeft::lora_linear;
NF4: qpeft::nf4_matmul) adds scale * xa B^T in its epilogue, so the adapter costs no extra pass over y.
Backward (fp32 accumulation, nothing N x K or M x N beyond dy and dx):
    dyb = dy B (M, r);  dA = scale dyb^T drop(x);  dB = scale dy^T xa          (qpeft::lora_grad)
    dx  = dy W + scale drop'(dyb A)        (dense: qpeft::lora_linear_dx; NF4: qpeft::nf4_matmul_dx with
                                            the LoRA epilogue, or + qpeft::lora_masked_dx under dropout)
Saved for backward: x, xa (M x r), A, B, the base weight as given (packed 4-bit for NF4, never a dequantized
copy) and the int64 dropout seed, from which backward regenerates the mask (reference.lora explains the hash).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops import lora as _lora_ops  # noqa: F401  (registers qpeft::lora_*)
from ..ops import nf4_matmul  # noqa: F401  (registers qpeft::nf4_matmul*)
from .nf4_matmul import weight_args

__all__ = ["lora_linear", "LoraFunction"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _nf4_ops():
    return torch.ops.qpeft


class LoraFunction(torch.autograd.Function):
    """Fused LoRA linear. Dense base: `weight` given, NF4 fields None; NF4 base: `weight` None and
    (packed, absmax, code, blocksize, nested_absmax, nested_code, offset, N) describe W (N, K).
    x2d (M, K) contiguous; A (r, K), B (N, r) contiguous; seed int64 (1,) or None (no dropout)."""

    @staticmethod
    def forward(ctx, x2d, A, B, bias, weight, packed, absmax, code, nested_absmax, nested_code, offset, seed,
                blocksize, N, scale, dropout_p):
        ops = torch.ops.qpeft
        p = dropout_p if seed is not None else 0.0
        xa = ops.lora_xa(x2d, A, seed, p)
        if weight is not None:
            y = ops.lora_linear(x2d, weight, bias, xa, B, scale)
        else:
            dt = x2d.dtype  # the NF4 op takes its epilogue operands in the activation dtype
            y = _nf4_ops().nf4_matmul(x2d, packed, absmax, code, blocksize, N, nested_absmax, nested_code, offset,
                                      bias, xa.to(dt), B.to(dt).contiguous(), scale)
        ctx.save_for_backward(x2d, xa, A, B, weight, packed, absmax, code, nested_absmax, nested_code, offset, seed)
        ctx.blocksize, ctx.scale, ctx.dropout_p = blocksize, scale, p
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, xa, A, B, weight, packed, absmax, code, nested_absmax, nested_code, offset, seed = ctx.saved_tensors
        need_x, need_A, need_B, need_bias = ctx.needs_input_grad[:4]
        ops = torch.ops.qpeft
        scale, p = ctx.scale, ctx.dropout_p
        dy = dy.contiguous()
        if need_A or need_B:
            dyb, dA, dB = ops.lora_grad(dy, x2d, xa, B, scale, seed, p)
        else:  # frozen adapter: only dyb = dy B (M, r) for dx, via the rank-r pass with B^T as "A"
            dyb, dA, dB = ops.lora_xa(dy, B.t().contiguous(), None, 0.0), None, None
        dx = None
        if need_x:
            if weight is not None:
                dx = ops.lora_linear_dx(dy, weight, dyb, A, scale, seed, p)
            elif p == 0.0:
                dt = dy.dtype
                dx = _nf4_ops().nf4_matmul_dx(dy, packed, absmax, code, ctx.blocksize, x2d.shape[1], nested_absmax,
                                              nested_code, offset, dyb.to(dt), A.to(dt).contiguous(), scale)
            else:  # the NF4 epilogue cannot apply the dropout mask: add the masked LoRA term in a second pass
                dx = _nf4_ops().nf4_matmul_dx(dy, packed, absmax, code, ctx.blocksize, x2d.shape[1], nested_absmax,
                                              nested_code, offset, None, None, 0.0)
                dx = ops.lora_masked_dx(dx, dyb, A, scale, seed, p)
        dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype) if (ctx.has_bias and need_bias) else None
        return (dx, dA.to(A.dtype) if need_A and dA is not None else None,
                dB.to(B.dtype) if need_B and dB is not None else None, dbias,
                None, None, None, None, None, None, None, None, None, None, None, None)


def _nf4_parts(base):
    """(packed, absmax, code, blocksize, N, K, nested_absmax, nested_code, offset) of an NF4 base, or None."""
    if isinstance(base, (tuple, list)):
        if len(base) != 2:
            raise ValueError(f"lora_linear: an NF4 base must be a (packed, QuantState) pair, got {len(base)} items")
        packed, state = base
    elif isinstance(base, nn.Module) and hasattr(base, "quant_map"):  # QLinearNF4: its buffers directly
        packed = base.weight if base.weight.dtype == torch.uint8 else base.weight.view(torch.uint8)
        return (packed.contiguous(), base.absmax, base.quant_map, int(base.blocksize), int(base.out_features),
                int(base.in_features), base.nested_absmax, base.nested_quant_map, base.offset)
    elif hasattr(base, "quant_state"):
        state = base.quant_state
        packed = base.weight
    else:
        return None
    packed, *rest = weight_args(packed, state)
    return (packed.contiguous(), *rest)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"lora_linear: {msg}")


def lora_linear(x: torch.Tensor, base, A: torch.Tensor, B: torch.Tensor, scale: float,
                bias: torch.Tensor | None = None, dropout_p: float = 0.0, training: bool = False, *,
                seed: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + bias + scale * (dropout(x) A^T) B^T, fused (see the module docstring).

    x: (..., K) fp32/fp16/bf16 (any strides; made contiguous).
    base: the frozen weight W (N, K), one of
        - a dense tensor (N, K) in x's dtype;
        - an `nn.Linear` (its weight; its bias too when `bias` is None);
        - an NF4/FP4 weight: a `(packed, QuantState)` pair or a module with `quant_state` (QLinearNF4),
          whose bias is used when `bias` is None.
    A: (r, K), B: (N, r): any float dtype (PEFT keeps them fp32); gradients come back in their dtypes.
    dropout_p: dropout on the LoRA branch input, applied only when `training`; a fresh int64 seed is drawn
        from torch's generator per call (so torch.manual_seed and checkpoint recomputation reproduce it),
        unless `seed` (an int64 tensor of one element, on x's device) is given.
    Returns (..., N) in x's dtype.
    """
    _check(isinstance(x, torch.Tensor) and x.dtype in _FLOATS,
           f"x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x))}")
    _check(x.dim() >= 1, "x must have at least one dimension")
    K = x.shape[-1]
    weight = None
    nf4 = None
    if isinstance(base, nn.Linear):
        weight = base.weight
        bias = base.bias if bias is None else bias
    elif isinstance(base, torch.Tensor):
        weight = base
    else:
        nf4 = _nf4_parts(base)
        _check(nf4 is not None, f"base must be a weight tensor, an nn.Linear, a (packed, QuantState) pair or a "
                                f"QLinearNF4, got {type(base).__name__}")
        if bias is None and isinstance(base, nn.Module):
            bias = getattr(base, "bias", None)
    if weight is not None:
        _check(not (weight.requires_grad and torch.is_grad_enabled()),
               "the base weight must be frozen (requires_grad=False): LoRA computes no gradient for it")
        _check(weight.dim() == 2, f"weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
        _check(weight.dtype == x.dtype, f"weight dtype {weight.dtype} must equal x dtype {x.dtype}")
        N, wK = weight.shape
    else:
        N, wK = nf4[4], nf4[5]
    _check(wK == K, f"x has {K} features but the base weight has shape ({N}, {wK}) (expected K = {K})")
    _check(A.dim() == 2 and A.shape[1] == K, f"A must have shape (r, {K}), got {tuple(A.shape)}")
    r = A.shape[0]
    _check(r >= 1, f"A must have at least one row (rank r >= 1), got shape {tuple(A.shape)}")
    _check(B.dim() == 2 and tuple(B.shape) == (N, r), f"B must have shape ({N}, {r}), got {tuple(B.shape)}")
    _check(A.dtype in _FLOATS and B.dtype in _FLOATS, f"A and B must be float tensors, got {A.dtype}, {B.dtype}")
    _check(A.device == x.device and B.device == x.device,
           f"A ({A.device}) and B ({B.device}) must be on x's device {x.device}")
    _check(0.0 <= float(dropout_p) < 1.0, f"dropout_p must be in [0, 1), got {dropout_p}")
    _check(math.isfinite(float(scale)), f"scale must be finite, got {scale}")
    if bias is not None:
        _check(tuple(bias.shape) == (N,), f"bias must have shape ({N},), got {tuple(bias.shape)}")
        bias = bias.to(x.dtype)
    x2d = x.reshape(-1, K).contiguous()
    if not (training and dropout_p > 0.0):
        seed = None
    elif seed is None:
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int64)
    else:
        _check(isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.numel() == 1,
               f"seed must be a 1-element int64 tensor, got {getattr(seed, 'dtype', type(seed))}")
        seed = seed.reshape(1).to(x.device)
    A, B = A.contiguous(), B.contiguous()
    if weight is not None:
        y = LoraFunction.apply(x2d, A, B, bias, weight.contiguous(), None, None, None, None, None, None, seed,
                               0, N, float(scale), float(dropout_p))
    else:
        packed, absmax, code, blocksize, _, _, nested_absmax, nested_code, offset = nf4
        y = LoraFunction.apply(x2d, A, B, bias, None, packed, absmax, code, nested_absmax, nested_code, offset,
                               seed, blocksize, N, float(scale), float(dropout_p))
    return y.reshape(*x.shape[:-1], N)
