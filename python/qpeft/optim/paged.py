"""Paged optimizer states: real CUDA tensors in unified (managed) memory, owned through PyTorch's allocator.

NOT YET RUN ON A GPU: compiled (csrc/paged_alloc.cu links into qpeft_C) on a machine without one; the Python
here runs in CPU tests through the fake CUDA runtime of qpeft._cuda (tests/optim/test_optim_seam.py).

How (bitsandbytes disguises cudaMallocManaged buffers as CPU tensors, never frees them, prefetches on stream 0
and hides them from torch.cuda.memory_allocated; ../shared/reference/optimizers.md section 2):
- `csrc/paged_alloc.cu` exports the two C functions of a pluggable allocator (`qpeft_managed_alloc` /
  `qpeft_managed_free`, over cudaMallocManaged / cudaFree); `torch.cuda.memory.CUDAPluggableAllocator` loads them
  from the built qpeft_C library and a `torch.cuda.MemPool` owns the memory: states allocated inside
  `torch.cuda.use_mem_pool(pool)` are ordinary CUDA tensors, counted by the caching allocator's statistics and
  freed back to the pool when the optimizer (their only owner) is.
- Before each update the states are prefetched to the GPU on the current stream (`qpeft_C::managed_prefetch`, an
  asynchronous cudaMemPrefetchAsync: no host sync); `evict()` prefetches them to the host. Between the two the
  driver moves pages on demand, so a memory spike elsewhere can evict optimizer states instead of failing.
- Where the device reports concurrentManagedAccess = 0 (WSL, some virtualised GPUs) prefetching is unsupported and
  host access faults: states then live in pinned host memory and each update works on a device copy (copied in
  and back asynchronously on the current stream), which says so once.
- Ownership is by identity (`owns`): a WeakSet compares two live tensors with `==`, which is elementwise, so
  `t in WeakSet` raised "Boolean value of Tensor ... is ambiguous" on the first paged step.
"""
from __future__ import annotations

import warnings
import weakref

import torch

from .. import _cuda, _jit

MODES = ("managed", "pinned")


def _library_path() -> str:
    out = _jit.load()
    libs = sorted(out.glob("qpeft_C*.so"))
    if not libs:
        raise RuntimeError(f"qpeft: the built qpeft_C library is missing in {out}")
    return str(libs[0])


class PagedStates:
    """Allocator, prefetcher and (fallback) stager of the paged states of one CUDA device."""

    def __init__(self, device: torch.device):
        rt = _cuda.rt
        if not rt.is_cuda(device):
            raise ValueError(f"PagedStates needs a CUDA device, got {device}")
        self.device = device
        self.index = device.index if device.index is not None else rt.current_device()

        _jit.load()  # builds qpeft_C (raises with the reason: no nvcc, ...)
        concurrent = bool(rt.ext.managed_concurrent_access(self.index))
        self.mode = "managed" if concurrent else "pinned"
        # id -> tensor, by identity; an entry vanishes with its tensor (no id is reused while its entry lives)
        self._owned: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self._event = None
        if self.mode == "managed":
            self.pool = rt.managed_pool(_library_path(), "qpeft_managed_alloc", "qpeft_managed_free")
        else:
            self.pool = None
            warnings.warn(f"qpeft.optim: {rt.device_name(self.index)} reports no concurrent managed "
                          f"memory access (WSL or a virtualised GPU): paged states live in pinned host memory and "
                          f"are copied to the GPU for each update", UserWarning, stacklevel=3)

    def zeros(self, shape, dtype: torch.dtype) -> torch.Tensor:
        if self.mode == "managed":
            with _cuda.rt.use_pool(self.pool, self.device):
                t = torch.zeros(shape, dtype=dtype, device=self.device)
        else:
            t = _cuda.rt.pinned_zeros(shape, dtype)
        self._owned[id(t)] = t
        return t

    def owns(self, t: torch.Tensor) -> bool:
        return self._owned.get(id(t)) is t

    def stage(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor the update kernel should write: `t` itself (prefetched), or a device copy of it."""
        if self.mode == "managed":
            # a prefetch is a hint; while a CUDA graph is captured (capturable=True) the kernel's accesses page
            # the states in on demand instead
            if not _cuda.rt.is_capturing():
                _cuda.rt.ext.managed_prefetch(t, self.index)
            return t
        # copy=True: a copy even where host and device memory are one (the CPU stand-in of the tests)
        return t.to(self.device, non_blocking=True, copy=True)

    def unstage(self, home: torch.Tensor, staged: torch.Tensor) -> None:
        if staged is home:
            return
        home.copy_(staged, non_blocking=True)
        if _cuda.rt.is_capturing():
            return  # an event recorded in a capture cannot be waited on from the host: state_dict synchronizes
        self._event = _cuda.rt.record_event()

    def evict(self, t: torch.Tensor) -> None:
        if self.mode == "managed":
            _cuda.rt.ext.managed_prefetch(t, -1)  # -1: the host (cudaCpuDeviceId)

    def synchronize(self) -> None:
        """Wait for the asynchronous copies back to pinned host memory (before the host reads the states)."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
