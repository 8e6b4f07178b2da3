// y = x @ W^T (+ bias + s * xa @ B^T) and dx = dy @ W (+ s * dyb @ A) for a 4-bit (NF4/FP4) weight
// W (N, K) in bitsandbytes' layout, fp32 or double-quantized absmax decoded in-kernel.
//
// Dispatch by M (rows of x):
//   Decode / small batch, nf4_gemv.cu, one pass over W: fp16 / bf16 with M <= 64, blocksize >= 64, K % 256 == 0
//     (every Llama shape) and 16-byte aligned x and W take the tensor-core kernel (mma.sync with W dequantized
//     into fragments through a register code book, split-K across the warps of a CTA); M <= 16 with K % 32 == 0
//     and aligned pointers otherwise the SIMT kernel (fp32, blocksize 32, K % 256 != 0). At these M the op is
//     bound by streaming W (4.127 bits per weight with double quant: an 8192 x 28672 layer is 121 MB of bf16 but
//     30 MB of NF4).
//   Otherwise: the tiled GEMM of tile_gemm.cuh (tensor cores for fp16/bf16, SIMT for fp32) that dequantizes W
//     tiles into shared memory in its main loop. On sm_90 the auto dispatch sends M > 16 to Triton (wgmma).
// dx always uses the tiled GEMM with transposed access (it is only needed in training, where M is the token
// count, in the thousands). The Python op warns once when a decode-sized call cannot take the fast kernels
// (qpeft/ops/nf4_matmul.py names the reason).
// No host synchronization and no allocation: every launch is CUDA-graph capturable.
#include "common.h"
#include "ops.h"
#include "tile_gemm.cuh"

namespace qpeft {

// ---------------------------------------------------------------- host-side validation
Weight4 make_weight4(const at::Tensor& ref, const at::Tensor& packed, const at::Tensor& absmax,
                     const at::Tensor& code, int64_t blocksize, int64_t rows, int64_t cols,
                     const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                     const std::optional<at::Tensor>& offset) {
  const int log2bs = check_blocksize(blocksize);
  const int64_t n = rows * cols;
  QPEFT_CHECK_DTYPE(packed, at::kByte, "packed");
  QPEFT_CHECK_SAME_DEVICE(packed, ref, "packed", "the activation");
  QPEFT_CHECK_CONTIGUOUS(packed, "packed");
  TORCH_CHECK(packed.numel() == (n + 1) / 2, "packed must hold (N*K+1)//2 = ", (n + 1) / 2, " bytes for W (", rows,
              ", ", cols, "), got shape ", packed.sizes());
  const int64_t blocks = ceil_div(n, blocksize);
  const bool has_nested = nested_absmax.has_value();
  TORCH_CHECK(has_nested == nested_code.has_value() && has_nested == offset.has_value(),
              "nested_absmax, nested_code and offset must be given together (double quant)");
  QPEFT_CHECK_DTYPE(absmax, has_nested ? at::kByte : at::kFloat, "absmax");
  QPEFT_CHECK_SAME_DEVICE(absmax, ref, "absmax", "the activation");
  QPEFT_CHECK_CONTIGUOUS(absmax, "absmax");
  TORCH_CHECK(absmax.numel() == blocks, "absmax must have ceil(N*K/blocksize) = ", blocks, " entries for W (", rows,
              ", ", cols, ") and blocksize ", blocksize, ", got shape ", absmax.sizes());
  QPEFT_CHECK_DTYPE(code, at::kFloat, "code");
  QPEFT_CHECK_SAME_DEVICE(code, ref, "code", "the activation");
  QPEFT_CHECK_CONTIGUOUS(code, "code");
  TORCH_CHECK(code.numel() == 16, "code must have 16 entries, got shape ", code.sizes());
  Weight4 w{};
  w.packed = packed.data_ptr<uint8_t>();
  w.code = code.data_ptr<float>();
  w.rows = rows;
  w.cols = cols;
  w.log2bs = log2bs;
  if (has_nested) {
    const at::Tensor& na = *nested_absmax;
    const at::Tensor& nc = *nested_code;
    const at::Tensor& of = *offset;
    QPEFT_CHECK_DTYPE(na, at::kFloat, "nested_absmax");
    QPEFT_CHECK_SAME_DEVICE(na, ref, "nested_absmax", "the activation");
    QPEFT_CHECK_CONTIGUOUS(na, "nested_absmax");
    TORCH_CHECK(na.numel() == ceil_div(blocks, 256), "nested_absmax must have ceil(blocks/256) = ",
                ceil_div(blocks, 256), " entries, got shape ", na.sizes());
    QPEFT_CHECK_DTYPE(nc, at::kFloat, "nested_code");
    QPEFT_CHECK_SAME_DEVICE(nc, ref, "nested_code", "the activation");
    QPEFT_CHECK_CONTIGUOUS(nc, "nested_code");
    TORCH_CHECK(nc.numel() == 256, "nested_code must have 256 entries, got shape ", nc.sizes());
    QPEFT_CHECK_DTYPE(of, at::kFloat, "offset");
    QPEFT_CHECK_SAME_DEVICE(of, ref, "offset", "the activation");
    TORCH_CHECK(of.numel() == 1, "offset must be a float32 scalar, got shape ", of.sizes());
    w.absmax_u8 = absmax.data_ptr<uint8_t>();
    w.nested_absmax = na.data_ptr<float>();
    w.nested_code = nc.data_ptr<float>();
    w.offset = of.data_ptr<float>();
  } else {
    w.absmax_f32 = absmax.data_ptr<float>();
  }
  w.nested = has_nested;
  return w;
}

// bias (Nout) and the LoRA pair rows (M, r) @ cols^T with cols (Nout, r), or (r, Nout) when transposed.
LoraEpilogue make_epilogue(const at::Tensor& a, int64_t M, int64_t Nout, const std::optional<at::Tensor>& bias,
                           const std::optional<at::Tensor>& rows, const char* rows_name,
                           const std::optional<at::Tensor>& cols, const char* cols_name, bool cols_transposed,
                           double scale) {
  LoraEpilogue ep;
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    QPEFT_CHECK_FLOAT(b, "bias");
    QPEFT_CHECK_SAME_DEVICE(b, a, "bias", "the activation");
    QPEFT_CHECK_CONTIGUOUS(b, "bias");
    TORCH_CHECK(b.dim() == 1 && b.size(0) == Nout, "bias must have shape (", Nout, ",), got ", b.sizes());
    ep.bias = b.data_ptr();
    ep.bias_tag = dtype_tag(b.scalar_type());
  }
  TORCH_CHECK(rows.has_value() == cols.has_value(), rows_name, " and ", cols_name, " must be given together");
  if (rows.has_value()) {
    const at::Tensor& R = *rows;
    const at::Tensor& C = *cols;
    QPEFT_CHECK_FLOAT(R, rows_name);
    QPEFT_CHECK_FLOAT(C, cols_name);
    QPEFT_CHECK_SAME_DEVICE(R, a, rows_name, "the activation");
    QPEFT_CHECK_SAME_DEVICE(C, a, cols_name, "the activation");
    QPEFT_CHECK_CONTIGUOUS(R, rows_name);
    QPEFT_CHECK_CONTIGUOUS(C, cols_name);
    TORCH_CHECK(R.dim() == 2 && R.size(0) == M, rows_name, " must be (", M, ", r), got shape ", R.sizes());
    const int64_t r = R.size(1);
    const int64_t want0 = cols_transposed ? r : Nout, want1 = cols_transposed ? Nout : r;
    TORCH_CHECK(C.dim() == 2 && C.size(0) == want0 && C.size(1) == want1, cols_name, " must be (", want0, ", ",
                want1, "), got shape ", C.sizes());
    ep.rows = R.data_ptr();
    ep.rows_tag = dtype_tag(R.scalar_type());
    ep.cols = C.data_ptr();
    ep.cols_tag = dtype_tag(C.scalar_type());
    ep.rank = r;
    ep.s_n = cols_transposed ? 1 : r;
    ep.s_r = cols_transposed ? Nout : 1;
    ep.scale = static_cast<float>(scale);
  }
  return ep;
}

void nf4_matmul_out(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                    const at::Tensor& code, int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                    const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lora_xa,
                    const std::optional<at::Tensor>& lora_B, double lora_scale, at::Tensor& out) {
  check_activation(x, "x");
  const int64_t M = x.size(0), K = x.size(1);
  check_output(out, "out", x, "x", M);
  const int64_t N = out.size(1);
  const Weight4 w = make_weight4(x, packed, absmax, code, blocksize, N, K, nested_absmax, nested_code, offset);
  const LoraEpilogue ep = make_epilogue(x, M, N, bias, lora_xa, "lora_xa", lora_B, "lora_B", false, lora_scale);
  if (M == 0 || N == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (nf4_decode_mma_applies(x, w) ||
      (M <= kGemvMaxM && K % 32 == 0 && aligned(packed.data_ptr(), 16) && aligned(x.data_ptr(), 16))) {
    launch_nf4_gemv(x, w, ep, out, stream);  // nf4_gemv.cu
  } else {
    QPEFT_DISPATCH_FLOAT(x.scalar_type(), "nf4_matmul_out", [&] {
      const auto* xp = reinterpret_cast<const scalar_t*>(x.data_ptr());
      auto* op = reinterpret_cast<scalar_t*>(out.data_ptr());
      TileArgs args{};
      args.A = xp;
      args.w = w;
      args.C = op;
      args.M = M;
      args.Nout = N;
      args.R = K;
      args.a_vec = K % 8 == 0 && aligned(xp, 16);
      args.b_vec = K % 16 == 0 && aligned(packed.data_ptr(), 8);
      args.ep = ep;
      launch_tile_gemm<scalar_t, kB4NK>(args, stream);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void nf4_matmul_dx_out(const at::Tensor& dy, const at::Tensor& packed, const at::Tensor& absmax,
                       const at::Tensor& code, int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                       const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                       const std::optional<at::Tensor>& lora_dyb, const std::optional<at::Tensor>& lora_A,
                       double lora_scale, at::Tensor& dx) {
  check_activation(dy, "dy");
  const int64_t M = dy.size(0), N = dy.size(1);
  check_output(dx, "dx", dy, "dy", M);
  const int64_t K = dx.size(1);
  const Weight4 w = make_weight4(dy, packed, absmax, code, blocksize, N, K, nested_absmax, nested_code, offset);
  const LoraEpilogue ep =
      make_epilogue(dy, M, K, std::nullopt, lora_dyb, "lora_dyb", lora_A, "lora_A", true, lora_scale);
  if (M == 0 || K == 0) return;
  const c10::cuda::CUDAGuard guard(dy.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  QPEFT_DISPATCH_FLOAT(dy.scalar_type(), "nf4_matmul_dx_out", [&] {
    TileArgs args{};
    args.A = dy.data_ptr();
    args.w = w;
    args.C = dx.data_ptr();
    args.M = M;
    args.Nout = K;
    args.R = N;
    args.a_vec = N % 8 == 0 && aligned(dy.data_ptr(), 16);
    args.b_vec = K % 16 == 0 && aligned(packed.data_ptr(), 8);
    args.ep = ep;
    launch_tile_gemm<scalar_t, kB4T>(args, stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace qpeft
