"""Pure-PyTorch DoRA weight norm: the CPU path, the fallback and the oracle of the `dora` kernels.

DoRA (Liu et al. 2024, arXiv 2402.09353; PEFT's tuners/lora/dora.py) rescales each output row of the adapted
weight to a learned magnitude m:

    W' = m / ||W + s B A||_row  *  (W + s B A)          ||.||_row: the L2 norm of each of the N rows

`dora_weight_norm_ref` returns ||W + s B A||_row (fp32, (N,)) for a 4-bit W (N, K) in qpeft's / bitsandbytes'
layout (see reference/nf4_matmul.py): W dequantized exactly in fp32, B A computed in fp32, the sum of squares
accumulated in fp32. PEFT computes the same norm in the adapter dtype (fp32 by default) on the dequantized weight
rounded to the dtype it was quantized from; the kernels follow this reference, not PEFT's roundings.
"""
from __future__ import annotations

import torch

from .nf4_matmul import decode_absmax_ref, dequantize_weight_ref

__all__ = ["dora_weight_norm_ref", "dense_dora_weight_norm_ref"]


def dense_dora_weight_norm_ref(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 (N,) = ||weight + scale * B @ A|| per row, for a dense (N, K) weight."""
    w = weight.float() + scale * (B.float() @ A.float())
    return torch.linalg.vector_norm(w, dim=1)


def dora_weight_norm_ref(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, N: int,
                         K: int, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                         offset: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 (N,) = ||W + scale * B @ A|| per row; W (N, K) 4-bit (packed, absmax (fp32, or uint8 with the nested
    triple), 16-entry code, blocksize), A (r, K), B (N, r) of any float dtype."""
    w = dequantize_weight_ref(packed, decode_absmax_ref(absmax, nested_absmax, nested_code, offset), code,
                              blocksize, N, K)
    return dense_dora_weight_norm_ref(w, A, B, scale)
