"""Many LoRA adapters in one batch at model level: PEFT's `adapter_names=` for whole models.

    model(**batch, adapter_names=["fr", "__base__", "de", ...])       one name per batch row
    model.generate(**inputs, adapter_names=[...])                     (num_beams > 1: each name repeated per beam)

As in PEFT 0.21.2 (tuners/lora/model.py `_enable_peft_forward_hooks`, tuners/lora/layer.py
`_check_forward_args` / `_mixed_batch_forward`): `"__base__"` rows get no adapter; a layer that lacks a named
adapter leaves those rows at its base output; the same errors (training mode, non-existing adapter, merged
adapters, length mismatch). A layer that cannot serve the argument says so through its `adapter_names_refusal`
(AdaLoRA's layers do, as PEFT's refuse it: there it reaches the base nn.Linear and raises TypeError).

Each layer's part (one base GEMM, then two ops for all rows) is qpeft.modules.mixed_batch.
"""
from __future__ import annotations

import contextlib

import torch.nn as nn

from ...modules.lora_linear import LoraLinear
from ...modules.mixed_batch import BASE_ADAPTER, TRAINING, check_names_type

__all__ = ["BASE_ADAPTER", "enable_adapter_names"]


# ------------------------------------------------------------------------------------------------ model level
_STATE = "_qpeft_adapter_names_state"


class _State:
    def __init__(self):
        self.stack: list = []


def _layers(model: nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def check_model_adapter_names(model: nn.Module, adapter_names) -> list[str]:
    """PEFT's model-level checks, in its order: training mode, then adapters that exist in no layer."""
    if model.training:
        raise ValueError(TRAINING)
    names = check_names_type(adapter_names)
    refusal = next((r for m in model.modules() if (r := getattr(m, "adapter_names_refusal", None))), None)
    if refusal:
        raise TypeError(refusal)
    expected = {a for m in _layers(model) for a in m.lora_A}
    unexpected = {n for n in names if n != BASE_ADAPTER} - expected
    if unexpected:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unexpected))}")
    return names


@contextlib.contextmanager
def adapter_names_active(model: nn.Module, adapter_names: list[str]):
    """Every LoraLinear of `model` uses `adapter_names` (one per batch row) for calls without the argument."""
    layers = _layers(model)
    saved = [m.__dict__.get("_qpeft_batch_adapter_names") for m in layers]
    for m in layers:
        m.__dict__["_qpeft_batch_adapter_names"] = adapter_names
    try:
        yield
    finally:
        for m, s in zip(layers, saved):
            m.__dict__["_qpeft_batch_adapter_names"] = s


def _pre_hook(model, args, kwargs):
    names = kwargs.pop("adapter_names", None)
    state = model.__dict__[_STATE]
    state.stack.append(None)  # first: the always-called post hook pops one entry even if the checks raise
    if names is None:
        return args, kwargs
    names = check_model_adapter_names(model, names)
    ctx = adapter_names_active(model, names)
    ctx.__enter__()
    state.stack[-1] = ctx
    return args, kwargs


def _post_hook(model, args, kwargs, output):
    state = model.__dict__[_STATE]
    ctx = state.stack.pop() if state.stack else None
    if ctx is not None:
        ctx.__exit__(None, None, None)
    return output


class _GenerateWithAdapterNames:
    """`model.generate(..., adapter_names=[...])`: checks as PEFT, repeats each name per beam (num_beams > 1),
    and runs the model's own generate with the names active in every layer. An object, not a closure, so
    that copy.deepcopy(model) gets a wrapper of the copy."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, adapter_names=None, **kwargs):
        model = self.model
        generate = type(model).generate.__get__(model)
        if adapter_names is None:
            return generate(*args, **kwargs)
        names = check_model_adapter_names(model, adapter_names)
        beams = kwargs.get("num_beams")
        if beams is None and kwargs.get("generation_config") is not None:
            beams = getattr(kwargs["generation_config"], "num_beams", None)
        if isinstance(beams, int) and beams > 1:
            if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
                raise ValueError("adapter_names with num_beams > 1 is not supported on encoder-decoder models "
                                 "(the encoder would need the names unrepeated)")
            names = [n for n in names for _ in range(beams)]
        with adapter_names_active(model, names):
            return generate(*args, **kwargs)


def enable_adapter_names(model: nn.Module) -> None:
    """Make `model(..., adapter_names=...)` and `model.generate(..., adapter_names=...)` work (idempotent;
    called by add_lora / load_adapter / add_adalora on the model they are given)."""
    if _STATE in model.__dict__:
        return
    model.__dict__[_STATE] = _State()
    model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
    if callable(getattr(type(model), "generate", None)):
        model.__dict__["generate"] = _GenerateWithAdapterNames(model)
