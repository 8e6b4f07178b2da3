"""Many LoRA adapters in one batch: PEFT's `adapter_names=` for `LoraLinear` layers and whole models.

    model(**batch, adapter_names=["fr", "__base__", "de", ...])       one name per batch row
    model.generate(**inputs, adapter_names=[...])                     (num_beams > 1: each name repeated per beam)

As in PEFT 0.21.2 (tuners/lora/model.py `_enable_peft_forward_hooks`, tuners/lora/layer.py
`_check_forward_args` / `_mixed_batch_forward`): `"__base__"` rows get no adapter; a layer that lacks a named
adapter leaves those rows at its base output; the same errors (training mode, non-existing adapter, merged
adapters, length mismatch). AdaLoRA layers refuse the argument, as PEFT's do (there it reaches the base
nn.Linear and raises TypeError).

Instead of PEFT's Python loop over the adapters present (gather rows, two small GEMMs, scatter back, per
adapter per layer), a layer runs its base once and two ops for all rows together (ops/multi_lora.py):
qpeft::lora_shrink_gathered and qpeft::lora_expand_gathered over a per-layer pool of all its adapters,
concatenated along the rank (heterogeneous ranks, no padding). The pool is a derived copy built at first use
and rebuilt when an adapter is added, removed or its weights change (tracked by tensor versions): adding or
removing one adapter never touches the others' parameters. Inference only (no gradients), as in PEFT.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ...modules.lora_linear import LoraLinear

__all__ = ["BASE_ADAPTER"]

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names

_TRAINING = "Cannot pass `adapter_names` when the model is in training mode."
_MERGED = "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
_ADALORA = ("adapter_names is not supported for AdaLoRA layers (PEFT 0.21.2 refuses it too: its AdaLoRA layers "
            "pass the argument on to the base layer, which raises TypeError)")


def _ops():
    from ...ops import multi_lora  # noqa: F401  (registers qpeft::lora_*_gathered)

    return torch.ops.qpeft


def check_names_type(adapter_names) -> list[str]:
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
    return list(adapter_names)


# ------------------------------------------------------------------------------------------------ layer level
@dataclass
class AdapterPool:
    """One layer's adapters, concatenated along the rank: A_cat (R, K), B_cat (N, R) fp32, rank_start (L+1,)
    int32, scale (L,) fp32, slot {name: a}."""

    key: tuple
    A_cat: torch.Tensor
    B_cat: torch.Tensor
    rank_start: torch.Tensor
    scale: torch.Tensor
    slot: dict
    max_rank: int
    refs: list
    index_cache: dict = field(default_factory=dict)


def _pool_key(layer: LoraLinear, device: torch.device) -> tuple:
    # identity, storage and in-place version of every factor: load_adapter's copy_, an optimizer step or a new
    # or deleted adapter all change it (the pool keeps the tensors alive, so their ids are not reused)
    def ident(t):
        return id(t), t.data_ptr(), t._version

    return (device,) + tuple((n, *ident(layer.lora_A[n].weight), *ident(layer.lora_B[n].weight), layer.r[n],
                              layer.scaling[n]) for n in layer.lora_A)


def adapter_pool(layer: LoraLinear, device: torch.device) -> AdapterPool:
    """The layer's pool, rebuilt only when its adapters changed (cached on the layer, not in its state dict)."""
    key = _pool_key(layer, device)
    pool = layer.__dict__.get("_qpeft_pool")
    if pool is not None and pool.key == key:
        return pool
    names = list(layer.lora_A)
    with torch.no_grad():
        A_cat = torch.cat([layer.lora_A[n].weight.detach().float() for n in names], 0).to(device).contiguous()
        B_cat = torch.cat([layer.lora_B[n].weight.detach().float() for n in names], 1).to(device).contiguous()
    starts = [0]
    for n in names:
        starts.append(starts[-1] + layer.r[n])
    pool = AdapterPool(key=key, A_cat=A_cat, B_cat=B_cat,
                       rank_start=torch.tensor(starts, dtype=torch.int32, device=device),
                       scale=torch.tensor([layer.scaling[n] for n in names], dtype=torch.float32, device=device),
                       slot={n: a for a, n in enumerate(names)}, max_rank=max(layer.r[n] for n in names),
                       refs=[t for n in names for t in (layer.lora_A[n].weight, layer.lora_B[n].weight)])
    layer.__dict__["_qpeft_pool"] = pool
    return pool


def mixed_batch_forward(layer: LoraLinear, x: torch.Tensor, adapter_names) -> torch.Tensor:
    """LoraLinear.forward(x, adapter_names=[...]): row b of x (its first dimension) uses adapter_names[b]."""
    names = check_names_type(adapter_names)
    if len(x) != len(names):
        raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                         f"{len(names)} and {len(x)} respectively.")
    if layer.merged:
        raise ValueError(_MERGED)
    if layer.training:  # PEFT checks this at model level; a lone layer refuses too (the ops have no backward)
        raise ValueError(_TRAINING)
    if layer._disabled:
        return layer.base_layer(x)
    y = layer.base_layer(x)
    if not layer.lora_A:
        return y
    pool = adapter_pool(layer, y.device)
    key = tuple(names)
    index_b = pool.index_cache.get(key)
    if index_b is None:
        slots = [pool.slot.get(n, -1) for n in names]  # "__base__" and adapters this layer lacks: -1 (PEFT)
        if all(s < 0 for s in slots):
            return y
        index_b = torch.tensor(slots, dtype=torch.int32).to(y.device)
        pool.index_cache.clear()  # keep one: a generate loop repeats the same names every step
        pool.index_cache[key] = index_b
    K, N = layer.in_features, layer.out_features
    per_row = x.numel() // max(len(x) * K, 1)  # tokens per sequence: (B, S, K) inputs
    index = index_b.repeat_interleave(per_row) if per_row != 1 else index_b
    _, _, compute_dtype, _ = layer._base_operand(x)
    ops = _ops()
    xa = ops.lora_shrink_gathered(x.reshape(-1, K).to(compute_dtype), pool.A_cat, pool.rank_start, index,
                                  pool.max_rank)
    out = ops.lora_expand_gathered(y.reshape(-1, N), xa, pool.B_cat, pool.rank_start, pool.scale, index)
    return out.reshape(y.shape)


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
        raise ValueError(_TRAINING)
    names = check_names_type(adapter_names)
    from ..adalora import AdaLoraLinear

    if any(isinstance(m, AdaLoraLinear) for m in model.modules()):
        raise TypeError(_ADALORA)
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
