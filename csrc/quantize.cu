// 4-bit (NF4/FP4) and 8-bit blockwise quantize / dequantize, bit-compatible with bitsandbytes.
//
// Semantics (python/qpeft/reference/quantize.py, bitsandbytes' PyTorch backend):
//   blocks of `blocksize` over the flattened tensor (the last one may be partial);
//   absmax = max |x| per block in fp32;
//   full blocks:   scaled = clamp(x * (1 / max(absmax, 1e-38)), -1, 1)
//   partial block: scaled = clamp(x / max(absmax, 1e-38), -1, 1), and its stored absmax is clamped
//   code = number of fp32 code-book midpoints strictly below `scaled` (torch.bucketize), FP4 remapped
//   to its bit-pattern order; packing puts element 2i in the HIGH nibble; an odd tail is padded with
//   the code of 0.0.
//   dequantize: out = code[q] * absmax[i / blocksize] in fp32, rounded once to the output dtype.
// All products/quotients use explicit _rn intrinsics so that nvcc cannot contract them into FMAs.
//
// Memory access: 16-byte vector loads and stores when the pointers allow it (checked on the host,
// scalar path otherwise), grid-stride loops, int64 indexing throughout (n may exceed 2^31).
#include <string>

#include "common.h"
#include "ops.h"

namespace qpeft {
namespace {

constexpr int kThreads = 256;

// 8 consecutive elements of A starting at e0 (a multiple of 8) as fp32; elements at or past `end`
// read as 0 (the reference pads the odd tail with 0.0 as well).
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ A, int64_t e0, int64_t end, bool vec, float* v) {
  if (vec && e0 + 8 <= end) {
    if constexpr (std::is_same_v<T, float>) {
      const float4 a = __ldg(reinterpret_cast<const float4*>(A + e0));
      const float4 b = __ldg(reinterpret_cast<const float4*>(A + e0 + 4));
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
      const uint4 u = __ldg(reinterpret_cast<const uint4*>(A + e0));
      const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = Cvt<T>::to_f(h[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = (e0 + i < end) ? Cvt<T>::to_f(A[e0 + i]) : 0.f;
  }
}

// 8 fp32 values -> 8 elements of T at p (16-byte aligned when `vec`).
template <typename T>
__device__ __forceinline__ void store8(T* __restrict__ p, const float* v) {
  if constexpr (std::is_same_v<T, float>) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    uint4 u;
    T* h = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int i = 0; i < 8; ++i) h[i] = Cvt<T>::from_f(v[i]);
    *reinterpret_cast<uint4*>(p) = u;
  }
}

// Work split of the blockwise quantizers: each thread handles 8 consecutive elements per pass;
// `tpb` = min(blocksize/8, 32) lanes share one quantization block (so a warp covers 32/tpb blocks at
// blocksize <= 256, and one block in blocksize/256 passes above that). absmax is reduced with xor
// shuffles inside the aligned lane group. Pass 2 re-reads the block (it is in L1/L2: <= 16 KB).
struct BlockSplit {
  int tpb, passes, blocks_per_warp;
  __device__ explicit BlockSplit(int log2bs) {
    const int bs = 1 << log2bs;
    tpb = min(bs >> 3, 32);
    passes = bs / (tpb * 8);
    blocks_per_warp = 32 / tpb;
  }
};

__device__ __forceinline__ float group_max(float v, int tpb) {
  for (int off = tpb >> 1; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ bool group_any(bool v, int tpb) {
  int x = v;
  for (int off = tpb >> 1; off > 0; off >>= 1) x |= __shfl_xor_sync(0xffffffffu, x, off);
  return x != 0;
}

// One quantization block as seen by one lane of its lane group (shared by the 4-bit and 8-bit quantizers).
struct BlockStats {
  int sub;              // lane index inside the block's lane group
  int64_t start, end;   // element range of the block (end == start for a lane past the last block)
  bool tail;            // partial last block: divides instead of multiplying (bnb's PyTorch backend)
  float clamped, inv;   // max(absmax, 1e-38) and its reciprocal
};

// Reduces |x| over the block and stores its absmax. fmaxf drops NaN, so NaN is tracked separately and
// stored as the block's absmax (Inf propagates through fmaxf by itself): the public API rejects non-finite
// input by looking at the absmax, without a second pass over A.
template <typename T>
__device__ __forceinline__ BlockStats block_stats(const T* __restrict__ A, int64_t n, int log2bs,
                                                  const BlockSplit& sp, int64_t blk, int sub, bool vec_in,
                                                  float* __restrict__ absmax) {
  const int64_t nblocks = (n + (int64_t{1} << log2bs) - 1) >> log2bs;
  const bool active = blk < nblocks;
  BlockStats b;
  b.sub = sub;
  b.start = blk << log2bs;
  b.end = active ? min(b.start + (int64_t{1} << log2bs), n) : b.start;
  float amax = 0.f;
  bool nan = false;
  for (int p = 0; p < sp.passes; ++p) {
    float v[8];
    load8(A, b.start + (int64_t(p) * sp.tpb + sub) * 8, b.end, vec_in, v);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      amax = fmaxf(amax, fabsf(v[i]));
      nan |= v[i] != v[i];
    }
  }
  amax = group_max(amax, sp.tpb);
  if (group_any(nan, sp.tpb)) amax = __int_as_float(0x7fc00000);
  b.tail = (b.end - b.start) < (int64_t{1} << log2bs);
  b.clamped = amax != amax ? amax : fmaxf(amax, tiny_absmax());
  if (active && sub == 0) absmax[blk] = b.tail ? b.clamped : amax;
  b.inv = __frcp_rn(b.clamped);
  return b;
}

// The quantizers' grid-stride loop: each lane group takes one quantization block, stores its absmax
// (block_stats), then hands every 8-element chunk it owns to `emit(e0, v, b)` (v: the 8 values as fp32,
// past-the-end ones 0). The loop bound is uniform per warp, so every lane reaches the shuffles.
template <typename T, typename Emit>
__device__ __forceinline__ void for_each_block_chunk(const T* __restrict__ A, int64_t n, int log2bs, bool vec_in,
                                                     float* __restrict__ absmax, Emit emit) {
  const BlockSplit sp(log2bs);
  const int lane = threadIdx.x & 31;
  const int64_t nblocks = (n + (int64_t{1} << log2bs) - 1) >> log2bs;
  const int64_t warp0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t wb = warp0 * sp.blocks_per_warp; wb < nblocks; wb += nwarps * sp.blocks_per_warp) {
    const BlockStats b = block_stats(A, n, log2bs, sp, wb + lane / sp.tpb, lane % sp.tpb, vec_in, absmax);
    for (int p = 0; p < sp.passes; ++p) {
      const int64_t e0 = b.start + (int64_t(p) * sp.tpb + b.sub) * 8;
      if (e0 >= b.end) continue;
      float v[8];
      load8(A, e0, b.end, vec_in, v);
      emit(e0, v, b);
    }
  }
}

// bnb: full blocks multiply by the reciprocal, the partial tail block divides (see header).
__device__ __forceinline__ float scale_clamp(float x, bool tail, float clamped_absmax, float inv) {
  const float s = tail ? __fdiv_rn(x, clamped_absmax) : __fmul_rn(x, inv);
  return fminf(fmaxf(s, -1.f), 1.f);
}

template <typename T, int QT>
__global__ void __launch_bounds__(kThreads)
quantize_4bit_kernel(const T* __restrict__ A, int64_t n, int log2bs, uint8_t* __restrict__ packed,
                     float* __restrict__ absmax, bool vec_in, bool vec_out) {
  for_each_block_chunk(A, n, log2bs, vec_in, absmax, [&](int64_t e0, const float* v, const BlockStats& b) {
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t hi = quantize_4bit_value<QT>(scale_clamp(v[2 * j], b.tail, b.clamped, b.inv));
      const uint32_t lo = quantize_4bit_value<QT>(scale_clamp(v[2 * j + 1], b.tail, b.clamped, b.inv));
      word |= ((hi << 4) | lo) << (8 * j);  // byte j (little endian) = elements 2j (high), 2j+1
    }
    if (vec_out && e0 + 8 <= b.end) {
      *reinterpret_cast<uint32_t*>(packed + (e0 >> 1)) = word;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (e0 + 2 * j < b.end) packed[(e0 >> 1) + j] = static_cast<uint8_t>(word >> (8 * j));
    }
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
dequantize_4bit_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ absmax,
                       const float* __restrict__ code, int64_t n, int log2bs, T* __restrict__ out, bool vec) {
  // byte -> (code[hi], code[lo]): one 8-byte shared load decodes two elements.
  __shared__ float2 s_pair[256];
  s_pair[threadIdx.x] = make_float2(code[threadIdx.x >> 4], code[threadIdx.x & 15]);
  __syncthreads();
  const int64_t nchunks = (n + 31) >> 5;  // 32 elements = 16 packed bytes per thread
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < nchunks;
       c += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e0 = c << 5;
    if (vec && e0 + 32 <= n) {
      const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(packed) + c);  // read once: stream
      const float sc = __ldg(absmax + (e0 >> log2bs));  // blocksize >= 32: one block per chunk
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        float v[8];
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const float2 p = s_pair[(words[g] >> (8 * b)) & 0xFF];
          v[2 * b] = __fmul_rn(p.x, sc);
          v[2 * b + 1] = __fmul_rn(p.y, sc);
        }
        store8(out + e0 + 8 * g, v);
      }
    } else {
      const int64_t e1 = min(e0 + 32, n);
      for (int64_t e = e0; e < e1; ++e) {
        const uint32_t byte = packed[e >> 1];
        const float2 p = s_pair[byte];
        out[e] = Cvt<T>::from_f(__fmul_rn((e & 1) ? p.y : p.x, absmax[e >> log2bs]));
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
quantize_blockwise_kernel(const T* __restrict__ A, const float* __restrict__ code, int code_len, int64_t n,
                          int log2bs, uint8_t* __restrict__ q, float* __restrict__ absmax, bool vec_in, bool vec_out) {
  // The code_len - 1 midpoints of the sorted code (2..256 entries), padded with +inf to 256 slots so
  // that an 8-step binary search counts the midpoints strictly below x: torch.bucketize(x, midpoints).
  __shared__ float s_mid[256];
  {
    const int t = threadIdx.x;
    s_mid[t] = t < code_len - 1 ? __fmul_rn(__fadd_rn(code[t], code[t + 1]), 0.5f) : __int_as_float(0x7f800000);
  }
  __syncthreads();
  for_each_block_chunk(A, n, log2bs, vec_in, absmax, [&](int64_t e0, const float* v, const BlockStats& b) {
    uint32_t w[2] = {0u, 0u};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float s = scale_clamp(v[i], b.tail, b.clamped, b.inv);
      int idx = 0;
#pragma unroll
      for (int step = 128; step > 0; step >>= 1) idx += (s > s_mid[idx + step - 1]) ? step : 0;
      w[i >> 2] |= static_cast<uint32_t>(idx) << (8 * (i & 3));
    }
    if (vec_out && e0 + 8 <= b.end) {
      *reinterpret_cast<uint2*>(q + e0) = make_uint2(w[0], w[1]);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        if (e0 + i < b.end) q[e0 + i] = static_cast<uint8_t>(w[i >> 2] >> (8 * (i & 3)));
    }
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
dequantize_blockwise_kernel(const uint8_t* __restrict__ q, const float* __restrict__ absmax,
                            const float* __restrict__ code, int code_len, int64_t n, int log2bs, T* __restrict__ out,
                            bool vec) {
  __shared__ float s_code[256];
  s_code[threadIdx.x] = threadIdx.x < code_len ? code[threadIdx.x] : 0.f;  // codes >= code_len: invalid input
  __syncthreads();
  const int64_t nchunks = (n + 15) >> 4;  // 16 codes = one 16-byte load per thread
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < nchunks;
       c += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e0 = c << 4;
    if (vec && e0 + 16 <= n) {
      const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(q) + c);
      const float sc = __ldg(absmax + (e0 >> log2bs));
      const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int g = 0; g < 2; ++g) {
        float v[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = __fmul_rn(s_code[(words[2 * g + (i >> 2)] >> (8 * (i & 3))) & 0xFF], sc);
        store8(out + e0 + 8 * g, v);
      }
    } else {
      const int64_t e1 = min(e0 + 16, n);
      for (int64_t e = e0; e < e1; ++e) out[e] = Cvt<T>::from_f(__fmul_rn(s_code[q[e]], absmax[e >> log2bs]));
    }
  }
}

// CTAs for the quantizers: one warp covers 32/tpb blocks.
int64_t quantize_grid(int64_t n, int log2bs) {
  const int64_t bs = int64_t{1} << log2bs;
  const int64_t tpb = std::min<int64_t>(bs / 8, 32);
  const int64_t nblocks = ceil_div(n, bs);
  const int64_t warps = ceil_div(nblocks, 32 / tpb);
  return grid_for(warps, kThreads / 32);
}

void check_quant_outputs(const at::Tensor& A, const at::Tensor& q, int64_t q_numel, const char* q_name,
                         const at::Tensor& absmax, int64_t blocks) {
  QPEFT_CHECK_DTYPE(q, at::kByte, q_name);
  TORCH_CHECK(q.is_cuda() && q.device() == A.device(), q_name, " must be on ", A.device(), ", got ", q.device());
  TORCH_CHECK(q.is_contiguous(), q_name, " must be contiguous");
  TORCH_CHECK(q.numel() == q_numel, q_name, " must have ", q_numel, " elements for an input of ", A.numel(),
              " elements, got shape ", q.sizes());
  QPEFT_CHECK_DTYPE(absmax, at::kFloat, "absmax");
  QPEFT_CHECK_SAME_DEVICE(absmax, A, "absmax", "A");
  QPEFT_CHECK_CONTIGUOUS(absmax, "absmax");
  TORCH_CHECK(absmax.numel() == blocks, "absmax must have ceil(n / blocksize) = ", blocks, " elements, got shape ",
              absmax.sizes());
}

void check_dequant_inputs(const at::Tensor& out, const at::Tensor& q, int64_t q_numel, const char* q_name,
                          const at::Tensor& absmax, int64_t blocks, const at::Tensor& code, int64_t min_code,
                          int64_t max_code) {
  QPEFT_CHECK_CUDA(out, "out");
  QPEFT_CHECK_FLOAT(out, "out");
  QPEFT_CHECK_CONTIGUOUS(out, "out");
  QPEFT_CHECK_DTYPE(q, at::kByte, q_name);
  QPEFT_CHECK_SAME_DEVICE(q, out, q_name, "out");
  TORCH_CHECK(q.is_contiguous(), q_name, " must be contiguous");
  TORCH_CHECK(q.numel() == q_numel, q_name, " must have ", q_numel, " elements for an output of ", out.numel(),
              " elements, got shape ", q.sizes());
  QPEFT_CHECK_DTYPE(absmax, at::kFloat, "absmax");
  QPEFT_CHECK_SAME_DEVICE(absmax, out, "absmax", "out");
  QPEFT_CHECK_CONTIGUOUS(absmax, "absmax");
  TORCH_CHECK(absmax.numel() == blocks, "absmax must have ceil(n / blocksize) = ", blocks, " elements, got shape ",
              absmax.sizes());
  QPEFT_CHECK_DTYPE(code, at::kFloat, "code");
  QPEFT_CHECK_SAME_DEVICE(code, out, "code", "out");
  QPEFT_CHECK_CONTIGUOUS(code, "code");
  TORCH_CHECK(code.numel() >= min_code && code.numel() <= max_code, "code must have ",
              min_code == max_code ? std::to_string(min_code)
                                   : std::to_string(min_code) + ".." + std::to_string(max_code),
              " entries, got shape ", code.sizes());
}

}  // namespace

void quantize_4bit_out(const at::Tensor& A, int64_t blocksize, c10::string_view quant_type, at::Tensor& packed,
                       at::Tensor& absmax) {
  QPEFT_CHECK_CUDA(A, "A");
  QPEFT_CHECK_FLOAT(A, "A");
  QPEFT_CHECK_CONTIGUOUS(A, "A");
  const int log2bs = check_blocksize(blocksize);
  TORCH_CHECK(quant_type == "nf4" || quant_type == "fp4", "quant_type must be 'nf4' or 'fp4', got '",
              std::string(quant_type), "'");
  const int64_t n = A.numel();
  check_quant_outputs(A, packed, (n + 1) / 2, "packed", absmax, ceil_div(n, blocksize));
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(A.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec_in = aligned(A.data_ptr(), 16);
  const bool vec_out = aligned(packed.data_ptr(), 4);
  const int64_t grid = quantize_grid(n, log2bs);
  QPEFT_DISPATCH_FLOAT(A.scalar_type(), "quantize_4bit_out", [&] {
    const auto* a = reinterpret_cast<const scalar_t*>(A.data_ptr());
    auto* p = packed.data_ptr<uint8_t>();
    if (quant_type == "nf4")
      quantize_4bit_kernel<scalar_t, kNF4><<<grid, kThreads, 0, stream>>>(a, n, log2bs, p, absmax.data_ptr<float>(),
                                                                          vec_in, vec_out);
    else
      quantize_4bit_kernel<scalar_t, kFP4><<<grid, kThreads, 0, stream>>>(a, n, log2bs, p, absmax.data_ptr<float>(),
                                                                          vec_in, vec_out);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dequantize_4bit_out(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                         int64_t blocksize, at::Tensor& out) {
  const int log2bs = check_blocksize(blocksize);
  const int64_t n = out.numel();
  check_dequant_inputs(out, packed, (n + 1) / 2, "packed", absmax, ceil_div(n, blocksize), code, 16, 16);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec = aligned(packed.data_ptr(), 16) && aligned(out.data_ptr(), 16);
  const int64_t grid = grid_for(ceil_div(n, 32), kThreads);
  QPEFT_DISPATCH_FLOAT(out.scalar_type(), "dequantize_4bit_out", [&] {
    dequantize_4bit_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), code.data_ptr<float>(), n, log2bs,
        reinterpret_cast<scalar_t*>(out.data_ptr()), vec);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void quantize_blockwise_out(const at::Tensor& A, const at::Tensor& code, int64_t blocksize, at::Tensor& q,
                            at::Tensor& absmax) {
  QPEFT_CHECK_CUDA(A, "A");
  QPEFT_CHECK_FLOAT(A, "A");
  QPEFT_CHECK_CONTIGUOUS(A, "A");
  const int log2bs = check_blocksize(blocksize);
  QPEFT_CHECK_DTYPE(code, at::kFloat, "code");
  QPEFT_CHECK_SAME_DEVICE(code, A, "code", "A");
  QPEFT_CHECK_CONTIGUOUS(code, "code");
  TORCH_CHECK(code.numel() >= 2 && code.numel() <= 256, "code must have 2..256 entries (sorted ascending), got shape ",
              code.sizes());
  const int64_t n = A.numel();
  check_quant_outputs(A, q, n, "q", absmax, ceil_div(n, blocksize));
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(A.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec_in = aligned(A.data_ptr(), 16);
  const bool vec_out = aligned(q.data_ptr(), 8);
  const int64_t grid = quantize_grid(n, log2bs);
  QPEFT_DISPATCH_FLOAT(A.scalar_type(), "quantize_blockwise_out", [&] {
    quantize_blockwise_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        reinterpret_cast<const scalar_t*>(A.data_ptr()), code.data_ptr<float>(), int(code.numel()), n, log2bs,
        q.data_ptr<uint8_t>(),
        absmax.data_ptr<float>(), vec_in, vec_out);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dequantize_blockwise_out(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                              int64_t blocksize, at::Tensor& out) {
  const int log2bs = check_blocksize(blocksize);
  const int64_t n = out.numel();
  check_dequant_inputs(out, q, n, "q", absmax, ceil_div(n, blocksize), code, 2, 256);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool vec = aligned(q.data_ptr(), 16) && aligned(out.data_ptr(), 16);
  const int64_t grid = grid_for(ceil_div(n, 16), kThreads);
  QPEFT_DISPATCH_FLOAT(out.scalar_type(), "dequantize_blockwise_out", [&] {
    dequantize_blockwise_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        q.data_ptr<uint8_t>(), absmax.data_ptr<float>(), code.data_ptr<float>(), int(code.numel()), n, log2bs,
        reinterpret_cast<scalar_t*>(out.data_ptr()), vec);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace qpeft
