"""The base weight a `LoraLinear` had before merging, kept so that `unmerge()` and `disable_adapters()` restore it
bit for bit instead of subtracting the delta again.

Why: merging rewrites the base weight. Subtracting the delta is not exact: on an fp32 nn.Linear
fl(fl(W + d) - d) != W for ~10% of the weights (3,372 of 32,768 for a 256 -> 128 layer, r=8); on an NF4 base it
is a second re-quantization, and every further merge/unmerge drifts (a 1024 -> 256 NF4 layer, r=16: mean output
error 0.04 after one disable_adapters() round trip, 1.2 after 50, mean |y| 0.46).

What is kept: an NF4 base's previous quantized tensors (merging replaces them, so keeping them copies nothing;
they cost the layer's own size again, 0.53 bytes per weight at blocksize 64), a dense base's weight cloned in
its dtype (its size again). They are swapped in and out by reference, never re-computed.

When it is used: only while the base still holds exactly what the last merge wrote, checked by the identity,
storage address and in-place version of each tensor (a `stamp`). Anything that writes the base since (a
load_state_dict into the merged layer, a move of the base layer alone) makes the kept weight stale: it is then
dropped and unmerging subtracts the delta as PEFT does. Moving the LoraLinear itself (.to / .cuda / .half) moves
the kept tensors with it (LoraLinear._apply), with QLinearNF4's rule on an NF4 base (tables keep their dtype).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .qlinear_nf4 import absmax_from_bytes

__all__ = ["Storage", "Stamp", "snapshot", "put", "stamp", "same_stamp", "moved", "Held"]

# the tensors that are the weight of a QLinearNF4 (what _set_quantized writes) and of an nn.Linear
_NF4_STORAGE = ("weight", "absmax_bytes", "quant_map", "nested_absmax", "nested_quant_map", "offset")
_DENSE_STORAGE = ("weight",)

Storage = dict  # {name: tensor or None}
Stamp = tuple  # ((name, tensor object or None, data_ptr, version), ...)


def _names(nf4: bool) -> tuple[str, ...]:
    return _NF4_STORAGE if nf4 else _DENSE_STORAGE


def snapshot(layer: nn.Module, nf4: bool, clone: bool) -> Storage:
    """The layer's weight tensors, detached (sharing storage); cloned where the caller will write in place."""
    out = {}
    for n in _names(nf4):
        t = getattr(layer, n)
        out[n] = None if t is None else (t.detach().clone() if clone else t.detach())
    return out


@torch.no_grad()
def put(layer: nn.Module, saved: Storage, nf4: bool) -> None:
    """Make `saved` the layer's weight, by reference (no copy, no re-quantization)."""
    if nf4:
        double_quant = saved["nested_absmax"] is not None
        layer._set_quantized(weight=saved["weight"], absmax=absmax_from_bytes(saved["absmax_bytes"], double_quant),
                             quant_map=saved["quant_map"], nested_absmax=saved["nested_absmax"],
                             nested_quant_map=saved["nested_quant_map"], offset=saved["offset"])
    else:
        layer.weight.data = saved["weight"]  # the same Parameter object, the saved storage


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor has no version counter (and cannot be written outside it)
        return -1


def stamp(layer: nn.Module, nf4: bool) -> Stamp:
    """What the layer holds now, by identity, storage address and in-place version of each weight tensor."""
    out = []
    for n in _names(nf4):
        t = getattr(layer, n)
        out.append((n, None, 0, 0) if t is None else (n, t, t.data_ptr(), _version(t)))
    return tuple(out)


def same_stamp(a: Stamp | None, b: Stamp) -> bool:
    return a is not None and len(a) == len(b) and all(
        x[0] == y[0] and x[1] is y[1] and x[2:] == y[2:] for x, y in zip(a, b))


def moved(saved: Storage, fn, nf4: bool) -> Storage:
    """`saved` after the function Module._apply ran on the layer (QLinearNF4's rule: its tensors keep their dtype
    and only take the device; a dense weight is converted as the layer's own weight was)."""
    out = {}
    for n, t in saved.items():
        if t is None:
            out[n] = None
            continue
        m = fn(t)
        out[n] = m if not nf4 or m.dtype == t.dtype else t.to(device=m.device)
    return out


@dataclass
class Held:
    """Inside disable_adapters() on a merged layer: the merged weight set aside, and the stamp of the original
    weight that was put in its place (the merged one goes back only if the base still holds that)."""
    merged: Storage
    stamp: Stamp
