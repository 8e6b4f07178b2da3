"""The projection a linear module computes, as the fused blocks take it (`LoraProjection`), or why it cannot be.

A fused block (qpeft.lora_mlp / lora_qkv) reads the projections' tensors itself and never calls their modules, so
a module is taken only when its whole forward is known: what the fused block computes must be what the module
would have. Taken:
- a module that says itself which projection it computes (`fused_projection()`: qpeft's LoraLinear, and
  QPeftLoraLinear, PEFT's layer over a QLinearNF4, from qpeft.integrations.peft); it raises ValueError for a
  state it cannot describe (a mixed-adapter batch, several adapters with dropout, a ZeRO-3 partitioned base);
- nn.Linear with a frozen weight; QLinearNF4; bitsandbytes' Linear4bit (NF4/FP4);
- PEFT's LoRA layers `lora.Linear` (dense base) and `lora.bnb.Linear4bit` (bitsandbytes base), vanilla LoRA only:
  their active adapters from `lora_A[name]` / `lora_B[name]` / `scaling[name]` / `lora_dropout[name]`.
Refused, with the reason (the caller then runs transformers' forward, which calls the modules): a trainable base
weight (the fused blocks compute no base-weight gradient), DoRA / lora_bias / other LoRA variants, several active
adapters with dropout, a merged layer with adapters disabled, forward hooks (PEFT's adapter_names hooks,
DeepSpeed's per-module gathering: the fused block would skip them), accelerate's device-placement hooks, and any
other module.
"""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

from ...autograd.lora_mlp import LoraProjection
from ...modules.qlinear_nf4 import QLinearNF4

__all__ = ["projection_of", "hook_refusal"]


def hook_refusal(module: nn.Module) -> str | None:
    """Why `module`'s forward cannot be skipped: a forward (pre-)hook or accelerate's hook, else None. A hook
    that marks itself `_qpeft_fused_safe` (the module's fused_projection accounts for it) does not count."""
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    hooks = [h for h in hooks if not getattr(h, "_qpeft_fused_safe", False)]
    if hooks:
        names = sorted({getattr(h, "__qualname__", type(h).__name__) for h in hooks})
        return f"{type(module).__name__} has forward hooks ({', '.join(names)}) that a fused block would skip"
    if getattr(module, "_hf_hook", None) is not None:
        return f"{type(module).__name__} has an accelerate hook ({type(module._hf_hook).__name__}, e.g. " \
               f"device_map offload) that a fused block would skip"
    return None


def _is_bnb_4bit(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes") and hasattr(getattr(module, "weight", None),
                                                                           "quant_state")


def _base_projection(module: nn.Module) -> LoraProjection | str:
    """A projection without adapter: nn.Linear (frozen), QLinearNF4, bitsandbytes Linear4bit."""
    refusal = hook_refusal(module)
    if refusal:
        return refusal
    if isinstance(module, QLinearNF4):
        return LoraProjection(module)
    if _is_bnb_4bit(module):
        state = module.weight.quant_state
        if state is None:
            return f"{type(module).__name__} is not quantized yet (no quant_state: move it to its device first)"
        return LoraProjection((module.weight, state), bias=module.bias)
    if type(module) is nn.Linear:
        trainable = module.weight.requires_grad or (module.bias is not None and module.bias.requires_grad)
        if trainable and torch.is_grad_enabled():
            return "a trainable base weight (the fused blocks compute no gradient for it; train it with LoRA, " \
                   "or call unfuse for full fine-tuning)"
        return LoraProjection(module)
    return f"{type(module).__module__}.{type(module).__name__} is not a projection the fused blocks take"


def _peft_lora_types() -> tuple[type, ...]:
    """PEFT's vanilla LoRA layer classes on dense and bitsandbytes bases (only when PEFT is loaded: no PEFT
    layer can exist otherwise)."""
    if "peft" not in sys.modules:
        return ()
    from peft.tuners.lora import layer

    types = [layer.Linear]
    bnb = sys.modules.get("peft.tuners.lora.bnb")
    if bnb is not None and hasattr(bnb, "Linear4bit"):
        types.append(bnb.Linear4bit)
    return tuple(types)


def _peft_projection(layer: nn.Module) -> LoraProjection | str:
    """PEFT's lora.Linear / lora.bnb.Linear4bit as its forward computes it: base(x) + sum over its active adapters
    of scaling * B(A(dropout(x)))."""
    what = f"PEFT {type(layer).__name__}"
    if layer.disable_adapters:
        if layer.merged:
            return f"{what} has merged adapters but adapters are disabled (its forward unmerges first)"
        return _base_projection(layer.base_layer)
    if layer.merged:  # the merged deltas live in the base weight: PEFT's forward is the base layer
        return _base_projection(layer.base_layer)
    if getattr(layer, "fan_in_fan_out", False):
        return f"{what} with fan_in_fan_out=True"
    base = _base_projection(layer.base_layer)
    if isinstance(base, str):
        return base
    names = [n for n in layer.active_adapters if n in layer.lora_A]
    if not names:
        return base
    parts = []
    for n in names:
        variant = getattr(layer, "lora_variant", {}).get(n)
        if variant is not None:
            return f"{what} adapter {n!r} is a LoRA variant ({type(variant).__name__}, e.g. DoRA)"
        if layer.use_dora.get(n, False):
            return f"{what} adapter {n!r} uses DoRA"
        A, B, drop = layer.lora_A[n], layer.lora_B[n], layer.lora_dropout[n]
        if type(A) is not nn.Linear or type(B) is not nn.Linear or A.bias is not None or B.bias is not None:
            return f"{what} adapter {n!r} has a lora_bias or a non-linear adapter module"
        for m in (A, B, drop):
            refusal = hook_refusal(m)
            if refusal:
                return refusal
        if isinstance(drop, nn.Dropout):
            p = float(drop.p)
        elif type(drop) is nn.Identity:
            p = 0.0
        else:
            return f"{what} adapter {n!r} has a {type(drop).__name__} dropout"
        parts.append((A.weight, B.weight, float(layer.scaling[n]), p))
    if len(parts) == 1:
        A, B, scale, p = parts[0]
        return base._replace(A=A, B=B, scale=scale, dropout_p=p)
    if any(p > 0.0 for *_, p in parts):
        return f"{what} has several active adapters {names} with dropout (independent masks)"
    # several adapters without dropout: one rank-stacked adapter, the scalings folded into B (as LoraLinear does)
    A = torch.cat([a.float() for a, *_ in parts], 0)
    B = torch.cat([b.float() * s for _, b, s, _ in parts], 1)
    return base._replace(A=A, B=B, scale=1.0)


def projection_of(module: nn.Module) -> LoraProjection | str:
    """The LoraProjection `module` computes, or a string saying why it cannot be given to a fused block."""
    refusal = hook_refusal(module)
    if refusal:
        return refusal
    fused = getattr(module, "fused_projection", None)
    if callable(fused):
        try:
            return fused()
        except ValueError as e:
            return str(e)
    peft_types = _peft_lora_types()
    if peft_types and type(module) in peft_types:
        return _peft_projection(module)
    return _base_projection(module)
