"""Old import paths of modules that moved into sub-packages (December 2026), kept working with a
DeprecationWarning that names the new path.

One table instead of a shim file per old module: `import qpeft.codes` (or `from qpeft.methods.adalora import
...`, or `qpeft.codes` as an attribute) finds the module at its new home through `MovedModuleFinder`, which
`qpeft/__init__.py` puts first on `sys.meta_path`. The old name is bound to the same module object (no second
copy: classes and registries stay unique), and only paths a user could plausibly have imported are listed.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import warnings

# old module -> new module
MOVED = {
    "qpeft.codes": "qpeft.formats.codes",
    "qpeft.quant_state": "qpeft.quant.state",
    "qpeft.quantize": "qpeft.quant.functional",
    "qpeft.model_quantization": "qpeft.models.quantization",
    "qpeft.lora_model": "qpeft.tuners.lora.model",
    "qpeft.adapter_io": "qpeft.tuners.adapter_io",
    "qpeft.multi_lora": "qpeft.tuners.lora.mixed_batch",
    "qpeft.methods": "qpeft.tuners",
    **{f"qpeft.methods.{m}": f"qpeft.tuners.{m}" for m in (
        "adalora", "bitfit", "bottleneck", "dect", "p_tuning", "p_tuning_v2", "prefix_tuning", "prompt_tuning",
        "unipelt")},
}

# frames skipped to find the importing line: the import system, this module and qpeft.__getattr__ (which
# imports the old name when it is used as an attribute: qpeft.formats.codes.nf4())
_IMPORT_MACHINERY = ("<frozen importlib", importlib.__file__.rpartition(os.sep)[0], __file__,
                     os.path.join(os.path.dirname(__file__), "__init__.py"))


def _caller_stacklevel() -> int:
    """warnings.warn's stacklevel (from warn_moved) of the first frame outside the import machinery and this
    module: the user's import. warnings itself does not count importlib's _bootstrap frames."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_IMPORT_MACHINERY):
        frame = frame.f_back
        name = frame.f_code.co_filename
        if not ("importlib" in name and "_bootstrap" in name):
            level += 1
    return level


def warn_moved(old: str) -> None:
    warnings.warn(f"{old} moved to {MOVED[old]}: import it from there ({old} will be removed in a future "
                  f"release)", DeprecationWarning, stacklevel=_caller_stacklevel())


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names of MOVED and loads them as the module at the new name."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        warn_moved(spec.name)
        module = importlib.import_module(MOVED[spec.name])
        # the import system sets __spec__ on what create_module returns: keep the module's own, restored below
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec  # the module was executed at its new name already


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
