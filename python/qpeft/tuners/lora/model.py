"""Model-level LoRA: inject `LoraLinear` layers (PEFT's matching rules), QLoRA preparation, merging, and the
"LORA" `AdapterMethod` through which `qpeft.save_adapter` / `qpeft.load_adapter` speak PEFT's file format.

Layers are replaced in place (no wrapper model), so module paths stay those of the user's model and the PEFT
checkpoint key of a layer at path P is `base_model.model.P.lora_A.weight` (PEFT's PeftModel -> LoraModel
prefix, adapter name removed).
"""
from __future__ import annotations

import contextlib
import re
import warnings
from collections import defaultdict

import torch
import torch.nn as nn

from ...models.quantization import quantize_model
from ...modules.lora_linear import (LoraLinear, LoraRankWarning, base_shape, check_autocast_adapter_dtype, check_rank,
                                    dora_refusal, is_nf4_layer, warn_not_low_rank)
from ..adapter_io import AdapterMethod, register_method
from .mixed_batch import enable_adapter_names
from .options import check_lora_options, init_rewrites_base

__all__ = ["add_lora", "prepare_for_qlora", "lora_layers", "set_lora_adapter", "delete_lora_adapter",
           "disable_lora", "merge_lora", "unmerge_lora", "merge_and_unload"]

PEFT_PREFIX = "base_model.model."
_CONFIG_ATTR = "_qpeft_lora_configs"  # {adapter_name: PEFT LoraConfig dict} kept on the model


def _is_target_type(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_nf4_layer(m)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """{module path: LoraLinear} of the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def _candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules LoRA may target, by path: Linear / 4-bit layers outside LoRA layers, and LoraLinear layers
    themselves (a second adapter), never the pieces inside a LoraLinear."""
    inside = [n + "." for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    out = {}
    for name, m in model.named_modules():
        if not name or any(name.startswith(p) for p in inside):
            continue
        if isinstance(m, LoraLinear) or _is_target_type(m):
            out[name] = m
    return out


def _output_layer_names(model: nn.Module) -> set[str]:
    """The output layer that "all-linear" leaves out (PEFT: the model's output embeddings, e.g. lm_head)."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, m in model.named_modules():
        if out is not None and (m is out or (isinstance(m, LoraLinear) and m.base_layer is out)):
            names.add(name)
    if not names and out is None:
        names = {n for n, _ in model.named_modules() if n.split(".")[-1] == "lm_head"}
    return names


def _match(model: nn.Module, target_modules) -> list[str]:
    cands = _candidate_modules(model)
    if isinstance(target_modules, str) and target_modules == "all-linear":
        skip = _output_layer_names(model)
        names = [n for n in cands if n not in skip]
        if not names:
            raise ValueError("add_lora: target_modules='all-linear' found no nn.Linear/QLinearNF4 layer "
                             "(other than the output layer)")
        return names
    available = [n for n in cands][:8]
    if isinstance(target_modules, str):  # PEFT: a string is a regex that must match the whole module path
        pattern = re.compile(target_modules)
        names = [n for n, _ in model.named_modules() if n and pattern.fullmatch(n)]
        names = [n for n in names if n in cands or _raise_unsupported(model, n)]
        if not names:
            raise ValueError(f"add_lora: target_modules regex {target_modules!r} matched no module; "
                             f"available Linear modules include {available}")
        return names
    targets = list(target_modules)
    if not targets:
        raise ValueError("add_lora: target_modules is empty")
    names, unmatched = [], []
    for t in targets:  # PEFT: exact match or suffix match on a '.' boundary
        hit = [n for n in cands if n == t or n.endswith("." + t)]
        if not hit:
            unmatched.append(t)
        names += [n for n in hit if n not in names]
    if unmatched:
        raise ValueError(f"add_lora: target_modules {unmatched} matched no nn.Linear/QLinearNF4 module; "
                         f"available Linear modules include {available}")
    return names


def _raise_unsupported(model: nn.Module, name: str) -> bool:
    m = model.get_submodule(name)
    inside_lora = any(name.startswith(n + ".") for n in lora_layers(model))
    if inside_lora:
        return False
    raise ValueError(f"add_lora: module {name!r} ({type(m).__name__}) matched target_modules but LoRA supports "
                     f"only nn.Linear and QLinearNF4 layers")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_magnitude_vector")


def _freeze_non_lora(model: nn.Module) -> None:
    for n, p in model.named_parameters():
        if not any(f".{a}." in n or n.startswith(f"{a}.") for a in _ADAPTER_PARTS):
            p.requires_grad_(False)


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
                         ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS")):
        if cls.endswith(suffix):
            return task
    return None


def _peft_config(model: nn.Module, r: int, lora_alpha: float, lora_dropout: float, use_rslora: bool, init: str,
                 target_modules, use_dora: bool = False, lora_bias: bool = False) -> dict:
    cfg = getattr(model, "config", None)
    name_or_path = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None) or None
    return {
        "peft_type": "LORA", "task_type": _task_type(model), "base_model_name_or_path": name_or_path,
        "revision": None, "inference_mode": False, "r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
        "target_modules": target_modules, "use_rslora": use_rslora, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": {"kaiming": True, "gaussian": "gaussian", "random": False}[init],
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": bool(use_dora),
        "lora_bias": bool(lora_bias),
        "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
    }


def _configs(model: nn.Module) -> dict:
    if not hasattr(model, _CONFIG_ATTR):
        object.__setattr__(model, _CONFIG_ATTR, {})
    return getattr(model, _CONFIG_ATTR)


def add_lora(model: nn.Module, target_modules="all-linear", r: int = 8, lora_alpha: float = 8,
             lora_dropout: float = 0.0, adapter_name: str = "default", use_rslora: bool = False,
             init: str | bool = "kaiming", use_dora: bool = False, lora_bias: bool = False,
             autocast_adapter_dtype: bool = True) -> nn.Module:
    """Inject LoRA adapter `adapter_name` into the matching layers, freeze everything else, return `model`.

    target_modules (PEFT's rules): a list of names, each matching a module path exactly or as a suffix on a
    '.' boundary ("q_proj" matches "model.layers.0.self_attn.q_proj"); a str, a regex that must match the
    whole module path; or "all-linear", every nn.Linear / QLinearNF4 except the output layer (lm_head).
    Layers already wrapped get the adapter added (not activated; see set_lora_adapter).
    use_dora: DoRA (PEFT's LoraConfig(use_dora=True)); lora_bias: a bias on lora_B (PEFT's lora_bias=True).
    autocast_adapter_dtype (PEFT's get_peft_model argument): True (default) keeps the new adapters in fp32; False
    creates them in each base's compute dtype (QLinearNF4.compute_dtype, a dense layer's weight dtype), as PEFT +
    bitsandbytes does.
    Raises ValueError, before changing anything, when a target matches nothing (naming available modules),
    when a match is not a Linear layer, or when r is not an int >= 1. As in PEFT, r above a layer's
    min(in_features, out_features) is accepted, with one LoraRankWarning naming those layers.
    """
    try:
        check_rank(r)
        check_autocast_adapter_dtype(autocast_adapter_dtype)
    except ValueError as e:
        raise ValueError(f"add_lora: {e}") from None
    names = _match(model, target_modules)
    full_rank = []
    for n in names:
        m = model.get_submodule(n)
        N, K = (m.out_features, m.in_features) if isinstance(m, LoraLinear) else base_shape(m)
        if r > min(N, K):
            full_rank.append(f"{n} (out={N}, in={K})")
        if isinstance(m, LoraLinear) and adapter_name in m.lora_A:
            raise ValueError(f"add_lora: module {n!r} already has an adapter named {adapter_name!r}")
    if not 0.0 <= float(lora_dropout) < 1.0:
        raise ValueError(f"add_lora: lora_dropout must be in [0, 1), got {lora_dropout}")
    if use_dora and lora_bias:
        raise ValueError("add_lora: lora_bias=True is not supported for DoRA (use_dora=True); pass one of them")
    if use_dora:
        for n in names:
            m = model.get_submodule(n)
            why = dora_refusal(m.base_layer if isinstance(m, LoraLinear) else m)
            if why is not None:
                raise ValueError(f"add_lora: use_dora=True: DoRA cannot serve module {n!r}: {why}")
    if full_rank:  # one warning for the whole call, not one per layer
        more = f" and {len(full_rank) - 4} more" if len(full_rank) > 4 else ""
        warn_not_low_rank(f"{len(full_rank)} layer(s): {', '.join(full_rank[:4])}{more}", r)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoraRankWarning)
        for n in names:
            m = model.get_submodule(n)
            if isinstance(m, LoraLinear):
                m.add_adapter(adapter_name, r, lora_alpha, lora_dropout, init, use_rslora, use_dora, lora_bias,
                              autocast_adapter_dtype)
            else:
                layer = LoraLinear(m, r, lora_alpha, lora_dropout, init, use_rslora, adapter_name, use_dora,
                                   lora_bias, autocast_adapter_dtype)
                layer.train(m.training)
                _set_module(model, n, layer)
    _freeze_non_lora(model)
    for layer in lora_layers(model).values():  # only the active adapters train, as in PEFT
        layer.set_adapter(layer.active_adapters)
    init_name = {True: "kaiming", False: "random"}.get(init, init) if isinstance(init, bool) else init
    _configs(model)[adapter_name] = _peft_config(model, r, lora_alpha, lora_dropout, use_rslora, init_name,
                                                 _target_modules_for_config(model, names), use_dora, lora_bias)
    enable_adapter_names(model)
    return model


def _target_modules_for_config(model: nn.Module, names: list[str]) -> list[str]:
    """Leaf names when they select exactly `names` under PEFT's suffix rule, else the full paths."""
    leaves = sorted({n.split(".")[-1] for n in names})
    cands = _candidate_modules(model)
    selected = {n for n in cands if any(n == t or n.endswith("." + t) for t in leaves)}
    return leaves if selected == set(names) else sorted(names)


def prepare_for_qlora(model: nn.Module, r: int = 64, lora_alpha: float = 16, lora_dropout: float = 0.0,
                      adapter_name: str = "default", use_rslora: bool = False, init: str | bool = "kaiming",
                      blocksize: int = 64, compute_dtype: torch.dtype = torch.bfloat16,
                      autocast_adapter_dtype: bool = True) -> nn.Module:
    """QLoRA's recipe: every Linear but the output layer to NF4 (blocksize 64, double quant, bf16 compute)
    through `qpeft.quantize_model`, then `add_lora(model, "all-linear", ...)` (defaults r=64, alpha=16 as in
    artidoro/qlora). Returns the model, frozen except the adapters. autocast_adapter_dtype: as for add_lora
    (False: adapters in `compute_dtype`); checked before the model is quantized."""
    try:
        check_autocast_adapter_dtype(autocast_adapter_dtype)
    except ValueError as e:
        raise ValueError(f"prepare_for_qlora: {e}") from None
    skip = tuple(sorted(_output_layer_names(model))) or ("lm_head",)
    quantize_model(model, skip_modules=skip, quant_type="nf4", blocksize=blocksize, double_quant=True,
                   compute_dtype=compute_dtype)
    return add_lora(model, "all-linear", r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                    adapter_name=adapter_name, use_rslora=use_rslora, init=init,
                    autocast_adapter_dtype=autocast_adapter_dtype)


def set_lora_adapter(model: nn.Module, adapter_names: str | list[str]) -> None:
    """Activate adapter(s) in every LoRA layer that has them (several: outputs summed)."""
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    layers = lora_layers(model)
    known = {a for m in layers.values() for a in m.lora_A}
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"set_lora_adapter: unknown adapter(s) {missing}; the model has {sorted(known)}")
    for m in layers.values():
        m.set_adapter([n for n in names if n in m.lora_A])


def delete_lora_adapter(model: nn.Module, adapter_name: str) -> None:
    layers = [m for m in lora_layers(model).values() if adapter_name in m.lora_A]
    if not layers:
        raise ValueError(f"delete_lora_adapter: the model has no adapter {adapter_name!r}")
    for m in layers:
        m.delete_adapter(adapter_name)
    _configs(model).pop(adapter_name, None)


@contextlib.contextmanager
def disable_lora(model: nn.Module):
    """Context manager: the model computes its base outputs (like PEFT's `disable_adapter()`). Merged layers
    run their kept pre-merge weight inside and are merged again, bit for bit, on exit (see
    LoraLinear.disable_adapters)."""
    with contextlib.ExitStack() as stack:
        for m in lora_layers(model).values():
            stack.enter_context(m.disable_adapters())
        yield model


def merge_lora(model: nn.Module, adapter_names: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Merge active (or the named) adapters into every base layer; returns {path: {adapter: error}}."""
    return {n: m.merge([a for a in adapter_names if a in m.lora_A] if adapter_names is not None else None)
            for n, m in lora_layers(model).items()}


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.unmerge()


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every LoraLinear by its merged plain layer (see LoraLinear.merge_and_unload); returns model."""
    for n, m in lora_layers(model).items():
        _set_module(model, n, m.merge_and_unload(dtype))
    _configs(model).clear()
    return model


# ---------------------------------------------------------------------------------------------- adapter files
def _adapter_names(model: nn.Module) -> list[str]:
    names = []
    for m in lora_layers(model).values():
        names += [a for a in m.lora_A if a not in names]
    return names


def _config_for_save(model: nn.Module, adapter_name: str) -> dict:
    layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.lora_A}
    first = next(iter(layers.values()))
    cfg = dict(_configs(model).get(adapter_name) or _peft_config(
        model, first.r[adapter_name], first.lora_alpha[adapter_name], first.lora_dropout[adapter_name],
        first.use_rslora[adapter_name], first.init[adapter_name], [], first.use_dora[adapter_name],
        first.lora_bias[adapter_name]))
    # the files describe what the model holds now (layers may have been added by several calls)
    cfg["target_modules"] = _target_modules_for_config(model, list(layers))
    r, alpha = cfg["r"], cfg["lora_alpha"]
    cfg["rank_pattern"] = {n: m.r[adapter_name] for n, m in layers.items() if m.r[adapter_name] != r}
    cfg["alpha_pattern"] = {n: m.lora_alpha[adapter_name] for n, m in layers.items()
                            if m.lora_alpha[adapter_name] != alpha}
    return cfg


def _state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    out = {}
    for n, m in lora_layers(model).items():
        if adapter_name in m.lora_A:
            out[f"{PEFT_PREFIX}{n}.lora_A.weight"] = m.lora_A[adapter_name].weight
            out[f"{PEFT_PREFIX}{n}.lora_B.weight"] = m.lora_B[adapter_name].weight
            if m.lora_bias[adapter_name]:
                out[f"{PEFT_PREFIX}{n}.lora_B.bias"] = m.lora_B[adapter_name].bias
            if m.use_dora[adapter_name]:  # PEFT's file key: no ".weight" (lora/model.py _get_adapter_state_dict)
                out[f"{PEFT_PREFIX}{n}.lora_magnitude_vector"] = m.lora_magnitude_vector[adapter_name].weight
    return out


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the module path."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# What this path does not implement besides the layer options every path refuses (lora_options): the model-level
# options PEFT applies outside the LoRA layers.
_UNSUPPORTED = {"bias": ("none", None), "modules_to_save": (None, []), "layers_to_transform": (None, [])}


def _load(model: nn.Module, config: dict, tensors: dict, adapter_name: str,
          autocast_adapter_dtype: bool = True) -> None:
    """autocast_adapter_dtype: the dtype of the adapters this load creates (see add_lora); the file's values are
    rounded to it, as PEFT's load_adapter copies them. An adapter the model has already keeps its dtype."""
    check_autocast_adapter_dtype(autocast_adapter_dtype)
    check_lora_options(config)  # DoRA, aLoRA and the other variants, ...: refused as on PEFT's path, model untouched
    errors = []
    for key, ok in _UNSUPPORTED.items():
        if key in config and config[key] not in ok:
            errors.append(f"config {key}={config[key]!r} is not supported (supported: {ok[0]!r})")
    init = config.get("init_lora_weights", True)
    if init_rewrites_base(init):  # PEFT re-runs it on the base as it loads the adapter; this path only adds A, B
        errors.append(f"config init_lora_weights={init!r}: PEFT re-runs this init on the base weight when it loads "
                      f"the adapter, qpeft.load_adapter does not; load it with qpeft.peft_from_pretrained (PEFT's "
                      f"path on qpeft's 4-bit layers), or save it as a plain LoRA (PEFT's save_pretrained("
                      f"path_initial_model_for_weight_conversion=...))")
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    use_dora, lora_bias = bool(config.get("use_dora", False)), bool(config.get("lora_bias", False))
    if use_dora and lora_bias:  # PEFT's LoraConfig refuses the pair
        errors.append("config use_dora=True with lora_bias=True is not supported (PEFT refuses it too)")
    expected = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if use_dora else set()) | \
        ({"lora_B.bias"} if lora_bias else set())
    pieces: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, t in tensors.items():
        path = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        # PEFT's file keys (<module>.lora_A.weight, .lora_B.weight, .lora_B.bias, .lora_magnitude_vector), also
        # with the adapter name in them (the in-memory form)
        m = (re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.(weight|bias)", path)
             or re.fullmatch(r"(.+)\.(lora_magnitude_vector)(?:(?:\.[^.]+)?\.weight)?()", path))
        if m is None:
            errors.append(f"unexpected key {key!r} (a LoRA file holds <module>.lora_A.weight / .lora_B.weight, "
                          f"and .lora_B.bias with lora_bias, .lora_magnitude_vector with DoRA)")
            continue
        part = m.group(2) + (".bias" if m.group(3) == "bias" else "")
        if m.group(1).endswith(".base_layer") or ".lora_" in m.group(1):
            errors.append(f"unexpected key {key!r}")
            continue
        if part not in expected:
            errors.append(f"unexpected key {key!r}: the config has use_dora={use_dora}, lora_bias={lora_bias}")
            continue
        pieces[m.group(1)][part] = t
    if not pieces and not errors:
        errors.append("the adapter file holds no LoRA tensors")
    plan = []
    for path, ab in pieces.items():
        try:
            m = model.get_submodule(path)
        except AttributeError:
            errors.append(f"module {path!r} (from the adapter file) does not exist in the model")
            continue
        if isinstance(m, LoraLinear):
            N, K = m.out_features, m.in_features
        elif _is_target_type(m):
            N, K = base_shape(m)
        else:
            errors.append(f"module {path!r} is a {type(m).__name__}, not an nn.Linear/QLinearNF4")
            continue
        if set(ab) != expected:
            errors.append(f"module {path!r}: the file has {sorted(ab)} but needs {sorted(expected)}")
            continue
        if use_dora:
            why = dora_refusal(m.base_layer if isinstance(m, LoraLinear) else m)
            if why is not None:
                errors.append(f"module {path!r}: use_dora=True: DoRA cannot serve it: {why}")
                continue
        A, B = ab["lora_A"], ab["lora_B"]
        r = _pattern_value(config.get("rank_pattern"), path, r_default)
        alpha = _pattern_value(config.get("alpha_pattern"), path, alpha_default)
        if A.dim() != 2 or B.dim() != 2 or tuple(A.shape) != (r, K) or tuple(B.shape) != (N, r):
            errors.append(f"module {path!r} (out={N}, in={K}) with r={r}: expected lora_A ({r}, {K}) and lora_B "
                          f"({N}, {r}), the file has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}")
            continue
        extra = {k: v for k, v in ab.items() if k in ("lora_magnitude_vector", "lora_B.bias")}
        bad = [k for k, v in extra.items() if tuple(v.shape) != (N,)]
        if bad:
            errors.append(f"module {path!r} (out={N}): {', '.join(f'{k} {tuple(ab[k].shape)}' for k in bad)}, "
                          f"expected ({N},)")
            continue
        if not all(torch.isfinite(t).all() for t in ab.values()):
            errors.append(f"module {path!r}: {'/'.join(sorted(ab))} hold non-finite values")
            continue
        if isinstance(m, LoraLinear) and adapter_name in m.lora_A and (m.use_dora[adapter_name], m.lora_bias[
                adapter_name]) != (use_dora, lora_bias):
            errors.append(f"module {path!r} already has adapter {adapter_name!r} with use_dora="
                          f"{m.use_dora[adapter_name]}, lora_bias={m.lora_bias[adapter_name]}; the file has "
                          f"use_dora={use_dora}, lora_bias={lora_bias}")
            continue
        if isinstance(m, LoraLinear) and adapter_name in m.lora_A and m.r[adapter_name] != r:
            errors.append(f"module {path!r} already has adapter {adapter_name!r} with r={m.r[adapter_name]}, "
                          f"the file has r={r}")
            continue
        plan.append((path, m, ab, r, alpha))
    if errors:
        raise ValueError("load_adapter: the LoRA adapter does not fit the model; nothing was changed:\n  "
                         + "\n  ".join(errors[:20]) + (f"\n  ... ({len(errors)} errors)" if len(errors) > 20 else ""))
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    rslora = bool(config.get("use_rslora", False))
    for path, m, ab, r, alpha in plan:
        if isinstance(m, LoraLinear):
            layer = m
            if adapter_name not in layer.lora_A:
                layer.add_adapter(adapter_name, r, alpha, dropout, "kaiming", rslora, use_dora, lora_bias,
                                  autocast_adapter_dtype)
        else:
            layer = LoraLinear(m, r, alpha, dropout, "kaiming", rslora, adapter_name, use_dora, lora_bias,
                               autocast_adapter_dtype)
            layer.train(m.training)
            _set_module(model, path, layer)
        with torch.no_grad():
            layer.lora_A[adapter_name].weight.copy_(ab["lora_A"])
            layer.lora_B[adapter_name].weight.copy_(ab["lora_B"])
            if lora_bias:
                layer.lora_B[adapter_name].bias.copy_(ab["lora_B.bias"])
            if use_dora:
                layer.lora_magnitude_vector[adapter_name].weight.copy_(ab["lora_magnitude_vector"])
    _freeze_non_lora(model)
    for layer in lora_layers(model).values():
        layer.set_adapter(layer.active_adapters)
    cfg = {k: v for k, v in config.items() if k not in ("peft_version", "auto_mapping")}
    cfg["inference_mode"] = False
    _configs(model)[adapter_name] = cfg
    enable_adapter_names(model)


register_method(AdapterMethod(peft_type="LORA", adapter_names=_adapter_names, config=_config_for_save,
                              state_dict=_state_dict, load=_load, load_options=("autocast_adapter_dtype",)))
