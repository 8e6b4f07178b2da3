"""Gathering a sharded adapter for saving: only the adapter's tensors travel (never the 4-bit base), and only
rank 0 writes. Every rank must call (each gather is a collective)."""
from __future__ import annotations

import sys

import torch

__all__ = ["is_sharded", "local_shard", "gather_full"]


def _dtensor_type():
    mod = sys.modules.get("torch.distributed.tensor")  # no DTensor can exist unless this module is loaded
    return getattr(mod, "DTensor", None)


def is_sharded(t: torch.Tensor) -> bool:
    """A DTensor (FSDP2) or a ZeRO-3 partitioned Parameter (DeepSpeed sets `ds_id` on those)."""
    dtensor = _dtensor_type()
    return (dtensor is not None and isinstance(t, dtensor)) or hasattr(t, "ds_id")


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a plain tensor; no collective); any other tensor as it is."""
    dtensor = _dtensor_type()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def gather_full(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    """({key: full tensor on CPU}, whether this rank writes (rank 0)). DTensors are all-gathered with
    `full_tensor()`; ZeRO-3 Parameters inside `deepspeed.zero.GatheredParameters` (no modifier rank: read-only).
    Keys are visited in sorted order, so every rank issues the same collectives in the same order."""
    import torch.distributed as dist

    dtensor = _dtensor_type()
    out = {}
    zero3 = [k for k in sorted(tensors) if hasattr(tensors[k], "ds_id")]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensors[k] for k in zero3]):
            for k in zero3:
                out[k] = tensors[k].detach().to("cpu").clone()
    for k in sorted(tensors):
        if k in out:
            continue
        t = tensors[k]
        if dtensor is not None and isinstance(t, dtensor):
            t = t.full_tensor()
        out[k] = t.detach().to("cpu").clone()
    writer = not dist.is_initialized() or dist.get_rank() == 0
    return out, writer
