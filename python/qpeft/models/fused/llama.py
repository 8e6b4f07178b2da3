"""Llama (LlamaForCausalLM: Llama 2/3/3.1/3.2, and the many checkpoints that reuse its architecture).

RMSNorm: fp32 normalisation, rounded to the input dtype, then times the weight (casting "llama"). MLP: SwiGLU
(config.hidden_act "silu"). Attention: q/k/v, RoPE from the model's cos/sin, the attention function with dropout
and scaling only. Loss: ForCausalLMLoss on the logits, no softcap."""
from __future__ import annotations

from .family import Family

LLAMA = Family(name="llama", modeling="transformers.models.llama.modeling_llama", causal_lm="LlamaForCausalLM",
               decoder_layer="LlamaDecoderLayer", attention="LlamaAttention", mlp="LlamaMLP", norm="LlamaRMSNorm")
