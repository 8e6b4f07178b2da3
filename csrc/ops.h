// Host launchers of the raw `qpeft_C::` ops (schemas in bindings.cpp and docs/ARCHITECTURE.md).
// Destination passing: every output is preallocated by the caller; launchers validate, pick a grid
// and launch on the current stream. They never allocate and never synchronize with the host, so
// they are safe inside CUDA graph capture.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>
#include <optional>

namespace qpeft {

void quantize_4bit_out(const at::Tensor& A, int64_t blocksize, c10::string_view quant_type,
                       at::Tensor& packed, at::Tensor& absmax);
void dequantize_4bit_out(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                         int64_t blocksize, at::Tensor& out);
void quantize_blockwise_out(const at::Tensor& A, const at::Tensor& code, int64_t blocksize, at::Tensor& q,
                            at::Tensor& absmax);
void dequantize_blockwise_out(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                              int64_t blocksize, at::Tensor& out);

void nf4_matmul_out(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                    const at::Tensor& code, int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                    const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lora_xa,
                    const std::optional<at::Tensor>& lora_B, double lora_scale, at::Tensor& out);
void nf4_matmul_dx_out(const at::Tensor& dy, const at::Tensor& packed, const at::Tensor& absmax,
                       const at::Tensor& code, int64_t blocksize, const std::optional<at::Tensor>& nested_absmax,
                       const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                       const std::optional<at::Tensor>& lora_dyb, const std::optional<at::Tensor>& lora_A,
                       double lora_scale, at::Tensor& dx);

void dense_lora_matmul_out(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& xa, const at::Tensor& B, double scale, at::Tensor& out);

void lora_shrink_gathered_out(const at::Tensor& x, const at::Tensor& A_cat, const at::Tensor& rank_start,
                              const at::Tensor& index, at::Tensor& xa);
void lora_expand_gathered_out(const at::Tensor& y, const at::Tensor& xa, const at::Tensor& B_cat,
                              const at::Tensor& rank_start, const at::Tensor& scale, const at::Tensor& index,
                              at::Tensor& out);
// qpeft.optim (optim_8bit.cu, paged_alloc.cu)
void optim_8bit_step_out(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                         at::TensorList absmax1, at::TensorList absmax2, const at::Tensor& qmap1,
                         const at::Tensor& qmap2, const at::Tensor& hyper, double beta1, double beta2,
                         c10::string_view optimizer);
void managed_prefetch(const at::Tensor& t, int64_t device);
bool managed_concurrent_access(int64_t device);

}  // namespace qpeft
