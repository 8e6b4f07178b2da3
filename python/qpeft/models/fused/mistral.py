"""Mistral (MistralForCausalLM): Llama's layers, and the attention function also gets
`sliding_window=config.sliding_window` (the mask is built by the model; flash attention reads the window)."""
from __future__ import annotations

from .family import Family


def _attention_kwargs(attn) -> dict:
    return {"sliding_window": getattr(attn.config, "sliding_window", None)}


MISTRAL = Family(name="mistral", modeling="transformers.models.mistral.modeling_mistral",
                 causal_lm="MistralForCausalLM", decoder_layer="MistralDecoderLayer", attention="MistralAttention",
                 mlp="MistralMLP", norm="MistralRMSNorm", attention_kwargs=_attention_kwargs)
