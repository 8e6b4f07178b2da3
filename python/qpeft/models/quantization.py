"""Convert a model's nn.Linear layers to QLinearNF4 in place, and load bitsandbytes 4-bit checkpoints.

`quantize_model` is what transformers' `BitsAndBytesConfig(load_in_4bit=True)` does to a model (it also
leaves `lm_head` in full precision), but on an already-built model and with qpeft's kernels.
`load_quantized_checkpoint` reads the safetensors that `save_pretrained` writes for such a model
(bitsandbytes' Linear4bit keys) into a `quantize_model`-converted model, validating everything first.
"""
from __future__ import annotations

import json
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from ..modules.qlinear_nf4 import QLinearNF4, check_finite_weight, parse_bnb_state
from .moe.convert import find_experts, quantize_model_experts

__all__ = ["quantize_model", "QuantizeReport", "load_quantized_checkpoint"]

# Observers of quantize_model on a transformers model: fn(model, converted_names, quant_type, blocksize,
# double_quant, compute_dtype). qpeft.integrations.transformers registers the one that records the
# quantization_config in model.config (dependency inversion: models sit below integrations).
_ON_QUANTIZED: list[Callable] = []


def on_model_quantized(observer: Callable) -> Callable:
    """Register `observer` (idempotent); returns it, so it can decorate."""
    if observer not in _ON_QUANTIZED:
        _ON_QUANTIZED.append(observer)
    return observer



@dataclass
class QuantizeReport:
    """What quantize_model did: converted / skipped layer names and model memory before / after."""
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def __str__(self) -> str:
        mib = 2 ** 20
        return (f"quantized {len(self.converted)} linear layers (skipped {len(self.skipped)}): "
                f"{self.bytes_before / mib:.2f} MiB -> {self.bytes_after / mib:.2f} MiB "
                f"(saved {self.bytes_saved / mib:.2f} MiB)")


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (each tensor once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _matches(name: str, patterns) -> bool:
    """PEFT-style matching: a regex string must fullmatch the name; a list entry matches the full name or
    its dotted suffix/prefix (e.g. "q_proj" matches "model.layers.0.self_attn.q_proj")."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) or name.startswith(p + ".") for p in patterns)


def quantize_model(model: nn.Module, target_modules=None, skip_modules=("lm_head",), quant_type: str = "nf4",
                   blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = torch.bfloat16, experts: bool = True) -> QuantizeReport:
    """Replace nn.Linear layers of `model` by QLinearNF4 in place (each quantized on its own device), and hold the
    fused MoE experts of a transformers 5 model in 4 bits (experts=True; see qpeft.models.moe).

    target_modules: None (every nn.Linear and experts module), a regex (fullmatch on the module name) or a list of
    names / name suffixes; skip_modules: names / suffixes never converted (default: the output head, as
    transformers does). Returns a QuantizeReport (converted experts modules are listed by module name)."""
    if isinstance(target_modules, (list, tuple, set)) and not target_modules:
        raise ValueError("target_modules must be None, a regex or a non-empty list of module names")
    report = QuantizeReport(bytes_before=model_bytes(model))
    linears = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if (target_modules is not None and not _matches(name, target_modules)) or _matches(name, skip_modules or ()):
            report.skipped.append(name)
        else:
            # before anything changes: a bad weight leaves the whole model as it was
            check_finite_weight(m.weight, f"{name}.weight")
            linears.append((name, m))
    if experts:  # first: all experts are quantized before any module changes (a failure leaves the model as it was)
        skipped = [t.name for t in find_experts(model) if (target_modules is not None and not _matches(
            t.name, target_modules)) or _matches(t.name, skip_modules or ())]
        report.skipped += skipped
        report.converted += quantize_model_experts(model, skipped, quant_type=quant_type, blocksize=blocksize,
                                                   double_quant=double_quant)
    for name, linear in linears:
        q = QLinearNF4.from_linear(linear, compute_dtype=compute_dtype, quant_type=quant_type, blocksize=blocksize,
                                   double_quant=double_quant)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
        report.converted.append(name)
    if target_modules is not None and not report.converted:
        raise ValueError(f"target_modules {target_modules!r} matched no nn.Linear layer (nor fused experts)")
    if report.converted and _is_transformers_model(model):
        # save_pretrained must write a quantization_config, or from_pretrained would rebuild plain nn.Linear
        # layers and freshly initialise their weights: the transformers integration records it (it registers
        # itself below when transformers is imported beside qpeft; this module does not know transformers)
        if not _ON_QUANTIZED:
            warnings.warn("quantize_model: quantization_config not recorded in model.config (qpeft's transformers "
                          "integration is not loaded: an unsupported transformers release?); from_pretrained of its "
                          "save_pretrained output would not restore the 4-bit layers", RuntimeWarning, stacklevel=2)
        for observer in _ON_QUANTIZED:
            observer(model, report.converted, quant_type, blocksize, double_quant, compute_dtype)
    report.bytes_after = model_bytes(model)
    return report


def _is_transformers_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # never imported here: a transformers model implies it is
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _read_safetensors(path: str | Path) -> dict:
    """All tensors of a .safetensors file, or of a save_pretrained directory (single file or sharded)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        return load_file(str(path))
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for f in files:
            state.update(load_file(str(path / f)))
        return state
    single = path / "model.safetensors"
    if single.exists():
        return load_file(str(single))
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def load_quantized_checkpoint(model: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Load a bitsandbytes 4-bit checkpoint (e.g. `save_pretrained` of a transformers model quantized with
    BitsAndBytesConfig) into a model converted by `quantize_model`.

    Every key, shape and quantization header is checked before anything is copied: on any mismatch a
    ValueError lists the problems and the model is left unchanged. strict=True (the default) allows keys
    missing from the checkpoint only for tied parameters whose twin is present, and refuses unexpected keys,
    among them a checkpoint bias for a 4-bit layer built without one (nn.Linear's rule); strict=False ignores
    unexpected keys and accepts missing ones outside the 4-bit layers."""
    state = _read_safetensors(path)
    problems: list[str] = []
    qlayers = {name: m for name, m in model.named_modules() if isinstance(m, QLinearNF4)}
    covered: set[str] = set()
    for name, m in qlayers.items():
        prefix = name + "." if name else ""
        # a bias is this layer's only if it has one: a checkpoint bias for a bias-free layer is an unexpected
        # key (nn.Linear's rule), not something to drop silently
        covered.update(k for k in state if k.startswith(prefix + "weight") or (k == prefix + "bias"
                                                                                and m.bias is not None))
        try:
            parse_bnb_state(state, prefix, m.out_features, m.in_features)
        except (KeyError, ValueError) as e:
            problems.append(f"{name}: {e.args[0]}")
        if m.bias is not None and prefix + "bias" not in state:
            problems.append(f"{name}: missing {prefix}bias")
    qprefixes = tuple(n + "." for n in qlayers)
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(qprefixes)}
    twins: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        twins.setdefault(id(p), []).append(n)
    names_of = {n: group for group in twins.values() for n in group}
    for k, v in expected.items():
        if k in state:
            if tuple(state[k].shape) != tuple(v.shape):
                problems.append(f"size mismatch for {k}: checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)}")
        elif strict and not any(t in state for t in names_of.get(k, ())):
            problems.append(f"missing key {k}")
    if strict:
        extra = sorted(k for k in state if k not in expected and k not in covered)
        if extra:
            problems.append(f"unexpected keys: {extra[:10]}{' ...' if len(extra) > 10 else ''}")
    if problems:
        raise ValueError("cannot load checkpoint {}:\n  {}".format(path, "\n  ".join(problems)))
    model.load_state_dict(state, strict=False)
