"""The families `qpeft.fuse` supports, and which one a model is."""
from __future__ import annotations

import torch.nn as nn

from .family import Family
from .gemma2 import GEMMA2
from .gemma3 import GEMMA3
from .llama import LLAMA
from .mistral import MISTRAL
from .qwen2 import QWEN2
from .qwen3 import QWEN3

__all__ = ["FAMILIES", "family_of", "original_class"]

FAMILIES: tuple[Family, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3)


def original_class(module: nn.Module) -> type:
    """The transformers class of a module, fused or not (a fused module's class is a subclass made by fuse)."""
    return getattr(type(module), "_qpeft_original", None) or type(module)


def family_of(model: nn.Module) -> Family | None:
    """The family whose CausalLM class `model` is exactly (a user's subclass may have changed the forward that
    fuse replaces), or None."""
    cls = original_class(model)
    for fam in FAMILIES:
        if cls.__name__ == fam.causal_lm and cls.__module__ == fam.modeling:
            return fam
    return None
