"""transformers integration: `QPeftConfig` and its quantizer, registered as quant_method "qpeft".

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=QPeftConfig(), device_map=...)

Quantize on load: before any weight is read, every nn.Linear that transformers does not skip (the output head
and tied weights by default, plus `modules_to_not_convert` and the model's fp32 modules) becomes a
`QLinearNF4` on the meta device. Each checkpoint weight is then read, cast and moved to its `device_map` device
one at a time (transformers loads synchronously under an on-the-fly quantizer) and quantized there by
`QLinearNF4.quantize_weight_` with qpeft's own quantize op (the Triton / CUDA kernel on a GPU): no
full-precision copy of the model is ever made.

Pre-quantized: a checkpoint whose config.json names quant_method "qpeft" (what `save_pretrained` writes, also
after `qpeft.quantize_model`) reloads byte for byte with no config passed. Its tensors are bitsandbytes'
Linear4bit keys, so a transformers + bitsandbytes 4-bit checkpoint also loads into qpeft layers when
`quantization_config=QPeftConfig()` is passed (transformers alone refuses a config of another class for a
quantized checkpoint; `_merge_configs_on_load` lets exactly that case through). Passing a QPeftConfig for a
pre-quantized checkpoint (qpeft's or bitsandbytes') sets its compute dtype; the checkpoint's format wins.

Written against the quantizer API of transformers 5.17 .. 5.24 (the hooks both have; tested in both CI lanes).
Importing this module imports transformers; `import qpeft` does not import this module.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
import weakref

import torch
import torch.nn as nn

from .. import _cuda, _versions
from .accelerate import fsdp_requested, install

_versions.require("transformers")

from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming  # noqa: E402
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer  # noqa: E402
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, AutoHfQuantizer  # noqa: E402
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module  # noqa: E402
from transformers.utils.quantization_config import QuantizationConfigMixin  # noqa: E402

from ..models.fused.api import check_fusable, fuse  # noqa: E402
from ..models.moe import dequantize_experts_module  # noqa: E402
from ..models.quantization import on_model_quantized  # noqa: E402
from ..modules.nf4_experts import is_nf4_experts  # noqa: E402
from ..modules.qlinear_nf4 import BLOCKSIZES, QUANT_TYPES, QLinearNF4  # noqa: E402
from . import transformers_moe as moe  # noqa: E402

__all__ = ["QPeftConfig", "QPeftHfQuantizer", "register", "record_quantization_config", "to_bitsandbytes_config"]

QUANT_METHOD = "qpeft"
BASE_LAYER = r"\.base_layer\."  # where qpeft's (and PEFT's) LoRA layers keep the wrapped layer
COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# bitsandbytes' Linear4bit keys of one layer, relative to the layer (what the deserializer collects)
BNB_SUFFIXES = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                "weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4")


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
    elif isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = repr(dtype)
    if name == "None":
        return None
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"QPeftConfig: compute_dtype must be one of {sorted(COMPUTE_DTYPES)} (or the torch dtype), "
                         f"got {dtype!r}")
    return name


class QPeftConfig(QuantizationConfigMixin):
    """How to quantize on load (QLoRA's defaults, as BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)).

    quant_type: "nf4" or "fp4"; blocksize: 32..4096 (powers of two; bitsandbytes' default 64); double_quant:
    8-bit absmax (bitsandbytes' compress_statistics); compute_dtype: the matmul dtype (float32, float16,
    bfloat16; None: the input's dtype); modules_to_not_convert: module names or patterns kept in full precision
    (transformers' rule; None: the output head and tied weights, as transformers skips by default).
    fuse: after loading, `qpeft.fuse(model)` (the fused training path: fused norms, LoRA MLP / QKV blocks, the loss
    without logits; docs/fused-training.md). A model fuse does not take raises TypeError before any weight is
    read. How this process trains, not a property of the checkpoint: not written to config.json.
    """

    def __init__(self, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: torch.dtype | str = torch.bfloat16, modules_to_not_convert: list[str] | None = None,
                 quant_method: str = QUANT_METHOD, fuse: bool = False, **kwargs):
        if kwargs:
            raise TypeError(f"QPeftConfig got unexpected argument(s) {sorted(kwargs)}; it takes quant_type, "
                            f"blocksize, double_quant, compute_dtype, modules_to_not_convert, fuse")
        if not isinstance(fuse, bool):
            raise ValueError(f"QPeftConfig: fuse must be True or False, got {fuse!r}")
        if quant_method != QUANT_METHOD:
            raise ValueError(f"QPeftConfig: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"QPeftConfig: quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
            raise ValueError(f"QPeftConfig: blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
        if not isinstance(double_quant, bool):
            raise ValueError(f"QPeftConfig: double_quant must be True or False, got {double_quant!r}")
        if modules_to_not_convert is not None and (
                isinstance(modules_to_not_convert, str)
                or not all(isinstance(m, str) for m in modules_to_not_convert)):
            raise ValueError(f"QPeftConfig: modules_to_not_convert must be None or a list of module names, got "
                             f"{modules_to_not_convert!r}")
        self.quant_method = QUANT_METHOD
        self.quant_type = quant_type
        self.blocksize = int(blocksize)
        self.double_quant = double_quant
        self.compute_dtype = _dtype_name(compute_dtype)  # stored by name: config.json is JSON
        self.modules_to_not_convert = None if modules_to_not_convert is None else list(modules_to_not_convert)
        self.fuse = fuse

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("fuse", None)  # a training option of this process, not of the checkpoint (config.json)
        return d

    @property
    def torch_compute_dtype(self) -> torch.dtype | None:
        return None if self.compute_dtype is None else COMPUTE_DTYPES[self.compute_dtype]

    @classmethod
    def from_bitsandbytes(cls, bnb_config) -> "QPeftConfig":
        """The QPeftConfig equivalent to a 4-bit BitsAndBytesConfig (object or config.json dict)."""
        d = bnb_config if isinstance(bnb_config, dict) else bnb_config.to_dict()
        if not d.get("load_in_4bit"):
            raise ValueError("only 4-bit bitsandbytes checkpoints (load_in_4bit) can load into qpeft layers")
        storage = str(d.get("bnb_4bit_quant_storage", "uint8")).removeprefix("torch.")
        if storage != "uint8":
            raise ValueError(f"bnb_4bit_quant_storage={storage} is not supported (qpeft stores uint8)")
        return cls(quant_type=d.get("bnb_4bit_quant_type", "fp4"),
                   double_quant=bool(d.get("bnb_4bit_use_double_quant")),
                   compute_dtype=str(d.get("bnb_4bit_compute_dtype") or "float32"),
                   modules_to_not_convert=d.get("llm_int8_skip_modules"))


def to_bitsandbytes_config(config: QPeftConfig) -> dict:
    """The `quantization_config` entry under which transformers + bitsandbytes load a qpeft checkpoint (its
    tensors are already bitsandbytes' Linear4bit keys; transformers picks the loader from this entry alone).
    bitsandbytes' loader reads quant_type / blocksize / double quant from each layer's saved header, so only
    compute dtype and skipped modules matter here."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": config.quant_type, "bnb_4bit_use_double_quant": config.double_quant,
            "bnb_4bit_compute_dtype": config.compute_dtype or "float32", "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": config.modules_to_not_convert}


def _layer_name(full_layer_name: str) -> str:
    return full_layer_name.rpartition(".")[0] if full_layer_name.endswith(".weight") else full_layer_name


def _mark_loaded(module: QLinearNF4, layer: str, missing_keys) -> None:
    """The op sets the layer itself (its tensors are not the checkpoint's names one to one): tell the loader
    that every key of the layer but the bias (loaded as usual) is done, so nothing re-initialises it."""
    if missing_keys is not None:
        for key in [k for k in missing_keys if k.startswith(layer + ".weight")]:
            missing_keys.discard(key)
    module._is_hf_initialized = True
    for p in module.quantized_parameters():
        p._is_hf_initialized = True


class QPeftQuantize(ConversionOps):
    """Quantize one dense checkpoint weight, on the device it was read to."""

    def __init__(self, hf_quantizer: "QPeftHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None,
                missing_keys=None, **kwargs):
        (value,) = input_dict.values()
        value = value[0] if isinstance(value, (list, tuple)) else value
        experts = moe.experts_param(model, full_layer_name)
        if experts is not None:  # a fused experts tensor (gpt-oss's checkpoints): quantized one expert at a time
            moe.quantize_experts_param(*experts, full_layer_name, value, missing_keys)
            if value.device.type == "cpu":
                _return_freed_heap_to_os()
            return {}
        module, _ = get_module_from_name(model, full_layer_name)
        module.quantize_weight_(value)
        if value.device.type == "cpu":
            _return_freed_heap_to_os()
        _mark_loaded(module, _layer_name(full_layer_name), missing_keys)
        return {}


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def _return_freed_heap_to_os() -> None:
    """Quantizing on the CPU allocates and frees fp32 temporaries of each layer; glibc keeps freed blocks under
    its 32 MiB mmap threshold in the heap, so the process grows layer after layer. Measured on a 1 GiB bf16
    Llama checkpoint (benchmarks/bench_load.py): +578 MiB of anonymous memory after loading without a trim,
    +264 MiB with one after each layer (the 4-bit weights are ~200 MiB)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class QPeftDeserialize(ConversionOps):
    """Set one layer from its bitsandbytes Linear4bit tensors (a qpeft or bitsandbytes checkpoint)."""

    def __init__(self, hf_quantizer: "QPeftHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None,
                missing_keys=None, **kwargs):
        layer = _layer_name(full_layer_name)
        module, _ = get_module_from_name(model, full_layer_name)
        tensors = {}
        for key, value in input_dict.items():
            suffix = next((s for s in sorted(BNB_SUFFIXES, key=len, reverse=True)
                           if key == s or key.endswith("." + s)), None)
            if suffix is None:
                raise ValueError(f"{layer}: unexpected quantized tensor {key!r}")
            tensors[suffix] = value[0] if isinstance(value, (list, tuple)) else value
        if not isinstance(module, QLinearNF4):
            if set(tensors) == {"weight"}:  # a full-precision layer (the head, skipped modules): load it as is
                return {full_layer_name: tensors["weight"]}
            raise ValueError(f"{layer}: the checkpoint holds a 4-bit weight but the model's layer is "
                             f"{type(module).__name__} (modules_to_not_convert differs from the checkpoint's?)")
        if tensors.get("weight") is not None and tensors["weight"].is_floating_point():
            module.quantize_weight_(tensors["weight"])  # a dense layer in a quantized checkpoint: quantize it
        else:
            module.load_bnb_tensors_(tensors, name=layer)
        _mark_loaded(module, layer, missing_keys)
        return {}


class QPeftHfQuantizer(HfQuantizer):
    """transformers' hooks for quant_method "qpeft" (see the module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []

    def validate_environment(self, *args, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("QPeftConfig: device_map entries on 'disk' are not supported (a 4-bit layer cannot be "
                             f"offloaded to disk); got {device_map}")

    def update_device_map(self, device_map):
        # transformers' default (None) is the CPU; quantize where the model will run, as bitsandbytes does
        if device_map is None:
            return {"": _cuda.rt.current_device()} if _cuda.rt.available() else {"": "cpu"}
        return device_map

    def adjust_max_memory(self, max_memory):
        return {key: val * 0.90 for key, val in max_memory.items()}  # room for quantization scratch

    def param_element_size(self, model, param_name, param) -> float:
        if self.param_needs_quantization(model, param_name):
            return 0.5 + 4 / self.quantization_config.blocksize / (4 if self.quantization_config.double_quant else 1)
        return param.element_size()

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, name = get_module_from_name(model, param_name)
        return (isinstance(module, QLinearNF4) and name == "weight") or moe.experts_param(model, param_name) is not None

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        cfg = self.quantization_config
        if getattr(cfg, "fuse", False):
            check_fusable(model)  # refuse before any weight is read
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, cfg.modules_to_not_convert, getattr(model, "_keep_in_fp32_modules", None) or [])
        converted = replace_linear_layers(model, self.modules_to_not_convert, cfg)
        # fused MoE experts (transformers 5's 3-D gate_up_proj / down_proj): 4-bit, run by the "qpeft" experts
        # implementation (integrations/transformers_moe.py)
        converted += moe.prepare_experts(model, lambda n: not should_convert_module(n, self.modules_to_not_convert),
                                         cfg)
        self._model_ref = weakref.ref(model)  # for update_weight_conversions (transformers 5.17 does not pass it)
        if not converted:
            kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__ or
                            type(m).__name__ == "Conv1D"})
            raise ValueError(f"QPeftConfig: {type(model).__name__} has no nn.Linear layer to quantize (nor fused "
                             f"MoE experts) outside modules_to_not_convert={self.modules_to_not_convert} (linear-like "
                             f"modules found: {kinds or 'none'}; transformers' Conv1D is not supported)")
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # A layer the checkpoint did not fill would still be on the meta device: refuse rather than hand back
        # a model with missing weights.
        empty = [name for name, m in model.named_modules()
                 if isinstance(m, QLinearNF4) and m.weight.device.type == "meta"] + moe.unfinished_experts(model)
        if empty:
            raise ValueError(f"QPeftConfig: the checkpoint has no weight for {len(empty)} quantized layer(s): "
                             f"{empty[:5]}{' ...' if len(empty) > 5 else ''}")
        # transformers keeps the conversions it used, to reverse them in save_pretrained. Ours need no
        # reversal (the state dict is already the checkpoint's format) and have no reverse op: drop them.
        used = getattr(model, "_weight_conversions", None)
        if used:
            model._weight_conversions = moe.drop_experts_conversions(model, [c for c in used if not _is_ours(c)])

        if fsdp_requested():  # accelerate launch with FSDP: see integrations/accelerate.py

            install()
        if getattr(self.quantization_config, "fuse", False):
            fuse(model)
        return model

    def get_quantize_ops(self):
        return QPeftQuantize(self)

    def update_weight_conversions(self, weight_conversions, model=None):
        """The model's conversions with its fused-experts merges streamed one expert at a time (on the fly) or
        preceded by the 4-bit experts' deserializers (pre-quantized); then transformers' own handling. transformers
        5.24+ passes the model, 5.17 does not (the model prepared for loading is used then)."""
        target = model if model is not None else (self._model_ref() if getattr(self, "_model_ref", None) else None)
        if target is not None:
            weight_conversions = moe.update_experts_conversions(weight_conversions, target, self)
        if model is not None:
            return super().update_weight_conversions(weight_conversions, model)
        return super().update_weight_conversions(weight_conversions)

    def get_weight_conversions(self):
        """Pre-quantized: one converter per layer collecting its bitsandbytes tensors for QPeftDeserialize."""
        if not self.pre_quantized:
            return []
        # A model saved with qpeft's LoRA layers in it (prepare_for_qlora, then save_pretrained) keeps its
        # quantized base under `<layer>.base_layer.`: load it into the plain layer (the adapter tensors are
        # then reported as unexpected keys; adapters load from adapter files).
        # Converter patterns longest first: they are tried in order and "weight" alone also matches "weight.absmax".
        conversions = [WeightRenaming(source_patterns=BASE_LAYER, target_patterns="."),
                       WeightConverter(source_patterns=sorted(BNB_SUFFIXES, key=len, reverse=True),
                                       target_patterns="weight", operations=[QPeftDeserialize(self)])]
        return conversions

    # transformers >= 5.24 also reads these two to extend a model's own converters (MoE merges) to the
    # serialized tensors; both versions call get_weight_conversions above for the plain layers
    serialized_names = {"weight": sorted(BNB_SUFFIXES, key=len, reverse=True)}

    def get_load_operations(self):
        return {"deserialize": QPeftDeserialize}

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        experts = [m for m in model.modules() if is_nf4_experts(m)]
        for m in experts:
            dequantize_experts_module(m, dtype)
        if experts and getattr(model.config, "_experts_implementation", None) == moe.EXPERTS_IMPLEMENTATION:
            model.set_experts_implementation("grouped_mm")  # transformers' default for dense experts
        for name, module in list(model.named_modules()):
            if isinstance(module, QLinearNF4):
                dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                  device=module.weight.device, dtype=dtype or module.weight_dtype)
                with torch.no_grad():
                    dense.weight.copy_(module.dequantize(torch.float32))
                    if module.bias is not None:
                        dense.bias.copy_(module.bias)
                _set_submodule(model, name, dense)
        return model


def _is_ours(conversion) -> bool:
    """One of the two conversions get_weight_conversions returns (the classes are slotted: no marker attribute)."""
    if isinstance(conversion, WeightConverter):
        return any(isinstance(op, (QPeftDeserialize, QPeftQuantize)) for op in conversion.operations)
    return isinstance(conversion, WeightRenaming) and list(conversion._original_source_patterns) == [BASE_LAYER]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def replace_linear_layers(model: nn.Module, modules_to_not_convert: list[str], cfg: QPeftConfig) -> list[str]:
    """nn.Linear -> QLinearNF4 (on the meta device: nothing is allocated) except the skipped ones."""
    converted = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or not should_convert_module(name, modules_to_not_convert):
            continue
        layer = QLinearNF4.awaiting_weight(module.in_features, module.out_features, bias=module.bias is not None,
                                           compute_dtype=cfg.torch_compute_dtype, quant_type=cfg.quant_type,
                                           blocksize=cfg.blocksize, double_quant=cfg.double_quant,
                                           dtype=module.weight.dtype)
        layer.requires_grad_(False)
        _set_submodule(model, name, layer)
        converted.append(name)
    return converted


@on_model_quantized
def record_quantization_config(model: nn.Module, converted: list[str], quant_type: str, blocksize: int,
                               double_quant: bool, compute_dtype: torch.dtype | None) -> None:
    """After an in-place `qpeft.quantize_model` of a transformers model: record the equivalent QPeftConfig in
    model.config, so `save_pretrained` writes it and `from_pretrained` rebuilds exactly these layers (every
    other nn.Linear is named in modules_to_not_convert). Without it the reload would be a plain model whose
    linear weights transformers freshly initialises."""
    skipped = [re.escape(name) for name, m in model.named_modules() if type(m) is nn.Linear]
    skipped += [re.escape(t.name) for t in moe.find_experts(model) if not is_nf4_experts(t.module)]
    model.config.quantization_config = QPeftConfig(quant_type=quant_type, blocksize=blocksize,
                                                   double_quant=double_quant,
                                                   compute_dtype=compute_dtype,
                                                   modules_to_not_convert=sorted(skipped))
    if any(is_nf4_experts(m) for m in model.modules()):
        # 4-bit experts run with the "qpeft" implementation, and save_pretrained must not split their packed bytes
        # per expert (the model's merge converters reversed): the conversions it reverses, without those
        moe.use_qpeft_experts(model)
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange

        conversions = getattr(model, "_weight_conversions", None)
        if conversions is None:  # what revert_weight_conversion would build for a model not from from_pretrained
            conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                           if not isinstance(c, PrefixChange)]
        model._weight_conversions = moe.drop_experts_conversions(model, conversions)


def _merge_configs_on_load() -> None:
    """A QPeftConfig passed to from_pretrained of a pre-quantized checkpoint, one rule for qpeft and bitsandbytes
    checkpoints (and load_sharded_qlora's): the checkpoint's format wins (quant type, double quant, skipped
    modules; each layer's saved header decides the rest), the passed config sets compute_dtype.

    transformers alone would keep a qpeft checkpoint's whole config (its compute dtype too, with a warning that
    the passed one is ignored), and raises for a bitsandbytes checkpoint ("The model is quantized with
    BitsAndBytesConfig but you are passing a QPeftConfig"), which has exactly qpeft's tensors and so loads as a
    pre-quantized qpeft checkpoint. Every other combination keeps transformers' behaviour."""
    original = AutoHfQuantizer.merge_quantization_configs.__func__
    if getattr(original, "_qpeft", False):
        return

    @functools.wraps(original)
    def merge(cls, quantization_config, quantization_config_from_args):
        if isinstance(quantization_config_from_args, QPeftConfig):
            saved = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
            args = quantization_config_from_args
            method = str(saved.get("quant_method"))
            if method == QUANT_METHOD:
                fields = {k: saved[k] for k in ("quant_type", "blocksize", "double_quant", "modules_to_not_convert")
                          if k in saved}
                return QPeftConfig(**fields, compute_dtype=args.compute_dtype)
            if method in ("bitsandbytes", "QuantizationMethod.BITS_AND_BYTES") and saved.get("load_in_4bit"):
                from_checkpoint = QPeftConfig.from_bitsandbytes(saved)
                return QPeftConfig(quant_type=from_checkpoint.quant_type, blocksize=args.blocksize,
                                   double_quant=from_checkpoint.double_quant, compute_dtype=args.compute_dtype,
                                   modules_to_not_convert=from_checkpoint.modules_to_not_convert)
        return original(cls, quantization_config, quantization_config_from_args)

    merge._qpeft = True
    AutoHfQuantizer.merge_quantization_configs = classmethod(merge)


def register() -> None:
    """Register "qpeft" with transformers (once per process; qpeft does it when transformers is imported)."""
    # transformers' decorators raise on a second registration of a name
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QPeftConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(QPeftHfQuantizer)
    _merge_configs_on_load()


register()
