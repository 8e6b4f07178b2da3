"""Qwen3 (Qwen3ForCausalLM): Qwen2's attention plus q_norm / k_norm (Qwen3RMSNorm over the head dimension, before
RoPE), without q/k/v biases by default (config.attention_bias)."""
from __future__ import annotations

from .family import Family


def _attention_kwargs(attn) -> dict:
    return {"sliding_window": attn.sliding_window}


QWEN3 = Family(name="qwen3", modeling="transformers.models.qwen3.modeling_qwen3", causal_lm="Qwen3ForCausalLM",
               decoder_layer="Qwen3DecoderLayer", attention="Qwen3Attention", mlp="Qwen3MLP", norm="Qwen3RMSNorm",
               qk_norm=True, attention_kwargs=_attention_kwargs)
