"""L2 ops: many LoRA adapters in one batch (per-row adapter index, heterogeneous ranks, per-adapter scale).

  qpeft::lora_shrink_gathered(x, A_cat, rank_start, index, max_rank) -> xa (M, max_rank) fp32
        xa[i, :r_a] = x[i] A_a^T, a = index[i]; zeros past r_a and for index -1
  qpeft::lora_expand_gathered(y, xa, B_cat, rank_start, scale, index) -> (M, N) in y's dtype
        out[i] = y[i] + scale[a] xa[i, :r_a] B_a^T, accumulated in fp32 and rounded once; y[i] for index -1

Layout (reference/multi_lora.py): adapters concatenated along the rank, A_cat (R, K), B_cat (N, R),
rank_start (L+1,) int32, scale (L,) fp32, index (M,) int32/int64 in [-1, L). No adapter is padded to the
largest rank: each row's work is its own r_a (only the (M, max_rank) fp32 intermediate is padded, with zeros).
Inference only (no autograd), as PEFT's `adapter_names` is.

Backends (QPEFT_BACKEND=auto): CUDA tensors of at most ROWS_MAX_M (64) rows use the CUDA C++ row kernels
(csrc/multi_lora.cu, Punica's BGMV) when the extension builds, else Triton's row kernels; larger batches use
Triton's segmented kernels (rows grouped per adapter through a sorted index built on the device, SGMV-style),
else the C++ row kernels. CPU tensors use the reference. Neither GPU path reads anything back to the host, and
grids depend on shapes only, so both are CUDA-graph capturable for a fixed batch size.

Index values are data: on CPU an out-of-range index raises ValueError; on CUDA reading them would be a host
sync, so it is a device-side assert (torch._assert_async) instead, and the kernels treat an out-of-range slot
as "no adapter" (never an out-of-bounds read). `LoraLinear` builds the index from adapter names on the host,
where it is checked.
"""
from __future__ import annotations

import torch
from torch.library import custom_op, register_fake

from .. import _cuda
from .._backend import select as _select_backend  # not `from .. import _backend`: qpeft.__getattr__
from ..reference import multi_lora as ref

__all__: list[str] = []  # ops are reached as torch.ops.qpeft.lora_*_gathered

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INDEX = (torch.int32, torch.int64)


def _check_pool(where: str, index: torch.Tensor, rank_start: torch.Tensor, rows: int, device) -> None:
    torch._check(index.dim() == 1 and index.shape[0] == rows,
                 lambda: f"{where}: index must have shape ({rows},) (one adapter slot per row), "
                         f"got {tuple(index.shape)}")
    torch._check(index.dtype in _INDEX, lambda: f"{where}: index must be int32 or int64, got {index.dtype}")
    torch._check(rank_start.dim() == 1 and rank_start.shape[0] >= 1,
                 lambda: f"{where}: rank_start must be 1-D (num_adapters + 1,), got {tuple(rank_start.shape)}")
    torch._check(rank_start.dtype == torch.int32, lambda: f"{where}: rank_start must be int32, got {rank_start.dtype}")
    for name, t in (("index", index), ("rank_start", rank_start)):
        torch._check(t.device == device, lambda: f"{where}: {name} is on {t.device}, expected x's device {device}")


def _check_values(where: str, index: torch.Tensor, rank_start: torch.Tensor, R: int, max_rank: int | None) -> None:
    """Data checks: exact on CPU; on CUDA device-side asserts (no host sync)."""
    L = rank_start.shape[0] - 1
    ranks = rank_start[1:] - rank_start[:-1]
    idx_ok = ((index >= -1) & (index < L)).all()
    pool_ok = (rank_start[0] == 0) & (rank_start[-1] == R) & (ranks >= 1).all()
    rank_ok = (ranks <= max_rank).all() if max_rank is not None and L > 0 else None
    if not _cuda.rt.is_cuda(index.device):
        if not bool(idx_ok):
            raise ValueError(f"{where}: index values must be in [-1, {L}) (-1: no adapter; {L} adapters), got "
                             f"min {int(index.min())}, max {int(index.max())}")
        if not bool(pool_ok):
            raise ValueError(f"{where}: rank_start must start at 0, rise strictly (every rank >= 1) and end at "
                             f"{R} (the rank dimension of A_cat / B_cat), got {rank_start.tolist()}")
        if rank_ok is not None and not bool(rank_ok):
            raise ValueError(f"{where}: max_rank={max_rank} is below the largest rank {int(ranks.max())}")
    else:
        torch._assert_async(idx_ok, f"{where}: index values must be in [-1, {L})")
        torch._assert_async(pool_ok, f"{where}: rank_start must rise strictly from 0 to {R}")
        if rank_ok is not None:
            torch._assert_async(rank_ok, f"{where}: max_rank={max_rank} is below the largest rank")


def _check_shrink(x, A_cat, rank_start, index, max_rank) -> None:
    w = "lora_shrink_gathered"
    torch._check(x.dim() == 2, lambda: f"{w}: x must be 2-D (M, K), got shape {tuple(x.shape)}")
    torch._check(x.dtype in _FLOATS, lambda: f"{w}: x must be float32/float16/bfloat16, got {x.dtype}")
    torch._check(A_cat.dim() == 2 and A_cat.shape[1] == x.shape[1],
                 lambda: f"{w}: A_cat must have shape (R, {x.shape[1]}) (x's K), got {tuple(A_cat.shape)}")
    torch._check(A_cat.dtype in _FLOATS, lambda: f"{w}: A_cat must be a float tensor, got {A_cat.dtype}")
    torch._check(A_cat.device == x.device, lambda: f"{w}: A_cat is on {A_cat.device}, expected x's {x.device}")
    torch._check(max_rank >= 1, lambda: f"{w}: max_rank must be >= 1, got {max_rank}")
    _check_pool(w, index, rank_start, x.shape[0], x.device)


def _check_expand(y, xa, B_cat, rank_start, scale, index) -> None:
    w = "lora_expand_gathered"
    torch._check(y.dim() == 2, lambda: f"{w}: y must be 2-D (M, N), got shape {tuple(y.shape)}")
    torch._check(y.dtype in _FLOATS, lambda: f"{w}: y must be float32/float16/bfloat16, got {y.dtype}")
    torch._check(xa.dim() == 2 and xa.shape[0] == y.shape[0] and xa.dtype == torch.float32,
                 lambda: f"{w}: xa must be fp32 ({y.shape[0]}, max_rank), got {xa.dtype} {tuple(xa.shape)}")
    torch._check(B_cat.dim() == 2 and B_cat.shape[0] == y.shape[1],
                 lambda: f"{w}: B_cat must have shape ({y.shape[1]}, R) (y's N), got {tuple(B_cat.shape)}")
    torch._check(B_cat.dtype in _FLOATS, lambda: f"{w}: B_cat must be a float tensor, got {B_cat.dtype}")
    torch._check(scale.dim() == 1 and scale.shape[0] == rank_start.shape[0] - 1 and scale.dtype == torch.float32,
                 lambda: f"{w}: scale must be fp32 ({rank_start.shape[0] - 1},) (one per adapter), got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    for name, t in (("xa", xa), ("B_cat", B_cat), ("scale", scale)):
        torch._check(t.device == y.device, lambda: f"{w}: {name} is on {t.device}, expected y's device {y.device}")
    _check_pool(w, index, rank_start, y.shape[0], y.device)


def _impl(op: str, device: torch.device, rows: int) -> str:
    # prefill-sized batches prefer Triton's segmented tensor-core kernels over the C++ row kernels (reasoned:
    # see reference.multi_lora.ROWS_MAX_M); decode-sized ones take the CUDA C++ row kernels when built
    return _select_backend(op, device, cuda=True, triton=True, prefer_triton=rows > ref.ROWS_MAX_M)


# ---------------------------------------------------------------- xa = x A_a^T per row
@custom_op("qpeft::lora_shrink_gathered", mutates_args=())
def lora_shrink_gathered(x: torch.Tensor, A_cat: torch.Tensor, rank_start: torch.Tensor, index: torch.Tensor,
                         max_rank: int) -> torch.Tensor:
    _check_shrink(x, A_cat, rank_start, index, max_rank)
    _check_values("lora_shrink_gathered", index, rank_start, A_cat.shape[0], max_rank)
    x, A_cat, index, rank_start = x.contiguous(), A_cat.contiguous(), index.contiguous(), rank_start.contiguous()
    impl = _impl("lora_shrink_gathered", x.device, x.shape[0])
    if impl == "cuda":
        xa = torch.empty((x.shape[0], max_rank), device=x.device, dtype=torch.float32)
        _cuda.rt.ext.lora_shrink_gathered_out(x, A_cat, rank_start, index, xa)
        return xa
    if impl == "triton":
        from qpeft.triton_kernels.multi_lora import lora_shrink_gathered_triton

        return lora_shrink_gathered_triton(x, A_cat, rank_start, index, max_rank)
    return ref.lora_shrink_gathered_ref(x, A_cat, rank_start, index, max_rank)


@register_fake("qpeft::lora_shrink_gathered")
def _(x, A_cat, rank_start, index, max_rank):
    _check_shrink(x, A_cat, rank_start, index, max_rank)
    return x.new_empty((x.shape[0], max_rank), dtype=torch.float32)


# ---------------------------------------------------------------- out = y + scale_a xa B_a^T per row
@custom_op("qpeft::lora_expand_gathered", mutates_args=())
def lora_expand_gathered(y: torch.Tensor, xa: torch.Tensor, B_cat: torch.Tensor, rank_start: torch.Tensor,
                         scale: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    _check_expand(y, xa, B_cat, rank_start, scale, index)
    _check_values("lora_expand_gathered", index, rank_start, B_cat.shape[1], xa.shape[1])
    y, xa, B_cat, index = y.contiguous(), xa.contiguous(), B_cat.contiguous(), index.contiguous()
    rank_start, scale = rank_start.contiguous(), scale.contiguous()
    impl = _impl("lora_expand_gathered", y.device, y.shape[0])
    if impl == "cuda":
        out = torch.empty_like(y)
        _cuda.rt.ext.lora_expand_gathered_out(y, xa, B_cat, rank_start, scale, index, out)
        return out
    if impl == "triton":
        from qpeft.triton_kernels.multi_lora import lora_expand_gathered_triton

        return lora_expand_gathered_triton(y, xa, B_cat, rank_start, scale, index)
    return ref.lora_expand_gathered_ref(y, xa, B_cat, rank_start, scale, index)


@register_fake("qpeft::lora_expand_gathered")
def _(y, xa, B_cat, rank_start, scale, index):
    _check_expand(y, xa, B_cat, rank_start, scale, index)
    return torch.empty_like(y, memory_format=torch.contiguous_format)
