// Small-M (decode) path of nf4_matmul_out: y[0:M, :] = x @ W^T (+ epilogue) for M <= 16, streaming
// the packed 4-bit weight exactly once. Dispatch and validation are in nf4_matmul.cu; this kernel
// lives in its own translation unit so that the two compile in parallel (MAX_JOBS=2).
#include "common.h"

namespace qpeft {

// ---------------------------------------------------------------- small-M GEMV
constexpr int kGemvRows = 4;   // W rows per warp: each x load feeds 4 rows (x:W bytes from L1 = M:1)
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

// One warp computes out[0:M, n0:n0+4]. Lane l streams 32-element chunks c = l, l+32, ... of each of
// the 4 W rows (16 packed bytes = one uint4 per row and chunk, coalesced across the warp: 512 bytes
// per row per step), decodes them with the 16-entry LUT in shared memory and the chunk's absmax,
// and accumulates x[m, chunk] * w in fp32 for every m < M. A butterfly reduction then gives every
// lane the 4*M sums; lane (m*4 + r) % 32 applies the epilogue and stores out[m, n0 + r].
// Requires K % 32 == 0 (chunks never straddle a row or an absmax block: blocksize >= 32) and 16-byte
// aligned packed and x (checked by the host). x / out point at row m_base of the caller's tensors
// (the epilogue's LoRA rows are indexed from m_base).
template <typename T, int MT>
__global__ void __launch_bounds__(kGemvWarps * 32)
nf4_gemv_kernel(const T* __restrict__ x, Weight4 w, int64_t M, T* __restrict__ out, LoraEpilogue ep,
                int64_t m_base) {
  __shared__ float s_lut[16];
  __shared__ float s_ncode[256];
  const float off = load_weight_tables(w, s_lut, s_ncode);
  __syncthreads();

  const int lane = threadIdx.x & 31;
  const int64_t N = w.rows, K = w.cols;
  const int64_t n0 = (int64_t(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5)) * kGemvRows;
  if (n0 >= N) return;  // whole warp; no barrier follows
  const int64_t chunks = K >> 5;
  const uint4* wp = reinterpret_cast<const uint4*>(w.packed);

  float acc[MT][kGemvRows];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) acc[m][r] = 0.f;

#pragma unroll 1
  for (int64_t c = lane; c < chunks; c += 32) {
    uint4 raw[kGemvRows];
    float sc[kGemvRows];
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) {
      const int64_t n = n0 + r;
      if (n < N) {
        raw[r] = __ldcs(wp + n * chunks + c);  // W is read once: stream it past L1
        sc[r] = block_scale(w, s_ncode, off, (n * K + (c << 5)) >> w.log2bs);
      } else {
        raw[r] = make_uint4(0u, 0u, 0u, 0u);
        sc[r] = 0.f;
      }
    }
    const T* xc = x + (c << 5);
#pragma unroll
    for (int s = 0; s < 4; ++s) {  // 8 elements = one 32-bit word of each row's chunk
      float wv[kGemvRows][8];
#pragma unroll
      for (int r = 0; r < kGemvRows; ++r) {
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
          for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[m][r] = fmaf(xv[e], wv[r][e], acc[m][r]);
        }
      }
    }
  }

#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[m][r] += __shfl_xor_sync(0xffffffffu, acc[m][r], o);

#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < kGemvRows; ++r) {
      const int64_t n = n0 + r;
      if (((m * kGemvRows + r) & 31) == lane && m < M && n < N)
        out[m * N + n] = Cvt<T>::from_f(apply_epilogue(ep, acc[m][r], m_base + m, n));
    }
}

template <typename T>
void launch_gemv_t(const T* x, const Weight4& w, int64_t M, T* out, const LoraEpilogue& ep, cudaStream_t stream) {
  const int64_t warps = ceil_div(w.rows, kGemvRows);
  const int64_t grid = ceil_div(warps, kGemvWarps);
  TORCH_CHECK(grid <= 0x7fffffff, "N too large for the GEMV kernel: ", w.rows);
  const int threads = kGemvWarps * 32;
  // Register tile of MT rows (acc is MT x 4 floats per lane); rows m >= M are skipped by a uniform
  // branch. Three sizes only: the unrolled bodies are large (MT x 4 x 32 FMAs per chunk) and each
  // instantiation costs ~40 s of nvcc time on 2 cores. M = 9..16 runs as two passes of 8 rows: W is
  // streamed twice (the second pass mostly from L2 for layers up to ~50 MB of NF4), where an MT = 16
  // tile would hold 64 accumulators per lane.
  for (int64_t m_base = 0; m_base < M; m_base += 8) {
    const int64_t rows = std::min<int64_t>(M - m_base, 8);
    const T* xb = x + m_base * w.cols;
    T* ob = out + m_base * w.rows;
    if (rows <= 1) nf4_gemv_kernel<T, 1><<<grid, threads, 0, stream>>>(xb, w, rows, ob, ep, m_base);
    else if (rows <= 4) nf4_gemv_kernel<T, 4><<<grid, threads, 0, stream>>>(xb, w, rows, ob, ep, m_base);
    else nf4_gemv_kernel<T, 8><<<grid, threads, 0, stream>>>(xb, w, rows, ob, ep, m_base);
  }
}

void launch_nf4_gemv(const at::Tensor& x, const Weight4& w, const LoraEpilogue& ep, at::Tensor& out,
                     cudaStream_t stream) {
  QPEFT_DISPATCH_FLOAT(x.scalar_type(), "nf4_matmul_out (gemv)", [&] {
    launch_gemv_t<scalar_t>(reinterpret_cast<const scalar_t*>(x.data_ptr()), w, x.size(0),
                            reinterpret_cast<scalar_t*>(out.data_ptr()), ep, stream);
  });
}

}  // namespace qpeft
