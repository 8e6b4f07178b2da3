"""qpeft: fused CUDA C++ / Triton kernels for quantized parameter-efficient fine-tuning.

Public names are resolved lazily from the modules in `_PUBLIC_MODULES` (each lists its public
names in `__all__`), so `import qpeft` is cheap, compiles nothing and needs neither nvcc nor a GPU.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

__version__ = "0.1.0"

# Submodules that are part of the API as modules (qpeft.codes.nf4(), ...).
_SUBMODULES = ("codes", "methods", "ops", "reference", "modules", "autograd", "optim")

# Modules whose `__all__` names are re-exported at top level, searched in this order.
_PUBLIC_MODULES = (
    "qpeft._backend",
    "qpeft.quant_state",
    "qpeft.quantize",
    "qpeft.autograd.nf4_matmul",
    "qpeft.modules.qlinear_nf4",
    "qpeft.model_quantization",
    "qpeft.autograd.lora",
    "qpeft.modules.lora_linear",
    "qpeft.lora_model",
    "qpeft.params",
    "qpeft.adapter_io",
    "qpeft.methods.prompt_tuning",
    "qpeft.methods.p_tuning",
    "qpeft.methods.prefix_tuning",
    "qpeft.methods.p_tuning_v2",
    "qpeft.methods.dect",
    "qpeft.methods.bottleneck",
    "qpeft.methods.bitfit",
    "qpeft.methods.adalora",
    "qpeft.methods.unipelt",
    "qpeft.autograd.rmsnorm",
    "qpeft.autograd.rope",
    "qpeft.autograd.swiglu",
    "qpeft.autograd.lora_mlp",
    "qpeft.autograd.lora_qkv",
)

# Names served by modules that import an optional library (PEFT, transformers): {name: module}. Looked up
# first and kept out of _PUBLIC_MODULES, whose index is built by importing every module in it (listing these
# there would import peft on the first `qpeft.<anything>`).
_LAZY = {
    "lora_config": "qpeft.integrations.peft",
    "QPeftLoraLinear": "qpeft.integrations.peft",
    "peft_from_pretrained": "qpeft.integrations.peft",
    "QPeftConfig": "qpeft.integrations.transformers",
}

_index: dict[str, str] | None = None


def _build_index() -> dict[str, str]:
    index: dict[str, str] = {"backend_info": "qpeft._backend"}
    for mod_name in _PUBLIC_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:  # module not written (yet): skip it, surface any other error
                continue
            raise
        for name in getattr(mod, "__all__", ()):
            index.setdefault(name, mod_name)
    return index


def __getattr__(name: str):
    global _index
    if name in _SUBMODULES:
        return importlib.import_module(f"qpeft.{name}")
    if name.startswith("__"):
        raise AttributeError(name)
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    # `from .. import _backend` inside qpeft lands here before the submodule is imported: resolve
    # submodules directly, so that building the name index (which imports everything) cannot recurse.
    if importlib.util.find_spec(f"qpeft.{name}") is not None:
        return importlib.import_module(f"qpeft.{name}")
    if _index is None:
        _index = _build_index()
    if name in _index:
        value = getattr(importlib.import_module(_index[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qpeft' has no attribute {name!r}")


class _RegisterWhenTransformersLoads:
    """A one-shot import hook: when transformers is imported after qpeft, register quant_method "qpeft" with it
    (qpeft.integrations.transformers), so that `from_pretrained` of a checkpoint saved with qpeft's quantizer
    finds it. Without the registration transformers would warn and load that checkpoint unquantized, with
    freshly initialised weights. `import qpeft` itself never imports transformers."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the real spec, from the finders after this one
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                _register_with_transformers()

            spec.loader.exec_module = exec_then_register
        return spec


def _register_with_transformers() -> None:
    try:
        importlib.import_module("qpeft.integrations.transformers")
    except ImportError as e:  # e.g. an unsupported transformers: QPeftConfig raises the reason when used
        import warnings

        warnings.warn(f"qpeft: quant_method 'qpeft' not registered with transformers: {e}", RuntimeWarning,
                      stacklevel=2)


if "transformers" in sys.modules:
    _register_with_transformers()
elif importlib.util.find_spec("transformers") is not None:
    sys.meta_path.insert(0, _RegisterWhenTransformersLoads())


def __dir__():
    global _index
    if _index is None:
        _index = _build_index()
    return sorted({*globals(), *_index, *_LAZY, *_SUBMODULES})
