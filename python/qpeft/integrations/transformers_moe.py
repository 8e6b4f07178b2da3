"""The quantizer's part for fused experts (issue 24): QPeftConfig quantizes transformers 5's 3-D experts parameters
on load, one expert at a time, and reloads its own 4-bit experts checkpoints byte for byte.

Quantize on load. Most families store experts per expert on disk (`mlp.experts.<e>.gate_proj.weight`, ...); the
model's conversion mapping merges them into `mlp.experts.gate_up_proj` (E, 2I, H) with `MergeModulelist` +
`Concatenate`, and transformers' converter reads all of an experts parameter's checkpoint tensors at once before
merging: the whole bf16 stack, twice (the per-expert tensors and the stack). `ExpertsStreamingConverter` replaces
that converter for the 4-bit experts: it reads expert e's tensors (checkpoint slices are read lazily: on-the-fly
quantization loads synchronously), applies the model's own merge ops to that one expert, quantizes the (2I, H) slice
into its row of a preallocated 4-bit stack, and drops it before reading expert e+1. The extra memory is one expert's
slices plus its 4-bit form, never the bf16 stack. Families whose checkpoints hold the fused tensor (gpt-oss) read
that one checkpoint tensor, as for any linear weight, and quantize it one expert at a time.

Pre-quantized. A qpeft checkpoint holds each 4-bit experts parameter in the format of qpeft.modules.nf4_experts
(`<p>`, `<p>.absmax`, ..., `<p>.quant_state.qpeft_experts__nf4`); one converter per parameter, matching exactly
its keys, collects them for `ExpertsDeserialize`, which validates the group against the model's config and
installs the tensors as they are.
"""
from __future__ import annotations

import gc
import re

import torch
from transformers.core_model_loading import Concatenate, ConversionOps, MergeModulelist, WeightConverter
from transformers.quantizers.quantizers_utils import get_module_from_name

from ..models.moe import EXPERTS_IMPLEMENTATION, find_experts, register_experts_implementation
from ..models.moe.convert import await_experts
from ..modules.nf4_experts import EXPERTS_SUFFIXES, NF4ExpertsMixin, is_nf4_experts, parse_experts_state
from ..quant.experts import GroupedNF4Weight
from ..quant.functional import quantize_4bit

__all__ = ["prepare_experts", "use_qpeft_experts", "experts_param", "quantize_experts_param",
           "update_experts_conversions", "unfinished_experts", "drop_experts_conversions",
           "ExpertsStreamingConverter", "ExpertsDeserialize"]


def experts_param(model, param_name: str):
    """(module, parameter name) when `param_name` is a 4-bit experts parameter of `model`, else None."""
    try:
        module, name = get_module_from_name(model, param_name)
    except (AttributeError, KeyError):
        return None
    if isinstance(module, NF4ExpertsMixin) and name in module.nf4_params():
        return module, name
    return None


def prepare_experts(model, skip, cfg) -> list[str]:
    """Before loading: every fused-experts module not skipped becomes a 4-bit one awaiting its values, and the
    model's experts implementation becomes "qpeft". Returns the converted module names."""
    targets = find_experts(model, skip)
    for t in targets:
        await_experts(t.module, t.name, cfg.quant_type, cfg.blocksize, cfg.double_quant)
    if targets:
        use_qpeft_experts(model)
    return [t.name for t in targets]


def use_qpeft_experts(model) -> None:
    """Register and select the "qpeft" experts implementation on `model` (and its sub-configs)."""
    register_experts_implementation()
    setter = getattr(model, "set_experts_implementation", None)
    if callable(setter):
        setter(EXPERTS_IMPLEMENTATION)
    else:
        model.config._experts_implementation = EXPERTS_IMPLEMENTATION


def mark_loaded(module, name: str, full_name: str, missing_keys) -> None:
    if missing_keys is not None:
        for key in [k for k in missing_keys if k == full_name or k.startswith(full_name + ".")]:
            missing_keys.discard(key)


def quantize_experts_param(module, name: str, full_name: str, value: torch.Tensor, missing_keys=None) -> None:
    """A dense checkpoint tensor (E, d1, d2) for a 4-bit experts parameter: checked against the config's shape,
    then quantized one expert at a time on its device."""
    spec = module.nf4_spec(name)
    if tuple(value.shape) != tuple(spec.shape):
        raise ValueError(f"{full_name}: the checkpoint tensor has shape {tuple(value.shape)}, the model's config "
                         f"expects {tuple(spec.shape)} (num_experts, d1, d2)")
    if not value.is_floating_point():
        raise ValueError(f"{full_name}: expected a floating-point tensor to quantize, got {value.dtype}")
    module.quantize_nf4_(name, value, spec.transposed, spec.quant_type, spec.blocksize, spec.double_quant)
    mark_loaded(module, name, full_name, missing_keys)


# ------------------------------------------------------------------------------------------------ quantize on load
def _per_expert_ops(operations) -> bool:
    """The model's ops act on each expert's slice independently: a merge along dim 0 (the experts), then
    concatenations along a later dim."""
    if not operations or not isinstance(operations[0], MergeModulelist) or operations[0].dim != 0:
        return False
    return all(isinstance(op, Concatenate) and op.dim >= 1 for op in operations[1:])


class ExpertsStreamingConverter(WeightConverter):
    """The model's experts merge converter, run one expert at a time for a 4-bit target (see the module docstring);
    a dense target (kept by modules_to_not_convert) goes through the model's ops as usual."""

    __slots__ = ()

    def convert(self, layer_name, model=None, config=None, hf_quantizer=None, loading_info=None):
        found = experts_param(model, layer_name) if model is not None else None
        if found is None:
            return super().convert(layer_name, model=model, config=config, hf_quantizer=hf_quantizer,
                                   loading_info=loading_info)
        module, name = found
        missing = loading_info.missing_keys if loading_info is not None else None
        spec = module.nf4_spec(name)
        E = spec.shape[0]
        lists = {k: self.collected_tensors.pop(k) for k in list(self.collected_tensors)}
        counts = {k: len(v) for k, v in lists.items()}
        if set(counts) != set(self.source_patterns) or any(n != E for n in counts.values()):
            raise ValueError(f"{layer_name}: the checkpoint has {counts} per-expert tensors for "
                             f"{self.source_patterns}; the model's config expects {E} experts for each")
        weight = None
        for e in range(E):
            one = {k: [_materialize(v[e])] for k, v in lists.items()}
            for k in lists:
                lists[k][e] = None  # the reader of expert e goes now: nothing keeps its tensors alive
            for op in self.operations:
                one = op.convert(one, source_patterns=self.source_patterns, target_patterns=self.target_patterns,
                                 full_layer_name=layer_name, model=model, config=config, missing_keys=None)
            (value,) = one.values()
            value = value[0] if isinstance(value, (list, tuple)) else value
            del one
            if tuple(value.shape) != (1, *spec.shape[1:]):
                raise ValueError(f"{layer_name}: expert {e}'s checkpoint tensors merge to shape "
                                 f"{tuple(value.shape[1:])}, the model's config expects {tuple(spec.shape[1:])}")
            if not value.is_floating_point():
                raise ValueError(f"{layer_name}: expected floating-point expert weights, got {value.dtype}")
            if weight is None:
                weight = GroupedNF4Weight.empty(spec.shape, spec.blocksize, spec.quant_type, spec.double_quant,
                                                spec.transposed, value.dtype, value.device)
            try:
                packed, state = quantize_4bit(value[0], blocksize=spec.blocksize, quant_type=spec.quant_type,
                                              double_quant=spec.double_quant)
            except ValueError as err:
                raise ValueError(f"{layer_name}: expert {e}: {err}") from None
            del value
            weight.set_expert(e, packed, state)
            del packed, state
        module.set_nf4_weight_(name, weight)
        mark_loaded(module, name, layer_name, missing)
        if weight.device.type == "cpu":
            gc.collect(0)
        return {}


def _materialize(item):
    """A collected checkpoint tensor: a Future (thread pool), a callable (synchronous loading) or a tensor."""
    if hasattr(item, "result") and callable(item.result):
        return item.result()
    if callable(item) and not isinstance(item, torch.Tensor):
        return item()
    return item


# ------------------------------------------------------------------------------------------------ pre-quantized
class ExpertsDeserialize(ConversionOps):
    """One 4-bit experts parameter from its qpeft checkpoint tensors (see qpeft.modules.nf4_experts)."""

    def __init__(self, hf_quantizer, suffix_of: dict):
        # hf_quantizer: transformers >= 5.24 leaves the dtype of an op's inputs alone when the op has one (the fp32
        # scales must not be cast to the model's dtype); suffix_of: {source pattern: on-disk suffix}
        self.hf_quantizer = hf_quantizer
        self.suffix_of = suffix_of

    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None,
                missing_keys=None, **kwargs):
        found = experts_param(model, full_layer_name)
        if found is None:
            raise ValueError(f"{full_layer_name}: the checkpoint holds 4-bit experts but the model's parameter is "
                             f"dense (modules_to_not_convert differs from the checkpoint's?)")
        module, name = found
        tensors = {}
        for pattern, value in input_dict.items():
            tensors[self.suffix_of[pattern]] = value[0] if isinstance(value, (list, tuple)) else value
        spec = module.nf4_spec(name)
        if set(tensors) == {""} and tensors[""].is_floating_point() and tensors[""].dim() == 3:
            quantize_experts_param(module, name, full_layer_name, tensors[""], missing_keys)  # a dense stack
            return {}
        w = parse_experts_state(tensors, spec.shape, spec.transposed, where=full_layer_name)
        module.set_nf4_weight_(name, w)
        mark_loaded(module, name, full_layer_name, missing_keys)
        return {}


def _exact(key: str) -> str:
    return "^" + re.escape(key) + "$"


def update_experts_conversions(weight_conversions: list, model, hf_quantizer) -> list:
    """The model's conversions with the experts ones made 4-bit aware: on the fly, its merge converters for 4-bit
    experts stream expert by expert; pre-quantized, one exact converter per 4-bit experts parameter comes first."""
    fourbit = [(n, m) for n, m in model.named_modules() if is_nf4_experts(m)]
    if not fourbit:
        return weight_conversions
    names = {p for _, m in fourbit for p in m.nf4_params()}
    out = []
    if hf_quantizer.pre_quantized:
        for mname, m in fourbit:
            for p in m.nf4_params():
                full = f"{mname}.{p}" if mname else p
                suffix_of = {_exact(full + s): s for s in EXPERTS_SUFFIXES}
                out.append(WeightConverter(source_patterns=list(suffix_of), target_patterns=full,
                                           operations=[ExpertsDeserialize(hf_quantizer, suffix_of)]))
    for conv in weight_conversions:
        if (not hf_quantizer.pre_quantized and type(conv) is WeightConverter and _targets(conv, names)
                and _per_expert_ops(conv.operations)):
            streaming = ExpertsStreamingConverter(list(conv._original_source_patterns),
                                                  list(conv._original_target_patterns), operations=conv.operations)
            streaming.scope_prefix, streaming.base_model_prefix = conv.scope_prefix, conv.base_model_prefix
            out.append(streaming)
        else:
            out.append(conv)
    return out


def _targets(conv, names: set) -> bool:
    return any(t.rpartition(".")[2] in names for t in conv._original_target_patterns)


def unfinished_experts(model) -> list[str]:
    """4-bit experts parameters the checkpoint did not fill (still meta placeholders)."""
    return [f"{n}.{p}" for n, m in model.named_modules() if is_nf4_experts(m) for p in m.nf4_params()
            if not m.nf4_ready(p)]


def drop_experts_conversions(model, conversions: list) -> list:
    """The conversions save_pretrained may reverse: without ours and without the model's merges into a 4-bit
    experts parameter (splitting packed bytes per expert would write nonsense; the 4-bit format is fused)."""
    names = {p for _, m in model.named_modules() if is_nf4_experts(m) for p in m.nf4_params()}
    if not names:
        return conversions
    kept = []
    for c in conversions:
        if isinstance(c, ExpertsStreamingConverter):
            continue
        if isinstance(c, WeightConverter) and (any(isinstance(op, ExpertsDeserialize) for op in c.operations)
                                               or _targets(c, names)):
            continue
        kept.append(c)
    return kept

