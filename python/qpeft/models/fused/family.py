"""What `qpeft.fuse` needs to know about one transformers model family: the class names it swaps, the RMSNorm form,
the MLP's activation, what the attention hands to transformers' attention function, the final-logit softcap.

Each family module (llama.py, mistral.py, qwen2.py, qwen3.py, gemma2.py, gemma3.py) defines one `Family` (listed
in registry.py), read off
that family's modeling file in transformers 5.17 and 5.25 (the two ends CI tests; the attention forward is the
same in both but for the cache argument's name, `past_key_values` -> `cache`, which the fused path never takes:
with a cache it runs transformers' own forward). Nothing here imports transformers: a Family names classes, and
`classes()` resolves them when `fuse` runs.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

__all__ = ["Family"]


def _no_extra_attention_kwargs(attn: nn.Module) -> dict:
    return {}


def _no_softcap(config) -> float | None:
    return None


@dataclass(frozen=True)
class Family:
    """One model family as `fuse` sees it.

    name: what messages call it. modeling: the transformers module that defines the classes. causal_lm,
    decoder_layer, attention, mlp, norm: class names in it. norm_eps: the RMSNorm's epsilon attribute
    (`variance_epsilon` or `eps`); norm_offset / norm_casting: qpeft.rms_norm's form of it (Llama: 0.0, "llama";
    Gemma: 1.0, "gemma"). activation: the config attribute naming the MLP's activation (ACT2FN key).
    qk_norm: the attention normalises q and k over the head dimension (q_norm / k_norm) before RoPE.
    attention_kwargs(attn): what the family passes to the attention function beyond dropout and scaling
    (sliding_window, Gemma 2's attention softcap), from the attention module. final_softcap(config): the
    final-logit softcap its CausalLM applies before the loss (None: none).
    """

    name: str
    modeling: str
    causal_lm: str
    decoder_layer: str
    attention: str
    mlp: str
    norm: str
    norm_eps: str = "variance_epsilon"
    norm_offset: float = 0.0
    norm_casting: str = "llama"
    activation: str = "hidden_act"
    qk_norm: bool = False
    attention_kwargs: Callable[[nn.Module], dict] = field(default=_no_extra_attention_kwargs)
    final_softcap: Callable[[object], float | None] = field(default=_no_softcap)

    def module(self):
        return importlib.import_module(self.modeling)

    def classes(self) -> dict[str, type]:
        """{role: the transformers class} for the roles causal_lm, decoder_layer, attention, mlp, norm."""
        mod = self.module()
        return {role: getattr(mod, getattr(self, role))
                for role in ("causal_lm", "decoder_layer", "attention", "mlp", "norm")}
