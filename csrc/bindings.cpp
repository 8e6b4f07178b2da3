// Raw CUDA ops of qpeft, namespace `qpeft_C::` (Python owns `qpeft::`; only one TORCH_LIBRARY may
// define a namespace, and this split keeps the Python fakes importable before any build).
//
// Destination passing (vLLM style): outputs are `Tensor(a!)` arguments and the ops return `()`.
// The public L2 ops in python/qpeft/ops/ allocate the outputs (their fakes match those allocations)
// and call these, so nothing here allocates and every op is CUDA-graph capturable.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(qpeft_C, m) {
  m.def("quantize_4bit_out(Tensor A, int blocksize, str quant_type, Tensor(a!) packed, Tensor(b!) absmax) -> ()");
  m.def("dequantize_4bit_out(Tensor packed, Tensor absmax, Tensor code, int blocksize, Tensor(a!) out) -> ()");
  m.def("quantize_blockwise_out(Tensor A, Tensor code, int blocksize, Tensor(a!) q, Tensor(b!) absmax) -> ()");
  m.def("dequantize_blockwise_out(Tensor q, Tensor absmax, Tensor code, int blocksize, Tensor(a!) out) -> ()");
  m.def(
      "nf4_matmul_out(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, Tensor? nested_absmax, "
      "Tensor? nested_code, Tensor? offset, Tensor? bias, Tensor? lora_xa, Tensor? lora_B, float lora_scale, "
      "Tensor(a!) out) -> ()");
  m.def(
      "nf4_matmul_dx_out(Tensor dy, Tensor packed, Tensor absmax, Tensor code, int blocksize, "
      "Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, Tensor? lora_dyb, Tensor? lora_A, "
      "float lora_scale, Tensor(a!) dx) -> ()");
  m.def(
      "dense_lora_matmul_out(Tensor x, Tensor weight, Tensor? bias, Tensor xa, Tensor B, float scale, "
      "Tensor(a!) out) -> ()");
  m.def("lora_shrink_gathered_out(Tensor x, Tensor A_cat, Tensor rank_start, Tensor index, Tensor(a!) xa) -> ()");
  m.def(
      "lora_expand_gathered_out(Tensor y, Tensor xa, Tensor B_cat, Tensor rank_start, Tensor scale, Tensor index, "
      "Tensor(a!) out) -> ()");
  m.def(
      "optim_8bit_step_out(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, Tensor(c!)[] state2, "
      "Tensor(d!)[] absmax1, Tensor(e!)[] absmax2, Tensor qmap1, Tensor qmap2, Tensor hyper, float beta1, "
      "float beta2, str optimizer) -> ()");
  m.def("managed_prefetch(Tensor t, int device) -> ()");  // device -1: to the host
  // no tensor argument to dispatch on: registered with its (catch-all) kernel
  m.def("managed_concurrent_access(int device) -> bool", &qpeft::managed_concurrent_access);
}

TORCH_LIBRARY_IMPL(qpeft_C, CUDA, m) {
  m.impl("quantize_4bit_out", &qpeft::quantize_4bit_out);
  m.impl("dequantize_4bit_out", &qpeft::dequantize_4bit_out);
  m.impl("quantize_blockwise_out", &qpeft::quantize_blockwise_out);
  m.impl("dequantize_blockwise_out", &qpeft::dequantize_blockwise_out);
  m.impl("nf4_matmul_out", &qpeft::nf4_matmul_out);
  m.impl("nf4_matmul_dx_out", &qpeft::nf4_matmul_dx_out);
  m.impl("dense_lora_matmul_out", &qpeft::dense_lora_matmul_out);
  m.impl("lora_shrink_gathered_out", &qpeft::lora_shrink_gathered_out);
  m.impl("lora_expand_gathered_out", &qpeft::lora_expand_gathered_out);
  m.impl("optim_8bit_step_out", &qpeft::optim_8bit_step_out);
  m.impl("managed_prefetch", &qpeft::managed_prefetch);
}
