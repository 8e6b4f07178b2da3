"""accelerate's FSDP2 preparation (`Accelerator.prepare` -> `fsdp2_prepare_model`) of a model with qpeft 4-bit
layers: what accelerate 1.16 gets wrong for them, and the narrow fix installed by `install()`.

1. `fsdp_cpu_ram_efficient_loading: true` (PEFT's QLoRA-FSDP recipe sets it) moves every rank's model to the
   meta device, shards it there and then loads rank 0's `state_dict()` into the shards key by key,
   resolving each key by `model.get_submodule(key.rpartition(".")[0])` (fsdp_utils.py
   `fsdp2_load_full_state_dict`). QLinearNF4's state dict is bitsandbytes' Linear4bit format, whose keys
   `<layer>.weight.absmax`, `<layer>.weight.quant_state.bitsandbytes__nf4` name no module: it fails with
   "AttributeError: `weight` is not an nn.Module" (and a sharded layer cannot load a bitsandbytes dict).
   The path buys nothing for a quantized model: transformers loads a quantized checkpoint in full on every
   rank (modeling_utils.py skips the meta placeholders "and not is_quantized"). What it does guarantee, rank 0's
   values everywhere (`fsdp_sync_module_states`), is kept: every parameter and buffer is broadcast from rank 0
   in place, under its own name, before `fully_shard`; then accelerate prepares the model with the flag off.
2. Trainer replaces the plugin's auto-wrap policy with PEFT's `fsdp_auto_wrap_policy` for every PEFT model
   (`update_fsdp_plugin_peft`), an FSDP1 `_or_policy` that accelerate's FSDP2 path does not recognise
   (`fsdp2_prepare_auto_wrap_policy` returns None): no decoder layer gets its own group, the whole model is
   one root group, all-gathered at once, so a rank holds the whole 4-bit model during forward. For models
   with qpeft layers the policy is set back to transformer-layer wrapping for the call (the classes in
   `_no_split_modules`, as `fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP` asks for). FSDP2 needs no separate
   LoRA groups (PEFT's lambda policy): only a group's trainable parameters must share a dtype.
3. `Trainer.save_model` under FSDP writes nothing unless the plugin's state dict type is FULL_STATE_DICT
   (trainer.py: only that branch calls `_save`), and FULL_STATE_DICT is no way out: it all-gathers the whole
   model, 4-bit base included, to save an adapter, and its checkpoint step (`save_fsdp_model(adapter_only=True)`
   -> DCP `get_model_state_dict(ignore_frozen_params=True)`) raises KeyError on `...base_layer.absmax_bytes`,
   which DCP pops by parameter name from a state dict holding bitsandbytes' keys. With the (default)
   SHARDED_STATE_DICT, `save_model` of a PEFT model with qpeft layers gathers only the adapters (every adapter
   PEFT's `save_pretrained` writes, frozen ones such as TRL's `ref_adapter_name` included; each DTensor's
   `full_tensor()` on every rank) and rank 0 writes it through the
   Trainer's own `_save` (adapter_model.safetensors + adapter_config.json): the final save and every checkpoint
   directory hold the adapter in PEFT's format, next to the Trainer's sharded (DCP, adapter-only) resume state.

On torch older than 2.12 the wrapper raises qpeft's FSDP2UnsupportedError (naming both versions) for qpeft models
before accelerate calls fully_shard. Models without a qpeft layer go through accelerate and the Trainer
unchanged. Installed by the quantizer (integrations/
transformers.py) when a qpeft model is loaded with accelerate's FSDP environment set, and by
`integrations/peft.py` when a QPeftLoraLinear is built under it; `install()` imports accelerate, this module
does not.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn

from .._dtensor import gather_full, local_shard
from .._versions import check_fsdp2_supported
from ..modules.lora_linear import is_nf4_layer

__all__ = ["install", "fsdp_requested", "has_qpeft_layers", "broadcast_from_rank0"]


def fsdp_requested() -> bool:
    """accelerate's launcher asked for FSDP (ACCELERATE_USE_FSDP=true, what `accelerate launch` sets)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")


def has_qpeft_layers(model: nn.Module) -> bool:
    return any(is_nf4_layer(m) for m in model.modules())


def broadcast_from_rank0(model: nn.Module) -> None:
    """Every parameter and buffer of `model` set to rank 0's values, in place (a collective: all ranks call,
    in the same module order, which named_parameters / named_buffers give)."""
    import torch.distributed as dist

    with torch.no_grad():
        for _, t in [*model.named_parameters(), *model.named_buffers()]:
            dist.broadcast(t.data, src=0)


def _wrap_policy_for_qpeft(plugin):
    """The plugin's auto-wrap policy if accelerate's FSDP2 path understands it, else transformer-layer wrapping."""
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    fn = plugin.auto_wrap_policy
    if isinstance(fn, str):  # not resolved yet: accelerate's own names (transformer_based_wrap, size_based_wrap)
        return fn
    base = fn.func if isinstance(fn, functools.partial) else fn
    if base is None or base is transformer_auto_wrap_policy or base is size_based_auto_wrap_policy:
        return fn
    return transformer_auto_wrap_policy


def _patched(original):
    @functools.wraps(original)
    def fsdp2_prepare_model(accelerator, model, *args, **kwargs):
        plugin = accelerator.state.fsdp_plugin
        if plugin is None or not has_qpeft_layers(model):
            return original(accelerator, model, *args, **kwargs)
        # torch < 2.12: fully_shard would fail deep inside on the uint8 Parameters ("only Tensors of floating
        # point dtype can require gradients"); raise qpeft's error naming the installed and the needed version
        check_fsdp2_supported()
        saved = plugin.cpu_ram_efficient_loading, plugin.auto_wrap_policy
        try:
            if plugin.cpu_ram_efficient_loading:
                broadcast_from_rank0(model)
                plugin.cpu_ram_efficient_loading = False
            plugin.auto_wrap_policy = _wrap_policy_for_qpeft(plugin)
            return original(accelerator, model, *args, **kwargs)
        finally:
            plugin.cpu_ram_efficient_loading, plugin.auto_wrap_policy = saved

    fsdp2_prepare_model._qpeft = True
    return fsdp2_prepare_model


def gather_adapters(model: nn.Module) -> dict:
    """{PeftModel state-dict key: full tensor on CPU} of every adapter of `model` (a collective under FSDP2: every
    rank calls; keys in sorted order so that every rank gathers in the same order). Only adapter tensors move.

    Every adapter, not only the trainable one: `save_pretrained(state_dict=...)` writes each adapter of
    `peft_config` (TRL's DPO `ref_adapter_name`: a frozen "reference" adapter next to the policy), picking its
    tensors out of the dict by name, and when the dict holds none of an adapter's keys PEFT falls back to the
    whole dict (`get_peft_model_state_dict`: "the adapter weights are not stored with the adapter name") and
    writes the *other* adapter's tensors under its name. The keys are exactly those PEFT selects from the
    model's own (local, sharded) state dict for each adapter, matched by identity, so modules_to_save and saved
    embeddings travel too.

    PEFT only selects here; qpeft gathers. PEFT >= 0.22 also gathers the DTensors it selects (full_tensor(), a
    new CPU copy per call, per adapter), which would break the identity match and gather each tensor once per
    adapter: it is handed each DTensor's local shard instead (a plain tensor, which PEFT passes through as is)."""
    from peft import get_peft_model_state_dict

    local = model.state_dict()  # FSDP2: the local DTensor shards, no collective
    plain = {k: local_shard(v) for k, v in local.items()}
    key_of = {id(v): k for k, v in plain.items()}
    keys: set[str] = set()
    for name in model.peft_config:
        # get_peft_model_state_dict drops the adapter name from the keys; _save -> save_pretrained(state_dict=...)
        # filters a *model* state dict, so hand it the model's own names (the same tensor objects)
        for k, v in get_peft_model_state_dict(model, state_dict=plain, adapter_name=name).items():
            if id(v) not in key_of:
                raise RuntimeError(f"qpeft: PEFT's state dict of adapter {name!r} holds {k!r}, which is not one of "
                                   f"the model's own tensors; cannot gather it under FSDP")
            keys.add(key_of[id(v)])
    full, _ = gather_full({k: local[k] for k in keys})
    return full


def _patched_save_model(original):
    @functools.wraps(original)
    def save_model(self, output_dir=None, _internal_call=False):
        from peft import PeftModel

        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if (not self.is_fsdp_enabled or plugin is None or "FULL_STATE_DICT" in str(plugin.state_dict_type)
                or not isinstance(self.model, PeftModel) or not has_qpeft_layers(self.model)):
            return original(self, output_dir, _internal_call=_internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state_dict = gather_adapters(self.model)
        self._save(output_dir, state_dict=state_dict)  # writes on the main process only (args.should_save)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    save_model._qpeft = True
    return save_model


def install() -> None:
    """Wrap accelerate's `fsdp2_prepare_model` where `Accelerator.prepare` looks it up (accelerator.py imports it
    by name) and `transformers.Trainer.save_model`; idempotent."""
    import accelerate.accelerator as acc
    from transformers import Trainer

    if not getattr(acc.fsdp2_prepare_model, "_qpeft", False):
        acc.fsdp2_prepare_model = _patched(acc.fsdp2_prepare_model)
    if not getattr(Trainer.save_model, "_qpeft", False):
        Trainer.save_model = _patched_save_model(Trainer.save_model)
