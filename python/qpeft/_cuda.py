"""The one door between qpeft's Python and the CUDA runtime, so that GPU-only Python also runs in CPU tests.

Every question qpeft asks CUDA (is this a CUDA device, its capability and name, is the current stream being
captured) and every CUDA-only object it obtains (pinned host memory, events, the managed-memory pool, the
built extension `qpeft_C` and its raw ops) goes through `rt`, an instance of `CudaRuntime`; no other module of
the package calls `torch.cuda.*`, `Tensor.pin_memory` or `torch.ops.qpeft_C.*` (tests/test_cuda_seam.py
checks this on the source). Each member is one leaf call with no qpeft logic in it, so everything above it
(paged-state bookkeeping, pinned staging, capture handling, backend selection and its fallbacks, the JIT build
decisions, the Hopper gate) is the same code on a GPU and in a test.

Why: Python that only runs on a GPU is untested code. PagedAdamW8bit raised on its first CUDA step because
its ownership test was never executed anywhere without a GPU.

Tests replace `rt` with a fake (tests/fake_cuda.py, fixture `fake_cuda`) in which CPU tensors stand in for the
tensors of one pretend CUDA device: it answers the questions (capability (9, 0), no concurrent managed access,
a capture in progress, an extension that fails to build, ...), records the calls (prefetches, pins, events,
syncs, builds) and implements the raw ops with the references. Answers that qpeft memoises (the extension's
availability, the device capability, dispatch plans) are cached with `cached`, so that `clear_caches()` drops
them when the runtime is swapped.
"""
from __future__ import annotations

import functools

import torch

_CACHES: list = []


def cached(fn=None, *, maxsize: int | None = None):
    """functools.lru_cache for a function whose result depends on the CUDA runtime's answers."""
    def wrap(f):
        c = functools.lru_cache(maxsize=maxsize)(f)
        _CACHES.append(c)
        return c
    return wrap(fn) if fn is not None else wrap


def clear_caches() -> None:
    """Forget every memoised runtime answer (after `rt` was replaced)."""
    for c in _CACHES:
        c.cache_clear()


class CudaRuntime:
    """The real CUDA runtime, as torch exposes it. Only leaf calls: the logic stays with the callers."""

    # ---- devices
    def is_cuda(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def available(self) -> bool:
        return torch.cuda.is_available()

    def current_device(self) -> int:
        return torch.cuda.current_device()

    def capability(self, index: int) -> tuple[int, int]:
        return tuple(torch.cuda.get_device_capability(index))

    def device_name(self, index: int) -> str:
        return torch.cuda.get_device_name(index)

    def multi_processor_count(self, index: int) -> int:
        return torch.cuda.get_device_properties(index).multi_processor_count

    def torch_cuda(self) -> str | None:
        """The CUDA version torch was built with (None: a CPU-only torch)."""
        return torch.version.cuda

    # ---- streams, graphs, events
    def is_capturing(self) -> bool:
        return torch.cuda.is_current_stream_capturing()

    def current_stream_key(self, device: torch.device) -> int:
        """The current stream of `device`, as a key (its cudaStream_t handle)."""
        return torch.cuda.current_stream(device).cuda_stream

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    def record_event(self):
        """An event recorded on the current stream (its .synchronize() waits for the work before it)."""
        event = torch.cuda.Event()
        event.record()
        return event

    # ---- host memory
    def pin(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory()

    def pinned_zeros(self, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, pin_memory=True)

    def pinned_empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """Uninitialised pinned host memory (a copy destination: no memset of a buffer about to be overwritten)."""
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    # ---- managed (unified) memory
    def managed_pool(self, library: str, alloc_fn: str, free_fn: str):
        """A memory pool whose allocations come from the allocator functions exported by `library`."""
        alloc = torch.cuda.memory.CUDAPluggableAllocator(library, alloc_fn, free_fn)
        return torch.cuda.MemPool(alloc.allocator())

    def use_pool(self, pool, device: torch.device):
        """Context manager: CUDA allocations on `device` inside it come from `pool`."""
        return torch.cuda.use_mem_pool(pool, device=device)

    # ---- the extension
    def build_extension(self, cuda_home: str, **load_kwargs) -> None:
        """Compile (ninja decides what is stale) and load qpeft_C: torch.utils.cpp_extension.load(**load_kwargs)."""
        from torch.utils import cpp_extension

        # cpp_extension resolved CUDA_HOME at torch import time from `which nvcc` (a wrapper's /usr/local has no
        # lib64/libcudart: "cannot find -lcudart"); override it with the toolkit root qpeft._jit found.
        cpp_extension.CUDA_HOME = cuda_home
        cpp_extension.verify_ninja_availability()
        cpp_extension.load(**load_kwargs)

    @property
    def ext(self):
        """The raw ops of the loaded extension (`qpeft_C::*`); only after qpeft._jit.load()."""
        return torch.ops.qpeft_C


rt = CudaRuntime()


@cached
def _capability(index: int) -> tuple[int, int]:
    return rt.capability(index)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device (memoised per index: dispatch asks on every call); None for any other
    device. Here, below both _backend and the kernels' launchers, so each layer can gate on it."""
    if not rt.is_cuda(device):
        return None
    return _capability(device.index if device.index is not None else rt.current_device())
