"""Prefix tuning (Li & Liang, 2021): a trainable key/value prefix for every attention layer, injected through
the model's KV cache (`transformers.DynamicCache`), so it composes with `generate` and grouped-query attention
(prefix heads = KV heads, as in PEFT).

Optional reparameterization (`projection=True`): Embedding(n, kv_dim) -> Linear(kv_dim, h) -> Tanh ->
Linear(h, L * 2 * kv_dim), PEFT's `prefix_projection`; optional dropout on the prefix (P-tuning v2 applies
hidden_dropout_prob=0.1 there; PEFT none, the default here). `save_adapter` writes PEFT's PREFIX_TUNING file:
`prompt_embeddings` (n, L * 2 * kv_dim) after reparameterization.

Encoder-decoder models: the decoder's self-attention gets the prefix exactly as PEFT does; `encoder_prefix=True`
(opt-in, not representable in PEFT's format, so `save_adapter` refuses it) also gives every encoder self-attention
layer its own prefix, as Li & Liang do for BART (see `_prefix_hooks`).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ._prefix_hooks import encoder_kv_dims
from ._prompt_common import (
    PREFIX,
    PromptEncoder,
    PromptLearningModel,
    base_of,
    check_dropout,
    check_new_adapter,
    check_num_virtual_tokens,
    check_positive_int,
    check_prefix_support,
    is_encoder_decoder,
    kv_dims,
    model_type,
    register_prompt_method,
    wrap,
)

__all__ = ["add_prefix_tuning", "PrefixEncoder"]


class PrefixEncoder(PromptEncoder):
    """prompt(): (num_virtual_tokens, num_layers * 2 * kv_dim) in PEFT's layout (layer, K/V, head, head_dim).

    layers: indices that get a trainable prefix (P-tuning v2); None = all. Other layers get a zero prefix
    slot that the wrapper masks out of attention, so they behave exactly as the base model.
    """

    kind = PREFIX
    peft_type = "PREFIX_TUNING"

    def __init__(self, num_virtual_tokens: int, num_layers: int, kv_dim: int, projection: bool = False,
                 encoder_hidden_size: int | None = None, prefix_dropout: float = 0.0,
                 layers: Sequence[int] | None = None):
        super().__init__(num_virtual_tokens)
        self.num_layers, self.kv_dim = num_layers, kv_dim
        if layers is not None:
            layers = tuple(sorted(set(int(i) for i in layers)))
            if not layers:
                raise ValueError("layers must name at least one layer (or be None for all layers)")
            bad = [i for i in layers if not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"layers: indices {bad} out of range for a model with {num_layers} layers "
                                 f"(valid: 0..{num_layers - 1})")
            if len(layers) == num_layers:
                layers = None
        self.layers = layers
        selected = num_layers if layers is None else len(layers)
        out_dim = selected * 2 * kv_dim
        self.projection = bool(projection)
        self.encoder_hidden_size = check_positive_int(
            "encoder_hidden_size", encoder_hidden_size if encoder_hidden_size is not None else kv_dim)
        n = num_virtual_tokens
        if self.projection:
            self.embedding = nn.Embedding(n, kv_dim)
            self.transform = nn.Sequential(nn.Linear(kv_dim, self.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(self.encoder_hidden_size, out_dim))
        else:
            self.embedding = nn.Embedding(n, out_dim)
        self.prefix_dropout = nn.Dropout(check_dropout("prefix_dropout", prefix_dropout))
        # encoder_prefix=True on an encoder-decoder model: a second PrefixEncoder for the encoder's self-attention
        # (set by add_prefix_tuning, see _prefix_hooks). None = PEFT's decoder-only prefix.
        self.encoder_stack: PrefixEncoder | None = None

    def prompt(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.projection:
            x = self.transform(x)
        x = self.prefix_dropout(x)
        if self.layers is None:
            return x
        n = self.num_virtual_tokens
        full = x.new_zeros(n, self.num_layers, 2 * self.kv_dim)
        full = full.index_copy(1, torch.tensor(self.layers, device=x.device), x.view(n, len(self.layers), -1))
        return full.view(n, -1)

    def peft_config(self) -> dict:
        if self.encoder_stack is not None:
            # PEFT's PREFIX_TUNING file holds the decoder prefix only; PEFT would load it and silently drop the
            # encoder prefix, giving different outputs.
            raise ValueError("save_adapter: this prefix-tuning adapter was made with encoder_prefix=True; PEFT's "
                             "PREFIX_TUNING format cannot hold an encoder-stack prefix (PEFT would load it without "
                             "it). Save the module's state_dict() instead, or use encoder_prefix=False")
        return {"encoder_hidden_size": self.encoder_hidden_size, "prefix_projection": self.projection,
                "init_weights": None}

    def extra_repr(self) -> str:
        return (f"num_virtual_tokens={self.num_virtual_tokens}, num_layers={self.num_layers}, kv_dim={self.kv_dim}, "
                f"projection={self.projection}, layers={self.layers}, encoder_prefix={self.encoder_stack is not None}")


def make_prefix_encoder(model: nn.Module, num_virtual_tokens: int, projection: bool, encoder_hidden_size,
                        prefix_dropout: float, layers=None, cls: type = None) -> PrefixEncoder:
    check_num_virtual_tokens(num_virtual_tokens)
    # Encoder-decoder models: plain prefix tuning only (P-tuning v2's layer subsets / heads are decoder/encoder-only).
    base = base_of(model, seq2seq=cls is None and layers is None)
    check_prefix_support(base)
    num_layers, kv_heads, head_dim = kv_dims(base)
    enc = (cls or PrefixEncoder)(num_virtual_tokens, num_layers, kv_heads * head_dim, projection,
                                 encoder_hidden_size, prefix_dropout, layers)
    return enc.to(base.get_input_embeddings().weight.device)


def make_encoder_stack_prefix(model: nn.Module, num_virtual_tokens: int, projection: bool, encoder_hidden_size,
                              prefix_dropout: float) -> PrefixEncoder:
    """The encoder-stack prefix of encoder_prefix=True: one K/V prefix per encoder self-attention layer, sized
    from the encoder's own attention modules, with the same projection / dropout settings as the decoder's."""
    base = base_of(model, seq2seq=True)
    if not is_encoder_decoder(base):
        raise ValueError(f"encoder_prefix=True needs an encoder-decoder model (T5, BART); model type "
                         f"{model_type(base)!r} is not one (its only stack already gets the prefix)")
    layers, kv_heads, head_dim = encoder_kv_dims(base)
    stack = PrefixEncoder(num_virtual_tokens, layers, kv_heads * head_dim, projection, encoder_hidden_size,
                          prefix_dropout)
    return stack.to(base.get_input_embeddings().weight.device)


def add_prefix_tuning(model: nn.Module, num_virtual_tokens: int, projection: bool = False,
                      encoder_hidden_size: int | None = None, prefix_dropout: float = 0.0,
                      adapter_name: str = "default", encoder_prefix: bool = False) -> PromptLearningModel:
    """Add prefix tuning to a Hugging Face decoder, encoder or encoder-decoder model; returns the wrapper (base
    frozen). Encoder-decoder models (T5, BART) get the prefix in the decoder's self-attention, laid out exactly as
    PEFT's PeftModelForSeq2SeqLM (see `_prompt_common.prefix_cache`), so PEFT files round-trip.

    projection: PEFT's prefix_projection (MLP reparameterization, hidden encoder_hidden_size, default the KV
    width kv_heads * head_dim). prefix_dropout: dropout on the prefix values in training mode.

    encoder_prefix (opt-in, encoder-decoder models only; Li & Liang's BART setup): every encoder self-attention
    layer also gets its own trainable K/V prefix of num_virtual_tokens (same projection / dropout settings, own
    parameters in `enc.encoder_stack`), visible to all real tokens. Not PEFT-compatible: save_adapter raises.
    """
    if not isinstance(encoder_prefix, bool):
        raise ValueError(f"encoder_prefix must be a bool, got {encoder_prefix!r}")
    check_new_adapter(model, adapter_name)
    enc = make_prefix_encoder(model, num_virtual_tokens, projection, encoder_hidden_size, prefix_dropout)
    if encoder_prefix:
        enc.encoder_stack = make_encoder_stack_prefix(model, num_virtual_tokens, projection, encoder_hidden_size,
                                                      prefix_dropout)
    wrapped = wrap(model)
    wrapped.add_adapter(adapter_name, enc)
    return wrapped


register_prompt_method("PREFIX_TUNING", PREFIX)
