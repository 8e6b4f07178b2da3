// Multi-LoRA over a mixed batch (python/qpeft/ops/multi_lora.py has the math and the pool layout):
//   shrink: xa[i, :r_a] = x[i] A_a^T (fp32, zeros past r_a and for rows without an adapter)
//   expand: out[i] = y[i] + scale[a] * xa[i, :r_a] B_a^T (fp32, rounded once)
// Row kernels (Punica's BGMV shape): one CTA per (row, rank group) / (row, 256 outputs); each row reads only
// its own adapter's r_a rows of A_cat / columns of B_cat (no padding to the largest rank). They serve decode
// and prefill alike; a segmented tensor-core kernel for long prefills is the Triton path's (not written in
// C++). No host sync: slots, ranks and scales are read on the device; an out-of-range slot means "no adapter".
#include "common.h"
#include "ops.h"

namespace qpeft {
namespace {

constexpr int kWarps = 8;     // shrink: one warp per rank column, 8 per CTA
constexpr int kExpandN = 256;  // expand: one thread per output column

__device__ __forceinline__ int64_t load_slot(const void* index, bool idx64, int64_t row) {
  return idx64 ? static_cast<const int64_t*>(index)[row] : static_cast<const int32_t*>(index)[row];
}

template <typename T>
__global__ void shrink_rows_kernel(const T* __restrict__ x, const void* __restrict__ A, int a_tag,
                                   const int32_t* __restrict__ rank_start, const void* __restrict__ index, bool idx64,
                                   float* __restrict__ xa, int64_t K, int64_t L, int64_t max_rank) {
  const int64_t row = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r = int64_t(blockIdx.y) * kWarps + warp;
  if (r >= max_rank) return;
  const int64_t slot = load_slot(index, idx64, row);
  float acc = 0.f;
  if (slot >= 0 && slot < L) {
    const int64_t lo = rank_start[slot], rank = rank_start[slot + 1] - lo;
    if (r < rank) {
      const T* xr = x + row * K;
      const int64_t arow = (lo + r) * K;
      for (int64_t k = lane; k < K; k += 32) acc += Cvt<T>::to_f(xr[k]) * load_tagged(A, a_tag, arow + k);
      for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    }
  }
  if (lane == 0) xa[row * max_rank + r] = acc;  // every (row, r < max_rank) is written: no memset needed
}

template <typename T>
__global__ void expand_rows_kernel(const T* __restrict__ y, const float* __restrict__ xa, const void* __restrict__ B,
                                   int b_tag, const int32_t* __restrict__ rank_start, const float* __restrict__ scale,
                                   const void* __restrict__ index, bool idx64, T* __restrict__ out, int64_t N,
                                   int64_t R, int64_t L, int64_t max_rank) {
  const int64_t row = blockIdx.x;
  const int64_t n = int64_t(blockIdx.y) * kExpandN + threadIdx.x;
  if (n >= N) return;
  float acc = Cvt<T>::to_f(y[row * N + n]);
  const int64_t slot = load_slot(index, idx64, row);
  if (slot >= 0 && slot < L) {
    const int64_t lo = rank_start[slot], rank = rank_start[slot + 1] - lo;
    const float* v = xa + row * max_rank;
    float lora = 0.f;
    for (int64_t r = 0; r < rank; ++r) lora += v[r] * load_tagged(B, b_tag, n * R + lo + r);
    acc += scale[slot] * lora;
  }
  out[row * N + n] = Cvt<T>::from_f(acc);
}

void check_pool(const at::Tensor& x, const at::Tensor& rank_start, const at::Tensor& index, const char* op) {
  QPEFT_CHECK_SAME_DEVICE(rank_start, x, "rank_start", "x");
  QPEFT_CHECK_SAME_DEVICE(index, x, "index", "x");
  QPEFT_CHECK_DTYPE(rank_start, at::kInt, "rank_start");
  QPEFT_CHECK_CONTIGUOUS(rank_start, "rank_start");
  QPEFT_CHECK_CONTIGUOUS(index, "index");
  TORCH_CHECK(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong, op,
              ": index must be int32 or int64, got ", index.scalar_type());
  TORCH_CHECK(index.dim() == 1 && index.size(0) == x.size(0), op, ": index must have shape (", x.size(0),
              ",), got ", index.sizes());
  TORCH_CHECK(rank_start.dim() == 1 && rank_start.size(0) >= 1, op, ": rank_start must be 1-D (L + 1,), got ",
              rank_start.sizes());
}

}  // namespace

void lora_shrink_gathered_out(const at::Tensor& x, const at::Tensor& A_cat, const at::Tensor& rank_start,
                              const at::Tensor& index, at::Tensor& xa) {
  check_activation(x, "x");
  const int64_t M = x.size(0), K = x.size(1);
  QPEFT_CHECK_SAME_DEVICE(A_cat, x, "A_cat", "x");
  QPEFT_CHECK_FLOAT(A_cat, "A_cat");
  QPEFT_CHECK_CONTIGUOUS(A_cat, "A_cat");
  TORCH_CHECK(A_cat.dim() == 2 && A_cat.size(1) == K, "A_cat must be (R, ", K, "), got ", A_cat.sizes());
  check_pool(x, rank_start, index, "lora_shrink_gathered_out");
  QPEFT_CHECK_SAME_DEVICE(xa, x, "xa", "x");
  QPEFT_CHECK_DTYPE(xa, at::kFloat, "xa");
  QPEFT_CHECK_CONTIGUOUS(xa, "xa");
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == M && xa.size(1) >= 1, "xa must be (", M, ", max_rank), got ",
              xa.sizes());
  const int64_t max_rank = xa.size(1), L = rank_start.size(0) - 1;
  if (M == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>(ceil_div(max_rank, kWarps)));
  QPEFT_DISPATCH_FLOAT(x.scalar_type(), "lora_shrink_gathered_out", [&] {
    shrink_rows_kernel<scalar_t><<<grid, kWarps * 32, 0, stream>>>(
        static_cast<const scalar_t*>(x.data_ptr()), A_cat.data_ptr(), dtype_tag(A_cat.scalar_type()),
        rank_start.data_ptr<int32_t>(), index.data_ptr(), index.scalar_type() == at::kLong,
        xa.data_ptr<float>(), K, L, max_rank);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void lora_expand_gathered_out(const at::Tensor& y, const at::Tensor& xa, const at::Tensor& B_cat,
                              const at::Tensor& rank_start, const at::Tensor& scale, const at::Tensor& index,
                              at::Tensor& out) {
  check_activation(y, "y");
  const int64_t M = y.size(0), N = y.size(1);
  check_output(out, "out", y, "y", M);
  TORCH_CHECK(out.size(1) == N, "out must be (", M, ", ", N, "), got ", out.sizes());
  QPEFT_CHECK_SAME_DEVICE(xa, y, "xa", "y");
  QPEFT_CHECK_DTYPE(xa, at::kFloat, "xa");
  QPEFT_CHECK_CONTIGUOUS(xa, "xa");
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == M, "xa must be (", M, ", max_rank), got ", xa.sizes());
  QPEFT_CHECK_SAME_DEVICE(B_cat, y, "B_cat", "y");
  QPEFT_CHECK_FLOAT(B_cat, "B_cat");
  QPEFT_CHECK_CONTIGUOUS(B_cat, "B_cat");
  TORCH_CHECK(B_cat.dim() == 2 && B_cat.size(0) == N, "B_cat must be (", N, ", R), got ", B_cat.sizes());
  check_pool(y, rank_start, index, "lora_expand_gathered_out");
  QPEFT_CHECK_SAME_DEVICE(scale, y, "scale", "y");
  QPEFT_CHECK_DTYPE(scale, at::kFloat, "scale");
  QPEFT_CHECK_CONTIGUOUS(scale, "scale");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == rank_start.size(0) - 1, "scale must be (",
              rank_start.size(0) - 1, ",) (one per adapter), got ", scale.sizes());
  if (M == 0 || N == 0) return;
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>(ceil_div(N, kExpandN)));
  QPEFT_DISPATCH_FLOAT(y.scalar_type(), "lora_expand_gathered_out", [&] {
    expand_rows_kernel<scalar_t><<<grid, kExpandN, 0, stream>>>(
        static_cast<const scalar_t*>(y.data_ptr()), xa.data_ptr<float>(), B_cat.data_ptr(),
        dtype_tag(B_cat.scalar_type()), rank_start.data_ptr<int32_t>(), scale.data_ptr<float>(), index.data_ptr(),
        index.scalar_type() == at::kLong, static_cast<scalar_t*>(out.data_ptr()), N, B_cat.size(1),
        rank_start.size(0) - 1, xa.size(1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace qpeft
