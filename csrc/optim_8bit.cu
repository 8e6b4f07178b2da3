// Multi-tensor 8-bit / 32-bit optimizer update (qpeft_C::optim_8bit_step_out), bit-identical to
// python/qpeft/reference/optim_8bit.py (semantics: bitsandbytes' CUDA kernels, plus the non-finite guard on every
// optimizer). UNVERIFIED ON A GPU: compiled and linked for sm_90 on a machine without one.
//
// One launch per parameter dtype updates every tensor of the call: the host writes a table of per-tensor
// pointers and first-block indices into pinned memory and copies it asynchronously on the current stream (no host
// sync); CTA b finds its tensor by binary search over the first blocks (9 steps for 448 LoRA tensors). One CTA of
// 256 threads owns one 256-element quantization block: one element per thread, absmax by a warp-shuffle + shared
// memory max, exact-nearest requantization by an 8-step binary search over the fp32 code-book midpoints in shared
// memory (ties to the lower code), bnb's sign fix for m. All arithmetic is fp32 with _rn intrinsics, so nvcc cannot
// contract the multiply-adds into FMAs (the reference rounds each operation) and division / sqrt are IEEE.
#include <ATen/ops/empty.h>

#include <cstring>

#include <string>
#include <vector>

#include "common.h"
#include "ops.h"

namespace qpeft {
namespace {

constexpr int kBlock = 256;  // bitsandbytes' blockwise optimizer block = threads per CTA

struct TensorRow {  // one row of the per-tensor table (int64 words, as the Triton launcher's)
  int64_t p, g, s1, s2, a1, a2, n, hrow;  // hrow: the tensor's row of hyper (a call may mix dtypes)
};

__device__ __forceinline__ bool finite(float x) { return isfinite(x); }

__device__ __forceinline__ float block_max(float v, float* s_red) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) s_red[warp] = v;
  __syncthreads();
  float m = 0.f;
#pragma unroll
  for (int w = 0; w < kBlock / 32; ++w) m = fmaxf(m, s_red[w]);
  __syncthreads();
  return m;
}

// Code of s / absmax: the number of midpoints (255 + one +inf pad) strictly below it; the sign fix for the signed map.
__device__ __forceinline__ int requantize(float s, float amax, const float* s_mid, const float* s_code, bool sign_fix) {
  const float x = amax > 0.f ? __fdiv_rn(s, amax) : 0.f;
  int idx = 0;
#pragma unroll
  for (int step = 128; step > 0; step >>= 1) idx += (x > s_mid[idx + step - 1]) ? step : 0;
  if (sign_fix && s != 0.f && (signbit(s_code[idx]) != signbit(s))) idx += s > 0.f ? 1 : -1;
  return idx;
}

template <typename T, bool QUANT, bool LION>
__global__ void __launch_bounds__(kBlock)
optim_8bit_step_kernel(const TensorRow* __restrict__ rows, const int64_t* __restrict__ starts, int ntensors,
                       const float* __restrict__ hyper, const float* __restrict__ qmap1,
                       const float* __restrict__ qmap2, float beta1, float beta2) {
  __shared__ float s_code1[256], s_code2[256], s_mid1[256], s_mid2[256], s_red[kBlock / 32];
  const int tid = threadIdx.x;
  if (QUANT) {
    s_code1[tid] = qmap1[tid];
    s_code2[tid] = qmap2[tid];
  }
  __syncthreads();
  if (QUANT) {
    const float inf = __int_as_float(0x7f800000);
    s_mid1[tid] = tid < 255 ? __fmul_rn(__fadd_rn(s_code1[tid], s_code1[tid + 1]), 0.5f) : inf;
    s_mid2[tid] = tid < 255 ? __fmul_rn(__fadd_rn(s_code2[tid], s_code2[tid + 1]), 0.5f) : inf;
  }
  const int64_t pid = blockIdx.x;
  int lo = 0, hi = ntensors;  // starts[lo] <= pid < starts[hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) >> 1;
    if (starts[mid] <= pid) lo = mid; else hi = mid;
  }
  const TensorRow r = rows[lo];
  const int64_t blk = pid - starts[lo];
  const int64_t i = blk * kBlock + tid;
  const bool inb = i < r.n;
  T* p_ptr = reinterpret_cast<T*>(r.p);
  const T* g_ptr = reinterpret_cast<const T*>(r.g);
  const float p = inb ? Cvt<T>::to_f(p_ptr[i]) : 0.f;
  const float g = inb ? Cvt<T>::to_f(g_ptr[i]) : 0.f;
  const float* hy = hyper + 4 * r.hrow;
  const float h0 = hy[0], h1 = hy[1], h2 = hy[2];
  const float omb1 = __fsub_rn(1.f, beta1), omb2 = __fsub_rn(1.f, beta2);
  uint8_t* c1_ptr = reinterpret_cast<uint8_t*>(r.s1);
  float* m_ptr = reinterpret_cast<float*>(r.s1);
  float* a1_ptr = reinterpret_cast<float*>(r.a1);
  __syncthreads();  // the midpoints
  float m;
  if (QUANT) m = inb ? __fmul_rn(s_code1[c1_ptr[i]], a1_ptr[blk]) : 0.f;
  else m = inb ? m_ptr[i] : 0.f;
  float s1, s2 = 0.f, new_p;
  bool ok;
  if (LION) {
    const float u = __fadd_rn(__fmul_rn(m, beta1), __fmul_rn(omb1, g));
    const float sgn = u > 0.f ? 1.f : (u < 0.f ? -1.f : 0.f);
    s1 = __fadd_rn(__fmul_rn(m, beta2), __fmul_rn(omb2, g));
    ok = finite(s1);
    if (!ok) s1 = 0.f;
    new_p = __fsub_rn(__fmul_rn(p, h1), __fmul_rn(h0, sgn));
  } else {
    float v;
    if (QUANT) v = inb ? __fmul_rn(s_code2[reinterpret_cast<uint8_t*>(r.s2)[i]], reinterpret_cast<float*>(r.a2)[blk]) : 0.f;
    else v = inb ? reinterpret_cast<float*>(r.s2)[i] : 0.f;
    s1 = __fadd_rn(__fmul_rn(m, beta1), __fmul_rn(omb1, g));
    s2 = __fadd_rn(__fmul_rn(v, beta2), __fmul_rn(omb2, __fmul_rn(g, g)));
    ok = finite(s1) && finite(s2);
    if (!ok) { s1 = 0.f; s2 = 0.f; }
    new_p = __fmul_rn(__fadd_rn(p, __fmul_rn(h0, __fdiv_rn(s1, __fadd_rn(__fsqrt_rn(s2), h1)))), h2);
  }
  if (inb && ok) p_ptr[i] = Cvt<T>::from_f(new_p);
  if (QUANT) {
    const float amax1 = block_max(inb ? fabsf(s1) : 0.f, s_red);
    const int q1 = requantize(s1, amax1, s_mid1, s_code1, true);
    if (inb) c1_ptr[i] = static_cast<uint8_t>(q1);
    if (tid == 0) a1_ptr[blk] = amax1;
    if (!LION) {
      const float amax2 = block_max(inb ? fabsf(s2) : 0.f, s_red);
      const int q2 = requantize(s2, amax2, s_mid2, s_code2, false);
      if (inb) reinterpret_cast<uint8_t*>(r.s2)[i] = static_cast<uint8_t>(q2);
      if (tid == 0) reinterpret_cast<float*>(r.a2)[blk] = amax2;
    }
  } else if (inb) {
    m_ptr[i] = s1;
    if (!LION) reinterpret_cast<float*>(r.s2)[i] = s2;
  }
}

template <typename T>
void launch(bool quant, bool lion, int64_t grid, cudaStream_t stream, const TensorRow* rows, const int64_t* starts,
            int nt, const float* hyper, const float* q1, const float* q2, float b1, float b2) {
  if (quant && lion) optim_8bit_step_kernel<T, true, true><<<grid, kBlock, 0, stream>>>(rows, starts, nt, hyper, q1, q2, b1, b2);
  else if (quant) optim_8bit_step_kernel<T, true, false><<<grid, kBlock, 0, stream>>>(rows, starts, nt, hyper, q1, q2, b1, b2);
  else if (lion) optim_8bit_step_kernel<T, false, true><<<grid, kBlock, 0, stream>>>(rows, starts, nt, hyper, q1, q2, b1, b2);
  else optim_8bit_step_kernel<T, false, false><<<grid, kBlock, 0, stream>>>(rows, starts, nt, hyper, q1, q2, b1, b2);
}

}  // namespace

void optim_8bit_step_out(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                         at::TensorList absmax1, at::TensorList absmax2, const at::Tensor& qmap1,
                         const at::Tensor& qmap2, const at::Tensor& hyper, double beta1, double beta2,
                         c10::string_view optimizer) {
  TORCH_CHECK(optimizer == "adam" || optimizer == "lion", "optimizer must be 'adam' or 'lion', got '",
              std::string(optimizer), "'");
  const bool lion = optimizer == "lion";
  const int64_t T = static_cast<int64_t>(params.size());
  TORCH_CHECK(T > 0, "params must not be empty");
  const bool quant = !absmax1.empty();
  TORCH_CHECK(grads.size() == params.size() && state1.size() == params.size(), "grads and state1 must have ", T,
              " entries");
  TORCH_CHECK(static_cast<int64_t>(state2.size()) == (lion ? 0 : T), "state2 must have ", lion ? 0 : T, " entries");
  TORCH_CHECK(!quant || static_cast<int64_t>(absmax1.size()) == T, "absmax1 must have 0 or ", T, " entries");
  TORCH_CHECK(static_cast<int64_t>(absmax2.size()) == ((quant && !lion) ? T : 0), "absmax2 has the wrong length");
  const at::Tensor& p0 = params[0];
  QPEFT_CHECK_CUDA(p0, "params[0]");
  for (const auto* q : {&qmap1, &qmap2}) {
    QPEFT_CHECK_DTYPE(*q, at::kFloat, "qmap");
    TORCH_CHECK(q->numel() == 256 && q->is_contiguous() && q->device() == p0.device(),
                "qmap1/qmap2 must be contiguous fp32 (256,) on ", p0.device());
  }
  QPEFT_CHECK_DTYPE(hyper, at::kFloat, "hyper");
  TORCH_CHECK(hyper.dim() == 2 && hyper.size(0) == T && hyper.size(1) == 4 && hyper.is_contiguous() &&
              hyper.device() == p0.device(), "hyper must be contiguous fp32 (", T, ", 4) on ", p0.device());
  const c10::cuda::CUDAGuard guard(p0.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto sdt = quant ? at::kByte : at::kFloat;
  for (const auto dt : {at::kFloat, at::kHalf, at::kBFloat16}) {
    std::vector<TensorRow> rows;
    std::vector<int64_t> starts;
    int64_t total = 0;
    for (int64_t t = 0; t < T; ++t) {
      const at::Tensor& p = params[t];
      if (p.scalar_type() != dt) continue;
      const int64_t n = p.numel();
      TORCH_CHECK(p.is_contiguous() && n > 0 && p.device() == p0.device(), "params[", t, "] must be contiguous, "
                  "non-empty and on ", p0.device());
      TORCH_CHECK(grads[t].scalar_type() == dt && grads[t].numel() == n && grads[t].is_contiguous() &&
                  grads[t].device() == p0.device(), "grads[", t, "] must match params[", t, "]");
      TORCH_CHECK(state1[t].scalar_type() == sdt && state1[t].numel() == n && state1[t].is_contiguous(),
                  "state1[", t, "] must be contiguous ", sdt, " with ", n, " elements");
      if (!lion)
        TORCH_CHECK(state2[t].scalar_type() == sdt && state2[t].numel() == n && state2[t].is_contiguous(),
                    "state2[", t, "] must be contiguous ", sdt, " with ", n, " elements");
      const int64_t blocks = ceil_div(n, kBlock);
      if (quant) {
        TORCH_CHECK(absmax1[t].scalar_type() == at::kFloat && absmax1[t].numel() == blocks, "absmax1[", t,
                    "] must be fp32 with ", blocks, " entries");
        if (!lion)
          TORCH_CHECK(absmax2[t].scalar_type() == at::kFloat && absmax2[t].numel() == blocks, "absmax2[", t,
                      "] must be fp32 with ", blocks, " entries");
      }
      rows.push_back({reinterpret_cast<int64_t>(p.data_ptr()), reinterpret_cast<int64_t>(grads[t].data_ptr()),
                      reinterpret_cast<int64_t>(state1[t].data_ptr()),
                      lion ? 0 : reinterpret_cast<int64_t>(state2[t].data_ptr()),
                      quant ? reinterpret_cast<int64_t>(absmax1[t].data_ptr()) : 0,
                      (quant && !lion) ? reinterpret_cast<int64_t>(absmax2[t].data_ptr()) : 0, n, t});
      starts.push_back(total);
      total += blocks;
    }
    if (rows.empty()) continue;
    starts.push_back(total);
    const int64_t nt = static_cast<int64_t>(rows.size());
    // table + starts, staged in pinned memory and copied asynchronously on the current stream (no host sync;
    // Tensor::to records the copy with the caching host allocator, so the staging buffer is not reused early)
    const int64_t words = nt * 8 + (nt + 1);
    at::Tensor host = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    int64_t* h = host.data_ptr<int64_t>();
    std::memcpy(h, rows.data(), nt * sizeof(TensorRow));
    std::memcpy(h + nt * 8, starts.data(), (nt + 1) * sizeof(int64_t));
    const at::Tensor dev = host.to(p0.device(), /*non_blocking=*/true);
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    if (capture != cudaStreamCaptureStatusNone) {
      // a CUDA graph replays this copy from the same host address: keep the staging buffer alive for good
      // (torch >= 2.11's host allocator also never recycles blocks used in a capture; 72 bytes per tensor)
      static std::vector<at::Tensor> captured_tables;
      captured_tables.push_back(host);
    }
    const auto* d = dev.data_ptr<int64_t>();
    const float* hy = hyper.data_ptr<float>();
    const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
    const auto* rows_d = reinterpret_cast<const TensorRow*>(d);
    const int64_t* starts_d = d + nt * 8;
    QPEFT_DISPATCH_FLOAT(dt, "optim_8bit_step_out", [&] {
      launch<scalar_t>(quant, lion, total, stream, rows_d, starts_d, static_cast<int>(nt), hy,
                       qmap1.data_ptr<float>(), qmap2.data_ptr<float>(), b1, b2);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace qpeft
