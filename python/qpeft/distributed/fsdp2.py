"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for qpeft QLoRA models: one FSDP group per decoder layer, then
the root, as torchtitan's `parallelize_llama` and torchtune's `shard_model` do.

Why per layer: a layer's parameters (the 4-bit base's uint8 `weight` / `absmax_bytes` and the fp32 LoRA
matrices) are all-gathered together right before the layer's forward and freed after it, so a rank holds its
1/world_size shard of every layer plus one layer unsharded at a time. LoraLinear calls the fused kernel on its
QLinearNF4 base directly (not through the base's forward); that is safe because the base's Parameters belong to
the enclosing decoder layer's group, unsharded by the layer's pre-forward hook before any kernel runs.
"""
from __future__ import annotations

import torch.nn as nn

# the torch version FSDP2 needs and its check live in qpeft._versions (accelerate's FSDP2 prepare asks too)
from .._versions import FSDP2_MIN_TORCH, FSDP2UnsupportedError, _torch_version, check_fsdp2_supported  # noqa: F401
from ..modules.lora_linear import is_nf4_layer

__all__ = ["shard_qlora_model", "check_fsdp2_supported", "FSDP2_MIN_TORCH", "decoder_layers"]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: modules whose class is listed in transformers' `_no_split_modules`
    (LlamaDecoderLayer, ...), else the children of each nn.ModuleList that hold a 4-bit layer."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if layers:
        return layers
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            layers += [c for c in m if any(is_nf4_layer(s) for s in c.modules())]
    return layers


def shard_qlora_model(model: nn.Module, mesh=None, mixed_precision=None, reshard_after_forward: bool = True):
    """Shard `model` in place with FSDP2: `fully_shard` on every decoder layer, then on the root; returns it.

    mesh: a 1-D `torch.distributed.device_mesh.DeviceMesh` (None: FSDP2's default, all ranks of the default
        process group). mixed_precision: None or a `torch.distributed.fsdp.MixedPrecisionPolicy`; it casts the
        float Parameters (LoRA, norms, embeddings) and never the uint8 quantized storage.
    reshard_after_forward: free each layer's gathered parameters after its forward (re-gathered for backward).

    The process group must be initialised, and the model either fully materialised on this rank's device (every
    rank holds the same values; FSDP2 keeps each rank's shard and drops the rest) or entirely on the meta device
    (then `model.to_empty(device=...)` allocates only the shards and `loading.load_full_state_dict` fills them;
    `load_sharded_qlora` does all of this from a checkpoint). Raises FSDP2UnsupportedError on torch < 2.12,
    TypeError / ValueError naming the argument for bad input.
    """
    check_fsdp2_supported()
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not isinstance(model, nn.Module):
        raise TypeError(f"shard_qlora_model: model must be an nn.Module, got {type(model).__name__}")
    if not dist.is_initialized():
        raise RuntimeError("shard_qlora_model: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first, e.g. under torchrun)")
    if mesh is not None and (not isinstance(mesh, DeviceMesh) or mesh.ndim != 1):
        raise ValueError(f"shard_qlora_model: mesh must be None or a 1-D DeviceMesh (HSDP / 2-D meshes are not "
                         f"supported), got {mesh!r}")
    if mixed_precision is not None and not isinstance(mixed_precision, MixedPrecisionPolicy):
        raise TypeError(f"shard_qlora_model: mixed_precision must be None or a "
                        f"torch.distributed.fsdp.MixedPrecisionPolicy, got {type(mixed_precision).__name__}")
    if not isinstance(reshard_after_forward, bool):
        raise TypeError(f"shard_qlora_model: reshard_after_forward must be a bool, got {reshard_after_forward!r}")
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta and len(meta) != len(list(model.parameters())):
        # all on meta is FSDP2's meta-device recipe (shard, to_empty, load: load_sharded_qlora); some on meta
        # is a half-built model whose meta parameters would end up as uninitialised memory
        raise ValueError(f"shard_qlora_model: some parameters are on the meta device and some are not "
                         f"(materialise the model first, or build it entirely on meta and load it with "
                         f"qpeft.distributed.load_sharded_qlora): {meta[:4]}")
    layers = decoder_layers(model)
    if not layers:
        raise ValueError("shard_qlora_model: found no decoder layers (no class named in model._no_split_modules, "
                         "no nn.ModuleList of blocks holding a QLinearNF4)")
    kwargs = dict(reshard_after_forward=reshard_after_forward)
    if mesh is not None:
        kwargs["mesh"] = mesh
    if mixed_precision is not None:
        kwargs["mp_policy"] = mixed_precision
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model
