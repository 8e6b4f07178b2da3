"""LoftQ (Li et al. 2023, arXiv 2310.08659) with qpeft's NF4 quantizer: PEFT's `loftq_init` (peft/utils/loftq_utils.py),
step for step, without bitsandbytes or a GPU.

    res = W
    repeat num_iter times:
        Q   = dequantize(quantize_nf4(res))          blocksize 64, no double quant (PEFT's Params4bit call)
        res = W - Q
        L, R = rank-r SVD factors of res             L = U_r sqrt(S_r), R = sqrt(S_r) Vh_r
        (not on the last pass) res = W - L R
    returns (Q, A = R, B = L)

qpeft's NF4 quantizer is bitsandbytes' bit for bit (tests/quant), so Q, A and B are PEFT's on the same weight. The
caller re-quantizes Q into its 4-bit layer (Q is exactly representable in NF4 at blocksize 64: the same bytes back,
in any format close to it).
"""
from __future__ import annotations

import torch

from ...quant.functional import dequantize_4bit, quantize_4bit

__all__ = ["loftq_nf4", "loftq_correction", "LOFTQ_BLOCKSIZE"]

LOFTQ_BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which PEFT's loftq_init quantizes with


def _low_rank(res: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L R the best rank-`rank` approximation of res, the singular values split evenly (PEFT's
    _low_rank_decomposition)."""
    U, S, Vh = torch.linalg.svd(res, full_matrices=False)
    root = torch.sqrt(torch.diag(S))
    return U @ root[:, :rank], root[:rank, :] @ Vh


@torch.no_grad()
def loftq_nf4(weight: torch.Tensor, reduced_rank: int, num_iter: int = 1, bits: int = 4
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q fp32 (N, K): the dequantized NF4 base, lora_A (r, K), lora_B (N, r)), all fp32, on weight's device."""
    if bits != 4:
        raise ValueError(f"LoftQ on qpeft's layers quantizes to NF4: loftq_bits must be 4, got {bits!r}")
    if not isinstance(num_iter, int) or num_iter <= 0:
        raise ValueError(f"loftq_iter must be an int >= 1, got {num_iter!r}")
    if weight.dim() != 2:
        raise ValueError(f"LoftQ needs a 2-D weight (out_features, in_features), got shape {tuple(weight.shape)}")
    weight = weight.detach().float()
    res = weight.clone()
    for i in range(num_iter):
        packed, state = quantize_4bit(res, blocksize=LOFTQ_BLOCKSIZE, quant_type="nf4", double_quant=False)
        q = dequantize_4bit(packed, state, torch.float32)
        res = weight - q
        L, R = _low_rank(res, reduced_rank)
        if i + 1 == num_iter:
            break
        res = weight - L @ R
    return q, R, L


@torch.no_grad()
def loftq_correction(weight: torch.Tensor, dequantized: torch.Tensor, reduced_rank: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A (r, K), lora_B (N, r)) fp32 with B A the best rank-r approximation of weight - dequantized: PEFT's
    replace_lora_weights_loftq (one LoftQ step on an already quantized base, the base kept)."""
    if weight.shape != dequantized.shape or weight.dim() != 2:
        raise ValueError(f"weight {tuple(weight.shape)} and dequantized {tuple(dequantized.shape)} must be the same "
                         f"2-D shape")
    L, R = _low_rank(weight.float().to(dequantized.device) - dequantized.float(), reduced_rank)
    return R, L
