"""Every public name a user imports, through its documented path, and the old paths of moved modules.

The names below are qpeft's public API as of the December 2026 restructure (the `__all__` of the modules re-exported
at top level, the lazily served PEFT/transformers names, the sub-packages that are API as modules): the package
layout may change under them, these paths may not. Old module paths (qpeft.codes, qpeft.methods.*, ...) keep
working, bound to the moved module, with a DeprecationWarning that names the new path.
"""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import qpeft
from qpeft import _moved

TOP_LEVEL = [
    "AdaLoraLinear", "AdapterMergeError", "AdapterMethod", "BottleneckAdapter", "DecT", "GatedLoraLinear",
    "GatedPrefix", "LinearQuantState", "LoraFunction", "LoraLinear", "LoraRankWarning", "NESTED_BLOCKSIZE",
    "NF4MatmulFunction", "PTuningEncoder", "PTuningV2Encoder", "PTuningV2Head", "ParameterReport", "PrefixEncoder",
    "PromptLearningModel", "PromptTuningEncoder", "QLinearNF4", "QuantState", "QuantizeReport", "adalora_layers",
    "adalora_rank_pattern", "add_adalora", "add_bottleneck_adapters", "add_lora", "add_p_tuning", "add_p_tuning_v2",
    "add_prefix_tuning", "add_prompt_tuning", "add_unipelt", "apply_bitfit", "backend_info", "bitfit_state_dict",
    "bottleneck_adapter", "bottleneck_state_dict", "budget_schedule", "delete_lora_adapter", "dequantize_4bit",
    "dequantize_blockwise", "dequantize_linear", "disable_lora", "find_adapter_sites", "freeze_except",
    "is_linear_like", "load_adapter", "load_bitfit", "load_bottleneck_adapters", "load_prompt_adapter",
    "load_quantized_checkpoint", "load_unipelt", "lora_layers", "lora_linear", "merge_adalora", "merge_and_unload",
    "merge_bitfit", "merge_bottleneck_adapters", "merge_lora", "merge_unipelt", "nf4_matmul",
    "orthogonal_regularization", "prepare_for_qlora", "quantize_4bit", "quantize_blockwise", "quantize_linear",
    "quantize_model", "register_method", "remove_bottleneck_adapters", "remove_unipelt", "save_adapter",
    "save_bitfit", "save_bottleneck_adapters", "save_unipelt", "set_lora_adapter", "set_unipelt_submodules",
    "trainable_parameters", "unipelt_state_dict", "unmerge_lora", "update_and_allocate",
]
# served by modules that import PEFT / transformers (never imported by `import qpeft`)
TOP_LEVEL_OPTIONAL = {"lora_config": "peft", "QPeftLoraLinear": "peft", "peft_from_pretrained": "peft",
                      "QPeftConfig": "transformers"}
# sub-packages and modules that are API as modules, with names users import from them
SUBMODULE_NAMES = {
    "qpeft.formats.codes": ["nf4", "fp4", "dynamic_map", "normal_map", "quantile_code"],
    "qpeft.quant": [],
    "qpeft.ops": [],
    "qpeft.reference": [],
    "qpeft.autograd": [],
    "qpeft.modules.qlinear_nf4": ["QLinearNF4"],
    "qpeft.modules.lora_linear": ["LoraLinear"],
    "qpeft.optim": ["AdamW8bit", "Adam8bit", "Lion8bit", "PagedAdamW", "PagedAdamW8bit", "PagedLion8bit"],
    "qpeft.distributed": ["shard_qlora_model", "check_fsdp2_supported", "FSDP2_MIN_TORCH", "zero3_config",
                          "prepare_zero3", "load_sharded_qlora", "load_full_state_dict", "ShardedLoadError"],
    "qpeft.integrations.transformers": ["QPeftConfig", "QPeftHfQuantizer", "to_bitsandbytes_config"],
    "qpeft.integrations.peft": ["QPeftLoraLinear", "lora_config", "peft_from_pretrained"],
    "qpeft.cli": ["main"],
}
OPTIONAL_MODULE = {"qpeft.integrations.transformers": "transformers", "qpeft.integrations.peft": "peft"}


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_name(name):
    value = getattr(qpeft, name)
    assert name in dir(qpeft)
    home = importlib.import_module(qpeft._index[name] if qpeft._index and name in qpeft._index else
                                   qpeft._build_index()[name])
    assert getattr(home, name) is value


@pytest.mark.parametrize("name", sorted(TOP_LEVEL_OPTIONAL))
def test_top_level_name_of_an_optional_integration(name):
    pytest.importorskip(TOP_LEVEL_OPTIONAL[name])
    assert getattr(qpeft, name) is getattr(importlib.import_module(qpeft._LAZY[name]), name)


@pytest.mark.parametrize("module", sorted(SUBMODULE_NAMES))
def test_submodule_names(module):
    if module in OPTIONAL_MODULE:
        pytest.importorskip(OPTIONAL_MODULE[module])
    mod = importlib.import_module(module)
    for name in SUBMODULE_NAMES[module]:
        assert hasattr(mod, name), f"{module}.{name}"


def test_every_reexported_module_lists_only_existing_names():
    for module in qpeft._PUBLIC_MODULES:
        mod = importlib.import_module(module)
        missing = [n for n in mod.__all__ if not hasattr(mod, n)]
        assert not missing, f"{module}.__all__ names missing attributes: {missing}"


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_old_module_path_warns_and_is_the_moved_module(old):
    """A fresh interpreter (so that the old name is not cached): `import <old>` warns once, naming the new path,
    and binds the old name to the very module object at the new path (no second copy of any class)."""
    new = _moved.MOVED[old]
    code = ("import warnings, sys, importlib\n"
            "warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            f"    old = importlib.import_module({old!r})\n"
            f"new = importlib.import_module({new!r})\n"
            "assert old is new, (old, new)\n"
            f"assert sys.modules[{old!r}] is new\n"
            f"assert new.__spec__.name == {new!r}, new.__spec__\n"
            "msgs = [str(x.message) for x in w if issubclass(x.category, DeprecationWarning)]\n"
            f"assert any({old!r} + ' moved to ' + {new!r} in m for m in msgs), msgs\n"
            "assert all(x.filename == '<string>' for x in w if issubclass(x.category, DeprecationWarning)), "
            "[x.filename for x in w]\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_old_names_as_attributes_warn_too():
    """`qpeft.codes.nf4()` (the attribute, no import statement) resolves to qpeft.formats.codes and warns, pointing
    at the user's line."""
    code = ("import warnings, qpeft\n"
            "warnings.simplefilter('always')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    book = qpeft.codes.nf4()\n"
            "import qpeft.formats.codes as c\n"
            "assert qpeft.codes is c and book.equal(c.nf4())\n"
            "d = [x for x in w if issubclass(x.category, DeprecationWarning)]\n"
            "assert len(d) == 1 and 'qpeft.codes moved to qpeft.formats.codes' in str(d[0].message), d\n"
            "assert d[0].filename == '<string>', d[0].filename\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_no_two_public_modules_export_one_name_differently():
    """qpeft.X is the first module's X in _PUBLIC_MODULES: two modules exporting different objects under one name
    would make the other unreachable at top level (the experts' one-argument swiglu once hid qpeft.swiglu)."""
    owners: dict[str, tuple[str, object]] = {}
    clashes = []
    for module in qpeft._PUBLIC_MODULES:
        mod = importlib.import_module(module)
        for name in mod.__all__:
            value = getattr(mod, name)
            if name in owners and owners[name][1] is not value:
                clashes.append((name, owners[name][0], module))
            owners.setdefault(name, (module, value))
    assert not clashes, clashes
