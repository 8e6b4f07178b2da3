"""Triton kernels of the multi-LoRA ops (qpeft/ops/multi_lora.py): per-row adapters, heterogeneous ranks.

Two regimes, each a shrink (xa = x A_a^T) and an expand (out = y + scale_a xa B_a^T) kernel:
* rows (decode, one row per sequence; Punica's BGMV): one program per (row, rank tile) / (row, N tile); it
  reads its row's adapter slot and rank and loops over that rank only. Elementwise fp32 products + sums: a
  tl.dot needs >= 16 rows, and in a decode batch an adapter often has one row.
* segments (prefill; SGMV-style): rows sorted by adapter on the device (stable sort + searchsorted, no host
  read), grid (row tiles, column tiles, adapters) fixed by shapes so that it is CUDA-graph capturable; a
  program whose tile lies past its adapter's rows or rank returns at once (vLLM's lora_shrink/expand grid).
  Tiles of 16..64 rows feed tl.dot (16-bit: tensor cores; fp32: IEEE, never TF32).
No adapter is padded to the largest rank: loops stop at the row's own r_a. fp32 accumulation; the expand
adds the LoRA term to y in fp32 and rounds once. An out-of-range slot is treated as "no adapter".
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qpeft.triton_kernels.lora import _DOT_KIND, _precision, _to_dot  # the dense LoRA kernels' dot rules
from qpeft.reference.multi_lora import ROWS_MAX_M  # batches of at most this many rows take the rows path

__all__ = ["lora_shrink_gathered_triton", "lora_expand_gathered_triton", "ROWS_MAX_M"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _lora_shrink_rows_kernel(x_ptr, a_ptr, rank_start_ptr, index_ptr, xa_ptr, K, L, stride_xm, stride_am,
                             stride_om, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    r_tile = tl.program_id(1)
    slot = tl.load(index_ptr + row).to(tl.int32)
    if (slot >= 0) & (slot < L):
        lo = tl.load(rank_start_ptr + slot)
        rank = tl.load(rank_start_ptr + slot + 1) - lo
        rr = r_tile * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = rr < rank
        if r_tile * BLOCK_R < rank:
            acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                k_ok = rk < K
                xk = tl.load(x_ptr + row * stride_xm + rk, mask=k_ok, other=0.0).to(tl.float32)
                a = tl.load(a_ptr + (lo + rr)[:, None].to(tl.int64) * stride_am + rk[None, :],
                            mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(a * xk[None, :], axis=1)
            tl.store(xa_ptr + row * stride_om + rr, acc, mask=r_ok)


@triton.jit
def _lora_expand_rows_kernel(y_ptr, xa_ptr, b_ptr, rank_start_ptr, scale_ptr, index_ptr, out_ptr, N, L,
                             stride_ym, stride_xam, stride_bn, stride_om, BLOCK_N: tl.constexpr,
                             BLOCK_R: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    acc = tl.load(y_ptr + row * stride_ym + rn, mask=n_ok, other=0.0).to(tl.float32)
    slot = tl.load(index_ptr + row).to(tl.int32)
    if (slot >= 0) & (slot < L):
        lo = tl.load(rank_start_ptr + slot)
        rank = tl.load(rank_start_ptr + slot + 1) - lo
        lora = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < rank
            v = tl.load(xa_ptr + row * stride_xam + rr, mask=r_ok, other=0.0)
            b = tl.load(b_ptr + rn[:, None].to(tl.int64) * stride_bn + (lo + rr)[None, :],
                        mask=n_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            lora += tl.sum(b * v[None, :], axis=1)
        acc += tl.load(scale_ptr + slot) * lora
    tl.store(out_ptr + row * stride_om + rn, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _segment_rows(order_ptr, seg_start_ptr, seg, tile, BLOCK_M: tl.constexpr):
    """(row ids, valid mask, any valid) of the tile-th BLOCK_M rows of segment seg in sorted order."""
    lo = tl.load(seg_start_ptr + seg)
    hi = tl.load(seg_start_ptr + seg + 1)
    pos = lo + tile * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = pos < hi
    rows = tl.load(order_ptr + pos, mask=ok, other=0).to(tl.int64)
    return rows, ok, lo + tile * BLOCK_M < hi


@triton.jit
def _lora_shrink_segments_kernel(x_ptr, a_ptr, rank_start_ptr, order_ptr, seg_start_ptr, xa_ptr, K,
                                 stride_xm, stride_am, stride_om, DOT_KIND: tl.constexpr,
                                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                                 BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    r_tile = tl.program_id(1)
    slot = tl.program_id(2)  # segment slot + 1 (segment 0 holds the base rows: nothing to shrink)
    rows, m_ok, any_row = _segment_rows(order_ptr, seg_start_ptr, slot + 1, tile, BLOCK_M)
    lo = tl.load(rank_start_ptr + slot)
    rank = tl.load(rank_start_ptr + slot + 1) - lo
    if any_row & (r_tile * BLOCK_R < rank):
        rr = r_tile * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = rr < rank
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                         other=0.0)
            at = tl.load(a_ptr + (lo + rr)[None, :].to(tl.int64) * stride_am + rk[:, None],
                         mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            acc = tl.dot(_to_dot(xt, DOT_KIND), _to_dot(at, DOT_KIND), acc, input_precision=PRECISION)
        tl.store(xa_ptr + rows[:, None] * stride_om + rr[None, :], acc, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _lora_expand_segments_kernel(y_ptr, xa_ptr, b_ptr, rank_start_ptr, scale_ptr, order_ptr, seg_start_ptr,
                                 out_ptr, N, stride_ym, stride_xam, stride_bn, stride_om,
                                 DOT_KIND: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    tile = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    seg = tl.program_id(2)  # 0: base rows (copied), s >= 1: adapter slot s - 1
    rows, m_ok, any_row = _segment_rows(order_ptr, seg_start_ptr, seg, tile, BLOCK_M)
    if any_row:
        n_ok = rn < N
        mask = m_ok[:, None] & n_ok[None, :]
        acc = tl.load(y_ptr + rows[:, None] * stride_ym + rn[None, :], mask=mask, other=0.0).to(tl.float32)
        if seg > 0:
            slot = seg - 1
            lo = tl.load(rank_start_ptr + slot)
            rank = tl.load(rank_start_ptr + slot + 1) - lo
            lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r0 in range(0, rank, BLOCK_R):
                rr = r0 + tl.arange(0, BLOCK_R)
                r_ok = rr < rank
                v = tl.load(xa_ptr + rows[:, None] * stride_xam + rr[None, :], mask=m_ok[:, None] & r_ok[None, :],
                            other=0.0)
                bt = tl.load(b_ptr + rn[None, :].to(tl.int64) * stride_bn + (lo + rr)[:, None],
                             mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                lora = tl.dot(_to_dot(v, DOT_KIND), _to_dot(bt, DOT_KIND), lora, input_precision=PRECISION)
            acc += tl.load(scale_ptr + slot) * lora
        tl.store(out_ptr + rows[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _sorted_segments(index: torch.Tensor, num_adapters: int) -> tuple[torch.Tensor, torch.Tensor]:
    from qpeft.reference.multi_lora import sort_rows_by_adapter_ref

    # out-of-range slots become -1 (the base segment) so that no segment reads past the pool
    safe = torch.where((index >= 0) & (index < num_adapters), index, torch.full_like(index, -1))
    return sort_rows_by_adapter_ref(safe, num_adapters)


def _use_rows(M: int, path: str | None) -> bool:
    if path not in (None, "rows", "segments"):
        raise ValueError(f"path must be None, 'rows' or 'segments', got {path!r}")
    return path == "rows" or (path is None and M <= ROWS_MAX_M)


def lora_shrink_gathered_triton(x: torch.Tensor, A_cat: torch.Tensor, rank_start: torch.Tensor,
                                index: torch.Tensor, max_rank: int, path: str | None = None) -> torch.Tensor:
    """xa (M, max_rank) fp32; x (M, K), A_cat (R, K), index (M,) contiguous. path: force "rows"/"segments"."""
    M, K = x.shape
    L = rank_start.shape[0] - 1
    xa = torch.zeros((M, max_rank), device=x.device, dtype=torch.float32)
    if M == 0 or L == 0:
        return xa
    if _use_rows(M, path):
        # (BLOCK_R x BLOCK_K) elementwise tile over 128 threads: 32 x 64 keeps values + 64-bit addresses in
        # registers on sm_90 (64 x 128 spilled 336 B per thread)
        BR = _pow2(max_rank, 16, 32)
        BK = 64
        _lora_shrink_rows_kernel[(M, triton.cdiv(max_rank, BR))](
            x, A_cat, rank_start, index, xa, K, L, x.stride(0), A_cat.stride(0), xa.stride(0),
            BLOCK_R=BR, BLOCK_K=BK, num_warps=4)
        return xa
    order, seg_start = _sorted_segments(index, L)
    dot = x.dtype
    BM, BR = (32, _pow2(max_rank, 16, 32)) if _INTERPRET else (64, _pow2(max_rank, 16, 64))
    # fp32 (IEEE FMA loops, operands in registers): 16-wide K steps, as triton_kernels/lora.py's fp32 tiles
    BK = 32 if _INTERPRET else (16 if dot == torch.float32 else 64)
    grid = (triton.cdiv(M, BM), triton.cdiv(max_rank, BR), L)
    _lora_shrink_segments_kernel[grid](
        x, A_cat, rank_start, order, seg_start, xa, K, x.stride(0), A_cat.stride(0), xa.stride(0),
        DOT_KIND=_DOT_KIND[dot], PRECISION=_precision(dot), BLOCK_M=BM, BLOCK_R=BR, BLOCK_K=BK, num_warps=4)
    return xa


def lora_expand_gathered_triton(y: torch.Tensor, xa: torch.Tensor, B_cat: torch.Tensor, rank_start: torch.Tensor,
                                scale: torch.Tensor, index: torch.Tensor, path: str | None = None) -> torch.Tensor:
    """out (M, N) in y's dtype = y + scale_a xa B_a^T per row; all inputs contiguous."""
    M, N = y.shape
    L = rank_start.shape[0] - 1
    out = torch.empty_like(y)
    if M == 0 or N == 0:
        return out
    max_rank = xa.shape[1]
    if _use_rows(M, path):
        BN, BR = 128, 16  # 256 x 32 spilled 336 B per thread on sm_90 (REG:255)
        _lora_expand_rows_kernel[(M, triton.cdiv(N, BN))](
            y, xa, B_cat, rank_start, scale, index, out, N, L, y.stride(0), xa.stride(0), B_cat.stride(0),
            out.stride(0), BLOCK_N=BN, BLOCK_R=BR, num_warps=4)
        return out
    order, seg_start = _sorted_segments(index, L)
    dot = y.dtype
    BM, BN = (32, 32) if _INTERPRET else (64, 128 if dot != torch.float32 else 64)
    BR = _pow2(max_rank, 16, 32 if (_INTERPRET or dot == torch.float32) else 64)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN), L + 1)
    _lora_expand_segments_kernel[grid](
        y, xa, B_cat, rank_start, scale, order, seg_start, out, N, y.stride(0), xa.stride(0), B_cat.stride(0),
        out.stride(0), DOT_KIND=_DOT_KIND[dot], PRECISION=_precision(dot), BLOCK_M=BM, BLOCK_N=BN, BLOCK_R=BR,
        num_warps=8)  # two (BLOCK_M, BLOCK_N) fp32 tiles (y and the LoRA term): 4 warps spilled at 64 x 128
    return out
