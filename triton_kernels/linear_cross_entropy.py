"""Triton kernels of the fused linear + cross-entropy (math: qpeft/reference/linear_cross_entropy.py).

The head W (V, H) is dense (any float dtype, read as stored) or 4-bit (NF4/FP4, bitsandbytes' layout: element
e = v*H + h of the flattened W in byte e // 2, high nibble when e is even, scale absmax[e // blocksize], the
absmax optionally double-quantized). A 4-bit tile is decoded in registers where it is used (`_w_tile`, this
file's own decoder): no dequantized copy of W ever exists. Products accumulate in fp32 (tl.dot; IEEE for fp32
inputs), every softmax quantity is fp32.

Kernels
- `_lce_lse_kernel` (forward of the "recompute" strategy): grid (row tiles, vocabulary splits). Each program
  computes its (BLOCK_M, BLOCK_V) logits tiles one after another over its share of the vocabulary (a K loop
  over H with tl.dot per tile), applies bias and softcap, and keeps per row an online log-sum-exp (running max
  m and sum s of exp(z - m)), the target logit (picked by comparing ids, so a bad id reads nothing) and the sum
  of the logits (label smoothing). Partials (4, splits, N) are combined on the host side of the launch with a
  few (N,)-sized torch ops. Nothing of size N x V is written. Row tiles vary fastest in the grid, so the
  programs that read the same W columns run together and W streams from HBM about once per split wave.
- `_lce_logits_kernel`: one (rows, vocabulary range) block of either the raw logits u = x W^T + b in fp32 (MODE 0)
  or of the logits gradient d loss / d u (MODE 1, recomputing the logits and using the saved lse).
- `_lce_rows_kernel`: one program per row of a stored fp32 logits block: lse, target logit, sum of logits, then
  the logits gradient in the compute dtype (two passes over the row).
- `_lce_dx_kernel`: dx = dlogits @ W for a block of vocabulary rows (4-bit W decoded per tile; dense W too when
  the result accumulates into an fp32 buffer), optionally added to an fp32 accumulator.

Backward ("recompute"): an exact, non-atomic input gradient needs a stored gradient block, because the three
products reduce over different axes (logits over H, dx over V, dW over N): a dx tile that recomputed its own
logits would redo them H / BLOCK_H times, and accumulating partial products with atomics (as Cut Cross-Entropy's
backward does) moves V / BLOCK_V times the size of dx through L2. So the backward stores d loss / d u for a chunk
of rows (frozen head: token chunks, dx of each chunk written once by cuBLAS (dense) or `_lce_dx_kernel` (4-bit))
or for a block of the vocabulary over all rows (trainable head: each dW block is one cuBLAS GEMM over all N
rows, written once; dx accumulates in fp32 over the V / block_cols blocks). The chunk is bounded by CHUNK_BYTES
(256 MiB: at V = 128,256 in bf16, 1,024 rows of gradient; 256 rows in the "forward" strategy, which also stores
the fp32 logits). Each chunk re-reads W, so a chunk's GEMMs have about as many FLOP per byte of W as it has rows
(an H100's bf16 ridge is ~300): fewer rows make them bandwidth-bound, more rows cost memory. The budget is a
guess to be set by the benchmark's --chunk-mb sweep.

Forward with gradient ("forward" strategy, `lce_forward_backward_triton`): per token chunk, the fp32 logits are
computed once (`_lce_logits_kernel` MODE 0), `_lce_rows_kernel` turns them into lse and the gradient block, and dx
follows as above: one logits GEMM instead of two.

Tiles and CHUNK_BYTES are unmeasured starting points (written without a GPU, tested under TRITON_INTERPRET=1);
every configuration the launchers can pick compiles for sm_90 without register spills (tests/ops/test_triton_sm90.py).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from qpeft import _cuda
from qpeft.reference.linear_cross_entropy import row_loss_ref


__all__ = ["lce_forward_triton", "lce_backward_triton", "lce_forward_backward_triton"]

NESTED_BLOCKSIZE = tl.constexpr(256)  # absmax values per second-level block (bitsandbytes' double quant)
CHUNK_BYTES = 256 << 20  # largest stored logits / gradient block (module attribute: tests shrink it)
ROW_PAD = 64  # stored blocks' row stride is a multiple of this many elements (aligned rows for the GEMMs)


# ---------------------------------------------------------------------------------------------- device helpers
@triton.jit
def _tanh(u):
    """tanh in fp32 from exp (no libdevice: the interpreter has none). |u| < 0.25: odd Taylor series to u^9
    (truncation < 1e-8 relative), which avoids the cancellation of 1 - e^(-2|u|) near 0; else (1 - e) / (1 + e)."""
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    u2 = u * u
    small = a * (1.0 + u2 * (-0.3333333333333333 + u2 * (0.13333333333333333 + u2 * (-0.05396825396825397
                                                                                       + u2 * 0.021869488536155203))))
    t = tl.where(a < 0.25, small, big)
    return tl.where(u < 0.0, -t, t)


@triton.jit
def _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask, NESTED: tl.constexpr):
    """fp32 absmax[block]; with double quant nested_code[q] * nested_absmax[block // 256] + offset."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        s2 = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = tl.load(nested_code_ptr + q) * s2 + offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def _w_tile(w_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
            offs_v, mask_v, h0, H,
            BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, IS_4BIT: tl.constexpr, BLOCKSIZE: tl.constexpr,
            NESTED: tl.constexpr, ALIGNED: tl.constexpr):
    """W[offs_v, h0:h0 + BLOCK_H] as a (BLOCK_V, BLOCK_H) tile, 0 outside: dense W in its dtype, a 4-bit W
    decoded to fp32. offs_v are int64. ALIGNED (4-bit, H % BLOCKSIZE == 0 and BLOCKSIZE % BLOCK_H == 0, so
    rows start on a byte and a block and no tile crosses a block): one byte load per two weights and one scale
    per tile row; otherwise one gather per weight (any H, odd H included)."""
    offs_h = h0 + tl.arange(0, BLOCK_H)
    mask = mask_v[:, None] & (offs_h[None, :] < H)
    if IS_4BIT:
        if ALIGNED:
            half = H // 2
            offs_b = h0 // 2 + tl.arange(0, BLOCK_H // 2)
            byte = tl.load(packed_ptr + offs_v[:, None] * half + offs_b[None, :],
                           mask=mask_v[:, None] & (offs_b[None, :] < half), other=0).to(tl.int32)
            hi = tl.load(code_ptr + (byte >> 4))  # element 2j: high nibble
            lo = tl.load(code_ptr + (byte & 0xF))
            values = tl.reshape(tl.join(hi, lo), (BLOCK_V, BLOCK_H))
            scale = _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, (offs_v * H + h0) // BLOCKSIZE,
                            mask_v, NESTED)
            w = values * scale[:, None]
        else:
            e = offs_v[:, None] * H + offs_h[None, :]
            byte = tl.load(packed_ptr + (e >> 1), mask=mask, other=0).to(tl.int32)
            nibble = (byte >> (4 - (e & 1) * 4).to(tl.int32)) & 0xF
            w = tl.load(code_ptr + nibble) * _scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                                                     e // BLOCKSIZE, mask, NESTED)
        return tl.where(mask, w, 0.0)
    else:
        return tl.load(w_ptr + offs_v[:, None] * H + offs_h[None, :], mask=mask, other=0.0)


@triton.jit
def _logits_tile(x_ptr, bias_ptr, w_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                 offset, offs_m, mask_m, offs_v, mask_v, H,
                 HAS_BIAS: tl.constexpr, IS_4BIT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                 ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """fp32 u = x[offs_m] W[offs_v]^T + b[offs_v], (BLOCK_M, BLOCK_V); x (rows, H) contiguous."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        x = tl.load(x_ptr + offs_m[:, None] * H + offs_h[None, :], mask=mask_m[:, None] & (offs_h[None, :] < H),
                    other=0.0)
        w = _w_tile(w_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset, offs_v,
                    mask_v, h0, H, BLOCK_V, BLOCK_H, IS_4BIT, BLOCKSIZE, NESTED, ALIGNED)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _cap(u, softcap, SOFTCAP: tl.constexpr):
    z = u
    if SOFTCAP:
        z = softcap * _tanh(u / softcap)
    return z


@triton.jit
def _dlogits(z, offs_v, lse, tgt, g, inv_vocab, softcap, label_smoothing, z_loss,
             SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr):
    """d loss / d u for capped logits z (rows, cols) of vocabulary ids offs_v; lse, tgt, g per row (g = 0 for
    ignored rows)."""
    d = tl.exp(z - lse[:, None])
    if ZLOSS:
        d = d * (1.0 + 2.0 * z_loss * lse)[:, None]
    if SMOOTH:
        d = d - label_smoothing * inv_vocab
    d = tl.where(offs_v[None, :] == tgt[:, None], d - (1.0 - label_smoothing), d)
    if SOFTCAP:
        t = z / softcap
        d = d * (1.0 - t * t)
    return d * g[:, None]


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _lce_lse_kernel(x_ptr, target_ptr, bias_ptr, part_ptr,
                    w_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                    N, V, H, v_per_split, softcap,
                    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, IS_4BIT: tl.constexpr,
                    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, ALIGNED: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    splits = tl.num_programs(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < N
    tgt = tl.load(target_ptr + offs_m, mask=mask_m, other=-1)
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)
    v_begin = pid_s * v_per_split
    v_end = tl.minimum(v_begin + v_per_split, V)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    zs = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
        mask_v = offs_v < v_end
        u = _logits_tile(x_ptr, bias_ptr, w_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr,
                         nested_code_ptr, offset, offs_m, mask_m, offs_v, mask_v, H, HAS_BIAS, IS_4BIT, BLOCKSIZE,
                         NESTED, ALIGNED, BLOCK_M, BLOCK_V, BLOCK_H, DOT_PRECISION)
        z = tl.where(mask_v[None, :], _cap(u, softcap, SOFTCAP), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))  # finite: every tile has a column in range
        s_i = s_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
        zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        if SMOOTH:
            zs += tl.sum(tl.where(mask_v[None, :], z, 0.0), axis=1)
    base = pid_s * N + offs_m
    plane = splits * N
    tl.store(part_ptr + base, m_i, mask=mask_m)
    tl.store(part_ptr + plane + base, s_i, mask=mask_m)
    tl.store(part_ptr + 2 * plane + base, zt, mask=mask_m)
    tl.store(part_ptr + 3 * plane + base, zs, mask=mask_m)


@triton.jit
def _lce_logits_kernel(x_ptr, target_ptr, lse_ptr, g_ptr, bias_ptr, out_ptr, stride_out,
                       w_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                       R, v_lo, v_hi, H, inv_vocab, ignore_index, softcap, label_smoothing, z_loss,
                       MODE: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr,
                       ZLOSS: tl.constexpr, IS_4BIT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                       ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """out[r, v - v_lo] for rows r < R of x and v in [v_lo, v_hi): MODE 0 the fp32 logits u, MODE 1 d loss / d u."""
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < R
    offs_v = (v_lo + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    mask_v = offs_v < v_hi
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)
    u = _logits_tile(x_ptr, bias_ptr, w_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                     offset, offs_m, mask_m, offs_v, mask_v, H, HAS_BIAS, IS_4BIT, BLOCKSIZE, NESTED, ALIGNED,
                     BLOCK_M, BLOCK_V, BLOCK_H, DOT_PRECISION)
    out_ptrs = out_ptr + offs_m[:, None] * stride_out + (offs_v - v_lo)[None, :]
    mask = mask_m[:, None] & mask_v[None, :]
    if MODE == 0:
        tl.store(out_ptrs, u, mask=mask)
    else:
        tgt = tl.load(target_ptr + offs_m, mask=mask_m, other=ignore_index)
        lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
        g = tl.where(tgt != ignore_index, tl.load(g_ptr + offs_m, mask=mask_m, other=0.0), 0.0)
        d = _dlogits(_cap(u, softcap, SOFTCAP), offs_v, lse, tgt, g, inv_vocab, softcap, label_smoothing, z_loss,
                     SOFTCAP, SMOOTH, ZLOSS)
        d = tl.where((tgt != ignore_index)[:, None], d, 0.0)  # exact zeros for ignored rows
        tl.store(out_ptrs, d.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lce_rows_kernel(logits_ptr, stride_l, d_ptr, stride_d, target_ptr, g_ptr, lse_ptr, zt_ptr, zs_ptr,
                     V, inv_vocab, ignore_index, softcap, label_smoothing, z_loss,
                     SOFTCAP: tl.constexpr, SMOOTH: tl.constexpr, ZLOSS: tl.constexpr, BLOCK: tl.constexpr):
    """Row r of fp32 logits u (V,): lse, target logit, sum of (capped) logits, and d loss / d u * g into d."""
    row = tl.program_id(0).to(tl.int64)
    tgt = tl.load(target_ptr + row)
    valid = tgt != ignore_index
    g = tl.where(valid, tl.load(g_ptr + row), 0.0)
    row_l = logits_ptr + row * stride_l
    m = tl.max(tl.full((BLOCK,), float("-inf"), dtype=tl.float32), axis=0)
    s = tl.sum(tl.zeros((BLOCK,), dtype=tl.float32), axis=0)
    zt = s
    zs = s
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        mask = offs < V
        z = tl.where(mask, _cap(tl.load(row_l + offs, mask=mask, other=0.0), softcap, SOFTCAP), float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        zt += tl.sum(tl.where(offs == tgt, z, 0.0), axis=0)
        if SMOOTH:
            zs += tl.sum(tl.where(mask, z, 0.0), axis=0)
    lse = m + tl.log(s)
    tl.store(lse_ptr + row, lse)
    tl.store(zt_ptr + row, zt)
    tl.store(zs_ptr + row, zs)
    row_d = d_ptr + row * stride_d
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        mask = offs < V
        z = _cap(tl.load(row_l + offs, mask=mask, other=0.0), softcap, SOFTCAP)
        d = tl.exp(z - lse)
        if ZLOSS:
            d = d * (1.0 + 2.0 * z_loss * lse)
        if SMOOTH:
            d = d - label_smoothing * inv_vocab
        d = tl.where(offs == tgt, d - (1.0 - label_smoothing), d)
        if SOFTCAP:
            t = z / softcap
            d = d * (1.0 - t * t)
        d = tl.where(valid, d * g, 0.0)
        tl.store(row_d + offs, d.to(d_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lce_dx_kernel(d_ptr, stride_d, out_ptr, stride_out,
                   w_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
                   R, cols, v_lo, H,
                   ACCUMULATE: tl.constexpr, IS_4BIT: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                   ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_V: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """out[r, :] (+)= d[r, :cols] @ W[v_lo:v_lo + cols] for rows r < R."""
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < R
    h0 = pid_h * BLOCK_H
    offs_h = h0 + tl.arange(0, BLOCK_H)
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32)
    for c0 in range(0, cols, BLOCK_V):
        offs_c = c0 + tl.arange(0, BLOCK_V)
        mask_c = offs_c < cols
        a = tl.load(d_ptr + offs_m[:, None] * stride_d + offs_c[None, :], mask=mask_m[:, None] & mask_c[None, :],
                    other=0.0)
        w = _w_tile(w_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                    (v_lo + offs_c).to(tl.int64), mask_c, h0, H, BLOCK_V, BLOCK_H, IS_4BIT, BLOCKSIZE, NESTED,
                    ALIGNED)
        acc += tl.dot(a, w.to(a.dtype), input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + offs_m[:, None] * stride_out + offs_h[None, :]
    mask = mask_m[:, None] & (offs_h[None, :] < H)
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers
@_cuda.cached
def _num_sms(device: torch.device) -> int:
    rt = _cuda.rt
    if rt.is_cuda(device):
        return rt.multi_processor_count(device.index if device.index is not None else rt.current_device())
    return 132  # interpreter: pretend H100 so the grid is chosen as on the GPU


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact products ("ieee"), as torch's default fp32 matmul; tf32 would lose ~3 decimal digits
    return "ieee" if dtype == torch.float32 else "tf32"


# (BLOCK_M, BLOCK_V, BLOCK_H, num_warps, num_stages or None) of the logits tiles (lse / logits kernels) and
# (BLOCK_M, BLOCK_H, BLOCK_V, ...) of the dx kernel, by (dtype, 4-bit head). Unmeasured starting points (no GPU
# here). Each compiles for sm_90 without register spills with Triton 3.6 and 3.9 (tests/ops/test_triton_sm90.py):
# the 128 x 128 logits tile takes 247-255 registers with the softmax epilogue (HGMMA, 8 warps). fp32 uses IEEE
# FMA dots with the operands in registers: dense 64 x 64 x 16 spills with 8 warps under Triton 3.6 (80 registers
# per thread), not with 4; a 4-bit head needs the 8 warps (4 spill 32-208 B). The per-element 4-bit decoder
# (H % blocksize != 0) holds 64-bit addresses per weight: 128 x 128 x 64 spills 896 B; it takes at most 64 x 32
# weight tiles.
_HALF_TILE = (128, 128, 64, 8, 3)
LOGITS_TILES = {(torch.float16, False): _HALF_TILE, (torch.bfloat16, False): _HALF_TILE,
                (torch.float16, True): _HALF_TILE, (torch.bfloat16, True): _HALF_TILE,
                (torch.float32, False): (64, 64, 16, 4, None), (torch.float32, True): (64, 64, 16, 8, None)}
DX_TILES = dict(LOGITS_TILES)
UNALIGNED_W_TILE = (64, 32)  # (rows of W, columns of W) at most, per-element 4-bit decoder
ROWS_BLOCK = 2048  # elements per step of `_lce_rows_kernel`


def _tile(table: dict, dtype: torch.dtype, rows: int, head) -> tuple[dict, int, int]:
    bm, bn, bk, warps, stages = table[(dtype, head.weight is None)]
    bm = min(bm, max(16, triton.next_power_of_2(max(rows, 1))))
    cfg = dict(BLOCK_M=bm, num_warps=warps)
    if stages is not None:
        cfg["num_stages"] = stages
    return cfg, bn, bk


def _aligned(head) -> bool:
    return head.hidden % head.blocksize == 0


def _logits_cfg(dtype: torch.dtype, rows: int, head) -> dict:
    cfg, bv, bh = _tile(LOGITS_TILES, dtype, rows, head)
    if head.weight is None:  # a tile's hidden extent never crosses a quantization block (blocksize >= 32)
        bh = min(bh, head.blocksize)
        if not _aligned(head):
            bv, bh = min(bv, UNALIGNED_W_TILE[0]), min(bh, UNALIGNED_W_TILE[1])
    return dict(cfg, BLOCK_V=bv, BLOCK_H=bh)


def _dx_cfg(dtype: torch.dtype, rows: int, head) -> dict:
    cfg, bh, bv = _tile(DX_TILES, dtype, rows, head)
    if head.weight is None:
        bh = min(bh, head.blocksize)
        if not _aligned(head):
            bv, bh = min(bv, UNALIGNED_W_TILE[0]), min(bh, UNALIGNED_W_TILE[1])
    return dict(cfg, BLOCK_H=bh, BLOCK_V=bv)


def _head_args(head, dummy: torch.Tensor) -> tuple[tuple, dict]:
    """The 7 pointer arguments (w, packed, absmax, code, nested_absmax, nested_code, offset; a dummy for each one
    this head lacks) and the head's constexprs."""
    if head.weight is not None:
        return ((head.weight,) + (dummy,) * 6,
                dict(IS_4BIT=False, BLOCKSIZE=64, NESTED=False, ALIGNED=False))
    nested = head.nested_absmax is not None
    ptrs = (dummy, head.packed, head.absmax, head.code, head.nested_absmax if nested else dummy,
            head.nested_code if nested else dummy, head.offset if nested else dummy)
    return ptrs, dict(IS_4BIT=True, BLOCKSIZE=head.blocksize, NESTED=nested, ALIGNED=_aligned(head))


def _options(softcap: float, label_smoothing: float, z_loss: float) -> dict:
    return dict(SOFTCAP=softcap > 0.0, SMOOTH=label_smoothing > 0.0, ZLOSS=z_loss > 0.0)


def _padded(n: int) -> int:
    return triton.cdiv(n, ROW_PAD) * ROW_PAD


def _round_down(n: int, tile: int) -> int:
    """n rounded down to a multiple of the tile when n >= tile, else of 16 (tl.dot's least extent); >= 16."""
    unit = tile if n >= tile else 16
    return max(16, n // unit * unit)


def chunk_rows(N: int, V: int, bytes_per_logit: int, block_m: int) -> int:
    """Rows per token chunk: the stored (rows, V) blocks fit CHUNK_BYTES (a multiple of the row tile)."""
    return min(N, _round_down(CHUNK_BYTES // max(1, _padded(V) * bytes_per_logit), block_m))


def chunk_cols(N: int, V: int, bytes_per_logit: int, block_v: int) -> int:
    """Vocabulary columns per block of the trainable-head backward: the (N, cols) block fits CHUNK_BYTES."""
    return min(V, _round_down(CHUNK_BYTES // max(1, N * bytes_per_logit), block_v))


def _launch_logits(mode: int, x, head, bias, target, lse, g, out, v_lo: int, v_hi: int, ignore_index: int,
                   softcap: float, label_smoothing: float, z_loss: float) -> None:
    """out[:R, :v_hi - v_lo] = logits (mode 0, fp32) or d loss / d u (mode 1) of rows x (R, H), vocabulary
    [v_lo, v_hi)."""
    R, H = x.shape
    cfg = _logits_cfg(x.dtype, R, head)
    ptrs, meta = _head_args(head, x)
    dummy = x
    grid = (triton.cdiv(R, cfg["BLOCK_M"]), triton.cdiv(v_hi - v_lo, cfg["BLOCK_V"]))
    _lce_logits_kernel[grid](
        x, target if target is not None else dummy, lse if lse is not None else dummy,
        g if g is not None else dummy, bias if bias is not None else dummy, out, out.stride(0), *ptrs,
        R, v_lo, v_hi, H, 1.0 / head.vocab, ignore_index, float(softcap), float(label_smoothing), float(z_loss),
        MODE=mode, HAS_BIAS=bias is not None, **_options(softcap, label_smoothing, z_loss), **meta,
        DOT_PRECISION=_dot_precision(x.dtype), **cfg)


def _launch_dx(d, head, v_lo: int, out, accumulate: bool) -> None:
    """out (+)= d (R, cols) @ W[v_lo:v_lo + cols]: cuBLAS for a dense W written once, else `_lce_dx_kernel`."""
    R, cols = d.shape
    if head.weight is not None and not accumulate:
        torch.mm(d, head.weight[v_lo:v_lo + cols], out=out)
        return
    H = head.hidden
    cfg = _dx_cfg(d.dtype, R, head)
    ptrs, meta = _head_args(head, d)
    grid = (triton.cdiv(R, cfg["BLOCK_M"]), triton.cdiv(H, cfg["BLOCK_H"]))
    _lce_dx_kernel[grid](d, d.stride(0), out, out.stride(0), *ptrs, R, cols, v_lo, H, ACCUMULATE=accumulate,
                         **meta, DOT_PRECISION=_dot_precision(d.dtype), **cfg)


def lce_forward_triton(x, head, bias, target, ignore_index: int, softcap: float, label_smoothing: float,
                       z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (N,), lse (N,)) fp32 by the online log-sum-exp kernel. Inputs validated by the L2 op."""
    N, H = x.shape
    V = head.vocab
    if N == 0:
        return x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    cfg = _logits_cfg(x.dtype, N, head)
    m_blocks = triton.cdiv(N, cfg["BLOCK_M"])
    v_tiles = triton.cdiv(V, cfg["BLOCK_V"])
    # split the vocabulary until about two programs per SM: 8k tokens in 128-row tiles are only 64 programs
    split = max(1, min(v_tiles, triton.cdiv(2 * _num_sms(x.device), m_blocks)))
    v_per_split = triton.cdiv(v_tiles, split) * cfg["BLOCK_V"]
    split = triton.cdiv(V, v_per_split)  # no empty split
    part = torch.empty((4, split, N), dtype=torch.float32, device=x.device)
    ptrs, meta = _head_args(head, x)
    _lce_lse_kernel[(m_blocks, split)](
        x, target, bias if bias is not None else x, part, *ptrs, N, V, H, v_per_split, float(softcap),
        HAS_BIAS=bias is not None, SOFTCAP=softcap > 0.0, SMOOTH=label_smoothing > 0.0, **meta,
        DOT_PRECISION=_dot_precision(x.dtype), **cfg)
    m, s, zt, zs = part
    top = m.amax(0)
    lse = top + torch.log((s * torch.exp(m - top)).sum(0))
    loss = row_loss_ref(lse, zt.sum(0), zs.sum(0), target != ignore_index, V, label_smoothing, z_loss)
    return loss, lse


def lce_backward_triton(x, head, bias, target, lse, grad_rows, ignore_index: int, softcap: float,
                        label_smoothing: float, z_loss: float, need_weight_grad: bool, need_bias_grad: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight or (0,), dbias or (0,)) of sum_i grad_rows[i] * loss_i, recomputing the logits (see the
    module docstring for the token-chunk / vocabulary-block choice)."""
    N, H = x.shape
    V = head.vocab
    elt = x.element_size()
    db32 = torch.zeros(V, dtype=torch.float32, device=x.device) if need_bias_grad else None
    common = dict(ignore_index=ignore_index, softcap=softcap, label_smoothing=label_smoothing, z_loss=z_loss)
    if not need_weight_grad:
        dx = torch.empty_like(x)
        dw = x.new_empty(0)
        if N:
            rows = chunk_rows(N, V, elt, _logits_cfg(x.dtype, N, head)["BLOCK_M"])
            buf = torch.empty((rows, _padded(V)), dtype=x.dtype, device=x.device)
            for r0 in range(0, N, rows):
                r1 = min(N, r0 + rows)
                d = buf[:r1 - r0, :V]
                _launch_logits(1, x[r0:r1], head, bias, target[r0:r1], lse[r0:r1], grad_rows[r0:r1], d, 0, V,
                               **common)
                _launch_dx(d, head, 0, dx[r0:r1], accumulate=False)
                if need_bias_grad:
                    db32 += d.sum(0, dtype=torch.float32)
    else:
        dw = torch.empty((V, H), dtype=head.weight.dtype, device=x.device)
        dx32 = torch.zeros((N, H), dtype=torch.float32, device=x.device)
        if N:
            cols = chunk_cols(N, V, elt, _logits_cfg(x.dtype, N, head)["BLOCK_V"])
            buf = torch.empty((N, _padded(cols)), dtype=x.dtype, device=x.device)
            for v0 in range(0, V, cols):
                v1 = min(V, v0 + cols)
                d = buf[:, :v1 - v0]
                _launch_logits(1, x, head, bias, target, lse, grad_rows, d, v0, v1, **common)
                torch.mm(d.t(), x, out=dw[v0:v1])  # one GEMM over all N rows: dW block written once
                if need_bias_grad:
                    db32[v0:v1] = d.sum(0, dtype=torch.float32)
                _launch_dx(d, head, v0, dx32, accumulate=True)
        else:
            dw.zero_()
        dx = dx32.to(x.dtype)
    db = db32.to(bias.dtype) if need_bias_grad else x.new_empty(0)
    return dx, dw, db


def lce_forward_backward_triton(x, head, bias, target, grad_rows, ignore_index: int, softcap: float,
                                label_smoothing: float, z_loss: float, need_bias_grad: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, dx, dbias or (0,)) with the logits of each token chunk computed once (frozen head)."""
    N, H = x.shape
    V = head.vocab
    lse = torch.empty(N, dtype=torch.float32, device=x.device)
    zt, zs = torch.empty_like(lse), torch.empty_like(lse)
    dx = torch.empty_like(x)
    db32 = torch.zeros(V, dtype=torch.float32, device=x.device) if need_bias_grad else None
    if N:
        rows = chunk_rows(N, V, 4 + x.element_size(), _logits_cfg(x.dtype, N, head)["BLOCK_M"])
        logits = torch.empty((rows, _padded(V)), dtype=torch.float32, device=x.device)
        buf = torch.empty((rows, _padded(V)), dtype=x.dtype, device=x.device)
        block = min(ROWS_BLOCK, triton.next_power_of_2(V))
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            u, d = logits[:r1 - r0, :V], buf[:r1 - r0, :V]
            _launch_logits(0, x[r0:r1], head, bias, None, None, None, u, 0, V, ignore_index, softcap,
                           label_smoothing, z_loss)
            _lce_rows_kernel[(r1 - r0,)](
                u, u.stride(0), d, d.stride(0), target[r0:r1], grad_rows[r0:r1], lse[r0:r1], zt[r0:r1], zs[r0:r1],
                V, 1.0 / V, ignore_index, float(softcap), float(label_smoothing), float(z_loss),
                **_options(softcap, label_smoothing, z_loss), BLOCK=block, num_warps=8)
            _launch_dx(d, head, 0, dx[r0:r1], accumulate=False)
            if need_bias_grad:
                db32 += d.sum(0, dtype=torch.float32)
    loss = row_loss_ref(lse, zt, zs, target != ignore_index, V, label_smoothing, z_loss)
    db = db32.to(bias.dtype) if need_bias_grad else x.new_empty(0)
    return loss, lse, dx, db
