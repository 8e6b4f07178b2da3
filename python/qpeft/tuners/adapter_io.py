"""Save and load adapters in Hugging Face PEFT's on-disk format.

Files: `adapter_config.json` (json.dumps(config, indent=2, sort_keys=True), `inference_mode: true`) and
`adapter_model.safetensors` (metadata {"format": "pt"}); an adapter not named "default" goes to the
subfolder `<path>/<adapter_name>/`, as PEFT does.

Each PEFT method registers an `AdapterMethod` describing how to find its adapters in a model, produce the
PEFT tensors/config, and load them back. `load_adapter` validates first and applies only when every check
has passed, so a failed load leaves the model unchanged; `save_adapter` replaces both files only once both are
written, so a failed save leaves the previous adapter in that directory as it was (see `_write`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .._dtensor import gather_full, is_sharded
from .._io import atomic_paths

__all__ = ["save_adapter", "load_adapter", "register_method", "AdapterMethod"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass
class AdapterMethod:
    """How one PEFT method (peft_type) saves and loads.

    adapter_names(model) -> list[str]: names of this method's adapters present in `model`.
    config(model, adapter_name) -> dict: the adapter_config.json content (must hold "peft_type").
    state_dict(model, adapter_name) -> dict[str, Tensor]: PEFT's keys (adapter name removed).
    load(model, config, state_dict, adapter_name, **options) -> None: validate everything, raise ValueError
        naming modules and shapes on mismatch, and only then modify `model` (inject or fill the adapter).
    load_options: the keyword options of `load_adapter` that `load` takes (e.g. "autocast_adapter_dtype").
    """

    peft_type: str
    adapter_names: Callable[[nn.Module], list]
    config: Callable[[nn.Module, str], dict]
    state_dict: Callable[[nn.Module, str], dict]
    load: Callable[..., None]
    load_options: tuple = ()


_METHODS: dict[str, AdapterMethod] = {}


def register_method(method: AdapterMethod) -> None:
    _METHODS[method.peft_type] = method


def _ensure_builtin_methods() -> None:
    # Importing a method's module registers it; missing modules are simply not available.
    import importlib

    for mod in ("qpeft.tuners.lora.model", "qpeft.tuners.prompt_tuning", "qpeft.tuners.p_tuning",
                "qpeft.tuners.prefix_tuning", "qpeft.tuners.adalora"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def _methods_in(model: nn.Module, adapter_name: str) -> list[AdapterMethod]:
    _ensure_builtin_methods()
    return [m for m in _METHODS.values() if adapter_name in m.adapter_names(model)]


def _adapter_dir(path: str | os.PathLike, adapter_name: str) -> Path:
    path = Path(path)
    return path if adapter_name == "default" else path / adapter_name


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write `adapter_name`'s adapter_config.json + adapter_model.safetensors in PEFT's format; returns the dir."""
    from safetensors.torch import save_file

    methods = _methods_in(model, adapter_name)
    if not methods:
        raise ValueError(f"save_adapter: model has no adapter named {adapter_name!r}")
    if len(methods) > 1:
        raise ValueError(f"save_adapter: adapter {adapter_name!r} is claimed by several methods "
                         f"({[m.peft_type for m in methods]}); PEFT's format holds one method per adapter")
    method = methods[0]
    config = dict(method.config(model, adapter_name))
    config.setdefault("peft_type", method.peft_type)
    config["inference_mode"] = True
    tensors = method.state_dict(model, adapter_name)
    out = _adapter_dir(path, adapter_name)
    if _any_sharded(tensors):
        # A sharded model (FSDP2 / ZeRO-3): every rank calls; only the adapter is gathered, rank 0 writes, and
        # the barrier returns on every rank once the files exist.
        import torch.distributed as dist

        tensors, writer = gather_full(tensors)
        if writer:
            _write(out, tensors, config, save_file)
        dist.barrier()
        return out
    _write(out, {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, config, save_file)
    return out


def _any_sharded(tensors: dict) -> bool:
    import sys

    if "torch.distributed.tensor" not in sys.modules and not any(hasattr(t, "ds_id") for t in tensors.values()):
        return False  # no DTensor can exist, no ZeRO-3 parameter: the single-process path, nothing imported

    return any(is_sharded(t) for t in tensors.values())


def _write(out: Path, tensors: dict, config: dict, save_file) -> None:
    """Both files or neither: the config is serialized first, both files are written to temporary files in
    `out`, and only then replace the previous adapter's files (weights, then config; see qpeft._io). A failure
    before that leaves a previous adapter in `out` byte for byte. A process killed between the two replaces
    (microseconds) leaves the new weights beside the previous config: load_adapter's shape checks catch a
    change of rank or target modules, not a change of lora_alpha alone."""
    text = json.dumps(config, indent=2, sort_keys=True)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_paths(out / WEIGHTS_NAME, out / CONFIG_NAME) as (weights_tmp, config_tmp):
        save_file({k: v.contiguous() for k, v in tensors.items()}, weights_tmp, metadata={"format": "pt"})
        with open(config_tmp, "w", encoding="utf-8") as f:
            f.write(text)


def read_adapter_files(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) from a PEFT adapter directory. Weights load only from adapter_model.safetensors: a legacy
    adapter_model.bin is a pickle, which qpeft never loads (even torch.load(weights_only=True) unpickles)."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"load_adapter: {cfg_file} not found")
    with open(cfg_file, encoding="utf-8") as f:
        config = json.load(f)
    if "peft_type" not in config:
        raise ValueError(f"load_adapter: {cfg_file} has no 'peft_type'")
    weights = path / WEIGHTS_NAME
    if weights.is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(weights))
    elif (path / "adapter_model.bin").is_file():
        raise ValueError(f"load_adapter: {path} holds only adapter_model.bin, a pickle, which qpeft does not load; "
                         f"convert it once where you trust the file: peft.PeftModel.from_pretrained(base, path)"
                         f".save_pretrained(path) writes {WEIGHTS_NAME}")
    else:
        raise FileNotFoundError(f"load_adapter: no {WEIGHTS_NAME} in {path}")
    return config, tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> nn.Module:
    """Load an adapter saved by PEFT or qpeft into `model` (injecting it if needed); returns the model.

    All shapes and names are checked before anything changes: on error the model is left as it was.
    autocast_adapter_dtype (PEFT's PeftModel.from_pretrained / load_adapter argument): True (default) creates
    LoRA adapters in fp32, False in their base's compute dtype (see qpeft.add_lora); an adapter the model has
    already keeps its dtype. Other methods take only the default (False raises).
    """
    if not isinstance(autocast_adapter_dtype, bool):
        raise ValueError(f"load_adapter: autocast_adapter_dtype must be True or False, got {autocast_adapter_dtype!r}")
    config, tensors = read_adapter_files(path)
    _ensure_builtin_methods()
    peft_type = config["peft_type"]
    method = _METHODS.get(peft_type)
    if method is None:
        raise ValueError(f"load_adapter: peft_type {peft_type!r} is not supported; "
                         f"supported: {sorted(_METHODS)}")
    if autocast_adapter_dtype:
        method.load(model, config, tensors, adapter_name)
    elif "autocast_adapter_dtype" in method.load_options:
        method.load(model, config, tensors, adapter_name, autocast_adapter_dtype=False)
    else:
        raise ValueError(f"load_adapter: autocast_adapter_dtype=False is supported for LoRA adapters, not for "
                         f"peft_type {peft_type!r}; nothing was changed")
    return model
