"""The mixed-batch forward of one LoRA layer: PEFT's `adapter_names=` (one adapter name per batch row) as two ops
over a per-layer pool of all its adapters, instead of PEFT's Python loop over the adapters present (gather rows,
two small GEMMs, scatter back, per adapter per layer).

A layer runs its base once and then qpeft::lora_shrink_gathered and qpeft::lora_expand_gathered (ops/multi_lora.py)
for all rows together, over its adapters concatenated along the rank (heterogeneous ranks, no padding). The pool is
a derived copy built at first use and rebuilt when an adapter is added, removed or its weights change (tracked by
tensor versions): adding or removing one adapter never touches the others' parameters. Inference only (no
gradients), as in PEFT. The model-level argument (`model(..., adapter_names=...)`, generate) lives in
qpeft.tuners.lora.mixed_batch.

Works on any layer with LoraLinear's attributes (lora_A/lora_B ModuleDicts, r, scaling, base_layer, merged,
_disabled, _base_operand): this module does not import the layer classes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..ops import multi_lora as _multi_lora_ops  # noqa: F401  (registers qpeft::lora_*_gathered)

__all__ = ["BASE_ADAPTER"]

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in adapter_names

TRAINING = "Cannot pass `adapter_names` when the model is in training mode."
MERGED = "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
DORA = "Cannot pass `adapter_names` when DoRA is enabled."  # PEFT 0.21.2's LoraLayer._check_forward_args


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
    bias_cat: torch.Tensor | None = None  # (L, N) fp32 scaling * lora_B.bias (zeros without lora_bias), or None


def _pool_key(layer: nn.Module, device: torch.device) -> tuple:
    # identity, storage and in-place version of every factor: load_adapter's copy_, an optimizer step or a new
    # or deleted adapter all change it (the pool keeps the tensors alive, so their ids are not reused)
    def ident(t):
        return id(t), t.data_ptr(), t._version

    def bias_ident(n):
        bias = layer.lora_B[n].bias
        return () if bias is None else ident(bias)

    return (device,) + tuple((n, *ident(layer.lora_A[n].weight), *ident(layer.lora_B[n].weight), *bias_ident(n),
                              layer.r[n], layer.scaling[n]) for n in layer.lora_A)


def adapter_pool(layer: nn.Module, device: torch.device) -> AdapterPool:
    """The layer's pool, rebuilt only when its adapters changed (cached on the layer, not in its state dict)."""
    key = _pool_key(layer, device)
    pool = layer.__dict__.get("_qpeft_pool")
    if pool is not None and pool.key == key:
        return pool
    names = list(layer.lora_A)
    with torch.no_grad():
        A_cat = torch.cat([layer.lora_A[n].weight.detach().float() for n in names], 0).to(device).contiguous()
        B_cat = torch.cat([layer.lora_B[n].weight.detach().float() for n in names], 1).to(device).contiguous()
        bias_cat = None
        if any(layer.lora_B[n].bias is not None for n in names):  # lora_bias: scaling * bias per adapter
            bias_cat = torch.stack([layer.lora_B[n].bias.detach().float() * layer.scaling[n]
                                    if layer.lora_B[n].bias is not None else
                                    torch.zeros(layer.out_features, device=A_cat.device) for n in names]).to(device)
    starts = [0]
    for n in names:
        starts.append(starts[-1] + layer.r[n])
    pool = AdapterPool(key=key, A_cat=A_cat, B_cat=B_cat,
                       rank_start=torch.tensor(starts, dtype=torch.int32, device=device),
                       scale=torch.tensor([layer.scaling[n] for n in names], dtype=torch.float32, device=device),
                       slot={n: a for a, n in enumerate(names)}, max_rank=max(layer.r[n] for n in names),
                       refs=[t for n in names for t in (layer.lora_A[n].weight, layer.lora_B[n].weight)],
                       bias_cat=bias_cat)
    layer.__dict__["_qpeft_pool"] = pool
    return pool


def mixed_batch_forward(layer: nn.Module, x: torch.Tensor, adapter_names) -> torch.Tensor:
    """LoraLinear.forward(x, adapter_names=[...]): row b of x (its first dimension) uses adapter_names[b]."""
    names = check_names_type(adapter_names)
    if len(x) != len(names):
        raise ValueError("Length of `adapter_names` should be the same as the number of inputs, but got "
                         f"{len(names)} and {len(x)} respectively.")
    if layer.merged:
        raise ValueError(MERGED)
    if layer.training:  # PEFT checks this at model level; a lone layer refuses too (the ops have no backward)
        raise ValueError(TRAINING)
    use_dora = getattr(layer, "use_dora", {})
    if any(use_dora.get(n, False) for n in set(names) - {BASE_ADAPTER}):
        raise ValueError(DORA)
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
    ops = torch.ops.qpeft
    xa = ops.lora_shrink_gathered(x.reshape(-1, K).to(compute_dtype), pool.A_cat, pool.rank_start, index,
                                  pool.max_rank)
    out = ops.lora_expand_gathered(y.reshape(-1, N), xa, pool.B_cat, pool.rank_start, pool.scale, index)
    if pool.bias_cat is not None:  # lora_bias rows: + scaling * bias of their adapter (base rows: + 0)
        table = torch.cat([pool.bias_cat, pool.bias_cat.new_zeros(1, N)])  # index -1 -> the zero row
        out = (out.float() + table[index.long()]).to(out.dtype)
    return out.reshape(y.shape)


