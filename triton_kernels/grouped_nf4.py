"""Triton kernels of the grouped NF4 expert ops (qpeft/ops/grouped_nf4.py; layout in reference/grouped_nf4.py).

Slots (token, expert pairs) are sorted by expert; expert e owns slots seg_start[e] : seg_start[e+1]. The
M dimension is cut into BLOCK_M-row tiles *per expert* (no tile spans two experts), listed by a tile map
built on the device with torch ops (`_tile_map`: tiles per expert, cumsum, searchsorted; no host read).
The grid (cdiv(S, BLOCK_M) + min(E, S) tiles x output-column tiles) depends on shapes only, so a launch is
CUDA-graph capturable; a tile past the last expert's returns at once (vLLM's moe_align_block_size idea,
with the padding kept out of the data: rows past a segment's end are masked, never copied). Experts with no
slots get no tile, so they cost nothing, and one expert taking every slot is just a long list of its tiles.

Kernels:
* `_grouped_nf4_kernel`: out[o(s)] = a[i(s)] @ W'_e^T (+ bias[e]) (+ lora_scale * p[s] @ Q_e^T), where W'_e
  (OUT, RED) is expert e's 4-bit slice S_e read in place (OUT_ROWS: S_e is (OUT, RED); else S_e is (RED, OUT),
  read transposed). That one kernel is the forward (W' = W) and dX (W' = W^T) of both orientations:
      forward, (out, in) slices (Qwen, Mixtral)    S_e = (N, K) = W'      OUT_ROWS
      forward, (in, out) slices (gpt-oss)           S_e = (K, N) = W'^T
      dX, (out, in) slices                          S_e = (N, K) = W'^T
      dX, (in, out) slices                          S_e = (K, N) = W'      OUT_ROWS
  The 4-bit tile is dequantized in registers (code book lookup x absmax, the double-quant absmax decoded
  in-kernel) and fed to tl.dot; with 16-bit activations on sm_80+ through the register code book of
  nf4_matmul (REG_BOOK: one 32-bit load per 8 weights, PRMT lookups, no code-book gather per weight; the
  slice's rows must start on an absmax block and every slice on 4 bytes; a double-quantized absmax read as
  nf4_matmul's launches read it: NESTED_TABLE, ABSMAX_WORDS), else by a gather per nibble
  (fp32, odd slice widths, the interpreter); fp32 accumulation; input rows gathered through i(s) (e.g. the token of slot
  s, so the (S, H) copy of the hidden states is never written) and output rows scattered through o(s) (back
  to (token, k) order). The LoRA expand is an epilogue (p = xa (S, r) fp32, Q_e = B_e; in dX p = dy B,
  Q_e = A_e^T), added to the accumulator before the one store.
* `_grouped_lora_shrink_kernel`: xa[s] = a[i(s)] @ M_e^T, M (E, r, K) through strides (A, or B^T for dy B).
* `_grouped_lora_grad_kernel`: C[e] = scale * sum over e's slots of u[i(s)]^T v[j(s)] (the LoRA weight
  gradients dA_e = s dyb_e^T x_e, dB_e = s dy_e^T xa_e, and bias gradients), one program per (expert, split,
  output tile) looping over the expert's slots; SPLIT > 1 cuts each expert's slots into SPLIT chunks whose
  partial sums are added by the launcher (deterministic: no atomics).

Tiles are unmeasured starting points picked from the slot count per expert (no GPU here to tune them); every
one is compiled for sm_90 without register spills in tests/ops/test_triton_sm90.py.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._nf4_register_book import load_book
# the pinned fp32 roundings of the double-quant scale; the register code book's tile loader and its conditions
from .nf4_matmul import (NESTED_CODE_ENTRIES, _add_rn, _dequant_tile_words, _mul_rn, _nested_reads,
                         _register_book_fits)

__all__ = ["grouped_nf4_matmul_triton", "grouped_nf4_matmul_dx_triton", "grouped_lora_shrink_triton",
           "grouped_lora_grad_triton"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NESTED_BLOCKSIZE = tl.constexpr(256)  # absmax values per double-quant block (bitsandbytes)
_DOT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@triton.jit
def _as_dot(t, DOT_KIND: tl.constexpr):
    """The tl.dot operand type: the activations' dtype (16-bit: tensor cores; fp32: IEEE products)."""
    if DOT_KIND == 0:
        return t.to(tl.float32)
    elif DOT_KIND == 1:
        return t.to(tl.float16)
    else:
        return t.to(tl.bfloat16)


@triton.jit
def _block_scale(absmax_ptr, block, mask, nested_absmax_ptr, nested_code_ptr, offset, NESTED: tl.constexpr):
    """fp32 absmax of quantization block `block` of one expert: absmax itself, or with double quant
    nested_code[q] * nested_absmax[block // 256] + offset (bitsandbytes' decode)."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        # two roundings, never one FFMA (see nf4_matmul._mul_rn): the scale bitsandbytes and the reference decode
        return _add_rn(_mul_rn(tl.load(nested_code_ptr + q), scale2), offset)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def _stored_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset, rows, row_ok, c0,
                 C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                 ALIGNED: tl.constexpr):
    """fp32 tile S[rows, c0 : c0 + BLOCK_C] of one expert's stored slice S (R, C), 0 outside it. rows: int64
    (BLOCK_R,). Element r*C + c of the flattened slice is in byte (r*C + c) // 2, high nibble when even.
    ALIGNED (C % BLOCKSIZE == 0, c0 % BLOCK_C == 0): rows start on a byte and a block, so one byte load per
    two weights and one absmax per block; otherwise one gather per element (any C, odd C included)."""
    cols = c0 + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    if ALIGNED:
        half = C // 2
        cb = c0 // 2 + tl.arange(0, BLOCK_C // 2)
        byte = tl.load(packed_ptr + rows[:, None] * half + cb[None, :],
                       mask=row_ok[:, None] & (cb < half)[None, :], other=0).to(tl.int32)
        hi = tl.load(code_ptr + (byte >> 4))    # element 2j
        lo = tl.load(code_ptr + (byte & 0xF))   # element 2j + 1
        values = tl.reshape(tl.join(hi, lo), (BLOCK_R, BLOCK_C))
        GROUPS: tl.constexpr = BLOCK_C // BLOCKSIZE if BLOCK_C >= BLOCKSIZE else 1
        g = tl.arange(0, GROUPS)
        block = rows[:, None] * (C // BLOCKSIZE) + c0 // BLOCKSIZE + g[None, :]
        gmask = row_ok[:, None] & (c0 + g * BLOCKSIZE < C)[None, :]
        scale = _block_scale(absmax_ptr, block, gmask, nested_absmax_ptr, nested_code_ptr, offset, NESTED)
        if GROUPS == 1:
            w = values * scale
        else:
            w = values * tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_R, GROUPS, BLOCK_C // GROUPS)),
                                    (BLOCK_R, BLOCK_C))
    else:
        el = rows[:, None] * C + cols[None, :]
        m = row_ok[:, None] & col_ok[None, :]
        byte = tl.load(packed_ptr + (el >> 1), mask=m, other=0).to(tl.int32)
        nibble = (byte >> ((1 - (el & 1)) * 4).to(tl.int32)) & 0xF
        scale = _block_scale(absmax_ptr, el // BLOCKSIZE, m, nested_absmax_ptr, nested_code_ptr, offset, NESTED)
        w = tl.load(code_ptr + nibble) * scale
    return tl.where(row_ok[:, None] & col_ok[None, :], w, 0.0)


@triton.jit
def _slice_tile(packed_ptr, absmax_ptr, code_ptr, book, nested_absmax_ptr, nested_code_ptr, offset, rows, row_ok, c0,
                C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                ALIGNED: tl.constexpr, REG_BOOK: tl.constexpr, OUT_DTYPE: tl.constexpr, nested_table,
                ABSMAX_WORDS: tl.constexpr):
    """The tile S[rows, c0 : c0 + BLOCK_C] of one expert's slice, 0 outside it: through the register code book
    (REG_BOOK, `book` its 16 values: OUT_DTYPE, the launcher's conditions of nf4_matmul's `_dequant_tile_words`),
    else fp32 by `_stored_tile`."""
    if REG_BOOK:
        return _dequant_tile_words(packed_ptr, absmax_ptr, book, nested_absmax_ptr, nested_code_ptr, offset, rows,
                                   row_ok, c0, C, BLOCK_R, BLOCK_C, BLOCKSIZE, NESTED, False, OUT_DTYPE,
                                   nested_table, ABSMAX_WORDS)
    else:
        return _stored_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset, rows,
                            row_ok, c0, C, BLOCK_R, BLOCK_C, BLOCKSIZE, NESTED, ALIGNED)


@triton.jit
def _grouped_nf4_kernel(
    # activations (rows, RED) gathered through a_index, output (S, OUT) scattered through out_index
    a_ptr, a_index_ptr, stride_am, out_ptr, out_index_ptr, stride_om,
    # tile map and segments
    tile_expert_ptr, tile_row_ptr, seg_start_ptr, E, OUT, RED, C,
    # 4-bit expert stack; per-expert strides in elements
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, stride_pe, stride_ae,
    stride_ne,
    # epilogue: bias (E, OUT); LoRA p (S, R) @ Q_e (OUT, R)^T * lora_scale
    bias_ptr, stride_be, p_ptr, stride_pm, q_ptr, stride_qe, stride_qo, stride_qr, R, lora_scale,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, OUT_ROWS: tl.constexpr, HAS_A_INDEX: tl.constexpr,
    HAS_OUT_INDEX: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, ALIGNED: tl.constexpr,
    DOT_KIND: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, REG_BOOK: tl.constexpr = False,
    NESTED_TABLE: tl.constexpr = False, ABSMAX_WORDS: tl.constexpr = False,
):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + t)
    if e < E:
        row0 = tl.load(tile_row_ptr + t)
        end = tl.load(seg_start_ptr + e + 1)
        slots = row0 + tl.arange(0, BLOCK_M)
        m_ok = slots < end
        if HAS_A_INDEX:
            a_rows = tl.load(a_index_ptr + slots, mask=m_ok, other=0).to(tl.int64)
        else:
            a_rows = slots.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < OUT
        e64 = e.to(tl.int64)
        packed_e = packed_ptr + e64 * stride_pe
        absmax_e = absmax_ptr + e64 * stride_ae
        nested_e = nested_absmax_ptr
        offset = 0.0
        if NESTED:
            nested_e = nested_absmax_ptr + e64 * stride_ne
            offset = tl.load(offset_ptr + e)

        book = 0  # the register code book's 16 values, loaded once per program where the launch takes it
        if REG_BOOK:
            book = load_book(code_ptr)
        # the double-quantized absmax as nf4_matmul's register code book launches read it (`_block_scales`): the
        # nested code book gathered from a register table, the codes as 32-bit words where the launcher allows
        nested_table = None
        if NESTED_TABLE:
            nested_table = tl.load(nested_code_ptr + tl.arange(0, NESTED_CODE_ENTRIES))

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, RED, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < RED
            x = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if OUT_ROWS:  # stored (OUT, RED): a (BLOCK_N, BLOCK_K) tile, used transposed
                w = _slice_tile(packed_e, absmax_e, code_ptr, book, nested_e, nested_code_ptr, offset,
                                offs_n.to(tl.int64), n_ok, k0, C, BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED, ALIGNED,
                                REG_BOOK, a_ptr.dtype.element_ty, nested_table, ABSMAX_WORDS)
                acc = tl.dot(_as_dot(x, DOT_KIND), tl.trans(_as_dot(w, DOT_KIND)), acc, input_precision=PRECISION)
            else:  # stored (RED, OUT): a (BLOCK_K, BLOCK_N) tile, used as it is
                w = _slice_tile(packed_e, absmax_e, code_ptr, book, nested_e, nested_code_ptr, offset,
                                offs_k.to(tl.int64), k_ok, pid_n * BLOCK_N, C, BLOCK_K, BLOCK_N, BLOCKSIZE, NESTED,
                                ALIGNED, REG_BOOK, a_ptr.dtype.element_ty, nested_table, ABSMAX_WORDS)
                acc = tl.dot(_as_dot(x, DOT_KIND), _as_dot(w, DOT_KIND), acc, input_precision=PRECISION)

        if HAS_BIAS:
            acc += tl.load(bias_ptr + e64 * stride_be + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_LORA:
            lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                r_ok = offs_r < R
                p = tl.load(p_ptr + slots[:, None].to(tl.int64) * stride_pm + offs_r[None, :],
                            mask=m_ok[:, None] & r_ok[None, :], other=0.0)
                qt = tl.load(q_ptr + e64 * stride_qe + offs_r[:, None] * stride_qr + offs_n[None, :] * stride_qo,
                             mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                lora = tl.dot(_as_dot(p, DOT_KIND), _as_dot(qt, DOT_KIND), lora, input_precision=PRECISION)
            acc += lora_scale * lora

        if HAS_OUT_INDEX:
            o_rows = tl.load(out_index_ptr + slots, mask=m_ok, other=0).to(tl.int64)
        else:
            o_rows = slots.to(tl.int64)
        tl.store(out_ptr + o_rows[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _grouped_lora_shrink_kernel(a_ptr, a_index_ptr, stride_am, m_ptr, stride_me, stride_mr, stride_mk, xa_ptr,
                                stride_xm, tile_expert_ptr, tile_row_ptr, seg_start_ptr, E, K, R,
                                HAS_A_INDEX: tl.constexpr, DOT_KIND: tl.constexpr, PRECISION: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    pid_r = tl.program_id(1)
    e = tl.load(tile_expert_ptr + t)
    if e < E:
        row0 = tl.load(tile_row_ptr + t)
        end = tl.load(seg_start_ptr + e + 1)
        slots = row0 + tl.arange(0, BLOCK_M)
        m_ok = slots < end
        if HAS_A_INDEX:
            a_rows = tl.load(a_index_ptr + slots, mask=m_ok, other=0).to(tl.int64)
        else:
            a_rows = slots.to(tl.int64)
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        m_e = m_ptr + e.to(tl.int64) * stride_me
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            mt = tl.load(m_e + offs_r[None, :] * stride_mr + offs_k[:, None] * stride_mk,
                         mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            acc = tl.dot(_as_dot(x, DOT_KIND), _as_dot(mt, DOT_KIND), acc, input_precision=PRECISION)
        tl.store(xa_ptr + slots[:, None].to(tl.int64) * stride_xm + offs_r[None, :], acc,
                 mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _grouped_lora_grad_kernel(u_ptr, u_index_ptr, stride_um, v_ptr, v_index_ptr, stride_vm, c_ptr, stride_cs,
                              stride_ce, stride_cp, seg_start_ptr, P, Q, SPLIT, scale, HAS_U_INDEX: tl.constexpr,
                              HAS_V_INDEX: tl.constexpr, DOT_KIND: tl.constexpr, PRECISION: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr):
    pid = tl.program_id(0)
    e = pid // SPLIT
    split = pid % SPLIT
    lo = tl.load(seg_start_ptr + e)
    hi = tl.load(seg_start_ptr + e + 1)
    per = tl.cdiv(tl.cdiv(hi - lo, SPLIT), BLOCK_M) * BLOCK_M  # each split: whole BLOCK_M steps
    start = lo + split * per
    stop = tl.minimum(start + per, hi)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = offs_p < P
    q_ok = offs_q < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for s0 in range(start, stop, BLOCK_M):
        slots = s0 + tl.arange(0, BLOCK_M)
        ok = slots < stop
        if HAS_U_INDEX:
            u_rows = tl.load(u_index_ptr + slots, mask=ok, other=0).to(tl.int64)
        else:
            u_rows = slots.to(tl.int64)
        if HAS_V_INDEX:
            v_rows = tl.load(v_index_ptr + slots, mask=ok, other=0).to(tl.int64)
        else:
            v_rows = slots.to(tl.int64)
        ut = tl.load(u_ptr + u_rows[None, :] * stride_um + offs_p[:, None], mask=p_ok[:, None] & ok[None, :],
                     other=0.0)
        v = tl.load(v_ptr + v_rows[:, None] * stride_vm + offs_q[None, :], mask=ok[:, None] & q_ok[None, :],
                    other=0.0)
        acc = tl.dot(_as_dot(ut, DOT_KIND), _as_dot(v, DOT_KIND), acc, input_precision=PRECISION)
    c = c_ptr + split.to(tl.int64) * stride_cs + e.to(tl.int64) * stride_ce
    tl.store(c + offs_p[:, None].to(tl.int64) * stride_cp + offs_q[None, :], acc * scale,
             mask=p_ok[:, None] & q_ok[None, :])


# ------------------------------------------------------------------------------------------------ launchers
def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _precision(dtype: torch.dtype) -> str:
    # fp32 operands: IEEE products (tf32 would lose ~3 decimal digits against torch's fp32 matmul)
    return "ieee" if dtype == torch.float32 else "tf32"


def _tile_map(seg_start: torch.Tensor, S: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(tile_expert, tile_row, T): tile t covers slots tile_row[t] .. + BLOCK_M of expert tile_expert[t]
    (== E past the last tile). T = cdiv(S, BLOCK_M) + min(E, S) bounds the tile count for any routing (each
    non-empty expert wastes at most one partial tile) and depends on shapes only. Device ops, no host read."""
    E = seg_start.shape[0] - 1
    counts = (seg_start[1:] - seg_start[:-1]).to(torch.int64)
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    T = triton.cdiv(S, block_m) + min(E, S)
    t = torch.arange(T, device=seg_start.device, dtype=torch.int64)
    tile_expert = torch.searchsorted(tile_end, t, right=True)
    e = tile_expert.clamp(max=E - 1)
    tile_row = seg_start[e].to(torch.int64) + (t - (tile_end[e] - tiles[e])) * block_m
    return tile_expert.to(torch.int32), tile_row.to(torch.int32), T


def _gemm_config(S: int, E: int, dtype: torch.dtype, register_book: bool = False) -> dict:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) from the mean slots per expert: a decode step (a few slots per
    expert) gets 16-row tiles, a training batch 64-row ones. Unmeasured starting points (no GPU here);
    each compiles for sm_90 without spills (tests/ops/test_triton_sm90.py)."""
    per_expert = triton.cdiv(S, max(1, min(E, S)))
    if _INTERPRET:  # the interpreter's cost is per program and per op: small tiles, few wasted rows
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4)
    if dtype == torch.float32:  # IEEE dots run as FMA loops on operands in registers: smaller tiles
        bm = 16 if per_expert <= 16 else (32 if per_expert <= 32 else 64)
        # (32, 32, 32) with 8 warps spilled 8 B (ptxas kept it at 128 registers); with 4 warps it does not
        return dict(BLOCK_M=bm, BLOCK_N=64 if bm == 64 else 32, BLOCK_K=16 if bm == 64 else 32,
                    num_warps=8 if bm == 64 else 4)
    if per_expert <= 16:  # 16 x 64 x 128 spilled 8 B with Triton 3.6 (not 3.9) in the scatter-store variant
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4)
    if per_expert <= 32:
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4)
    if register_book:
        # 64-wide K steps: the code-book planes (32 instructions per row and absmax block) and the scale decode
        # are made once per 64 weights of a row instead of 32. sm_90 SASS of Qwen-style experts (H = 2048, bf16):
        # 14.1-15.6 -> 11.1-12.5 main-loop instructions per weight, 103-120 registers (two 8-warp CTAs per SM),
        # 50 KB of shared memory, no spills. 64 x 128 x 128 is 10.0-10.6 but takes 144-161 registers (one CTA).
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8)


def _launch_gemm(a, a_index, out, out_index, seg_start, out_features, red, out_rows, C, packed, absmax, code,
                 blocksize, nested_absmax, nested_code, offset, bias, p, q, q_strides, lora_scale, config):
    S = out.shape[0]
    E = packed.shape[0]
    # the register code book (as in nf4_matmul): 16-bit activations, the aligned layout, and every expert's slice
    # 4-byte aligned (read as 32-bit words); cfg["REG_BOOK"] = False keeps the gather loader (tests compare them)
    fits = packed.stride(0) % 4 == 0 and _register_book_fits(C, blocksize, a.dtype, packed, code)
    cfg = dict(config or _gemm_config(S, E, a.dtype, register_book=fits))
    num_warps = cfg.pop("num_warps", 4)
    num_stages = cfg.pop("num_stages", None)
    aligned = cfg.pop("ALIGNED", True) and C % blocksize == 0
    reg_book = bool(cfg.pop("REG_BOOK", True) and aligned and fits)
    if not aligned and config is None:
        # the per-element loader holds an int64 element index, byte, nibble and scale per weight: with the
        # aligned tiles' K steps it spilled on sm_90 (16 x 64 x 128: 255 registers + spills and 221 KB of shared
        # memory); 32-wide K steps (16 for fp32) do not
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 16 if a.dtype == torch.float32 else 32)
    tile_expert, tile_row, T = _tile_map(seg_start, S, cfg["BLOCK_M"])
    nested = nested_absmax is not None
    has_lora = p is not None
    R = p.shape[1] if has_lora else 0
    dummy = code
    grid = (T, triton.cdiv(out_features, cfg["BLOCK_N"]))
    _grouped_nf4_kernel[grid](
        a, a_index if a_index is not None else dummy, a.stride(0), out,
        out_index if out_index is not None else dummy, out.stride(0),
        tile_expert, tile_row, seg_start, E, out_features, red, C,
        packed, absmax, code, nested_absmax if nested else dummy, nested_code if nested else dummy,
        offset if nested else dummy, packed.stride(0), absmax.stride(0), nested_absmax.stride(0) if nested else 0,
        bias if bias is not None else dummy, bias.stride(0) if bias is not None else 0,
        p if has_lora else dummy, p.stride(0) if has_lora else 0, q if has_lora else dummy,
        *(q_strides if has_lora else (0, 0, 0)), R, float(lora_scale),
        BLOCKSIZE=blocksize, NESTED=nested, OUT_ROWS=out_rows, HAS_A_INDEX=a_index is not None,
        HAS_OUT_INDEX=out_index is not None, HAS_BIAS=bias is not None, HAS_LORA=has_lora, ALIGNED=aligned,
        DOT_KIND=_DOT_KIND[a.dtype], PRECISION=_precision(a.dtype), REG_BOOK=reg_book,
        **_nested_reads(reg_book, absmax, nested_code if nested else None, C // blocksize),
        BLOCK_R=_pow2(R, 16, 16 if _INTERPRET else 32), num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}), **cfg)
    return out


def grouped_nf4_matmul_triton(a, a_index, packed, absmax, code, blocksize, N, transposed, nested_absmax,
                              nested_code, offset, seg_start, out_index, bias, lora_xa, lora_B, lora_scale,
                              config: dict | None = None) -> torch.Tensor:
    """(S, N) in a's dtype; see qpeft/ops/grouped_nf4.py (validated there; 2-D tensors row-contiguous)."""
    K = a.shape[1]
    S = a_index.shape[0] if a_index is not None else a.shape[0]
    out = torch.empty((S, N), dtype=a.dtype, device=a.device)
    if S == 0:
        return out
    # forward: W' = W (N, K); the slice is W itself (out, in) or W^T (in, out, gpt-oss)
    q_strides = (lora_B.stride(0), lora_B.stride(1), lora_B.stride(2)) if lora_B is not None else None
    return _launch_gemm(a, a_index, out, out_index, seg_start, N, K, not transposed, N if transposed else K,
                        packed, absmax, code, blocksize, nested_absmax, nested_code, offset, bias, lora_xa, lora_B,
                        q_strides, lora_scale, config)


def grouped_nf4_matmul_dx_triton(dy, dy_index, packed, absmax, code, blocksize, K, transposed, nested_absmax,
                                 nested_code, offset, seg_start, out_index, lora_dyb, lora_A, lora_scale,
                                 config: dict | None = None) -> torch.Tensor:
    """(S, K) in dy's dtype = dy @ W_e (+ lora_scale * dyb @ A_e) per slot."""
    N = dy.shape[1]
    S = dy_index.shape[0] if dy_index is not None else dy.shape[0]
    out = torch.empty((S, K), dtype=dy.dtype, device=dy.device)
    if S == 0:
        return out
    # dX: W' = W^T (K, N); the slice is (N, K) = W'^T, or (K, N) = W' for (in, out) slices. Q_e = A_e^T.
    q_strides = (lora_A.stride(0), lora_A.stride(2), lora_A.stride(1)) if lora_A is not None else None
    return _launch_gemm(dy, dy_index, out, out_index, seg_start, K, N, transposed, N if transposed else K,
                        packed, absmax, code, blocksize, nested_absmax, nested_code, offset, None, lora_dyb, lora_A,
                        q_strides, lora_scale, config)


def grouped_lora_shrink_triton(a, a_index, A, seg_start, config: dict | None = None) -> torch.Tensor:
    """(S, r) fp32: xa[s] = a[a_index[s]] @ A[e]^T; A (E, r, K) with any strides."""
    K = a.shape[1]
    S = a_index.shape[0] if a_index is not None else a.shape[0]
    E, R = A.shape[0], A.shape[1]
    xa = torch.empty((S, R), dtype=torch.float32, device=a.device)
    if S == 0:
        return xa
    per_expert = triton.cdiv(S, max(1, min(E, S)))
    if config is None:
        bm = 16 if (_INTERPRET or per_expert <= 16) else (32 if per_expert <= 32 else 64)
        fp32 = a.dtype == torch.float32
        config = dict(BLOCK_M=bm, BLOCK_R=_pow2(R, 16, 16 if _INTERPRET else 32),
                      BLOCK_K=32 if (_INTERPRET or fp32) else 64, num_warps=4)
    cfg = dict(config)
    num_warps = cfg.pop("num_warps", 4)
    tile_expert, tile_row, T = _tile_map(seg_start, S, cfg["BLOCK_M"])
    grid = (T, triton.cdiv(R, cfg["BLOCK_R"]))
    _grouped_lora_shrink_kernel[grid](
        a, a_index if a_index is not None else seg_start, a.stride(0), A, A.stride(0), A.stride(1), A.stride(2),
        xa, xa.stride(0), tile_expert, tile_row, seg_start, E, K, R, HAS_A_INDEX=a_index is not None,
        DOT_KIND=_DOT_KIND[a.dtype], PRECISION=_precision(a.dtype), num_warps=num_warps, **cfg)
    return xa


def _grad_split(S: int, E: int, tiles: int) -> int:
    """Slot chunks per expert: enough programs for ~2 per SM of an H100 (132) when experts x output tiles are
    fewer, and at most one chunk per 4 x 64 slots; 1 for typical training shapes (128 experts x >= 8 tiles)."""
    want = triton.cdiv(264, max(1, E * tiles))
    return max(1, min(want, triton.cdiv(S, 256), 32))


def grouped_lora_grad_triton(u, u_index, v, v_index, seg_start, scale, dot_dtype: torch.dtype | None = None,
                             config: dict | None = None) -> torch.Tensor:
    """(E, P, Q) fp32: C[e] = scale * sum_{s in e} u[u_index[s]]^T v[v_index[s]]. Products in `dot_dtype`
    (default: the 16-bit dtype among u, v, else fp32), fp32 accumulation."""
    E = seg_start.shape[0] - 1
    P, Q = u.shape[1], v.shape[1]
    S = u_index.shape[0] if u_index is not None else u.shape[0]
    if dot_dtype is None:
        halves = [t.dtype for t in (u, v) if t.dtype != torch.float32]
        dot_dtype = halves[0] if halves else torch.float32
    fp32 = dot_dtype == torch.float32
    if config is None:
        small = _INTERPRET or fp32
        config = dict(BLOCK_M=32 if small else 64, BLOCK_P=_pow2(P, 16, 32 if small else 64),
                      BLOCK_Q=_pow2(Q, 16, 32 if small else 64), num_warps=4)
    cfg = dict(config)
    num_warps = cfg.pop("num_warps", 4)
    tiles = triton.cdiv(P, cfg["BLOCK_P"]) * triton.cdiv(Q, cfg["BLOCK_Q"])
    split = cfg.pop("SPLIT", None) or (1 if _INTERPRET else _grad_split(S, E, tiles))
    c = torch.empty((split, E, P, Q), dtype=torch.float32, device=u.device)
    if E == 0 or P == 0 or Q == 0:
        return c.sum(0)
    grid = (E * split, triton.cdiv(P, cfg["BLOCK_P"]), triton.cdiv(Q, cfg["BLOCK_Q"]))
    _grouped_lora_grad_kernel[grid](
        u, u_index if u_index is not None else seg_start, u.stride(0), v, v_index if v_index is not None else seg_start,
        v.stride(0), c, c.stride(0), c.stride(1), c.stride(2), seg_start, P, Q, split, float(scale),
        HAS_U_INDEX=u_index is not None, HAS_V_INDEX=v_index is not None, DOT_KIND=_DOT_KIND[dot_dtype],
        PRECISION=_precision(dot_dtype), num_warps=num_warps, **cfg)
    return c[0] if split == 1 else c.sum(0)
