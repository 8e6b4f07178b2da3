// out = x @ weight^T + bias + scale * xa @ B^T for a dense (bf16/fp16/fp32) base weight, in one
// tiled GEMM (tile_gemm.cuh, kDense): the LoRA term is added to the fp32 accumulators in the
// epilogue, so the (M, N) base output is written once and rounded once (PEFT writes it, re-reads it
// for `+= lora`, and rounds twice). xa = dropout(x) @ A^T (M, r) is computed by the caller (it is
// also what backward needs for dB); xa / B / bias may be fp32 while x is bf16 (LoRA factors are often
// kept in fp32): they are read through a runtime dtype tag.
#include "common.h"
#include "ops.h"
#include "tile_gemm.cuh"

namespace qpeft {

void dense_lora_matmul_out(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& xa, const at::Tensor& B, double scale, at::Tensor& out) {
  check_activation(x, "x");
  const int64_t M = x.size(0), K = x.size(1);
  check_output(out, "out", x, "x", M);
  const int64_t N = out.size(1);
  QPEFT_CHECK_SAME_DEVICE(weight, x, "weight", "x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight must have x's dtype ", x.scalar_type(), ", got ",
              weight.scalar_type());
  QPEFT_CHECK_CONTIGUOUS(weight, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == N && weight.size(1) == K, "weight must be (", N, ", ", K,
              "), got shape ", weight.sizes());
  const LoraEpilogue ep = make_epilogue(x, M, N, bias, xa, "xa", B, "B", false, scale);
  if (M == 0 || N == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  QPEFT_DISPATCH_FLOAT(x.scalar_type(), "dense_lora_matmul_out", [&] {
    TileArgs args{};
    args.A = x.data_ptr();
    args.Bd = weight.data_ptr();
    args.C = out.data_ptr();
    args.M = M;
    args.Nout = N;
    args.R = K;
    args.a_vec = K % 8 == 0 && aligned(x.data_ptr(), 16);
    args.b_vec = K % 8 == 0 && aligned(weight.data_ptr(), 16);
    args.ep = ep;
    launch_tile_gemm<scalar_t, kDense>(args, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace qpeft
