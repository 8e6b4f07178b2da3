"""The fused forwards `fuse` gives a model's RMSNorm, MLP, attention and decoder-layer modules.

Each is a mixin placed in front of the module's own transformers class (`fused_class(cls, Mixin)`: a subclass that
keeps the class's name, made once per class): the module keeps its parameters, buffers, children and state-dict
keys, PEFT can still inject LoRA layers into its children (before or after fuse), and `unfuse` gives it its class
back. Where the fused path cannot honour a call exactly, the mixin runs the class's own forward (`super()`), with
one warning per reason and model (FusedFallbackWarning) when that is a loss of speed the user should know about:
- RMSNorm: always fused (qpeft.rms_norm, the family's upcast order).
- MLP: qpeft.lora_mlp over gate/up/down, when each is a projection it takes (projections.py); else transformers'.
- Attention: qpeft.lora_qkv for q/k/v, q_norm/k_norm (Qwen3, Gemma 3; themselves fused RMSNorms), qpeft's in-place
  RoPE on the model's own cos/sin, then transformers' attention function for the configured implementation (eager,
  sdpa, flash, flex: attention itself is transformers'), with what the family passes it, and o_proj as a module
  (PEFT's LoRA on it runs as PEFT's). With a KV cache (generation) it is transformers' forward, unchanged.
- Decoder layer (only with offload_checkpoints): a checkpointed call runs inside offloaded_saved_tensors().
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ...autograd.lora_mlp import lora_mlp
from ...autograd.lora_qkv import lora_qkv
from ...autograd.rmsnorm import rms_norm
from ...autograd.rope import apply_rotary_pos_emb
from .offload import offloaded_saved_tensors
from .projections import projection_of

__all__ = ["FusedFallbackWarning", "FuseState", "fused_class", "FusedRMSNorm", "FusedGatedMLP", "FusedAttention",
           "OffloadingDecoderLayer", "STATE_ATTR"]

STATE_ATTR = "_qpeft_fuse"  # on every swapped module: the model's FuseState


class FusedFallbackWarning(UserWarning):
    """A fused module ran transformers' own forward (correct, not fused) for the reason the message names."""


class FuseState:
    """What the swapped modules of one fused model share: its family, the options of fuse, and the reasons already
    warned about (each once per model)."""

    def __init__(self, family, offload_checkpoints: bool = False):
        self.family = family
        self.offload_checkpoints = bool(offload_checkpoints)
        self.warned: set[str] = set()

    def fallback(self, what: str, reason: str) -> None:
        """Warn (once) that `what` runs transformers' own forward for `reason`."""
        self.warn_once(f"{what} runs transformers' own forward (not fused): {reason}")

    def warn_once(self, message: str) -> None:
        import warnings

        message = f"qpeft.fuse: {message}"
        if message not in self.warned:
            self.warned.add(message)
            warnings.warn(message, FusedFallbackWarning, stacklevel=4)

    def __deepcopy__(self, memo):  # a deep copy of the model shares nothing mutable with the original
        new = FuseState(self.family, self.offload_checkpoints)
        new.warned = set(self.warned)
        return new


_CLASSES: dict[tuple[type, type], type] = {}


def fused_class(cls: type, mixin: type, extra=None) -> type:
    """The subclass (mixin, cls) that fuse gives a module of class `cls`, made once per (cls, mixin): named as
    `cls` (the Trainer and transformers look some classes up by name, e.g. for label smoothing's shift), with
    `_qpeft_original = cls`. extra(cls): further class attributes (the CausalLM's forward, which wraps the
    class's own)."""
    key = (cls, mixin)
    if key not in _CLASSES:
        attrs = {"__module__": mixin.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
                 "_qpeft_original": cls, **(extra(cls) if extra is not None else {})}
        _CLASSES[key] = type(cls.__name__, (mixin, cls), attrs)
    return _CLASSES[key]


def _projections(module: nn.Module, names: tuple[str, ...]):
    """[LoraProjection per child name], or the reason one of them cannot be fused."""
    projs = []
    for name in names:
        p = projection_of(getattr(module, name))
        if isinstance(p, str):
            return f"{name}: {p}"
        projs.append(p)
    return projs


class FusedRMSNorm:
    """RMSNorm through qpeft.rms_norm: Llama's form (round, then times w) or Gemma's ((1 + w) in fp32, round once)."""

    def forward(self, hidden_states):
        fam = self.__dict__[STATE_ATTR].family
        return rms_norm(hidden_states, self.weight, getattr(self, fam.norm_eps), fam.norm_offset, fam.norm_casting)


class FusedGatedMLP:
    """down(act(gate(x)) * up(x)) through qpeft.lora_mlp (one autograd node, LoRA of all three projections)."""

    def forward(self, x):
        state = self.__dict__[STATE_ATTR]
        projs = _projections(self, ("gate_proj", "up_proj", "down_proj"))
        if isinstance(projs, str):
            state.fallback(type(self).__name__, projs)
            return super().forward(x)
        activation = getattr(self.config, state.family.activation)
        return lora_mlp(x, *projs, activation=activation, training=self.training)


class FusedAttention:
    """The family's attention with q/k/v through qpeft.lora_qkv and qpeft's in-place RoPE (see the module doc)."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
        state = self.__dict__[STATE_ATTR]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None or args or position_embeddings is None:
            # generation (a KV cache), or a call transformers' layers do not make: the family's own forward
            return super().forward(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        projs = _projections(self, ("q_proj", "k_proj", "v_proj"))
        if isinstance(projs, str):
            state.fallback(type(self).__name__, projs)
            return super().forward(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        kwargs.pop("cache", None)
        kwargs.pop("past_key_values", None)
        fam = state.family
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v = lora_qkv(hidden_states, *projs, training=self.training)
        q, k, v = q.view(hidden_shape), k.view(hidden_shape), v.view(hidden_shape)
        if fam.qk_norm:  # over the head dimension: the same values in (B, S, h, D) as in (B, h, S, D)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        attention = _attention_function(self, fam)
        out, weights = attention(self, q, k, v, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, **fam.attention_kwargs(self), **kwargs)
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


def _attention_function(attn: nn.Module, family):
    """transformers' attention function for the model's implementation, the family's eager one by default (what
    the family's forward looks up)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                 family.module().eager_attention_forward)


class OffloadingDecoderLayer:
    """A decoder layer whose checkpointed calls keep their saved input in pinned host memory (offload.py).

    `__call__`, not `forward`: transformers checkpoints in `__call__` (5.17) or in a wrapper of `forward` (5.25);
    the offload context must enclose the checkpoint (inside it, it would offload every activation instead)."""

    def __call__(self, *args, **kwargs):
        state = self.__dict__[STATE_ATTR]
        if state.offload_checkpoints and self.training and torch.is_grad_enabled():
            if getattr(self, "gradient_checkpointing", False):
                with offloaded_saved_tensors():
                    return super().__call__(*args, **kwargs)
            state.warn_once("offload_checkpoints=True has no effect: gradient checkpointing is off, so there are no "
                            "checkpointed layer inputs to offload (model.gradient_checkpointing_enable(), or "
                            "TrainingArguments(gradient_checkpointing=True))")
        return super().__call__(*args, **kwargs)
