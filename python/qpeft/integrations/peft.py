"""PEFT-native LoRA on qpeft's 4-bit layers: `QPeftLoraLinear`, a `peft.tuners.lora.LoraLayer` whose forward is
qpeft's fused LoRA op, built for every `QLinearNF4` a LoRA config targets, whatever made the config.

    model = peft.get_peft_model(model, peft.LoraConfig(r=16, target_modules="all-linear"))  # or qpeft.lora_config
    model.add_adapter(config); model.load_adapter(path, adapter_name="b"); model.set_adapter("b")    # PEFT's own
    model = peft.PeftModel.from_pretrained(base, "path")   # or qpeft.peft_from_pretrained(base, "path")

PEFT builds a layer for a module type it does not know only through a config's custom-module mapping
(`LoraConfig._register_custom_module`, tried first by `LoraModel._create_new_module`), and its "all-linear" counts
only nn.Linear / Conv1D (bitsandbytes' Linear4bit subclasses nn.Linear; QLinearNF4 does not). Neither is reachable
from the model, so a plain config needs one hook in PEFT: `LoraModel._prepare_model(peft_config, model)`, which
`inject_adapter` calls for every LoRA adapter (get_peft_model, add_adapter, load_adapter, from_pretrained,
transformers' add_adapter, TRL) before it resolves "all-linear" and before it builds any layer. When the model holds
a QLinearNF4, the hook registers QPeftLoraLinear for it in the config, refuses (before anything changes) an option
the layer does not implement if the config targets a 4-bit layer, and resolves "all-linear" with QLinearNF4
counted. Configs from `lora_config` carry the registration themselves (PEFT's documented API alone).

Checkpoints are stock PEFT (`lora_A.<adapter>.weight` / `lora_B.<adapter>.weight`, adapter_config.json): they load
with `peft.PeftModel.from_pretrained` onto a dense, bitsandbytes or qpeft base.

Only `QLinearNF4` is registered: `nn.Linear` layers keep PEFT's own `lora.Linear`. The fused dense path has not
been measured faster than PEFT's two small GEMMs (no GPU benchmark yet), so PEFT's layer stays the one there.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn as nn

from .. import _versions
from .accelerate import fsdp_requested, install

_versions.require("peft")

from peft.tuners.lora import LoraConfig, LoraLayer  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge  # noqa: E402

from ..autograd.lora import lora_linear  # noqa: E402
from ..autograd.lora_mlp import LoraProjection  # noqa: E402
from ..modules import merge_state  # noqa: E402
from ..modules.lora_linear import _dequantize_nf4, _requantize_nf4  # noqa: E402
from ..modules.qlinear_nf4 import QLinearNF4  # noqa: E402
from ..tuners.lora.options import SUPPORTED_INITS, UNSUPPORTED, check_lora_options  # noqa: E402,F401  (one rule, all paths)

__all__ = ["QPeftLoraLinear", "lora_config", "register", "all_linear", "from_pretrained", "peft_from_pretrained"]


def check_config(config: LoraConfig) -> None:
    """Raise ValueError naming the first LoraConfig option qpeft's LoRA layers do not implement (never ignore one):
    qpeft.tuners.lora.options' rule, the one qpeft.load_adapter applies to adapter_config.json."""
    check_lora_options(config)


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

    def fused_projection(self) -> LoraProjection:
        """The projection this layer's forward computes, as qpeft.fuse's fused blocks take it (lora_mlp / lora_qkv
        read these tensors and never call the layer): the base with its active adapters, as `_fused` stacks them.
        Raises ValueError (the fused block then runs the module) for what it cannot describe: a merged layer with
        adapters disabled (the forward unmerges first), several active adapters with dropout (independent masks),
        a base partitioned by DeepSpeed ZeRO-3 (its gather happens in this layer's forward, which is skipped)."""
        base = self.get_base_layer()
        if any(hasattr(p, "ds_id") for p in base.parameters(recurse=False)):
            raise ValueError("QPeftLoraLinear: a DeepSpeed ZeRO-3 partitioned base is gathered in the layer's own "
                             "forward, which a fused block skips")
        if self.disable_adapters:
            if self.merged:
                raise ValueError("QPeftLoraLinear: merged adapters with adapters disabled (its forward unmerges "
                                 "first)")
            return LoraProjection(base)
        names = [n for n in self.active_adapters if n in self.lora_A]
        if self.merged or not names:
            return LoraProjection(base)
        ps = [self._dropout_p(n) for n in names]
        if len(names) == 1:
            n = names[0]
            return LoraProjection(base, self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n],
                                  dropout_p=ps[0])
        if any(p > 0.0 for p in ps):
            raise ValueError(f"QPeftLoraLinear: several active adapters {names} with dropout (independent masks "
                             f"per adapter) are not supported by the fused blocks")
        A = torch.cat([self.lora_A[n].weight.float() for n in names], 0)
        B = torch.cat([self.lora_B[n].weight.float() * self.scaling[n] for n in names], 1)
        return LoraProjection(base, A, B, 1.0)

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

        safe_merge: check W + delta is finite before anything is written (ValueError naming the adapter).
        The pre-merge 4-bit tensors are kept while merged (merging replaces them, so keeping them copies nothing;
        0.53 bytes per weight at blocksize 64) so that unmerge() restores them bit for bit, as qpeft's LoraLinear
        does: PEFT's subtract-and-re-quantize changes codes on every round trip (qpeft.modules.merge_state)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        premerge = self._valid_premerge(base)
        if premerge is None and adapter_names and not self.merged_adapters:
            premerge = {"original": merge_state.snapshot(base, nf4=True, clone=False)}
        try:
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
        finally:
            if premerge is not None and self.merged_adapters:
                premerge["stamp"] = merge_state.stamp(base, nf4=True)
                self.__dict__["_qpeft_premerge"] = premerge

    def _valid_premerge(self, base: nn.Module) -> dict | None:
        """The kept pre-merge tensors if the base still holds what the last merge wrote (else dropped: stale)."""
        premerge = self.__dict__.get("_qpeft_premerge")
        if premerge is not None and not merge_state.same_stamp(premerge.get("stamp"),
                                                                merge_state.stamp(base, nf4=True)):
            premerge = None
        self.__dict__["_qpeft_premerge"] = premerge
        return premerge

    def unmerge(self) -> None:
        """Restore the base from before merge(): bit for bit from the kept tensors; where the base was written since
        (a load_state_dict, a move of the base alone) subtract the merged deltas as PEFT does (one more
        re-quantization each)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning, stacklevel=2)
            return
        base = self.get_base_layer()
        premerge = self._valid_premerge(base)
        self.__dict__["_qpeft_premerge"] = None
        if premerge is not None:
            merge_state.put(base, premerge["original"], nf4=True)
            self.merged_adapters.clear()
            return
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


# fused_projection reads the base itself and refuses a partitioned one: the fused blocks may skip this hook
_zero3_register_base._qpeft_fused_safe = True


def _install_accelerate_fsdp2_fix() -> None:
    """Under `accelerate launch` with FSDP: wrap accelerate's FSDP2 preparation for qpeft models
    (integrations/accelerate.py: cpu_ram_efficient_loading and the auto-wrap policy)."""
    if fsdp_requested():
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
# nn.Linear (as bitsandbytes' Linear4bit does). It does not (a QLinearNF4 would then also be taken for a dense layer
# by PEFT's dispatch_default, transformers' weight init, ...): the hook below counts it instead.
PEFT_SEES_NF4 = issubclass(QLinearNF4, nn.Linear)

# The PEFT releases whose LoraModel._prepare_model / inject_adapter the hook below was written against and is tested
# with (tests/integrations/test_peft_lora.py, in both CI lanes). 0.21.2 is both the oldest release qpeft supports
# and the newest on PyPI (2026-12): add a release here once the latest lane has passed on it.
HOOK_TESTED_PEFT = ("0.21.2",)


def _is_lora(config) -> bool:
    # not AdaLoRA (an AdaLoraConfig is a LoraConfig; its tuner subclasses LoraModel but has no custom dispatch)
    return isinstance(config, LoraConfig) and getattr(config, "peft_type", None) == "LORA"


def _nf4_layers(model: nn.Module) -> list[str]:
    """Paths of the 4-bit layers PEFT would adapt: each QLinearNF4 outside an adapter layer, and each adapter layer
    (QPeftLoraLinear) whose base is one."""
    found, inside = [], None
    for name, m in model.named_modules():  # depth first: an adapter layer's submodules follow it
        if inside is not None and name.startswith(inside):
            continue
        inside = None
        if isinstance(m, BaseTunerLayer):
            inside = name + "."
            if isinstance(m.get_base_layer(), QLinearNF4):
                found.append(name)
        elif isinstance(m, QLinearNF4):
            found.append(name)
    return found


def _is_all_linear(config) -> bool:
    target = getattr(config, "target_modules", None)
    return isinstance(target, str) and target.lower() == "all-linear"


def _prepare_for_qpeft_layers(tuner, peft_config, model: nn.Module) -> bool:
    """What a LoRA config needs on a model with QLinearNF4 layers, before PEFT builds anything: refuse an option
    QPeftLoraLinear does not implement if the config targets a 4-bit layer (the model is still untouched), then
    register QPeftLoraLinear for QLinearNF4 in the config (a mapping the user made for it is kept). True when the
    model has such layers."""
    if not _is_lora(peft_config):
        return False
    layers = _nf4_layers(model)
    if not layers:
        return False
    if _is_all_linear(peft_config) or any(tuner._check_target_module_exists(peft_config, n) for n in layers):
        check_config(peft_config)
    if QLinearNF4 not in (getattr(peft_config, "_custom_modules", None) or {}):
        register(peft_config)
    return True


def install_lora_model_hook(lora_model_cls=None, peft_version: str | None = None) -> bool:
    """Wrap `lora_model_cls._prepare_model` (PEFT's LoraModel: what inject_adapter calls for every LoRA adapter
    before it resolves "all-linear" and builds layers) so that any LoRA config works on QLinearNF4 layers:
    `_prepare_for_qpeft_layers`, PEFT's own `_prepare_model` (layer replication), then "all-linear" resolved as
    `all_linear(model)` (PEFT's rule with QLinearNF4 counted; PEFT's own resolution then leaves the list alone).
    Models without QLinearNF4 and non-LoRA configs go through PEFT unchanged.

    A patch of PEFT's internals, so: on a PEFT release not in HOOK_TESTED_PEFT it warns (RuntimeWarning) and still
    installs; where the method is missing it warns that plain configs will not work and installs nothing
    (qpeft.lora_config, PEFT's documented custom-module API, keeps working). Returns whether the hook is in place."""
    if lora_model_cls is None:
        from peft.tuners.lora import LoraModel as lora_model_cls
    peft_version = peft_version or _versions.installed("peft")
    original = lora_model_cls.__dict__.get("_prepare_model")
    if not callable(original):
        warnings.warn(f"qpeft: PEFT {peft_version} has no LoraModel._prepare_model (qpeft's hook knows PEFT "
                      f"{', '.join(HOOK_TESTED_PEFT)}): a plain peft.LoraConfig will not build qpeft's layer on "
                      f"QLinearNF4 (PEFT raises 'Target module QLinearNF4 ... is not supported'), and "
                      f"target_modules='all-linear' will skip the 4-bit layers; build configs with "
                      f"qpeft.lora_config(...) instead", RuntimeWarning, stacklevel=2)
        return False
    if getattr(original, "_qpeft", False):
        return True
    if _versions.parse(peft_version) not in {_versions.parse(v) for v in HOOK_TESTED_PEFT}:
        warnings.warn(f"qpeft: PEFT {peft_version} is a release qpeft's LoraConfig hook (LoraModel._prepare_model) "
                      f"was not tested with (tested: {', '.join(HOOK_TESTED_PEFT)}). A plain peft.LoraConfig on "
                      f"QLinearNF4 layers relies on it; if PEFT raises 'Target module QLinearNF4 ... is not "
                      f"supported' or 'all-linear' misses the 4-bit layers, build the config with "
                      f"qpeft.lora_config(...)", RuntimeWarning, stacklevel=2)

    @functools.wraps(original)
    def _prepare_model(self, peft_config, model):
        ours = _prepare_for_qpeft_layers(self, peft_config, model)
        result = original(self, peft_config, model)
        if ours and not PEFT_SEES_NF4 and _is_all_linear(peft_config):
            peft_config.target_modules = set(all_linear(model))
        return result

    _prepare_model._qpeft = True
    lora_model_cls._prepare_model = _prepare_model
    return True


install_lora_model_hook()


def lora_config(*, model: nn.Module | None = None, **kwargs) -> LoraConfig:
    """A `peft.LoraConfig(**kwargs)` with QLinearNF4 -> QPeftLoraLinear registered, for `get_peft_model`,
    `model.add_adapter`, `trl.SFTTrainer(peft_config=...)`. A plain LoraConfig works there too (the hook above);
    this one also raises here, at once, a ValueError naming any option the fused layer does not implement (DoRA,
    lora_bias, ...), resolves target_modules="all-linear" to an explicit list (`all_linear(model)`) when `model`
    is given, and carries its registration through PEFT's documented API alone (no hook needed).
    """
    target = kwargs.get("target_modules")
    if isinstance(target, str) and target.lower() == "all-linear" and model is not None:
        kwargs["target_modules"] = all_linear(model)
    config = LoraConfig(**kwargs)
    check_config(config)
    return register(config)


def from_pretrained(model: nn.Module, model_id, adapter_name: str = "default", is_trainable: bool = False,
                    config=None, **kwargs):
    """`peft.PeftModel.from_pretrained(model, model_id, ...)` (which also works on a qpeft base), with the LoRA config
    checked before PEFT reads the weights and the QLinearNF4 registration redone (PEFT does not save it).
    `config`: a PeftConfig to use instead of the one saved at `model_id`; other kwargs (subfolder, revision,
    token, ...) go to PEFT unchanged. Non-LoRA adapters are loaded as PEFT loads them."""
    from peft import PeftConfig, PeftModel

    if config is None:
        hub = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token") if k in kwargs}
        config = PeftConfig.from_pretrained(model_id, **hub)
    if isinstance(config, LoraConfig):
        check_config(config)
        register(config)
    return PeftModel.from_pretrained(model, model_id, adapter_name=adapter_name, is_trainable=is_trainable,
                                     config=config, **kwargs)


peft_from_pretrained = from_pretrained  # the top-level name (qpeft.peft_from_pretrained)
