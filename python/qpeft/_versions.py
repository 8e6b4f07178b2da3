"""The versions of other libraries qpeft supports, and the checks that say so at first use.

The lower bounds are the versions CI's image lane pins (the GPU machine's image: torch 2.11.0, Triton 3.6.0,
transformers 5.17.0, with the newest peft / bitsandbytes that install beside them); the latest lane tests the
newest releases. setup.py declares the same ranges. Importing this module imports nothing else.
"""
from __future__ import annotations

import functools
import importlib.metadata
import re

# name -> oldest supported release (inclusive). No upper bounds: no newer release is known to break qpeft.
MINIMUM = {
    "torch": "2.11",
    "triton": "3.6",
    "transformers": "5.17",
    "peft": "0.21.2",
    "bitsandbytes": "0.50.2",
}

# Triton's interpreter before 3.7 turns a scalar kernel argument into a Python int with int() on a
# 1-element array (`range(0, K, BLOCK_K)` in a kernel), which NumPy 2.4 made an error ("only 0-dimensional
# arrays can be converted to Python scalars"); Triton 3.7 squeezes the array first.
INTERPRETER_NUMPY_FIX = "3.7"
NUMPY_SCALAR_ERROR = "2.4"

# torch 2.11's fully_shard builds each sharded Parameter as nn.Parameter(dtensor) followed by
# .requires_grad_(param.requires_grad), which raises "only Tensors of floating point dtype can require gradients"
# for a frozen uint8 Parameter (pytorch #177844, fixed by PR #177948 / #178075 in 2.12; scaleout.md §2a: 2.12.0
# and 2.14.1 shard it bit-exactly). The same fix stopped MixedPrecisionPolicy from casting non-float Parameters.
# Checked here (not in qpeft.distributed) because accelerate's FSDP2 prepare, wrapped by qpeft.integrations, asks
# the same question.
FSDP2_MIN_TORCH = (2, 12)


def parse(version: str) -> tuple[int, ...]:
    """'2.11.0+cu130' -> (2, 11, 0); pre-release and local tags are dropped (2.12.0a0 counts as 2.12.0)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        m = re.match(r"\d+", piece)
        if m is None:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def supported_range(name: str) -> str:
    return f"{name}>={MINIMUM[name]}"


def unsupported_reason(name: str, version: str | None = None) -> str | None:
    """Why the installed (or given) version of `name` is not supported, or None when it is."""
    version = version or installed(name)
    if version is None:
        return f"{name} is not installed (qpeft supports {supported_range(name)})"
    if parse(version) < parse(MINIMUM[name]):
        return f"{name} {version} is older than qpeft supports ({supported_range(name)})"
    return None


@functools.cache
def require(name: str) -> str:
    """The installed version of `name`; raises ImportError naming the version and the supported range when
    it is missing or too old (cached: called at the first use of a feature that needs `name`)."""
    reason = unsupported_reason(name)
    if reason is not None:
        raise ImportError(f"qpeft: {reason}; install a supported release, e.g. pip install "
                          f"'{supported_range(name)}'")
    return installed(name)


def interpreter_reason(triton_version: str | None = None, numpy_version: str | None = None) -> str | None:
    """Why Triton's CPU interpreter (TRITON_INTERPRET=1) cannot run qpeft's kernels here, or None."""
    triton_version = triton_version or installed("triton")
    numpy_version = numpy_version or installed("numpy")
    if triton_version is None or numpy_version is None:
        return None
    if parse(triton_version) < parse(INTERPRETER_NUMPY_FIX) and parse(numpy_version) >= parse(NUMPY_SCALAR_ERROR):
        return (f"the Triton {triton_version} interpreter (TRITON_INTERPRET=1) does not run with NumPy "
                f"{numpy_version}: use numpy<{NUMPY_SCALAR_ERROR} or triton>={INTERPRETER_NUMPY_FIX} (compiled "
                f"kernels on a GPU are not affected)")
    return None


class FSDP2UnsupportedError(RuntimeError):
    """The installed torch cannot shard QLinearNF4's uint8 Parameters with FSDP2."""


def _torch_version() -> tuple[int, int]:
    import torch  # a dependency of qpeft, imported only when asked (this module imports nothing at load)

    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def check_fsdp2_supported() -> None:
    """Raise FSDP2UnsupportedError (naming the installed and the needed version) on torch older than 2.12."""
    if _torch_version() < FSDP2_MIN_TORCH:
        import torch

        need = ".".join(map(str, FSDP2_MIN_TORCH))
        raise FSDP2UnsupportedError(
            f"qpeft.distributed.shard_qlora_model: FSDP2 needs torch>={need} to shard QLinearNF4's frozen uint8 "
            f"parameters; torch {torch.__version__} is installed, whose fully_shard raises 'only Tensors of "
            f"floating point dtype can require gradients' on them (pytorch #177844, fixed in {need}). Upgrade "
            f"torch, or train with DeepSpeed ZeRO-3 (qpeft.distributed.zero3_config).")
