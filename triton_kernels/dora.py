"""Triton kernel for DoRA's weight norm on a 4-bit weight: out[n] = ||W[n, :] + s * B[n, :] @ A||_2.

One program owns BLOCK_N output rows and streams their stripe of the packed NF4/FP4 weight once, K tile by K
tile: it dequantizes the (BLOCK_N, BLOCK_K) tile in registers (code-book lookup x absmax, a double-quantized
absmax decoded in-kernel), adds the low-rank term s * B[rows] @ A[:, tile] (tl.dot in IEEE fp32, the rank in
chunks of BLOCK_R) and accumulates the squares in fp32. Neither W nor W + s B A is ever written to memory:
the kernel reads N*K/2 bytes of weight, the scales, and A (r x K, L2-resident) once per program.

Layout (bitsandbytes, as reference/nf4_matmul.py): element e = n*K + k of the flattened W lives in byte e // 2,
HIGH nibble when e is even, scale absmax[e // BLOCKSIZE]; indexing by e handles K % blocksize != 0 (a block
spanning two rows) and odd K. Each element gathers its byte, code and scale (one byte feeds two neighbouring
lanes from the same transaction): this is a streaming pass of about N*K/2 bytes next to a LoRA layer's
GEMMs (2 M N K flops each), so its cost is the weight's bytes, not arithmetic.

Tiles: BLOCK_N = 16 rows, BLOCK_K = 64, the rank in chunks of BLOCK_R = 16 (tl.dot's minimum; any r compiles to
the same registers), 4 warps. Compiled offline for sm_90 that is the tiling that compiles without local-memory
traffic for every case of tests/ops/test_triton_sm90.py under both Triton 3.6 and 3.9 (80-127 registers): 32 x 64
with 4 warps leaves 8 B of stack under 3.6 (128 registers), 32 x 64 with 8 warps under 3.6 and 64 x 64 with 8 under
3.9 leave 8-16 B. Half the rows per program doubles the programs, not the bytes read. Not measured on
a GPU yet (written on a machine without one; tested under TRITON_INTERPRET=1 against qpeft.reference.dora).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .nf4_matmul import _add_rn, _mul_rn  # the pinned fp32 roundings of the double-quant scale

__all__ = ["dora_weight_norm_triton"]

NESTED_BLOCKSIZE = tl.constexpr(256)  # absmax values per second-level (double-quant) block, as bitsandbytes
BLOCK_N, BLOCK_K, BLOCK_R, NUM_WARPS = 16, 64, 16, 4


@triton.jit
def _weight_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset, rows, cols, mask, K,
                 BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    """fp32 W[rows, cols] (broadcast int64 index tensors), 0 where ~mask."""
    e = rows * K + cols
    byte = tl.load(packed_ptr + (e >> 1), mask=mask, other=0).to(tl.int32)
    nibble = (byte >> (4 - (e & 1) * 4).to(tl.int32)) & 0xF  # even element: high nibble
    value = tl.load(code_ptr + nibble)
    block = e // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        # two roundings, never one FFMA (see nf4_matmul._mul_rn): the scale bitsandbytes and the reference decode
        scale = _add_rn(_mul_rn(tl.load(nested_code_ptr + q),
                                tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)), offset)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return tl.where(mask, value * scale, 0.0)


@triton.jit
def _dora_norm_kernel(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                      a_ptr, b_ptr, out_ptr, N, K, R, scale, stride_a, stride_b,
                      BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    offs_n = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_n = offs_n < N
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask_k = offs_k < K
        v = _weight_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                         offs_n[:, None], offs_k[None, :], mask_n[:, None] & mask_k[None, :], K, BLOCKSIZE, NESTED)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            b = tl.load(b_ptr + offs_n[:, None] * stride_b + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :],
                        other=0.0).to(tl.float32)
            a = tl.load(a_ptr + offs_r[:, None] * stride_a + offs_k[None, :], mask=mask_r[:, None] & mask_k[None, :],
                        other=0.0).to(tl.float32)
            v += scale * tl.dot(b, a, input_precision="ieee")
        acc += tl.sum(v * v, axis=1)
    tl.store(out_ptr + offs_n, tl.sqrt_rn(acc), mask=mask_n)


def dora_weight_norm_triton(packed, absmax, code, blocksize, N, K, nested_absmax, nested_code, offset, A, B,
                            scale) -> torch.Tensor:
    """fp32 (N,) row norms of W + scale * B @ A. Inputs validated by the L2 op (contiguous A (r, K), B (N, r))."""
    R = A.shape[0]
    out = torch.empty(N, dtype=torch.float32, device=packed.device)
    nested = nested_absmax is not None
    dummy = code
    _dora_norm_kernel[(triton.cdiv(N, BLOCK_N),)](
        packed, absmax, code, nested_absmax if nested else dummy, nested_code if nested else dummy,
        offset if nested else dummy, A, B, out, N, K, R, float(scale), A.stride(0), B.stride(0),
        BLOCKSIZE=blocksize, NESTED=nested, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=BLOCK_R, num_warps=NUM_WARPS)
    return out
