"""Encoder-stack prefixes for prefix tuning on encoder-decoder models (opt-in `encoder_prefix=True`).

transformers' T5 / BART encoders drop the KV cache, so the KV-cache route that prefixes the decoder cannot
reach them. Instead, while the wrapper runs the model, a forward pre-hook on every encoder self-attention module
passes a small stand-in cache (`PrefixKV`) whose `update()` (called by the attention right after its K/V
projections) returns [prefix; K] and [prefix; V], and widens the attention mask by `n` always-visible columns,
so every real token attends to the prefix (the idea of UniPELT's GatedPrefix hook, tuners/unipelt.py, without
the gate and for bidirectional masks only).

Positions: the prefix takes the place of `n` past tokens (`get_seq_length()` returns n), as the decoder prefix
does through the KV cache; T5's relative position bias is therefore computed for queries at n..n+S-1 against keys
at 0..n+S-1 (relative distances between real tokens are unchanged), and BART's absolute positions are untouched
(embedded before the encoder layers).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
import torch.nn as nn

from .._hf_compat import cache_argument, cache_given, checkpointing_method_name

__all__: list[str] = []  # internal helpers of prefix_tuning / _prompt_common

SUPPORTED_ATTENTION = ("eager", "sdpa")  # implementations that take a 4-D (or None) tensor mask


class PrefixKV:
    """Stands in for the KV cache (`cache` / `past_key_values`) inside one encoder self-attention call: prepends the
    prefix K/V (B, kv_heads, n, head_dim) to the keys/values the attention just projected."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        self.key, self.value = key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.key.shape[2]

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return (torch.cat([self.key.to(key_states.dtype), key_states], dim=2),
                torch.cat([self.value.to(value_states.dtype), value_states], dim=2))


def _k_projection(module: nn.Module):
    for name in ("k_proj", "k"):  # BART / T5
        proj = getattr(module, name, None)
        if isinstance(proj, nn.Module) and hasattr(proj, "out_features"):
            return proj
    return None


def encoder_self_attentions(model: nn.Module) -> list[nn.Module]:
    """The encoder's self-attention modules in layer order (innermost modules that project K and take
    a KV cache, `cache` or `past_key_values`: BartAttention, T5Attention)."""
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else None
    if encoder is None:
        raise ValueError(f"encoder_prefix: {type(model).__name__} has no get_encoder()")
    found = [m for m in encoder.modules()
             if _k_projection(m) is not None and cache_argument(m.forward) is not None]
    if not found:
        raise ValueError(f"encoder_prefix: cannot find the encoder self-attention modules of "
                         f"{type(model).__name__} (expected BART/T5-style attention with k_proj or k)")
    return found


def encoder_kv_dims(model: nn.Module) -> tuple[int, int, int]:
    """(num_encoder_layers, kv_heads, head_dim) read from the encoder's attention modules themselves (T5: d_kv,
    BART: d_model / encoder_attention_heads), so encoder and decoder may differ."""
    attn_impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if attn_impl not in SUPPORTED_ATTENTION:
        raise ValueError(f"encoder_prefix: attention implementation {attn_impl!r} is not supported; load the model "
                         f"with attn_implementation in {SUPPORTED_ATTENTION}")
    dims = set()
    modules = encoder_self_attentions(model)
    for m in modules:
        head_dim = getattr(m, "head_dim", None) or getattr(m, "key_value_proj_dim", None)
        if head_dim is None:
            raise ValueError(f"encoder_prefix: {type(m).__name__} has no head_dim / key_value_proj_dim")
        dims.add((_k_projection(m).out_features // head_dim, head_dim))
    if len(dims) != 1:
        raise ValueError(f"encoder_prefix: encoder layers have different attention shapes {sorted(dims)}")
    kv_heads, head_dim = dims.pop()
    return len(modules), kv_heads, head_dim


def _widen_mask(mask, n: int):
    """Bidirectional encoder mask with n visible prefix columns in front (None: everything visible already)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ValueError(f"encoder_prefix: expected a 4-D attention mask tensor in the encoder (eager/sdpa "
                         f"attention), got {getattr(mask, 'shape', type(mask).__name__)}")
    pad_shape = (*mask.shape[:-1], n)
    pad = (torch.ones(pad_shape, dtype=torch.bool, device=mask.device) if mask.dtype == torch.bool
           else torch.zeros(pad_shape, dtype=mask.dtype, device=mask.device))  # additive mask: 0 = visible
    return torch.cat([pad, mask], dim=-1)


def _pre_hook(key: torch.Tensor, value: torch.Tensor, module: nn.Module):
    """key/value: (kv_heads, n, head_dim) of one layer."""
    names = list(inspect.signature(module.forward).parameters)
    mask_name = "attention_mask" if "attention_mask" in names else "mask"  # BART / T5
    mask_pos = names.index(mask_name) if mask_name in names else None
    cache_name = cache_argument(module.forward)

    def hook(mod, args, kwargs):
        if kwargs.get("key_value_states") is not None:  # cross-attention: not an encoder self-attention
            return None
        if cache_given(kwargs) is not None:
            raise RuntimeError("encoder_prefix: the encoder attention got a cache; transformers' encoders are "
                               "expected to drop it")
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        batch = hidden.shape[0]
        kwargs = dict(kwargs)
        kwargs[cache_name] = PrefixKV(key.unsqueeze(0).expand(batch, -1, -1, -1),
                                             value.unsqueeze(0).expand(batch, -1, -1, -1))
        n = key.shape[1]
        if mask_pos is not None and mask_pos < len(args):
            args = (*args[:mask_pos], _widen_mask(args[mask_pos], n), *args[mask_pos + 1:])
        else:
            kwargs[mask_name] = _widen_mask(kwargs.get(mask_name), n)
        return args, kwargs

    return hook


def split_layers(flat: torch.Tensor, num_layers: int, kv_heads: int, head_dim: int):
    """(n, L * 2 * kv_heads * head_dim) in PEFT's layout (layer, K/V, head, head_dim) -> per layer
    (K, V), each (kv_heads, n, head_dim)."""
    n = flat.shape[0]
    kv = flat.view(n, num_layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4)
    return [(kv[i, 0], kv[i, 1]) for i in range(num_layers)]


@contextlib.contextmanager
def encoder_prefix_hooks(model: nn.Module, flat: torch.Tensor) -> Iterator[None]:
    """Inside the context, every encoder self-attention layer i of `model` sees layer i of `flat` as a prefix."""
    modules = encoder_self_attentions(model)
    layers, kv_heads, head_dim = encoder_kv_dims(model)
    if torch.is_grad_enabled() and any(getattr(m, "gradient_checkpointing", False) is True and m.training
                                       for m in model.get_encoder().modules()):
        # Checkpointed layers recompute their forward during backward, after these hooks are gone: the
        # recomputed activations would lack the prefix and the gradients would be silently wrong.
        raise ValueError("encoder_prefix: gradient checkpointing of the encoder is not supported; call "
                         f"model.{checkpointing_method_name(model, 'disable')}() (or keep the base in eval mode)")
    if flat.shape[1] != layers * 2 * kv_heads * head_dim:
        raise ValueError(f"encoder_prefix: prefix width {flat.shape[1]} != encoder layers {layers} x 2 x "
                         f"{kv_heads} heads x {head_dim}")
    handles = [m.register_forward_pre_hook(_pre_hook(k, v, m), with_kwargs=True)
               for m, (k, v) in zip(modules, split_layers(flat, layers, kv_heads, head_dim))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
