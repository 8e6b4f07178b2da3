"""Prompt tuning (Lester et al., 2021): trainable virtual-token embeddings prepended to the input embeddings.

PEFT-compatible: `save_adapter` writes peft_type PROMPT_TUNING with `prompt_embeddings` (n, hidden), which
`peft.PeftModel.from_pretrained` loads with identical outputs (and vice versa through `load_adapter`).
Encoder-decoder models (T5, BART): as PEFT, 2n virtual tokens are kept (and saved), the first n go before the
encoder input.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ._prompt_common import (
    EMBEDDINGS,
    PromptEncoder,
    PromptLearningModel,
    base_of,
    check_new_adapter,
    check_num_virtual_tokens,
    hidden_size,
    num_transformer_submodules,
    register_prompt_method,
    wrap,
)
from .adapter_io import load_adapter

__all__ = ["add_prompt_tuning", "PromptTuningEncoder", "PromptLearningModel", "load_prompt_adapter"]

_INITS = ("random", "vocab", "text")


class PromptTuningEncoder(PromptEncoder):
    """`embedding.weight`: (num_virtual_tokens * num_transformer_submodules, hidden) fp32, the prompt itself (no
    reparameterization). Encoder-decoder models: PEFT's 2n rows, of which the first n go before the encoder input."""

    kind = EMBEDDINGS
    peft_type = "PROMPT_TUNING"

    def __init__(self, num_virtual_tokens: int, hidden: int, init_weight: torch.Tensor | None = None,
                 init: str = "random", init_text: str | None = None, num_transformer_submodules: int = 1):
        super().__init__(num_virtual_tokens)
        # nn.Embedding's default init is N(0, 1), PEFT's PromptTuningInit.RANDOM.
        self.embedding = nn.Embedding(num_virtual_tokens * num_transformer_submodules, hidden)
        if init_weight is not None:
            self.embedding.weight = nn.Parameter(init_weight.detach().clone().float())
        self.init, self.init_text = init, init_text

    def prompt(self) -> torch.Tensor:
        return self.embedding.weight

    def peft_config(self) -> dict:
        return {"prompt_tuning_init": {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}[self.init],
                "prompt_tuning_init_text": self.init_text, "tokenizer_name_or_path": None,
                "tokenizer_kwargs": None}


def _text_token_ids(tokenizer, init_text: str, n: int) -> list[int]:
    ids = list(tokenizer(init_text)["input_ids"])
    if not ids:
        raise ValueError(f"init_text {init_text!r} tokenizes to no tokens")
    # PEFT: cut to n, or repeat ceil(n / len) times and cut.
    return (ids * math.ceil(n / len(ids)))[:n]


def add_prompt_tuning(model: nn.Module, num_virtual_tokens: int, init: str = "random",
                      init_text: str | None = None, tokenizer=None,
                      adapter_name: str = "default") -> PromptLearningModel:
    """Add prompt tuning to a Hugging Face model (decoder or encoder); returns the wrapper (base frozen).

    init: "random" (N(0, 1), PEFT's default), "vocab" (embeddings of uniformly sampled vocabulary ids) or
    "text" (embeddings of `init_text` tokenized by `tokenizer`, repeated or cut to num_virtual_tokens).
    """
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    if init == "text":
        if tokenizer is None:
            raise ValueError("init='text' needs a tokenizer (tokenizer=None was given)")
        if not isinstance(init_text, str) or not init_text:
            raise ValueError(f"init='text' needs a non-empty init_text, got {init_text!r}")
    elif init_text is not None:
        raise ValueError(f"init_text is only used with init='text' (init={init!r})")
    n = check_num_virtual_tokens(num_virtual_tokens)
    check_new_adapter(model, adapter_name)
    base = base_of(model, seq2seq=True)
    subs = num_transformer_submodules(base)
    total = n * subs  # PEFT's total_virtual_tokens: seq2seq adapters hold 2n rows
    embed = base.get_input_embeddings()
    weight = None
    if init == "vocab":
        ids = torch.randint(0, embed.num_embeddings, (total,), device=embed.weight.device)
        weight = embed(ids)
    elif init == "text":
        ids = torch.tensor(_text_token_ids(tokenizer, init_text, total), device=embed.weight.device)
        weight = embed(ids)
    enc = PromptTuningEncoder(n, hidden_size(base), weight, init, init_text, subs)
    wrapped = wrap(model)
    wrapped.add_adapter(adapter_name, enc.to(embed.weight.device))
    return wrapped


def load_prompt_adapter(model: nn.Module, path, adapter_name: str = "default") -> PromptLearningModel:
    """Load a PEFT/qpeft prompt-tuning, P-tuning or prefix-tuning adapter; wraps `model` if needed.

    A failed load leaves `model` as it was (no wrapper is returned, the base model is not frozen)."""
    if isinstance(model, PromptLearningModel):
        load_adapter(model, path, adapter_name)
        return model
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        wrapped = PromptLearningModel(model)
        load_adapter(wrapped, path, adapter_name)
    except Exception:
        for name, p in model.named_parameters():  # undo the freeze of the failed wrap
            p.requires_grad_(requires_grad[name])
        raise
    return wrapped


register_prompt_method("PROMPT_TUNING", EMBEDDINGS)
