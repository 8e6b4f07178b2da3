"""Finding a model's fused experts and converting them to 4 bits (or back), in place.

An experts module is what transformers 5's `@use_experts_implementation` decorates (Qwen2/3-MoE, Mixtral, OLMoE,
DeepSeek-V2/V3, GLM-4.5, gpt-oss, ...): its __init__ sets `has_gate`, `is_transposed`, `has_bias`, and it holds
3-D Parameters `gate_up_proj` (or `up_proj` without a gate) and `down_proj`, expert first. Nothing here imports
transformers: the attributes the decorator sets are what is read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from ...modules.nf4_experts import ExpertsSpec, NF4ExpertsMixin, dense_class, is_nf4_experts, nf4_experts_class
from ...quant.experts import quantize_experts

__all__ = ["ExpertsTarget", "find_experts", "experts_params", "await_experts", "quantize_experts_module",
           "quantize_model_experts", "dequantize_experts_module", "is_experts_module"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def is_experts_module(module: nn.Module) -> bool:
    """A transformers fused-experts module (what `use_experts_implementation` decorates), dense or 4-bit."""
    if not (hasattr(module, "is_transposed") and hasattr(module, "has_gate")):
        return False
    names = experts_params(module)
    return all(n in module._parameters for n in names)


def experts_params(module: nn.Module) -> tuple[str, str]:
    """(up projection, down projection) parameter names: gate_up_proj / down_proj, or up_proj / down_proj for
    experts without a gate."""
    return ("gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"), "down_proj"


@dataclass
class ExpertsTarget:
    """One experts module to hold in 4 bits: its name in the model and the module."""

    name: str
    module: nn.Module

    @property
    def param_names(self) -> tuple[str, str]:
        return experts_params(self.module)

    def full_names(self) -> list[str]:
        return [f"{self.name}.{p}" if self.name else p for p in self.param_names]


def find_experts(model: nn.Module, skip=None) -> list[ExpertsTarget]:
    """The model's fused-experts modules (4-bit ones too), except those `skip(name)` says to leave alone."""
    out = []
    for name, m in model.named_modules():
        if is_experts_module(m) and not (skip is not None and skip(name)):
            out.append(ExpertsTarget(name, m))
    return out


def _check_param(module: nn.Module, name: str, where: str) -> torch.Tensor:
    p = module._parameters.get(name)
    if p is None or p.dim() != 3 or min(p.shape) <= 0:
        raise ValueError(f"{where}.{name} must be a 3-D (num_experts, d1, d2) Parameter, got "
                         f"{None if p is None else tuple(p.shape)}")
    E = getattr(module, "num_experts", None)
    if E is not None and p.shape[0] != E:
        raise ValueError(f"{where}.{name} has {p.shape[0]} experts, the module (config) has num_experts={E}")
    return p


def await_experts(module: nn.Module, where: str, quant_type: str, blocksize: int, double_quant: bool,
                  dtype: torch.dtype | None = None) -> nn.Module:
    """Make an experts module (typically still on the meta device) a 4-bit one whose parameters await their
    values: same shapes and dtype as placeholders (a checkpoint loader reads them), quantized when filled."""
    specs = []
    for name in experts_params(module):
        p = _check_param(module, name, where)
        specs.append((name, ExpertsSpec(tuple(p.shape), bool(module.is_transposed), quant_type, blocksize, double_quant,
                                        dtype or p.dtype)))
    module.__class__ = nf4_experts_class(type(module))
    for name, spec in specs:
        module.await_nf4_(name, spec)
    return module


def quantize_experts_module(module: nn.Module, where: str = "experts", quant_type: str = "nf4", blocksize: int = 64,
                            double_quant: bool = True) -> nn.Module:
    """Quantize an experts module's dense expert parameters in place (each one expert at a time, on its device).
    Both parameters are quantized before the module changes: on an error (a non-finite weight) it is left as it
    was."""
    quantized = {}
    for name in experts_params(module):
        p = _check_param(module, name, where)
        if p.dtype not in _FLOATS:
            raise TypeError(f"{where}.{name} must be float16, bfloat16 or float32 to quantize, got {p.dtype}")
        try:
            quantized[name] = quantize_experts(p.detach(), blocksize=blocksize, quant_type=quant_type,
                                               double_quant=double_quant, transposed=bool(module.is_transposed))
        except ValueError as e:
            raise ValueError(f"{where}.{name}: {e}") from None
    module.__class__ = nf4_experts_class(type(module))
    for name, w in quantized.items():
        module.set_nf4_weight_(name, w)
    return module


def quantize_model_experts(model: nn.Module, skip_modules=(), quant_type: str = "nf4", blocksize: int = 64,
                           double_quant: bool = True) -> list[str]:
    """Quantize every fused-experts module of `model` in place, except those named (or suffix-matched, or
    fullmatched as a regex string) in `skip_modules`. All of them are quantized before any module changes, so a
    failure leaves the model untouched. Returns the converted module names."""
    def skip(name):
        if isinstance(skip_modules, str):
            return re.fullmatch(skip_modules, name) is not None
        return any(name == s or name.endswith("." + s) or name.startswith(s + ".") for s in skip_modules or ())

    targets = [t for t in find_experts(model, skip) if not is_nf4_experts(t.module)]
    quantized = []
    for t in targets:
        per_param = {}
        for name in t.param_names:
            p = _check_param(t.module, name, t.name)
            try:
                per_param[name] = quantize_experts(p.detach(), blocksize=blocksize, quant_type=quant_type,
                                                   double_quant=double_quant, transposed=bool(t.module.is_transposed))
            except (ValueError, TypeError) as e:
                raise type(e)(f"{t.name}.{name}: {e}") from None
        quantized.append((t, per_param))
    for t, per_param in quantized:
        t.module.__class__ = nf4_experts_class(type(t.module))
        for name, w in per_param.items():
            t.module.set_nf4_weight_(name, w)
    return [t.name for t in targets]


@torch.no_grad()
def dequantize_experts_module(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Back to the model's own experts class with dense Parameters (each the dequantized stack in `dtype`,
    default the dtype it was quantized from)."""
    if not isinstance(module, NF4ExpertsMixin):
        return module
    dense = {name: module.dequantize_nf4(name, dtype) for name in module.nf4_params()}
    for name, w in dense.items():
        module._drop_storage(name)
        module._parameters[name] = nn.Parameter(w, requires_grad=False)
    module.__dict__.pop("_nf4_specs", None)
    module.__class__ = dense_class(module)
    return module
