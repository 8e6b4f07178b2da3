"""Lazy JIT build of the CUDA extension `qpeft_C` (csrc/) with torch.utils.cpp_extension + ninja.

Nothing here runs at import time. `load()` compiles on first use into a cache directory keyed by
torch version, CUDA version and target arch (torch's own cache does not key on its version), then
loads the shared library, whose TORCH_LIBRARY block registers the raw ops `torch.ops.qpeft_C.*`.

Environment: QPEFT_BUILD_DIR (cache root, default ~/.cache/qpeft), QPEFT_VERBOSE_BUILD=1,
TORCH_CUDA_ARCH_LIST (e.g. "9.0"; default: the visible GPU), MAX_JOBS.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

from . import _cuda

_PKG_CSRC = Path(__file__).resolve().parent / "csrc"          # non-editable install (package data)
_REPO_CSRC = Path(__file__).resolve().parents[2] / "csrc"     # editable install / source tree


def csrc_dir() -> Path:
    for d in (_PKG_CSRC, _REPO_CSRC):
        if d.is_dir() and any(d.glob("*.cu")):
            return d
    raise RuntimeError(f"qpeft: CUDA sources not found (looked in {_PKG_CSRC} and {_REPO_CSRC})")


def sources() -> list[Path]:
    d = csrc_dir()
    return sorted([*d.glob("*.cpp"), *d.glob("*.cu")])


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _cuda_home() -> str | None:
    """CUDA_HOME for cpp_extension: the env var, else the toolkit root of `nvcc` (<root>/bin/nvcc).

    `nvcc` on PATH may be a wrapper script (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc),
    so the root is the first candidate that really holds the toolkit (include/cuda_runtime_api.h).
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = find_nvcc()
    if nvcc is None:
        return None
    for root in (Path(os.path.realpath(nvcc)).parent.parent, Path("/usr/local/cuda")):
        if (root / "include" / "cuda_runtime_api.h").exists():
            return str(root)
    return str(Path(os.path.realpath(nvcc)).parent.parent)


def target_arch() -> str:
    rt = _cuda.rt
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    if rt.available():
        major, minor = rt.capability(rt.current_device())
        return f"{major}.{minor}"
    raise RuntimeError("qpeft: no CUDA device visible and TORCH_CUDA_ARCH_LIST is not set; "
                       "set TORCH_CUDA_ARCH_LIST (e.g. '9.0') to build without a GPU")


def _extra_include_paths() -> list[str]:
    """Headers of the pip CUDA runtime (nvidia/cu13/include) when the toolkit lacks them."""
    paths = []
    try:
        import nvidia  # namespace package of the pip CUDA wheels

        for root in getattr(nvidia, "__path__", []):
            for sub in ("cu13", "cuda_runtime", "cu12"):
                inc = Path(root) / sub / "include"
                if inc.is_dir():
                    paths.append(str(inc))
    except ImportError:
        pass
    return paths


def build_dir() -> Path:
    """<QPEFT_BUILD_DIR>/torch<ver>-cu<ver>-sm<arch>: torch's own build cache does not key on torch."""
    import torch

    arch = target_arch().replace(";", "_").replace(".", "").replace(" ", "_")
    tag = f"torch{torch.__version__.split('+')[0]}-cu{_cuda.rt.torch_cuda()}-sm{arch}"
    root = Path(os.environ.get("QPEFT_BUILD_DIR", Path.home() / ".cache" / "qpeft"))
    return root / tag


@_cuda.cached
def load() -> Path:
    """Build (if needed) and load `qpeft_C`; returns the build directory. Raises with the reason."""
    rt = _cuda.rt
    if rt.torch_cuda() is None:
        raise RuntimeError("qpeft: this torch build has no CUDA support (torch.version.cuda is None)")
    if find_nvcc() is None:
        raise RuntimeError("qpeft: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    cuda_home = _cuda_home()
    os.environ.setdefault("CUDA_HOME", cuda_home)
    arch = target_arch()
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    with _build_lock(out):
        _build(rt, out)
    return out


def _torch_guard_is_a_baton() -> bool:
    """How this torch guards a JIT build at <build dir>/lock. Up to 2.14 (at least): torch.utils.file_baton, a file
    whose mere existence makes every other build wait, removed only by its owner. 2.15: an OS advisory lock on the
    same path (filelock), released by the kernel when its holder dies; the file may stay and means nothing.
    Detected by what torch.utils.cpp_extension imports, not by version."""
    from torch.utils import cpp_extension

    return hasattr(cpp_extension, "FileBaton") and not hasattr(cpp_extension, "FileLock")


@contextlib.contextmanager
def _build_lock(out: Path):
    """Hold an flock on <out>/qpeft-build.flock for the build. Where torch's own guard is a baton file (<out>/lock,
    `_torch_guard_is_a_baton`), a build killed mid-way (Ctrl-C, a CI timeout) leaves it and every later build
    waits on it forever, silently. The kernel drops an flock with its process, so whoever holds ours is the only
    builder there (every qpeft build takes it first), and a baton it finds is stale: removed, with a warning.
    Where torch holds an OS lock on that path instead, its file is left alone."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's guard alone
        yield
        return
    with open(out / "qpeft-build.flock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            baton = out / "lock"
            if baton.exists() and _torch_guard_is_a_baton():
                warnings.warn(f"qpeft: removing {baton}, left by a build that was interrupted (no build holds "
                              f"{f.name}); building again", RuntimeWarning, stacklevel=4)
                baton.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(rt, out: Path) -> None:
    rt.build_extension(
        os.environ["CUDA_HOME"],
        name="qpeft_C",
        sources=[str(p) for p in sources()],
        # csrc/ needs no header from the pip CUDA wheels; putting them first (-I) shadowed nvcc's own toolkit
        # headers with newer ones ("CUDA compiler and CUDA toolkit headers are incompatible"), so g++ only
        # falls back on them (-idirafter) and nvcc does not see them.
        extra_include_paths=[str(csrc_dir())],
        build_directory=str(out),
        # torch >= 2.10 headers need C++20 (std::strong_ordering, requires-clauses).
        extra_cflags=["-O3", "-std=c++20", *[f for p in _extra_include_paths() for f in ("-idirafter", p)]],
        extra_cuda_cflags=[
            "-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        ],
        is_python_module=False,
        verbose=os.environ.get("QPEFT_VERBOSE_BUILD") == "1",
    )
