"""L2 op `qpeft::dora_weight_norm`: DoRA's per-row norm ||W + s B A|| of a 4-bit weight, never dense in memory.

    qpeft::dora_weight_norm(Tensor packed, Tensor absmax, Tensor code, int blocksize, int N, int K,
                            Tensor? nested_absmax, Tensor? nested_code, Tensor? offset,
                            Tensor A, Tensor B, float scale) -> Tensor   # fp32 (N,)

W (N, K) arrives as qpeft::nf4_matmul takes it (packed uint8 [(N*K+1)//2], absmax fp32 or uint8 codes with the
nested triple, 16-entry code book, blocksize); A (r, K), B (N, r) contiguous, any float dtype (read as fp32).
Implementations: Triton (triton_kernels/dora.py) or the PyTorch reference (reference/dora.py); there is no CUDA
C++ version (cuda=False in `_backend.select`). The norm is a constant of the DoRA forward (PEFT detaches it,
DoRA paper section 4.3), so the op has no autograd formula.
"""
from __future__ import annotations

import torch
from torch.library import custom_op, register_fake

import qpeft._backend as _backend  # not `from .. import`: that would trigger qpeft.__getattr__
from ..reference.dora import dora_weight_norm_ref
from .nf4_matmul import check_weight_args

__all__: list[str] = []  # the op registers on import; the functional is qpeft.autograd.dora.dora_weight_norm

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check(packed, absmax, code, blocksize, N, K, nested_absmax, nested_code, offset, A, B) -> None:
    torch._check(A.dim() == 2 and A.shape[1] == K, lambda: f"A must have shape (r, {K}), got {tuple(A.shape)}")
    torch._check(A.shape[0] >= 1, lambda: f"A must have at least one row (rank r >= 1), got {tuple(A.shape)}")
    torch._check(B.dim() == 2 and B.shape[0] == N and B.shape[1] == A.shape[0],
                 lambda: f"B must have shape ({N}, {A.shape[0]}), got {tuple(B.shape)}")
    torch._check(A.dtype in _FLOATS and B.dtype in _FLOATS,
                 lambda: f"A and B must be float32/float16/bfloat16, got {A.dtype}, {B.dtype}")
    torch._check(A.is_contiguous() and B.is_contiguous(), lambda: "A and B must be contiguous")
    check_weight_args(A, "A", packed, absmax, code, blocksize, N, K, nested_absmax, nested_code, offset)
    torch._check(B.device == A.device, lambda: f"B is on {B.device} but A is on {A.device}")


@custom_op("qpeft::dora_weight_norm", mutates_args=())
def dora_weight_norm(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, N: int, K: int,
                     nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, offset: torch.Tensor | None,
                     A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    _check(packed, absmax, code, blocksize, N, K, nested_absmax, nested_code, offset, A, B)
    if _backend.select("dora_weight_norm", packed.device, cuda=False) == "triton":
        from qpeft.triton_kernels.dora import dora_weight_norm_triton

        return dora_weight_norm_triton(packed, absmax, code, blocksize, N, K, nested_absmax, nested_code, offset,
                                       A, B, scale)
    return dora_weight_norm_ref(packed, absmax, code, blocksize, N, K, nested_absmax, nested_code, offset, A, B,
                                scale)


@register_fake("qpeft::dora_weight_norm")
def _(packed, absmax, code, blocksize, N, K, nested_absmax, nested_code, offset, A, B, scale):
    _check(packed, absmax, code, blocksize, N, K, nested_absmax, nested_code, offset, A, B)
    return A.new_empty((N,), dtype=torch.float32)
