"""Rotary position embedding in Triton, in place or out of place (semantics: qpeft/reference/rope.py).

x (B, S, H, D) with any strides but a unit last one: q/k straight out of their projections, viewed as HF's
(B, heads, S, D) transpose, are rotated where they lie (no .contiguous() copy, no second buffer). One program
per token and block of heads (grid (S, B, head blocks)): it loads the token's cos/sin row once (Dr values each,
fp32 math) and rotates BLOCK_HEADS heads with it: x is read and written once, against eager's six elementwise
kernels and four temporaries of x's size (q*cos, rotate_half's two halves and its cat, *sin, the sum).
With position_ids, the cos/sin row is the table row position_ids[b, s] (a cos/sin cache; packed sequences
restart their positions), else row (b or 0, s) of the per-token cos/sin.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rope_triton"]


@triton.jit
def _rope_kernel(x_ptr, out_ptr, cos_ptr, sin_ptr, pos_ptr, NH, HALF,
                 stride_xb, stride_xs, stride_xh, stride_ob, stride_os, stride_oh,
                 stride_cb, stride_cs, stride_pb, stride_ps,
                 HAS_POS: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                 BLOCK_HALF: tl.constexpr):
    # grid (S, B, head blocks): no division to split a token index (a 64-bit division is a called subroutine
    # whose register saves spilled to local memory under Triton 3.6)
    s = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    if HAS_POS:
        row = tl.load(pos_ptr + b * stride_pb + s * stride_ps).to(tl.int64) * stride_cs
    else:
        row = b * stride_cb + s * stride_cs
    rd = tl.arange(0, BLOCK_HALF)
    d_mask = rd < HALF
    c1 = tl.load(cos_ptr + row + rd, mask=d_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + row + HALF + rd, mask=d_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + row + rd, mask=d_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + row + HALF + rd, mask=d_mask, other=0.0).to(tl.float32)
    rh = tl.program_id(2) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    mask = (rh < NH)[:, None] & d_mask[None, :]
    xp = x_ptr + b * stride_xb + s * stride_xs + rh[:, None].to(tl.int64) * stride_xh + rd[None, :]
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1[None, :] + x2 * s2[None, :]
        o2 = x2 * c2[None, :] - x1 * s1[None, :]
    else:
        o1 = x1 * c1[None, :] - x2 * s1[None, :]
        o2 = x2 * c2[None, :] + x1 * s2[None, :]
    op = out_ptr + b * stride_ob + s * stride_os + rh[:, None].to(tl.int64) * stride_oh + rd[None, :]
    tl.store(op, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(op + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)


def _blocks(NH: int, half: int) -> tuple[int, int, int]:
    """(BLOCK_HEADS, BLOCK_HALF, num_warps): up to 2,048 pairs per program (32 heads of 128 at once); 4 warps
    from 512 pairs, 1 below (2 warps made ptxas of Triton 3.6 spill 12 bytes at 8 heads x 128, fp16 backward)."""
    block_half = triton.next_power_of_2(max(half, 1))
    block_heads = max(1, min(triton.next_power_of_2(NH), 2048 // block_half))
    warps = 4 if block_heads * block_half >= 512 else 1
    return block_heads, block_half, warps


def rope_triton(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                position_ids: torch.Tensor | None, backward: bool) -> None:
    """Rotate the first cos.shape[-1] features of x (B, S, H, D) into out (same shape; out may be x: in place).
    cos/sin: (Bc, S, Dr) per token (Bc 1 or B), or (P, Dr) with position_ids (Bp, S) (Bp 1 or B)."""
    if x.dim() != 4 or x.stride(-1) != 1 or out.shape != x.shape or out.stride(-1) != 1:
        raise ValueError(f"x and out must be (B, S, H, D) with unit last stride, got {tuple(x.shape)} "
                         f"{x.stride()} and {tuple(out.shape)} {out.stride()}")
    B, S, NH, _ = x.shape
    Dr = cos.shape[-1]
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError("cos and sin must have the same strides, with a unit last one")
    if position_ids is None:
        stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0
        stride_cs, stride_pb, stride_ps = cos.stride(1), 0, 0
    else:
        stride_cb, stride_cs = 0, cos.stride(0)
        stride_pb = position_ids.stride(0) if position_ids.shape[0] > 1 else 0
        stride_ps = position_ids.stride(1)
    if B * S == 0 or NH == 0 or Dr == 0:
        return
    if B > 65535:
        raise ValueError(f"batch size {B} > 65535 (the grid's second dimension); flatten it into the sequence")
    block_heads, block_half, warps = _blocks(NH, Dr // 2)
    _rope_kernel[(S, B, triton.cdiv(NH, block_heads))](
        x, out, cos, sin, position_ids if position_ids is not None else cos, NH, Dr // 2,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2),
        stride_cb, stride_cs, stride_pb, stride_ps,
        HAS_POS=position_ids is not None, BACKWARD=backward, BLOCK_HEADS=block_heads, BLOCK_HALF=block_half,
        num_warps=warps)
