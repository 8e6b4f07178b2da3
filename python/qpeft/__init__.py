"""qpeft: fused CUDA C++ / Triton kernels for quantized parameter-efficient fine-tuning.

Public names are resolved lazily from the modules in `_PUBLIC_MODULES` (each lists its public
names in `__all__`), so `import qpeft` is cheap, compiles nothing and needs neither nvcc nor a GPU.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

__version__ = "0.1.0"

from . import _moved

# Old module paths (qpeft.codes, qpeft.methods.*, ...) keep working with a DeprecationWarning naming the new one.
_moved.install()

# Sub-packages that are part of the API as modules (qpeft.formats.codes.nf4(), qpeft.optim.AdamW8bit, ...), and
# the old names of moved ones (qpeft.codes, qpeft.methods), which warn.
_SUBMODULES = ("formats", "quant", "reference", "ops", "autograd", "modules", "models", "tuners", "optim",
               "distributed", "integrations", "codes", "methods")

# Modules whose `__all__` names are re-exported at top level, searched in this order.
_PUBLIC_MODULES = (
    "qpeft._backend",
    "qpeft.quant.state",
    "qpeft.quant.functional",
    "qpeft.autograd.nf4_matmul",
    "qpeft.modules.qlinear_nf4",
    "qpeft.models.quantization",
    "qpeft.autograd.lora",
    "qpeft.autograd.linear_cross_entropy",
    "qpeft.quant.experts",
    "qpeft.autograd.rmsnorm",
    "qpeft.autograd.rope",
    "qpeft.autograd.swiglu",
    "qpeft.autograd.lora_mlp",
    "qpeft.autograd.lora_qkv",
    "qpeft.models.fused.api",
    "qpeft.modules.lora_linear",
    "qpeft.tuners.lora.model",
    "qpeft.tuners.params",
    "qpeft.tuners.adapter_io",
    "qpeft.tuners.prompt_tuning",
    "qpeft.tuners.p_tuning",
    "qpeft.tuners.prefix_tuning",
    "qpeft.tuners.p_tuning_v2",
    "qpeft.tuners.dect",
    "qpeft.tuners.bottleneck",
    "qpeft.tuners.bitfit",
    "qpeft.tuners.adalora",
    "qpeft.tuners.unipelt",
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


class _RunWhenImported:
    """An import hook: once `name` is imported after qpeft, run `then` (import qpeft's integration with it).

    transformers: register quant_method "qpeft" (qpeft.integrations.transformers), so that `from_pretrained` of a
    checkpoint saved with qpeft's quantizer finds it; without it transformers would warn and load that checkpoint
    unquantized, with freshly initialised weights. PEFT: install qpeft's LoRA hook (qpeft.integrations.peft), so
    that a plain `peft.LoraConfig` builds qpeft's layer on QLinearNF4. `import qpeft` itself imports neither.
    A probe (`importlib.util.find_spec(name)`, as transformers does for peft) is answered but does not use the
    hook up: it stays until the module really executes."""

    def __init__(self, name: str, then):
        self.name, self.then, self._looking = name, then, False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or self._looking:
            return None
        self._looking = True
        try:
            spec = importlib.util.find_spec(fullname)  # the real spec, from the finders after this one
        finally:
            self._looking = False
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            exec_module = spec.loader.exec_module

            def exec_then_run(module):
                exec_module(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                self.then()

            spec.loader.exec_module = exec_then_run
        return spec


def _import_integration(module: str, what: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError as e:  # e.g. an unsupported release: the integration's entry points raise the reason
        import warnings

        warnings.warn(f"qpeft: {what}: {e}", RuntimeWarning, stacklevel=2)


def _register_with_transformers() -> None:
    _import_integration("qpeft.integrations.transformers", "quant_method 'qpeft' not registered with transformers")


def _hook_into_peft() -> None:
    _import_integration("qpeft.integrations.peft", "a plain peft.LoraConfig will not build qpeft's LoRA layers")


for _name, _then in (("transformers", _register_with_transformers), ("peft", _hook_into_peft)):
    if _name in sys.modules:
        _then()
    elif importlib.util.find_spec(_name) is not None:
        sys.meta_path.insert(0, _RunWhenImported(_name, _then))
del _name, _then


def __dir__():
    global _index
    if _index is None:
        _index = _build_index()
    return sorted({*globals(), *_index, *_LAZY, *_SUBMODULES})
