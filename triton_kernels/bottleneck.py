"""Fused bottleneck adapter block in Triton: y = x + scale * (act(x @ Wd^T + bd) @ Wu^T + bu).

One program owns BLOCK_M rows of the hidden states and keeps its (BLOCK_M, R) bottleneck activations in
registers, so each direction is one kernel instead of four or more (down GEMM, bias+act, up GEMM,
bias+residual) with (M, R) and (M, H) intermediates round-tripping through HBM. Within the kernel the row
block of x (dy) is streamed twice, because no output column can be written before the whole row has been
reduced into h (da); the second read of a BLOCK_M x H tile (64 x 768 x 2 B = 96 KiB for BERT-base) is
expected to come from L2 (not yet measured on a GPU):
  forward : pass 1 over H accumulates h = x @ Wd^T (fp32); pass 2 over H writes y = x + up(act(h)).
            h (fp32, M x R) is stored for the backward: 2R/H of x's bytes in bf16 (12.5% at H=4096, R=256).
  backward: pass 1 over H accumulates da = dy @ Wu; dh = scale * da * act'(h); pass 2 writes
            dx = dy + dh @ Wd.  dh and act(h) are stored so that the weight gradients are two plain
            GEMMs over M (dWd = dh^T x, dWu = scale * dy^T act(h)) -- a reduction over all rows, which
            in-kernel would need atomics (non-deterministic) or a second split-M kernel.
Accumulation is fp32; fp32 inputs use IEEE dots: tf32 keeps 10 mantissa bits (~5e-4 relative per product)
against fp32's 23, far outside the 2x-of-torch error rule that the tests apply.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["bottleneck_adapter_triton", "bottleneck_adapter_backward_triton", "MAX_BOTTLENECK"]

# The (BLOCK_M, BLOCK_R) fp32 accumulator lives in registers: 16 x 512 x 4 B = 32 KiB per program (8 warps)
# is the largest bottleneck that compiles for sm_90 without spills (see _blocks). Larger ones use the reference.
MAX_BOTTLENECK = 512

# tl.constexpr: Triton 3.6 refuses plain Python globals inside @triton.jit functions (3.9 accepts them). Keep
# them right of a tensor: in the Triton 3.9 interpreter constexpr * tensor wraps the tensor in a constexpr.
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _tanh(x):
    # tl has no tanh on every backend (the interpreter included); tanh(x) = 2 sigmoid(2x) - 1.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _act(h, ACT: tl.constexpr):
    if ACT == 1:
        h = tl.maximum(h, 0.0)
    elif ACT == 2:
        h = h * tl.sigmoid(h)
    elif ACT == 3:
        h = 0.5 * h * (1.0 + tl.math.erf(h * _INV_SQRT_2))
    elif ACT == 4:
        h = 0.5 * h * (1.0 + _tanh((h + 0.044715 * h * h * h) * _SQRT_2_OVER_PI))
    elif ACT == 5:
        h = _tanh(h)
    return h


@triton.jit
def _act_grad(h, ACT: tl.constexpr):
    if ACT == 0:
        g = tl.full(h.shape, 1.0, tl.float32)
    elif ACT == 1:
        g = tl.where(h > 0, 1.0, 0.0)
    elif ACT == 2:
        s = tl.sigmoid(h)
        g = s * (1.0 + h * (1.0 - s))
    elif ACT == 3:
        g = 0.5 * (1.0 + tl.math.erf(h * _INV_SQRT_2)) + h * tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
    elif ACT == 4:
        t = _tanh((h + 0.044715 * h * h * h) * _SQRT_2_OVER_PI)
        g = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * h * h)
    else:
        t = _tanh(h)
        g = 1.0 - t * t
    return g


@triton.jit
def _bottleneck_fwd_kernel(
    # tensors
    x_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, y_ptr, h_ptr,
    # sizes and scalars
    M, H, R, scale,
    # strides (weights and h are contiguous: Wd (R, H), Wu (H, R), h (M, R))
    stride_xm, stride_ym,
    # meta
    HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    m_mask = rm < M
    r_mask = rr < R

    # pass 1: h = x @ Wd^T
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        rh = h0 + tl.arange(0, BLOCK_H)
        h_mask = rh < H
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rh[None, :], mask=m_mask[:, None] & h_mask[None, :], other=0.0)
        wd_t = tl.load(wd_ptr + rr[None, :] * H + rh[:, None], mask=h_mask[:, None] & r_mask[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(x, wd_t, input_precision="ieee")
        else:
            acc += tl.dot(x, wd_t)
    if HAS_BD:
        acc += tl.load(bd_ptr + rr, mask=r_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(h_ptr + rm[:, None] * R + rr[None, :], acc, mask=m_mask[:, None] & r_mask[None, :])
    # padded bottleneck columns are exactly 0 before the activation; their Wu columns are masked to 0, so
    # act(0) != 0 (none of ours, but e.g. a future sigmoid) would still not leak into y.
    a = _act(acc, ACT).to(x_ptr.dtype.element_ty)

    # pass 2: y = x + scale * (a @ Wu^T + bu)
    for h0 in range(0, H, BLOCK_H):
        rh = h0 + tl.arange(0, BLOCK_H)
        h_mask = rh < H
        wu_t = tl.load(wu_ptr + rh[None, :] * R + rr[:, None], mask=r_mask[:, None] & h_mask[None, :], other=0.0)
        if IEEE:
            up = tl.dot(a, wu_t, input_precision="ieee")
        else:
            up = tl.dot(a, wu_t)
        if HAS_BU:
            up += tl.load(bu_ptr + rh, mask=h_mask, other=0.0).to(tl.float32)[None, :]
        io_mask = m_mask[:, None] & h_mask[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rh[None, :], mask=io_mask, other=0.0).to(tl.float32)
        y = x + scale * up
        tl.store(y_ptr + rm[:, None] * stride_ym + rh[None, :], y.to(y_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _bottleneck_bwd_kernel(
    # tensors
    dy_ptr, h_ptr, wd_ptr, wu_ptr, dx_ptr, dh_ptr, a_ptr,
    # sizes and scalars
    M, H, R, scale,
    # strides (dy, dx row-major with these row strides; h, dh, a contiguous (M, R))
    stride_dym, stride_dxm,
    # meta
    ACT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    m_mask = rm < M
    r_mask = rr < R
    mr_mask = m_mask[:, None] & r_mask[None, :]

    # pass 1: da = dy @ Wu
    da = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        rh = h0 + tl.arange(0, BLOCK_H)
        h_mask = rh < H
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rh[None, :], mask=m_mask[:, None] & h_mask[None, :],
                     other=0.0)
        wu = tl.load(wu_ptr + rh[:, None] * R + rr[None, :], mask=h_mask[:, None] & r_mask[None, :], other=0.0)
        if IEEE:
            da += tl.dot(dy, wu, input_precision="ieee")
        else:
            da += tl.dot(dy, wu)
    h = tl.load(h_ptr + rm[:, None] * R + rr[None, :], mask=mr_mask, other=0.0)
    dh = scale * da * _act_grad(h, ACT)
    dh = tl.where(mr_mask, dh, 0.0)
    dh_lp = dh.to(dx_ptr.dtype.element_ty)
    tl.store(dh_ptr + rm[:, None] * R + rr[None, :], dh_lp, mask=mr_mask)
    tl.store(a_ptr + rm[:, None] * R + rr[None, :], _act(h, ACT).to(a_ptr.dtype.element_ty), mask=mr_mask)

    # pass 2: dx = dy + dh @ Wd
    for h0 in range(0, H, BLOCK_H):
        rh = h0 + tl.arange(0, BLOCK_H)
        h_mask = rh < H
        wd = tl.load(wd_ptr + rr[:, None] * H + rh[None, :], mask=r_mask[:, None] & h_mask[None, :], other=0.0)
        if IEEE:
            dxa = tl.dot(dh_lp, wd, input_precision="ieee")
        else:
            dxa = tl.dot(dh_lp, wd)
        io_mask = m_mask[:, None] & h_mask[None, :]
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rh[None, :], mask=io_mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rm[:, None] * stride_dxm + rh[None, :], (dy + dxa).to(dx_ptr.dtype.element_ty),
                 mask=io_mask)


def _blocks(R: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_H, BLOCK_R, num_warps). tl.dot needs every dim >= 16. The (BLOCK_M, BLOCK_R) fp32
    accumulators live in registers, so BLOCK_M shrinks as R grows (64 rows up to R = 64, 32 up to 256, 16 up to
    512) for 16-bit inputs; fp32 (IEEE dots: FMA loops with their operands in registers) takes 16 rows and
    steps H by 16 up to R = 256, by 32 at R = 512: under Triton 3.9 an H step of 32 spills 16 B at R = 256
    (backward, ReLU and tanh-GELU), 16 spills 8 B at R = 512, and 32 rows spill in 15 of 48 launches. With 8
    warps every case compiles for sm_90 without spills under Triton 3.6 and 3.9 (tests/ops/test_triton_sm90.py).
    The first choice (64 or 32 rows, H step 64, 4 warps) spilled up to 13.7 KB per thread at R = 256 in fp32."""
    block_r = max(16, triton.next_power_of_2(R))
    if dtype == torch.float32:
        return 16, (16 if block_r <= 256 else 32), block_r, 8
    return (64 if block_r <= 64 else (32 if block_r <= 256 else 16)), 64, block_r, 8


def _check(x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor) -> tuple[int, int, int]:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be 2-D with unit inner stride, got shape {tuple(x.shape)} strides {x.stride()}")
    M, H = x.shape
    R = w_down.shape[0]
    if tuple(w_down.shape) != (R, H) or tuple(w_up.shape) != (H, R):
        raise ValueError(f"w_down must be (R, {H}) and w_up ({H}, R); got {tuple(w_down.shape)}, {tuple(w_up.shape)}")
    if not (w_down.is_contiguous() and w_up.is_contiguous()):
        raise ValueError("w_down and w_up must be contiguous")
    if w_down.dtype != x.dtype or w_up.dtype != x.dtype:
        raise ValueError(f"w_down/w_up dtype must equal x.dtype {x.dtype}; got {w_down.dtype}, {w_up.dtype}")
    if R > MAX_BOTTLENECK:
        raise ValueError(f"bottleneck size R={R} > {MAX_BOTTLENECK} is not supported by the Triton kernel")
    return M, H, R


def bottleneck_adapter_triton(x, w_down, b_down, w_up, b_up, activation_id: int, scale: float):
    """(y (M, H) x.dtype, h_pre (M, R) fp32) for x (M, H); see the module docstring."""
    M, H, R = _check(x, w_down, w_up)
    y = torch.empty_like(x)
    h_pre = torch.empty((M, R), dtype=torch.float32, device=x.device)
    if M == 0:
        return y, h_pre
    block_m, block_h, block_r, warps = _blocks(R, x.dtype)
    grid = (triton.cdiv(M, block_m),)
    _bottleneck_fwd_kernel[grid](
        x, w_down, b_down if b_down is not None else x, w_up, b_up if b_up is not None else x, y, h_pre,
        M, H, R, float(scale),
        x.stride(0), y.stride(0),
        HAS_BD=b_down is not None, HAS_BU=b_up is not None, ACT=activation_id, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_H=block_h, BLOCK_R=block_r, num_warps=warps,
    )
    return y, h_pre


def bottleneck_adapter_backward_triton(dy, x, h_pre, w_down, w_up, activation_id: int, scale: float):
    """(dx, dw_down, db_down, dw_up, db_up); dx from the fused kernel, weight grads from two GEMMs over M."""
    M, H, R = _check(x, w_down, w_up)
    if dy.shape != x.shape or dy.stride(-1) != 1 or dy.dtype != x.dtype:
        raise ValueError(f"dy must match x {tuple(x.shape)} {x.dtype} with unit inner stride")
    if h_pre.shape != (M, R) or h_pre.dtype != torch.float32 or not h_pre.is_contiguous():
        raise ValueError(f"h_pre must be contiguous fp32 ({M}, {R})")
    dx = torch.empty_like(x)
    dh = torch.empty((M, R), dtype=x.dtype, device=x.device)
    a = torch.empty((M, R), dtype=x.dtype, device=x.device)
    if M > 0:
        block_m, block_h, block_r, warps = _blocks(R, x.dtype)
        grid = (triton.cdiv(M, block_m),)
        _bottleneck_bwd_kernel[grid](
            dy, h_pre, w_down, w_up, dx, dh, a,
            M, H, R, float(scale),
            dy.stride(0), dx.stride(0),
            ACT=activation_id, IEEE=x.dtype == torch.float32,
            BLOCK_M=block_m, BLOCK_H=block_h, BLOCK_R=block_r, num_warps=warps,
        )
    else:
        dh.zero_()
        a.zero_()
    dw_down = dh.t() @ x                                   # (R, H), fp32 accumulation inside the GEMM
    db_down = dh.float().sum(0).to(w_down.dtype)
    dw_up = (dy.t() @ a) * scale if scale != 1.0 else dy.t() @ a
    db_up = (dy.float().sum(0) * scale).to(w_up.dtype)
    return dx, dw_down, db_down, dw_up, db_up
