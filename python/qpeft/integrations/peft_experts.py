"""LoRA on 4-bit experts with PEFT's own `LoraConfig(target_parameters=[...])`.

    config = peft.LoraConfig(r=8, target_modules=[], target_parameters=["mlp.experts.gate_up_proj",
                                                                         "mlp.experts.down_proj"])
    model = peft.get_peft_model(model_with_4bit_experts, config)      # or SFTTrainer(peft_config=config)

PEFT adapts a 3-D experts parameter with its `ParamWrapper`: per-expert A/B stored flat (lora_A.weight (r*E, in),
expert e's A in rows e*r .. e*r+r-1; lora_B.weight (out, r*E), expert e's B in columns j*E + e), applied by
re-parametrizing the dense parameter as W + delta on every forward. On qpeft's 4-bit experts the parameter is packed
bytes, so qpeft registers its subclass `ParamWrapper` (below) for them in PEFT's custom-module dispatch (the same
hook that builds QPeftLoraLinear on QLinearNF4; PEFT recognises its wrappers by the class name "ParamWrapper",
which this subclass keeps). It creates, initialises, names and saves the adapters exactly as PEFT's does (it *is*
PEFT's, up to the forward and merging), so an adapter trained here loads with stock PEFT onto a dense bf16 base,
and PEFT's adapters load here. The forward differs: instead of materialising W + delta for all experts (PEFT's
path, which also saves the whole merged stack for backward), the outermost wrapper of an experts module passes its
and the nested wrappers' adapters as per-expert views (`qpeft.peft_expert_lora`: gradients land in PEFT's own
parameters) to the grouped NF4 kernels, which apply each expert's LoRA to its token segment.

Rules, as PEFT's ParamWrapper: no dropout, no DoRA / lora_bias / fan_in_fan_out, no mixed-adapter batches; inits
True / False / "gaussian" (PEFT's data-driven inits read a dense `.weight`, which experts have not). Merging
dequantizes the stack to fp32, adds the delta and re-quantizes expert by expert (a warning says so, as for
QPeftLoraLinear); the pre-merge 4-bit tensors are kept by reference, so unmerging restores them bit for bit while
the layer still holds what the merge wrote, else it subtracts and re-quantizes (qpeft's LoraLinear rule).
"""
from __future__ import annotations

import warnings
from dataclasses import replace

import torch
import torch.nn as nn
from peft.tuners.lora.layer import ParamWrapper as _PeftParamWrapper
from peft.tuners.tuners_utils import check_adapters_to_merge

from ..autograd.grouped_nf4 import ExpertsLoRA, peft_expert_lora
from ..models.moe import qpeft_experts_forward
from ..models.moe.convert import experts_params
from ..modules.nf4_experts import NF4ExpertsMixin, is_nf4_experts
from ..quant.experts import quantize_experts
from ._zero3_base import _zero3_register_base

__all__ = ["ParamWrapper", "prepare_experts_config", "EXPERTS_INITS"]

EXPERTS_INITS = (True, False, "gaussian")


def _fourbit(module: nn.Module, name: str) -> bool:
    return is_nf4_experts(module) and name in module.nf4_params()


class ParamWrapper(_PeftParamWrapper):
    """PEFT's `lora.ParamWrapper` on a 4-bit experts parameter (see the module docstring)."""

    _zero3_registered = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, parameter_name: str | None = None, config=None,
                 **kwargs) -> None:
        if parameter_name is None:
            raise ValueError("4-bit experts are adapted through LoraConfig(target_parameters=[...]) (PEFT's "
                             "ParamWrapper), not target_modules: name the parameters, e.g. "
                             "target_parameters=['mlp.experts.gate_up_proj', 'mlp.experts.down_proj'], and pass "
                             "target_modules=[] if the experts module was matched by target_modules")
        _check_experts_options(config)
        super().__init__(base_layer, adapter_name, parameter_name=parameter_name, config=config, **kwargs)
        # DeepSpeed ZeRO-3: this layer runs the kernels on the base's Parameters without entering its forward
        self.register_forward_pre_hook(_zero3_register_base)

    def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
        _check_experts_options(config)  # also for a second adapter
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _is_fourbit(self) -> bool:
        return _fourbit(self.get_base_layer(), self.parameter_name)

    def _get_in_out_features(self, module: nn.Module):
        base = self.get_base_layer()
        if not _fourbit(base, self.parameter_name):
            return super()._get_in_out_features(module)
        num_experts, d1, d2 = base.nf4_spec(self.parameter_name).shape  # PEFT's reading of a 3-D parameter
        self.num_experts = num_experts
        self._param_ndim = 3
        return d1, d2

    # ------------------------------------------------------------------ forward
    def expert_lora(self) -> ExpertsLoRA | None:
        """This wrapper's active, unmerged adapters as one ExpertsLoRA (several adapters stack along the rank with
        their scalings folded into B), or None."""
        if self.merged:
            return None
        names = [n for n in self.active_adapters if n in self.lora_A]
        loras = [peft_expert_lora(self.lora_A[n].weight, self.lora_B[n].weight, self.num_experts, self.scaling[n])
                 for n in names]
        if not loras:
            return None
        if len(loras) == 1:
            return loras[0]
        A = torch.cat([lo.A.float() for lo in loras], 1)
        B = torch.cat([lo.B.float() * lo.scale for lo in loras], 2)
        return ExpertsLoRA(A, B, 1.0)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        chain = [self]
        while isinstance(chain[-1].base_layer, _PeftParamWrapper):
            chain.append(chain[-1].base_layer)
        base = chain[-1].base_layer
        if not is_nf4_experts(base):
            return super().forward(x, *args, **kwargs)
        for w in chain:
            w._check_forward_args(x, *args, **kwargs)  # refuses adapter_names (mixed batches), as PEFT's
        kwargs.pop("adapter_names", None)
        if any(w.disable_adapters for w in chain):
            for w in chain:
                if w.merged:
                    w.unmerge()
            return base(x, *args, **kwargs)
        loras = {}
        for w in chain:
            if _fourbit(base, w.parameter_name):
                lora = w.expert_lora()
                if lora is not None:
                    loras[w.parameter_name] = lora
            elif any(n in w.lora_A for n in w.active_adapters) and not w.merged:
                raise ValueError(f"{type(base).__name__}.{w.parameter_name} is not a 4-bit experts parameter; "
                                 f"a LoRA on it cannot run beside 4-bit experts")
        if not loras:
            return base(x, *args, **kwargs)
        up, down = experts_params(base)
        return qpeft_experts_forward(base, x, *args, gate_up_lora=loras.get(up), down_lora=loras.get(down), **kwargs)

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter_name, *args, **kwargs) -> torch.Tensor:
        if not self._is_fourbit():
            return super().get_delta_weight(adapter_name, *args, **kwargs)
        # PEFT's formula, kept in fp32 (the precision the 4-bit merge adds it in), in the parameter's orientation
        A = self.lora_A[adapter_name].weight.float()
        B = self.lora_B[adapter_name].weight.float()
        A = A.reshape(self.num_experts, -1, A.shape[-1])
        B = B.reshape(B.shape[0], -1, self.num_experts)
        spec = "o r e, e r i -> e o i" if self._did_swap_in_out_features else "o r e, e r i -> e i o"
        return torch.einsum(spec, B, A) * self.scaling[adapter_name]

    def _store(self, dense: torch.Tensor) -> None:
        base, name = self.get_base_layer(), self.parameter_name
        spec = base.nf4_spec(name)
        w = quantize_experts(dense, blocksize=spec.blocksize, quant_type=spec.quant_type,
                             double_quant=spec.double_quant, transposed=spec.transposed)
        base.set_nf4_weight_(name, replace(w, dtype=spec.dtype))  # keeps the dtype it was first quantized from

    def _stamp(self):
        p = self.get_base_layer()._parameters[self.parameter_name]
        return id(p), p.data_ptr(), p._version

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Dequantize the 4-bit stack to fp32, add each adapter's delta, re-quantize (one expert at a time)."""
        if not self._is_fourbit():
            return super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base, name = self.get_base_layer(), self.parameter_name
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            with torch.no_grad():
                w = base.dequantize_nf4(name, torch.float32) + self.get_delta_weight(adapter)
                if safe_merge and not torch.isfinite(w).all():
                    raise ValueError(f"NaNs or infs in the merged experts of adapter {adapter!r}; the base was left "
                                     f"unchanged")
                if not self.merged_adapters:  # the original 4-bit tensors, kept by reference for unmerge
                    self._premerge = base.nf4_weight(name)
                self._store(w)
                self._merge_stamp = self._stamp()
            self.merged_adapters.append(adapter)
            warnings.warn(f"merging LoRA adapter {adapter!r} into 4-bit experts re-quantizes them: outputs differ "
                          f"from the unmerged layer by the NF4 rounding of W + delta", UserWarning, stacklevel=2)

    def unmerge(self) -> None:
        """Restore the pre-merge 4-bit experts bit for bit if the layer still holds what the merge wrote; else
        subtract each delta and re-quantize (PEFT's way)."""
        if not self._is_fourbit():
            return super().unmerge()
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", UserWarning, stacklevel=2)
            return
        base, name = self.get_base_layer(), self.parameter_name
        premerge = self.__dict__.pop("_premerge", None)
        if premerge is not None and self.__dict__.get("_merge_stamp") == self._stamp():
            base.set_nf4_weight_(name, premerge)
            self.merged_adapters.clear()
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                with torch.no_grad():
                    self._store(base.dequantize_nf4(name, torch.float32) - self.get_delta_weight(adapter))


def _check_experts_options(config) -> None:
    init = getattr(config, "init_lora_weights", True)
    if init not in EXPERTS_INITS:
        raise ValueError(f"LoRA on 4-bit experts supports init_lora_weights in {EXPERTS_INITS} (PEFT's ParamWrapper "
                         f"inits that need no dense weight), got {init!r}")


def _parameter_keys(model: nn.Module) -> list[str]:
    """Every parameter's name with PEFT's wrappers stripped (".base_layer" removed), as target_parameters match."""
    out = []
    for name, _ in model.named_parameters():
        while ".base_layer" in name:
            head, _, tail = name.rpartition(".base_layer")
            name = head + tail
        out.append(name)
    return out


def prepare_experts_config(peft_config, model: nn.Module) -> bool:
    """What a LoRA config needs on a model with 4-bit experts, before PEFT builds anything: every
    target_parameters entry must name a parameter (ValueError listing the experts parameters otherwise; PEFT alone
    skips an entry that matches nothing when another one matches), the options must be ones the 4-bit path runs, and
    qpeft's ParamWrapper is registered for 4-bit experts in the config. True when the model has 4-bit experts."""
    if not any(is_nf4_experts(m) for m in model.modules()):
        return False
    targets = list(getattr(peft_config, "target_parameters", None) or [])
    if targets:
        keys = _parameter_keys(model)
        for t in targets:
            if not any(k == t or k.endswith("." + t) for k in keys):
                experts = sorted({p for m in model.modules() if is_nf4_experts(m) for p in m.nf4_params()})
                raise ValueError(f"LoraConfig: target_parameters entry {t!r} matches no parameter of the model "
                                 f"(the fused experts parameters are named e.g. 'mlp.experts.gate_up_proj'; this "
                                 f"model's experts parameters: {experts})")
        _check_experts_options(peft_config)
    register_experts(peft_config)
    return True


def register_experts(config) -> None:
    """Map 4-bit experts -> qpeft's ParamWrapper in `config`'s custom-module dispatch (PEFT tries it first)."""
    if NF4ExpertsMixin not in (getattr(config, "_custom_modules", None) or {}):
        config._register_custom_module({NF4ExpertsMixin: ParamWrapper})
