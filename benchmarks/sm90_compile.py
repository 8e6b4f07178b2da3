"""Compiling the NF4 kernels for sm_90 on a machine without a GPU, with a disk cache (compiles are slow on 2 cores):

- CUDA C++: one translation unit of csrc/ with nvcc (`-cubin -arch=sm_90`, the extension's flags), read back as
  SASS and resource usage (`sass_of_cu`);
- Triton: the launches a launcher issues, recorded instead of run (`recorded_triton_launches`: the launcher is
  called with CPU tensors, every `kernel[grid](...)` is kept with its arguments, grid and options), then compiled
  with `triton.compile` for GPUTarget("cuda", 90, 32) exactly as Triton's runtime would specialize them
  (`TritonLaunch.sass`).

The cache (build/static_sm90/, git-ignored) is keyed by the source text (the .cu and every header it includes, or
the Triton kernel's source and its callees' via Triton's own cache key), the compiler version and the
specialization, so an edited kernel is recompiled and an unchanged one is read back.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.sass_sm90 import sass_of_cubin

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("QPEFT_STATIC_CACHE", ROOT / "build" / "static_sm90"))
CSRC = ROOT / "csrc"

__all__ = ["sass_of_cu", "TritonLaunch", "recorded_triton_launches", "triton_version"]


def _cached(key: str, make) -> tuple[str, str]:
    CACHE.mkdir(parents=True, exist_ok=True)
    sass_p, use_p = CACHE / f"{key}.sass", CACHE / f"{key}.usage"
    if sass_p.exists() and use_p.exists():
        return sass_p.read_text(), use_p.read_text()
    sass, usage = make()
    tmp = CACHE / f".{key}.{os.getpid()}"
    tmp.write_text(sass)
    os.replace(tmp, sass_p)
    tmp.write_text(usage)
    os.replace(tmp, use_p)
    return sass, usage


# ------------------------------------------------------------------------------------------ CUDA C++
def _nvcc_flags() -> list[str]:
    from torch.utils import cpp_extension

    incs = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{CSRC}"]
    return ["-cubin", "-arch=sm_90", "-O3", "-std=c++20", "--expt-relaxed-constexpr",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__", *incs]


def _nvcc_version() -> str:
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip()[-40:]


def sass_of_cu(name: str) -> tuple[str, str]:
    """(SASS, resource usage) of csrc/<name> compiled alone for sm_90 (all its template instantiations)."""
    src = CSRC / name
    h = hashlib.sha256()
    h.update(src.read_bytes())
    for hdr in sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh")):
        h.update(hdr.name.encode() + hdr.read_bytes())
    h.update(_nvcc_version().encode())
    key = f"cu-{src.stem}-{h.hexdigest()[:16]}"

    def make():
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "k.cubin"
            r = subprocess.run(["nvcc", *_nvcc_flags(), "-o", str(out), str(src)], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src}:\n{r.stderr[-4000:]}")
            return sass_of_cubin(out.read_bytes())

    return _cached(key, make)


# ------------------------------------------------------------------------------------------ Triton
def triton_version() -> str:
    import triton

    return triton.__version__


_TRITON_DTYPES = None
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")


def _dtypes():
    global _TRITON_DTYPES
    if _TRITON_DTYPES is None:
        import torch

        _TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
                          torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
                          torch.bool: "i1"}
    return _TRITON_DTYPES


@dataclass
class TritonLaunch:
    """One `kernel[grid](*args, **kwargs)` as a launcher issued it."""
    fn: object
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.fn.__name__

    def constexprs(self) -> dict:
        return {k: v for k, v in self.source()[1].items()}

    def options(self) -> dict:
        return self.source()[2]

    def source(self) -> tuple[dict, dict, dict, list]:
        """(signature, constexprs, options, 16-byte aligned / divisible names) as Triton's runtime specializes
        the launch: tensors are pointers, ints equal to 1 constants, ints that are multiples of 16 divisible."""
        import torch

        bound = dict(zip(self.fn.arg_names, self.args))
        bound.update({k: v for k, v in self.kwargs.items() if k in self.fn.arg_names})
        options = {k: v for k, v in self.kwargs.items() if k in _LAUNCH_OPTIONS and v is not None}
        signature, constexprs, aligned = {}, {}, []
        for param, name in zip(self.fn.params, self.fn.arg_names):
            if name in bound:
                value = bound[name]
            else:
                if param.default is inspect.Parameter.empty:
                    raise ValueError(f"{self.name}: argument {name} not passed")
                value = param.default
            if param.is_constexpr or value is None:
                constexprs[name] = value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + _dtypes()[value.dtype]
                if value.data_ptr() % 16 == 0:
                    aligned.append(name)
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int):
                if value == 1 and not getattr(param, "do_not_specialize", False):
                    constexprs[name] = 1
                    continue
                signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
                if value % 16 == 0:
                    aligned.append(name)
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise ValueError(f"{self.name}: cannot type argument {name}={value!r}")
        return signature, constexprs, options, aligned

    def key(self) -> str:
        import triton

        sig, const, opts, aligned = self.source()
        h = hashlib.sha256()
        h.update(self.fn.cache_key.encode())  # the kernel's source and the sources of the functions it calls
        h.update(repr((sorted(sig.items()), sorted(((k, repr(v)) for k, v in const.items())), sorted(opts.items()),
                       sorted(aligned), triton.__version__)).encode())
        return f"tr-{self.name}-{h.hexdigest()[:20]}"

    def compile(self):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile as triton_compile

        sig, const, opts, aligned = self.source()
        fn = self.fn
        src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}},
                        constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
                        attrs={(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned})
        return triton_compile(src, target=GPUTarget("cuda", 90, 32), options=opts or {"num_warps": 4})

    def sass(self) -> tuple[str, str, int]:
        """(SASS, resource usage, shared bytes incl. Triton's dynamic shared memory)."""
        key = self.key()
        shared_p = CACHE / f"{key}.shared"

        def make():
            c = self.compile()
            CACHE.mkdir(parents=True, exist_ok=True)
            shared_p.write_text(str(int(c.metadata.shared)))
            return sass_of_cubin(c.asm["cubin"])

        sass, usage = _cached(key, make)
        if not shared_p.exists():  # cache written by another version of this module
            shared_p.write_text(str(int(self.compile().metadata.shared)))
        return sass, usage, int(shared_p.read_text())


@contextlib.contextmanager
def recorded_triton_launches():
    """Inside the context Triton kernels are not run: each `kernel[grid](...)` is appended to the yielded list
    (the grid evaluated), so launchers can be driven with CPU tensors; their outputs stay uninitialized."""
    from triton.runtime.jit import JITFunction

    launches: list[TritonLaunch] = []

    def run_jit(self, *args, grid, warmup, **kwargs):
        g = grid(kwargs) if callable(grid) else grid
        g = tuple(g) + (1,) * (3 - len(tuple(g)))
        launches.append(TritonLaunch(self, g, args, kwargs))

    saved = JITFunction.run
    JITFunction.run = run_jit
    try:
        yield launches
    finally:
        JITFunction.run = saved


if __package__ in (None, ""):  # pragma: no cover
    sys.path.insert(0, str(ROOT))
