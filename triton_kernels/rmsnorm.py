"""RMSNorm in Triton, forward and backward, with HF's upcast order (semantics: qpeft/reference/rmsnorm.py).

Forward: one program normalises BLOCK_M whole rows held in registers (BLOCK_H = next power of two >= H): one
read of x, one write of y and of rstd (4 bytes per row). The eager module makes four passes over fp32 copies
(upcast, square-mean, scale, weight multiply): for H = 4096 in bf16 that is ~10 x the bytes of x through HBM.
Backward: programs stride over the row blocks (grid G <= 256: ~2 per SM of an H100/H200, so the fp32 partial
weight gradients are G x H x 4 B = 4 MiB at H = 4096, not M x H), recompute n = x * rstd from the saved rstd,
write dx and one partial dw row each; the G partial rows are summed by torch (deterministic, no atomics).
All math in fp32; rstd = 1 / sqrt_rn(.) (IEEE square root and division, as torch's fp32 rsqrt is exact to
within an ulp: the approximate sqrt would add ~2 ulp, beyond the 2x error rule in fp32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rms_norm_triton", "rms_norm_backward_triton", "MAX_HIDDEN"]

# Rows live in registers: 8,192 fp32 per row over 16 warps is 16 values per thread per live tensor; the backward
# keeps about four (n, dn, w, the dw partial) and compiles for sm_90 without spills up to this size
# (tests/ops/test_triton_sm90.py), while 16,384 spilled (REG:128, 30 local stores, Triton 3.9). Wider rows (only
# Llama-3.1-405B's 16,384 among the supported families) use the reference.
MAX_HIDDEN = 8192
_MAX_PROGRAMS = 256  # backward grid cap: partial dw rows to sum


@triton.jit
def _rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, M, H, stride_x, stride_y, eps, offset,
                         LLAMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rh = tl.arange(0, BLOCK_H)
    m_mask = rm < M
    h_mask = rh < H
    mask = m_mask[:, None] & h_mask[None, :]
    x = tl.load(x_ptr + rm[:, None] * stride_x + rh[None, :], mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=1) / H
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    n = x * rstd[:, None]
    w = tl.load(w_ptr + rh, mask=h_mask, other=0.0).to(tl.float32) + offset
    if LLAMA:  # HF Llama: hidden_states.to(input_dtype) before the weight multiplies it
        n = n.to(x_ptr.dtype.element_ty).to(tl.float32)
    y = n * w[None, :]
    tl.store(y_ptr + rm[:, None] * stride_y + rh[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rm, rstd, mask=m_mask)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dwp_ptr, M, H, stride_dy, stride_x, stride_dx,
                         offset, LLAMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    rh = tl.arange(0, BLOCK_H)
    h_mask = rh < H
    dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for blk in range(pid, tl.cdiv(M, BLOCK_M), programs):
        rm = blk * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # blk * BLOCK_M < M < 2**31
        m_mask = rm < M
        mask = m_mask[:, None] & h_mask[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_x + rh[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rm[:, None] * stride_dy + rh[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rm, mask=m_mask, other=0.0)
        n = x * rstd[:, None]
        if LLAMA:
            dw += tl.sum(dy * n.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
        else:
            dw += tl.sum(dy * n, axis=0)
        # the weight is re-read per row block (an L1/L2 hit) rather than held: one fewer row of live registers
        w = tl.load(w_ptr + rh, mask=h_mask, other=0.0).to(tl.float32) + offset
        dn = dy * w[None, :]
        c = tl.sum(dn * n, axis=1) / H
        dx = (dn - n * c[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rm[:, None] * stride_dx + rh[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dwp_ptr + pid.to(tl.int64) * H + rh, dw, mask=h_mask)


def _blocks(H: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_H, num_warps): whole rows, about 4,096 values per program (so q/k norms over a 128-wide
    head dim take 32 rows), 4 warps up to 2,048 values and one more warp per 512 beyond, at most 16."""
    block_h = triton.next_power_of_2(H)
    block_m = max(1, min(64, 4096 // block_h))
    warps = min(16, max(4, block_m * block_h // 512))
    return block_m, block_h, warps


def _check(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int]:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be 2-D with unit inner stride, got shape {tuple(x.shape)} strides {x.stride()}")
    M, H = x.shape
    if tuple(weight.shape) != (H,) or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous ({H},), got {tuple(weight.shape)}")
    if H > MAX_HIDDEN:
        raise ValueError(f"hidden size {H} > {MAX_HIDDEN} is not supported by the Triton kernel")
    return M, H


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, llama: bool,
                    out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (M, H) out_dtype, rstd (M,) fp32) for x (M, H)."""
    M, H = _check(x, weight)
    y = torch.empty((M, H), dtype=out_dtype, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return y, rstd
    block_m, block_h, warps = _blocks(H)
    _rms_norm_fwd_kernel[(triton.cdiv(M, block_m),)](
        x, weight, y, rstd, M, H, x.stride(0), y.stride(0), float(eps), float(offset),
        LLAMA=llama, BLOCK_M=block_m, BLOCK_H=block_h, num_warps=warps)
    return y, rstd


def rms_norm_backward_triton(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                             offset: float, llama: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx (M, H) x.dtype, dw (H,) weight.dtype)."""
    M, H = _check(x, weight)
    if tuple(dy.shape) != (M, H) or dy.stride(-1) != 1:
        raise ValueError(f"dy must be ({M}, {H}) with unit inner stride, got {tuple(dy.shape)}")
    if tuple(rstd.shape) != (M,) or rstd.dtype != torch.float32 or not rstd.is_contiguous():
        raise ValueError(f"rstd must be contiguous fp32 ({M},)")
    dx = torch.empty((M, H), dtype=x.dtype, device=x.device)
    if M == 0:
        return dx, torch.zeros((H,), dtype=weight.dtype, device=x.device)
    block_m, block_h, warps = _blocks(H)
    programs = min(triton.cdiv(M, block_m), _MAX_PROGRAMS)
    partial = torch.empty((programs, H), dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(programs,)](
        dy, x, weight, rstd, dx, partial, M, H, dy.stride(0), x.stride(0), dx.stride(0), float(offset),
        LLAMA=llama, BLOCK_M=block_m, BLOCK_H=block_h, num_warps=warps)
    return dx, partial.sum(0).to(weight.dtype)
