"""PEFT-native LoRA on qpeft's 4-bit layers: `QPeftLoraLinear`, a `peft.tuners.lora.LoraLayer` whose forward is
qpeft's fused LoRA op, registered for `QLinearNF4` through PEFT's custom-module dispatch.

    config = qpeft.lora_config(r=16, lora_alpha=32, target_modules="all-linear", model=model)
    model = peft.get_peft_model(model, config)        # or model.add_adapter(config), SFTTrainer(peft_config=config)
    model = qpeft.peft_from_pretrained(base, "path")  # PeftModel.from_pretrained with the registration redone

Checkpoints are stock PEFT (`lora_A.<adapter>.weight` / `lora_B.<adapter>.weight`, adapter_config.json): they load
with `peft.PeftModel.from_pretrained` onto a dense or bitsandbytes base. PEFT does not save the registration, so
loading onto a qpeft base goes through `peft_from_pretrained`, which re-registers before PEFT builds the layers.

Only `QLinearNF4` is registered: `nn.Linear` layers keep PEFT's own `lora.Linear`. The fused dense path has not
been measured faster than PEFT's two small GEMMs (no GPU benchmark yet), so PEFT's layer stays the one there.
"""
from __future__ import annotations

import functools

import dataclasses
import warnings

import torch
import torch.nn as nn

from .. import _versions

_versions.require("peft")

from peft.tuners.lora import LoraConfig, LoraLayer  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge  # noqa: E402

from ..autograd.lora import lora_linear  # noqa: E402
from ..modules.lora_linear import _dequantize_nf4, _requantize_nf4  # noqa: E402
from ..modules.qlinear_nf4 import QLinearNF4  # noqa: E402

__all__ = ["QPeftLoraLinear", "lora_config", "register", "all_linear", "from_pretrained", "peft_from_pretrained"]

# init_lora_weights values whose init needs only the adapter (the others read or rewrite the base weight:
# PiSSA, OLoRA, CorDA, LoftQ, EVA, orthogonal, LoRA-GA, MiCA).
SUPPORTED_INITS = (True, False, "gaussian")
# LoraConfig fields that change the layer's maths and that this layer does not implement, with their off value.
UNSUPPORTED = {
    "use_dora": False,
    "lora_bias": False,
    "fan_in_fan_out": False,   # QLinearNF4 stores W as (out_features, in_features); there is no Conv1D layout
    "use_qalora": False,       # QA-LoRA's pooled input is defined for GPTQ layers only
    "megatron_config": None,
}


def check_config(config: LoraConfig, where: str = "QPeftLoraLinear") -> None:
    """Raise ValueError naming the first LoraConfig option this layer does not implement (never ignore one)."""
    for name, off in UNSUPPORTED.items():
        value = getattr(config, name, off)
        if value != off:
            raise ValueError(f"{where}: LoraConfig({name}={value!r}) is not supported by qpeft's fused LoRA layer "
                             f"on QLinearNF4 (supported: {name}={off!r})")
    for field in dataclasses.fields(config):  # DoRA-like variants: VeLoRA, aLoRA, MonteCLoRA, BD-LoRA, Arrow, KaSA
        if field.metadata.get("is_lora_variant") and getattr(config, field.name):
            raise ValueError(f"{where}: LoraConfig({field.name}={getattr(config, field.name)!r}) is a LoRA "
                             f"variant that qpeft's fused LoRA layer does not implement (leave it unset)")
    init = config.init_lora_weights
    if not any(init is v if isinstance(v, bool) else init == v for v in SUPPORTED_INITS):
        raise ValueError(f"{where}: LoraConfig(init_lora_weights={init!r}) is not supported on a 4-bit base "
                         f"(it reads or rewrites the base weight); use one of {SUPPORTED_INITS}")


def _compute_dtypes(layer: QLinearNF4, x: torch.Tensor):
    """(compute dtype, output dtype or None): QLinearNF4's own rule, as qpeft's LoraLinear._base_operand applies
    it -- under autocast compute in and return the autocast dtype, else compute in compute_dtype (None: x's) and
    cast back to x's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type), None
    return layer.compute_dtype or x.dtype, x.dtype


class QPeftLoraLinear(nn.Module, LoraLayer):
    """PEFT LoRA layer over a QLinearNF4: y = base(x) + sum_a scaling_a * B_a(A_a(dropout_a(x))), one fused call.

    Built by PEFT's dispatch as `QPeftLoraLinear(target, adapter_name, config=config, r=..., lora_alpha=...,
    **kwargs)`; `update_layer` is PEFT's (r, lora_alpha, lora_dropout, init_lora_weights True/False/"gaussian",
    use_rslora, rank/alpha patterns), after `check_config` has refused what this layer does not implement.
    Merging dequantizes the NF4 weight to fp32, adds the delta and re-quantizes it in the layer's own format
    (as PEFT's bitsandbytes Linear4bit does); the result differs from W + delta by the NF4 rounding.
    """

    _zero3_registered = False  # set per layer once its base's ZeRO-3 Parameters are registered

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        super().__init__()
        check_config(config)
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        # Registered now, before any engine adds its hooks: forward pre-hooks run in registration order, so
        # this one runs ahead of DeepSpeed's fetch (parameter_offload.py registers its own without prepend).
        self.register_forward_pre_hook(_zero3_register_base)
        _install_accelerate_fsdp2_fix()

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        if not isinstance(module, QLinearNF4):
            raise TypeError(f"QPeftLoraLinear wraps a QLinearNF4, got {type(module).__name__}")
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        # PEFT moves a new adapter to the base's device *and* casts it to the base's `compute_dtype` (bf16 for
        # QLoRA); get_peft_model casts it back to fp32 (autocast_adapter_dtype=True) but model.add_adapter does not
        # and would train bf16 adapters. Device only: adapters stay fp32, as qpeft's LoraLinear keeps them.
        return base_layer.weight.device, None

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        check_config(config)  # also for a second adapter added to an existing layer
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # ------------------------------------------------------------------ forward
    def _dropout_p(self, name: str) -> float:
        drop = self.lora_dropout[name]
        return float(drop.p) if isinstance(drop, nn.Dropout) else 0.0

    def _fused(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Base plus the adapters `names`, as qpeft's LoraLinear.forward computes it (same op, same operands)."""
        base = self.get_base_layer()
        compute_dtype, out_dtype = _compute_dtypes(base, x)
        xc = x.to(compute_dtype)
        ps = [self._dropout_p(n) for n in names]
        if len(names) == 1 or not (self.training and any(p > 0.0 for p in ps)):
            if len(names) == 1:
                n = names[0]
                A, B, scale, p = self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n], ps[0]
            else:  # several adapters, no dropout: stacked along the rank, scalings folded into B
                A = torch.cat([self.lora_A[n].weight.float() for n in names], 0)
                B = torch.cat([self.lora_B[n].weight.float() * self.scaling[n] for n in names], 1)
                scale, p = 1.0, 0.0
            y = lora_linear(xc, base, A, B, scale, base.bias, dropout_p=p, training=self.training)
        else:  # independent dropout masks (PEFT semantics): the first adapter fused, the others as rank-r products
            n0 = names[0]
            y = lora_linear(xc, base, self.lora_A[n0].weight, self.lora_B[n0].weight, self.scaling[n0], base.bias,
                            dropout_p=ps[0], training=True)
            for n, p in zip(names[1:], ps[1:]):
                A = self.lora_A[n]
                xd = nn.functional.dropout(xc.to(A.weight.dtype), p, training=True)
                y = y + (self.lora_B[n](A(xd)) * self.scaling[n]).to(y.dtype)
        return y if out_dtype is None or y.dtype == out_dtype else y.to(out_dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if args or kwargs:
            raise TypeError(f"QPeftLoraLinear.forward takes x (and adapter_names=) only, got extra positional "
                            f"arguments {len(args)} and keywords {sorted(kwargs)}")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, adapter_names=adapter_names)
        names = [n for n in self.active_adapters if n in self.lora_A]
        if self.merged or not names:  # PEFT: a merged layer is its base layer
            return self.base_layer(x)
        return self._fused(x, names)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, adapter_names: list[str], **kwargs) -> torch.Tensor:
        """Row i of the batch through adapter adapter_names[i] ("__base__" or an unknown name: the base only)."""
        out = None
        for name in dict.fromkeys(adapter_names):
            rows = [i for i, a in enumerate(adapter_names) if a == name]
            sub = x[rows]
            y = self._fused(sub, [name]) if name in self.lora_A else self.base_layer(sub)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[rows] = y
        return out

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """scaling * B @ A, (out_features, in_features), in fp32 (the precision the NF4 merge adds it in)."""
        A = self.lora_A[adapter].weight.float()
        B = self.lora_B[adapter].weight.float()
        return (B @ A) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Dequantize W to fp32, add the adapters' deltas, re-quantize (PEFT's Linear4bit merge, qpeft's quantizer).

        safe_merge: check W + delta is finite before anything is written (ValueError naming the adapter)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            with torch.no_grad():
                w = _dequantize_nf4(base) + self.get_delta_weight(name)
                if safe_merge and not torch.isfinite(w).all():
                    raise ValueError(f"NaNs or infs in the merged weight of adapter {name!r}; the base was left "
                                     f"unchanged")
                _requantize_nf4(base, w)
            self.merged_adapters.append(name)
            warnings.warn(f"merging LoRA adapter {name!r} into a 4-bit weight re-quantizes it: outputs differ "
                          f"from the unmerged layer by the NF4 rounding of W + delta", UserWarning, stacklevel=2)

    def unmerge(self) -> None:
        """Subtract the merged deltas again (one more re-quantization each)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning, stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.lora_A:
                continue
            with torch.no_grad():
                _requantize_nf4(base, _dequantize_nf4(base) - self.get_delta_weight(name))

    def __repr__(self) -> str:
        return "qpeft.lora." + super().__repr__()


def _zero3_register_base(layer: "QPeftLoraLinear", args) -> None:
    """DeepSpeed ZeRO-3: make the engine gather the 4-bit base's Parameters in this layer's forward and backward.

    `_fused` calls the kernel on the base's `weight` / `absmax_bytes` / `bias` without entering the base's
    forward, so ZeRO-3's per-module fetch (a module's own Parameters, recurse=False) does not include them.
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


def _install_accelerate_fsdp2_fix() -> None:
    """Under `accelerate launch` with FSDP: wrap accelerate's FSDP2 preparation for qpeft models
    (integrations/accelerate.py: cpu_ram_efficient_loading and the auto-wrap policy)."""
    from .accelerate import fsdp_requested

    if fsdp_requested():
        from .accelerate import install

        install()


def register(config: LoraConfig) -> LoraConfig:
    """Map QLinearNF4 -> QPeftLoraLinear in `config`'s custom-module dispatch (PEFT tries it first); returns it."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"register: config must be a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({QLinearNF4: QPeftLoraLinear})
    return config


def all_linear(model: nn.Module) -> list[str]:
    """PEFT's "all-linear" (peft/tuners/tuners_utils.py, _maybe_include_all_linear_layers) with QLinearNF4 counted
    as a linear layer: every nn.Linear / Conv1D / QLinearNF4 outside an adapter layer, except the output embeddings
    (the LM head) or, with no output embeddings, a classifier head named score/classifier. Full module paths."""
    from peft import PeftModel
    from peft.utils.constants import SEQ_CLS_HEAD_NAMES
    from transformers.pytorch_utils import Conv1D

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    linear = (nn.Linear, Conv1D, QLinearNF4)
    names = {n for n, m in model.named_modules() if n and (isinstance(m, linear) or
             (isinstance(m, BaseTunerLayer) and "Linear" in type(m).__name__))}
    skip = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    heads = [out] if out is not None else [getattr(model, h, None) for h in SEQ_CLS_HEAD_NAMES]
    for head in heads:
        if head is not None:
            skip |= {n for n, m in model.named_modules() if m is head}
            break
    for prefix, m in model.named_modules():
        if isinstance(m, BaseTunerLayer):
            skip |= {f"{prefix}.{s}" for s, _ in m.named_modules() if s}
    found = sorted(names - skip)
    if not found:
        raise ValueError(f"all_linear: {type(model).__name__} has no nn.Linear / Conv1D / QLinearNF4 layer other "
                         f"than its output head")
    return found


# PEFT's "all-linear" collects isinstance(m, (nn.Linear, Conv1D)): it finds QLinearNF4 only if that subclasses
# nn.Linear (as bitsandbytes' Linear4bit does). It does not: for the configs lora_config returns, PEFT's
# resolution is extended below to count QLinearNF4 too.
PEFT_SEES_NF4 = issubclass(QLinearNF4, nn.Linear)


def _is_qpeft_config(config) -> bool:
    return QLinearNF4 in (getattr(config, "_custom_modules", None) or {})


def _count_nf4_in_all_linear() -> None:
    """Wrap PEFT's `_maybe_include_all_linear_layers` (what LoRA's inject_adapter calls to expand "all-linear")
    so that, for a config with qpeft's registration, "all-linear" is `all_linear(model)`: PEFT's rule with
    QLinearNF4 counted as a linear layer. Every other config is resolved by PEFT unchanged. This is what lets
    `lora_config(target_modules="all-linear")` work without the model, e.g. in `SFTTrainer(model=<path>,
    peft_config=...)`, where the model does not exist yet when the config is built."""
    from peft.tuners import tuners_utils

    original = tuners_utils._maybe_include_all_linear_layers
    if getattr(original, "_qpeft", False):
        return

    @functools.wraps(original)
    def include_all_linear(peft_config, model):
        target = getattr(peft_config, "target_modules", None)
        if (not PEFT_SEES_NF4 and isinstance(target, str) and target.lower() == "all-linear"
                and _is_qpeft_config(peft_config)):
            peft_config.target_modules = set(all_linear(model))
            return peft_config
        return original(peft_config, model)

    include_all_linear._qpeft = True
    tuners_utils._maybe_include_all_linear_layers = include_all_linear


_count_nf4_in_all_linear()


def lora_config(*, model: nn.Module | None = None, **kwargs) -> LoraConfig:
    """A `peft.LoraConfig(**kwargs)` with QLinearNF4 -> QPeftLoraLinear registered, for `get_peft_model`,
    `model.add_adapter`, `trl.SFTTrainer(peft_config=...)`.

    target_modules="all-linear": PEFT 0.21.2 resolves it by type and counts only nn.Linear / Conv1D (QLinearNF4
    is neither), so it would leave every 4-bit layer out. qpeft resolves it instead, as `all_linear(model)`:
    here when `model` is given (stored as an explicit list), else when PEFT injects the adapter.
    Raises ValueError naming any option the fused layer does not implement (DoRA, lora_bias, ...).
    """
    target = kwargs.get("target_modules")
    if isinstance(target, str) and target.lower() == "all-linear" and model is not None:
        kwargs["target_modules"] = all_linear(model)
    config = LoraConfig(**kwargs)
    check_config(config, where="lora_config")
    return register(config)


def from_pretrained(model: nn.Module, model_id, adapter_name: str = "default", is_trainable: bool = False,
                    config=None, **kwargs):
    """`peft.PeftModel.from_pretrained(model, model_id, ...)` with the QLinearNF4 registration redone (PEFT does
    not save it). `config`: a PeftConfig to use instead of the one saved at `model_id`; other kwargs
    (subfolder, revision, token, ...) go to PEFT unchanged. Non-LoRA adapters are loaded as PEFT loads them."""
    from peft import PeftConfig, PeftModel

    if config is None:
        hub = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token") if k in kwargs}
        config = PeftConfig.from_pretrained(model_id, **hub)
    if isinstance(config, LoraConfig):
        check_config(config, where="from_pretrained")
        register(config)
    return PeftModel.from_pretrained(model, model_id, adapter_name=adapter_name, is_trainable=is_trainable,
                                     config=config, **kwargs)


peft_from_pretrained = from_pretrained  # the top-level name (qpeft.peft_from_pretrained)
