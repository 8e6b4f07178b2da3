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

Equality with a single-process run (fp32, DeepSpeed 0.19.8, CPU / gloo; tests/distributed/test_zero3.py).
Forward is bit-exact (same bytes, same kernels). Backward and the gradient average are not, for two reasons
that are part of how ZeRO-3 works, not configuration:

1. Module-input identities. ZeRO-3's forward pre-hook on every module passes each tensor input through an
   autograd Function (parameter_offload.py, PostBackwardFunctionModule: forward `x.detach()`, backward returns
   the gradient; it only counts down to release the module's parameters). That extra node changes how fp32
   gradients are summed when a tensor is used both inside and outside a module. In a Llama decoder layer, each
   LlamaRMSNorm input h (the residual stream) is used by the residual add and, inside the norm, by `pow` and
   `mul` (`.to(float32)` returns h itself in fp32). Torch's autograd sums h's gradient in arrival order as
   (g_add + g_mul) + g_pow. Under ZeRO-3, g_mul and g_pow first meet in the identity node, giving
   g_add + (g_mul + g_pow). The two differ by one fp32 rounding on about 1/4 of the elements (at most 1.2e-7 of
   the largest), in each norm with a residual use: layer 1's two norms and layer 0's post-attention norm of the
   2-layer test model. Backward carries the difference to every LoRA gradient upstream: 22 of 28, step-0
   relative differences up to 7.8e-7 at 2 ranks. Putting the identity only on the RMSNorm inputs reproduces
   DeepSpeed's per-rank gradients bit for bit. On LoraLinear or decoder-layer inputs it changes nothing (their
   inputs' other uses sum commutatively). The same cause explains why the test's 2-rank run is not bit-exact,
   although (g0 / 2 + g1 / 2) equals (g0 + g1) / 2 exactly, and why FSDP2, whose hooks sit on decoder layers
   only, is bit-exact there.
2. The average. reduce_scatter_coalesced (runtime/comm/coalesced_collectives.py) divides every rank's gradient
   by the world size before the SUM reduce-scatter (`gradient_predivide_factor` must be 1.0 with reduce-scatter
   in ZeRO-3). gloo's ring gives rank k's partition (elements [k * ceil(n / W), (k + 1) * ceil(n / W)) of each
   flattened gradient) the left fold g_{k+1} / W + g_{k+2} / W + ... + g_k / W. A plain mean computes
   (g0 + ... + g_{W-1}) / W. At 2 ranks these are equal; at 3 ranks they differ by a few roundings.

The single-process run with both emulated (tests/distributed/zero3_worker.py: the identity on every module's
positional tensor inputs, then the ring-ordered pre-divided sum) equals DeepSpeed's run bit for bit: losses and
gradients at every step, the parameters after 3 AdamW steps, the gathered state dict and the saved adapter, at 2
and 3 ranks. The test asserts that equality. Its tolerances against the plain run (step-0 gradients 1e-6
relative; parameters after 3 steps 1e-4, where 7.5e-5 was measured at 2 ranks because AdamW normalises the
ulp differences of near-zero gradient elements) bound the size of that emulated difference.
There is no configuration that avoids it. Marking the decoder layers as ZeRO-3 leaf modules
(`deepspeed.utils.set_z3_leaf_modules`) would remove the per-module identities. It fails in backward with
LoraLinear's fused autograd Function: a parameter is empty there.
"""
from __future__ import annotations

import torch.nn as nn

from ..modules.lora_linear import LoraLinear, is_nf4_layer

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

    for m in model.modules():
        if isinstance(m, LoraLinear) and is_nf4_layer(m.base_layer):
            for p in m.base_layer.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(m, p)
    return model
