"""The "qpeft" experts implementation: transformers' fused-experts forward on 4-bit experts, registered through
transformers' own `ExpertsInterface`, so the model code is untouched.

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=QPeftConfig())  # sets "qpeft" itself
    model.set_experts_implementation("qpeft")   # or from_pretrained(..., experts_implementation="qpeft")

transformers' `@use_experts_implementation` replaces each experts class's forward by a dispatcher that calls
`ALL_EXPERTS_FUNCTIONS[config._experts_implementation](self, hidden_states, top_k_index, top_k_weights)`.
`qpeft_experts_forward` is that function: on a module holding 4-bit experts it runs
`qpeft.grouped_nf4_experts` (tokens sorted by expert on the device, one grouped NF4 GEMM per projection, LoRA per
expert segment inside the same kernels); on a dense experts module (one kept in full precision by
`modules_to_not_convert`) it runs transformers' `grouped_mm` implementation.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ...autograd.grouped_nf4 import ExpertsLoRA, grouped_nf4_experts
from ...modules.nf4_experts import is_nf4_experts
from .convert import experts_params

__all__ = ["EXPERTS_IMPLEMENTATION", "qpeft_experts_forward", "register_experts_implementation"]

EXPERTS_IMPLEMENTATION = "qpeft"


def _dense_fallback(module, hidden_states, top_k_index, top_k_weights):
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ALL_EXPERTS_FUNCTIONS["grouped_mm"](module, hidden_states, top_k_index, top_k_weights)


def qpeft_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor, gate_up_lora: ExpertsLoRA | None = None,
                          down_lora: ExpertsLoRA | None = None) -> torch.Tensor:
    """transformers' experts forward (self, hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k)) -> (T, H)
    on 4-bit experts. gate_up_lora / down_lora: LoRA on the experts (qpeft's PEFT layer passes PEFT's
    `target_parameters` adapters here as per-expert views).

    Expert ids must be in [0, num_experts): an id outside raises ValueError (CPU) or trips a device-side assert
    (CUDA), except on a module transformers marked expert-parallel (`_is_expert_parallel`), whose sentinel ids
    (>= num_experts, tokens routed to another rank) are masked out as transformers' own implementations do."""
    if not is_nf4_experts(self):
        if gate_up_lora is not None or down_lora is not None:
            raise ValueError("qpeft_experts_forward: LoRA arguments are for 4-bit experts; this module is dense")
        return _dense_fallback(self, hidden_states, top_k_index, top_k_weights)
    up_name, down_name = experts_params(self)
    gate_up, down = self.nf4_weight(up_name), self.nf4_weight(down_name)
    x = hidden_states
    if torch.is_autocast_enabled(x.device.type):  # the kernels run in the autocast dtype, as nn.Linear would
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if getattr(self, "_is_expert_parallel", False):
        # transformers' expert parallelism routes a token to a sentinel id (>= num_experts) when its expert lives on
        # another rank, with weight 0: compute those slots on expert 0 and drop them (batched_mm's rule)
        sentinel = top_k_index >= gate_up.num_experts
        top_k_index = top_k_index.masked_fill(sentinel, 0)
        top_k_weights = top_k_weights.masked_fill(sentinel, 0.0)
    gate_up_bias = down_bias = None
    if getattr(self, "has_bias", False):
        gate_up_bias, down_bias = getattr(self, f"{up_name}_bias"), getattr(self, f"{down_name}_bias")
    apply_gate = self._apply_gate if getattr(self, "has_gate", True) else self.act_fn
    post_norm = self.post_expert_norm if getattr(self, "has_post_expert_norm", False) else None
    out = grouped_nf4_experts(x, top_k_index, top_k_weights, gate_up, down, gate_up_bias=gate_up_bias,
                              down_bias=down_bias, apply_gate=apply_gate, gate_up_lora=gate_up_lora,
                              down_lora=down_lora, post_expert_norm=post_norm)
    return out.to(hidden_states.dtype)


def register_experts_implementation() -> str:
    """Register "qpeft" in transformers' ExpertsInterface (idempotent; needs transformers). Returns the name."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if ALL_EXPERTS_FUNCTIONS.get(EXPERTS_IMPLEMENTATION) is not qpeft_experts_forward:
        ExpertsInterface.register(EXPERTS_IMPLEMENTATION, qpeft_experts_forward)
    return EXPERTS_IMPLEMENTATION
