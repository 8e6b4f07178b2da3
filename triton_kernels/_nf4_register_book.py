"""NF4/FP4 weight tiles dequantized through a code book held in registers (no per-weight memory access).

The gather loader of nf4_matmul.py reads the 16-entry code book from global memory (L1) once per nibble: in the
sm_90 SASS of the GEMM tiles that is 1.5-2.1 narrow loads and 13-20 instructions per weight (the static model,
benchmarks/static_sm90.py), against ~2 that the cuBLAS targets leave. Here, as in the CUDA decode kernel
(csrc/nf4_gemv.cu), each (row, absmax block) first gets its 16 *scaled* values T(fp32(code[j] * scale)) as two
byte planes in 8 registers; then a 32-bit word of 8 codes costs 16 PRMT + 5 integer ops (`_LOOKUP_WORD_PTX`),
with no multiply per weight. T(fp32(code * scale)) is exactly the reference's dequantized weight (one fp32
product rounded to fp32, then to T with round-to-nearest-even), so the tile is bit-exact.

The lookup is inline PTX, which the Triton interpreter cannot run: under TRITON_INTERPRET=1 the launchers keep
the gather loader. `code_planes` is plain Triton (tests run it in the interpreter) and the PTX is checked by an
emulator of its five opcodes (tests/ops/test_nf4_register_book.py) and compiled for sm_90 in CI; its first run
on a GPU is owed (tests/run_gpu.sh quick runs the Triton NF4 tests with it on).
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["LOOKUP_WORD_PTX", "PLANES_BF16_PTX", "PLANES_F16_PTX", "code_planes", "load_book", "lookup_words",
           "tile_of_words"]

# One 32-bit word w of packed codes (byte j = weights k 2j (high nibble) and k 2j + 1 (low nibble)) -> its 8
# values in k order ($0..$7, 16-bit), from the planes $9..$12 (low bytes of the values of codes 0-3, 4-7, 8-11,
# 12-15) and $13..$16 (their high bytes). Per 4 codes (one selector of 4 nibbles): the low 3 bits of each code
# pick a byte inside the codes 0-7 window and inside the 8-15 window (2 PRMT per plane), bit 3 picks the window
# (pick = i + 4 * bit3 per nibble i: a third PRMT), and two PRMT interleave low and high bytes into value pairs.
# The nibbles come in the order k1, k0, k3, k2 (low nibble first), hence the interleave selectors 0x4051 / 0x6273.
# Shifts run as IMAD.HI (mad.hi / mul.hi by 2^31 + 1 and 2^16) on the FMA pipe: the ALU pipe carries the PRMTs.
# (w - idx) has bit 0 clear, so hi((w - idx) * (2^31 + 1)) = (w - idx) >> 1, and + 0x3210 per half never carries.
def _lookup_ptx() -> str:
    lines = ["{", ".reg .b32 idx, t, pick, i4, p4, a, b, lo, hi, o0, o1, o2, o3;",
             "and.b32 idx, $8, 0x77777777;", "sub.u32 t, $8, idx;", "mad.hi.u32 pick, t, 0x80000001, 0x32103210;"]
    for h, (sel, pick) in enumerate((("idx", "pick"), ("i4", "p4"))):  # codes of bytes 0-1, then bytes 2-3
        if h:  # the selectors of nibbles 4-7
            lines += ["mul.hi.u32 i4, idx, 0x10000;", "mul.hi.u32 p4, pick, 0x10000;"]
        for plane, first in (("lo", 9), ("hi", 13)):
            lines += [f"prmt.b32 a, ${first}, ${first + 1}, {sel};", f"prmt.b32 b, ${first + 2}, ${first + 3}, {sel};",
                      f"prmt.b32 {plane}, a, b, {pick};"]
        lines += [f"prmt.b32 o{2 * h}, lo, hi, 0x4051;", f"prmt.b32 o{2 * h + 1}, lo, hi, 0x6273;"]
    lines += [f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, o{i};" for i in range(4)]
    return "\n".join(lines + ["}"])


LOOKUP_WORD_PTX = tl.constexpr(_lookup_ptx())
LOOKUP_WORD_CONSTRAINTS = tl.constexpr(",".join(["=h"] * 8 + ["r"] * 9))


def _planes_ptx(cvt: str) -> str:
    """scale ($8) and the 16 code-book values ($9..$24) -> the planes lo0..lo3 ($0..$3), hi0..hi3 ($4..$7) of the
    16 values T(fp32(code[j] * scale)): 16 mul.rn (one fp32 rounding each), 8 packed conversions to T with
    round-to-nearest-even (`cvt d, a, b` puts a in the high half), 8 PRMT splitting value pairs into byte planes."""
    lines = ["{", ".reg .f32 v<16>;", ".reg .b32 p<8>;"]
    lines += [f"mul.rn.f32 v{j}, ${9 + j}, $8;" for j in range(16)]
    lines += [f"{cvt} p{i}, v{2 * i + 1}, v{2 * i};" for i in range(8)]
    for i in range(4):
        lines.append(f"prmt.b32 ${i}, p{2 * i}, p{2 * i + 1}, 0x6420;")  # low bytes of values 4i .. 4i + 3
        lines.append(f"prmt.b32 ${4 + i}, p{2 * i}, p{2 * i + 1}, 0x7531;")  # their high bytes
    return "\n".join(lines + ["}"])


PLANES_BF16_PTX = tl.constexpr(_planes_ptx("cvt.rn.bf16x2.f32"))
PLANES_F16_PTX = tl.constexpr(_planes_ptx("cvt.rn.f16x2.f32"))
PLANES_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 8 + ["f"] * 17))


@triton.jit
def code_planes(scale, book, OUT_DTYPE: tl.constexpr):
    """scale [ROWS, GROUPS] fp32 (one per absmax block), book: the 16 code-book values (fp32 scalars) -> the
    byte planes of the 16 values OUT_DTYPE(fp32(book[j] * scale)): (lo0, .., lo3, hi0, .., hi3), int32 each."""
    if OUT_DTYPE == tl.bfloat16:
        asm: tl.constexpr = PLANES_BF16_PTX
    else:
        asm: tl.constexpr = PLANES_F16_PTX
    return tl.inline_asm_elementwise(
        asm, PLANES_CONSTRAINTS,
        [scale, book[0], book[1], book[2], book[3], book[4], book[5], book[6], book[7], book[8], book[9],
         book[10], book[11], book[12], book[13], book[14], book[15]],
        dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32, tl.int32),
        is_pure=True, pack=1)


@triton.jit
def load_book(code_ptr):
    """The 16 code-book values as fp32 scalars (once per program)."""
    return (tl.load(code_ptr + 0), tl.load(code_ptr + 1), tl.load(code_ptr + 2), tl.load(code_ptr + 3),
            tl.load(code_ptr + 4), tl.load(code_ptr + 5), tl.load(code_ptr + 6), tl.load(code_ptr + 7),
            tl.load(code_ptr + 8), tl.load(code_ptr + 9), tl.load(code_ptr + 10), tl.load(code_ptr + 11),
            tl.load(code_ptr + 12), tl.load(code_ptr + 13), tl.load(code_ptr + 14), tl.load(code_ptr + 15))


@triton.jit
def _spread(plane, ROWS: tl.constexpr, GROUPS: tl.constexpr, WORDS: tl.constexpr):
    """[ROWS, GROUPS] -> [ROWS, WORDS]: each word of a row takes its block's plane."""
    return tl.reshape(tl.broadcast_to(plane[:, :, None], (ROWS, GROUPS, WORDS // GROUPS)), (ROWS, WORDS))


@triton.jit
def lookup_words(words, scale, book, ROWS: tl.constexpr, WORDS: tl.constexpr, GROUPS: tl.constexpr,
                 OUT_DTYPE: tl.constexpr):
    """words [ROWS, WORDS] int32 (8 codes each, bitsandbytes nibble order), scale [ROWS, GROUPS] fp32 with
    WORDS // GROUPS consecutive words per block -> the dequantized tile [ROWS, 8 * WORDS] in OUT_DTYPE."""
    lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3 = code_planes(scale, book, OUT_DTYPE)
    v0, v1, v2, v3, v4, v5, v6, v7 = tl.inline_asm_elementwise(
        LOOKUP_WORD_PTX, LOOKUP_WORD_CONSTRAINTS,
        [words, _spread(lo0, ROWS, GROUPS, WORDS), _spread(lo1, ROWS, GROUPS, WORDS),
         _spread(lo2, ROWS, GROUPS, WORDS), _spread(lo3, ROWS, GROUPS, WORDS),
         _spread(hi0, ROWS, GROUPS, WORDS), _spread(hi1, ROWS, GROUPS, WORDS),
         _spread(hi2, ROWS, GROUPS, WORDS), _spread(hi3, ROWS, GROUPS, WORDS)],
        dtype=(tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16, tl.int16),
        is_pure=True, pack=1)  # the bits of OUT_DTYPE values
    return tile_of_words(v0, v1, v2, v3, v4, v5, v6, v7, ROWS, WORDS).to(OUT_DTYPE, bitcast=True)


@triton.jit
def tile_of_words(v0, v1, v2, v3, v4, v5, v6, v7, ROWS: tl.constexpr, WORDS: tl.constexpr):
    """Eight [ROWS, WORDS] tensors, v_k = value k of each word -> [ROWS, 8 * WORDS] in k order. The joins nest
    as [c, d, e] -> k = 4c + 2d + e (join adds the last axis)."""
    w = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    return tl.reshape(w, (ROWS, 8 * WORDS))
