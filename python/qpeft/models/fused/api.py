"""`qpeft.fuse(model)` / `qpeft.unfuse(model)`: the fused training path swapped into a transformers model.

    model = AutoModelForCausalLM.from_pretrained(..., quantization_config=qpeft.QPeftConfig(fuse=True))  # or:
    qpeft.fuse(model)                                  # before or after get_peft_model / prepare_for_qlora
    loss = model(input_ids=ids, labels=ids).loss       # no logits: linear_cross_entropy from the hidden states
    qpeft.unfuse(model)                                # every module back to its transformers class

Families (models/fused/<family>.py): Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 2, Gemma 3 (text) CausalLMs, found
anywhere in `model` (a PeftModel's base model too). Bases: nn.Linear, QLinearNF4 or bitsandbytes Linear4bit,
with qpeft's or PEFT's LoRA layers or none. What is fused and what stays transformers': layers.py and causal_lm.py;
why a module may run unfused: projections.py. transformers is imported when fuse is called, not before.
"""
from __future__ import annotations

import warnings

import torch.nn as nn

from ... import _versions
from ...reference.swiglu import glu_activation_name
from .causal_lm import fused_causal_lm_forward
from .layers import (STATE_ATTR, FusedAttention, FusedFallbackWarning, FusedGatedMLP, FusedRMSNorm, FuseState,
                     OffloadingDecoderLayer, fused_class)
from .registry import FAMILIES, family_of, original_class

__all__ = ["fuse", "unfuse", "FusedFallbackWarning"]

# The transformers releases whose modeling files the fused forwards were read off and that CI runs (image and
# latest lanes). Newer releases get a warning: the attention forward is re-implemented per family.
TESTED_TRANSFORMERS = ("5.17", "5.25")


class _FusedCausalLM:
    """The CausalLM mixin; its forward is made per class (fused_causal_lm_forward wraps the class's own)."""


_MIXINS = {"norm": FusedRMSNorm, "mlp": FusedGatedMLP, "attention": FusedAttention,
           "decoder_layer": OffloadingDecoderLayer, "causal_lm": _FusedCausalLM}


def _causal_lm_forward(cls: type) -> dict:
    return {"forward": fused_causal_lm_forward(cls.forward)}


_warned_release: set[str] = set()


def _check_release() -> None:
    version = _versions.require("transformers")
    newest = _versions.parse(TESTED_TRANSFORMERS[-1])
    if _versions.parse(version)[:2] > newest[:2] and version not in _warned_release:
        _warned_release.add(version)
        warnings.warn(f"qpeft.fuse: transformers {version} is newer than the releases its fused attention and "
                      f"CausalLM forwards were written against and tested with ({', '.join(TESTED_TRANSFORMERS)}); "
                      f"compare a few losses with qpeft.unfuse(model) before relying on it", RuntimeWarning,
                      stacklevel=3)


def _unsupported(model: nn.Module) -> TypeError:
    supported = ", ".join(f.causal_lm for f in FAMILIES)
    found = [f"{type(m).__name__} (model_type {getattr(getattr(m, 'config', None), 'model_type', '?')!r})"
             for m in model.modules() if hasattr(m, "config") and hasattr(m, "base_model_prefix")][:1]
    what = found[0] if found else type(model).__name__
    return TypeError(f"qpeft.fuse: {what} is not a model fuse supports; it takes {supported} (also inside a "
                     f"PeftModel). Train it unfused (its own forward), or add a family in qpeft/models/fused/")


def check_fusable(model: nn.Module) -> list:
    """[(CausalLM module, its Family)] of the CausalLMs fuse would swap in `model`; TypeError naming what it found
    and what fuse takes when there is none (QPeftConfig(fuse=True) asks before the weights are read)."""
    targets = [(m, fam) for m in model.modules() if (fam := family_of(m)) is not None]
    if not targets:
        raise _unsupported(model)
    return targets


def fuse(model: nn.Module, *, offload_checkpoints: bool = False) -> nn.Module:
    """Swap qpeft's fused training path into every supported CausalLM in `model`, in place; returns `model`.

    Fused: every RMSNorm (qpeft.rms_norm), each MLP as one LoRA block over gate/up/down (qpeft.lora_mlp), each
    attention's q/k/v as one LoRA block (qpeft.lora_qkv) with in-place RoPE (qpeft.apply_rotary_pos_emb), and the
    loss: with `labels`, the CausalLM forward returns the loss from qpeft.linear_cross_entropy and no logits (same
    shift, ignore_index, num_items_in_batch and softcap as transformers). Unchanged: the attention function
    (eager / sdpa / flash, as configured), o_proj, embeddings, the forward without labels and generation.
    Modules keep their parameters, children and state-dict keys; LoRA may be added before or after (PEFT's
    get_peft_model, qpeft's add_lora / prepare_for_qlora), on nn.Linear, QLinearNF4 or bitsandbytes bases.
    A module the fused path cannot serve exactly (a trainable base weight, DoRA, forward hooks, a custom loss,
    logits_to_keep, ...) runs its own forward, with one FusedFallbackWarning per reason.

    offload_checkpoints: under gradient checkpointing, keep each decoder layer's checkpointed input in pinned
        host memory until the backward needs it (models/fused/offload.py); a no-op on the CPU.
    Calling fuse again updates the option. Raises TypeError (changing nothing) when `model` holds no supported
    CausalLM, naming what it found.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"qpeft.fuse: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(offload_checkpoints, bool):
        raise TypeError(f"qpeft.fuse: offload_checkpoints must be True or False, got {offload_checkpoints!r}")
    _check_release()
    targets = check_fusable(model)
    for lm, fam in targets:
        _fuse_causal_lm(lm, fam, offload_checkpoints)
    return model


def _fuse_causal_lm(lm: nn.Module, fam, offload_checkpoints: bool) -> None:
    state = FuseState(fam, offload_checkpoints)
    roles = {cls: role for role, cls in fam.classes().items()}
    mlp_ok = True
    try:
        glu_activation_name(getattr(lm.config, fam.activation))
    except ValueError as e:
        mlp_ok = False
        state.fallback(fam.mlp, f"its activation: {e}")
    for module in lm.modules():
        cls = original_class(module)
        role = roles.get(cls)
        if role is None:
            continue
        if (role == "decoder_layer" and not offload_checkpoints) or (role == "mlp" and not mlp_ok):
            _restore(module)
            continue
        extra = _causal_lm_forward if role == "causal_lm" else None
        module.__class__ = fused_class(cls, _MIXINS[role], extra)
        module.__dict__[STATE_ATTR] = state


def _restore(module: nn.Module) -> None:
    original = getattr(type(module), "_qpeft_original", None)
    if original is not None:
        module.__class__ = original
    module.__dict__.pop(STATE_ATTR, None)


def unfuse(model: nn.Module) -> nn.Module:
    """Undo `fuse`: every swapped module gets its transformers class back (exactly that class); returns `model`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"qpeft.unfuse: model must be an nn.Module, got {type(model).__name__}")
    for module in model.modules():
        _restore(module)
    return model


def is_fused(model: nn.Module) -> bool:
    """Whether any module of `model` runs a fused forward."""
    return any(STATE_ATTR in m.__dict__ for m in model.modules())
