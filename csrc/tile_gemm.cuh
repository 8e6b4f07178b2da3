// Tiled GEMM  C (M, Nout) = A (M, R) @ Bop^T + epilogue, where Bop (Nout, R) is read from
//   kB4NK : a 4-bit weight W (Nout, R)            Bop(n, k) = W[n, k]        (nf4_matmul forward)
//   kB4T  : a 4-bit weight W (R, Nout), transposed Bop(j, r) = W[r, j]        (nf4_matmul_dx: dx = dy @ W)
//   kDense: a dense weight (Nout, R) of A's dtype  Bop(n, k) = weight[n, k]    (dense_lora_matmul)
// and dequantized into shared memory in the main loop (the 4-bit weight is never materialized).
//
// Tiles: BM = BN = 64, BK = 32, 128 threads (4 warps in 2 x 2, each 32 x 32 of C).
//   fp16 / bf16: tensor cores through nvcuda::wmma 16x16x16 (HMMA.16816 with fp32 accumulation on
//                sm_80+), 2 x 2 fragments per warp, 2 k-steps per tile.
//   fp32:        SIMT FMAs from the same shared tiles (8 x 4 outputs per thread).
// Pipeline: two shared-memory stages. The loads of tile t+1 are issued before the MMAs of tile t:
// A chunks by cp.async straight into the other stage, W chunks into registers, which are dequantized
// into that stage after the MMAs. One cp.async.wait_group + __syncthreads per k-tile suffices (a
// stage is rewritten only after every warp left it).
// Bounds: any M, Nout, R. Each thread's chunk takes a vector path (16-byte A loads, 8-byte 4-bit
// loads) when it is fully in range and the host found the pointers/strides aligned, else an
// element-by-element path with zero fill: odd shapes and K % blocksize != 0 are exact, only slower.
// Epilogue: fp32 accumulators -> shared -> + bias + scale * rows @ cols^T (fp32) -> one rounding.
#pragma once

#include <mma.h>

#include "common.h"

namespace qpeft {

enum BKind : int { kB4NK = 0, kB4T = 1, kDense = 2 };

constexpr int kTM = 64, kTN = 64, kTK = 32, kTileThreads = 128;

template <typename T>
struct TileCfg {
  static constexpr bool kFloat = std::is_same_v<T, float>;
  // Row padding (elements): 16 bytes keeps every row 16-byte aligned for vector stores and wmma
  // (ldm multiple of 8 for 16-bit types); for fp32 SIMT, 4 floats turn the 8-way bank conflicts of
  // a 32-float stride into 2-way ones.
  static constexpr int kPad = kFloat ? 4 : 8;
  static constexpr int kLdA = kTK + kPad;         // As[m][k]
  static constexpr int kLdBK = kTK + kPad;        // Bs[n][k]  (kB4NK, kDense)
  static constexpr int kLdBN = kTN + kPad;        // Bs[k][n]  (kB4T)
  static constexpr int kAElems = kTM * kLdA;
  static constexpr int kBElems = (kTN * kLdBK > kTK * kLdBN) ? kTN * kLdBK : kTK * kLdBN;
  static constexpr int kStageBytes = (kAElems + kBElems) * int(sizeof(T));
  static constexpr int kLdC = kTN + 4;
  static constexpr int kCBytes = kTM * kLdC * 4;
  static constexpr int kSmemBytes = (2 * kStageBytes > kCBytes) ? 2 * kStageBytes : kCBytes;
};

struct TileArgs {
  const void* A;     // (M, R) row-major, dtype T
  const void* Bd;    // kDense: (Nout, R) dtype T
  Weight4 w;         // kB4NK / kB4T
  void* C;           // (M, Nout) dtype T
  int64_t M, Nout, R;
  bool a_vec, b_vec;
  LoraEpilogue ep;
};

// Per-thread staging of one k-tile. A's in-range aligned chunks go global -> shared directly with
// cp.async (no registers; they need no conversion); W's chunks go through registers because they are
// dequantized on the way. A chunk that is out of range or unaligned is read element by element
// straight into shared memory at commit time instead, in a loop that is not unrolled, to keep the
// kernels small (slow chunks occur only at ragged edges or for unaligned inputs).
template <typename T, int KIND>
struct TileRegs {
  alignas(16) T bd[16];    // kDense: 16 weight elements
  uint2 b_raw;             // 4-bit kinds: 16 packed codes
  float b_scale;
  bool a_fast[2], b_fast;
};

// cp.async (sm_80+): 16-byte global -> shared copies that bypass registers; .cg skips L1 (A tiles are
// re-read by other CTAs through L2, not by this SM).
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

template <typename T>
__device__ __forceinline__ void store8_smem(T* dst, const T* v) {
  if constexpr (std::is_same_v<T, float>) {
    reinterpret_cast<float4*>(dst)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(dst)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(v);
  }
}

template <typename T>
__device__ __forceinline__ void load8_global(const T* src, T* v) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 x = __ldg(reinterpret_cast<const float4*>(src));
    const float4 y = __ldg(reinterpret_cast<const float4*>(src) + 1);
    v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w; v[4] = y.x; v[5] = y.y; v[6] = y.z; v[7] = y.w;
  } else {
    *reinterpret_cast<uint4*>(v) = __ldg(reinterpret_cast<const uint4*>(src));
  }
}

// Where thread `tid`'s chunks of a k-tile live.
//   A: 64 rows x 32 k = 256 chunks of 8 elements, chunk q = tid + 128 i -> row q / 4, k (q % 4) * 8.
//   B (kB4NK, kDense): Bop row n0 + tid / 2, k offset (tid % 2) * 16: 16 contiguous elements.
//   B (kB4T): W row k0 + tid / 4, columns n0 + (tid % 4) * 16: 16 contiguous elements.
struct ChunkB {
  int64_t row, col;  // in W's own (rows, cols) coordinates
  int64_t flat;      // row * cols + col
  bool in_range;     // all 16 elements inside W
};

template <int KIND>
__device__ __forceinline__ ChunkB chunk_b(const TileArgs& p, int64_t n0, int64_t k0) {
  const int tid = threadIdx.x;
  ChunkB c;
  if constexpr (KIND == kB4T) {
    c.row = k0 + (tid >> 2);
    c.col = n0 + (tid & 3) * 16;
    c.in_range = c.row < p.R && c.col + 16 <= p.Nout;
    c.flat = c.row * p.Nout + c.col;
  } else {
    c.row = n0 + (tid >> 1);
    c.col = k0 + (tid & 1) * 16;
    c.in_range = c.row < p.Nout && c.col + 16 <= p.R;
    c.flat = c.row * p.R + c.col;
  }
  return c;
}

// Issues this thread's loads of k-tile k0: cp.async of its fast A chunks into the stage `As` (one
// commit group; the caller waits for it before the barrier that publishes the stage) and register
// loads of its W chunk.
template <typename T, int KIND>
__device__ __forceinline__ void tile_fetch(const TileArgs& p, const float* s_ncode, float off, int64_t m0,
                                           int64_t n0, int64_t k0, TileRegs<T, KIND>& r, T* As) {
  using Cfg = TileCfg<T>;
  const int tid = threadIdx.x;
  const T* A = static_cast<const T*>(p.A);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int q = tid + i * kTileThreads;
    const int64_t m = m0 + (q >> 2);
    const int64_t k = k0 + (q & 3) * 8;
    r.a_fast[i] = p.a_vec && m < p.M && k + 8 <= p.R;
    if (r.a_fast[i]) {
      T* dst = As + (q >> 2) * Cfg::kLdA + (q & 3) * 8;  // 16-byte aligned: rows are 16-byte multiples
      const T* src = A + m * p.R + k;                   // 16-byte aligned: host checked R % 8 == 0
      constexpr int kPer16 = 16 / int(sizeof(T));  // elements per 16-byte copy: 8 (16-bit) or 4 (fp32)
#pragma unroll
      for (int c = 0; c < 8 / kPer16; ++c) cp_async16(dst + c * kPer16, src + c * kPer16);
    }
  }
  cp_async_commit();
  const ChunkB c = chunk_b<KIND>(p, n0, k0);
  r.b_fast = p.b_vec && c.in_range;
  if (!r.b_fast) return;
  if constexpr (KIND == kDense) {
    const T* W = static_cast<const T*>(p.Bd) + c.flat;  // host checked R % 8 == 0, 16-byte alignment
    load8_global(W, r.bd);
    load8_global(W + 8, r.bd + 8);
  } else {
    // 16 codes = 8 bytes at flat / 2 (host checked the row length % 16 == 0 and 8-byte alignment;
    // flat % 16 == 0), all in one absmax block because blocksize >= 32 is a multiple of 16.
    r.b_raw = __ldg(reinterpret_cast<const uint2*>(p.w.packed + (c.flat >> 1)));
    r.b_scale = block_scale(p.w, s_ncode, off, c.flat >> p.w.log2bs);
  }
}

template <typename T, int KIND>
__device__ __forceinline__ void tile_commit(const TileArgs& p, const TileRegs<T, KIND>& r, const float* s_lut,
                                            const float* s_ncode, float off, int64_t m0, int64_t n0, int64_t k0,
                                            T* As, T* Bs) {
  using Cfg = TileCfg<T>;
  const int tid = threadIdx.x;
  const T* A = static_cast<const T*>(p.A);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int q = tid + i * kTileThreads;
    T* dst = As + (q >> 2) * Cfg::kLdA + (q & 3) * 8;
    if (!r.a_fast[i]) {  // fast chunks arrive by cp.async
      const int64_t m = m0 + (q >> 2);
      const int64_t k = k0 + (q & 3) * 8;
#pragma unroll 1
      for (int e = 0; e < 8; ++e) dst[e] = (m < p.M && k + e < p.R) ? A[m * p.R + k + e] : Cvt<T>::from_f(0.f);
    }
  }
  T* dst = (KIND == kB4T) ? Bs + (tid >> 2) * Cfg::kLdBN + (tid & 3) * 16   // Bs[k][n]
                          : Bs + (tid >> 1) * Cfg::kLdBK + (tid & 1) * 16;  // Bs[n][k]
  if (r.b_fast) {
    if constexpr (KIND == kDense) {
      store8_smem(dst, r.bd);
      store8_smem(dst + 8, r.bd + 8);
    } else {
      alignas(16) T v[16];
      const uint32_t words[2] = {r.b_raw.x, r.b_raw.y};
#pragma unroll
      for (int b = 0; b < 8; ++b) {  // byte b -> elements 2b (high nibble), 2b + 1 (low nibble)
        const uint32_t byte = (words[b >> 2] >> (8 * (b & 3))) & 0xFF;
        v[2 * b] = Cvt<T>::from_f(__fmul_rn(s_lut[byte >> 4], r.b_scale));
        v[2 * b + 1] = Cvt<T>::from_f(__fmul_rn(s_lut[byte & 0xF], r.b_scale));
      }
      store8_smem(dst, v);
      store8_smem(dst + 8, v + 8);
    }
  } else {
    const ChunkB c = chunk_b<KIND>(p, n0, k0);
    const int64_t rows = (KIND == kB4T) ? p.R : p.Nout;
    const int64_t cols = (KIND == kB4T) ? p.Nout : p.R;
#pragma unroll 1
    for (int e = 0; e < 16; ++e) {
      const bool ok = c.row < rows && c.col + e < cols;
      float v = 0.f;
      if (ok) {
        if constexpr (KIND == kDense) v = Cvt<T>::to_f(static_cast<const T*>(p.Bd)[c.flat + e]);
        else v = dequant_elem(p.w, s_lut, s_ncode, off, c.flat + e);
      }
      dst[e] = Cvt<T>::from_f(v);
    }
  }
}

template <typename T, int KIND>
__global__ void __launch_bounds__(kTileThreads) tile_gemm_kernel(TileArgs p) {
  using Cfg = TileCfg<T>;
  __shared__ __align__(128) unsigned char smem[Cfg::kSmemBytes];
  __shared__ float s_lut[16];
  __shared__ float s_ncode[256];
  float off = 0.f;
  if constexpr (KIND != kDense) off = load_weight_tables(p.w, s_lut, s_ncode);
  __syncthreads();

  // m tiles on grid.x (up to 2^31-1: any token count), n tiles on grid.y (<= 65535 * 64 outputs).
  const int64_t m0 = int64_t(blockIdx.x) * kTM;
  const int64_t n0 = int64_t(blockIdx.y) * kTN;
  // Stage s: A tile at smem + s * kStageBytes, B tile right after it. Computed, not an array of
  // pointers: indexing such an array with the loop parity put it in local memory (cuobjdump: LDL).
  auto stage_a = [&](int s) { return reinterpret_cast<T*>(smem + s * Cfg::kStageBytes); };
  auto stage_b = [&](int s) { return reinterpret_cast<T*>(smem + s * Cfg::kStageBytes) + Cfg::kAElems; };
  const int64_t ktiles = (p.R + kTK - 1) / kTK;
  const int warp = threadIdx.x >> 5;
  const int wm = warp >> 1, wn = warp & 1;

  TileRegs<T, KIND> regs;
  using namespace nvcuda;
  [[maybe_unused]] wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  [[maybe_unused]] float sacc[8][4];
  if constexpr (Cfg::kFloat) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sacc[i][j] = 0.f;
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }

  if (ktiles > 0) {
    tile_fetch<T, KIND>(p, s_ncode, off, m0, n0, 0, regs, stage_a(0));
    tile_commit<T, KIND>(p, regs, s_lut, s_ncode, off, m0, n0, 0, stage_a(0), stage_b(0));
    cp_async_wait_all();
  }
  __syncthreads();
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    const int cur = int(kt & 1);
    const bool more = kt + 1 < ktiles;
    // Stage cur ^ 1 was last read in iteration kt - 1, which every warp has left (barrier below), so
    // its cp.async copies may start now and overlap this iteration's MMAs.
    if (more) tile_fetch<T, KIND>(p, s_ncode, off, m0, n0, (kt + 1) * kTK, regs, stage_a(cur ^ 1));
    const T* a_s = stage_a(cur);
    const T* b_s = stage_b(cur);
    if constexpr (Cfg::kFloat) {
      const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;  // rows ty*8 + i, cols tx + 16 j
#pragma unroll 4
      for (int k = 0; k < kTK; ++k) {
        float a[8], b[4];
#pragma unroll
        for (int i = 0; i < 8; ++i) a[i] = a_s[(ty * 8 + i) * Cfg::kLdA + k];
#pragma unroll
        for (int j = 0; j < 4; ++j)
          b[j] = (KIND == kB4T) ? b_s[k * Cfg::kLdBN + tx + 16 * j] : b_s[(tx + 16 * j) * Cfg::kLdBK + k];
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) sacc[i][j] = fmaf(a[i], b[j], sacc[i][j]);
      }
    } else {
#pragma unroll
      for (int kk = 0; kk < kTK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], a_s + (wm * 32 + i * 16) * Cfg::kLdA + kk, Cfg::kLdA);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          if constexpr (KIND == kB4T) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
            wmma::load_matrix_sync(fb, b_s + kk * Cfg::kLdBN + wn * 32 + j * 16, Cfg::kLdBN);
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[i][j], fa[i], fb, acc[i][j]);
          } else {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
            wmma::load_matrix_sync(fb, b_s + (wn * 32 + j * 16) * Cfg::kLdBK + kk, Cfg::kLdBK);
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[i][j], fa[i], fb, acc[i][j]);
          }
        }
      }
    }
    if (more) tile_commit<T, KIND>(p, regs, s_lut, s_ncode, off, m0, n0, (kt + 1) * kTK, stage_a(cur ^ 1),
                                    stage_b(cur ^ 1));
    cp_async_wait_all();  // this thread's copies have landed; the barrier publishes everyone's
    __syncthreads();
  }

  // Epilogue: accumulators -> shared fp32 tile (reusing the stage memory; every warp passed the
  // last __syncthreads, so no one still reads it) -> bias + LoRA -> one rounding -> coalesced store.
  float* Cs = reinterpret_cast<float*>(smem);
  if constexpr (Cfg::kFloat) {
    const int ty = threadIdx.x >> 4, tx = threadIdx.x & 15;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) Cs[(ty * 8 + i) * Cfg::kLdC + tx + 16 * j] = sacc[i][j];
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * Cfg::kLdC + wn * 32 + j * 16, acc[i][j], Cfg::kLdC,
                                wmma::mem_row_major);
  }
  __syncthreads();
  T* C = static_cast<T*>(p.C);
  for (int e = threadIdx.x; e < kTM * kTN; e += kTileThreads) {
    const int row = e / kTN, col = e % kTN;
    const int64_t m = m0 + row, n = n0 + col;
    if (m < p.M && n < p.Nout)
      C[m * p.Nout + n] = Cvt<T>::from_f(apply_epilogue(p.ep, Cs[row * Cfg::kLdC + col], m, n));
  }
}

// Host: launch the tiled GEMM for dtype T (grid: m tiles on x, n tiles on y).
template <typename T, int KIND>
void launch_tile_gemm(const TileArgs& args, cudaStream_t stream) {
  const int64_t mt = ceil_div(args.M, kTM), nt = ceil_div(args.Nout, kTN);
  TORCH_CHECK(nt <= 65535, "output width ", args.Nout, " exceeds the tiled kernel's limit of ", 65535 * kTN);
  TORCH_CHECK(mt <= 0x7fffffff, "too many rows: ", args.M);
  const dim3 grid(static_cast<unsigned>(mt), static_cast<unsigned>(nt));
  tile_gemm_kernel<T, KIND><<<grid, kTileThreads, 0, stream>>>(args);
}

}  // namespace qpeft
