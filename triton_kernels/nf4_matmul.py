"""Triton kernels for y = x @ W^T (forward) and dx = dy @ W (input gradient) on a 4-bit NF4/FP4 weight.

The weight W (N, K) is never materialized: each program dequantizes the (BLOCK_N, BLOCK_K) tile it needs
in registers (code-book lookup x absmax, the double-quantized absmax decoded in-kernel) and feeds it to
tl.dot (or to a multiply-reduce for a single activation row). Accumulation is fp32.

Layout (bitsandbytes): element e = n*K + k of the flattened W lives in byte e // 2, HIGH nibble when e is
even; its scale is absmax[e // BLOCKSIZE]. Working from the flat element index handles K % blocksize != 0
(a block spanning two rows) and odd K (a row starting in the middle of a byte) with the same code.

Tile loaders: when K % blocksize == 0 (every real model shape) and the activations are 16-bit on sm_80+,
`_dequant_tile_words` reads W as 32-bit words of 8 codes and looks them up in a code book held in registers
(_nf4_register_book.py: per (row, block) the 16 scaled values as byte planes, then PRMTs; no memory access per
weight, bit-exact). Otherwise `_dequant_tile_aligned` loads one byte per two weights and one absmax per block and
gathers the code book from memory per nibble, and `_dequant_tile` gathers per element (any K, odd K included).

Configurations (one kernel per direction, picked by M in `_fwd_config` / `_dx_config`):
- forward decode, M <= 16: a GEMV. BLOCK_M is 1 for one row (multiply-reduce, no padding to 16 rows); 2..16 rows
  use tl.dot with BLOCK_M = 16. BLOCK_N shrinks until about 2 programs per SM stream the packed weight once
  (N = 4096 on 132 SMs: BLOCK_N = 8 at M = 1, 16 with tl.dot, i.e. 512 / 256 programs), so no split-K and no
  scratch buffer for 16-bit activations. For fp32 activations split-K (SPLIT_K > 1) adds fp32 partial sums with
  atomics into the output itself (zero-filled; one slice per split under torch's deterministic mode).
- M = 17..256 forward and every dx M <= 256, 16-bit activations with the register code book: the serial split of
  the reduction (`_split_k_config`, `_dx_split_config`): one M tile covers M and K (forward) or N (dx) is split
  across programs; each split stores an fp32 partial tile in a scratch buffer (splits x M x N floats, the one
  allocation besides the output) and the last split of a tile sums them in split order (`_serial_split_store`:
  deterministic, counters cached per stream by _split_counters.py, CUDA-graph capturable).
- otherwise, M > 16: a tiled GEMM, tl.dot on dequantized tiles in the K loop, no split. The tile is the largest
  of a spill-free list that still gives every SM a program (`_gemm_tiles`).
The auto dispatch (qpeft/ops/nf4_matmul_dispatch.py) may replace these defaults with configurations measured
on the GPU (qpeft/ops/nf4_matmul_tuned.py, written by benchmarks/tune_nf4_matmul.py).

Compiled offline for sm_90 (triton.compile with GPUTarget("cuda", 90, 32), SASS read with cuobjdump; no GPU
here), the 64-row and larger GEMM tiles issue HGMMA (wgmma), 16/32-row tiles HMMA.16816 (mma.sync), and the
M = 1 GEMV only FMAs. Every default tile compiles without register spills (tests check it); register pressure is
the constraint that picks the tiles. The static sm_90 model (benchmarks/static_sm90.py) ranks them; the GPU
measurements that should set them are owed (written on a machine without a GPU, tested under TRITON_INTERPRET=1,
the register code book's PTX through an emulator).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qpeft import _cuda
from qpeft.triton_kernels._nf4_register_book import load_book, lookup_words
from qpeft.triton_kernels._split_counters import split_counters

__all__ = ["nf4_matmul_triton", "nf4_matmul_dx_triton"]

# compiled kernels may only read globals declared constexpr
NESTED_BLOCKSIZE = tl.constexpr(256)  # absmax values per second-level (double-quant) block, as bitsandbytes
NESTED_CODE_ENTRIES = tl.constexpr(256)  # the nested code book (bitsandbytes' dynamic map): NESTED_TABLE's tensor
DECODE_MAX_M = 16
MAX_GRID_X = 2 ** 31 - 1  # programs on CUDA grid axis 0
MAX_GRID_Y = 65535        # ... on axes 1 and 2
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Rounding of the double-quantized absmax, pinned: code2[q] * absmax2 rounded to fp32, then + offset rounded
# again, as the reference and bitsandbytes compute it. A plain `a * b + c` is contracted into one FFMA when FP
# fusion is on (Triton's default up to 3.9; 3.10 turns it off), which moves the scale by up to 1 ulp and every
# weight of the block with it. mul.rn / add.rn (libdevice __nv_fmul_rn / __nv_fadd_rn) are never contracted.
# The interpreter evaluates each operation separately (numpy), which is the same two roundings.
if _INTERPRET:
    @triton.jit
    def _mul_rn(a, b):
        return a * b

    @triton.jit
    def _add_rn(a, b):
        return a + b
else:
    from triton.language.extra.cuda import libdevice

    @triton.jit
    def _mul_rn(a, b):
        return libdevice.mul_rn(a, b)

    @triton.jit
    def _add_rn(a, b):
        return libdevice.add_rn(a, b)


@triton.jit
def _dequant_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                  rows, cols, mask, K,
                  BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    """fp32 W[rows, cols] (broadcast shapes), 0 where ~mask. rows/cols are int64."""
    e = rows * K + cols
    byte = tl.load(packed_ptr + (e >> 1), mask=mask, other=0).to(tl.int32)
    shift = (4 - (e & 1) * 4).to(tl.int32)  # even element -> high nibble
    nibble = (byte >> shift) & 0xF
    value = tl.load(code_ptr + nibble)
    block = e // BLOCKSIZE
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale2 = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = _add_rn(_mul_rn(tl.load(nested_code_ptr + q), scale2), offset)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return tl.where(mask, value * scale, 0.0)


@triton.jit
def _absmax_codes(absmax_ptr, block, gmask, offs_n, k0, K, BLOCKSIZE: tl.constexpr, GROUPS: tl.constexpr,
                  EVEN: tl.constexpr, WORDS: tl.constexpr):
    """The double-quantized absmax codes (uint8) of `block` as int32. WORDS: read as the 32-bit words that hold
    them (the launcher's `_nested_reads`: absmax 4-byte aligned, rows of whole words), which Triton's
    pipeliner copies ahead into shared memory (cp.async takes 4 bytes or more) like the weight; a byte load stays
    in registers and is waited on in the step that issues it."""
    if WORDS:  # rows hold whole words of codes (K // BLOCKSIZE % 4 == 0): the byte of a block is the same in
        # every row, a per-step constant, and the word index needs no 64-bit division
        word_ptr = absmax_ptr.to(tl.pointer_type(tl.int32))
        col = k0 // BLOCKSIZE + tl.arange(0, GROUPS)
        word = offs_n[:, None] * (K // (4 * BLOCKSIZE)) + (col // 4)[None, :]
        if EVEN:
            w = tl.load(word_ptr + word)
        else:
            w = tl.load(word_ptr + word, mask=gmask, other=0)
        return (w >> ((col % 4) * 8)[None, :]) & 0xFF
    if EVEN:
        return tl.load(absmax_ptr + block).to(tl.int32)
    return tl.load(absmax_ptr + block, mask=gmask, other=0).to(tl.int32)


@triton.jit
def _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, offs_n, mask_n, k0, K,
                  BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, EVEN: tl.constexpr,
                  nested_table=None, WORDS: tl.constexpr = False):
    """fp32 absmax [BLOCK_N, GROUPS] of the blocks of W[offs_n, k0:k0+BLOCK_K] (K % BLOCKSIZE == 0), the
    double-quantized ones decoded with the rounding pinned. `nested_table`: the 256 values of the nested code book
    as a register tensor (the kernels' NESTED_TABLE), gathered through shared memory (tl.gather) instead of global
    memory at an address that waits on the absmax load; WORDS: see `_absmax_codes`."""
    GROUPS: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K >= BLOCKSIZE else 1
    offs_g = tl.arange(0, GROUPS)
    block = (offs_n[:, None] * K + k0) // BLOCKSIZE + offs_g[None, :]
    gmask = mask_n[:, None] & (k0 + offs_g[None, :] * BLOCKSIZE < K)
    if NESTED:
        q = _absmax_codes(absmax_ptr, block, gmask, offs_n, k0, K, BLOCKSIZE, GROUPS, EVEN, WORDS)
        if EVEN:
            scale2 = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE)
        else:
            scale2 = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=gmask, other=0.0)
        if nested_table is None:
            code2 = tl.load(nested_code_ptr + q)
        else:
            code2 = tl.reshape(tl.gather(nested_table, tl.reshape(q, (q.numel,)), 0), q.shape)
        scale = _add_rn(_mul_rn(code2, scale2), offset)
    elif EVEN:
        scale = tl.load(absmax_ptr + block)
    else:
        scale = tl.load(absmax_ptr + block, mask=gmask, other=0.0)
    return scale


@triton.jit
def _dequant_tile_aligned(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                          offs_n, mask_n, k0, K,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                          NESTED: tl.constexpr, EVEN: tl.constexpr = False):
    """fp32 W[offs_n, k0:k0+BLOCK_K] when K % BLOCKSIZE == 0 (so rows start on a byte and a block boundary)
    and k0 % BLOCK_K == 0: one byte load per 2 weights (split into hi/lo nibbles and interleaved) and one
    absmax per BLOCKSIZE weights instead of one of each per weight in `_dequant_tile`. EVEN: the tile is
    entirely inside W (N and K multiples of the tile), so no load is masked (the masks cost ~3 ALU operations
    per weight in the sm_90 SASS of the 128 x 128 x 32 tile)."""
    half_k = K // 2
    offs_b = (k0 // 2 + tl.arange(0, BLOCK_K // 2)).to(tl.int64)
    if EVEN:
        byte = tl.load(packed_ptr + offs_n[:, None] * half_k + offs_b[None, :]).to(tl.int32)
    else:
        byte = tl.load(packed_ptr + offs_n[:, None] * half_k + offs_b[None, :],
                       mask=mask_n[:, None] & (offs_b[None, :] < half_k), other=0).to(tl.int32)
    hi = tl.load(code_ptr + (byte >> 4))   # element 2j: high nibble
    lo = tl.load(code_ptr + (byte & 0xF))  # element 2j + 1
    values = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))
    GROUPS: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K >= BLOCKSIZE else 1
    scale = _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, offs_n, mask_n, k0, K,
                          BLOCK_K, BLOCKSIZE, NESTED, EVEN)
    if GROUPS == 1:
        w = values * scale
    else:
        w = values * tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, GROUPS, BLOCK_K // GROUPS)),
                                (BLOCK_N, BLOCK_K))
    if EVEN:
        return w
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.where(mask_n[:, None] & (offs_k[None, :] < K), w, 0.0)


@triton.jit
def _dequant_tile_words(packed_ptr, absmax_ptr, book, nested_absmax_ptr, nested_code_ptr, offset,
                        offs_n, mask_n, k0, K,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                        NESTED: tl.constexpr, EVEN: tl.constexpr, OUT_DTYPE: tl.constexpr, nested_table=None,
                        ABSMAX_WORDS: tl.constexpr = False):
    """OUT_DTYPE W[offs_n, k0:k0+BLOCK_K] under the conditions of `_dequant_tile_aligned`, the packed weight
    4-byte aligned, through the register code book (`book`: its 16 fp32 values, loaded once per program): one
    32-bit load per 8 weights and no memory access per weight (_nf4_register_book.py). Bit-exact with the fp32
    loader's tile rounded to OUT_DTYPE. Not under the interpreter (inline PTX). `nested_table`, ABSMAX_WORDS: how
    the double-quantized absmax is read (`_block_scales`)."""
    WORDS: tl.constexpr = BLOCK_K // 8
    GROUPS: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K >= BLOCKSIZE else 1
    # K // 8, written so that Triton knows it as a multiple of 4 (K % 32 == 0: blocksize >= 32 divides K): rows of
    # words start 16-byte aligned, so a thread loads 4 consecutive words (32 weights of one absmax block) in one
    # 16-byte load and builds one table for them, not 8-byte loads from two rows with a table each (128 x 128 x 128
    # on sm_90, Triton 3.9: forward 10.56 -> 9.31, dx 11.47 -> 10.06 main-loop instructions per weight)
    row_words = (K // 32) * 4
    offs_w = (k0 // 8 + tl.arange(0, WORDS)).to(tl.int64)
    word_ptr = packed_ptr.to(tl.pointer_type(tl.int32))
    if EVEN:
        words = tl.load(word_ptr + offs_n[:, None] * row_words + offs_w[None, :])
    else:
        words = tl.load(word_ptr + offs_n[:, None] * row_words + offs_w[None, :],
                        mask=mask_n[:, None] & (offs_w[None, :] < row_words), other=0)
    scale = _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, offs_n, mask_n, k0, K,
                          BLOCK_K, BLOCKSIZE, NESTED, EVEN, nested_table, ABSMAX_WORDS)
    w = lookup_words(words, scale, book, BLOCK_N, WORDS, GROUPS, OUT_DTYPE)
    if EVEN:
        return w
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.where(mask_n[:, None] & (offs_k[None, :] < K), w, 0.0)


@triton.jit
def _serial_split_store(acc, out_ptrs, ws_ptrs, mask, stride_split, counter_ptr, tile, pid_s, SPLIT: tl.constexpr,
                        KEEP_OWN_PARTIAL: tl.constexpr):
    """Serial split epilogue: each split stores its fp32 partial tile, and the split that finishes last for this
    tile (its counter reads SPLIT - 1) sums all partials in split order, so the result does not depend on which
    program came last (deterministic), writes the output and sets the counter back to 0 (the buffer is reused by
    the next launch on the stream, _split_counters.py). The barrier puts every thread's partial before the
    counter's release; the acquire (and .cg loads, past L1) makes the others' visible.
    Two splits: the last adds the other's partial to its own accumulator (fp32 addition commutes, so p0 + p1 is
    the same sum whichever split came last), reading one partial tile back instead of two: the split's L2 traffic
    is 3 tiles, not 4 (8b q/o at M = 256: 101 -> 97 MB). More splits sum in split order, and with KEEP_OWN_PARTIAL
    take their own partial from the accumulator (the same fp32 values they stored) instead of reading it back:
    SPLIT + SPLIT - 1 partial tiles, not 2 * SPLIT (8b k/v forward at M = 128, 8 splits: 21.1 -> 20.6 MB). The
    forward's split config sets it for the tiles it speeds up (`_keeps_own_partial`)."""
    tl.store(ws_ptrs + pid_s * stride_split, acc, mask=mask)
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
    if arrived == SPLIT - 1:
        if SPLIT == 2:
            total = acc + tl.load(ws_ptrs + (1 - pid_s) * stride_split, mask=mask, other=0.0, cache_modifier=".cg")
        else:
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for s in range(SPLIT):  # a loop, not unrolled: 8 partial tiles in flight spilled 80 B
                if KEEP_OWN_PARTIAL:  # the own split's load is masked off: no bytes move. (A select, not
                    # `mask & (s != pid_s)`: Triton 3.9's interpreter types that mask int64 and refuses it)
                    part = tl.load(ws_ptrs + s * stride_split, mask=tl.where(s != pid_s, mask, False), other=0.0,
                                   cache_modifier=".cg")
                    total += tl.where(s == pid_s, acc, part)
                else:
                    total += tl.load(ws_ptrs + s * stride_split, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=mask)
        tl.atomic_xchg(counter_ptr + tile, 0)


@triton.jit
def _nf4_matmul_kernel(
    # activations (M, K) and output (M, N), row-major; split-K partials (deterministic mode) stride_split apart
    x_ptr, out_ptr, M, N, K, stride_xm, stride_om, stride_split,
    # 4-bit weight (N, K)
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
    # epilogue: bias (N,), LoRA xa (M, R) @ lora_B (N, R)^T * lora_scale
    bias_ptr, xa_ptr, lb_ptr, lora_scale, R, stride_xam, stride_lbn,
    # serial split-K (16-bit activations): fp32 partials (SPLIT_K, M, N) and one zeroed int32 counter per tile
    # (`_serial_split_store` leaves it zero again)
    ws_ptr, counter_ptr,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
    ATOMIC_SPLIT: tl.constexpr = True, SWAP_AXES: tl.constexpr = False, EVEN_NK: tl.constexpr = False,
    REG_BOOK: tl.constexpr = False, SERIAL_SPLIT: tl.constexpr = False, NESTED_TABLE: tl.constexpr = False,
    ABSMAX_WORDS: tl.constexpr = False, KEEP_OWN_PARTIAL: tl.constexpr = False,
    # the launch's first output column tile (of BLOCK_N): a column span of the launcher's (`_lead_span`). A
    # constexpr: as a runtime argument it cost the dx kernel's 256 x 64 x 128 tile 8 B of spills (sm_90, 3.9)
    N_TILE_START: tl.constexpr = 0,
):
    # M tiles on grid axis 0 and N tiles on axis 1, K splits on axis 2; more than 65,535 N tiles (axis 1's limit)
    # swap the two (SWAP_AXES, and the launcher then chunks M at 65,535 tiles). Only then: ptxas allocates the
    # swapped variant's registers differently, and some decode tiles spill in it.
    if SWAP_AXES:
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
    else:
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = ((N_TILE_START + pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)
    if REG_BOOK:
        book = load_book(code_ptr)
    # NESTED_TABLE: the nested (double-quant) code book's 256 fp32 values as a register tensor, gathered per K step
    # through shared memory (a store, a barrier, a load) by `_block_scales`. It replaces a global load whose
    # address is the absmax code just loaded: in the sm_90 SASS of the 256 x 128 x 64 tile that chain kept a warp
    # waiting 857 of the 1437 cycles of its K step alone (static sm_90 model: 0.93x -> 0.96x cuBLAS at M = 1024)
    nested_table = None
    if NESTED_TABLE:
        nested_table = tl.load(nested_code_ptr + tl.arange(0, NESTED_CODE_ENTRIES))

    # each split owns a contiguous, BLOCK_K-aligned range of K
    k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_begin = pid_k * k_span
    k_end = tl.minimum(k_begin + k_span, K)
    # bias and LoRA are added once, by the first K split. The LoRA product is the accumulator's initial value
    # rather than a second (BLOCK_M, BLOCK_N) fp32 tile added after the loop: that tile cost the 256 x 128 x 64
    # tile (16 warps, 128 registers per thread) 320 B of spills (sm_90, Triton 3.9).
    first = (pid_k == 0).to(tl.float32)
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        mask_r = offs_r < R
        xa = tl.load(xa_ptr + offs_m[:, None] * stride_xam + offs_r[None, :],
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        lb = tl.load(lb_ptr + offs_n[:, None] * stride_lbn + offs_r[None, :],
                     mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        if USE_DOT:
            lora = tl.dot(xa, tl.trans(lb), input_precision=DOT_PRECISION)
        else:
            lora = tl.sum(xa.to(tl.float32)[:, None, :] * lb.to(tl.float32)[None, :, :], axis=2)
        acc = (lora_scale * first) * lora
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        mask_k = offs_k < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if REG_BOOK:
            w = _dequant_tile_words(packed_ptr, absmax_ptr, book, nested_absmax_ptr, nested_code_ptr, offset,
                                    offs_n, mask_n, k0, K, BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED, EVEN_NK,
                                    x_ptr.dtype.element_ty, nested_table, ABSMAX_WORDS)
        elif ALIGNED:
            w = _dequant_tile_aligned(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                                      offs_n, mask_n, k0, K, BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED, EVEN_NK)
        else:
            w = _dequant_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                              offs_n[:, None], offs_k[None, :], mask_n[:, None] & mask_k[None, :], K,
                              BLOCKSIZE, NESTED)
        if USE_DOT:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT_PRECISION)
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)

    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += b[None, :] * first

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    elif SERIAL_SPLIT:  # 16-bit output: fp32 partials in ws, summed by the last split of the tile
        # the launch's own tile index: a column span's launch (`_lead_span`) has fewer N tiles than N
        tile = pid_m * tl.num_programs(0 if SWAP_AXES else 1) + pid_n
        _serial_split_store(acc, out_ptrs, ws_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out_mask,
                            stride_split, counter_ptr, tile, pid_k, SPLIT_K, KEEP_OWN_PARTIAL)
    elif ATOMIC_SPLIT:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
    else:  # deterministic: each split's partial sums into its own slice, summed in a fixed order afterwards
        tl.store(out_ptrs + pid_k * stride_split, acc, mask=out_mask)


@triton.jit
def _nf4_matmul_dx_kernel(
    # output gradient (M, N) and input gradient (M, K), row-major
    dy_ptr, dx_ptr, M, N, K, stride_dym, stride_dxm,
    # 4-bit weight (N, K)
    packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
    # epilogue: LoRA dyb (M, R) @ lora_A (R, K) * lora_scale
    dyb_ptr, la_ptr, lora_scale, R, stride_dybm, stride_lar,
    # serial split of the N reduction (SPLIT_N > 1): fp32 partials (SPLIT_N, M, K), one zeroed int32 counter per tile
    ws_ptr, counter_ptr, stride_split,
    # meta-parameters
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, HAS_LORA: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ALIGNED: tl.constexpr, EVEN_NK: tl.constexpr = False,  # the register code book's only: see nf4_matmul_dx_triton
    REG_BOOK: tl.constexpr = False, SPLIT_N: tl.constexpr = 1, NESTED_TABLE: tl.constexpr = False,
    ABSMAX_WORDS: tl.constexpr = False, KEEP_OWN_PARTIAL: tl.constexpr = False,
    K_TILE_START: tl.constexpr = 0,  # the launch's first dx column tile (of BLOCK_K), as the forward's N_TILE_START
):
    # M tiles on grid axis 0 (2^31 - 1), K tiles on axis 1 (<= 65,535: K up to 2M columns, checked by the launcher),
    # N splits on axis 2. (Swapping the first two axes puts the 128 x 64 x 128 tile over 255 registers: it spills.)
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    k_first = (K_TILE_START + pid_k) * BLOCK_K
    offs_k = (k_first + tl.arange(0, BLOCK_K)).to(tl.int64)
    mask_m = offs_m < M
    mask_k = offs_k < K
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)
    if REG_BOOK:
        book = load_book(code_ptr)
    nested_table = None
    if NESTED_TABLE:  # as in the forward
        nested_table = tl.load(nested_code_ptr + tl.arange(0, NESTED_CODE_ENTRIES))

    if HAS_LORA:  # the accumulator's initial value, as in the forward (no second fp32 tile)
        offs_r = tl.arange(0, R_PAD)
        mask_r = offs_r < R
        dyb = tl.load(dyb_ptr + offs_m[:, None] * stride_dybm + offs_r[None, :],
                      mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        la = tl.load(la_ptr + offs_r[:, None] * stride_lar + offs_k[None, :],
                     mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        if SPLIT_N == 1:
            acc = lora_scale * tl.dot(dyb, la, input_precision=DOT_PRECISION)
        else:  # added once, by the first split
            acc = (lora_scale * (pid_s == 0).to(tl.float32)) * tl.dot(dyb, la, input_precision=DOT_PRECISION)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    # each split owns a contiguous, BLOCK_N-aligned range of N. Unsplit, the loop is as before the split existed:
    # the range arithmetic cost the 128 x 128 x 128 tile ~1% at M >= 1024 (static sm_90 model)
    if SPLIT_N == 1:
        n_begin = 0
        n_end = N
    else:
        n_span = tl.cdiv(N, SPLIT_N * BLOCK_N) * BLOCK_N
        n_begin = pid_s * n_span
        n_end = tl.minimum(n_begin + n_span, N)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :],
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        # transposed use of the same (BLOCK_N, BLOCK_K) weight tile: dx += dy @ W
        if REG_BOOK:
            w = _dequant_tile_words(packed_ptr, absmax_ptr, book, nested_absmax_ptr, nested_code_ptr, offset,
                                    offs_n, mask_n, k_first, K, BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED,
                                    EVEN_NK, dy_ptr.dtype.element_ty, nested_table, ABSMAX_WORDS)
        elif ALIGNED:
            w = _dequant_tile_aligned(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                                      offs_n, mask_n, k_first, K, BLOCK_N, BLOCK_K, BLOCKSIZE, NESTED,
                                      EVEN_NK)
        else:
            w = _dequant_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                              offs_n[:, None], offs_k[None, :], mask_n[:, None] & mask_k[None, :], K,
                              BLOCKSIZE, NESTED)
        acc += tl.dot(dy, w.to(dy.dtype), input_precision=DOT_PRECISION)

    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :]
    if SPLIT_N == 1:
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])
    else:
        _serial_split_store(acc, dx_ptrs, ws_ptr + offs_m[:, None] * K + offs_k[None, :],
                            mask_m[:, None] & mask_k[None, :], stride_split, counter_ptr,
                            pid_m * tl.num_programs(1) + pid_k, pid_s, SPLIT_N, KEEP_OWN_PARTIAL)


@_cuda.cached
def _num_sms(device: torch.device) -> int:
    """Cached: the tile choice runs on every call, and decode calls are a few microseconds each."""
    rt = _cuda.rt
    if rt.is_cuda(device):
        return rt.multi_processor_count(device.index if device.index is not None else rt.current_device())
    return 132  # interpreter: pretend H100 so tiles are chosen as on the GPU


def _prev_pow2(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


# Tiled-GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), largest first. Every entry compiles for
# sm_90 without register spills with bias and the LoRA epilogue (ptxas via Triton 3.9, bf16, NF4 blocksize 64,
# double quant; tests/ops/test_nf4_matmul.py checks this offline), e.g. 128x128x32 with 8 warps: 221 registers,
# while 4 warps spill (128x64x64: 552 B) and so does 128x128x64 with 8 (120 B). dx names its tiles
# (BLOCK_M rows of dy, BLOCK_N reduction step over N, BLOCK_K columns of dx).
_FWD_GEMM_TILES = ((128, 128, 32, 8, 4), (128, 64, 64, 8, 3), (64, 128, 32, 8, 4), (64, 64, 64, 8, 3),
                   (32, 64, 64, 4, None), (32, 32, 128, 4, None), (16, 32, 128, 4, None))
_DX_GEMM_TILES = ((128, 64, 128, 8, 3), (128, 64, 64, 8, 3), (64, 64, 128, 8, 3), (64, 64, 64, 8, 3),
                  (32, 64, 64, 4, None), (32, 64, 32, 4, None), (16, 64, 32, 4, None))
# 16-bit activations with the register code book (`_register_book`): the loader holds no gather addresses, and
# the tiles are re-picked with the static sm_90 model (benchmarks/static_sm90.py, bf16, Llama-3-8B shapes) among
# those that compile without spills with bias and the LoRA epilogue, even without 16-divisible strides
# (tests/ops/test_nf4_matmul.py): forward 128 x 128 x 64 predicts 0.44x bf16 cuBLAS at M = 1024 on (4096, 4096)
# (the gather loader's 128 x 128 x 32: 0.30x), dx 128 x 64 x 128 0.37x (0.23x).
_FWD_GEMM_TILES_BOOK = ((128, 128, 64, 8, 3), (128, 64, 64, 8, 3), (64, 64, 128, 8, 3), (32, 64, 64, 4, None),
                        (16, 32, 128, 4, None))
_DX_GEMM_TILES_BOOK = ((128, 64, 128, 8, 3), (64, 64, 128, 8, 3), (64, 64, 64, 8, 3), (32, 64, 64, 4, None),
                       (16, 64, 32, 4, None))
# ... and ahead of them, when the launch is "wide" (`_wide_launch`: every pointer 16-byte aligned, every stride and
# the LoRA rank divisible by 16, so Triton vectorizes every load): 16-warp tiles, whose one CTA per SM hides the
# latency the 8-warp ones cannot. They sit at the 128-register cap of 16 warps: without the 16-divisibility (e.g.
# LoRA rank 8) they spill (8-500 B), hence the condition. The static sm_90 model (8b q/o at M = 1024, Triton 3.9):
# forward 256 x 128 x 64 in 4 stages 0.96x bf16 cuBLAS, dx 256 x 64 x 128 0.96x (128 x 128 x 128: 0.90x; it became
# spill-free with the dx kernel's unmasked whole-tile loads, EVEN_NK, and 16-byte word loads). The 16-warp
# 128 x 128 x 128 after the 256-row tiles takes over where those would leave more than a tenth of the last wave's
# SMs idle (`_gemm_tiles`' wave rule): 8b gate/up forward and down dx at M = 1024 (448 tiles of 256 rows on 132
# SMs, 3.4 waves): 0.85x -> 0.94x each.
_FWD_GEMM_TILES_BOOK_WIDE = ((256, 128, 64, 16, 4), (128, 128, 128, 16, 3)) + _FWD_GEMM_TILES_BOOK
_DX_GEMM_TILES_BOOK_WIDE = ((256, 64, 128, 16, 3), (128, 128, 128, 16, 3)) + _DX_GEMM_TILES_BOOK
# ... and the 256-row ones only up to this padded LoRA rank (R_PAD; 16 without LoRA): above it they spill 8 B under
# Triton 3.9 (forward at rank 128, which main's 256 x 128 x 64 x 3 stages did too; dx at 64 and 128), where the
# 128 x 128 x 128 tiles do not (ranks up to 256, Triton 3.6 and 3.9)
_WIDE_TILE_MAX_R_PAD = {(256, 128, 64, 16, 4): 64, (256, 64, 128, 16, 3): 32}
# ... skipped for the next 16-warp tile of the list when that one fills its last wave this much better
# (programs / (waves x SMs)): one CTA per SM, so a part-empty last wave idles whole SMs
_WAVE_FILL_GAIN = 0.1
# The 16-warp tile whose serial split compiles spill-free (forward and dx: the split tiles of M <= 256), which
# `_split_tail` runs, split, over the columns a 16-warp tile's last part-filled wave would cover
_SPLIT_TAIL_TILE = (128, 128, 128, 16, 3)
# The register code book's tiles count 128 programs on 132 SMs as full (e.g. M = 128, N = 4096: 2 x 64 tiles of
# 64 x 64), rather than dropping to a tile that re-decodes W for more M tiles.
_BOOK_FILL = 31 / 32
# Serial split-K tiles of the register code book's forward at M = 17..256 (`_split_k_config`).
SPLIT_MAX_M = 256
MAX_SPLIT_K = 8
_SPLIT_TILE = (64, 64, 128, 8, 3)
# 16 warps (two warpgroups of 64 rows: 114-128 registers, 16-divisible launches only: 128 + 344 B of stack without)
# rather than 8 (193-222 registers): the same single CTA per SM with twice the warps to hide latency. The model:
# 8b q/o / down M = 256 0.71x -> 0.78x / 0.84x cuBLAS (70b 0.71x -> 0.84-0.85x), k/v M = 128 0.67x / 0.70x ->
# 0.78x / 0.82x, gate/up / down / 70b q/o M = 128 1.15-1.33x -> 1.37-1.56x (8b q/o stays 1.23x: L2 bound)
_SPLIT_TILE_WIDE = (128, 128, 128, 16, 3)
# ... but 64 x 128 x 128, 8 warps (164-193 registers: one CTA per SM, spill-free to LoRA rank 256 under Triton 3.6
# and 3.9), where 128-row tiles split the most MAX_SPLIT_K allows still reach at most half the SMs (k/v, N = 1024, at
# M = 65..128: 8 tiles x 8 splits = 64 programs): W decoded twice, on twice the programs. The model: 70b k/v M = 128
# 0.93x -> 1.11x cuBLAS, M = 96 0.90x -> 1.22x, 8b k/v M = 96 0.84x -> 0.996x; 8b M = 128 0.87x -> 0.85x. And where
# it moves at least 1/8 fewer bytes through L2 (`_split_l2_bytes`: half the split's partials against W read
# twice): 8b k/v at M = 256, 38 -> 33 MB, 0.66x -> 0.75x (the crossover is ~8.5 TB/s of L2: above it the 128-row
# tile is the faster, 0.97x against 0.84x at 10)
_SPLIT_TILE_WIDE_NARROW_N = (64, 128, 128, 8, 3)
# M <= 64 on N <= 2048 (k/v of GQA models): 64 x 64 x 256, 8 warps (128-133 registers on 16-divisible launches,
# 220-231 without): the model puts 8b / 70b k/v at M = 17 at 0.99x / 1.09x cuBLAS, M = 64 1.08x / 1.18x, against
# 0.69x / 0.73x and 0.73x / 0.77x with 64 x 64 x 128
SPLIT_NARROW_N = 2048
_SPLIT_TILE_NARROW_N = (64, 64, 256, 8, 3)
# ... and at M <= 32 32 x 64 x 256, 8 warps (165-169 registers on 16-divisible launches): 8b / 70b k/v at M = 17
# 1.08x / 1.19x, M = 32 1.09x / 1.20x, against 0.99x / 1.09x and 1.04x / 1.14x with 64 x 64 x 256 (the 64-row
# tile's padding rows cost its programs issue slots and shared memory: one CTA per SM either way)
_SPLIT_TILE_NARROW_N_SMALL_M = (32, 64, 256, 8, 3)
# ... and of its dx at M <= 256 (`_dx_split_config`; dx tiles name BLOCK_M, the N step, BLOCK_K)
_DX_SPLIT_TILE_DECODE = (16, 64, 64, 4, None)
_DX_DECODE_TILE_BOOK = (16, 128, 32, 4, None)  # unsplit, when K alone gives 3 programs per SM
_DX_SPLIT_TILE = (64, 64, 128, 8, 3)
_DX_SPLIT_TILE_WIDE = (128, 128, 128, 16, 3)
# ... and 64-row tiles unsplit, 8 warps, where the 128-row tile's split partials reach 4x the weight's bytes
# (`_dx_partials_cap`) and the 64-row tiles alone fill the SMs: 64 x 256 x 128 where N is whole 256-row steps
# (169-214 registers, one CTA per SM, 200 KB of shared memory; spill-free to LoRA rank 256 under Triton 3.6, 3.8
# and 3.9), else 64 x 128 x 128 (125-127 registers). Both run one CTA per SM there (128 tiles on 132 SMs), so the
# longer N step halves the steps a CTA waits on: 8b k/v (4096, 1024) at M = 256 0.83x -> 0.93x bf16 cuBLAS (the
# 128-row split 0.58x), 70b k/v (8192, 1024) at M = 128 1.37x -> 1.52x (static sm_90 model, Triton 3.9; 3.6: 0.84x ->
# 0.94x, 1.38x -> 1.55x)
_DX_SPLIT_TILE_WIDE_NARROW_N = (64, 256, 128, 8, 3)
_DX_SPLIT_TILE_WIDE_NARROW_N_SHORT = (64, 128, 128, 8, 3)
# fp32 activations use exact IEEE dots (FMA loops, operands in registers): the 16-bit tiles spill there (the
# 32 x 32 x 128 forward tile 3240 B per thread, the 32 x 64 x 64 dx tile 256 B), these do not (sm_90, Triton
# 3.6 and 3.9; tests/ops/test_triton_sm90.py).
_FWD_GEMM_TILES_FP32 = ((64, 64, 16, 8, None), (32, 64, 32, 8, None), (32, 32, 32, 8, None), (16, 32, 32, 4, None))
_DX_GEMM_TILES_FP32 = ((64, 64, 16, 8, None), (64, 32, 32, 8, None), (32, 32, 64, 8, None), (32, 32, 32, 8, None),
                       (16, 32, 64, 4, None))


def tile_config(tile: tuple) -> dict:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages or None) -> the launchers' `config` dict."""
    bm, bn, bk, warps, stages = tile
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    if stages is not None:
        cfg["num_stages"] = stages
    return cfg


def _r_pad(rank: int) -> int:
    """The kernels' R_PAD: the LoRA rank padded to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(max(int(rank), 1)))


def _rank_fits(tile: tuple, r_pad: int) -> bool:
    """The tile compiles without spills at this padded LoRA rank (`_WIDE_TILE_MAX_R_PAD`; uncapped tiles: any)."""
    return r_pad <= _WIDE_TILE_MAX_R_PAD.get(tile, r_pad)


def _gemm_tiles(tiles: tuple, M: int, out_cols: int, col_axis: int, device: torch.device,
                fill: float = 1.0, r_pad: int = 16, reduce_len: int | None = None) -> dict:
    """The largest tile that still gives every SM a program and pads M by less than 2x; else the smallest.
    Filling the SMs matters most for M = 17..256, which is still weight-streaming: (128 x 128) tiles at M = 128,
    N = 4096 would be 32 programs for 132 SMs, (32 x 64) gives 256. A 16-warp tile is also skipped above its LoRA
    rank (`_WIDE_TILE_MAX_R_PAD`) and where the next 16-warp tile fills its last wave better (`_WAVE_FILL_GAIN`).
    reduce_len (K forward, N dx): the serial split of a last part-filled wave's columns may apply
    (`_split_tail_config`; given for 16-bit activations with the register code book)."""
    sms = _num_sms(device)

    def programs(t):
        return triton.cdiv(M, t[0]) * triton.cdiv(out_cols, t[col_axis])

    def fits(t):
        return not (t[0] > 16 and t[0] >= 2 * M) and programs(t) >= int(sms * fill) and _rank_fits(t, r_pad)

    def wave_fill(t):
        return programs(t) / (triton.cdiv(programs(t), sms) * sms)

    passed_over = None  # the 16-warp tile the wave rule skipped
    for i, t in enumerate(tiles):
        if not fits(t):
            continue
        if t[3] == 16 and any(u[3] == 16 and fits(u) and wave_fill(u) > wave_fill(t) + _WAVE_FILL_GAIN
                              for u in tiles[i + 1:]):
            passed_over = passed_over or t
            continue
        break
    else:
        t = tiles[-1]
    cfg = tile_config(t)
    if passed_over is not None:
        lead = _lead_span(passed_over, t, M, out_cols, col_axis, sms)
        if lead is not None:
            cfg["LEAD"] = lead
    if "LEAD" not in cfg and reduce_len is not None and t[3] == 16:
        cfg = _split_tail_config(t, M, out_cols, col_axis, reduce_len, sms) or cfg
    return cfg


def _lead_span(big: tuple, small: tuple, M: int, cols: int, col_axis: int, sms: int) -> tuple | None:
    """(columns, tile): where the wave rule passed over the 256-row tile `big` for `small`, the leading output
    columns that fill whole waves of `big` (one launch), the rest left to `small` (a second launch, at most one wave
    of it); None where `big` has no whole wave or the rest would not fit one wave of `small`. The 256-row tile
    decodes W once per 256 rows and reads x half as often per output: 8b gate/up forward (4096 -> 14336) at
    M = 1024, 448 tiles of 256 x 128 (3.39 waves on 132 SMs): 3 waves of them over 12,672 columns and 104 tiles
    of 128 x 128 over the last 1,664; static sm_90 model 0.94x -> 0.96x cuBLAS (8b down dx the same shape)."""
    m_tiles = triton.cdiv(M, big[0])
    waves = m_tiles * triton.cdiv(cols, big[col_axis]) // sms
    lead = waves * sms // m_tiles * big[col_axis]
    if not 0 < lead < cols or lead % small[col_axis]:  # lead is 0 without a whole wave
        return None
    if triton.cdiv(M, small[0]) * triton.cdiv(cols - lead, small[col_axis]) > sms:
        return None
    return lead, big


def _split_tail(lead: tuple, M: int, cols: int, col_axis: int, steps: int, sms: int) -> tuple | None:
    """((lead columns, lead), splits): where the 16-warp tile `lead` (one CTA per SM) leaves its last wave
    part-filled, its whole waves over the leading output columns (one launch, unsplit) and the remaining columns
    as `_SPLIT_TAIL_TILE` tiles in a second launch whose reduction (`steps` of that tile) is split serially
    (`_serial_split_store`) so its programs still fit one wave: the last wave costs a fraction of a tile instead of
    a whole one. None where that is not at least 1/8 less time in waves (a tail tile's time taken as its share of
    the lead tile's area), or a split would get fewer than 2 reduction steps. The static sm_90 model (bf16):
    Llama-3.2-3B's (3072, 3072) forward and dx at M = 1024, 192 tiles of 128 x 128 (1.45 waves on 132 SMs): 128
    over the first 2,048 columns, then 64 in 2 splits, 0.73x -> 0.87x bf16 cuBLAS; Qwen2.5-7B's gate/up
    (3584 -> 18944) at M = 256, 148 tiles of 256 x 128 (1.12 waves): 132 of them, then 32 tiles of 128 x 128 in 4
    splits, 0.56x -> 0.98x."""
    tail = _SPLIT_TAIL_TILE
    m_tiles = triton.cdiv(M, lead[0])
    col_tiles = triton.cdiv(cols, lead[col_axis])
    lead_col_tiles = m_tiles * col_tiles // sms * sms // m_tiles  # whole columns of tiles in the whole waves
    lead_cols = lead_col_tiles * lead[col_axis]
    if lead_col_tiles == 0 or lead_cols >= cols or lead_cols % tail[col_axis]:
        return None
    tail_tiles = triton.cdiv(M, tail[0]) * triton.cdiv(cols - lead_cols, tail[col_axis])
    split = max(1, min(MAX_SPLIT_K, sms // tail_tiles, steps // 2))
    share = tail[0] * tail[col_axis] / (lead[0] * lead[col_axis])
    before = triton.cdiv(m_tiles * col_tiles, sms)
    after = triton.cdiv(m_tiles * lead_col_tiles, sms) + share * triton.cdiv(tail_tiles * split, sms) / split
    if split < 2 or 8 * after > 7 * before:
        return None
    return (lead_cols, lead), split


def _split_tail_config(lead: tuple, M: int, cols: int, col_axis: int, reduce_len: int, sms: int) -> dict | None:
    """`_split_tail`'s plan as a launch config (the rest's tile, split over the reduction of `reduce_len`, behind
    LEAD = (columns, lead)), or None. The forward's output columns are its tiles' axis 1 and its reduction axis 2
    (SPLIT_K); dx's columns axis 2 and its reduction axis 1 (SPLIT_N)."""
    reduce_axis, key = (2, "SPLIT_K") if col_axis == 1 else (1, "SPLIT_N")
    tail = _split_tail(lead, M, cols, col_axis, reduce_len // _SPLIT_TAIL_TILE[reduce_axis], sms)
    return None if tail is None else dict(tile_config(_SPLIT_TAIL_TILE), LEAD=tail[0], **{key: tail[1]})


def _wide_split_tile(r_pad: int) -> tuple:
    """The unsplit 16-warp tile `_split_k_config` takes where N alone fills the SMs: the 256-row one within its
    LoRA rank, else 128 x 128 x 128."""
    big = _FWD_GEMM_TILES_BOOK_WIDE[0]
    return big if _rank_fits(big, r_pad) else _FWD_GEMM_TILES_BOOK_WIDE[1]


def _fwd_config(M: int, N: int, K: int, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                aligned: bool = True, register_book: bool = False, wide: bool = False, r_pad: int = 16) -> dict:
    """Tile choice: unmeasured starting points (a GPU-measured table replaces them, see
    qpeft/ops/nf4_matmul_dispatch.py).

    Decode (M <= 16) is bandwidth bound: each program streams BLOCK_N rows of the packed weight over all of
    K, and BLOCK_N is the largest power of two that still gives ~2 programs per SM (8 for one row, 16 with
    tl.dot), capped at 32: BLOCK_N = 64 spills (255 registers + 24 B of stack at BLOCK_K = 128, 4 warps).
    The tl.dot decode tile steps K by 64 instead of 128 for fp32 (IEEE dots: 248 B of spills at 16 x 16 x 128)
    and when K % blocksize != 0 (`aligned` False: the per-element loader spills 48 B at 16 x 32 x 128).
    Only fp32 activations may split K when N is too small to fill the GPU: their output is the fp32
    accumulator itself, so the split needs no extra buffer. M > 16: `_gemm_tiles`."""
    if M <= DECODE_MAX_M:
        block_m = 1 if M == 1 else 16
        min_n = 8 if M == 1 else 16  # tl.dot needs >= 16 on every dimension
        sms = _num_sms(device)
        block_n = max(min_n, min(32, _prev_pow2(max(1, N // (2 * sms)))))
        block_k = 256 if M == 1 else (128 if aligned and dtype != torch.float32 else 64)
        split = 1
        tiles = triton.cdiv(N, block_n)
        if dtype == torch.float32 and tiles < sms:
            split = max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(K, 4 * block_k)))
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=4)
    if register_book and dtype != torch.float32:
        cfg = _split_k_config(M, N, K, device, wide, r_pad)
        if cfg is not None:
            return cfg
    tiles = _FWD_GEMM_TILES_FP32 if dtype == torch.float32 else \
        (_FWD_GEMM_TILES_BOOK_WIDE if wide else _FWD_GEMM_TILES_BOOK) if register_book else _FWD_GEMM_TILES
    reduce_len = K if register_book and dtype != torch.float32 and aligned else None  # `_split_tail_config`
    cfg = _gemm_tiles(tiles, M, N, 1, device, _BOOK_FILL if register_book else 1.0, r_pad, reduce_len)
    cfg.setdefault("SPLIT_K", 1)
    if not aligned:  # the per-element loader holds more per K step: 16 x 32 x 128 spills 48 B, x 64 does not
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 64)
    return cfg


def _split_count(programs: int, tiles: int, steps: int) -> int:
    """Splits of the reduction that bring `tiles` output tiles up to `programs` programs, never past them (one
    program more than the SMs hold starts a second wave that runs alone: k/v (4096 -> 1024) at M = 768, 48 tiles of
    128 x 128 on 132 SMs, split 3 (rounded) is 144 programs and 0.51x bf16 cuBLAS in the static sm_90 model, split
    2 is 96 and 0.70x), at most MAX_SPLIT_K and at least two of the reduction's `steps` (K or N steps of the tile)
    per split."""
    return max(1, min(MAX_SPLIT_K, programs // tiles, steps // 2))


def _split_scratch(split: int, M: int, cols: int, tiles: int, device: torch.device):
    """(fp32 partials (split, M, cols), zeroed counters for `tiles` output tiles) of a serial split launch
    (`_serial_split_store`)."""
    return torch.empty((split, M, cols), dtype=torch.float32, device=device), split_counters(tiles, device)


def _split_k_config(M: int, N: int, K: int, device: torch.device, wide: bool, r_pad: int = 16) -> dict | None:
    """The register code book's forward for M = 17..256, where N-parallel tiles leave SMs idle unless W is
    decoded again for more M tiles: one M tile covers M (W decoded once, or twice at 64-row tiles), and K is split
    across programs until they fill the SMs (SERIAL_SPLIT: the last split of a tile sums the fp32 partials in split
    order). The static sm_90 model (bf16) predicts, against the unsplit tiles before: 8b q/o (4096, 4096) M = 64
    1.38x bf16 cuBLAS (0.39x), M = 128 1.23x (0.40x), M = 256 0.71x (0.25x); k/v (4096, 1024) M = 64 / 128
    1.08x / 0.67x (0.10x / 0.11x); gate/up (4096, 14336) M = 128 1.16x unsplit 128 x 128 x 128 (0.80x); 70b q/o /
    down M = 256 0.71x (0.44x). None (the GEMM tile lists): M > 256, except on wide launches whose 256 x 128
    tiles would not reach a quarter of the SMs; or M > 64 without the wide launch's 16-divisibility where the
    tiles need no split.
    64 x 64 x 128 (8 warps) takes 124 registers with the wide launch's 16-divisibility (2 CTAs per SM), 255 without
    (1 per SM); 128 x 128 x 128 (16 warps) only compiles without spills with it (114-128 registers), so only there;
    narrow layers (N <= 2048) at M <= 64 take 64 x 64 x 256 (`_SPLIT_TILE_NARROW_N`), 32 x 64 x 256 at M <= 32, and
    on wide launches above M = 64 64 x 128 x 128 where the 128-row tiles would leave half the SMs idle or move 1/8
    more bytes through L2 (`_SPLIT_TILE_WIDE_NARROW_N`, `_split_l2_bytes`)."""
    sms = _num_sms(device)
    big = _FWD_GEMM_TILES_BOOK_WIDE[0]
    if M > SPLIT_MAX_M and not (wide and 4 * triton.cdiv(M, big[0]) * triton.cdiv(N, big[1]) < sms):
        # above M = 256 only where the 256 x 128 tiles would not reach a quarter of the SMs: k/v (N = 1024) at
        # M = 1024, 32 tiles, where 128 x 128 x 128 split in 2 predicts 0.70x cuBLAS against 0.24x for the tile
        # list's choice
        return None
    if wide and M > 128 and 4 * triton.cdiv(N, big[1]) >= 3 * sms:
        # N alone fills 3/4 of the SMs with the 16-warp 256 x 128 tile (which spills when split): 8b gate/up
        # (4096, 14336) M = 256: 0.81x, where the fill rule's 128 x 128 x 64 gets 0.39x; past one wave, the rest
        # of its columns split (`_split_tail`)
        lead = _wide_split_tile(r_pad)
        return _split_tail_config(lead, M, N, 1, K, sms) or dict(tile_config(lead), SPLIT_K=1)
    if M > 64:
        tile = _SPLIT_TILE_WIDE if wide else _SPLIT_TILE
        narrow = _SPLIT_TILE_WIDE_NARROW_N
        # ... or by at least 1/8 fewer L2 bytes: its SMs cap it lower (one 8-warp CTA each; the model on k/v at
        # M = 256: 0.84x against 1.13x), so a near tie goes to the 128-row tile, the faster one should L2 prove
        # faster than the model's 6.5 TB/s (70b k/v at M = 256, 1% fewer bytes: 0.97x against 0.82x at 8 TB/s)
        if wide and (2 * triton.cdiv(M, tile[0]) * triton.cdiv(N, tile[1]) * MAX_SPLIT_K <= sms or
                     8 * _split_l2_bytes(M, N, K, narrow, sms) < 7 * _split_l2_bytes(M, N, K, tile, sms)):
            tile = narrow
    else:  # narrow layers (GQA k/v, N = 1024): longer K steps, twice the bytes in flight per program
        tile = (_SPLIT_TILE if N > SPLIT_NARROW_N else _SPLIT_TILE_NARROW_N_SMALL_M if M <= 32 else
                _SPLIT_TILE_NARROW_N)
    programs = sms * (2 if wide and tile == _SPLIT_TILE else 1)
    split = _split_count(programs, triton.cdiv(M, tile[0]) * triton.cdiv(N, tile[1]), K // tile[2])
    if split == 1 and not (M <= 64 or wide):
        return None
    if split == 1 and tile == _SPLIT_TAIL_TILE:  # more tiles than SMs: a part-filled last wave, its columns split
        # (Qwen3-8B's gate/up, 4096 -> 12288, at M = 256: 192 tiles, 0.73x -> 0.89x in the static sm_90 model)
        tail = _split_tail_config(tile, M, N, 1, K, sms)
        if tail is not None:
            return tail
    return fwd_split_config(tile, split)


def fwd_split_config(tile: tuple, split: int) -> dict:
    """The forward's launch config of split `tile` in `split` serial splits, as `_split_k_config` issues it (and the
    tuner measures it): with KEEP_OWN_PARTIAL where the tile keeps the last split's own partial."""
    cfg = dict(tile_config(tile), SPLIT_K=split)
    if _keeps_own_partial(tile):
        cfg["KEEP_OWN_PARTIAL"] = True
    return cfg


def split_partial_tiles(split: int, keeps_own: bool = False) -> int:
    """fp32 partial tiles one output tile of a serial split moves through L2 (`_serial_split_store`): every split
    writes its own, and the last reads back the others' (two splits, or KEEP_OWN_PARTIAL: it takes its own from the
    accumulator it holds) or all of them; none unsplit."""
    if split == 1:
        return 0
    return split + (split - 1 if split == 2 or keeps_own else split)


def _split_l2_bytes(M: int, N: int, K: int, tile: tuple, sms: int) -> float:
    """Bytes a serial split launch of `tile` (split to fill `sms` programs) moves through L2 beyond the output: x
    re-read per N tile (2 B per element), W decoded per M tile (~0.52 B per weight with the absmax), the fp32
    partials (`split_partial_tiles`).
    Between 128 x 128 x 128 and 64 x 128 x 128 (half the rows, so half the split: half the partials, twice W's
    reads), on k/v (4096 -> 1024) at M = 256: 38 -> 33 MB, the static sm_90 model 0.66x -> 0.75x bf16 cuBLAS."""
    m_tiles, n_tiles = triton.cdiv(M, tile[0]), triton.cdiv(N, tile[1])
    split = _split_count(sms, m_tiles * n_tiles, K // tile[2])
    partials = split_partial_tiles(split, _keeps_own_partial(tile))
    return n_tiles * M * K * 2 + m_tiles * N * K * 0.52 + partials * M * N * 4


def _keeps_own_partial(tile: tuple) -> bool:
    """Whether the forward's split `tile` takes the last split's own partial from its accumulator
    (`_serial_split_store`'s KEEP_OWN_PARTIAL): the narrow-N tiles of 8 warps that run one CTA per SM either way,
    64 x 128 x 128 (164 -> 166-170 registers) and 64 x 64 x 256 (128 -> 124), 8 splits: 1 of 16 partial tiles
    saved, the static sm_90 model (Triton 3.6 and 3.9) 8b / 70b k/v at M = 128 0.99x / 1.20x -> 1.01x / 1.22x, M = 64
    1.26x / 1.47x -> 1.28x / 1.48x. Not the others: the 16-warp 128 x 128 x 128 spills (24-40 B at its 128-register
    cap); dx's 64 x 64 x 128 goes 120-128 -> 142 registers, two CTAs per SM -> one (8b gate/up dx at M = 17 2.14x ->
    1.38x); 64 x 64 x 128 forward and 32 x 64 x 256 gain or lose 0.01-0.08x by Triton version and M."""
    return tile in (_SPLIT_TILE_WIDE_NARROW_N, _SPLIT_TILE_NARROW_N)


def _dx_split_config(M: int, N: int, K: int, device: torch.device, wide: bool) -> dict:
    """The register code book's dx for M <= 256: few (M x K) output tiles, so the N reduction is split across
    programs (SPLIT_N, the serial split of `_serial_split_store`) until they fill the SMs, at least two N steps per
    split, at most `_dx_partials_cap`. Tiles (BLOCK_M, BLOCK_N = N step, BLOCK_K = dx columns) and programs aimed
    at: M <= 16 16 x 64 x 64, 4 warps, 4 per SM (96-135 registers); M <= 64 and launches without the
    16-divisibility 64 x 64 x 128, 8 warps, 2 per SM (107-219 registers; no spills either way); M = 65..256 with it
    128 x 128 x 128, 16 warps, one per SM (it spills without). The static sm_90 model (bf16) on 8b q/o
    (4096, 4096), against the unsplit tiles before: M = 16 1.40x bf16 cuBLAS (0.43x), M = 64 1.40x (0.21x),
    M = 128 1.23x (0.21x), M = 256 0.75x (0.20x); k/v (4096, 1024) 0.58-1.18x (0.21-0.41x). (Numbers of the commit
    that introduced the split; the current ones are in docs/nf4_matmul_performance.md.)"""
    sms = _num_sms(device)
    if M <= DECODE_MAX_M and triton.cdiv(K, _DX_DECODE_TILE_BOOK[2]) >= 3 * sms:
        # long K (down projections) fills the SMs unsplit with 16 x 128 x 32: 8b / 70b down at M = 16 1.30x / 1.40x,
        # against 1.22x / 1.29x split
        return dict(tile_config(_DX_DECODE_TILE_BOOK), SPLIT_N=1)
    if M <= DECODE_MAX_M:
        tile, programs = _DX_SPLIT_TILE_DECODE, 4 * sms
    elif wide and M > 64:
        tile, programs = _DX_SPLIT_TILE_WIDE, sms
    else:
        tile, programs = _DX_SPLIT_TILE, sms * (2 if M <= 64 else 1)
    split = min(_split_count(programs, triton.cdiv(M, tile[0]) * triton.cdiv(K, tile[2]), N // tile[1]),
                _dx_partials_cap(M, N))
    narrow = _dx_narrow_tile(N)
    if tile == _DX_SPLIT_TILE_WIDE and split > 1 and split >= _dx_partials_bound(M, N) and \
            triton.cdiv(M, narrow[0]) * triton.cdiv(K, narrow[2]) >= int(sms * _BOOK_FILL):
        # the partials would reach 4x the weight's bytes, and 64-row tiles fill the SMs without a split
        return dict(tile_config(narrow), SPLIT_N=1)
    if split == 1 and tile == _SPLIT_TAIL_TILE:  # more tiles than SMs: a part-filled last wave, its columns split
        tail = _split_tail_config(tile, M, K, 2, N, sms)
        if tail is not None:
            return tail
    return dict(tile_config(tile), SPLIT_N=split)


def _dx_narrow_tile(N: int) -> tuple:
    """dx's unsplit 64-row tile for a reduction over N: the 256-row N step where N is whole steps of it (the
    launcher's unmasked EVEN_NK tiles), else the 128-row one."""
    long = _DX_SPLIT_TILE_WIDE_NARROW_N
    return long if N % long[1] == 0 else _DX_SPLIT_TILE_WIDE_NARROW_N_SHORT


def _dx_partials_bound(M: int, N: int) -> float:
    """The N splits at which dx's fp32 partials reach 4x the packed weight's bytes through L2: each split writes
    its (M x K) tile and the last reads them all back, 8 bytes per element per split, against half a byte per
    weight (N x K), so N / (4 M). (With 2 splits the last reads only the other's, 6 bytes per element per split;
    the bound keeps the 8 of every other count.)"""
    return N / (4 * M)


def _dx_partials_cap(M: int, N: int) -> int:
    """The most N splits whose fp32 partials stay within `_dx_partials_bound`: a power of two (the N steps then
    divide evenly), never below 2. Only narrow reductions reach it: k/v (N = 1024) dx, where the fill rule's splits
    made the partials the L2 traffic that bounds the launch. The static sm_90 model (bf16, 8b k/v (4096, 1024)):
    M = 64 8 -> 4 splits 0.74x -> 1.08x cuBLAS, M = 96 4 -> 2 0.83x -> 0.84x, M = 128 4 -> 2 0.68x -> 0.87x; one
    split at M = 256 would lose (0.53x against 0.58x with 2), where the reduction then runs on 64 programs for 132
    SMs."""
    return max(2, _prev_pow2(max(1, int(_dx_partials_bound(M, N)))))


def _dx_config(M: int, N: int, K: int, device: torch.device, dtype: torch.dtype = torch.bfloat16,
               aligned: bool = True, register_book: bool = False, wide: bool = False, r_pad: int = 16) -> dict:
    """dx tiles. Decode uses (16 x 32) output tiles so K = 4096 gives 128 programs; larger M: `_gemm_tiles`.
    K % blocksize != 0 (`aligned` False): BLOCK_K at most 64, as in the forward; the per-element loader's
    128 x 64 x 128 tile with 3 stages needs 256 KB of shared memory (sm_90 allows 227 KB per block)."""
    if register_book and dtype != torch.float32 and M <= SPLIT_MAX_M:
        return _dx_split_config(M, N, K, device, wide)
    if M <= DECODE_MAX_M:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, num_warps=4)
    tiles = _DX_GEMM_TILES_FP32 if dtype == torch.float32 else \
        (_DX_GEMM_TILES_BOOK_WIDE if wide else _DX_GEMM_TILES_BOOK) if register_book else _DX_GEMM_TILES
    reduce_len = N if register_book and dtype != torch.float32 and aligned else None  # `_split_tail_config`
    cfg = _gemm_tiles(tiles, M, K, 2, device, _BOOK_FILL if register_book else 1.0, r_pad, reduce_len)
    if not aligned:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], 64)
        if dtype != torch.float32 and (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) == (32, 64, 32):
            # the per-element loader with the LoRA epilogue spills here under Triton 3.6 (sm_90: 80 registers and
            # 8 B of stack, since the pinned scale rounding); 32 x 32 x 32 does not (56 registers, 3.6 and 3.9)
            cfg["BLOCK_N"] = 32
    return cfg


def _aligned(K: int, blocksize: int, cfg: dict) -> bool:
    """Rows start on a block (hence byte) boundary: the byte-pair / one-scale-per-block tile loader applies.
    K is split on BLOCK_K boundaries and both are powers of two, so no tile straddles a block edge either.
    cfg["ALIGNED"] = False forces the generic per-element loader (tests use it)."""
    return cfg.pop("ALIGNED", True) and K % blocksize == 0


def _register_book_fits(K: int, blocksize: int, dtype: torch.dtype, packed: torch.Tensor,
                        code: torch.Tensor) -> bool:
    """The register code-book loader (_nf4_register_book.py) can take this weight: 16-bit activations, the
    aligned layout (K % blocksize == 0), the packed weight 4-byte aligned (it is read as 32-bit words), a 16-entry
    code book, and not under the interpreter (inline PTX), on sm_80 or newer (cvt.rn.bf16x2/f16x2; the 7.x GPUs
    keep the gather loader)."""
    return bool(not _INTERPRET and K % blocksize == 0 and dtype in (torch.float16, torch.bfloat16)
                and packed.data_ptr() % 4 == 0 and code.numel() == 16
                # CPU tensors: recorded launches (tests, the static sm_90 model), compiled as for an H100
                and (_cuda.device_capability(packed.device) or (9, 0)) >= (8, 0))


def _wide_launch(*operands) -> bool:
    """Every tensor's data pointer 16-byte aligned and every int (strides, sizes, the LoRA rank) divisible by 16:
    what Triton specializes on (tt.divisibility 16). None (an absent operand) counts as aligned."""
    for v in operands:
        if v is None:
            continue
        if isinstance(v, torch.Tensor):
            if v.data_ptr() % 16:
                return False
        elif int(v) % 16:
            return False
    return True


def _register_book(cfg: dict, fits: bool, aligned: bool, use_dot: bool) -> bool:
    """The launch uses it: the weight fits, the tile is on tl.dot with the aligned loader. cfg["REG_BOOK"] = False
    keeps the gather loader (benchmarks compare the two)."""
    return bool(cfg.pop("REG_BOOK", True) and fits and aligned and use_dot)


def _nested_reads(reg_book: bool, absmax: torch.Tensor, nested_code: torch.Tensor | None, row_blocks: int) -> dict:
    """How the register code book's launches read a double-quantized absmax: the nested code book as a register
    table (NESTED_TABLE, its NESTED_CODE_ENTRIES entries: bitsandbytes' dynamic map) and the absmax codes as 32-bit
    words (ABSMAX_WORDS: the uint8 absmax 4-byte aligned, every outer stride too (a stack of experts' absmax starts
    each expert on a word), and rows of whole words, so no word reaches past a row)."""
    table = reg_book and nested_code is not None and nested_code.numel() == NESTED_CODE_ENTRIES.value
    words = absmax.data_ptr() % 4 == 0 and all(st % 4 == 0 for st in absmax.stride()[:-1]) and row_blocks % 4 == 0
    return dict(NESTED_TABLE=table, ABSMAX_WORDS=table and words)


def _stages(num_stages: int | None) -> dict:
    """num_stages only when a (tuned) config names it; otherwise Triton's default software pipelining."""
    return {} if num_stages is None else {"num_stages": int(num_stages)}


def _grid_cols(cols: int, block_cols: int) -> int:
    """Programs on grid axis 0 (tiles of `cols` output rows or columns), checked against the axis' limit."""
    n = triton.cdiv(cols, block_cols)
    if n > MAX_GRID_X:
        raise ValueError(f"problem too large for one launch: {cols} outputs in tiles of {block_cols} are {n} "
                         f"programs, more than the {MAX_GRID_X} of CUDA grid axis 0")
    return n


def _row_chunks(M: int, block_m: int):
    """[row start, row end) ranges of at most MAX_GRID_Y M tiles each: one launch per range."""
    step = MAX_GRID_Y * block_m
    return [(r, min(M, r + step)) for r in range(0, M, step)]


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full-precision products ("ieee"); tf32 would lose ~3 decimal digits vs torch's fp32 matmul.
    return "ieee" if dtype == torch.float32 else "tf32"


def nf4_matmul_triton(x2d, packed, absmax, code, blocksize, N, nested_absmax=None, nested_code=None, offset=None,
                      bias=None, lora_xa=None, lora_B=None, lora_scale=0.0, config: dict | None = None):
    """(M, N) = x2d @ W^T (+ bias, + LoRA epilogue). Inputs are validated by the L2 op (contiguous).
    `config` overrides the tile choice (tests and benchmarks use it to force a path); its LEAD = (columns, tile)
    runs the first `columns` output columns as a launch of `tile` (`_lead_span`), the rest with the config."""
    M, K = x2d.shape
    fits = _register_book_fits(K, blocksize, x2d.dtype, packed, code)
    # only the GEMM tile lists have wide tiles: not checked on the decode path or under a given config
    wide = fits and config is None and M > DECODE_MAX_M and _wide_launch(
        x2d, x2d.stride(0), N, K, packed, bias, lora_xa, lora_B,
        *((lora_xa.stride(0), lora_B.stride(0), lora_xa.shape[1]) if lora_xa is not None else ()))
    r = lora_xa.shape[1] if lora_xa is not None else 0
    cfg = dict(config or _fwd_config(M, N, K, x2d.device, x2d.dtype, aligned=K % blocksize == 0,
                                     register_book=fits, wide=wide, r_pad=_r_pad(r)))
    args = (x2d, packed, absmax, code, blocksize, N, nested_absmax, nested_code, offset, bias, lora_xa, lora_B,
            lora_scale, fits)
    spans = _column_spans(cfg, N, "BLOCK_N", "SPLIT_K", serial=x2d.dtype != torch.float32)
    out = None
    for c0, c1, span_cfg in spans:
        out = _fwd_launch(*args, span_cfg, c0, c1, out)
    return out


def _column_spans(cfg: dict, cols: int, block: str, split: str, serial: bool = False) -> list:
    """[(first column, end column, tile config)] of a launcher's launches: one over all `cols` output columns, or
    with the config's LEAD = (columns, tile) (`_lead_span`, `_split_tail`) the leading columns as a launch of that
    tile, unsplit, and the rest with the config. The leading span holds whole tiles of both (no column is computed
    twice). The rest may be split only where the launcher's split is serial (fp32 partials in a scratch buffer,
    the output written once by the last split): fp32 activations' forward splits into its fp32 output instead."""
    lead = cfg.pop("LEAD", None)
    if lead is None:
        return [(0, cols, cfg)]
    lead_cols, tile = lead
    lead_cfg = dict({k: cfg[k] for k in ("REG_BOOK", "ALIGNED") if k in cfg}, **tile_config(tile), **{split: 1})
    if not 0 < lead_cols < cols or lead_cols % lead_cfg[block] or lead_cols % cfg[block]:
        raise ValueError(f"config LEAD columns must be in (0, {cols}) and a multiple of both tiles' {block} "
                         f"({lead_cfg[block]}, {cfg[block]}), got {lead_cols}")
    if cfg.get(split, 1) != 1 and not serial:
        raise ValueError(f"config LEAD needs {split}=1 here (a split after a leading span must be the serial one "
                         f"of 16-bit activations), got {split}={cfg[split]}")
    return [(0, lead_cols, lead_cfg), (lead_cols, cols, cfg)]


def _fwd_launch(x2d, packed, absmax, code, blocksize, N, nested_absmax, nested_code, offset, bias, lora_xa, lora_B,
                lora_scale, fits, cfg: dict, c0: int, c1: int, out):
    """The forward's launches for output columns [c0, c1) into `out` ((M, N), allocated here when None)."""
    M, K = x2d.shape
    has_lora = lora_xa is not None
    r = lora_xa.shape[1] if has_lora else 0
    cfg = dict(cfg)
    cfg.setdefault("SPLIT_K", 1)
    num_warps = cfg.pop("num_warps", 4)
    num_stages = cfg.pop("num_stages", None)
    aligned = _aligned(K, blocksize, cfg)
    use_dot = cfg["BLOCK_M"] >= 16
    reg_book = _register_book(cfg, fits, aligned, use_dot)
    split = cfg["SPLIT_K"]
    # split-K reduces across programs. fp32 x: fp32 atomics straight into the (zero-filled) fp32 output, or, under
    # torch.use_deterministic_algorithms(True), one fp32 slice per split summed in a fixed order afterwards
    # (atomics add in whatever order the programs finish: the result can change in the last bit run to run).
    # 16-bit x: the serial split (fp32 partials in a scratch buffer, summed in split order: always deterministic)
    if split < 1:
        raise ValueError(f"config SPLIT_K must be >= 1, got SPLIT_K={split}")
    atomic = not torch.are_deterministic_algorithms_enabled()
    serial = split > 1 and x2d.dtype != torch.float32
    n_tiles = _grid_cols(c1 - c0, cfg["BLOCK_N"])
    dummy = code
    ws = counters = dummy
    if split == 1 or serial:
        if out is None:
            out = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
        if serial:  # 16-bit output: `_nf4_matmul_kernel`'s SERIAL_SPLIT (deterministic, no second kernel)
            ws, counters = _split_scratch(split, M, N, triton.cdiv(M, cfg["BLOCK_M"]) * n_tiles, x2d.device)
    else:  # one span (`_column_spans`: only a serial split follows a leading span)
        out = torch.zeros((M, N), dtype=torch.float32, device=x2d.device) if atomic else \
            torch.empty((split, M, N), dtype=torch.float32, device=x2d.device)
    nested = nested_absmax is not None
    swap = n_tiles > MAX_GRID_Y
    for r0, r1 in (_row_chunks(M, cfg["BLOCK_M"]) if swap else [(0, M)]):
        m_tiles = _grid_cols(r1 - r0, cfg["BLOCK_M"])
        xa = lora_xa[r0:r1] if has_lora else dummy
        _nf4_matmul_kernel[(n_tiles, m_tiles, split) if swap else (m_tiles, n_tiles, split)](
            x2d[r0:r1], out[..., r0:r1, :], r1 - r0, N, K, x2d.stride(0), N, M * N,
            packed, absmax, code, nested_absmax if nested else dummy, nested_code if nested else dummy,
            offset if nested else dummy,
            bias if bias is not None else dummy, xa, lora_B if has_lora else dummy,
            float(lora_scale), r, lora_xa.stride(0) if has_lora else 0, lora_B.stride(0) if has_lora else 0,
            ws[:, r0:r1] if serial else dummy, counters[r0 // cfg["BLOCK_M"] * n_tiles:] if serial else dummy,
            BLOCKSIZE=blocksize, NESTED=nested, HAS_BIAS=bias is not None, HAS_LORA=has_lora,
            R_PAD=_r_pad(r), USE_DOT=use_dot,
            DOT_PRECISION=_dot_precision(x2d.dtype), ALIGNED=aligned, ATOMIC_SPLIT=atomic, SWAP_AXES=swap,
            EVEN_NK=aligned and N % cfg["BLOCK_N"] == 0 and K % cfg["BLOCK_K"] == 0,
            REG_BOOK=reg_book, SERIAL_SPLIT=serial, N_TILE_START=c0 // cfg["BLOCK_N"],
            **_nested_reads(reg_book, absmax, nested_code if nested else None, K // blocksize),
            num_warps=num_warps, enable_fp_fusion=True, **_stages(num_stages), **cfg)
    if split > 1 and not serial and not atomic:
        out = out.sum(0)
    return out


def nf4_matmul_dx_triton(dy2d, packed, absmax, code, blocksize, K, nested_absmax=None, nested_code=None,
                         offset=None, lora_dyb=None, lora_A=None, lora_scale=0.0, config: dict | None = None):
    """(M, K) = dy2d (M, N) @ W (+ lora_scale * lora_dyb @ lora_A). Inputs validated by the L2 op.
    EVEN_NK (unmasked whole weight tiles) only with the register code book: its masked tile selected every 16-bit
    value against the mask (a SEL and a PRMT per value pair: 13.75 -> 11.47 main-loop instructions per weight for
    128 x 128 x 128 on sm_90, Triton 3.9). The gather loader keeps it off: its 128 x 64 x 128 tile takes 134
    registers with it, 129 without (one CTA per SM either way); a maxnreg=128 cap would give two CTAs but spills
    (sm_90, Triton 3.9: 360-848 B of stack with the LoRA epilogue, or without 16-divisible strides)."""
    M, N = dy2d.shape
    fits = _register_book_fits(K, blocksize, dy2d.dtype, packed, code)
    wide = fits and config is None and M > DECODE_MAX_M and _wide_launch(
        dy2d, dy2d.stride(0), N, K, packed, lora_dyb, lora_A,
        *((lora_dyb.stride(0), lora_A.stride(0), lora_dyb.shape[1]) if lora_dyb is not None else ()))
    r = lora_dyb.shape[1] if lora_dyb is not None else 0
    cfg = dict(config or _dx_config(M, N, K, dy2d.device, dy2d.dtype, aligned=K % blocksize == 0,
                                    register_book=fits, wide=wide, r_pad=_r_pad(r)))
    dx = torch.empty((M, K), dtype=dy2d.dtype, device=dy2d.device)
    for c0, c1, span_cfg in _column_spans(cfg, K, "BLOCK_K", "SPLIT_N", serial=True):
        _dx_launch(dy2d, dx, packed, absmax, code, blocksize, nested_absmax, nested_code, offset, lora_dyb, lora_A,
                   lora_scale, fits, span_cfg, c0, c1)
    return dx


def _dx_launch(dy2d, dx, packed, absmax, code, blocksize, nested_absmax, nested_code, offset, lora_dyb, lora_A,
               lora_scale, fits, cfg: dict, c0: int, c1: int) -> None:
    """The dx launch for dx columns [c0, c1)."""
    M, N = dy2d.shape
    K = dx.shape[1]
    has_lora = lora_dyb is not None
    r = lora_dyb.shape[1] if has_lora else 0
    cfg = dict(cfg)
    num_warps = cfg.pop("num_warps", 4)
    num_stages = cfg.pop("num_stages", None)
    aligned = _aligned(K, blocksize, cfg)
    reg_book = _register_book(cfg, fits, aligned, True)
    split = int(cfg.setdefault("SPLIT_N", 1))
    if split < 1:
        raise ValueError(f"config SPLIT_N must be >= 1, got SPLIT_N={split}")
    nested = nested_absmax is not None
    dummy = code
    k_tiles = triton.cdiv(c1 - c0, cfg["BLOCK_K"])
    if k_tiles > MAX_GRID_Y:
        raise ValueError(f"K={K} in tiles of {cfg['BLOCK_K']} is {k_tiles} programs on CUDA grid axis 1, more than "
                         f"its {MAX_GRID_Y}: use a larger BLOCK_K")
    m_tiles = _grid_cols(M, cfg["BLOCK_M"])
    ws = counters = dummy
    if split > 1:
        ws, counters = _split_scratch(split, M, K, m_tiles * k_tiles, dy2d.device)
    _nf4_matmul_dx_kernel[(m_tiles, k_tiles, split)](
        dy2d, dx, M, N, K, dy2d.stride(0), dx.stride(0),
        packed, absmax, code, nested_absmax if nested else dummy, nested_code if nested else dummy,
        offset if nested else dummy,
        lora_dyb if has_lora else dummy, lora_A if has_lora else dummy, float(lora_scale), r,
        lora_dyb.stride(0) if has_lora else 0, lora_A.stride(0) if has_lora else 0, ws, counters, M * K,
        BLOCKSIZE=blocksize, NESTED=nested, HAS_LORA=has_lora, R_PAD=_r_pad(r),
        DOT_PRECISION=_dot_precision(dy2d.dtype), ALIGNED=aligned, REG_BOOK=reg_book, K_TILE_START=c0 // cfg["BLOCK_K"],
        EVEN_NK=reg_book and N % cfg["BLOCK_N"] == 0 and K % cfg["BLOCK_K"] == 0,
        **_nested_reads(reg_book, absmax, nested_code if nested else None, K // blocksize), num_warps=num_warps,
        enable_fp_fusion=True,
        **_stages(num_stages), **cfg)
