"""Gemma 3, text (Gemma3ForCausalLM: the 1B checkpoints, and any Gemma3TextConfig).

Gemma 2's RMSNorm form (1 + w in fp32) and GeGLU MLP; the attention also normalises q and k over the head
dimension (q_norm / k_norm, Gemma3RMSNorm) before RoPE, gets its layer's sliding window, and has no attention
softcap; each layer type (sliding / full) has its own rotary embedding, which the model computes and passes in.
Loss: the final-logit softcap when the config sets one (None by default). The multimodal
Gemma3ForConditionalGeneration is not a family fuse takes (its loss masks by attention_mask)."""
from __future__ import annotations

from .family import Family


def _attention_kwargs(attn) -> dict:
    return {"sliding_window": attn.sliding_window}


def _final_softcap(config):
    return config.final_logit_softcapping


GEMMA3 = Family(name="gemma3", modeling="transformers.models.gemma3.modeling_gemma3", causal_lm="Gemma3ForCausalLM",
                decoder_layer="Gemma3DecoderLayer", attention="Gemma3Attention", mlp="Gemma3MLP",
                norm="Gemma3RMSNorm", norm_eps="eps", norm_offset=1.0, norm_casting="gemma",
                activation="hidden_activation", qk_norm=True, attention_kwargs=_attention_kwargs,
                final_softcap=_final_softcap)
