"""Triton kernels for the fused LoRA op family (L0 kernels + L1 launchers).

Two kernels cover the whole family by taking every operand through strides:

* `_lora_matmul_kernel`:  out = [addend] + [drop_a(a) @ b] + [bias] + scale * drop_e(p @ q)
    - forward        out = x W^T + bias + scale * xa B^T        (a = x, b = W^T as strides, p = xa, q = B^T)
    - rank-r pass    xa = drop(x) A^T                           (a = x with the dropout mask, b = A^T)
    - dy B           dyb = dy B                                  (a = dy, b = B)
    - input grad     dx = dy W + scale * drop'(dyb A)           (a = dy, b = W, p = dyb, q = A, mask in epilogue)
    - NF4 + dropout  dx = dx_base + scale * drop'(dyb A)         (addend = dx_base, no main GEMM)
  fp32 accumulation; the LoRA product is added to the accumulator before the single store, so the
  adapter costs no extra pass over the (M, N) output.
* `_lora_tn_kernel`:  c = scale * p^T @ drop(q), a reduction over the token dim M for the weight grads
    dA = scale (dy B)^T drop(x)  (r, K),   dB = scale dy^T xa  (N, r),
  split over M (SPLIT_M partial sums, reduced by the launcher) because r is small: with only
  K/BLOCK_J output tiles an H100's 132 SMs would otherwise idle.

Dropout mask: the counter-based hash of qpeft.reference.lora (same constants), so the kernels, the
reference and backward agree bit for bit on which elements are dropped; only the int64 seed is saved.
Launchers take contiguous tensors (the L2 op guarantees it) and allocate their outputs.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qpeft.reference.lora import HASH_MUL1, HASH_MUL2, SEED_MUL, dropout_threshold

__all__ = ["lora_matmul_triton", "lora_tn_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# jit functions may only read globals that are constexpr
_MUL1 = tl.constexpr(HASH_MUL1)
_MUL2 = tl.constexpr(HASH_MUL2)
_SEED_MUL = tl.constexpr(SEED_MUL)
_U32_MASK = tl.constexpr(0xFFFFFFFF)
_DOT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _hash32(h):
    # lowbias32 finaliser on uint32 (wrapping multiplies), identical to reference.lora._hash32
    h = h ^ (h >> 16)
    h = h * _MUL1
    h = h ^ (h >> 15)
    h = h * _MUL2
    h = h ^ (h >> 16)
    return h


@triton.jit
def _keep_mask(seed_ptr, rows, cols, mask_cols, DROP_THRESH: tl.constexpr):
    """Keep-mask of elements (rows[:, None], cols[None, :]) of an (., mask_cols) tensor."""
    seed = tl.load(seed_ptr)
    mix = _hash32(((seed & _U32_MASK).to(tl.uint32)) * _SEED_MUL)
    idx = rows[:, None].to(tl.int64) * mask_cols + cols[None, :].to(tl.int64)
    h = _hash32(idx.to(tl.uint32) ^ mix)
    return (h >> 8) >= DROP_THRESH


@triton.jit
def _to_dot(t, DOT_KIND: tl.constexpr):
    if DOT_KIND == 0:
        return t.to(tl.float32)
    elif DOT_KIND == 1:
        return t.to(tl.float16)
    else:
        return t.to(tl.bfloat16)


@triton.jit
def _lora_matmul_kernel(
    # main GEMM: a (M, K) @ b (K, N)
    a_ptr, b_ptr, stride_am, stride_ak, stride_bk, stride_bn,
    # optional addend (M, N) and bias (N)
    addend_ptr, stride_dm, stride_dn, bias_ptr,
    # LoRA epilogue: scale * p (M, R) @ q (R, N)
    p_ptr, q_ptr, stride_pm, stride_pr, stride_qr, stride_qn,
    # output (M, N)
    out_ptr, stride_om, stride_on,
    # dropout
    seed_ptr, mask_cols, drop_scale,
    # sizes and scalars (m_bucket: next power of two of M, only the autotuning key)
    M, N, K, R, scale, m_bucket,
    # meta-parameters
    HAS_MAIN: tl.constexpr, HAS_ADDEND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    DROP_A: tl.constexpr, DROP_LORA: tl.constexpr, DROP_THRESH: tl.constexpr, DOT_KIND: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped tile order: GROUP_M row tiles share the same b column tiles while they sit in L2
    pid = tl.program_id(0).to(tl.int64)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if HAS_MAIN:
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if DROP_A:
                keep = _keep_mask(seed_ptr, rm, rk, mask_cols, DROP_THRESH)
                a = tl.where(keep, a.to(tl.float32) * drop_scale, 0.0)
            b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(_to_dot(a, DOT_KIND), _to_dot(b, DOT_KIND), acc, input_precision=PRECISION)

    if HAS_LORA:
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < R
            pt = tl.load(p_ptr + rm[:, None] * stride_pm + rr[None, :] * stride_pr,
                         mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            qt = tl.load(q_ptr + rr[:, None] * stride_qr + rn[None, :] * stride_qn,
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            lora = tl.dot(_to_dot(pt, DOT_KIND), _to_dot(qt, DOT_KIND), lora, input_precision=PRECISION)
        if DROP_LORA:
            keep = _keep_mask(seed_ptr, rm, rn, mask_cols, DROP_THRESH)
            lora = tl.where(keep, lora * drop_scale, 0.0)
        acc += lora * scale

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_ADDEND:
        acc += tl.load(addend_ptr + rm[:, None] * stride_dm + rn[None, :] * stride_dn,
                       mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _lora_tn_kernel(
    # p (M, I) read transposed, q (M, J)
    p_ptr, q_ptr, stride_pm, stride_pi, stride_qm, stride_qj,
    # partial sums (SPLIT_M, I, J) fp32
    out_ptr, stride_os, stride_oi, stride_oj,
    seed_ptr, mask_cols, drop_scale,
    M, I, J, rows_per_split, scale,
    DROP_Q: tl.constexpr, DROP_THRESH: tl.constexpr, DOT_KIND: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    split = tl.program_id(2)
    ri = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    rj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok = ri < I
    j_ok = rj < J
    m_start = split.to(tl.int64) * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for m0 in range(0, rows_per_split, BLOCK_M):
        rm = m_start + m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < m_end
        pt = tl.load(p_ptr + rm[None, :] * stride_pm + ri[:, None] * stride_pi,
                     mask=i_ok[:, None] & m_ok[None, :], other=0.0)
        qt = tl.load(q_ptr + rm[:, None] * stride_qm + rj[None, :] * stride_qj,
                     mask=m_ok[:, None] & j_ok[None, :], other=0.0)
        if DROP_Q:
            keep = _keep_mask(seed_ptr, rm, rj, mask_cols, DROP_THRESH)
            qt = tl.where(keep, qt.to(tl.float32) * drop_scale, 0.0)
        acc = tl.dot(_to_dot(pt, DOT_KIND), _to_dot(qt, DOT_KIND), acc, input_precision=PRECISION)
    tl.store(out_ptr + split * stride_os + ri[:, None] * stride_oi + rj[None, :] * stride_oj,
             acc * scale, mask=i_ok[:, None] & j_ok[None, :])


# GPU tiles for the main GEMM, autotuned per (M, N, K) (no GPU was available to prune this list by
# measurement): 128x128x64 / 8 warps / 3 stages is the usual bf16 Hopper/Ampere tile; the 64-row tiles keep all
# SMs busy at M = 512 (4 x 32 = 128 tiles of 128x128 for N = 4096 would leave an H100's 132 SMs one wave
# short). Every entry compiles for sm_90 without register spills with each epilogue (tests/ops/test_triton_sm90.py,
# Triton 3.6 and 3.9); 128x256x64 / 8 warps, once in this list, spilled 1024 B per thread with the LoRA epilogue.
_GPU_CONFIGS_16BIT = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]
# fp32 operands (exact IEEE products, no tensor cores: tl.dot becomes FMA loops whose operands live in
# registers): the 16-bit tiles spill 128..17400 B per thread there, so fp32 gets K steps of 16 (64 x 64 x 32
# with 4 warps still spills 8 B under Triton 3.6).
_GPU_CONFIGS_FP32 = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 16}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16}, num_warps=4, num_stages=3),
]
# keyed on M's power-of-two bucket, not M: training with variable sequence lengths would otherwise re-tune
# (a few timed launches) for every new token count
_lora_matmul_kernel_tuned = triton.autotune(configs=_GPU_CONFIGS_16BIT, key=["m_bucket", "N", "K", "R"])(
    _lora_matmul_kernel)
_lora_matmul_kernel_tuned_fp32 = triton.autotune(configs=_GPU_CONFIGS_FP32, key=["m_bucket", "N", "K", "R"])(
    _lora_matmul_kernel)


def _pow2_at_least(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _precision(dot_dtype: torch.dtype) -> str:
    # fp32 operands: exact IEEE products (TF32 would cost ~1e-3 relative error, far above fp32 PyTorch's);
    # 16-bit operands always run on the tensor cores and ignore the setting
    return "ieee" if dot_dtype == torch.float32 else "tf32"


def _dummy(device) -> torch.Tensor:
    return torch.empty(1, device=device, dtype=torch.float32)


def lora_matmul_triton(a: torch.Tensor | None, b_t: torch.Tensor | None, *, out_dtype: torch.dtype,
                       M: int, N: int, addend: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                       p: torch.Tensor | None = None, q_t: torch.Tensor | None = None, scale: float = 1.0,
                       seed: torch.Tensor | None = None, dropout_p: float = 0.0, drop_a: bool = False,
                       drop_lora: bool = False, dot_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """out (M, N) = [addend] + [drop_a(a) @ b_t] + [bias] + scale * drop_lora(p @ q_t).

    a: (M, K); b_t: (K, N) any strides (pass W.t() for x W^T); p: (M, R); q_t: (R, N) any strides.
    The dropout mask indexes an (M, mask_cols) tensor: a's columns (drop_a) or the output's (drop_lora).
    dot_dtype: dtype fed to tl.dot (fp32 -> exact IEEE fp32 products, never TF32).
    """
    device = (a if a is not None else addend).device
    out = torch.empty((M, N), device=device, dtype=out_dtype)
    if M == 0 or N == 0:
        return out
    has_main = a is not None
    K = a.shape[1] if has_main else 0
    has_lora = p is not None
    R = p.shape[1] if has_lora else 0
    use_drop = seed is not None and dropout_p > 0.0 and (drop_a or drop_lora)
    mask_cols = K if drop_a else N
    d = _dummy(device)
    BR = _pow2_at_least(R, 16, 64)
    if _INTERPRET:  # the interpreter runs each program in numpy: fewer, mid-size tiles are fastest
        kernel = _lora_matmul_kernel
        meta = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
        grid = (triton.cdiv(M, 32) * triton.cdiv(N, 32),)
    else:
        kernel = _lora_matmul_kernel_tuned_fp32 if dot_dtype == torch.float32 else _lora_matmul_kernel_tuned
        meta = {}

        def grid(cfg):
            return (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    kernel[grid](
        a if has_main else d, b_t if has_main else d,
        a.stride(0) if has_main else 0, a.stride(1) if has_main else 0,
        b_t.stride(0) if has_main else 0, b_t.stride(1) if has_main else 0,
        addend if addend is not None else d,
        addend.stride(0) if addend is not None else 0, addend.stride(1) if addend is not None else 0,
        bias if bias is not None else d,
        p if has_lora else d, q_t if has_lora else d,
        p.stride(0) if has_lora else 0, p.stride(1) if has_lora else 0,
        q_t.stride(0) if has_lora else 0, q_t.stride(1) if has_lora else 0,
        out, out.stride(0), out.stride(1),
        seed if use_drop else d, mask_cols, 1.0 / (1.0 - dropout_p),
        M, N, K, R, float(scale), triton.next_power_of_2(M),
        HAS_MAIN=has_main, HAS_ADDEND=addend is not None, HAS_BIAS=bias is not None, HAS_LORA=has_lora,
        DROP_A=use_drop and drop_a, DROP_LORA=use_drop and drop_lora,
        DROP_THRESH=dropout_threshold(dropout_p) if use_drop else 0, DOT_KIND=_DOT_KIND[dot_dtype],
        PRECISION=_precision(dot_dtype), BLOCK_R=BR, GROUP_M=8, **meta,
    )
    return out


def lora_tn_triton(p: torch.Tensor, q: torch.Tensor, *, scale: float, seed: torch.Tensor | None = None,
                   dropout_p: float = 0.0, drop_q: bool = False,
                   dot_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """c (I, J) fp32 = scale * p^T @ drop(q), with p (M, I), q (M, J); the mask indexes q (M, J)."""
    M, I = p.shape
    J = q.shape[1]
    if M == 0:
        return torch.zeros((I, J), device=p.device, dtype=torch.float32)
    use_drop = drop_q and seed is not None and dropout_p > 0.0
    if _INTERPRET:
        BI, BJ, BM, warps = 32, 32, 32, 4
    else:
        # one side is the rank (<= 64 typically): size that side's tile to it, 128 on the long side
        BI = _pow2_at_least(I, 16, 64) if I <= 64 else 128
        BJ = _pow2_at_least(J, 16, 64) if J <= 64 else 128
        # fp32 (IEEE FMA loops): 64 rows per step spill 656 B per thread at 16 x 128, 32 rows do not
        BM = 32 if dot_dtype == torch.float32 else 64
        warps = 8 if BI * BJ >= 128 * 64 else 4
    tiles = triton.cdiv(I, BI) * triton.cdiv(J, BJ)
    # split the M reduction so that about 2 programs per SM run (264 on an H100), each over >= 512 rows
    target = 4 if _INTERPRET else 264
    split = max(1, min(target // max(tiles, 1), triton.cdiv(M, 512)))
    rows_per_split = triton.cdiv(triton.cdiv(M, split), BM) * BM
    split = triton.cdiv(M, rows_per_split)
    part = torch.empty((split, I, J), device=p.device, dtype=torch.float32)
    d = _dummy(p.device)
    _lora_tn_kernel[(triton.cdiv(I, BI), triton.cdiv(J, BJ), split)](
        p, q, p.stride(0), p.stride(1), q.stride(0), q.stride(1),
        part, part.stride(0), part.stride(1), part.stride(2),
        seed if use_drop else d, J, 1.0 / (1.0 - dropout_p),
        M, I, J, rows_per_split, float(scale),
        DROP_Q=use_drop, DROP_THRESH=dropout_threshold(dropout_p) if use_drop else 0,
        DOT_KIND=_DOT_KIND[dot_dtype], PRECISION=_precision(dot_dtype), BLOCK_I=BI, BLOCK_J=BJ, BLOCK_M=BM,
        num_warps=warps,
    )
    return part[0] if split == 1 else part.sum(0)
