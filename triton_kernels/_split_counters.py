"""Zeroed int32 counters for the serial split launches of nf4_matmul.py (`_serial_split_store`): one per output
tile, counting the splits that have stored their partial; the last one sums them and sets the counter back to 0.

So a buffer is zero again once its launch is done, and the next launch on the same stream (stream order) can use
it without a memset: a separate fill kernel before every split launch would cost about 1-2 us, 10-15% of an
8b q/o forward at M = 64-128 (~10 us). One buffer per (device, stream): launches on different streams may run at
once and must not share counters. Under CUDA-graph capture a fresh zeroed buffer is allocated instead (its memset
becomes a node of the graph), so a graph never holds a buffer that eager launches also use. Non-CUDA tensors (the
interpreter, recorded launches) get a fresh buffer every time.
"""
from __future__ import annotations

import torch

from qpeft import _cuda

__all__ = ["split_counters", "clear"]

_BUFFERS: dict[tuple[int, int], torch.Tensor] = {}


def split_counters(n: int, device: torch.device) -> torch.Tensor:
    """n int32 counters on `device`, all zero, for one serial split launch on the current stream."""
    rt = _cuda.rt
    if not rt.is_cuda(device) or rt.is_capturing():
        return torch.zeros(n, dtype=torch.int32, device=device)
    key = (device.index if device.index is not None else rt.current_device(), rt.current_stream_key(device))
    buf = _BUFFERS.get(key)
    if buf is None or buf.numel() < n:
        # grown geometrically; the old buffer is freed in stream order (the caching allocator), after its launches
        buf = torch.zeros(max(n, 2 * (0 if buf is None else buf.numel()), 1024), dtype=torch.int32, device=device)
        _BUFFERS[key] = buf
    return buf[:n]


def clear() -> None:
    """Drop the cached buffers (tests; or to free their memory)."""
    _BUFFERS.clear()
