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

import contextlib
import functools
import json
import os
import warnings

import torch
import torch.nn as nn

from .. import _versions
from .accelerate import fsdp_requested, install

_versions.require("peft")

from peft import PeftModel  # noqa: E402
from peft.tuners.lora import LoraConfig, LoraLayer  # noqa: E402
from peft.tuners.lora.dora import DoraLinearLayer  # noqa: E402
from peft.tuners.lora.layer import LoraVariant  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge  # noqa: E402

from ..autograd.dora import adapters_in_peft_order, dora_linear, dora_weight_norm  # noqa: E402
from ..autograd.lora import lora_linear  # noqa: E402
from ..autograd.lora_mlp import LoraProjection  # noqa: E402
from ..modules import merge_state  # noqa: E402
from ..modules.lora_linear import _dequantize_nf4, _refuse_variants, _requantize_nf4  # noqa: E402
from ..modules.qlinear_nf4 import QLinearNF4  # noqa: E402
from ._zero3_base import _zero3_register_base  # noqa: E402
from .peft_experts import prepare_experts_config, register_experts  # noqa: E402  (LoRA on 4-bit MoE experts)
from ..tuners.lora.options import SUPPORTED_INITS, UNSUPPORTED, check_lora_options  # noqa: E402,F401  (one rule, all paths)
from ..tuners.lora.loftq import LOFTQ_BLOCKSIZE, loftq_correction, loftq_nf4  # noqa: E402

__all__ = ["QPeftLoraLinear", "lora_config", "register", "all_linear", "from_pretrained", "peft_from_pretrained",
           "attach_original_weights", "preprocess_corda", "replace_lora_weights_loftq"]


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


class QPeftDoraVariant(LoraVariant):
    """DoRA (`LoraConfig(use_dora=True)`) on a QLinearNF4, stored as PEFT stores it: `lora_magnitude_vector[adapter]`
    is PEFT's DoraLinearLayer, whose `weight` is the magnitude m (out_features,), so state dicts, adapter files and
    parameter lists are PEFT's. The maths is PEFT's too (qpeft.autograd.dora); what differs is how: the norm
    ||W + s B A||_row comes from qpeft's kernel, which streams the 4-bit weight once (PEFT dequantizes W in full
    on every forward), and a single DoRA adapter runs as qpeft's fused LoRA op scaled per output column.
    Forward and merging live in QPeftLoraLinear (`_fused`, `merge`, `unmerge`)."""

    @staticmethod
    def init(module: "QPeftLoraLinear", adapter_name: str, **kwargs) -> None:
        if not module.lora_magnitude_vector:  # PEFT's DoraLinearVariant.init: the magnitude becomes trainable
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        A = module.lora_A[adapter_name].weight
        norm = dora_weight_norm(module.get_base_layer(), A, module.lora_B[adapter_name].weight,
                                module.scaling[adapter_name])
        layer = DoraLinearLayer(fan_in_fan_out=False)
        layer.weight = nn.Parameter(norm.to(A.dtype), requires_grad=True)
        module.lora_magnitude_vector[adapter_name] = layer


class QPeftLoraLinear(nn.Module, LoraLayer):
    """PEFT LoRA layer over a QLinearNF4: y = base(x) + sum_a scaling_a * B_a(A_a(dropout_a(x))), one fused call.

    Built by PEFT's dispatch as `QPeftLoraLinear(target, adapter_name, config=config, r=..., lora_alpha=...,
    **kwargs)`; `update_layer` is PEFT's (r, lora_alpha, lora_dropout, init_lora_weights True/False/"gaussian",
    use_rslora, rank/alpha patterns, lora_bias, use_dora), after `check_config` has refused what this layer does
    not implement. DoRA: QPeftDoraVariant. lora_bias: the bias of lora_B, added as scaling * bias (PEFT's forward).
    Merging dequantizes the NF4 weight to fp32, adds the delta (DoRA: rescales the rows) and re-quantizes it in
    the layer's own format (as PEFT's bitsandbytes Linear4bit does); the result differs from W + delta by the
    NF4 rounding. A lora_bias merges as scaling * bias into the base bias (PEFT's dense layers; PEFT 0.21.2's
    Linear4bit adds the bias unscaled, which disagrees with its own forward when scaling != 1).
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
        # QLoRA); get_peft_model casts it back to fp32 (autocast_adapter_dtype=True) but transformers'
        # model.add_adapter does not and would train bf16 adapters. Device only: adapters are created in fp32, as
        # qpeft's LoraLinear keeps them, and `autocast_adapter_dtype=False` casts them to the compute dtype
        # afterwards (`cast_adapters_to_compute_dtype`, through the hook below), which is where PEFT leaves them.
        return base_layer.weight.device, None

    def cast_adapters_to_compute_dtype(self, adapter_name: str) -> None:
        """Adapter `adapter_name` (A, B, DoRA magnitude) in the base's compute_dtype, where PEFT + bitsandbytes
        creates it (a compute_dtype of None: left as is, as PEFT leaves it)."""
        dtype = getattr(self.get_base_layer(), "compute_dtype", None)
        if dtype is None or not dtype.is_floating_point:
            return
        for name in self.adapter_layer_names:
            layers = getattr(self, name, None)
            if isinstance(layers, nn.ModuleDict) and adapter_name in layers:
                layers[adapter_name].to(dtype)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs) -> None:
        check_config(config)  # also for a second adapter added to an existing layer
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    # ------------------------------------------------------------------ weight-reading inits
    @contextlib.contextmanager
    def _dense_base(self, dtype: torch.dtype):
        """For PEFT's own PiSSA / OLoRA / CorDA init code: the base as a dense nn.Linear holding the dequantized
        weight (rounded to the dtype it was quantized from, as bitsandbytes dequantizes, then in `dtype`) and
        CorDA's `eigens`; what the init writes into that weight (the residual W - s B A) is re-quantized into the
        4-bit base in its own format (quant type, blocksize, double quant) when the init succeeds."""
        base = self.get_base_layer()
        proxy = nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
        proxy.weight = nn.Parameter(base.dequantize(base.weight_dtype).to(dtype), requires_grad=False)
        if "eigens" in base.__dict__:
            proxy.eigens = base.eigens
        self.base_layer = proxy
        try:
            yield proxy
        finally:
            self.base_layer = base
        _requantize_nf4(base, proxy.weight.detach().float())
        if "eigens" in base.__dict__ and "eigens" not in proxy.__dict__:  # CorDA deletes them once used
            del base.eigens

    def pissa_init(self, adapter_name, init_lora_weights):
        """PEFT's PiSSA (full SVD, or "pissa_niter_<n>": torch.svd_lowrank) on the dequantized weight; the residual
        W - s B A, in the base's original dtype as PEFT leaves it, re-quantized (PEFT's QPiSSA recipe: PiSSA on the
        full-precision weights, then quantize the residual model)."""
        with self._dense_base(self.get_base_layer().weight_dtype):
            super().pissa_init(adapter_name, init_lora_weights)

    def olora_init(self, adapter_name):
        """PEFT's OLoRA as on bitsandbytes' Linear4bit: QR of the dequantized weight in fp32, the fp32 residual
        re-quantized."""
        with self._dense_base(torch.float32):
            super().olora_init(adapter_name)

    def corda_init(self, adapter_name, init_lora_weights):
        """PEFT's CorDA from the `eigens` that qpeft.integrations.peft.preprocess_corda attached to the 4-bit
        layer; the residual re-quantized."""
        with self._dense_base(self.get_base_layer().weight_dtype):
            super().corda_init(adapter_name, init_lora_weights)

    def loftq_init(self, adapter_name, config: LoraConfig):
        """LoftQ (PEFT's loftq_init: loftq_iter alternations of NF4-quantizing W - B A and an SVD of the
        quantization error) from the weight this 4-bit layer was quantized from, which it cannot recover from its
        own bytes: `original_weight` (set by `attach_original_weights`). The base becomes the NF4 quantization of the
        last LoftQ residual, as PEFT's LoftQ leaves the base, in the layer's own format."""
        base = self.get_base_layer()
        if base.quant_type != "nf4" or base.blocksize != LOFTQ_BLOCKSIZE:
            # LoftQ's A, B cancel the error of NF4 at blocksize 64 (PEFT's loftq_init); another format would
            # re-quantize its base and leave A, B fitted to an error the layer does not have
            raise ValueError(f"init_lora_weights='loftq' needs an NF4 base with blocksize {LOFTQ_BLOCKSIZE} (PEFT's "
                             f"LoftQ quantization); this layer has quant_type={base.quant_type!r}, "
                             f"blocksize={base.blocksize}")
        original = getattr(base, "original_weight", None)
        if original is None:
            raise ValueError("init_lora_weights='loftq' on a 4-bit base needs the full-precision weight it was "
                             "quantized from (LoftQ fits A, B to its quantization error): call "
                             "qpeft.integrations.peft.attach_original_weights(model, checkpoint) before "
                             "get_peft_model, or apply LoftQ to the full-precision model")
        weight = original() if callable(original) else original
        loftq = config.loftq_config or {}
        qweight, lora_A, lora_B = loftq_nf4(weight, reduced_rank=self.r[adapter_name],
                                            num_iter=loftq.get("loftq_iter", 1), bits=loftq.get("loftq_bits", 4))
        self.lora_A[adapter_name].weight.data = lora_A
        self.lora_B[adapter_name].weight.data = lora_B
        _requantize_nf4(base, qweight)
        del base.original_weight

    @property
    def lora_variants(self):
        # PEFT's LoraLayer.resolve_lora_variant reads this table: DoRA is the one variant this layer serves (the
        # others are refused by check_config, with the option named, before PEFT gets here)
        return {(): None, ("use_dora",): QPeftDoraVariant}

    def _is_dora(self, name: str) -> bool:
        return isinstance(self.lora_variant.get(name), QPeftDoraVariant)

    def _lora_bias(self, name: str) -> torch.Tensor | None:
        """scaling * lora_B.bias (PEFT's forward adds lora_B(...) * scaling), or None without lora_bias."""
        bias = self.lora_B[name].bias if self.lora_bias.get(name, False) else None
        return None if bias is None else bias * self.scaling[name]

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
        if any(self._is_dora(n) for n in names):
            if len(names) == 1:  # one DoRA adapter: the fused LoRA op scaled per output column
                n = names[0]
                y = dora_linear(xc, base, self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n],
                                self.lora_magnitude_vector[n].weight, bias=base.bias, dropout_p=ps[0],
                                training=self.training)
            else:
                y = self._in_peft_order(xc, names, ps)
        elif len(names) == 1 or not (self.training and any(p > 0.0 for p in ps)):
            biases = [b for b in (self._lora_bias(n) for n in names) if b is not None]
            bias = base.bias
            for b in biases:  # lora_bias: scaling * lora_B.bias joins the base bias (one epilogue add)
                bias = b if bias is None else bias + b
            if len(names) == 1:
                n = names[0]
                A, B, scale, p = self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n], ps[0]
            else:  # several adapters, no dropout: stacked along the rank, scalings folded into B
                A = torch.cat([self.lora_A[n].weight.float() for n in names], 0)
                B = torch.cat([self.lora_B[n].weight.float() * self.scaling[n] for n in names], 1)
                scale, p = 1.0, 0.0
            y = lora_linear(xc, base, A, B, scale, bias, dropout_p=p, training=self.training)
        else:  # independent dropout masks (PEFT semantics): the first adapter fused, the others as rank-r products
            n0 = names[0]
            bias0 = self._lora_bias(n0)
            bias = base.bias if bias0 is None else (bias0 if base.bias is None else base.bias + bias0)
            y = lora_linear(xc, base, self.lora_A[n0].weight, self.lora_B[n0].weight, self.scaling[n0], bias,
                            dropout_p=ps[0], training=True)
            for n, p in zip(names[1:], ps[1:]):
                A = self.lora_A[n]
                xd = nn.functional.dropout(xc.to(A.weight.dtype), p, training=True)
                y = y + (self.lora_B[n](A(xd)) * self.scaling[n]).to(y.dtype)
        return y if out_dtype is None or y.dtype == out_dtype else y.to(out_dtype)

    def _in_peft_order(self, xc: torch.Tensor, names: list[str], ps: list[float]) -> torch.Tensor:
        """Several active adapters, at least one DoRA: PEFT's Linear4bit.forward step by step (see
        qpeft.autograd.dora.adapters_in_peft_order)."""
        base = self.get_base_layer()
        adapters = [(self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n], p,
                     self.lora_magnitude_vector[n].weight if self._is_dora(n) else None,
                     self.lora_B[n].bias if self.lora_bias.get(n, False) else None) for n, p in zip(names, ps)]
        return adapters_in_peft_order(base(xc), xc, base, base.bias, adapters, self.training)

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
        _refuse_variants(names, self.use_dora, self.lora_bias, "QPeftLoraLinear")
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

    def _dora_factor(self, adapter: str, weight_norm: torch.Tensor) -> torch.Tensor:
        return (self.lora_magnitude_vector[adapter].weight.float() / weight_norm)[:, None]

    def _unmerged(self, w: torch.Tensor) -> torch.Tensor:
        """fp32 w with the merged adapters taken out again, newest first (what PEFT's _unmerged_base_weight gives
        DoRA's norm, without PEFT's round trip through the 4-bit format)."""
        for name in reversed(self.merged_adapters):
            if name not in self.lora_A:
                continue
            if self._is_dora(name):
                w = w / self._dora_factor(name, self._caches[f"{name}-weight_norm"])
            w = w - self.get_delta_weight(name)
        return w

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Dequantize W to fp32, add the adapters' deltas, re-quantize (PEFT's Linear4bit merge, qpeft's quantizer).
        DoRA: W <- m / ||W0 + delta||_row * (W + delta), W0 the weight without merged adapters (PEFT's rule); the
        norm is kept for unmerge. lora_bias: the base bias += scaling * lora_B.bias.

        safe_merge: check the merged weight and bias are finite before anything is written (ValueError naming the
        adapter). RuntimeError, before anything is written, for lora_bias on a base without bias (PEFT's).
        The pre-merge 4-bit tensors (and, when a lora_bias adapter is merged, the bias) are kept while merged
        (merging replaces the 4-bit tensors, so keeping them copies nothing; 0.53 bytes per weight at blocksize 64)
        so that unmerge() restores them bit for bit, as qpeft's LoraLinear does: PEFT's subtract-and-re-quantize
        changes codes on every round trip (qpeft.modules.merge_state)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        names = [n for n in adapter_names if n in self.lora_A]
        if base.bias is None and any(self._lora_bias(n) is not None for n in names):
            raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
        premerge = self._valid_premerge(base)
        if premerge is None and names and not self.merged_adapters:
            premerge = {"original": merge_state.snapshot(base, nf4=True, clone=False)}
        if premerge is not None and "bias" not in premerge and base.bias is not None \
                and any(self._lora_bias(n) is not None for n in names):
            premerge["bias"] = base.bias.detach().clone()
        try:
            for name in names:
                lora_bias = self._lora_bias(name)
                with torch.no_grad():
                    w = _dequantize_nf4(base)
                    delta = self.get_delta_weight(name)
                    weight_norm = None
                    if self._is_dora(name):
                        weight_norm = torch.linalg.vector_norm(self._unmerged(w) + delta, dim=1)
                        w = self._dora_factor(name, weight_norm) * (w + delta)
                    else:
                        w = w + delta
                    new_bias = None if lora_bias is None else base.bias.float() + lora_bias.float()
                    if safe_merge and not (torch.isfinite(w).all()
                                           and (new_bias is None or torch.isfinite(new_bias).all())):
                        raise ValueError(f"NaNs or infs in the merged weight of adapter {name!r}; the base was left "
                                         f"unchanged")
                    _requantize_nf4(base, w)
                    if new_bias is not None:
                        base.bias.data = new_bias.to(base.bias.dtype)
                    if weight_norm is not None:
                        self._cache_store(f"{name}-weight_norm", weight_norm)
                self.merged_adapters.append(name)
                warnings.warn(f"merging LoRA adapter {name!r} into a 4-bit weight re-quantizes it: outputs differ "
                              f"from the unmerged layer by the NF4 rounding of the merged weight", UserWarning,
                              stacklevel=2)
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
        """Restore the base from before merge(): bit for bit from the kept tensors (weight, and bias where a lora_bias
        adapter was merged); where the base was written since (a load_state_dict, a move of the base alone) take
        the merged adapters out newest first as PEFT does (DoRA: divide by the kept norm factor, subtract the delta;
        one more re-quantization each)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning, stacklevel=2)
            return
        base = self.get_base_layer()
        premerge = self._valid_premerge(base)
        self.__dict__["_qpeft_premerge"] = None
        if premerge is not None:
            merge_state.put(base, premerge["original"], nf4=True)
            if "bias" in premerge:
                base.bias.data = premerge["bias"]
            for name in self.merged_adapters:  # DoRA's kept norms: used by the subtracting path only
                self._caches.pop(f"{name}-weight_norm", None)
            self.merged_adapters.clear()
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.lora_A:
                continue
            with torch.no_grad():
                w = _dequantize_nf4(base)
                if self._is_dora(name):
                    w = w / self._dora_factor(name, self._cache_pop(f"{name}-weight_norm"))
                _requantize_nf4(base, w - self.get_delta_weight(name))
                lora_bias = self._lora_bias(name)
                if lora_bias is not None:
                    base.bias.data = (base.bias.float() - lora_bias.float()).to(base.bias.dtype)

    def __repr__(self) -> str:
        return "qpeft.lora." + super().__repr__()




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
    register_experts(config)
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
# with (tests/integrations/test_peft_lora.py, in both CI lanes): 0.21.2, the oldest release qpeft supports (the
# image lane), and 0.22.0, the newest on PyPI (2026-12, the latest lane). Add a release here once the latest lane
# has passed on it.
HOOK_TESTED_PEFT = ("0.21.2", "0.22.0")


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
        if _is_lora(peft_config):
            prepare_experts_config(peft_config, model)  # target_parameters on 4-bit experts (peft_experts.py)
        result = original(self, peft_config, model)
        if ours and not PEFT_SEES_NF4 and _is_all_linear(peft_config):
            peft_config.target_modules = set(all_linear(model))
        return result

    _prepare_model._qpeft = True
    lora_model_cls._prepare_model = _prepare_model
    return True


def install_moe_all_linear_hook(module=None, peft_version: str | None = None) -> bool:
    """On a transformers 5 MoE model PEFT converts the config before `_prepare_model` runs
    (peft.utils.transformers_weight_conversion, for adapters trained on the v4 per-expert layout): it resolves
    "all-linear" there with its own `_maybe_include_all_linear_layers`, which does not count QLinearNF4, so on a model
    with 4-bit linears the attention projections were silently dropped (target_modules became set(), only the
    experts' target_parameters remained). Wrapped here so that it counts them as `all_linear(model)` does. A patch of
    PEFT's internals: version-checked as the hook above; where the function is missing (a PEFT without the v5
    conversion) nothing needs it and nothing is installed. Returns whether it is in place."""
    if module is None:
        try:
            from peft.utils import transformers_weight_conversion as module
        except ImportError:
            return False
    original = getattr(module, "_maybe_include_all_linear_layers", None)
    if not callable(original):
        return False
    if getattr(original, "_qpeft", False):
        return True
    peft_version = peft_version or _versions.installed("peft")
    if _versions.parse(peft_version) not in {_versions.parse(v) for v in HOOK_TESTED_PEFT}:
        warnings.warn(f"qpeft: PEFT {peft_version} is a release qpeft's MoE 'all-linear' hook "
                      f"(transformers_weight_conversion._maybe_include_all_linear_layers) was not tested with "
                      f"(tested: {', '.join(HOOK_TESTED_PEFT)}); on a MoE model with 4-bit linears check that "
                      f"target_modules='all-linear' still adapts them, or list them", RuntimeWarning, stacklevel=2)

    @functools.wraps(original)
    def _maybe_include_all_linear_layers(peft_config, model):
        wanted = _is_lora(peft_config) and _is_all_linear(peft_config) and not PEFT_SEES_NF4 and _nf4_layers(model)
        result = original(peft_config, model)
        if wanted:
            result.target_modules = set(result.target_modules or ()) | set(all_linear(model))
        return result

    _maybe_include_all_linear_layers._qpeft = True
    module._maybe_include_all_linear_layers = _maybe_include_all_linear_layers
    return True


install_lora_model_hook()
install_moe_all_linear_hook()


def install_adapter_dtype_hook(lora_model_cls=None, peft_version: str | None = None) -> bool:
    """Honour `autocast_adapter_dtype=False` (get_peft_model, PeftModel.from_pretrained / load_adapter /
    add_adapter) on qpeft's 4-bit layers: wrap `lora_model_cls._cast_adapter_dtype` (PEFT's BaseTuner method those
    entry points call once the adapter exists) so that, when the flag is False, each QPeftLoraLinear holding the
    adapter moves it to its base's compute_dtype, the dtype PEFT + bitsandbytes creates it in; with the flag True
    (PEFT's default) PEFT's own cast leaves it fp32, as there. Paths that never call it (transformers'
    model.add_adapter) keep qpeft's default, fp32 adapters. Version-checked like the LoRA hook; returns whether
    the hook is in place."""
    if lora_model_cls is None:
        from peft.tuners.lora import LoraModel as lora_model_cls
    peft_version = peft_version or _versions.installed("peft")
    original = getattr(lora_model_cls, "_cast_adapter_dtype", None)
    if not callable(original):
        warnings.warn(f"qpeft: PEFT {peft_version} has no {lora_model_cls.__name__}._cast_adapter_dtype: "
                      f"autocast_adapter_dtype=False leaves adapters on qpeft's 4-bit layers in fp32",
                      RuntimeWarning, stacklevel=2)
        return False
    if getattr(original, "_qpeft", False):
        return True
    if _versions.parse(peft_version) not in {_versions.parse(v) for v in HOOK_TESTED_PEFT}:
        warnings.warn(f"qpeft: PEFT {peft_version} is a release qpeft's autocast_adapter_dtype hook "
                      f"({lora_model_cls.__name__}._cast_adapter_dtype) was not tested with (tested: "
                      f"{', '.join(HOOK_TESTED_PEFT)})", RuntimeWarning, stacklevel=2)

    @functools.wraps(original)
    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        if not autocast_adapter_dtype:
            for m in self.model.modules():
                if isinstance(m, QPeftLoraLinear):
                    m.cast_adapters_to_compute_dtype(adapter_name)
        return original(self, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)

    _cast_adapter_dtype._qpeft = True
    lora_model_cls._cast_adapter_dtype = _cast_adapter_dtype
    return True


install_adapter_dtype_hook()


# ----------------------------------------------------------------------------------------------- parameter counts
def _counted_by_peft(p: torch.Tensor) -> int:
    """What PEFT 0.21.2's get_nb_trainable_parameters counts for a Parameter that is not bitsandbytes' Params4bit:
    numel, or DeepSpeed ZeRO-3's ds_numel for a partitioned (empty) one."""
    n = p.numel()
    if n == 0 and hasattr(p, "ds_numel"):
        n = p.ds_numel
    return int(n)


def logical_parameter_correction(model: nn.Module) -> int:
    """Logical weights minus what PEFT counts for qpeft's 4-bit layers (any module with `quantized_parameters()` and
    `quantized_numel()`, as QLinearNF4): PEFT counts their uint8 storage (packed weight + scale bytes) one element
    per byte; the layer holds in_features * out_features weights, what the dense model has."""
    extra, seen = 0, set()
    for m in model.modules():
        quantized = getattr(m, "quantized_parameters", None)
        numel = getattr(m, "quantized_numel", None)
        if not (callable(quantized) and callable(numel)):
            continue
        params = [p for p in quantized() if id(p) not in seen]
        seen.update(id(p) for p in params)
        extra += int(numel()) - sum(_counted_by_peft(p) for p in params)
    return extra


def install_parameter_count_fix(classes=None, peft_version: str | None = None) -> list[str]:
    """Wrap `get_nb_trainable_parameters` of PEFT's PeftModel and PeftMixedModel (print_trainable_parameters calls
    it) so that "all params" counts a qpeft 4-bit layer as its logical weights (PEFT knows only bitsandbytes'
    Params4bit by class name and counts QLinearNF4's uint8 storage byte by byte: a tiny Llama read 199,936 where
    the dense model has 314,624). The trainable count is unchanged (4-bit storage is frozen). A patch of PEFT's
    counting: tested with HOOK_TESTED_PEFT, loud (RuntimeWarning) on another release, as the LoRA hook. Returns the
    classes wrapped."""
    if classes is None:
        from peft import PeftMixedModel, PeftModel

        classes = (PeftModel, PeftMixedModel)
    peft_version = peft_version or _versions.installed("peft")
    wrapped = []
    for cls in classes:
        original = cls.__dict__.get("get_nb_trainable_parameters")
        if not callable(original):
            warnings.warn(f"qpeft: PEFT {peft_version}'s {cls.__name__} has no get_nb_trainable_parameters: its "
                          f"parameter count is left as PEFT computes it (qpeft.trainable_parameters counts 4-bit "
                          f"layers by their logical size)", RuntimeWarning, stacklevel=2)
            continue
        if getattr(original, "_qpeft", False):
            wrapped.append(cls.__name__)
            continue

        def get_nb_trainable_parameters(self, _original=original):
            trainable, total = _original(self)
            return trainable, total + logical_parameter_correction(self)

        functools.update_wrapper(get_nb_trainable_parameters, original)
        get_nb_trainable_parameters._qpeft = True
        cls.get_nb_trainable_parameters = get_nb_trainable_parameters
        wrapped.append(cls.__name__)
    if wrapped and _versions.parse(peft_version) not in {_versions.parse(v) for v in HOOK_TESTED_PEFT}:
        warnings.warn(f"qpeft: PEFT {peft_version} is a release qpeft's parameter-count fix was not tested with "
                      f"(tested: {', '.join(HOOK_TESTED_PEFT)}); if print_trainable_parameters() reports 4-bit "
                      f"layers wrongly, use qpeft.trainable_parameters(model)", RuntimeWarning, stacklevel=2)
    return wrapped


install_parameter_count_fix()


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


# ----------------------------------------------------------------------------------------- weight-reading inits
def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


class _Checkpoint:
    """Tensors of a safetensors checkpoint (a file, a directory with model.safetensors or a sharded index), read one
    at a time, or of a mapping."""

    def __init__(self, source):
        self.mapping, self.files = None, {}
        if isinstance(source, dict):
            self.mapping = source
            return
        path = os.fspath(source)
        if os.path.isdir(path):
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.exists(index):
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                self.files = {k: os.path.join(path, v) for k, v in weight_map.items()}
                return
            path = os.path.join(path, "model.safetensors")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no safetensors checkpoint at {source!r} (a .safetensors file, or a directory "
                                    f"with model.safetensors or model.safetensors.index.json)")
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            self.files = {k: path for k in f.keys()}

    def keys(self):
        return self.mapping.keys() if self.mapping is not None else self.files.keys()

    def get(self, key: str) -> torch.Tensor:
        if self.mapping is not None:
            return self.mapping[key]
        from safetensors import safe_open

        with safe_open(self.files[key], framework="pt") as f:
            return f.get_tensor(key)


def attach_original_weights(model: nn.Module, checkpoint) -> list[str]:
    """Give each QLinearNF4 of `model` (a transformers model or a PeftModel of one) access to the full-precision
    weight it was quantized from, read lazily from `checkpoint` (the dense safetensors checkpoint the model was
    loaded from: a file, a directory, or a {name: tensor} mapping), for LoftQ (`init_lora_weights="loftq"`), which
    fits A and B to the quantization error and re-quantizes the base. Keys are matched by module path (+ ".weight"),
    with or without the model's base_model_prefix. Returns the module paths given a weight; raises ValueError when
    a 4-bit layer has none (a pre-quantized checkpoint holds packed bytes, not the weights)."""
    base = _base(model)
    reader = _Checkpoint(checkpoint)
    keys = set(reader.keys())
    prefix = getattr(base, "base_model_prefix", "") or ""
    attached, missing = [], []
    for name, m in base.named_modules():
        if not isinstance(m, QLinearNF4):
            continue
        name = name.replace(".base_layer", "")
        candidates = [f"{name}.weight"]
        if prefix and name.startswith(prefix + "."):
            candidates.append(f"{name[len(prefix) + 1:]}.weight")
        elif prefix:
            candidates.append(f"{prefix}.{name}.weight")
        key = next((k for k in candidates if k in keys), None)
        if key is None:
            missing.append(name)
            continue
        m.original_weight = functools.partial(_original_weight, reader, key, (m.out_features, m.in_features))
        attached.append(name)
    if missing:
        raise ValueError(f"attach_original_weights: the checkpoint has no full-precision weight for the 4-bit layers "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return attached


def _original_weight(reader: _Checkpoint, key: str, shape: tuple[int, int]) -> torch.Tensor:
    w = reader.get(key)
    if tuple(w.shape) != shape or not w.is_floating_point():
        raise ValueError(f"checkpoint tensor {key!r} is {w.dtype} {tuple(w.shape)}, not the full-precision weight "
                         f"{shape} of the 4-bit layer (is the checkpoint itself quantized?)")
    return w


def preprocess_corda(model: nn.Module, lora_config: LoraConfig, run_model=None, hooked_model=None) -> None:
    """PEFT's `preprocess_corda` (peft.tuners.lora.corda) on a model with qpeft 4-bit layers. PEFT's collects the
    layer-input covariances and the CorDA eigens of nn.Linear / Conv1D layers only (bitsandbytes' Linear4bit is one,
    and its packed weight then reads as garbage); here each targeted QLinearNF4 is swapped for a dense nn.Linear
    holding its dequantized weight (in the dtype it was quantized from) and bias while PEFT runs, and the eigens
    move to the 4-bit layers afterwards, where QPeftLoraLinear.corda_init reads them. Memory: the targeted layers
    dense for the duration, as PEFT's CorDA on the full-precision model."""
    from peft.tuners.lora.corda import preprocess_corda as peft_preprocess_corda
    from peft.tuners.tuners_utils import check_target_module_exists

    swapped = []
    try:
        for name, m in list(model.named_modules()):
            if not (isinstance(m, QLinearNF4) and check_target_module_exists(lora_config, name)):
                continue
            proxy = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            proxy.weight = nn.Parameter(m.dequantize(m.weight_dtype), requires_grad=False)
            if m.bias is not None:
                proxy.bias = nn.Parameter(m.bias.detach().to(m.weight_dtype), requires_grad=False)
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, leaf, proxy)
            swapped.append((parent, leaf, m, proxy))
        peft_preprocess_corda(model, lora_config, run_model=run_model, hooked_model=hooked_model)
    finally:
        for parent, leaf, m, proxy in swapped:
            setattr(parent, leaf, m)
            if "eigens" in proxy.__dict__:
                m.eigens = proxy.eigens


@torch.no_grad()
def replace_lora_weights_loftq(peft_model: nn.Module, model_path=None, adapter_name: str = "default",
                               callback=None) -> None:
    """PEFT's `replace_lora_weights_loftq` for qpeft's 4-bit layers (PEFT's own acts on bitsandbytes' Linear4bit
    only, and computes on CUDA): for each QPeftLoraLinear of `peft_model`, lora_A / lora_B of `adapter_name` become
    the rank-r SVD factors of W - dequant(Q), W the full-precision weight read from `model_path` (a safetensors
    file, a directory with model.safetensors or a sharded index, or a {name: tensor} mapping; None: the base
    model's config `_name_or_path` when it is a local directory), Q the layer's 4-bit weight, dequantized in the
    dtype it was quantized from as bitsandbytes does; the base is kept. `callback(peft_model, module_name) -> bool`
    after each layer: False rolls that layer back (PEFT's semantics). Computes on the layer's device."""
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"peft_model must be a PeftModel, got {type(peft_model).__name__}")
    if model_path is None:
        model_path = getattr(getattr(peft_model.get_base_model(), "config", None), "_name_or_path", None)
        if not model_path or not os.path.isdir(model_path):
            raise ValueError("model_path: pass the full-precision safetensors checkpoint (the base model's "
                             f"_name_or_path {model_path!r} is not a local directory)")
    reader = _Checkpoint(model_path)
    keys = set(reader.keys())
    prefix = "base_model.model."
    base_prefix = getattr(peft_model.get_base_model(), "base_model_prefix", "") or ""
    layers = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, QPeftLoraLinear)]
    if not layers:
        raise ValueError("replace_lora_weights_loftq: no qpeft 4-bit LoRA layer (QPeftLoraLinear) in peft_model")
    for name, module in layers:
        if adapter_name not in module.lora_A:
            continue
        name = name.removeprefix(prefix)
        candidates = [f"{name}.weight"]
        if base_prefix and name.startswith(base_prefix + "."):
            candidates.append(f"{name[len(base_prefix) + 1:]}.weight")
        key = next((k for k in candidates if k in keys), None)
        if key is None:
            raise ValueError(f"model_path: the checkpoint has no weight {candidates[0]!r} for the 4-bit layer {name}")
        base = module.get_base_layer()
        weight = _original_weight(reader, key, (base.out_features, base.in_features))
        lora_A, lora_B = loftq_correction(weight, base.dequantize(base.weight_dtype), module.r[adapter_name])
        A, B = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        before = A.data, B.data
        A.data, B.data = lora_A.to(A.dtype), lora_B.to(B.dtype)
        if callback is not None and not callback(peft_model, name):
            A.data, B.data = before
