"""Pure-PyTorch reference of the fused LoRA op family (CPU path, fallback and test oracle).

Shapes (all 2-D, row-major): x (M, K), W (N, K), A (r, K), B (N, r), dy (M, N).
LoRA with dropout on the adapter branch:   y = x W^T + bias + scale * (drop(x) A^T) B^T

Dropout mask: a counter-based hash of (seed, element index) rather than torch's RNG, so that the
reference, the Triton kernels and backward regenerate the very same mask from one saved int64 seed
tensor (nothing M x K is stored between forward and backward). Element (m, k) of x, with linear index
i = m * K + k taken mod 2**32, is kept iff  hash32(i ^ mix(seed)) >> 8  >=  round(p * 2**24)
(24 uniform bits; p is resolved to 1/16.7M). Kept values are scaled by 1 / (1 - p) as torch does.
hash32 is the "lowbias32" integer finaliser (C. Wellons): two xor-shift-multiply rounds, bias 0.17,
cheap in every backend because it needs only 32-bit integer mul / xor / shift.
"""
from __future__ import annotations

import torch

__all__ = ["lora_dropout_keep_ref", "lora_dropout_ref", "lora_xa_ref", "dense_lora_matmul_ref",
           "lora_dx_ref", "lora_masked_dx_ref", "lora_grad_ref", "lora_linear_ref", "dropout_threshold",
           "HASH_MUL1", "HASH_MUL2", "SEED_MUL"]

_U32 = 0xFFFFFFFF
HASH_MUL1 = 0x7FEB352D
HASH_MUL2 = 0x846CA68B
SEED_MUL = 0x9E3779B9  # golden-ratio constant: spreads consecutive seeds over the 32-bit space


def dropout_threshold(p: float) -> int:
    """Integer threshold on the 24-bit uniform draw: keep iff draw >= threshold (P(keep) = 1 - p)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return int(round(p * (1 << 24)))


def _hash32(h: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic masked to 32 bits: the product of two < 2**32 numbers may wrap int64, but its low
    # 32 bits are exact (two's complement multiplication is exact mod 2**64).
    h = h ^ (h >> 16)
    h = (h * HASH_MUL1) & _U32
    h = h ^ (h >> 15)
    h = (h * HASH_MUL2) & _U32
    h = h ^ (h >> 16)
    return h


def _seed_mix(seed: torch.Tensor) -> torch.Tensor:
    s = seed.reshape(()).to(torch.int64) & _U32
    return _hash32((s * SEED_MUL) & _U32)


def lora_dropout_keep_ref(seed: torch.Tensor, M: int, K: int, p: float, device=None) -> torch.Tensor:
    """Bool keep-mask (M, K) for seed (1-element int64 tensor) and dropout probability p."""
    device = seed.device if device is None else device
    idx = torch.arange(M * K, device=device, dtype=torch.int64) & _U32
    h = _hash32(idx ^ _seed_mix(seed.to(device)))
    return ((h >> 8) >= dropout_threshold(p)).reshape(M, K)


def lora_dropout_ref(x2d: torch.Tensor, seed: torch.Tensor | None, p: float) -> torch.Tensor:
    """dropout(x) in fp32 with the hash mask (identity when seed is None or p == 0)."""
    x = x2d.float()
    if seed is None or p == 0.0:
        return x
    keep = lora_dropout_keep_ref(seed, x.shape[0], x.shape[1], p, x.device)
    return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype, device=x.device))


def lora_xa_ref(x2d: torch.Tensor, A: torch.Tensor, seed: torch.Tensor | None, p: float) -> torch.Tensor:
    """xa = dropout(x) @ A^T, fp32 (M, r)."""
    return lora_dropout_ref(x2d, seed, p) @ A.float().t()


def dense_lora_matmul_ref(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, xa: torch.Tensor,
                          B: torch.Tensor, scale: float) -> torch.Tensor:
    """y = x W^T + bias + scale * xa B^T, accumulated in fp32, returned in x's dtype (M, N)."""
    acc = x2d.float() @ weight.float().t()
    if bias is not None:
        acc = acc + bias.float()
    acc = torch.addmm(acc, xa.float(), B.float().t(), alpha=scale)
    return acc.to(x2d.dtype)


def lora_masked_dx_ref(dx_base: torch.Tensor, dyb: torch.Tensor, A: torch.Tensor, scale: float,
                       seed: torch.Tensor | None, p: float) -> torch.Tensor:
    """dx_base + scale * dropout'(dyb A): the LoRA branch's input gradient through the same mask."""
    lora = (dyb.float() @ A.float()) * scale
    if seed is not None and p > 0.0:
        keep = lora_dropout_keep_ref(seed, lora.shape[0], lora.shape[1], p, lora.device)
        lora = torch.where(keep, lora * (1.0 / (1.0 - p)), torch.zeros((), device=lora.device))
    return (dx_base.float() + lora).to(dx_base.dtype)


def lora_dx_ref(dy2d: torch.Tensor, weight: torch.Tensor, dyb: torch.Tensor, A: torch.Tensor, scale: float,
                seed: torch.Tensor | None, p: float) -> torch.Tensor:
    """dx = dy W + scale * dropout'((dy B) A), fp32 accumulation, in dy's dtype (M, K)."""
    base = dy2d.float() @ weight.float()
    return lora_masked_dx_ref(base, dyb, A, scale, seed, p).to(dy2d.dtype)


def lora_grad_ref(dy2d: torch.Tensor, x2d: torch.Tensor, xa: torch.Tensor, B: torch.Tensor, scale: float,
                  seed: torch.Tensor | None, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dyb, dA, dB), all fp32: dyb = dy B (M, r); dA = scale dyb^T drop(x) (r, K); dB = scale dy^T xa (N, r)."""
    dy = dy2d.float()
    dyb = dy @ B.float()
    dA = (dyb.t() @ lora_dropout_ref(x2d, seed, p)) * scale
    dB = (dy.t() @ xa.float()) * scale
    return dyb, dA, dB


def lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                    bias: torch.Tensor | None = None, seed: torch.Tensor | None = None,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """Differentiable oracle in plain PyTorch autograd, computed in fp32 and cast to x's dtype.

    x (..., K); weight (N, K) dense (dequantize an NF4 base first); A (r, K); B (N, r).
    """
    x2d = x.reshape(-1, x.shape[-1])
    y = x2d.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    y = y + scale * (lora_dropout_ref(x2d, seed, dropout_p) @ A.float().t()) @ B.float().t()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
