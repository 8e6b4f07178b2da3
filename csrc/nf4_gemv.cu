// Small-M (decode) path of nf4_matmul_out: y[0:M, :] = x @ W^T (+ epilogue), one pass over the packed 4-bit
// weight for any M it takes. Dispatch and validation are in nf4_matmul.cu; these kernels live in their own
// translation unit so that the two compile in parallel (MAX_JOBS=2).
//
// Two kernels:
// - nf4_decode_mma_kernel (fp16 / bf16 activations, M <= 64, blocksize >= 64, K % 256 == 0, 16-byte aligned x
//   and W): tensor cores (mma.sync m16n8k16, fp32 accumulation) with W dequantized straight into B fragments
//   through a code book held in registers. See the comment above it for the numbers.
// - nf4_gemv_kernel (M <= 16 otherwise: fp32 activations, blocksize 32, K % 256 != 0): SIMT FMAs, the code book
//   in shared memory; kept simple, it is not on a performance target.
#include "common.h"

namespace qpeft {

// ================================================================ tensor-core decode kernel
// Work split. A warp pass covers 8 rows of W (one n8 tile) x 256 consecutive k: lane (g, t) = (lane / 4,
// lane % 4) owns W row n0 + g and the 64 k [kb, kb + 64), kb = 256 p + 64 t, i.e. 32 packed bytes (two
// 16-byte loads) inside ONE absmax block (blocksize >= 64 and kb % 64 == 0). W is the B operand (k x n8), x the
// A operand (tokens x k, M <= 8 per 16-row A; M <= 16 takes a second A). The reduction index of the MMA is
// permuted so that a lane's fragments come only from its own bytes and its own token rows' x: for the 8 k of
// word j, kb + 8j .. + 7, the A registers are one 16-byte load of x as is and two MMAs pair them with the
// matching W pairs (see decode_pass). In the B fragment a bf16x2 pair (k, k + 1) is exactly one packed byte
// (high nibble = even k). The warps of a CTA take the passes p = warp, warp + warps, ... of the same 8 rows
// (split-K inside the CTA, reduced in shared memory in warp order: deterministic, no atomics, no workspace).
// Dequantization, bit-exact with the reference: every weight is T(fp32(code[q] * absmax)), one fp32 multiply
// rounded to fp32, then rounded to T. Per (row, block) a lane computes the 16 products once (16 FMUL, 8 F2FP,
// 8 PRMT), as two byte planes (low bytes and high bytes of the 16 T values, 4 registers each); then a word of
// 8 codes costs 16 PRMT + 5 ALU: the low 3 bits of each code select a byte of the codes 0-7 window and of the
// codes 8-15 window, bit 3 picks one of the two, and two more PRMTs interleave the planes into T pairs. No
// memory access per weight; 2.6 ALU operations per weight plus 0.5 / 64 per weight for the table, against
// the 5.06 issue slots per weight that the bandwidth floor leaves (3.02 TB/s, 132 SMs at 1.755 GHz: 25.3
// weights per clock per SM, 128 thread-instructions); the three right shifts of a word run on the FMA pipe
// (IMAD.HI). The MMAs cost 1 HMMA per 128 weights per group of 8 tokens (M <= 8, 16, 32, 64: 1, 2, 4, 8).
// Loads: W and absmax are streamed once (evict-first), the next pass's issued before this pass decodes.
constexpr int kDecPassK = 256;     // k per warp pass (4 lanes x 64)
constexpr int kDecMaxWarps = 8;    // warps per CTA (split-K)

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;  // generic PRMT (the selector's bit 3 of a nibble may be set: those bytes are never used)
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

template <typename T> __device__ __forceinline__ uint32_t pack_rn(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack_rn<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // cvt.rn.bf16x2.f32: lo in the low half
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack_rn<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The 16 values T(code[j] * s) of one absmax block as byte planes: lo[i] = low bytes of values 4i..4i+3,
// hi[i] = their high bytes (lo[0], lo[1]: codes 0-7; lo[2], lo[3]: codes 8-15).
struct CodePlanes {
  uint32_t lo[4], hi[4];
};

template <typename T>
__device__ __forceinline__ CodePlanes scaled_planes(const float (&code)[16], float s) {
  uint32_t p[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) p[i] = pack_rn<T>(__fmul_rn(code[2 * i], s), __fmul_rn(code[2 * i + 1], s));
  CodePlanes c;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    c.lo[i] = prmt(p[2 * i], p[2 * i + 1], 0x6420);
    c.hi[i] = prmt(p[2 * i], p[2 * i + 1], 0x7531);
  }
  return c;
}

// Integer work moved to the FMA pipe (IMAD / IMAD.HI): the ALU pipe (PRMT, LOP3) is the decode loop's bottleneck.
__device__ __forceinline__ uint32_t shr16(uint32_t v) { return __umulhi(v, 1u << 16); }
__device__ __forceinline__ uint32_t mad_hi(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("mad.hi.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}
__device__ __forceinline__ uint32_t sub_lo(uint32_t a, uint32_t b) {  // a - b as IMAD a + b * -1
  uint32_t d;
  asm("mad.lo.u32 %0, %1, 0xffffffff, %2;" : "=r"(d) : "r"(b), "r"(a));
  return d;
}

// 8 codes of one 32-bit word (byte j: high nibble = k 2j, low nibble = k 2j + 1) -> 4 T pairs
// out[j] = (value of k 2j in the low half, k 2j + 1 in the high half).
__device__ __forceinline__ void decode_word(uint32_t w, const CodePlanes& c, uint32_t (&out)[4]) {
  const uint32_t idx = w & 0x77777777u;  // code & 7, per nibble: the byte inside a window (the one ALU op)
  // byte i, +4 when code & 8 (the second window): (code & 8) >> 1 = (w - idx) >> 1 per nibble, plus 0x3210
  // (no carries: disjoint bits), as two IMADs. a = w - idx has bit 0 clear, so hi(a * (2^31 + 1)) = a >> 1; a
  // power of two would be turned back into an ALU LEA.HI by ptxas.
  const uint32_t pick = mad_hi(sub_lo(w, idx), 0x80000001u, 0x32103210u);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint32_t i4 = h ? shr16(idx) : idx, p4 = h ? shr16(pick) : pick;  // nibbles of bytes 2h, 2h + 1
    const uint32_t lo = prmt(prmt(c.lo[0], c.lo[1], i4), prmt(c.lo[2], c.lo[3], i4), p4);
    const uint32_t hi = prmt(prmt(c.hi[0], c.hi[1], i4), prmt(c.hi[2], c.hi[3], i4), p4);
    // lo / hi bytes are in nibble order (k 1, k 0, k 3, k 2 of the two bytes): interleave into pairs
    out[2 * h] = prmt(lo, hi, 0x4051);
    out[2 * h + 1] = prmt(lo, hi, 0x6273);
  }
}

template <typename T> __device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1,
                                                                uint32_t a2, uint32_t a3, uint32_t b0,
                                                                uint32_t b1);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1,
                                                                     uint32_t a2, uint32_t a3, uint32_t b0,
                                                                     uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__half>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                              uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 ld_stream16(const void* p) {  // read once: evict-first, no L1 allocation
  return __ldcs(reinterpret_cast<const uint4*>(p));
}

// One pass's streamed inputs of one lane: 32 packed bytes and the block's scale inputs.
struct PassLoads {
  uint4 w0, w1;
  float absmax;   // !NESTED: the fp32 absmax; NESTED: nested_absmax[blk >> 8]
  uint32_t q;     // NESTED: the uint8 absmax code
};

// Per-lane bases of the streamed arrays; a pass's addresses are one multiply-add away (IMAD / IMAD.WIDE on the FMA
// pipe, not the ALU that decodes). Always in range: the host requires K % 256 == 0 and N K < 2^32, and rows past
// N are clamped to N - 1 (their outputs are never stored).
struct LaneStream {
  const uint8_t* w;      // this lane's 32 bytes of pass 0
  uint32_t e0;           // flat index of its first weight in pass 0 (e = row K + kb: even, a multiple of 64)
  uint32_t blk_mult;     // 2^(32 - log2 blocksize): blk = hi(e * blk_mult)
};

template <bool NESTED>
__device__ __forceinline__ void load_pass(const Weight4& w, const LaneStream& ls, uint32_t p, PassLoads& L) {
  const uint8_t* wp = ls.w + size_t(p) * (kDecPassK / 2);
  L.w0 = ld_stream16(wp);
  L.w1 = ld_stream16(wp + 16);
  const uint32_t blk = __umulhi(ls.e0 + p * kDecPassK, ls.blk_mult);  // all 64 weights share this block
  if constexpr (NESTED) {
    L.q = __ldcs(w.absmax_u8 + blk);
    L.absmax = __ldg(w.nested_absmax + __umulhi(blk, 1u << (32 - kNestedLog2)));
  } else {
    L.absmax = __ldcs(w.absmax_f32 + blk);
    L.q = 0;
  }
}

// One pass of one lane: decode its 64 weights of each of its rows (one per 8-row tile) and multiply them with its
// token rows' x. The A operand of each MMA is one 16-byte load of x as is, (x[k0, k0+1], x[k0+2, k0+3],
// x[k0+4, k0+5], x[k0+6, k0+7]) of one of the lane's token rows: its first and third pairs sit in the A rows of
// the lane's token (g), the second and fourth in rows g + 8. So each 8 k take two MMAs on the same A registers
// (no moves): B = the W pairs of k0 and k0+4 makes D rows 0-7 right (rows 8-15 mix mismatched k: discarded),
// B = the pairs of k0+2 and k0+6 makes rows 8-15 right. Token group i (tokens 8i .. 8i + 7, the lane's token
// 8i + g) of row tile r accumulates in acc[r][2i] (the first kind) and acc[r][2i + 1] (the second). The x loads
// of a word serve all R8 row tiles: x is re-read from L1 / L2 once per 8 R8 rows of W.
template <typename T, int TG, int R8, bool NESTED>
__device__ __forceinline__ void decode_pass(const PassLoads (&L)[R8], int r8, const float (&code)[16],
                                            const float* s_ncode, float off, const T* const (&xr)[TG], uint32_t p,
                                            float (&acc)[R8][2 * TG][4]) {
  CodePlanes planes[R8];
#pragma unroll
  for (int r = 0; r < R8; ++r) {
    float s = L[r].absmax;
    if constexpr (NESTED) s = __fadd_rn(__fmul_rn(s_ncode[L[r].q], L[r].absmax), off);
    planes[r] = scaled_planes<T>(code, s);
  }
  // kHoist: the pass's x (32 TG registers) is loaded before any decode, its L2 latency paid once per pass;
  // otherwise each word's x right before its MMAs (fewer registers: more warps per SM hide the latency)
  constexpr bool kHoist = TG <= 2;
  uint4 xall[kHoist ? TG : 1][kHoist ? 8 : 1];
  if constexpr (kHoist) {
#pragma unroll
    for (int i = 0; i < TG; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) xall[i][j] = __ldg(reinterpret_cast<const uint4*>(xr[i] + size_t(p) * kDecPassK) + j);
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {  // word j: physical k kb + 8j .. kb + 8j + 7
    uint4 xa[TG];
#pragma unroll
    for (int i = 0; i < TG; ++i)
      xa[i] = kHoist ? xall[kHoist ? i : 0][kHoist ? j : 0]
                     : __ldg(reinterpret_cast<const uint4*>(xr[i] + size_t(p) * kDecPassK) + j);
#pragma unroll
    for (int r = 0; r < R8; ++r) {
      if (R8 > 1 && r >= r8) break;  // uniform: a CTA's row-tile count
      const uint4 wv = j < 4 ? L[r].w0 : L[r].w1;
      const uint32_t word = (j & 3) == 0 ? wv.x : (j & 3) == 1 ? wv.y : (j & 3) == 2 ? wv.z : wv.w;
      uint32_t b[4];
      decode_word(word, planes[r], b);
#pragma unroll
      for (int i = 0; i < TG; ++i) {
        mma16816<T>(acc[r][2 * i], xa[i].x, xa[i].y, xa[i].z, xa[i].w, b[0], b[2]);
        mma16816<T>(acc[r][2 * i + 1], xa[i].x, xa[i].y, xa[i].z, xa[i].w, b[1], b[3]);
      }
    }
  }
}

// Row tiles per warp (x is re-read once per 8 R8 rows) against registers (acc is 8 R8 TG floats, the hoisted x
// 32 TG): TG 1 and 2 hoist x and stay at <= 128 registers (2 CTAs, 16 warps per SM) with one row tile; TG 4 takes
// two row tiles and TG 8 one, both at 1 CTA per SM without hoisting.
template <int TG> __host__ __device__ constexpr int decode_max_r8() { return TG == 4 ? 2 : 1; }

// Register budget: (256) alone lets ptxas cap the kernel at 80 registers and spill; (256, 2) caps it at 128.
template <typename T, int TG, bool NESTED>
__global__ void __launch_bounds__(kDecMaxWarps * 32, TG <= 2 ? 2 : 1)
nf4_decode_mma_kernel(const T* __restrict__ x, Weight4 w, int M, int r8, int kw, T* __restrict__ out,
                      LoraEpilogue ep) {
  constexpr int R8 = decode_max_r8<TG>();
  __shared__ float s_ncode[NESTED ? 256 : 1];
  // per warp, row tile, token group and lane: the 4 D values that hold real sums (c0, c1 of acc[r][2i], c2, c3 of
  // acc[r][2i + 1]): 32 KB at most (R8 x TG <= 8)
  __shared__ float4 s_red[kDecMaxWarps][R8 * TG][32];
  float off = 0.f;
  if constexpr (NESTED) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_ncode[i] = __ldg(w.nested_code + i);
    off = __ldg(w.offset);
  }
  float code[16];
#pragma unroll
  for (int j = 0; j < 16; ++j) code[j] = __ldg(w.code + j);
  __syncthreads();

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t N = w.rows, K = w.cols;
  // rg = warps / kw row groups of 8 r8 rows per CTA (kw divides warps): the kw warps of group warp / kw split K
  // between them, and the warps of different groups that share a pass index read the same x at the same time
  // (one L2 read through L1 serves all rg groups: x crosses L2 once per 8 r8 rg rows of W). kw is a kernel
  // argument, not warps / rg, so that the loop's stride stays a uniform constant (a division here put it in
  // per-thread registers and cost the M = 16 pass 6% of its simulated latency)
  const int rg = warps / kw, kwi = warp % kw;
  const int64_t n0 = (int64_t(blockIdx.x) * rg + warp / kw) * 8 * r8;  // this warp's rows: n0 .. n0 + 8 r8
  const uint32_t passes = static_cast<uint32_t>(K / kDecPassK);  // the host requires K % 256 == 0
  // Token rows of this lane's A operands, clamped into range: rows >= M only feed D rows that are never stored.
  const T* xr[TG];
#pragma unroll
  for (int i = 0; i < TG; ++i) xr[i] = x + int64_t(8 * i + g < M ? 8 * i + g : 0) * K + 64 * t;
  LaneStream ls[R8];
#pragma unroll
  for (int r = 0; r < R8; ++r) {
    const int64_t row = n0 + 8 * r + g;
    ls[r].e0 = static_cast<uint32_t>((row < N ? row : N - 1) * K + 64 * t);
    ls[r].w = w.packed + (ls[r].e0 >> 1);
    ls[r].blk_mult = 1u << (32 - w.log2bs);
  }

  float acc[R8][2 * TG][4];
#pragma unroll
  for (int r = 0; r < R8; ++r)
#pragma unroll
    for (int a = 0; a < 2 * TG; ++a)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][a][c] = 0.f;

  // passes p = kwi, kwi + kw, ... two per iteration on alternating load buffers (no register copies);
  // a pass's loads are issued one pass ahead
  auto load = [&](uint32_t p, PassLoads (&buf)[R8]) {
#pragma unroll
    for (int r = 0; r < R8; ++r)
      if (R8 == 1 || r < r8) load_pass<NESTED>(w, ls[r], p, buf[r]);
  };
  PassLoads bufA[R8], bufB[R8];
  uint32_t p = kwi;
  if (p < passes) load(p, bufA);
#pragma unroll 1
  for (; p < passes; p += 2 * kw) {
    const uint32_t q = p + kw;
    if (q < passes) load(q, bufB);
    decode_pass<T, TG, R8, NESTED>(bufA, r8, code, s_ncode, off, xr, p, acc);
    if (q >= passes) break;
    if (q + kw < passes) load(q + kw, bufA);
    decode_pass<T, TG, R8, NESTED>(bufB, r8, code, s_ncode, off, xr, q, acc);
  }

  // split-K reduction in warp order within each row group (deterministic), then bias / LoRA and one rounding per
  // output
#pragma unroll
  for (int r = 0; r < R8; ++r)
#pragma unroll
    for (int i = 0; i < TG; ++i)
      s_red[warp][r * TG + i][lane] = make_float4(acc[r][2 * i][0], acc[r][2 * i][1], acc[r][2 * i + 1][2],
                                                  acc[r][2 * i + 1][3]);
  __syncthreads();
  const int group_cols = 8 * r8, cols = group_cols * rg;
  const int64_t c0 = int64_t(blockIdx.x) * cols;  // the CTA's first row of W (output column)
  for (int o = threadIdx.x; o < M * cols; o += blockDim.x) {
    // token m = 8 i + g' of row tile r of row group gi, column ni: lane g' * 4 + ni / 2, components ni & 1 (first
    // kind, D row g') and 2 + (ni & 1) (second kind, D row g' + 8), summed over the group's warps
    const int m = o / cols, nn = o % cols, gi = nn / group_cols, nr = nn % group_cols;
    const int r = nr >> 3, ni = nr & 7, i = m >> 3;
    const int ln = (m & 7) * 4 + (ni >> 1);
    float v = 0.f;
    for (int wi = gi * kw; wi < gi * kw + kw; ++wi) {
      const float4 s4 = s_red[wi][r * TG + i][ln];
      v += (ni & 1) ? s4.y + s4.w : s4.x + s4.z;
    }
    const int64_t n = c0 + nn;
    if (n < N) out[int64_t(m) * N + n] = Cvt<T>::from_f(apply_epilogue(ep, v, m, n));
  }
}

// ================================================================ SIMT kernel (fp32, blocksize 32, K % 256 != 0)
constexpr int kGemvWarps = 4;  // 128 threads per CTA

template <typename T>
__device__ __forceinline__ void load8_f(const T* __restrict__ p, float* v) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else {
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = Cvt<T>::to_f(h[i]);
  }
}

// One warp computes out[0:M, n0:n0+ROWS]. Lane l streams 32-element chunks c = l, l+32, ... of each of the
// ROWS W rows (16 packed bytes = one uint4 per row and chunk), decodes them with the 16-entry LUT in shared
// memory and the chunk's absmax, and accumulates x[m, chunk] * w in fp32 for every m < M. A butterfly
// reduction then gives every lane the ROWS*M sums. Requires K % 32 == 0 (chunks never straddle a row or an
// absmax block: blocksize >= 32) and 16-byte aligned packed and x (checked by the host). MT x ROWS stays at
// 32 accumulators per lane (MT = 16 takes 2 rows per warp), so every M <= 16 is one pass over W.
template <typename T, int MT, int ROWS>
__global__ void __launch_bounds__(kGemvWarps * 32)
nf4_gemv_kernel(const T* __restrict__ x, Weight4 w, int64_t M, T* __restrict__ out, LoraEpilogue ep) {
  __shared__ float s_lut[16];
  __shared__ float s_ncode[256];
  const float off = load_weight_tables(w, s_lut, s_ncode);
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int64_t N = w.rows, K = w.cols;
  const int64_t n0 = (int64_t(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5)) * ROWS;
  if (n0 >= N) return;  // whole warp; no barrier follows
  const int64_t chunks = K >> 5;
  const uint4* wp = reinterpret_cast<const uint4*>(w.packed);

  float acc[MT][ROWS];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[m][r] = 0.f;

#pragma unroll 1
  for (int64_t c = lane; c < chunks; c += 32) {
    uint4 raw[ROWS];
    float sc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {  // all loads of the step before any decode
      const int64_t n = n0 + r < N ? n0 + r : N - 1;
      raw[r] = __ldcs(wp + n * chunks + c);
      sc[r] = block_scale(w, s_ncode, off, (n * K + (c << 5)) >> w.log2bs);
    }
    const T* xc = x + (c << 5);
#pragma unroll
    for (int s = 0; s < 4; ++s) {  // 8 elements = one 32-bit word of each row's chunk
      float wv[ROWS][8];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const uint32_t word = s == 0 ? raw[r].x : s == 1 ? raw[r].y : s == 2 ? raw[r].z : raw[r].w;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const uint32_t byte = (word >> (8 * b)) & 0xFF;
          wv[r][2 * b] = __fmul_rn(s_lut[byte >> 4], sc[r]);
          wv[r][2 * b + 1] = __fmul_rn(s_lut[byte & 0xF], sc[r]);
        }
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < M) {
          float xv[8];
          load8_f(xc + m * K + 8 * s, xv);
#pragma unroll
          for (int r = 0; r < ROWS; ++r)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[m][r] = fmaf(xv[e], wv[r][e], acc[m][r]);
        }
      }
    }
  }

#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[m][r] += __shfl_xor_sync(0xffffffffu, acc[m][r], o);

#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int64_t n = n0 + r;
      if (((m * ROWS + r) & 31) == lane && m < M && n < N)
        out[m * N + n] = Cvt<T>::from_f(apply_epilogue(ep, acc[m][r], m, n));
    }
}

template <typename T, int MT, int ROWS>
void launch_simt(const T* x, const Weight4& w, int64_t M, T* out, const LoraEpilogue& ep, cudaStream_t stream) {
  const int64_t warps = ceil_div(w.rows, ROWS);
  const int64_t grid = ceil_div(warps, kGemvWarps);
  TORCH_CHECK(grid <= 0x7fffffff, "N too large for the GEMV kernel: ", w.rows);
  nf4_gemv_kernel<T, MT, ROWS><<<grid, kGemvWarps * 32, 0, stream>>>(x, w, M, out, ep);
}

template <typename T>
void launch_gemv_t(const T* x, const Weight4& w, int64_t M, T* out, const LoraEpilogue& ep, cudaStream_t stream) {
  if (M <= 1) launch_simt<T, 1, 4>(x, w, M, out, ep, stream);
  else if (M <= 4) launch_simt<T, 4, 4>(x, w, M, out, ep, stream);
  else if (M <= 8) launch_simt<T, 8, 4>(x, w, M, out, ep, stream);
  else launch_simt<T, 16, 2>(x, w, M, out, ep, stream);
}

inline int device_sms() {
  int dev = 0, sms = 132;  // two cheap host queries, no synchronization
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms;
}

// 8-row tiles per warp: as many as allowed (x is re-read once per 8 R8 rows of W) while the grid still gives
// every SM a CTA (132 on an H100; N = 4096 takes 4 tiles: 128 CTAs, N = 1024 one: 128 CTAs).
inline int decode_row_tiles(int64_t N, int max_r8, int sms) {
  int r8 = max_r8;
  while (r8 > 1 && ceil_div(N, 8 * r8) < sms * 31 / 32) r8 /= 2;  // within 3% of every SM busy
  return r8;
}

// Row groups per CTA. A CTA reads its tokens' whole x (M x K x 2 B) through L2; the CTAs resident on an SM read it
// together (one L2 read through L1). Up to kDecL1Bytes an SM's L1 also keeps it for the SM's later CTAs; past it,
// x crosses L2 once per residency: at M = 16, 2 B per weight against W's 0.52 B (117 MB against 30 MB at
// N = 4096, K = 14336: 0.55 of the bandwidth floor by the static model). Two row groups per CTA share each read
// (0.87 there), where the grid still fills every SM with ctas_per_sm CTAs (__launch_bounds__). Four groups halve
// the CTAs again: one per SM at N = 4096 (latency bound, 0.45) or a worse last wave (70b gate/up: 3.4 waves).
constexpr int64_t kDecL1Bytes = 192 * 1024;
inline int decode_row_groups(int64_t N, int64_t M, int64_t K, int r8, int warps, int ctas_per_sm, int sms) {
  if (M * K * 2 <= kDecL1Bytes || warps < 4 || warps % 2) return 1;  // two groups of >= 2 warps of split-K
  return ceil_div(N, 8 * r8 * 2) >= int64_t(sms) * ctas_per_sm * 31 / 32 ? 2 : 1;
}

template <typename T, int TG>
void launch_decode_t(const T* x, const Weight4& w, int64_t M, T* out, const LoraEpilogue& ep, cudaStream_t stream) {
  const int64_t passes = ceil_div(w.cols, kDecPassK);
  const int warps = static_cast<int>(std::min<int64_t>(kDecMaxWarps, passes));
  const int sms = device_sms();
  const int r8 = decode_row_tiles(w.rows, decode_max_r8<TG>(), sms);
  const int rg = decode_row_groups(w.rows, M, w.cols, r8, warps, TG <= 2 ? 2 : 1, sms);
  const int64_t grid = ceil_div(w.rows, 8 * r8 * rg);
  TORCH_CHECK(grid <= 0x7fffffff, "N too large for the decode kernel: ", w.rows);
  const int m = static_cast<int>(M);
  if (w.nested)
    nf4_decode_mma_kernel<T, TG, true><<<grid, warps * 32, 0, stream>>>(x, w, m, r8, warps / rg, out, ep);
  else
    nf4_decode_mma_kernel<T, TG, false><<<grid, warps * 32, 0, stream>>>(x, w, m, r8, warps / rg, out, ep);
}

bool nf4_decode_mma_applies(const at::Tensor& x, const Weight4& w) {
  return x.scalar_type() != at::kFloat && w.log2bs >= 6 && w.cols % kDecPassK == 0 &&
         x.size(0) <= kDecodeMmaMaxM && aligned(x.data_ptr(), 16) && aligned(w.packed, 16) &&
         w.rows * w.cols < (int64_t{1} << 32);
}

void launch_nf4_gemv(const at::Tensor& x, const Weight4& w, const LoraEpilogue& ep, at::Tensor& out,
                     cudaStream_t stream) {
  const int64_t M = x.size(0);
  if (nf4_decode_mma_applies(x, w)) {
    auto run = [&](auto tag) {
      using T = decltype(tag);
      const T* xp = reinterpret_cast<const T*>(x.data_ptr());
      T* op = reinterpret_cast<T*>(out.data_ptr());
      if (M <= 8) launch_decode_t<T, 1>(xp, w, M, op, ep, stream);
      else if (M <= 16) launch_decode_t<T, 2>(xp, w, M, op, ep, stream);
      else if (M <= 32) launch_decode_t<T, 4>(xp, w, M, op, ep, stream);
      else launch_decode_t<T, 8>(xp, w, M, op, ep, stream);
    };
    if (x.scalar_type() == at::kBFloat16) run(__nv_bfloat16{});
    else run(__half{});
    return;
  }
  TORCH_CHECK(M <= kGemvMaxM, "launch_nf4_gemv: the SIMT decode kernel takes M <= ", kGemvMaxM, ", got ", M);
  QPEFT_DISPATCH_FLOAT(x.scalar_type(), "nf4_matmul_out (gemv)", [&] {
    launch_gemv_t<scalar_t>(reinterpret_cast<const scalar_t*>(x.data_ptr()), w, M,
                            reinterpret_cast<scalar_t*>(out.data_ptr()), ep, stream);
  });
}

}  // namespace qpeft
