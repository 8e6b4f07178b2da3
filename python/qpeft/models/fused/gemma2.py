"""Gemma 2 (Gemma2ForCausalLM).

RMSNorm: weight stored as w, scale 1 + w, multiplied in fp32 and rounded once (offset 1.0, casting "gemma"); four
per layer (the post-attention and post-feedforward ones included). MLP: GeGLU (config.hidden_activation,
"gelu_pytorch_tanh"). Attention: query scale query_pre_attn_scalar^-0.5 (the module's `scaling`), the layer's
sliding window, and the attention-logit softcap (`attn_logit_softcapping`, 50) handed to the attention function
(the eager one applies it; SDPA cannot). Loss: logits capped at final_logit_softcapping (30):
c * tanh(logits / c), which qpeft.linear_cross_entropy applies blockwise (`softcap`)."""
from __future__ import annotations

from .family import Family


def _attention_kwargs(attn) -> dict:
    return {"sliding_window": attn.sliding_window, "softcap": attn.attn_logit_softcapping}


def _final_softcap(config):
    return config.final_logit_softcapping


GEMMA2 = Family(name="gemma2", modeling="transformers.models.gemma2.modeling_gemma2", causal_lm="Gemma2ForCausalLM",
                decoder_layer="Gemma2DecoderLayer", attention="Gemma2Attention", mlp="Gemma2MLP",
                norm="Gemma2RMSNorm", norm_eps="eps", norm_offset=1.0, norm_casting="gemma",
                activation="hidden_activation", attention_kwargs=_attention_kwargs, final_softcap=_final_softcap)
