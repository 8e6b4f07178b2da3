"""Checkpointed layer inputs in pinned host memory: `offloaded_saved_tensors()`, torch's `save_on_cpu` with the CUDA
calls through qpeft's seam and copies that do not stall the GPU.

Under gradient checkpointing a decoder layer keeps only its input (B, S, H) for the backward, which recomputes the
rest; over L layers those inputs are L * B * S * H activations, the memory that remains at long context
(Llama-3-8B, bf16, 32 layers at 32k tokens: 8 GiB). `fuse(model, offload_checkpoints=True)` runs each checkpointed
layer call inside `offloaded_saved_tensors()`: the tensors the checkpoint saves there (the layer's positional
input: transformers passes hidden_states positionally and everything else as keywords, which the checkpoint keeps
by reference, and those are shared by every layer) go to pinned host memory and come back to the GPU when the
backward reaches the layer. The layer's own activations are not touched: inside the layer the checkpoint's hooks
are the innermost ones and discard them.

Why not `torch.autograd.graph.save_on_cpu(pin_memory=True)` itself: it copies device to host synchronously (a
blocking copy per layer), and it calls CUDA (pinning) directly, which in qpeft only `qpeft._cuda.rt` does so that
a CPU test runs the branch (tests/fake_cuda.py). Here both copies are `non_blocking` on the current stream: the
device tensor is freed only after the copy (the caching allocator orders reuse by stream), and the pinned buffer
is kept until the copy back completes (the host allocator records the stream use of a pinned block). Tensors not
on a CUDA device stay where they are (nothing to gain on the host).
"""
from __future__ import annotations

import torch

from ... import _cuda

__all__ = ["offloaded_saved_tensors"]


def _pack(t: torch.Tensor):
    if not _cuda.rt.is_cuda(t.device) or t.numel() == 0:
        return t
    host = _cuda.rt.pinned_empty(t.shape, t.dtype)
    host.copy_(t, non_blocking=True)
    return t.device, host


def _unpack(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    device, host = packed
    return host.to(device, non_blocking=True)


def offloaded_saved_tensors() -> torch.autograd.graph.saved_tensors_hooks:
    """A context manager: tensors saved for backward inside it live in pinned host memory until the backward
    needs them (CUDA tensors only; see the module docstring)."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
