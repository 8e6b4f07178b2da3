"""Pure-PyTorch NF4/FP4 matmul: the CPU path, the fallback and the oracle for every kernel.

W (N, K) is held as 4-bit codes packed two per byte over the flattened row-major tensor (element 2i in
the HIGH nibble, bitsandbytes' layout), with one absmax per `blocksize` consecutive elements. Blocks run
over the flattened tensor, so when K % blocksize != 0 a block spans two rows. absmax is fp32, or uint8
codes into `nested_code` (256-entry dynamic map) scaled per 256 blocks by `nested_absmax` plus `offset`.

Everything is computed in fp32 and cast to the activation dtype at the end, so the result is the fp32
matmul on the exactly dequantized weight, rounded once.
"""
from __future__ import annotations

import torch

from . import quantize as quantize_ref

__all__ = ["decode_absmax_ref", "dequantize_weight_ref", "nf4_matmul_ref", "nf4_matmul_dx_ref",
           "NESTED_BLOCKSIZE"]

# bitsandbytes' double quantization always uses 256 absmax values per second-level block; its fused
# kernels support nothing else, and neither do ours.
NESTED_BLOCKSIZE = 256


def decode_absmax_ref(absmax: torch.Tensor, nested_absmax: torch.Tensor | None = None,
                      nested_code: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [blocks] absmax: `absmax` itself, or `nested_code[absmax] * nested_absmax[i // 256] + offset`."""
    if nested_absmax is None:
        return absmax.float()
    return quantize_ref.decode_absmax_ref(absmax, nested_absmax, nested_code, NESTED_BLOCKSIZE, offset)


def dequantize_weight_ref(packed: torch.Tensor, absmax_f32: torch.Tensor, code: torch.Tensor, blocksize: int,
                          N: int, K: int) -> torch.Tensor:
    """fp32 (N, K) weight from packed uint8 [(N*K+1)//2] (any shape), fp32 absmax [ceil(N*K/bs)], 16-entry code."""
    return quantize_ref.dequantize_4bit_ref(packed, absmax_f32.float(), code.float(), blocksize, [N, K], torch.float32)


def nf4_matmul_ref(x2d: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                   blocksize: int, N: int, nested_absmax: torch.Tensor | None = None,
                   nested_code: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, lora_xa: torch.Tensor | None = None,
                   lora_B: torch.Tensor | None = None, lora_scale: float = 0.0) -> torch.Tensor:
    """(M, N) = x2d (M, K) @ W^T + bias + lora_scale * lora_xa (M, r) @ lora_B (N, r)^T, in x2d's dtype."""
    K = x2d.shape[1]
    w = dequantize_weight_ref(packed, decode_absmax_ref(absmax, nested_absmax, nested_code, offset),
                              code, blocksize, N, K)
    out = x2d.float() @ w.t()
    if bias is not None:
        out = out + bias.float()
    if lora_xa is not None:  # addmm, as the dense reference: a multi-LoRA row is bit for bit a single-LoRA row
        out = torch.addmm(out, lora_xa.float(), lora_B.float().t(), alpha=lora_scale)
    return out.to(x2d.dtype)


def nf4_matmul_dx_ref(dy2d: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                      blocksize: int, K: int, nested_absmax: torch.Tensor | None = None,
                      nested_code: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                      lora_dyb: torch.Tensor | None = None, lora_A: torch.Tensor | None = None,
                      lora_scale: float = 0.0) -> torch.Tensor:
    """(M, K) = dy2d (M, N) @ W + lora_scale * lora_dyb (M, r) @ lora_A (r, K), in dy2d's dtype."""
    N = dy2d.shape[1]
    w = dequantize_weight_ref(packed, decode_absmax_ref(absmax, nested_absmax, nested_code, offset),
                              code, blocksize, N, K)
    dx = dy2d.float() @ w
    if lora_dyb is not None:
        dx = dx + lora_scale * (lora_dyb.float() @ lora_A.float())
    return dx.to(dy2d.dtype)
