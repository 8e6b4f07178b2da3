// Shared helpers of the qpeft CUDA extension: input checks (FA flash_api.cpp style), dtype
// conversions, the bitsandbytes 4-bit code books and the 4-bit weight descriptor used by the matmuls.
//
// Kept lean on purpose: only <ATen/core/Tensor.h> and c10/cuda headers (no <torch/extension.h>, no
// pybind), so that each .cu translation unit compiles in well under a minute on 2 cores.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <optional>

namespace qpeft {

// ---------------------------------------------------------------- host-side argument checks
#define QPEFT_CHECK_CUDA(t, name) \
  TORCH_CHECK((t).is_cuda(), name, " must be a CUDA tensor, got device ", (t).device())
#define QPEFT_CHECK_CONTIGUOUS(t, name) \
  TORCH_CHECK((t).is_contiguous(), name, " must be contiguous (call .contiguous() first)")
#define QPEFT_CHECK_DTYPE(t, dt, name) \
  TORCH_CHECK((t).scalar_type() == (dt), name, " must be ", dt, ", got ", (t).scalar_type())
#define QPEFT_CHECK_SAME_DEVICE(t, ref, name, refname)                                          \
  TORCH_CHECK((t).device() == (ref).device(), name, " is on ", (t).device(), " but ", refname, \
              " is on ", (ref).device())

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

#define QPEFT_CHECK_FLOAT(t, name)                                                            \
  TORCH_CHECK(::qpeft::is_float_dtype((t).scalar_type()), name,                              \
              " must be float32, float16 or bfloat16, got ", (t).scalar_type())

// bitsandbytes accepts blocksizes 32..4096 (powers of two); the kernels index absmax with a shift.
inline int check_blocksize(int64_t blocksize) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "blocksize must be a power of two in [32, 4096], got ", blocksize);
  int log2 = 0;
  while ((int64_t{1} << log2) < blocksize) ++log2;
  return log2;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Runtime dtype tag for operands that may differ from the activation dtype (LoRA factors, bias):
// reading them through one switch keeps the number of template instantiations (= build time) down.
enum DTypeTag : int { kTagF32 = 0, kTagF16 = 1, kTagBF16 = 2 };

inline int dtype_tag(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kTagF32;
    case at::kHalf: return kTagF16;
    case at::kBFloat16: return kTagBF16;
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
  return kTagF32;
}

// Grid size for grid-stride kernels: enough CTAs to fill the GPU several times over, never more
// than the work needs (and at most 2^31-1, the x-dimension limit).
inline int64_t grid_for(int64_t work_items, int64_t items_per_cta) {
  int64_t g = ceil_div(work_items, items_per_cta);
  if (g < 1) g = 1;
  const int64_t cap = int64_t{1} << 20;  // 1M CTAs: grid-stride covers the rest
  return g < cap ? g : cap;
}

// ---------------------------------------------------------------- device-side conversions
template <typename T> struct Cvt;
template <> struct Cvt<float> {
  static __device__ __forceinline__ float to_f(float v) { return v; }
  static __device__ __forceinline__ float from_f(float v) { return v; }
};
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

__device__ __forceinline__ float load_tagged(const void* p, int tag, int64_t i) {
  switch (tag) {
    case kTagF16: return __half2float(static_cast<const __half*>(p)[i]);
    case kTagBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Map at::ScalarType -> CUDA element type and run a lambda templated on it.
#define QPEFT_DISPATCH_FLOAT(stype, NAME, ...)                                    \
  [&] {                                                                           \
    switch (stype) {                                                              \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }          \
      case at::kHalf: { using scalar_t = __half; return __VA_ARGS__(); }          \
      case at::kBFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); } \
      default: TORCH_CHECK(false, NAME ": unsupported dtype ", stype);            \
    }                                                                             \
  }()

// ---------------------------------------------------------------- 4-bit code books
// Quantization rounds to the nearest code by comparing with the fp32 midpoints of the SORTED code
// book, strict `>` (a value equal to a midpoint goes to the lower code): exactly
// torch.bucketize(scaled, midpoints) in bitsandbytes' PyTorch backend. The midpoints below are
// (code[order[i]] + code[order[i+1]]) / 2 computed in fp32 by torch (hex-float, bit-exact).
enum QuantType : int { kNF4 = 0, kFP4 = 1 };

__device__ __forceinline__ int count_gt_nf4(float v) {
  return (v > -0x1.b239b0p-1f) + (v > -0x1.38a4e0p-1f) + (v > -0x1.d70900p-2f) +
         (v > -0x1.5bd4ecp-2f) + (v > -0x1.e079d8p-3f) + (v > -0x1.1a7178p-3f) +
         (v > -0x1.74f0e2p-5f) + (v > 0x1.45f5fep-5f) + (v > 0x1.ec90c4p-4f) +
         (v > 0x1.a0cfc0p-3f) + (v > 0x1.2b05a8p-2f) + (v > 0x1.8ea7f2p-2f) +
         (v > 0x1.00da08p-1f) + (v > 0x1.491b5ep-1f) + (v > 0x1.b913b4p-1f);
}

__device__ __forceinline__ int count_gt_fp4(float v) {
  return (v > -0x1.aaaaacp-1f) + (v > -0x1.2aaaacp-1f) + (v > -0x1.aaaaacp-2f) +
         (v > -0x1.2aaaacp-2f) + (v > -0x1.aaaaacp-3f) + (v > -0x1.6p-4f) +
         (v > -0x1.555556p-9f) + (v > 0.0f) + (v > 0x1.555556p-9f) + (v > 0x1.6p-4f) +
         (v > 0x1.aaaaacp-3f) + (v > 0x1.2aaaacp-2f) + (v > 0x1.aaaaacp-2f) +
         (v > 0x1.2aaaacp-1f) + (v > 0x1.aaaaacp-1f);
}

// FP4 codes are in bit-pattern order; sorted position i holds code nibble i of this constant
// (torch.argsort of the FP4 table: [11,10,13,12,15,14,9,0,8,1,6,7,4,5,2,3]; +0 (code 0) sorts
// before the second zero (code 8), so (-1/384, 0] -> 0 and (0, 1/384] -> 8, as in bnb's backend).
constexpr uint64_t kFP4SortedToCode = 0x3254761809efcdabULL;

template <int QT>
__device__ __forceinline__ uint32_t quantize_4bit_value(float scaled) {
  if constexpr (QT == kNF4) {
    return static_cast<uint32_t>(count_gt_nf4(scaled));  // NF4 is sorted: position == code
  } else {
    return static_cast<uint32_t>((kFP4SortedToCode >> (4 * count_gt_fp4(scaled))) & 0xF);
  }
}

// bnb clamps absmax at 1e-38 before taking its reciprocal (so an all-zero block gives code 0 rather
// than NaN). 1e-38 is a subnormal float: 0x006ce3ee, written as bits to avoid double rounding.
__device__ __forceinline__ float tiny_absmax() { return __int_as_float(0x006ce3ee); }

// ---------------------------------------------------------------- 4-bit weight descriptor
// W (rows, cols) row-major, flattened, two codes per byte (element 2i in the HIGH nibble), one
// absmax per 2^log2bs consecutive elements; absmax fp32, or uint8 codes decoded as
// nested_code[q] * nested_absmax[blk / 256] + offset (bitsandbytes double quant, 256 fixed).
struct Weight4 {
  const uint8_t* packed;
  const float* absmax_f32;     // !nested
  const uint8_t* absmax_u8;    // nested
  const float* nested_absmax;  // nested
  const float* nested_code;    // nested, 256 entries
  const float* offset;         // nested, 1 entry (device memory: no host sync)
  const float* code;           // 16 entries
  int64_t rows, cols;
  int log2bs;
  bool nested;  // a runtime flag, not a template parameter: it halves the instantiations (build time)
};

constexpr int kNestedLog2 = 8;  // 256 absmax values per second-level block

// Shared-memory tables of the 4-bit kernels: the 16-entry code and, with double quant, the 256-entry
// nested code; returns the offset (0 without double quant). Call before a __syncthreads.
__device__ __forceinline__ float load_weight_tables(const Weight4& w, float* s_lut, float* s_ncode) {
  if (threadIdx.x < 16) s_lut[threadIdx.x] = w.code[threadIdx.x];
  if (w.nested) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_ncode[i] = w.nested_code[i];
    return __ldg(w.offset);
  }
  return 0.f;
}

// Per-block scale. __fmul_rn/__fadd_rn stop nvcc from contracting into an FMA: the reference does
// the multiply and the add as two fp32 roundings, and dequantized weights must match it bit for bit.
__device__ __forceinline__ float block_scale(const Weight4& w, const float* s_ncode, float offset, int64_t blk) {
  if (w.nested) {
    return __fadd_rn(__fmul_rn(s_ncode[w.absmax_u8[blk]], __ldg(w.nested_absmax + (blk >> kNestedLog2))),
                     offset);
  } else {
    return __ldg(w.absmax_f32 + blk);
  }
}

// One element by flat index (the slow, alignment-free path).
__device__ __forceinline__ float dequant_elem(const Weight4& w, const float* s_lut, const float* s_ncode,
                                              float offset, int64_t idx) {
  const uint32_t byte = __ldg(w.packed + (idx >> 1));
  const uint32_t nib = (idx & 1) ? (byte & 0xF) : (byte >> 4);
  return __fmul_rn(s_lut[nib], block_scale(w, s_ncode, offset, idx >> w.log2bs));
}

// Checks shared by nf4_matmul_out / nf4_matmul_dx_out: the 4-bit weight (rows, cols) and its state.
Weight4 make_weight4(const at::Tensor& ref, const at::Tensor& packed, const at::Tensor& absmax,
                     const at::Tensor& code, int64_t blocksize, int64_t rows, int64_t cols,
                     const std::optional<at::Tensor>& nested_absmax,
                     const std::optional<at::Tensor>& nested_code,
                     const std::optional<at::Tensor>& offset);

// LoRA epilogue operands: out[m, n] += scale * sum_r rows[m, r] * cols[n * s_n + r * s_r].
struct LoraEpilogue {
  const void* bias = nullptr;
  int bias_tag = kTagF32;
  const void* rows = nullptr;  // (M, r)
  int rows_tag = kTagF32;
  const void* cols = nullptr;
  int cols_tag = kTagF32;
  int64_t s_n = 0, s_r = 0, rank = 0;
  float scale = 0.f;
};

__device__ __forceinline__ float apply_epilogue(const LoraEpilogue& e, float acc, int64_t m, int64_t n) {
  if (e.bias != nullptr) acc = acc + load_tagged(e.bias, e.bias_tag, n);
  if (e.rows != nullptr) {
    float dot = 0.f;
    for (int64_t r = 0; r < e.rank; ++r)
      dot = fmaf(load_tagged(e.rows, e.rows_tag, m * e.rank + r),
                 load_tagged(e.cols, e.cols_tag, n * e.s_n + r * e.s_r), dot);
    acc = acc + e.scale * dot;
  }
  return acc;
}

// bias (Nout) and the LoRA pair rows (M, r) @ cols^T, cols (Nout, r) or (r, Nout) when transposed.
LoraEpilogue make_epilogue(const at::Tensor& a, int64_t M, int64_t Nout, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& rows, const char* rows_name,
                           const std::optional<at::Tensor>& cols, const char* cols_name, bool cols_transposed,
                           double scale);

// Small-M path of nf4_matmul_out (nf4_gemv.cu): the tensor-core kernel when nf4_decode_mma_applies (fp16 /
// bf16, M <= kDecodeMmaMaxM, blocksize >= 64, K % 256 == 0, 16-byte aligned x and packed), else the SIMT kernel
// (M <= kGemvMaxM, K % 32 == 0, 16-byte aligned packed and x: the caller checks).
constexpr int kGemvMaxM = 16;       // the SIMT kernel
constexpr int kDecodeMmaMaxM = 64;  // the tensor-core kernel (token groups of 8: 1, 2, 4 or 8)
bool nf4_decode_mma_applies(const at::Tensor& x, const Weight4& w);
void launch_nf4_gemv(const at::Tensor& x, const Weight4& w, const LoraEpilogue& ep, at::Tensor& out,
                     cudaStream_t stream);

// 2-D contiguous float activation on a CUDA device; output of the same dtype/device with `rows` rows.
inline void check_activation(const at::Tensor& a, const char* name) {
  QPEFT_CHECK_CUDA(a, name);
  QPEFT_CHECK_FLOAT(a, name);
  QPEFT_CHECK_CONTIGUOUS(a, name);
  TORCH_CHECK(a.dim() == 2, name, " must be 2-D, got shape ", a.sizes());
}

inline void check_output(const at::Tensor& o, const char* name, const at::Tensor& a, const char* a_name, int64_t rows) {
  QPEFT_CHECK_SAME_DEVICE(o, a, name, a_name);
  TORCH_CHECK(o.scalar_type() == a.scalar_type(), name, " must have ", a_name, "'s dtype ", a.scalar_type(),
              ", got ", o.scalar_type());
  QPEFT_CHECK_CONTIGUOUS(o, name);
  TORCH_CHECK(o.dim() == 2 && o.size(0) == rows, name, " must be 2-D with ", rows, " rows, got shape ", o.sizes());
}


}  // namespace qpeft
