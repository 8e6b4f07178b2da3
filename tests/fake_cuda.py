"""A pretend CUDA device for CPU tests: the fake half of the seam in qpeft/_cuda.py (fixture `fake_cuda`).

`FakeCuda` answers every question of `qpeft._cuda.CudaRuntime` for one pretend GPU (index 0) whose tensors are
CPU tensors: `is_cuda(cpu) is True`, so qpeft takes its CUDA branches on them. Only the leaf calls are fake;
qpeft's logic above them is the code a GPU runs. A test sets what the device is like (`pretend(capability=(8, 0),
concurrent_managed_access=False, ...)`, `build_error`, `with fake.capture():`) and reads what qpeft asked of it
in `fake.log` (prefetches, pins, events, syncs, builds, raw-op launches, in order).

The fake is strict where CUDA is, so that a wrong call fails here as it would on the GPU:
- the raw ops (`fake.ext`) exist only after qpeft._jit.load() built the extension; each call is checked against
  the schema documented in docs/ARCHITECTURE.md (argument count and types, every tensor contiguous and on the
  device: a pinned host tensor is rejected, as the launchers' device checks reject it) and computes the
  documented result with the pure-PyTorch reference into its out arguments;
- `managed_prefetch` accepts only tensors allocated in a managed pool (cudaMemPrefetchAsync fails on others);
- synchronizing the device, or waiting on an event recorded, during a capture raises.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from qpeft import _backend, _cuda
from qpeft.reference import lora as lora_ref
from qpeft.reference import multi_lora as multi_lora_ref
from qpeft.reference import nf4_matmul as nf4_ref
from qpeft.reference import optim_8bit as optim_ref
from qpeft.reference import quantize as quantize_ref

H100 = dict(capability=(9, 0), name="NVIDIA H100 80GB HBM3", sm_count=132)
A100 = dict(capability=(8, 0), name="NVIDIA A100-SXM4-80GB", sm_count=108)


class FakeEvent:
    def __init__(self, fake: "FakeCuda", captured: bool):
        self.fake, self.captured = fake, captured

    def synchronize(self) -> None:
        if self.captured:
            raise RuntimeError("fake CUDA: an event recorded during stream capture cannot be waited on")
        self.fake.record("event_sync")


class FakePool:
    """A managed-memory pool: remembers (weakly) the tensors allocated in it."""

    def __init__(self, library: str, alloc_fn: str, free_fn: str):
        self.library, self.alloc_fn, self.free_fn = library, alloc_fn, free_fn
        self.tensors: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()

    def holds(self, t: torch.Tensor) -> bool:
        return self.tensors.get(id(t)) is t


class _AllocateIn(TorchFunctionMode):
    """Inside use_pool: every tensor a torch function returns is an allocation from the pool."""

    def __init__(self, pool: FakePool):
        super().__init__()
        self.pool = pool

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.pool.tensors[id(out)] = out
        return out


class FakeCuda:
    """The CUDA runtime of one pretend GPU whose memory is the CPU's (see the module docstring)."""

    def __init__(self, *, capability=(9, 0), name="NVIDIA H100 80GB HBM3", sm_count=132,
                 concurrent_managed_access: bool = True, present: bool = True, cuda_version: str | None = "13.0"):
        self.capability_, self.name, self.sm_count = tuple(capability), name, sm_count
        self.concurrent_managed_access = concurrent_managed_access
        self.present = present
        self.cuda_version = cuda_version
        self.capturing = False
        self.stream = 0  # the current stream's key (tests switch it)
        self.build_error: str | None = None  # set: the next build_extension raises with it
        self.builds: list[dict] = []
        self.built = False
        self.log: list[tuple] = []
        self.pools: list[FakePool] = []
        self._pinned: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()

    # ---- test-side helpers
    def pretend(self, **changes) -> "FakeCuda":
        """Change what the device is like (capability, name, sm_count, ...) and drop qpeft's memoised answers."""
        for k, v in changes.items():
            k = "capability_" if k == "capability" else k
            if not hasattr(self, k):
                raise AttributeError(f"FakeCuda has no setting {k!r}")
            setattr(self, k, tuple(v) if k == "capability_" else v)
        _cuda.clear_caches()
        return self

    @contextlib.contextmanager
    def capture(self):
        """A CUDA-graph capture in progress on the current stream."""
        self.capturing = True
        try:
            yield
        finally:
            self.capturing = False

    @contextlib.contextmanager
    def off(self):
        """The real runtime for a while (no GPU here: CPU tensors take qpeft's CPU paths), e.g. for expectations."""
        _cuda.rt = _cuda.CudaRuntime()
        _cuda.clear_caches()
        try:
            yield
        finally:
            _cuda.rt = self
            _cuda.clear_caches()

    def record(self, name: str, *detail) -> None:
        self.log.append((name, *detail))

    def names(self) -> list[str]:
        return [entry[0] for entry in self.log]

    def count(self, name: str) -> int:
        return self.names().count(name)

    def is_pinned(self, t: torch.Tensor) -> bool:
        return self._pinned.get(id(t)) is t

    def in_pool(self, t: torch.Tensor) -> bool:
        return any(pool.holds(t) for pool in self.pools)

    def _device_index(self, index: int) -> int:
        if not self.present or index != 0:
            raise RuntimeError(f"fake CUDA: invalid device ordinal {index}")
        return index

    # ---- CudaRuntime: devices
    def is_cuda(self, device: torch.device) -> bool:
        return self.present and device.type == "cpu"

    def available(self) -> bool:
        return self.present

    def current_device(self) -> int:
        return self._device_index(0)

    def capability(self, index: int) -> tuple[int, int]:
        self._device_index(index)
        return self.capability_

    def device_name(self, index: int) -> str:
        self._device_index(index)
        return self.name

    def multi_processor_count(self, index: int) -> int:
        self._device_index(index)
        return self.sm_count

    def torch_cuda(self) -> str | None:
        return self.cuda_version

    # ---- streams, graphs, events
    def is_capturing(self) -> bool:
        return self.capturing

    def current_stream_key(self, device: torch.device) -> int:
        assert self.is_cuda(device), device
        return self.stream

    def synchronize(self, device: torch.device) -> None:
        if self.capturing:
            raise RuntimeError("fake CUDA: device synchronization during stream capture")
        self.record("synchronize", device)

    def record_event(self) -> FakeEvent:
        self.record("event_record", self.capturing)
        return FakeEvent(self, self.capturing)

    # ---- host memory
    def _register_pinned(self, t: torch.Tensor) -> torch.Tensor:
        self._pinned[id(t)] = t
        return t

    def pin(self, t: torch.Tensor) -> torch.Tensor:
        self.record("pin", tuple(t.shape), self.capturing)
        return self._register_pinned(t.clone())

    def pinned_zeros(self, shape, dtype: torch.dtype) -> torch.Tensor:
        self.record("pinned_zeros", tuple(shape), dtype)
        return self._register_pinned(torch.zeros(shape, dtype=dtype))

    def pinned_empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        self.record("pinned_empty", tuple(shape), dtype)
        return self._register_pinned(torch.full(shape, float("nan")).to(dtype))  # garbage, as uninitialised memory

    # ---- managed memory
    def managed_pool(self, library: str, alloc_fn: str, free_fn: str) -> FakePool:
        if not Path(library).is_file():
            raise RuntimeError(f"fake CUDA: cannot load the allocator library {library}")
        self.record("managed_pool", library, alloc_fn, free_fn)
        pool = FakePool(library, alloc_fn, free_fn)
        self.pools.append(pool)
        return pool

    @contextlib.contextmanager
    def use_pool(self, pool: FakePool, device: torch.device):
        assert self.is_cuda(device), device
        self.record("use_pool")
        with _AllocateIn(pool):
            yield

    # ---- the extension
    def build_extension(self, cuda_home: str, **load_kwargs) -> None:
        self.builds.append(dict(cuda_home=cuda_home, **load_kwargs))
        self.record("build_extension", load_kwargs["name"])
        if self.build_error is not None:
            raise RuntimeError(self.build_error)
        out = Path(load_kwargs["build_directory"])
        (out / f"{load_kwargs['name']}.so").write_bytes(b"")  # what cpp_extension.load leaves there
        self.built = True

    @property
    def ext(self) -> "FakeExtension":
        if not self.built:
            # torch.ops.qpeft_C before the library is loaded: no such operator
            raise AttributeError("'_OpNamespace' 'qpeft_C' object has no attribute (the extension is not loaded)")
        return FakeExtension(self)


# ------------------------------------------------------------------------------------------ raw ops
@functools.cache
def raw_schemas() -> dict:
    from test_cuda_build import documented_raw_schemas

    schemas = {name: torch._C.parse_schema(f"qpeft_C::{s}") for name, s in documented_raw_schemas().items()}
    # no tensor to dispatch on: a catch-all kernel, described in prose in ARCHITECTURE.md
    schemas["managed_concurrent_access"] = torch._C.parse_schema(
        "qpeft_C::managed_concurrent_access(int device) -> bool")
    return schemas


def _into(name: str, out: torch.Tensor, value: torch.Tensor) -> None:
    if out.dtype != value.dtype or out.numel() != value.numel():
        raise RuntimeError(f"fake qpeft_C::{name}: out is {out.dtype} with {out.numel()} elements, the result "
                           f"{value.dtype} with {value.numel()}")
    out.copy_(value.reshape(out.shape))


def _quantize_4bit_out(A, blocksize, quant_type, packed, absmax):
    p, a = quantize_ref.quantize_4bit_ref(A, blocksize, quant_type)
    _into("quantize_4bit_out", packed, p)
    _into("quantize_4bit_out", absmax, a)


def _quantize_blockwise_out(A, code, blocksize, q, absmax):
    qq, a = quantize_ref.quantize_blockwise_ref(A, code, blocksize)
    _into("quantize_blockwise_out", q, qq)
    _into("quantize_blockwise_out", absmax, a)


_IMPLS = {
    "quantize_4bit_out": _quantize_4bit_out,
    "dequantize_4bit_out": lambda packed, absmax, code, blocksize, out: _into(
        "dequantize_4bit_out", out,
        quantize_ref.dequantize_4bit_ref(packed, absmax, code, blocksize, list(out.shape), out.dtype)),
    "quantize_blockwise_out": _quantize_blockwise_out,
    "dequantize_blockwise_out": lambda q, absmax, code, blocksize, out: _into(
        "dequantize_blockwise_out", out, quantize_ref.dequantize_blockwise_ref(q, absmax, code, blocksize, out.dtype)),
    "nf4_matmul_out": lambda x, packed, absmax, code, blocksize, nested_absmax, nested_code, offset, bias, lora_xa,
    lora_B, lora_scale, out: _into("nf4_matmul_out", out, nf4_ref.nf4_matmul_ref(
        x, packed, absmax, code, blocksize, out.shape[1], nested_absmax, nested_code, offset, bias, lora_xa, lora_B,
        lora_scale)),
    "nf4_matmul_dx_out": lambda dy, packed, absmax, code, blocksize, nested_absmax, nested_code, offset, lora_dyb,
    lora_A, lora_scale, dx: _into("nf4_matmul_dx_out", dx, nf4_ref.nf4_matmul_dx_ref(
        dy, packed, absmax, code, blocksize, dx.shape[1], nested_absmax, nested_code, offset, lora_dyb, lora_A,
        lora_scale)),
    "dense_lora_matmul_out": lambda x, weight, bias, xa, B, scale, out: _into(
        "dense_lora_matmul_out", out, lora_ref.dense_lora_matmul_ref(x, weight, bias, xa, B, scale)),
    "lora_shrink_gathered_out": lambda x, A_cat, rank_start, index, xa: _into(
        "lora_shrink_gathered_out", xa, multi_lora_ref.lora_shrink_gathered_ref(x, A_cat, rank_start, index,
                                                                                 xa.shape[1])),
    "lora_expand_gathered_out": lambda y, xa, B_cat, rank_start, scale, index, out: _into(
        "lora_expand_gathered_out", out, multi_lora_ref.lora_expand_gathered_ref(y, xa, B_cat, rank_start, scale,
                                                                                  index)),
    "optim_8bit_step_out": optim_ref.optim_8bit_step_ref,
}


class FakeExtension:
    """torch.ops.qpeft_C of the pretend device (see the module docstring)."""

    def __init__(self, fake: FakeCuda):
        self._fake = fake

    def __getattr__(self, name: str):
        schema = raw_schemas().get(name)
        if schema is None:
            raise AttributeError(f"fake qpeft_C has no operator {name!r}")
        return functools.partial(self._call, name, schema)

    def _check(self, name: str, schema, args: tuple) -> None:
        where = f"fake qpeft_C::{name}"
        if len(args) != len(schema.arguments):
            raise RuntimeError(f"{where}: expected {len(schema.arguments)} arguments ({schema}), got {len(args)}")
        for arg, value in zip(schema.arguments, args):
            kind = str(arg.type)
            tensors = value if kind == "List[Tensor]" else [value]
            if kind in ("Tensor", "Optional[Tensor]", "List[Tensor]"):
                ok = isinstance(value, list) if kind == "List[Tensor]" else (
                    isinstance(value, torch.Tensor) or (value is None and kind == "Optional[Tensor]"))
                if not ok:
                    raise RuntimeError(f"{where}: {arg.name} must be {kind}, got {type(value).__name__}")
                for t in tensors:
                    if t is None:
                        continue
                    if not isinstance(t, torch.Tensor) or not self._fake.is_cuda(t.device) or self._fake.is_pinned(t):
                        raise RuntimeError(f"{where}: {arg.name} must be a CUDA tensor, got {t!r:.60}")
                    if not t.is_contiguous():
                        raise RuntimeError(f"{where}: {arg.name} must be contiguous")
            elif kind == "int":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise RuntimeError(f"{where}: {arg.name} must be an int, got {value!r}")
            elif kind == "float":
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise RuntimeError(f"{where}: {arg.name} must be a float, got {value!r}")
            elif kind == "str":
                if not isinstance(value, str):
                    raise RuntimeError(f"{where}: {arg.name} must be a str, got {value!r}")
            else:
                raise AssertionError(f"{where}: argument type {kind} not handled by the fake")

    def _call(self, name: str, schema, *args):
        self._check(name, schema, args)
        fake = self._fake
        if name == "managed_concurrent_access":
            fake.record(name, args[0])
            return fake.concurrent_managed_access
        if name == "managed_prefetch":
            t, device = args
            if not fake.in_pool(t):
                raise RuntimeError("fake qpeft_C::managed_prefetch: not managed memory (cudaErrorInvalidValue)")
            if device not in (-1, 0):
                raise RuntimeError(f"fake qpeft_C::managed_prefetch: invalid device {device}")
            fake.record(name, t.data_ptr(), device, fake.capturing)
            return None
        fake.record(name, fake.capturing)
        _IMPLS[name](*args)
        return None


# ------------------------------------------------------------------------------------------ the fixture
@pytest.fixture
def fake_cuda(monkeypatch, tmp_path):
    """qpeft sees one CUDA device (an H100 unless a test says otherwise) whose tensors are CPU tensors; the CUDA
    toolkit is a fake one in tmp_path (nvcc is never run: the fake compiles nothing), the build cache is tmp_path,
    and QPEFT_BACKEND=auto. Every memoised runtime answer is dropped before and after the test."""
    toolkit = tmp_path / "cuda"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\nexit 1\n")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    (toolkit / "include" / "cuda_runtime_api.h").write_text("")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    monkeypatch.setenv("QPEFT_BUILD_DIR", str(tmp_path / "build"))
    monkeypatch.setenv("QPEFT_BACKEND", "auto")
    for var in ("TORCH_CUDA_ARCH_LIST", "QPEFT_DISABLE_CUDA_EXT", "TRITON_INTERPRET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_backend, "_warned", set())
    fake = FakeCuda(**H100)
    monkeypatch.setattr(_cuda, "rt", fake)
    _cuda.clear_caches()
    yield fake
    _cuda.clear_caches()  # monkeypatch puts the real runtime back after this
