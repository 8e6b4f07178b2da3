"""Mixture-of-experts models in 4 bits (issue 24): transformers 5's fused experts parameters
(`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`; gpt-oss transposed with biases) quantized to
NF4/FP4 one expert at a time, and the experts implementation that runs them through the grouped NF4 GEMM.

Kept here: quantizing the experts of a model (used by `quantize_model` and the transformers quantizer in
`integrations/transformers.py`), their on-disk format, and the registration with transformers'
`ExpertsInterface`. The grouped GEMM is an op-stack stem; the 4-bit experts layer lives in `modules/`; LoRA on the
experts in `tuners/lora/` and `integrations/peft.py`. transformers is imported only when a model is converted.
"""
