"""DeepSpeed ZeRO-3 for qpeft QLoRA models: the config, and why no hook is needed.

ZeRO-3 keeps every Parameter object and swaps its `.data` for an empty tensor outside the module that uses it,
holding the rank's partition in `param.ds_tensor`; its pre-forward hooks gather a module's own parameters.
QLinearNF4's `weight` and `absmax_bytes` are its own frozen uint8 Parameters, so they are partitioned and
gathered like any other; DeepSpeed groups all-gathers by dtype and its bf16 / fp16 modes cast floating
Parameters only, so the bytes are never converted (scaleout.md §2c: DeepSpeed 0.19.8 on CPU with gloo, exact).
LoraLinear calls the fused kernel on its QLinearNF4 base without entering the base's forward, so the base's
parameters would still be empty there; `zero3_config` therefore does not rely on submodule hooks and
`prepare_zero3` registers the base's parameters as external parameters of the LoraLinear
(`deepspeed.zero.register_external_parameter`), which DeepSpeed then gathers in the LoraLinear's forward.
"""
from __future__ import annotations

import torch.nn as nn

__all__ = ["zero3_config", "prepare_zero3"]

DTYPES = ("fp32", "bf16", "fp16")


def zero3_config(micro_batch_size: int = 1, gradient_accumulation_steps: int = 1, dtype: str = "fp32",
                 gradient_clipping: float = 1.0, param_persistence_threshold: int = 100_000) -> dict:
    """A DeepSpeed ZeRO-3 config for a qpeft QLoRA model (also in examples/deepspeed_zero3.json).

    dtype: "fp32", "bf16" or "fp16" (DeepSpeed's modes: they cast the LoRA and other float Parameters, never the
        uint8 quantized storage; fp16 exists only on GPUs, untested here). gradient_clipping: DeepSpeed's own
        default is 1.0 (set 0.0 to disable, e.g. to compare against an unclipped run).
    param_persistence_threshold: parameters with fewer elements stay unpartitioned (DeepSpeed's default 1e5:
        norms and small LoRA matrices; every 4-bit weight of a real model is far larger).
    `zero_allow_untested_optimizer` lets a client torch.optim optimizer through (DeepSpeed's own Adam needs a
    compiled op)."""
    if dtype not in DTYPES:
        raise ValueError(f"zero3_config: dtype must be one of {DTYPES}, got {dtype!r}")
    for name, v in (("micro_batch_size", micro_batch_size), ("gradient_accumulation_steps",
                                                             gradient_accumulation_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"zero3_config: {name} must be an int >= 1, got {v!r}")
    if not gradient_clipping >= 0.0:
        raise ValueError(f"zero3_config: gradient_clipping must be >= 0, got {gradient_clipping!r}")
    if isinstance(param_persistence_threshold, bool) or not isinstance(param_persistence_threshold, int) \
            or param_persistence_threshold < 0:
        raise ValueError(f"zero3_config: param_persistence_threshold must be an int >= 0, "
                         f"got {param_persistence_threshold!r}")
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": gradient_clipping,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": param_persistence_threshold,
            "overlap_comm": False,
        },
    }


def prepare_zero3(model: nn.Module) -> nn.Module:
    """Register each LoraLinear's 4-bit base Parameters as external parameters of the LoraLinear, so ZeRO-3
    gathers them in the LoraLinear's forward (which calls the kernel on them directly). Call after
    `deepspeed.initialize` (or inside `deepspeed.zero.Init`'s model); returns the model."""
    import deepspeed

    from ..modules.lora_linear import LoraLinear, is_nf4_layer

    for m in model.modules():
        if isinstance(m, LoraLinear) and is_nf4_layer(m.base_layer):
            for p in m.base_layer.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(m, p)
    return model
