"""BitFit (Ben Zaken et al., ACL 2022): train only bias terms.

`apply_bitfit` freezes everything except the selected biases (all of them, or those of the modules named in
`bias_names`). Models without biases (Llama: every Linear and RMSNorm is bias-free) can get zero-initialized
trainable biases on their Linear layers (`add_missing_biases=True`), so the model is unchanged at start.
The trained biases already live in the base modules; `merge_bitfit` makes them permanent (frozen, recorded
in the HF config flags `attention_bias` / `mlp_bias` where the architecture has them, so `save_pretrained` +
`from_pretrained` round-trip), and `save_bitfit(..., merge=True)` writes the whole merged model, while
`merge=False` writes only the biases (a few KB) for `load_bitfit`.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .._io import atomic_paths
from .bottleneck import freeze_except

__all__ = ["apply_bitfit", "merge_bitfit", "bitfit_state_dict", "save_bitfit", "load_bitfit"]

CONFIG_FILE = "bitfit_config.json"
WEIGHTS_FILE = "bitfit_biases.safetensors"
# HF Llama-family config flags that create biases on these projections (modeling_llama.py).
_HF_BIAS_FLAGS = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"),
                  "mlp_bias": ("gate_proj", "up_proj", "down_proj")}


def _matches(name: str, patterns) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _output_layers(model: nn.Module) -> set[str]:
    """Names of Linear layers that produce the vocabulary logits (never given a new bias)."""
    out = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for n, m in model.named_modules():
        if m is head or n.split(".")[-1] == "lm_head":
            out.add(n)
    return out


def _has_bias(m: nn.Module) -> bool:
    return isinstance(getattr(m, "bias", None), nn.Parameter)


def apply_bitfit(model: nn.Module, bias_names=None, add_missing_biases: bool = False,
                 modules_to_save: list[str] | None = None) -> nn.Module:
    """Make only biases trainable; in place, returns the model.

    bias_names: None (every bias), a list of module names / dotted suffixes (e.g. ["query", "value",
        "intermediate.dense"]), or a regex matching whole module names.
    add_missing_biases: give the selected nn.Linear layers that have no bias a zero-initialized trainable one
        (with bias_names=None: every Linear except the output/LM head).
    modules_to_save: modules that stay fully trainable (e.g. ["classifier"]).
    """
    if getattr(model, "_qpeft_bitfit", None) is not None:
        raise ValueError("apply_bitfit: BitFit is already applied to this model")
    mods = [(n, m) for n, m in model.named_modules() if n]
    selected = [(n, m) for n, m in mods if bias_names is None or _matches(n, bias_names)]
    if bias_names is not None and not selected:
        raise ValueError(f"apply_bitfit: bias_names={bias_names!r} matched no module of {type(model).__name__}")
    heads = _output_layers(model)
    to_add = []
    if add_missing_biases:
        for n, m in selected:
            if _has_bias(m):
                continue
            if isinstance(m, nn.Linear):
                if bias_names is not None or n not in heads:
                    to_add.append((n, m))
            elif bias_names is not None and not list(m.children()):
                raise TypeError(f"apply_bitfit: bias_names={bias_names!r} selects {n} ({type(m).__name__}), which "
                                "has no bias and is not an nn.Linear, so add_missing_biases cannot give it one")
    elif bias_names is not None:
        for n, m in selected:
            if not _has_bias(m) and not list(m.children()):
                raise TypeError(f"apply_bitfit: bias_names={bias_names!r} selects {n} ({type(m).__name__}), which "
                                "has no bias; pass add_missing_biases=True for Linear layers")
    chosen = [n for n, m in selected if _has_bias(m)] + [n for n, _ in to_add]
    if not chosen:
        raise ValueError(f"apply_bitfit: {type(model).__name__} has no biases to train (bias_names={bias_names!r}); "
                         "pass add_missing_biases=True to add zero-initialized ones to its Linear layers")
    freeze_except(model, modules_to_save)
    for _n, m in to_add:
        w = m.weight
        m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=w.dtype, device=w.device))
    for n in chosen:
        model.get_submodule(n).bias.requires_grad_(True)
    model._qpeft_bitfit = {"biases": chosen, "added": [n for n, _ in to_add],
                           "modules_to_save": list(modules_to_save or [])}
    return model


def bitfit_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    rec = _record(model)
    return {f"{n}.bias": model.get_submodule(n).bias for n in rec["biases"]}


def _record(model: nn.Module) -> dict:
    rec = getattr(model, "_qpeft_bitfit", None)
    if rec is None:
        raise ValueError(f"{type(model).__name__} has no BitFit state; call apply_bitfit first")
    return rec


@torch.no_grad()
def merge_bitfit(model: nn.Module) -> nn.Module:
    """Make the trained biases part of the base model: frozen, BitFit record removed; where biases were added to
    a Llama-style model, sets config.attention_bias / mlp_bias and gives the remaining projections of that
    group a zero bias, so save_pretrained/from_pretrained reproduce the model exactly."""
    rec = _record(model)
    cfg = getattr(model, "config", None)
    added = set(rec["added"])
    for flag, projs in _HF_BIAS_FLAGS.items():
        group = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and n.split(".")[-1] in projs]
        if not any(n in added for n, _ in group):
            continue
        if cfg is not None and hasattr(cfg, flag):
            for _n, m in group:
                if m.bias is None:
                    m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device))
            setattr(cfg, flag, True)
        else:
            warnings.warn(f"merge_bitfit: biases were added to {type(model).__name__} layers its config cannot "
                          f"describe ({flag}); a from_pretrained reload will not re-create them", RuntimeWarning,
                          stacklevel=2)
    other_added = [n for n in added if n.split(".")[-1] not in sum(_HF_BIAS_FLAGS.values(), ())]
    if other_added:
        warnings.warn(f"merge_bitfit: added biases on {other_added[:4]} have no config flag; keep the model's "
                      "state_dict (not just its config) to reproduce them", RuntimeWarning, stacklevel=2)
    for p in model.parameters():
        p.requires_grad_(False)
    model._qpeft_bitfit = None
    return model


def save_bitfit(model: nn.Module, path: str | os.PathLike, merge: bool = False) -> Path:
    """merge=False: bitfit_config.json + bitfit_biases.safetensors (only the trained biases).
    merge=True: merge_bitfit, then the whole model (HF save_pretrained when available, else model.safetensors)."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if merge:
        merge_bitfit(model)
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(out)
        else:
            with atomic_paths(out / "model.safetensors") as (tmp,):
                save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp,
                          metadata={"format": "pt"})
        return out
    text = json.dumps({"method": "bitfit", **_record(model)}, indent=2, sort_keys=True)
    with atomic_paths(out / WEIGHTS_FILE, out / CONFIG_FILE) as (weights_tmp, config_tmp):  # both or neither
        save_file({k: v.detach().cpu().contiguous() for k, v in bitfit_state_dict(model).items()}, weights_tmp,
                  metadata={"format": "pt"})
        Path(config_tmp).write_text(text)
    return out


def load_bitfit(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load biases saved by save_bitfit(merge=False), adding the recorded missing biases. Names, shapes and
    finiteness are all checked first; on error the model is unchanged. Loaded biases are trainable, the rest
    frozen (as after apply_bitfit)."""
    from safetensors.torch import load_file

    path = Path(path)
    rec = json.loads((path / CONFIG_FILE).read_text())
    if rec.pop("method", None) != "bitfit":
        raise ValueError(f"load_bitfit: {path / CONFIG_FILE} is not a BitFit config")
    tensors = load_file(str(path / WEIGHTS_FILE))
    added = set(rec["added"])
    for n in rec["biases"]:
        key = f"{n}.bias"
        try:
            m = model.get_submodule(n)
        except AttributeError:
            raise ValueError(f"load_bitfit: model has no module {n}") from None
        if key not in tensors:
            raise ValueError(f"load_bitfit: missing tensor {key}")
        t = tensors[key]
        if n in added:
            if not isinstance(m, nn.Linear):
                raise ValueError(f"load_bitfit: {n} must be an nn.Linear to receive a bias, got {type(m).__name__}")
            shape = (m.out_features,)
        elif _has_bias(m):
            shape = tuple(m.bias.shape)
        else:
            raise ValueError(f"load_bitfit: {n} has no bias to load into")
        if tuple(t.shape) != shape:
            raise ValueError(f"load_bitfit: {key} has shape {tuple(t.shape)}, model expects {shape}")
        if not torch.isfinite(t).all():
            raise ValueError(f"load_bitfit: {key} has non-finite values")

    freeze_except(model, rec.get("modules_to_save"))
    with torch.no_grad():
        for n in rec["biases"]:
            m = model.get_submodule(n)
            if not _has_bias(m):
                m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device))
            m.bias.copy_(tensors[f"{n}.bias"].to(m.bias.device, m.bias.dtype))
            m.bias.requires_grad_(True)
    model._qpeft_bitfit = rec
    return model
