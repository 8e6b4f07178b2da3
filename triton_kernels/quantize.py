"""Triton blockwise quantize / dequantize (4-bit NF4/FP4 and 8-bit), byte-identical to
qpeft.reference.quantize (see its docstring for the exact semantics, which are bitsandbytes').

Layout: each program handles GROUP consecutive quantization blocks as a [GROUP, BLOCKSIZE] tile (about
4096 elements: 8 KB of bf16 in, 2 KB packed out), so blocksize 32 does not mean 32-element programs and
blocksize 4096 is still one tile; rows are contiguous, so loads and stores vectorize to 16 bytes.
When n % 8 == 0 (every real weight) quantize stores the packed bytes as int32 words of 8 codes (WORDS):
compiled for sm_90 a thread then writes its 16 bytes with 2 st.global.v2 instead of 16 st.global.b8; the
byte path handles any other n. (Reading words in dequantize made the compiled kernel gather the code book
twice per value at blocksize 64, so dequantize reads bytes.)
Offsets are int64 (tensors beyond 2^31 elements). All arithmetic is fp32. Division uses tl.math.div_rn:
Triton's plain fp32 `/` is the approximate div.full.f32 (2 ulp) on NVIDIA GPUs, which would change codes
next to a midpoint; the product x * (1/absmax) has no add to fuse, so no FMA contraction can creep in.

Rounding: the code is the number of fp32 code-book midpoints strictly below the scaled value
(torch.bucketize). 4-bit: 15 compares against scalars (branch-free). 8-bit: an 8-step binary search over
the midpoints padded to 256 with +inf.

Launchers `<op>_triton` check their inputs, allocate the outputs and launch on the current stream.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qpeft.formats import codes
from qpeft.reference.quantize import ABSMAX_FLOOR, midpoints

__all__ = ["quantize_4bit_triton", "dequantize_4bit_triton", "quantize_blockwise_triton",
           "dequantize_blockwise_triton"]

# Elements per program: 4096 keeps a tile in registers at num_warps=4 (32 fp32 per thread) and gives
# 14k programs for a 4096 x 14336 weight, enough to fill 132 SMs many times over.
TILE = 4096


def _nibble_table(codes_by_position) -> tuple[int, int]:
    """16 4-bit codes -> two int32 constants holding 8 nibbles each (code of position p at bits 4p)."""
    lo = sum(int(c) << (4 * i) for i, c in enumerate(codes_by_position[:8]))
    hi = sum(int(c) << (4 * i) for i, c in enumerate(codes_by_position[8:]))
    assert lo < 2 ** 31 and hi < 2 ** 31  # top nibbles are 0 (position 7) and 3 (position 15)
    return lo, hi


_FP4_LO, _FP4_HI = _nibble_table(codes.FP4_SORTED_CODES)


@triton.jit
def _scale_tile(a_ptr, absmax_ptr, pid, n, num_blocks, BLOCKSIZE: tl.constexpr, GROUP: tl.constexpr,
                ABSMAX_FLOOR: tl.constexpr):
    """Load GROUP blocks of A, store their absmax, return (scaled fp32 [GROUP, BLOCKSIZE] in [-1, 1],
    block ids [GROUP] int64)."""
    blk = pid * GROUP + tl.arange(0, GROUP).to(tl.int64)
    offs = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    x = tl.load(a_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    # a NaN must reach the stored absmax (the public API rejects non-finite input by checking absmax), and
    # whether tl.max propagates NaN depends on the target's max instruction: make it explicit
    has_nan = tl.max((x != x).to(tl.int32), axis=1) > 0
    amax = tl.where(has_nan, float("nan"), tl.max(tl.abs(x), axis=1)).to(tl.float32)
    # The floor as an explicit fp32 tensor: Triton 3.6 and 3.8 type a Python-float constexpr operand of
    # tl.maximum as fp64, and tl.math.div_rn below then refuses the fp64 result (3.9 keeps fp32).
    floor = tl.maximum(amax, tl.full([GROUP], ABSMAX_FLOOR, tl.float32),
                       propagate_nan=tl.PropagateNan.ALL)  # torch.clamp keeps NaN too
    # bnb's default backend handles the partial tail block separately: x / absmax (not x * (1/absmax)),
    # and it stores the floored absmax for it.
    tail = (blk + 1) * BLOCKSIZE > n
    inv = tl.math.div_rn(tl.full([GROUP], 1.0, tl.float32), floor)
    scaled = tl.where(tail[:, None], tl.math.div_rn(x, floor[:, None]), x * inv[:, None])
    scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)
    tl.store(absmax_ptr + blk, tl.where(tail, floor, amax), mask=blk < num_blocks)
    return scaled, blk


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _nibble_shifts():
    """Bit offset of element k (0..7) inside a little-endian int32 of 4 packed bytes: element 2j sits in the
    high nibble of byte j, element 2j + 1 in its low nibble."""
    k = tl.arange(0, 8)
    return 8 * (k // 2) + 4 * (1 - k % 2)


@triton.jit
def _quantize_4bit_kernel(
    # pointers (packed_ptr: uint8, or int32 words when WORDS)
    a_ptr, packed_ptr, absmax_ptr, mid_ptr,
    # sizes
    n, num_blocks,
    # meta
    BLOCKSIZE: tl.constexpr, GROUP: tl.constexpr, IS_FP4: tl.constexpr, FP4_LO: tl.constexpr,
    FP4_HI: tl.constexpr, ABSMAX_FLOOR: tl.constexpr, WORDS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    scaled, blk = _scale_tile(a_ptr, absmax_ptr, pid, n, num_blocks, BLOCKSIZE, GROUP, ABSMAX_FLOOR)
    pos = tl.zeros([GROUP, BLOCKSIZE], dtype=tl.int32)
    for i in tl.static_range(15):
        pos += (scaled > tl.load(mid_ptr + i)).to(tl.int32)
    if IS_FP4:  # sorted position -> bit-pattern code, from two 8-nibble constants
        code = tl.where(pos < 8, (FP4_LO >> (4 * pos)) & 15, (FP4_HI >> (4 * (pos - 8))) & 15)
    else:
        code = pos
    if WORDS:  # n % 8 == 0: 8 codes -> one int32, so each thread stores whole 16-byte vectors
        shifted = tl.reshape(code, [GROUP, BLOCKSIZE // 8, 8]) << _nibble_shifts()[None, None, :]
        word = tl.reduce(shifted, 2, _or)
        woffs = blk[:, None] * (BLOCKSIZE // 8) + tl.arange(0, BLOCKSIZE // 8)[None, :]
        tl.store(packed_ptr + woffs, word, mask=woffs < n // 8)
    else:
        hi, lo = tl.split(tl.reshape(code, [GROUP, BLOCKSIZE // 2, 2]))
        byte = ((hi << 4) | lo).to(tl.uint8)
        boffs = blk[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
        tl.store(packed_ptr + boffs, byte, mask=boffs < (n + 1) // 2)


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr, absmax_ptr, code_ptr, out_ptr,
    n, num_blocks,
    BLOCKSIZE: tl.constexpr, GROUP: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * GROUP + tl.arange(0, GROUP).to(tl.int64)
    scale = tl.load(absmax_ptr + blk, mask=blk < num_blocks, other=0.0)
    boffs = blk[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    byte = tl.load(packed_ptr + boffs, mask=boffs < (n + 1) // 2, other=0).to(tl.int32)
    # code lookups are gathers from the 16-entry table (64 B, stays in L1): one load per value, where a
    # select tree over 16 register values would cost 15 ALU ops per value
    v_hi = tl.load(code_ptr + (byte >> 4)) * scale[:, None]
    v_lo = tl.load(code_ptr + (byte & 15)) * scale[:, None]
    vals = tl.reshape(tl.join(v_hi, v_lo), [GROUP, BLOCKSIZE])
    offs = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + offs, vals.to(out_ptr.dtype.element_ty), mask=offs < n)


@triton.jit
def _quantize_blockwise_kernel(
    a_ptr, q_ptr, absmax_ptr, mid_ptr,
    n, num_blocks,
    BLOCKSIZE: tl.constexpr, GROUP: tl.constexpr, ABSMAX_FLOOR: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    scaled, blk = _scale_tile(a_ptr, absmax_ptr, pid, n, num_blocks, BLOCKSIZE, GROUP, ABSMAX_FLOOR)
    # midpoints padded to 256 with +inf: after the 8 steps pos = #midpoints < scaled
    pos = tl.zeros([GROUP, BLOCKSIZE], dtype=tl.int32)
    for s in tl.static_range(8):  # steps 128, 64, ..., 1
        m = tl.load(mid_ptr + pos + ((128 >> s) - 1))
        pos += tl.where(scaled > m, 128 >> s, 0)
    offs = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(q_ptr + offs, pos.to(tl.uint8), mask=offs < n)


@triton.jit
def _dequantize_blockwise_kernel(
    q_ptr, absmax_ptr, code_ptr, out_ptr,
    n, num_blocks,
    BLOCKSIZE: tl.constexpr, GROUP: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    blk = pid * GROUP + tl.arange(0, GROUP).to(tl.int64)
    offs = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    q = tl.load(q_ptr + offs, mask=offs < n, other=0).to(tl.int32)
    scale = tl.load(absmax_ptr + blk, mask=blk < num_blocks, other=0.0)
    vals = tl.load(code_ptr + q) * scale[:, None]
    tl.store(out_ptr + offs, vals.to(out_ptr.dtype.element_ty), mask=offs < n)


# --- launchers ------------------------------------------------------------------------------------------------
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_quantize_input(A: torch.Tensor, blocksize: int) -> None:
    _check(A.dtype in _FLOATS, f"A must be float32, float16 or bfloat16, got {A.dtype}")
    _check(A.is_contiguous(), "A must be contiguous")
    _check(A.numel() > 0, "A must not be empty")
    _check(blocksize in _BLOCKSIZES, f"blocksize must be one of {_BLOCKSIZES}, got {blocksize}")


def _grid(num_blocks: int, blocksize: int) -> tuple[int, int]:
    group = max(1, TILE // blocksize)
    return group, triton.cdiv(num_blocks, group)


# 4 warps: a 4096-element tile is 32 values per thread (no register spills in the sm_90 build). Untuned:
# tuning num_warps / TILE on an H100 is owed.
NUM_WARPS = 4


def quantize_4bit_triton(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A contiguous fp32/fp16/bf16 (any shape) -> (packed uint8 [(n+1)//2], absmax fp32 [blocks])."""
    _check_quantize_input(A, blocksize)
    _check(quant_type in ("nf4", "fp4"), f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    n = A.numel()
    num_blocks = triton.cdiv(n, blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(num_blocks, dtype=torch.float32, device=A.device)
    sorted_values, _ = codes.sorted_codebook(quant_type, A.device)
    mids = midpoints(sorted_values)
    group, grid = _grid(num_blocks, blocksize)
    words = n % 8 == 0
    _quantize_4bit_kernel[(grid,)](A, packed.view(torch.int32) if words else packed, absmax, mids, n, num_blocks,
                                   BLOCKSIZE=blocksize, GROUP=group, IS_FP4=quant_type == "fp4", FP4_LO=_FP4_LO,
                                   FP4_HI=_FP4_HI, ABSMAX_FLOOR=ABSMAX_FLOOR, WORDS=words,
                                   num_warps=NUM_WARPS)
    return packed, absmax


def _check_scales(absmax: torch.Tensor, n: int, blocksize: int, device) -> None:
    blocks = triton.cdiv(n, blocksize)
    _check(absmax.dtype == torch.float32 and absmax.numel() == blocks and absmax.is_contiguous(),
           f"absmax must be contiguous float32 with {blocks} entries, got {absmax.dtype} {tuple(absmax.shape)}")
    _check(absmax.device == device, f"absmax is on {absmax.device}, expected {device}")


def _check_code(code: torch.Tensor, entries: int | None, device) -> None:
    _check(code.dtype == torch.float32 and code.dim() == 1 and code.is_contiguous(),
           f"code must be a contiguous 1-D float32 tensor, got {code.dtype} {tuple(code.shape)}")
    _check(code.numel() == entries if entries else 2 <= code.numel() <= 256,
           f"code must have {entries or '2..256'} entries, got {code.numel()}")
    _check(code.device == device, f"code is on {code.device}, expected {device}")


def dequantize_4bit_triton(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                           shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """packed uint8 [(n+1)//2], absmax fp32 [blocks], code fp32 [16] -> tensor(shape, dtype)."""
    n = 1
    for s in shape:
        n *= s
    _check(blocksize in _BLOCKSIZES, f"blocksize must be one of {_BLOCKSIZES}, got {blocksize}")
    _check(packed.dtype == torch.uint8 and packed.is_contiguous() and packed.numel() == (n + 1) // 2,
           f"packed must be contiguous uint8 with {(n + 1) // 2} bytes, got {packed.dtype} {tuple(packed.shape)}")
    _check(dtype in _FLOATS, f"dtype must be float32, float16 or bfloat16, got {dtype}")
    _check_scales(absmax, n, blocksize, packed.device)
    _check_code(code, 16, packed.device)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    num_blocks = triton.cdiv(n, blocksize)
    group, grid = _grid(num_blocks, blocksize)
    _dequantize_4bit_kernel[(grid,)](packed, absmax, code, out, n, num_blocks, BLOCKSIZE=blocksize, GROUP=group,
                                     num_warps=NUM_WARPS)
    return out


def padded_midpoints(code: torch.Tensor) -> torch.Tensor:
    """fp32 midpoints of a sorted code book (<= 256 entries), padded to 256 with +inf."""
    mids = midpoints(code)
    pad = torch.full((256 - mids.numel(),), float("inf"), dtype=torch.float32, device=code.device)
    return torch.cat([mids, pad])


def quantize_blockwise_triton(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A contiguous fp32/fp16/bf16, code sorted fp32 [<= 256] -> (q uint8 [n], absmax fp32 [blocks])."""
    _check_quantize_input(A, blocksize)
    _check_code(code, None, A.device)
    n = A.numel()
    num_blocks = triton.cdiv(n, blocksize)
    q = torch.empty(n, dtype=torch.uint8, device=A.device)
    absmax = torch.empty(num_blocks, dtype=torch.float32, device=A.device)
    group, grid = _grid(num_blocks, blocksize)
    _quantize_blockwise_kernel[(grid,)](A, q, absmax, padded_midpoints(code), n, num_blocks, BLOCKSIZE=blocksize,
                                        GROUP=group, ABSMAX_FLOOR=ABSMAX_FLOOR, num_warps=NUM_WARPS)
    return q, absmax


def dequantize_blockwise_triton(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                                dtype: torch.dtype) -> torch.Tensor:
    """q uint8 [n], absmax fp32 [blocks], code fp32 [<= 256] -> code[q] * absmax in `dtype`, [n]."""
    _check(blocksize in _BLOCKSIZES, f"blocksize must be one of {_BLOCKSIZES}, got {blocksize}")
    _check(q.dtype == torch.uint8 and q.is_contiguous() and q.numel() > 0,
           f"q must be a non-empty contiguous uint8 tensor, got {q.dtype} {tuple(q.shape)}")
    _check(dtype in _FLOATS, f"dtype must be float32, float16 or bfloat16, got {dtype}")
    n = q.numel()
    _check_scales(absmax, n, blocksize, q.device)
    _check_code(code, None, q.device)
    out = torch.empty(n, dtype=dtype, device=q.device)
    num_blocks = triton.cdiv(n, blocksize)
    group, grid = _grid(num_blocks, blocksize)
    _dequantize_blockwise_kernel[(grid,)](q, absmax, code, out, n, num_blocks, BLOCKSIZE=blocksize, GROUP=group,
                                          num_warps=NUM_WARPS)
    return out
