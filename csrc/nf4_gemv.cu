// Small-M (decode) path of nf4_matmul_out: y[0:M, :] = x @ W^T (+ epilogue) for M <= 16, one pass over the
// packed 4-bit weight for any M. Dispatch and validation are in nf4_matmul.cu; these kernels live in their own
// translation unit so that the two compile in parallel (MAX_JOBS=2).
//
// Two kernels:
// - nf4_decode_mma_kernel (fp16 / bf16 activations, blocksize >= 64, K % 256 == 0, 16-byte aligned x and W):
//   tensor cores (mma.sync m16n8k16, fp32 accumulation) with W dequantized straight into B fragments through a
//   code book held in registers. See the comment above it for the numbers.
// - nf4_gemv_kernel (everything else: fp32 activations, blocksize 32, K % 256 != 0): SIMT FMAs, the code book
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
// (IMAD.HI). The MMAs cost 1 HMMA per 128 weights (M <= 8) or 2 (M <= 16).
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

// One pass of one lane: decode its 64 weights and multiply them with its token rows' x. The A operand of each
// MMA is one 16-byte load of x as is, (x[k0, k0+1], x[k0+2, k0+3], x[k0+4, k0+5], x[k0+6, k0+7]) of the
// lane's token row: its first and third pairs sit in the A rows of the lane's token (g), the second and fourth
// in rows g + 8. So each 8 k take two MMAs on the same A registers (no moves): B = the W pairs of k0 and k0+4
// makes D rows 0-7 right (rows 8-15 mix mismatched k: discarded), B = the pairs of k0+2 and k0+6 makes rows
// 8-15 right. acc[2 * r + 0] keeps the first kind (token rows 8r + g), acc[2 * r + 1] the second.
template <typename T, bool MT16, bool NESTED>
__device__ __forceinline__ void decode_pass(const PassLoads& L, const float (&code)[16], const float* s_ncode,
                                            float off, const uint4* xq0, const uint4* xq1,
                                            float (&acc)[MT16 ? 4 : 2][4]) {
  float s = L.absmax;
  if constexpr (NESTED) s = __fadd_rn(__fmul_rn(s_ncode[L.q], L.absmax), off);
  const CodePlanes planes = scaled_planes<T>(code, s);
  const uint32_t words[8] = {L.w0.x, L.w0.y, L.w0.z, L.w0.w, L.w1.x, L.w1.y, L.w1.z, L.w1.w};
#pragma unroll
  for (int j = 0; j < 8; ++j) {  // word j: physical k kb + 8j .. kb + 8j + 7
    uint32_t b[4];
    decode_word(words[j], planes, b);
    const uint4 xa = __ldg(xq0 + j);
    mma16816<T>(acc[0], xa.x, xa.y, xa.z, xa.w, b[0], b[2]);
    mma16816<T>(acc[1], xa.x, xa.y, xa.z, xa.w, b[1], b[3]);
    if constexpr (MT16) {
      const uint4 xb = __ldg(xq1 + j);
      mma16816<T>(acc[2], xb.x, xb.y, xb.z, xb.w, b[0], b[2]);
      mma16816<T>(acc[3], xb.x, xb.y, xb.z, xb.w, b[1], b[3]);
    }
  }
}

template <typename T, bool MT16, bool NESTED>
// Register budget: (256) alone lets ptxas cap the kernel at 80 registers and spill; with 1 CTA per SM the M <= 8
// kernel takes 107, and 2 CTAs per SM keep the M <= 16 one at 126 without spills (16 warps per SM either way).
__global__ void __launch_bounds__(kDecMaxWarps * 32, MT16 ? 2 : 1)
nf4_decode_mma_kernel(const T* __restrict__ x, Weight4 w, int M, T* __restrict__ out, LoraEpilogue ep) {
  constexpr int kAcc = MT16 ? 4 : 2;
  __shared__ float s_ncode[NESTED ? 256 : 1];
  __shared__ float s_red[kDecMaxWarps][kAcc][32][4];
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
  const int64_t row = int64_t(blockIdx.x) * 8 + g;
  const uint32_t passes = static_cast<uint32_t>(K / kDecPassK);  // the host requires K % 256 == 0
  // Token rows of this lane's A operands, clamped into range: rows >= M only feed D rows that are never stored.
  const T* x0 = x + int64_t(g < M ? g : 0) * K + 64 * t;
  const T* x1 = x + int64_t(g + 8 < M ? g + 8 : 0) * K + 64 * t;
  LaneStream ls;
  ls.e0 = static_cast<uint32_t>((row < N ? row : N - 1) * K + 64 * t);
  ls.w = w.packed + (ls.e0 >> 1);
  ls.blk_mult = 1u << (32 - w.log2bs);

  float acc[kAcc][4];
#pragma unroll
  for (int a = 0; a < kAcc; ++a)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[a][c] = 0.f;

  // passes p = warp, warp + warps, ... two per iteration on alternating load buffers (no register copies);
  // a pass's loads are issued one pass ahead
  auto xq = [&](const T* xr, uint32_t p) { return reinterpret_cast<const uint4*>(xr + size_t(p) * kDecPassK); };
  PassLoads bufA, bufB;
  uint32_t p = warp;
  if (p < passes) load_pass<NESTED>(w, ls, p, bufA);
#pragma unroll 1
  for (; p < passes; p += 2 * warps) {
    const uint32_t q = p + warps;
    if (q < passes) load_pass<NESTED>(w, ls, q, bufB);
    decode_pass<T, MT16, NESTED>(bufA, code, s_ncode, off, xq(x0, p), xq(x1, p), acc);
    if (q >= passes) break;
    if (q + warps < passes) load_pass<NESTED>(w, ls, q + warps, bufA);
    decode_pass<T, MT16, NESTED>(bufB, code, s_ncode, off, xq(x0, q), xq(x1, q), acc);
  }

  // split-K reduction in warp order (deterministic), then bias / LoRA and one rounding per output
#pragma unroll
  for (int a = 0; a < kAcc; ++a)
#pragma unroll
    for (int c = 0; c < 4; ++c) s_red[warp][a][lane][c] = acc[a][c];
  __syncthreads();
  for (int o = threadIdx.x; o < M * 8; o += blockDim.x) {
    const int m = o >> 3, ni = o & 7;
    // token m = 8 * tile + g' sits in D row g' of acc[2 * tile] (c0 / c1) and D row g' + 8 of acc[2 * tile + 1]
    // (c2 / c3), column ni held by lane g' * 4 + ni / 2
    const int tile = m >> 3, ln = (m & 7) * 4 + (ni >> 1), c = ni & 1;
    float v = 0.f;
    for (int wi = 0; wi < warps; ++wi) v += s_red[wi][2 * tile][ln][c] + s_red[wi][2 * tile + 1][ln][c + 2];
    const int64_t n = int64_t(blockIdx.x) * 8 + ni;
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

template <typename T, bool MT16>
void launch_decode_t(const T* x, const Weight4& w, int64_t M, T* out, const LoraEpilogue& ep, cudaStream_t stream) {
  const int64_t passes = ceil_div(w.cols, kDecPassK);
  const int warps = static_cast<int>(std::min<int64_t>(kDecMaxWarps, passes));
  const int64_t grid = ceil_div(w.rows, 8);
  TORCH_CHECK(grid <= 0x7fffffff, "N too large for the decode kernel: ", w.rows);
  if (w.nested)
    nf4_decode_mma_kernel<T, MT16, true><<<grid, warps * 32, 0, stream>>>(x, w, static_cast<int>(M), out, ep);
  else
    nf4_decode_mma_kernel<T, MT16, false><<<grid, warps * 32, 0, stream>>>(x, w, static_cast<int>(M), out, ep);
}

bool nf4_decode_mma_applies(const at::Tensor& x, const Weight4& w) {
  return x.scalar_type() != at::kFloat && w.log2bs >= 6 && w.cols % kDecPassK == 0 && x.size(0) <= kGemvMaxM &&
         aligned(x.data_ptr(), 16) && aligned(w.packed, 16) && w.rows * w.cols < (int64_t{1} << 32);
}

void launch_nf4_gemv(const at::Tensor& x, const Weight4& w, const LoraEpilogue& ep, at::Tensor& out,
                     cudaStream_t stream) {
  const int64_t M = x.size(0);
  if (nf4_decode_mma_applies(x, w)) {
    auto run = [&](auto tag) {
      using T = decltype(tag);
      const T* xp = reinterpret_cast<const T*>(x.data_ptr());
      T* op = reinterpret_cast<T*>(out.data_ptr());
      if (M <= 8) launch_decode_t<T, false>(xp, w, M, op, ep, stream);
      else launch_decode_t<T, true>(xp, w, M, op, ep, stream);
    };
    if (x.scalar_type() == at::kBFloat16) run(__nv_bfloat16{});
    else run(__half{});
    return;
  }
  QPEFT_DISPATCH_FLOAT(x.scalar_type(), "nf4_matmul_out (gemv)", [&] {
    launch_gemv_t<scalar_t>(reinterpret_cast<const scalar_t*>(x.data_ptr()), w, M,
                            reinterpret_cast<scalar_t*>(out.data_ptr()), ep, stream);
  });
}

}  // namespace qpeft
