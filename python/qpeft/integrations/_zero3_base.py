"""The ZeRO-3 forward pre-hook shared by qpeft's PEFT layers (integrations/peft.py, integrations/peft_experts.py):
each reads its 4-bit base's Parameters directly, so DeepSpeed must be told to gather them with the layer's own."""
from __future__ import annotations

import torch.nn as nn


def _zero3_register_base(layer: nn.Module, args) -> None:
    """DeepSpeed ZeRO-3: make the engine gather the 4-bit base's Parameters in this layer's forward and backward
    (a forward pre-hook of qpeft's PEFT LoRA layers: QPeftLoraLinear, and the experts ParamWrapper, whose grouped
    kernels likewise read the experts' Parameters without entering the experts module's forward).

    `QPeftLoraLinear._fused` calls the kernel on the base's `weight` / `absmax_bytes` / `bias` without entering
    the base's forward, so ZeRO-3's per-module fetch (a module's own Parameters, recurse=False) does not include them.
    DeepSpeed 0.19 has a fallback: its ZeROOrderedDict getter all-gathers a NOT_AVAILABLE Parameter read
    through `module.<name>` in eager forward and registers it with the running module. Measured on CPU (2 gloo
    ranks, the Trainer): the base is gathered in the LoRA layer's forward with or without this hook. The fallback
    is an internal of DeepSpeed, gathers one tensor at a time, and is skipped while torch.compile traces
    (`torch.compiler.is_compiling()`). Here, once the engine has partitioned them (they carry `ds_id`), the
    base's Parameters are registered as this layer's external parameters
    (`deepspeed.zero.register_external_parameter`, what qpeft.distributed.prepare_zero3 does by hand), before
    DeepSpeed's pre-forward fetch, which then gathers them with the layer's own. No user call is needed,
    whatever order the script builds TrainingArguments, the model and the Trainer in. Without DeepSpeed nothing
    has `ds_id`, and this returns after one check per base Parameter."""
    if layer._zero3_registered:
        return
    params = list(layer.get_base_layer().parameters(recurse=False))
    if not any(hasattr(p, "ds_id") for p in params):
        return
    import deepspeed

    for p in params:
        deepspeed.zero.register_external_parameter(layer, p)
    layer._zero3_registered = True


# fused_projection reads the base itself and refuses a partitioned one: the fused blocks may skip this hook
_zero3_register_base._qpeft_fused_safe = True
