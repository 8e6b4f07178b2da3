"""The NF4 matmul kernels as compiled for sm_90, checked on a machine without a GPU.

1. The register code book of the CUDA decode kernel (csrc/nf4_gemv.cu, nf4_decode_mma_kernel), emulated
   instruction for instruction (PRMT with its sign-replicate mode, the bf16x2 / half2 packing, the mma.sync
   m16n8k16 fragment layouts of the PTX ISA) and compared bit for bit with the reference dequantization, and
   the permuted reduction index of its fragments compared with x @ W^T. The kernel itself runs only on a GPU
   (tests/ops/test_nf4_matmul.py::test_cuda_*); this pins the arithmetic it is built from.
2. SASS properties of the compiled kernels (benchmarks/sass_sm90.py reads them): no local memory, the code
   book not read from memory per weight, the MMA kind each path promises.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import qpeft
from qpeft.reference import nf4_matmul as ref
from ptx_emulator import prmt


# ------------------------------------------------------------------------------------------ emulation
def bits16(v: torch.Tensor, dtype) -> np.ndarray:
    """fp32 -> dtype (round to nearest even, as cvt.rn) -> raw 16 bits."""
    return v.to(dtype).view(torch.int16).numpy().astype(np.uint32) & 0xFFFF


def pack_rn(lo: torch.Tensor, hi: torch.Tensor, dtype) -> np.ndarray:
    return bits16(lo, dtype) | (bits16(hi, dtype) << 16)


def scaled_planes(code: torch.Tensor, s: torch.Tensor, dtype):
    """csrc scaled_planes: (lo[4], hi[4]) byte planes of dtype(fp32(code[j] * s)), s of any shape."""
    prod = code.view(*([1] * s.dim()), 16) * s.unsqueeze(-1)  # one fp32 multiply per entry
    p = [pack_rn(prod[..., 2 * i], prod[..., 2 * i + 1], dtype) for i in range(8)]
    lo = [prmt(p[2 * i], p[2 * i + 1], 0x6420) for i in range(4)]
    hi = [prmt(p[2 * i], p[2 * i + 1], 0x7531) for i in range(4)]
    return lo, hi


def decode_word(w: np.ndarray, lo, hi) -> list[np.ndarray]:
    """csrc decode_word: 8 codes of a word -> 4 registers of (k 2j low half, k 2j + 1 high half)."""
    w = np.asarray(w, dtype=np.uint64)
    idx = w & np.uint64(0x77777777)
    a = (w - idx) & np.uint64(0xFFFFFFFF)                                   # mad.lo w + idx * -1
    pick = ((a * np.uint64(0x80000001)) >> np.uint64(32)) + np.uint64(0x32103210)  # mad.hi (no 32-bit wrap)
    assert (pick < 2 ** 32).all()
    out = []
    for h in range(2):
        i4 = (idx >> np.uint64(16)) if h else idx
        p4 = (pick >> np.uint64(16)) if h else pick
        lo_b = prmt(prmt(lo[0], lo[1], i4), prmt(lo[2], lo[3], i4), p4)
        hi_b = prmt(prmt(hi[0], hi[1], i4), prmt(hi[2], hi[3], i4), p4)
        out += [prmt(lo_b, hi_b, 0x4051), prmt(lo_b, hi_b, 0x6273)]
    return out


def _reference_values(words: np.ndarray, code: torch.Tensor, s: torch.Tensor, dtype) -> np.ndarray:
    """dtype bits of the reference dequantization of the 8 codes of each word (k order), shape (..., 8)."""
    packed = torch.from_numpy(words.astype(np.int64)).to(torch.int64)
    nib = torch.stack([(packed >> (8 * j + sh)) & 0xF for j in range(4) for sh in (4, 0)], dim=-1)
    values = code[nib] * s.unsqueeze(-1)
    return bits16(values, dtype).reshape(*words.shape, 8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_register_code_book_is_bit_exact(dtype, quant_type):
    """Every code in every byte position, random scales (and the nested absmax's tiny / huge ones): the PRMT
    lookups give exactly dtype(fp32(code * absmax)), the reference's dequantized weight rounded to dtype."""
    g = torch.Generator().manual_seed(0)
    code = qpeft.formats.codes.nf4() if quant_type == "nf4" else qpeft.formats.codes.fp4()
    n = 4096
    words = torch.randint(0, 2 ** 32, (n,), generator=g, dtype=torch.int64).numpy().astype(np.uint32)
    words[:16] = [int("".join(f"{(j + i) % 16:x}" for i in range(8)), 16) for j in range(16)]  # all codes
    scale = torch.exp(torch.randn(n, generator=g) * 3).float()
    scale[:4] = torch.tensor([0.0, 1e-38, 3.0e38 / 2, 1.0])
    lo, hi = scaled_planes(code, scale, dtype)
    got = decode_word(words, lo, hi)
    want = _reference_values(words, code, scale, dtype)
    for j in range(4):
        assert np.array_equal(got[j] & 0xFFFF, want[:, 2 * j]), f"k={2 * j}"
        assert np.array_equal(got[j] >> 16, want[:, 2 * j + 1]), f"k={2 * j + 1}"


# --- mma.sync m16n8k16 fragment layout (PTX ISA "Matrix Fragments for mma.m16n8k16 with floating point type")
def _halves_to_f64(bits: np.ndarray, dtype) -> np.ndarray:
    return torch.from_numpy(bits.astype(np.uint16).view(np.int16)).view(dtype).double().numpy()


def mma_m16n8k16(a_regs, b_regs, dtype) -> np.ndarray:
    """D (16 x 8, fp64) = A (16 x 16) @ B (16 x 8) from the 32 lanes' registers: a_regs[lane] = 4 uint32
    (a0a1, a2a3, a4a5, a6a7), b_regs[lane] = 2 uint32 (b0b1, b2b3), 16-bit halves, low half first."""
    A = np.zeros((16, 16), dtype=np.uint32)
    B = np.zeros((16, 8), dtype=np.uint32)
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i in range(8):
            row = g + (8 if i in (2, 3, 6, 7) else 0)
            col = 2 * t + (i & 1) + (8 if i >= 4 else 0)
            A[row, col] = (int(a_regs[lane][i // 2]) >> (16 * (i & 1))) & 0xFFFF
        for i in range(4):
            k = 2 * t + (i & 1) + (8 if i >= 2 else 0)
            B[k, g] = (int(b_regs[lane][i // 2]) >> (16 * (i & 1))) & 0xFFFF
    return _halves_to_f64(A, dtype) @ _halves_to_f64(B, dtype)


@pytest.mark.parametrize("M", [1, 5, 8, 13, 16])
def test_decode_fragments_compute_x_times_w_transposed(M):
    """One warp pass of the decode kernel emulated: 8 rows of W x 256 k, lane (g, t) decoding W row g, k
    [64 t, 64 t + 64) with its block's planes. For each word j (k 64t + 8j .. + 7) the A operand is the 16-byte
    load of x (token row g, and g + 8 for M > 8) as is, multiplied once with the W pairs of k +0 / +4 (D rows 0-7
    right) and once with those of k +2 / +6 (D rows 8-15 right); token m sums D row m of the first accumulator
    and D row m + 8 of the second. Must equal x @ W^T over the chunk (exact bf16 products, fp64 sums here)."""
    dtype = torch.bfloat16
    g_ = torch.Generator().manual_seed(M)
    N, K, bs = 8, 256, 64
    W = torch.randn(N, K, generator=g_)
    packed, state = qpeft.quantize_4bit(W, blocksize=bs, double_quant=False)
    Wq = ref.dequantize_weight_ref(packed, state.absmax, state.code, bs, N, K)
    x = torch.randn(M, K, generator=g_).to(dtype)
    pb = packed.reshape(-1).numpy()
    xw = (x.view(torch.int16).numpy().astype(np.uint32) & 0xFFFF).reshape(M, K // 2, 2)
    xw = xw[..., 0] | (xw[..., 1] << 16)  # bf16 pairs (k, k+1) as uint32, low half = k
    tiles = 2 if M > 8 else 1
    acc = np.zeros((tiles, 2, 16, 8))
    decoded = {}
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        e = g * K + 64 * t
        by = pb[e // 2: e // 2 + 32].astype(np.uint32)
        w8 = by[0::4] | (by[1::4] << 8) | (by[2::4] << 16) | (by[3::4] << 24)
        lo, hi = scaled_planes(state.code, state.absmax[e // bs].reshape(1), dtype)
        decoded[lane] = [decode_word(w8[j:j + 1], lo, hi) for j in range(8)]
    for j in range(8):
        for tile in range(tiles):
            for second in (0, 1):
                a_regs, b_regs = [], []
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    token = min(8 * tile + g, M - 1)  # rows past M clamped, as the kernel does
                    kw = (64 * t + 8 * j) // 2
                    a_regs.append([int(v) for v in xw[token, kw:kw + 4]])
                    b = decoded[lane][j]
                    b_regs.append([int(b[second][0]), int(b[second + 2][0])])
                acc[tile, second] += mma_m16n8k16(a_regs, b_regs, dtype)
    got = np.concatenate([acc[tile, 0, :8] + acc[tile, 1, 8:] for tile in range(tiles)])[:M]
    want = x.double() @ Wq.to(dtype).double().t()
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------ Triton dequantization
def decode_launch(M: int, N: int, K: int, tg: int) -> dict:
    """csrc launch_decode_t's geometry on a 132-SM H100, as benchmarks/static_sm90.py mirrors it."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import static_sm90

    return static_sm90.decode_geometry(M, N, K, tg)


def emulate_decode_work_split(x: np.ndarray, W: np.ndarray, geo: dict) -> tuple[np.ndarray, np.ndarray]:
    """nf4_decode_mma_kernel's work split, emulated per CTA and warp: warp w of CTA b takes the rows
    n0 = (b rg + w / kw) 8 r8 .. + 8 r8 (loads clamped to row N - 1) and the passes kwi, kwi + kw, ... (kwi = w % kw);
    the epilogue maps output o of the CTA to (token m, column nn), row group gi = nn / (8 r8), and sums the
    accumulators of warps gi kw .. gi kw + kw - 1 in warp order. Returns the output and how often each was stored."""
    M, K = x.shape
    N = W.shape[0]
    r8, kw, rg, warps = geo["r8"], geo["kw"], geo["rg"], geo["warps"]
    out = np.zeros((M, N))
    stores = np.zeros((M, N), dtype=int)
    for b in range(geo["ctas"]):
        acc = np.zeros((warps, 8 * r8, M))
        for w in range(warps):
            n0 = (b * rg + w // kw) * 8 * r8
            rows = np.minimum(np.arange(n0, n0 + 8 * r8), N - 1)
            for p in range(w % kw, geo["passes"], kw):
                ks = slice(256 * p, 256 * p + 256)
                acc[w] += W[rows, ks] @ x[:, ks].T
        cols = 8 * r8 * rg
        for o in range(M * cols):
            m, nn = divmod(o, cols)
            gi, nr = divmod(nn, 8 * r8)
            v = sum(acc[wi, nr, m] for wi in range(gi * kw, gi * kw + kw))
            n = b * cols + nn
            if n < N:
                out[m, n] = v
                stores[m, n] += 1
    return out, stores


@pytest.mark.parametrize("M,N,K,tg", [(16, 4104, 8448, 2), (12, 4104, 8448, 2), (8, 4100, 12544, 1),
                                      (64, 2040, 1536, 8), (16, 1000, 2816, 2), (3, 37, 256, 1),
                                      (24, 2056, 512, 4)])
def test_decode_work_split_stores_every_output_once(M, N, K, tg):
    """The decode kernel's split of rows and passes over CTAs, row groups and warps, with the launch geometry of
    the host: every output stored exactly once, and equal to x @ W^T (small integers: exact sums). Covers two row
    groups per CTA with the last CTA's second group past N (N = 4104, 4100) and passes that do not divide among the
    warps (33, 49, 11), six warps (K = 1536), one group (N = 1000), one warp (K = 256) and two 8-row tiles per
    warp (tg = 4)."""
    geo = decode_launch(M, N, K, tg)
    g_ = np.random.default_rng(M * N + K)
    x = g_.integers(-3, 4, (M, K)).astype(np.float64)
    W = g_.integers(-3, 4, (N, K)).astype(np.float64)
    out, stores = emulate_decode_work_split(x, W, geo)
    assert (stores == 1).all()
    np.testing.assert_array_equal(out, x @ W.T)


def test_decode_row_groups_where_x_outgrows_l1():
    """Two row groups per CTA exactly where one CTA's x passes the 192 KB of L1 and the grid still fills every SM
    with its CTAs (two per SM at M <= 16); the GPU test shapes of tests/ops/test_nf4_matmul.py take this path."""
    assert decode_launch(16, 4096, 14336, 2)["rg"] == 2      # Llama-3-8B down: 256 CTAs of 16 rows
    assert decode_launch(16, 4096, 4096, 2)["rg"] == 1       # x is 128 KB: L1 serves the SM's later CTAs
    assert decode_launch(16, 1024, 14336, 2)["rg"] == 1      # 64 CTAs would leave SMs idle
    assert decode_launch(8, 28672, 8192, 1)["rg"] == 1       # 128 KB
    assert decode_launch(16, 28672, 8192, 2)["rg"] == 2
    assert decode_launch(12, 4104, 8448, 2)["rg"] == 2       # GPU test shapes
    assert decode_launch(8, 4100, 12544, 1)["rg"] == 2
    assert decode_launch(64, 8192, 1792, 8)["rg"] == 1       # 7 warps do not split in two (229 KB of x)
    geo = decode_launch(16, 4104, 8448, 2)
    assert (geo["kw"], geo["ctas"]) == (4, 257)


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


if _has_triton():
    import triton
    import triton.language as tl

    from qpeft.triton_kernels.nf4_matmul import _block_scales, _dequant_tile, _dequant_tile_aligned

    @triton.jit
    def _dequant_probe(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr,
                       N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                       NESTED: tl.constexpr, ALIGNED: tl.constexpr):
        """The fp32 W tile the GEMM kernels feed to tl.dot (before the cast to the activation dtype)."""
        offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        offs_k = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        offset = 0.0
        if NESTED:
            offset = tl.load(offset_ptr)
        if ALIGNED:
            w = _dequant_tile_aligned(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                                      offs_n, offs_n < N, tl.program_id(1) * BLOCK_K, K, BLOCK_N, BLOCK_K,
                                      BLOCKSIZE, NESTED)
        else:
            w = _dequant_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                              offs_n[:, None], offs_k[None, :], (offs_n[:, None] < N) & (offs_k[None, :] < K), K,
                              BLOCKSIZE, NESTED)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w, mask=mask)


    @triton.jit
    def _scales_probe(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr, out_ptr, N, K,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, EVEN: tl.constexpr,
                      TABLE: tl.constexpr, WORDS: tl.constexpr):
        """The fp32 absmax [rows, blocks of the K step] `_block_scales` gives the register code book's tiles, with
        the double-quantized absmax read as the kernels' NESTED_TABLE / ABSMAX_WORDS say (or the byte gather)."""
        GROUPS: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K >= BLOCKSIZE else 1
        offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        k0 = tl.program_id(1) * BLOCK_K
        offset = tl.load(offset_ptr)
        table = None
        if TABLE:
            table = tl.load(nested_code_ptr + tl.arange(0, 256))
        s = _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, offs_n, offs_n < N, k0, K,
                          BLOCK_K, BLOCKSIZE, True, EVEN, table, WORDS)
        g = k0 // BLOCKSIZE + tl.arange(0, GROUPS)
        blocks = K // BLOCKSIZE
        inside = (g[None, :] < blocks) & (k0 + tl.arange(0, GROUPS)[None, :] * BLOCKSIZE < K)
        tl.store(out_ptr + offs_n[:, None] * blocks + g[None, :], s, mask=(offs_n[:, None] < N) & inside)


_TRITON_AVAILABLE = _has_triton()
_INTERPRET = __import__("os").environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.triton
@pytest.mark.skipif(not _TRITON_AVAILABLE or not (torch.cuda.is_available() or _INTERPRET),
                    reason="runs a Triton kernel (GPU, or CPU under TRITON_INTERPRET=1)")
@pytest.mark.parametrize("table,words", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("N,K,bs,BN,BK", [(64, 1024, 64, 16, 64),     # whole tiles (EVEN), one block per step
                                          (64, 1024, 32, 16, 128),    # four blocks per step: one whole word
                                          (48, 2048, 256, 16, 128),   # half a block per step
                                          (40, 768, 64, 16, 128)])    # rows and K steps past the weight (masked)
def test_nested_absmax_read_as_table_and_words_is_exact(table, words, N, K, bs, BN, BK):
    """The register code book's launches read the double-quantized absmax with the nested code book gathered from
    a register table through shared memory (NESTED_TABLE) and the codes as 32-bit words (ABSMAX_WORDS, rows of
    whole words: K // blocksize % 4 == 0), instead of a byte load and a global gather: exactly the reference's
    scales either way, on whole tiles and on masked ones."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(5)) * 3
    packed, state = qpeft.quantize_4bit(W, blocksize=bs, double_quant=True)
    assert (K // bs) % 4 == 0 and state.absmax.dtype == torch.uint8 and state.state2.code.numel() == 256
    want = ref.decode_absmax_ref(state.absmax, state.state2.absmax, state.state2.code, state.offset).view(N, K // bs)
    out = torch.full((N, K // bs), float("nan"), device=dev)
    even = N % BN == 0 and K % BK == 0
    _scales_probe[(triton.cdiv(N, BN), triton.cdiv(K, BK))](
        state.absmax.to(dev), state.state2.absmax.to(dev), state.state2.code.to(dev), state.offset.to(dev), out, N, K,
        BLOCK_N=BN, BLOCK_K=BK, BLOCKSIZE=bs, EVEN=even, TABLE=table, WORDS=words)
    assert torch.equal(out.cpu(), want)


@pytest.mark.triton
@pytest.mark.skipif(not _TRITON_AVAILABLE or not (torch.cuda.is_available() or _INTERPRET),
                    reason="runs a Triton kernel (GPU, or CPU under TRITON_INTERPRET=1)")
@pytest.mark.parametrize("aligned,K", [(True, 256), (False, 200)])
@pytest.mark.parametrize("nested", [True, False])
def test_triton_dequantized_tile_is_bit_exact(aligned, K, nested):
    """The Triton tile loaders give exactly the reference's fp32 weights (so also exactly their bf16 / fp16
    roundings): code * absmax in one fp32 multiply, the double-quantized absmax as code2 * absmax2 and + offset,
    two roundings (pinned with mul.rn / add.rn: an FFMA contraction moves the scale by up to 1 ulp)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    N, bs = 40, 64
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(3)) * 3
    packed, state = qpeft.quantize_4bit(W, blocksize=bs, double_quant=nested)
    absmax = ref.decode_absmax_ref(state.absmax, *((state.state2.absmax, state.state2.code, state.offset)
                                                   if nested else (None, None, None)))
    want = ref.dequantize_weight_ref(packed, absmax, state.code, bs, N, K)
    out = torch.full((N, K), float("nan"), device=dev)
    nest = (state.state2.absmax, state.state2.code, state.offset) if nested else (state.code,) * 3
    BN, BK = 16, 64
    _dequant_probe[(triton.cdiv(N, BN), triton.cdiv(K, BK))](
        packed.to(dev), state.absmax.to(dev), state.code.to(dev), *(t.to(dev) for t in nest), out, N, K,
        BLOCK_N=BN, BLOCK_K=BK, BLOCKSIZE=bs, NESTED=nested, ALIGNED=aligned)
    assert torch.equal(out.cpu(), want)


@pytest.mark.skipif(not _TRITON_AVAILABLE or _INTERPRET, reason="compiles for sm_90 (not under the interpreter)")
def test_triton_nested_scale_is_not_contracted_for_sm90():
    """Compiled for sm_90 with FP fusion on (the launchers pin enable_fp_fusion=True), the tile loader's
    double-quantized scale is an FMUL and an FADD, never an FFMA; the probe has no other multiply-add."""
    from benchmarks.sm90_compile import TritonLaunch

    from benchmarks.sass_sm90 import parse_sass, sass_of_cubin

    u8, f32 = torch.empty(64, dtype=torch.uint8), torch.empty(64)
    launch = TritonLaunch(_dequant_probe, (1, 1), (u8, u8, f32, f32, f32, f32, f32, 40, 256),
                          dict(BLOCK_N=16, BLOCK_K=64, BLOCKSIZE=64, NESTED=True, ALIGNED=True, num_warps=4,
                               enable_fp_fusion=True))
    sass, _ = sass_of_cubin(launch.compile().asm["cubin"])
    (kern,) = parse_sass(sass).values()
    ops = {i.base for i in kern.instrs}
    assert "FFMA" not in ops and {"FMUL", "FADD"} <= ops, sorted(ops)


# ------------------------------------------------------------------------------------------ CUDA decode kernel SASS
def _nvcc() -> bool:
    import shutil

    return shutil.which("nvcc") is not None


@pytest.mark.skipif(not _nvcc(), reason="needs nvcc (compiles csrc/nf4_gemv.cu for sm_90)")
@pytest.mark.parametrize("M", [1, 16])
def test_cuda_decode_kernel_sass(M):
    """csrc/nf4_gemv.cu compiled for sm_90 (cached in build/static_sm90): the tensor-core decode kernel keeps
    everything in registers (no local memory), reads the code book from no memory in its main loop (PRMTs, no
    narrow loads per weight), streams W with 16-byte evict-first loads, issues mma.sync (HMMA), and its ALU work
    per weight leaves the issue ceiling of the static model at >= 80% of the bandwidth floor (the ALU pipe, 64
    operations per clock per SM, against 25.3 NF4 weights per clock per SM at 3.02 TB/s)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import static_sm90

    launch, = static_sm90.cuda_launches("fwd", M, 4096, 4096)
    assert launch.path == "cuda_decode"
    usage, lp = launch.usage, launch.loop
    assert usage["LOCAL"] == 0 and usage["STACK"] == 0, usage
    per_w = 32 / launch.weights_per_pass
    narrow = [i for i in lp.path if i.base in ("LDS", "LDG") and i.width_bits() <= 32]
    # per pass a lane reads its block's scale (uint8 code, nested code, nested absmax) for 64 weights, nothing else
    assert len(narrow) * per_w <= 3 / 64, [i.opcode for i in narrow]
    assert lp.opcodes["PRMT"] * per_w >= 2.0                        # the register code book
    assert {i.opcode for i in lp.path if ".EF" in i.opcode} == {"LDG.E.EF.128", "LDG.E.EF.U8"}
    assert lp.kinds() == "HMMA"
    alu_per_w = lp.counts["alu"] * per_w
    floor_rate = static_sm90.HW.floor_weights_per_clk
    assert 64 / alu_per_w >= 0.8 * floor_rate, f"{alu_per_w:.2f} ALU ops per weight"


@pytest.mark.skipif(not _nvcc(), reason="needs nvcc (compiles csrc/nf4_gemv.cu for sm_90)")
def test_static_model_names_the_bound_and_moves_with_the_l2_bandwidth():
    """Each prediction names the term that sets it; one bound by L2 re-reads takes exactly their bytes over the
    assumed L2 bandwidth (plus the launch ramp), and stops being L2 bound once that bandwidth is high enough. The
    decode launch (compiled as in the test above) with its L2 bytes raised to 100 MB."""
    import dataclasses
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import static_sm90

    M, N, K = 16, 4096, 4096
    launch, = static_sm90.cuda_launches("fwd", M, N, K)
    as_built = static_sm90.evaluate("cuda", [launch], "fwd", M, N, K)
    assert as_built["bound"] in ("DRAM", "SM issue", "SM latency")  # 1 MB of x re-reads: not L2
    heavy = dataclasses.replace(launch, l2_reread=100e6)
    saved = static_sm90.HW.l2_bandwidth
    ramp_us = static_sm90.launch_ramp_s() * 1e6
    try:
        row = static_sm90.evaluate("cuda", [heavy], "fwd", M, N, K)
        assert row["bound"] == "L2"
        assert row["predicted_us"] == pytest.approx(100e6 / saved * 1e6 + ramp_us, abs=1e-3)
        static_sm90.set_l2_bandwidth(2 * saved)
        row2 = static_sm90.evaluate("cuda", [heavy], "fwd", M, N, K)
        assert row2["predicted_us"] == pytest.approx(100e6 / (2 * saved) * 1e6 + ramp_us, abs=1e-3)
        static_sm90.set_l2_bandwidth(1e18)
        assert static_sm90.evaluate("cuda", [heavy], "fwd", M, N, K)["bound"] == as_built["bound"]
    finally:
        static_sm90.set_l2_bandwidth(saved)
    assert static_sm90.HW.l2_bandwidth == saved
    for argv, what in ((["--l2-bandwidth", "0", "--tag", "x"], "TB/s > 0"), (["--l2-bandwidth", "8"], "--tag"),
                       (["--sweep-l2", "8,-1"], "TB/s > 0")):
        with pytest.raises(SystemExit, match=re.escape(what)):
            static_sm90.main(argv)


@pytest.mark.skipif(not _nvcc(), reason="needs nvcc (compiles csrc/nf4_gemv.cu for sm_90)")
def test_static_model_ceiling_ramp_and_measured_cublas(tmp_path):
    """GEMM rows: cuBLAS pays the launch ramp every launch of ours pays; `ceiling` is the most a one-launch kernel
    at the NF4 floor gets (1.00x where the bf16 roofline is bound by FLOPs: 8b gate/up at M = 256; above 1 where it
    is bound by bytes: M = 64); the forward rows of performance.md's anchor shapes are also read against the
    measured cuBLAS time, and no other row is. A compiled launch stands in for the kernel (its time is not the
    point here)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import static_sm90 as S

    launch, = S.cuda_launches("fwd", 16, 4096, 4096)
    ramp = S.launch_ramp_s()
    rows = {}
    for direction, M, N, K in (("fwd", 256, 14336, 4096), ("fwd", 64, 4096, 4096), ("dx", 256, 14336, 4096),
                               ("fwd", 256, 1024, 4096)):
        row = S.evaluate("cuda", [launch], direction, M, N, K)
        flops, bf16 = 2 * M * N * K, N * K * 2 + 2 * (M * K + M * N)
        cublas = max(bf16 / S.HW.bandwidth, flops / S.HW.cublas_flops) + ramp
        assert row["cublas_us"] == pytest.approx(cublas * 1e6, abs=1e-3)
        assert row["predicted"] == pytest.approx(cublas / (row["predicted_us"] * 1e-6), abs=1e-3)
        assert row["ceiling"] == pytest.approx(cublas / (row["floor_us"] * 1e-6 + ramp), abs=1e-3)
        rows[direction, M, N] = row
    compute_bound, byte_bound = rows["fwd", 256, 14336], rows["fwd", 64, 4096]
    assert compute_bound["ceiling"] == 1.0 and S._target_at_ceiling(compute_bound)
    assert byte_bound["ceiling"] > 2 and not S._target_at_ceiling(byte_bound)
    assert compute_bound["cublas_measured_us"] == 53.7 and byte_bound["cublas_measured_us"] == 17.0
    assert compute_bound["vs_measured_cublas"] == pytest.approx(53.7 / compute_bound["predicted_us"], abs=1e-3)
    for key in (("dx", 256, 14336), ("fwd", 256, 1024)):  # dx, and a shape without an anchor
        assert rows[key]["cublas_measured_us"] is None and rows[key]["vs_measured_cublas"] is None
    row = {"model": "8b", "layer": "gate/up", "dispatched": True, **compute_bound}
    _, md = S.write([row], tmp_path, "t")
    line = md.read_text().splitlines()[-1]
    assert f"| {compute_bound['bound']}" in line and "| 1.00 | " in line
    assert f"| {compute_bound['vs_measured_cublas']:.2f} | 1.00 " in line


def test_static_model_calibration_joins_measured_and_predicted(tmp_path, capsys):
    """`static_sm90 --calibrate`: a GPU run of the model's cases (benchmarks/measure_static_cases.py) next to the
    predictions: decode rows as a fraction of the floor (CUDA-graph time when measured), the others vs the cuBLAS
    of the same run, and measured / predicted per case and per path; the rows the model has bound by L2 give the
    L2 bandwidth the measurement implies (their L2 bytes over the measured time less one launch ramp each)."""
    import csv
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.static_sm90 import calibrate

    pred = tmp_path / "pred.csv"
    with open(pred, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "layer", "direction", "M", "dispatched", "path", "metric",
                                          "predicted", "floor_us", "predicted_us", "bound", "l2_reread_MB",
                                          "launches"])
        w.writeheader()
        w.writerow(dict(model="8b", layer="q/o", direction="fwd", M=1, dispatched=True, path="cuda_decode",
                        metric="fraction of floor", predicted=0.8, floor_us=2.0, predicted_us=2.5, bound="DRAM",
                        l2_reread_MB=1.0, launches=1))
        w.writerow(dict(model="8b", layer="q/o", direction="dx", M=1024, dispatched=True, path="triton",
                        metric="x bf16 cuBLAS", predicted=0.5, floor_us=50.0, predicted_us=100.0, bound="L2",
                        l2_reread_MB=500.0, launches=2))
        w.writerow(dict(model="8b", layer="q/o", direction="dx", M=1024, dispatched=False, path="cuda_tile",
                        metric="x bf16 cuBLAS", predicted=0.1, floor_us=50.0, predicted_us=500.0, bound="L2",
                        l2_reread_MB=9.0, launches=1))
    meas = tmp_path / "static_cases.csv"
    with open(meas, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "layer", "direction", "M", "qpeft_ms", "qpeft_graph_ms",
                                          "cublas_ms", "cublas_graph_ms", "device"])
        w.writeheader()
        w.writerow(dict(model="8b", layer="q/o", direction="fwd", M=1, qpeft_ms=0.01, qpeft_graph_ms=0.004,
                        cublas_ms=0.02, cublas_graph_ms=0.017, device="NVIDIA H100 80GB HBM3"))
        w.writerow(dict(model="8b", layer="q/o", direction="dx", M=1024, qpeft_ms=0.1, qpeft_graph_ms="",
                        cublas_ms=0.06, cublas_graph_ms="", device="NVIDIA H100 80GB HBM3"))
    csv_p, md_p = calibrate(meas, pred, tmp_path / "out")
    rows = list(csv.DictReader(open(csv_p)))
    assert [(r["path"], float(r["measured"]), float(r["measured_over_predicted"])) for r in rows] == [
        ("cuda_decode", 0.5, 0.625),  # 2.0 us floor / 4.0 us under the graph
        ("triton", 0.6, 1.2)]         # 0.06 ms cuBLAS / 0.1 ms
    assert csv_p.name == "calibration_NVIDIA_H100_80GB_HBM3.csv" and "| cuda_decode | 1 | 0.62 |" in md_p.read_text()
    from benchmarks.static_sm90 import launch_ramp_s

    ramp_us = launch_ramp_s() * 1e6
    assert rows[0]["implied_l2_TBps"] == ""  # DRAM bound: implies nothing about L2
    want = 500.0 / (100.0 - 2 * ramp_us)    # 500 MB in 100 us less two ramps, MB/us = TB/s
    assert float(rows[1]["implied_l2_TBps"]) == pytest.approx(want, abs=0.005)
    assert f"median {want:.2f} TB/s" in md_p.read_text() and f"--l2-bandwidth {want:.2f}" in md_p.read_text()
    # the CLI (tests/run_gpu.sh quick): the predictions of --out / --tag, the table printed into the run's log
    import shutil

    from benchmarks.static_sm90 import main

    (tmp_path / "cli").mkdir()
    shutil.copy(pred, tmp_path / "cli" / "static_sm90_t.csv")
    capsys.readouterr()
    assert main(["--calibrate", str(meas), "--out", str(tmp_path / "cli"), "--tag", "t"]) == 0
    printed = capsys.readouterr().out
    assert f"median {want:.2f} TB/s" in printed and printed.rstrip().endswith("calibration_NVIDIA_H100_80GB_HBM3.md")


@pytest.mark.parametrize("direction", ["fwd", "dx"])
def test_static_model_counts_each_column_span_once(direction):
    """The model's L2 bytes of a two-launch plan (the launchers' LEAD spans, 8b gate/up forward / down dx at
    M = 1024): each launch counts its own columns, so x (dy) is re-read once per column tile of either launch and W
    once per M tile of the launch that covers its columns. Recorded, not compiled."""
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import static_sm90

    M, N, K = (1024, 14336, 4096) if direction == "fwd" else (1024, 4096, 14336)
    launches = static_sm90.triton_launches(direction, M, N, K)
    got = [static_sm90.triton_l2_reread(r.name, r.constexprs(), r.grid, M, N, K) for r in launches]
    w = static_sm90.HW.nf4_bytes_per_weight
    lead, rest = 12672, 1664  # 99 tiles of 128 columns (256-row tiles), 13 tiles of 128 (128-row tiles)
    if direction == "fwd":  # x re-read per 128-column N tile; W (columns x K) per M tile
        want = [99 * M * K * 2 + 4 * lead * K * w, 13 * M * K * 2 + 8 * rest * K * w]
    else:  # dy re-read per 128-column dx tile; W (N x columns) per M tile
        want = [99 * M * N * 2 + 4 * N * lead * w, 13 * M * N * 2 + 8 * N * rest * w]
    assert got == [(pytest.approx(b), False) for b in want], got


def test_static_model_counts_the_serial_splits_partials():
    """The model's L2 bytes of a serial split launch: x re-read per N tile, W per M tile, and the fp32 partials:
    every split writes its own and the last reads back the others' (2 splits: 3 partial tiles; it adds the other's
    to its accumulator; more splits with KEEP_OWN_PARTIAL: 2 x splits - 1, it takes its own from its accumulator)
    or all of them (2 x splits). 8b q/o forward at M = 256 (2 splits of 128 x 128 x 128), k/v at M = 128 (8
    splits of 64 x 128 x 128, which keeps its own) and M = 256 (4 splits of it). Recorded, not compiled."""
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import static_sm90
    from qpeft.triton_kernels.nf4_matmul import split_partial_tiles

    w = static_sm90.HW.nf4_bytes_per_weight
    for (M, N, K), bm, split, keeps_own, partials in (((256, 4096, 4096), 128, 2, False, 3),
                                                       ((128, 1024, 4096), 64, 8, True, 15),
                                                       ((256, 1024, 4096), 64, 4, True, 7)):
        rec, = static_sm90.triton_launches("fwd", M, N, K)
        c = rec.constexprs()
        assert (c["BLOCK_M"], c["BLOCK_N"], c["SPLIT_K"], c["SERIAL_SPLIT"]) == (bm, 128, split, True), c
        assert c.get("KEEP_OWN_PARTIAL", False) is keeps_own
        assert split_partial_tiles(split, keeps_own) == partials
        want = N // 128 * M * K * 2 + M // bm * N * K * w + partials * M * N * 4
        assert static_sm90.triton_l2_reread(rec.name, c, rec.grid, M, N, K) == (pytest.approx(want), True)
    assert split_partial_tiles(8) == 16 and split_partial_tiles(4) == 8 and split_partial_tiles(1) == 0


def test_measure_static_cases_rows_calibrate_the_model(tmp_path):
    """benchmarks/measure_static_cases.py (GPU only in use) run through its CPU seam on a tiny shape: both
    directions, a decode M (CUDA-graph columns) and a GEMM M, with the columns `static_sm90 --calibrate` reads."""
    import csv
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.measure_static_cases import _case
    from benchmarks.static_sm90 import calibrate

    rows = _case(256, 64, [1, 17], ("fwd", "dx"), device="cpu", flush_bytes=0)
    assert [(r["M"], r["direction"]) for r in rows] == [(1, "fwd"), (1, "dx"), (17, "fwd"), (17, "dx")]
    for r in rows:
        assert r["qpeft_ms"] > 0 and r["cublas_ms"] > 0 and r["backend"] in ("cuda", "triton", "reference")
        assert ("qpeft_graph_ms" in r) == (r["M"] <= 16)
    meas, pred = tmp_path / "static_cases.csv", tmp_path / "pred.csv"
    with open(meas, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "layer", *rows[0], "device"])
        w.writeheader()
        w.writerows({"model": "8b", "layer": "t", "device": "cpu", **r} for r in rows)
    with open(pred, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "layer", "direction", "M", "dispatched", "path", "metric",
                                          "predicted", "floor_us", "predicted_us"])
        w.writeheader()
        for r in rows:
            decode = r["M"] <= 16 and r["direction"] == "fwd"
            w.writerow(dict(model="8b", layer="t", direction=r["direction"], M=r["M"], dispatched=True,
                            path="p", metric="fraction of floor" if decode else "x bf16 cuBLAS", predicted=0.5,
                            floor_us=1e6, predicted_us=2.0))
    csv_p, _ = calibrate(meas, pred, tmp_path / "out")
    got = list(csv.DictReader(open(csv_p)))
    assert [(int(g["M"]), g["direction"]) for g in got] == [(r["M"], r["direction"]) for r in rows]
    for g, r in zip(got, rows):  # the CPU timings themselves are noise: only that they are carried through
        assert float(g["measured_us"]) == round(r.get("qpeft_graph_ms", r["qpeft_ms"]) * 1e3, 3)
        assert float(g["measured"]) >= 0 and float(g["predicted"]) == 0.5


def test_static_model_other_models_run_apart_from_the_llama3_table(monkeypatch, tmp_path):
    """`--shapes others` models the other models' layers (Qwen2.5-7B, Qwen3-8B, Gemma-2-9B, Llama-3.2-3B / 1B), which
    "all" (issue 27's Llama-3 8B / 70B table) leaves out, and tags their results apart (others-triton<version>).
    The paths and their evaluation are stand-ins: this checks which problems run and where they are written."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import static_sm90 as s
    from benchmarks.sm90_compile import triton_version

    monkeypatch.setattr(s, "paths_for", lambda d, M, N, K, which: [("triton", True, lambda: None)])
    monkeypatch.setattr(s, "evaluate", lambda name, launches, d, M, N, K: dict(
        K=K, N=N, M=M, instr_per_weight=1.0, issue_ceiling=1.0, latency_ceiling=1.0, predicted=1.0, metric="x"))
    others = s.run("others", "dispatched", [17], ("fwd",), verbose=False)
    assert {(r["model"], r["layer"], r["K"], r["N"]) for r in others} == {
        (m, layer, K, N) for m, layers in s.OTHER_SHAPES.items() for layer, K, N in layers}
    assert ("llama3.2-3b", "q/o", 3072, 3072) in {(r["model"], r["layer"], r["K"], r["N"]) for r in others}
    assert {r["model"] for r in s.run("all", "dispatched", [17], ("fwd",), verbose=False)} == {"8b", "70b"}
    written = []
    monkeypatch.setattr(s, "write", lambda rows, out, tag: written.append((len(rows), tag)) or ())
    s.main(["--shapes", "others", "--ms", "17", "--directions", "fwd", "--out", str(tmp_path)])
    assert written == [(len(others), f"others-triton{triton_version()}")]
