"""UniPELT (Mao et al., ACL 2022): LoRA + prefix tuning + a bottleneck adapter in every layer, each gated.

Each submodule has its own gate g = mean_over_sequence(sigmoid(Linear(hidden -> 1)(x))): one scalar per
example and layer (shape (B, 1, 1)), as in the paper and morningmoni/UniPELT:
- LoRA on the query and value projections: y = W x + g * B A dropout(x); g (from the layer input)
  replaces the alpha / r scaling.
- Prefix tuning: `prefix_length` trainable key/value vectors per layer (kv heads x head_dim) are prepended
  to the attention's keys and values, both multiplied by g (from the attention input hidden_states).
- Bottleneck adapter after the feed-forward output (Pfeiffer placement, see tuners/bottleneck.py),
  y = x + g * up(act(down(x))) with g from the adapter input.
With gating=False the gates are absent: LoRA uses alpha / r, prefix and adapter a scale of 1 (the plain
methods). Submodules can be left out at creation or switched on/off later (`set_unipelt_submodules`).

The prefix needs no change to model source: a forward pre-hook on each self-attention module passes, as
its KV cache (`cache` / `past_key_values`), a small object whose `update(k, v, layer_idx)` (called by HF
Llama/BERT attention right before the attention kernel) returns the keys/values with the gated prefix in
front, and widens the attention mask by `prefix_length` always-visible columns. Positions of the real tokens
are unchanged (the prefix carries no rotary/absolute position). Supports HF "eager" and "sdpa" attention.

The adapter and gates are non-linear in the input, so UniPELT cannot be merged into base weights.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._hf_compat import CACHE_ARGUMENTS, cache_argument, cache_from
from .._io import atomic_paths
from ..autograd.lora import lora_linear
from .bottleneck import (
    AdapterMergeError,
    BottleneckAdapter,
    _float_dtype_device,
    find_adapter_sites,
    freeze_except,
    is_linear_like,
)

__all__ = ["add_unipelt", "set_unipelt_submodules", "merge_unipelt", "unipelt_state_dict", "save_unipelt",
           "load_unipelt", "GatedLoraLinear", "GatedPrefix", "remove_unipelt"]

CONFIG_FILE = "unipelt_config.json"
WEIGHTS_FILE = "unipelt.safetensors"
_SUPPORTED_ATTN = ("eager", "sdpa")


def _gate_value(gate: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """sigmoid(Linear(x)) averaged over the sequence axis (-2): (B, 1, 1) for x (B, S, H)."""
    return torch.sigmoid(gate(x.to(gate.weight.dtype))).mean(dim=-2, keepdim=True)


def _new_gate(hidden: int, device, dtype) -> nn.Linear:
    g = nn.Linear(hidden, 1, device=device, dtype=dtype)
    with torch.no_grad():  # AdapterHub / UniPELT: N(0, 0.02), zero bias -> g ~ 0.5 at start
        nn.init.normal_(g.weight, std=0.02)
        nn.init.zeros_(g.bias)
    return g


class GatedLoraLinear(nn.Module):
    """nn.Linear or QLinearNF4 `base_layer` + LoRA (A kaiming-uniform, B = 0: PEFT's init, fp32 like PEFT's
    adapters), scaled by a gate or by alpha / r."""

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float, gated: bool):
        super().__init__()
        if not is_linear_like(base_layer):
            raise TypeError(f"GatedLoraLinear wraps nn.Linear or QLinearNF4, got {type(base_layer).__name__}")
        if r < 1:
            raise ValueError(f"lora_r must be >= 1, got {r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        self.base_layer = base_layer
        _, device = _float_dtype_device(base_layer)
        self.r, self.lora_alpha, self.lora_dropout = r, float(lora_alpha), float(lora_dropout)
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r, device=device))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.gate = _new_gate(base_layer.in_features, device, torch.float32) if gated else None
        self.active = True

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return self.base_layer(x)
        if self.gate is None:  # the plain LoRA layer: fused base + LoRA path

            return lora_linear(x, self.base_layer, self.lora_A, self.lora_B, self.scaling,
                               dropout_p=self.lora_dropout, training=self.training)
        xa = x.to(self.lora_A.dtype)
        low = F.linear(F.linear(F.dropout(xa, self.lora_dropout, self.training), self.lora_A), self.lora_B)
        return self.base_layer(x) + (_gate_value(self.gate, xa) * low).to(x.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha:g}, gated={self.gate is not None}"


class _PrefixKV:
    """Stands in for HF's `past_key_values` inside one attention call: prepends the (gated) prefix."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor, inner):
        self.key, self.value, self.inner = key, value, inner

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.inner is not None:
            key_states, value_states = self.inner.update(key_states, value_states, layer_idx, *args, **kwargs)
        return (torch.cat([self.key.to(key_states.dtype), key_states], dim=2),
                torch.cat([self.value.to(value_states.dtype), value_states], dim=2))


def _extend_mask(mask, prefix_len: int, causal: bool, q_len: int, past_len: int, dtype, device):
    """Attention mask with `prefix_len` visible key columns in front (bool: True, additive float: 0)."""
    if mask is None:
        if not causal or q_len == 1:
            return None  # everything visible already
        kv = past_len + q_len
        allowed = torch.ones(q_len, kv, dtype=torch.bool, device=device).tril(diagonal=past_len)
        allowed = torch.cat([torch.ones(q_len, prefix_len, dtype=torch.bool, device=device), allowed], dim=1)
        neg = torch.finfo(dtype).min
        return torch.zeros(1, 1, q_len, prefix_len + kv, dtype=dtype, device=device).masked_fill(~allowed, neg)
    if mask.dim() != 4:
        raise ValueError(f"UniPELT prefix: expected a 4-D attention mask from the model, got shape {tuple(mask.shape)}")
    pad_shape = (*mask.shape[:-1], prefix_len)
    pad = (torch.ones(pad_shape, dtype=torch.bool, device=mask.device) if mask.dtype == torch.bool
           else torch.zeros(pad_shape, dtype=mask.dtype, device=mask.device))
    return torch.cat([pad, mask], dim=-1)


class GatedPrefix(nn.Module):
    """Per-layer prefix keys/values (num_kv_heads, prefix_length, head_dim) and an optional gate."""

    def __init__(self, hidden: int, num_kv_heads: int, head_dim: int, prefix_length: int, gated: bool,
                 init_std: float = 0.02, device=None, dtype=None):
        super().__init__()
        if prefix_length < 1:
            raise ValueError(f"prefix_length must be >= 1, got {prefix_length}")
        self.prefix_length = prefix_length
        self.prefix_key = nn.Parameter(torch.randn(num_kv_heads, prefix_length, head_dim, device=device) * init_std)
        self.prefix_value = nn.Parameter(torch.randn(num_kv_heads, prefix_length, head_dim, device=device) * init_std)
        self.gate = _new_gate(hidden, device, torch.float32) if gated else None
        self.active = True
        self._hook_handle = None

    def kv(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = hidden.shape[0]
        k = self.prefix_key.unsqueeze(0).expand(B, -1, -1, -1)
        v = self.prefix_value.unsqueeze(0).expand(B, -1, -1, -1)
        if self.gate is not None:
            g = _gate_value(self.gate, hidden).view(B, 1, 1, 1)  # one gate per example scales K and V
            k, v = g * k, g * v
        return k, v

    def _pre_hook(self, attn, args, kwargs):
        if not self.active:
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cache_name = cache_argument(attn.forward) or CACHE_ARGUMENTS[-1]
        inner = cache_from(kwargs)
        past = 0
        if inner is not None and hasattr(inner, "get_seq_length"):  # a real generation cache under the prefix
            past = int(inner.get_seq_length(attn.layer_idx))
        k, v = self.kv(hidden)
        kwargs = dict(kwargs)
        for name in CACHE_ARGUMENTS:  # the real cache (if any) now sits inside the stand-in
            kwargs.pop(name, None)
        kwargs[cache_name] = _PrefixKV(k, v, inner)
        kwargs["attention_mask"] = _extend_mask(kwargs.get("attention_mask"), self.prefix_length,
                                                bool(getattr(attn, "is_causal", False)), hidden.shape[-2], past,
                                                hidden.dtype, hidden.device)
        return args, kwargs

    def extra_repr(self) -> str:
        kvh, p, d = self.prefix_key.shape
        return f"prefix_length={p}, kv_heads={kvh}, head_dim={d}, gated={self.gate is not None}"


def _attention_modules(model: nn.Module):
    """[(name, module, (q, v) child names, hidden, kv_heads, head_dim)] for Llama- and BERT-style self-attention."""
    out = []
    for name, m in model.named_modules():
        if all(is_linear_like(getattr(m, a, None)) for a in ("q_proj", "k_proj", "v_proj")) \
                and hasattr(m, "head_dim"):
            out.append((name, m, ("q_proj", "v_proj"), m.q_proj.in_features, m.k_proj.out_features // m.head_dim,
                        m.head_dim))
        elif all(is_linear_like(getattr(m, a, None)) for a in ("query", "key", "value")) \
                and hasattr(m, "attention_head_size"):
            out.append((name, m, ("query", "value"), m.query.in_features,
                        m.key.out_features // m.attention_head_size, m.attention_head_size))
    return out


def add_unipelt(model: nn.Module, lora: bool = True, prefix: bool = True, adapter: bool = True,
                gating: bool = True, lora_r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                prefix_length: int = 10, reduction_factor: float = 16, bottleneck_size: int | None = None,
                non_linearity: str = "relu", adapter_init: str = "bert",
                modules_to_save: list[str] | None = None) -> nn.Module:
    """Add UniPELT's submodules (those set True) to every Llama- or BERT-style layer; in place, returns the model.

    Defaults follow the UniPELT repo (lora_r 8, alpha 16, prefix 10; adapter reduction factor 16, relu).
    Base parameters are frozen except `modules_to_save` (e.g. ["classifier"]).
    """
    if not (lora or prefix or adapter):
        raise ValueError("add_unipelt: lora, prefix and adapter are all False; enable at least one submodule")
    attns = _attention_modules(model)
    sites = [s for s in find_adapter_sites(model) if s[1] == "ffn"]
    if not attns or (adapter and not sites):
        raise TypeError(f"add_unipelt: {type(model).__name__} has no layer type it can wrap: expected Llama-style "
                        "(self_attn.q_proj/k_proj/v_proj + mlp.down_proj) or BERT-style (attention.self.query/key/"
                        "value + *Output dense/dropout/LayerNorm) layers")
    if any(hasattr(m, "unipelt_prefix") for _, m, *_ in attns) or any(isinstance(m, GatedLoraLinear)
                                                                       for m in model.modules()):
        raise ValueError("add_unipelt: model already has UniPELT modules")
    if prefix:
        impl = getattr(getattr(model, "config", None), "_attn_implementation", "eager")
        if impl not in _SUPPORTED_ATTN:
            raise ValueError(f"add_unipelt: prefix needs attn_implementation in {_SUPPORTED_ATTN}, model uses {impl!r}")
        if prefix_length < 1:
            raise ValueError(f"prefix_length must be >= 1, got {prefix_length}")
    if lora and lora_r < 1:
        raise ValueError(f"lora_r must be >= 1, got {lora_r}")
    if adapter:  # size check before anything changes
        for name, _, _, _, hidden in sites:
            r = bottleneck_size if bottleneck_size is not None else int(hidden // reduction_factor)
            if r < 1:
                arg = (f"bottleneck_size={bottleneck_size}" if bottleneck_size is not None
                       else f"reduction_factor={reduction_factor}")
                raise ValueError(f"add_unipelt: {arg} leaves no hidden units for {name} (hidden size {hidden})")
    freeze_except(model, modules_to_save)
    for _name, attn, (qn, vn), hidden, kv_heads, head_dim in attns:
        _, device = _float_dtype_device(getattr(attn, qn))
        if lora:
            for child in (qn, vn):
                setattr(attn, child, GatedLoraLinear(getattr(attn, child), lora_r, lora_alpha, lora_dropout, gating))
        if prefix:
            pre = GatedPrefix(hidden, kv_heads, head_dim, prefix_length, gating, device=device)
            attn.add_module("unipelt_prefix", pre)
            pre._hook_handle = attn.register_forward_pre_hook(pre._pre_hook, with_kwargs=True)
    if adapter:
        for _name, _, parent, hooked, hidden in sites:
            r = bottleneck_size if bottleneck_size is not None else int(hidden // reduction_factor)
            _, device = _float_dtype_device(hooked if is_linear_like(hooked) else parent)
            ad = BottleneckAdapter(hidden, r, non_linearity, adapter_init, use_gate=gating, device=device,
                                   dtype=torch.float32)  # fp32 like every UniPELT part (PEFT's adapter dtype)
            parent.add_module("unipelt_adapter", ad)
            ad._hook_handle = hooked.register_forward_hook(ad._hook)
    model._qpeft_unipelt = {"lora": lora, "prefix": prefix, "adapter": adapter, "gating": gating, "lora_r": lora_r,
                            "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "prefix_length": prefix_length,
                            "reduction_factor": reduction_factor, "bottleneck_size": bottleneck_size,
                            "non_linearity": non_linearity, "adapter_init": adapter_init,
                            "modules_to_save": list(modules_to_save or [])}
    return model


def _parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    parts = {"lora": [], "prefix": [], "adapter": []}
    for n, m in model.named_modules():
        if isinstance(m, GatedLoraLinear):
            parts["lora"].append(m)
        elif isinstance(m, GatedPrefix):
            parts["prefix"].append(m)
        elif isinstance(m, BottleneckAdapter) and n.endswith("unipelt_adapter"):
            parts["adapter"].append(m)
    return parts


def set_unipelt_submodules(model: nn.Module, lora: bool | None = None, prefix: bool | None = None,
                           adapter: bool | None = None) -> None:
    """Switch submodules on/off (None leaves one as is). Off = that submodule contributes nothing."""
    if getattr(model, "_qpeft_unipelt", None) is None:
        raise ValueError(f"{type(model).__name__} has no UniPELT modules; call add_unipelt first")
    for key, on in (("lora", lora), ("prefix", prefix), ("adapter", adapter)):
        if on is None:
            continue
        mods = _parts(model)[key]
        if on and not mods:
            raise ValueError(f"set_unipelt_submodules: {key}=True but the model was built with {key}=False")
        for m in mods:
            m.active = bool(on)


def merge_unipelt(model: nn.Module):
    """Always raises: the adapter and the input-dependent gates are non-linear, so there is no merged weight."""
    raise AdapterMergeError("UniPELT cannot be merged into the base weights: its bottleneck adapter is non-linear "
                            "and every submodule is scaled by an input-dependent gate sigmoid(Linear(x)); prefix "
                            "keys/values are extra attention entries, not a weight change")


def remove_unipelt(model: nn.Module) -> nn.Module:
    """Remove every UniPELT module and hook, restoring the original layers."""
    for n, m in list(model.named_modules()):
        if isinstance(m, GatedLoraLinear):
            parent, _, child = n.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m.base_layer)
    for n, m in list(model.named_modules()):
        if isinstance(m, (GatedPrefix, BottleneckAdapter)) and n.rsplit(".", 1)[-1] in ("unipelt_prefix",
                                                                                          "unipelt_adapter"):
            if m._hook_handle is not None:
                m._hook_handle.remove()
            parent, _, child = n.rpartition(".")
            delattr(model.get_submodule(parent) if parent else model, child)
    model._qpeft_unipelt = None
    return model


def unipelt_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every UniPELT parameter (LoRA A/B, prefixes, adapters, gates) by its full name in `model`."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, GatedLoraLinear):
            own = {k: v for k, v in m.named_parameters() if not k.startswith("base_layer.")}
        elif isinstance(m, GatedPrefix) or (isinstance(m, BottleneckAdapter) and n.endswith("unipelt_adapter")):
            own = dict(m.named_parameters())
        else:
            continue
        out.update({f"{n}.{k}": v for k, v in own.items()})
    return out


def save_unipelt(model: nn.Module, path: str | os.PathLike) -> Path:
    """unipelt_config.json + unipelt.safetensors (UniPELT parameters and modules_to_save)."""
    from safetensors.torch import save_file

    cfg = getattr(model, "_qpeft_unipelt", None)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} has no UniPELT modules")
    tensors = dict(unipelt_state_dict(model))
    for n, p in model.named_parameters():
        owner = n.rsplit(".", 1)[0]
        if any(owner == k or owner.endswith("." + k) for k in cfg["modules_to_save"]):
            tensors[n] = p
    text = json.dumps({"method": "unipelt", **cfg}, indent=2, sort_keys=True)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_paths(out / WEIGHTS_FILE, out / CONFIG_FILE) as (weights_tmp, config_tmp):  # both or neither
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, weights_tmp,
                  metadata={"format": "pt"})
        Path(config_tmp).write_text(text)
    return out


def load_unipelt(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Inject UniPELT as configured in `path` (if absent) and load its weights; on any error (names, shapes,
    non-finite values) the injected modules are removed again and the model is as it was."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / CONFIG_FILE).read_text())
    if cfg.pop("method", None) != "unipelt":
        raise ValueError(f"load_unipelt: {path / CONFIG_FILE} is not a UniPELT config")
    tensors = load_file(str(path / WEIGHTS_FILE))
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"load_unipelt: non-finite values in {bad[:4]}")
    had = getattr(model, "_qpeft_unipelt", None) is not None
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    if not had:
        add_unipelt(model, **cfg)
    try:
        params = dict(model.named_parameters())
        expected = set(unipelt_state_dict(model))
        missing, unexpected = sorted(expected - set(tensors)), sorted(k for k in tensors if k not in params)
        if missing or unexpected:
            raise ValueError(f"load_unipelt: key mismatch; missing {missing[:4]}, unexpected {unexpected[:4]}")
        for k, v in tensors.items():
            if v.shape != params[k].shape:
                raise ValueError(f"load_unipelt: {k} has shape {tuple(v.shape)}, model expects "
                                 f"{tuple(params[k].shape)}")
    except Exception:
        if not had:
            remove_unipelt(model)
            for n, p in model.named_parameters():
                p.requires_grad_(grads.get(n, p.requires_grad))
        raise
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))
    return model
