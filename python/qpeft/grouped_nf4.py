"""4-bit mixture-of-experts: quantize a fused-experts parameter one expert at a time, run the experts block.

    gate_up = qpeft.quantize_experts(experts.gate_up_proj)                  # (E, 2I, H) -> GroupedNF4Weight
    down = qpeft.quantize_experts(experts.down_proj)
    out = qpeft.grouped_nf4_experts(hidden_states, top_k_index, top_k_weights, gate_up, down)

gpt-oss stores its experts transposed ((E, H, 2I) / (E, I, H), i.e. (in, out) slices): pass transposed=True.
Each expert's slice is quantized on its own with `qpeft.quantize_4bit` (NF4/FP4, blockwise absmax, double
quant by default), so packed[e] / absmax[e] / ... are byte for byte bitsandbytes' Linear4bit quantization of
that (d1, d2) weight and only one expert's slice is ever converted at a time. The math, the layout and the
ops: qpeft.autograd.grouped_nf4, qpeft.reference.grouped_nf4, qpeft.ops.grouped_nf4.
"""
from __future__ import annotations

import torch

from .autograd.grouped_nf4 import (ExpertRouting, ExpertsLoRA, GroupedNF4Weight, gpt_oss_swiglu,
                                   grouped_nf4_experts, grouped_nf4_linear, peft_expert_lora, route_experts, swiglu)
from .quantize import quantize_4bit

__all__ = ["quantize_experts", "GroupedNF4Weight", "ExpertsLoRA", "ExpertRouting", "route_experts",
           "grouped_nf4_linear", "grouped_nf4_experts", "peft_expert_lora", "swiglu", "gpt_oss_swiglu"]


def quantize_experts(weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True,
                     transposed: bool = False) -> GroupedNF4Weight:
    """Quantize a fused-experts parameter (E, d1, d2) expert by expert into a GroupedNF4Weight on its device.

    transposed: False when a slice is (out, in) (Qwen/Mixtral/DeepSeek), True when (in, out) (gpt-oss).
    Each expert is converted and written into the preallocated stack before the next one is read, so the
    extra memory is one expert's slice plus its 4-bit form. A non-finite value raises ValueError naming the
    expert, and nothing is returned."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 3 or min(weight.shape) <= 0:
        raise ValueError(f"weight must be a non-empty (num_experts, d1, d2) fused-experts tensor, got shape "
                         f"{tuple(weight.shape)}")
    if weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}")
    out = GroupedNF4Weight.empty(weight.shape, blocksize, quant_type, double_quant, transposed, weight.dtype,
                                 weight.device)
    for e in range(weight.shape[0]):
        try:
            packed, state = quantize_4bit(weight[e], blocksize=blocksize, quant_type=quant_type,
                                          double_quant=double_quant)
        except ValueError as err:
            raise ValueError(f"quantize_experts: expert {e}: {err}") from None
        out.set_expert(e, packed, state)
    return out
