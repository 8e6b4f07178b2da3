"""Mixture-of-experts models in 4 bits (issue 24): transformers 5's fused experts parameters
(`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`; gpt-oss transposed with biases) quantized to
NF4/FP4 one expert at a time, and the experts implementation that runs them through the grouped NF4 GEMM.

Kept here: finding and converting a model's experts (`convert.py`; used by the transformers quantizer in
`integrations/transformers.py` and by `quantize_model_experts`) and the "qpeft" experts implementation registered
with transformers' `ExpertsInterface` (`interface.py`). The storage and the on-disk format of 4-bit experts are
`qpeft.modules.nf4_experts`; the grouped GEMM is the op-stack stem `grouped_nf4`; LoRA on the experts is
`integrations/peft_experts.py`. transformers is imported only when the implementation is registered or a dense
module falls back to transformers' own implementation.
"""
from ...modules.nf4_experts import NF4ExpertsMixin
from .convert import (ExpertsTarget, dequantize_experts_module, find_experts, is_experts_module,
                      quantize_experts_module, quantize_model_experts)
from .interface import EXPERTS_IMPLEMENTATION, qpeft_experts_forward, register_experts_implementation

# 4-bit experts run only with this implementation (NF4ExpertsMixin.forward refuses another one)
NF4ExpertsMixin.experts_implementation = EXPERTS_IMPLEMENTATION

__all__ = ["quantize_model_experts", "qpeft_experts_forward", "register_experts_implementation",
           "EXPERTS_IMPLEMENTATION", "find_experts", "is_experts_module", "quantize_experts_module",
           "dequantize_experts_module", "ExpertsTarget"]
