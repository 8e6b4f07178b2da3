"""Qwen2 / Qwen2.5 (Qwen2ForCausalLM): Llama's layers with biases on q/k/v, and the attention function also gets
the layer's `sliding_window` (None on full-attention layers)."""
from __future__ import annotations

from .family import Family


def _attention_kwargs(attn) -> dict:
    return {"sliding_window": attn.sliding_window}


QWEN2 = Family(name="qwen2", modeling="transformers.models.qwen2.modeling_qwen2", causal_lm="Qwen2ForCausalLM",
               decoder_layer="Qwen2DecoderLayer", attention="Qwen2Attention", mlp="Qwen2MLP", norm="Qwen2RMSNorm",
               attention_kwargs=_attention_kwargs)
