"""Backend selection per op: QPEFT_BACKEND=auto|cuda|triton|torch.

Selection happens inside the opaque torch.library op implementations, so it never causes graph
breaks, and fake/meta tracing never triggers a build.
- CPU (and any non-CUDA) tensors always use the PyTorch reference.
- `auto`: the CUDA extension when it builds, else Triton, else the reference; warns once per
  fallback reason.
- An explicit choice that cannot run raises with the reason (e.g. "nvcc not found").
"""
from __future__ import annotations

import os
import warnings

import torch

from . import _cuda, _jit, _versions

__all__ = ["backend_info"]

_versions.require("torch")  # at the first import of an op: ImportError naming the version and the range

BACKENDS = ("auto", "cuda", "triton", "torch")


def requested() -> str:
    b = os.environ.get("QPEFT_BACKEND", "auto").strip().lower()
    if b not in BACKENDS:
        raise ValueError(f"QPEFT_BACKEND must be one of {BACKENDS}, got {b!r}")
    return b


@_cuda.cached
def cuda_ext_status() -> tuple[bool, str]:
    """(available, reason). Builds the extension on first call (only ever called for CUDA tensors)."""
    if os.environ.get("QPEFT_DISABLE_CUDA_EXT") == "1":
        return False, "disabled by QPEFT_DISABLE_CUDA_EXT=1"
    if not _cuda.rt.available():
        return False, "no CUDA device"
    try:
        _jit.load()
        return True, "built"
    except Exception as e:  # no nvcc / ninja, compile error
        return False, f"{type(e).__name__}: {e}"


@_cuda.cached
def triton_status() -> tuple[bool, str]:
    try:
        import triton
    except Exception as e:
        return False, f"triton not importable ({e})"
    too_old = _versions.unsupported_reason("triton", triton.__version__)
    if too_old is not None:
        return False, too_old
    if os.environ.get("TRITON_INTERPRET") == "1":
        broken = _versions.interpreter_reason(triton.__version__)
        if broken is not None:
            return False, broken
        return True, "interpreter (TRITON_INTERPRET=1)"
    if not _cuda.rt.available():
        return False, "no CUDA device"
    return True, "available"


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def is_hopper_or_newer(device: torch.device) -> bool:
    """sm_90+: where Triton lowers tl.dot to wgmma, which our CUDA C++ tiles (mma.sync) do not use."""
    capability = _cuda.device_capability(device)
    return capability is not None and capability[0] >= 9


def select(op: str, device: torch.device, *, cuda: bool = True, triton: bool = True,
           prefer_triton: bool = False) -> str:
    """Return "cuda", "triton" or "torch" for `op` on `device`.

    cuda / triton: whether this op has that implementation (some ops are Triton-only).
    prefer_triton: under `auto` only, try Triton before the CUDA extension (a shape/arch gate of the caller:
    e.g. the tensor-core GEMMs on Hopper, where the Triton kernels use wgmma and ours do not).
    """
    if not _cuda.rt.is_cuda(device):
        # CPU tensors use the reference, except the Triton interpreter when explicitly asked for
        # (CI runs the Triton kernels this way: QPEFT_BACKEND=triton TRITON_INTERPRET=1).
        if requested() == "triton" and os.environ.get("TRITON_INTERPRET") == "1" and triton:
            ok, why = triton_status()
            if not ok:
                raise RuntimeError(f"qpeft: QPEFT_BACKEND=triton but Triton is unavailable: {why}")
            return "triton"
        return "torch"
    want = requested()
    if want == "torch":
        return "torch"
    if want == "cuda":
        if not cuda:
            raise RuntimeError(f"qpeft: op {op} has no CUDA C++ implementation (QPEFT_BACKEND=cuda)")
        ok, why = cuda_ext_status()
        if not ok:
            raise RuntimeError(f"qpeft: QPEFT_BACKEND=cuda but the CUDA extension is unavailable: {why}")
        return "cuda"
    if want == "triton":
        if not triton:
            raise RuntimeError(f"qpeft: op {op} has no Triton implementation (QPEFT_BACKEND=triton)")
        ok, why = triton_status()
        if not ok:
            raise RuntimeError(f"qpeft: QPEFT_BACKEND=triton but Triton is unavailable: {why}")
        return "triton"
    # auto
    if prefer_triton and triton and triton_status()[0]:
        return "triton"
    if cuda:
        ok, why = cuda_ext_status()
        if ok:
            return "cuda"
        _warn_once(f"qpeft: CUDA extension unavailable ({why}); falling back to Triton/PyTorch")
    if triton:
        ok, why = triton_status()
        if ok:
            return "triton"
        _warn_once(f"qpeft: Triton unavailable ({why}); falling back to the PyTorch reference")
    return "torch"


def backend_info() -> dict:
    """What is available and why not: {"requested", "cuda_ext": (ok, why), "triton": (ok, why), ...}."""
    info = {
        "requested": requested(),
        "torch": torch.__version__,
        "torch_cuda": _cuda.rt.torch_cuda(),
        "cuda_device": _cuda.rt.device_name(_cuda.rt.current_device()) if _cuda.rt.available() else None,
        "triton": triton_status(),
    }
    if _cuda.rt.available():
        info["cuda_ext"] = cuda_ext_status()
    else:
        nvcc = _jit.find_nvcc()
        info["cuda_ext"] = (False, "no CUDA device" + ("" if nvcc else "; nvcc not found"))
    return info
