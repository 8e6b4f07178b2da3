"""L2 ops of the LoRA family (`qpeft::lora_*`): schema, fake, backend choice. The only thing L3 calls.

All 2-D, contiguous (the autograd layer calls .contiguous()):
  x (M, K), weight (N, K) dense base, A (r, K), B (N, r), dy (M, N), seed: int64 (1,) or None.
  qpeft::lora_xa(x, A, seed, dropout_p) -> xa fp32 (M, r)                     = drop(x) A^T
  qpeft::lora_linear(x, weight, bias, xa, B, scale) -> (M, N) in x.dtype     = x W^T + bias + scale xa B^T
  qpeft::lora_linear_dx(dy, weight, dyb, A, scale, seed, dropout_p) -> (M, K) = dy W + scale drop'(dyb A)
  qpeft::lora_masked_dx(dx_base, dyb, A, scale, seed, dropout_p) -> (M, K)   = dx_base + scale drop'(dyb A)
  qpeft::lora_grad(dy, x, xa, B, scale, seed, dropout_p) -> (dyb (M, r), dA (r, K), dB (N, r)), all fp32

Backends: CUDA tensors use `qpeft_C::dense_lora_matmul_out` for the fused forward when the extension is
built, Triton otherwise (and for every other op of the family, which have no C++ kernel); CPU tensors
use the reference (or the Triton interpreter under QPEFT_BACKEND=triton TRITON_INTERPRET=1).
fp32 accumulation everywhere; tensor-core products take x's dtype (fp32 inputs: exact IEEE, no TF32).
"""
from __future__ import annotations

import torch
from torch.library import custom_op, register_fake

from .. import _cuda
from .._backend import is_hopper_or_newer
from .._backend import select as _select_backend  # not `from .. import _backend`: qpeft.__getattr__
from ..reference import lora as ref

__all__: list[str] = []  # ops are reached as torch.ops.qpeft.lora_*

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_2d(name: str, t: torch.Tensor, rows: int | None = None, cols: int | None = None) -> None:
    torch._check(t.dim() == 2, lambda: f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if rows is not None:
        torch._check(t.shape[0] == rows, lambda: f"{name} must have {rows} rows, got shape {tuple(t.shape)}")
    if cols is not None:
        torch._check(t.shape[1] == cols, lambda: f"{name} must have {cols} columns, got shape {tuple(t.shape)}")


def _check_float(name: str, t: torch.Tensor) -> None:
    torch._check(t.dtype in _FLOATS, lambda: f"{name} must be float32/float16/bfloat16, got {t.dtype}")


def _check_dropout(seed: torch.Tensor | None, p: float) -> None:
    torch._check(0.0 <= p < 1.0, lambda: f"dropout_p must be in [0, 1), got {p}")
    if seed is not None:
        torch._check(seed.dtype == torch.int64 and seed.numel() == 1,
                     lambda: f"seed must be a 1-element int64 tensor, got {seed.dtype} {tuple(seed.shape)}")


def _dot_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype  # 16-bit activations feed the tensor cores as is; fp32 stays exact IEEE fp32


def _select(op: str, device: torch.device, cuda: bool = False, prefer_triton: bool = False) -> str:
    return _select_backend(op, device, cuda=cuda, triton=True, prefer_triton=prefer_triton)


# ---------------------------------------------------------------- xa = drop(x) A^T
@custom_op("qpeft::lora_xa", mutates_args=())
def lora_xa(x: torch.Tensor, A: torch.Tensor, seed: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    if _select("lora_xa", x.device) == "triton":
        from qpeft.triton_kernels.lora import lora_matmul_triton

        return lora_matmul_triton(x, A.t(), out_dtype=torch.float32, M=x.shape[0], N=A.shape[0], seed=seed,
                                  dropout_p=dropout_p, drop_a=True, dot_dtype=_dot_dtype(x))
    return ref.lora_xa_ref(x, A, seed, dropout_p)


@register_fake("qpeft::lora_xa")
def _(x, A, seed, dropout_p):
    _check_2d("x", x)
    _check_2d("A", A, cols=x.shape[1])
    _check_dropout(seed, dropout_p)
    return x.new_empty((x.shape[0], A.shape[0]), dtype=torch.float32)


# ---------------------------------------------------------------- y = x W^T + bias + scale xa B^T
@custom_op("qpeft::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, xa: torch.Tensor,
                B: torch.Tensor, scale: float) -> torch.Tensor:
    # On Hopper the Triton GEMM (wgmma) is expected to beat csrc's mma.sync tiles: the same reasoned default
    # as ops/nf4_matmul_dispatch.py (not yet measured on a GPU).
    impl = _select("lora_linear", x.device, cuda=True, prefer_triton=is_hopper_or_newer(x.device))
    if impl == "cuda":
        out = torch.empty((x.shape[0], weight.shape[0]), device=x.device, dtype=x.dtype)
        # the raw kernel reads xa / B / bias in their own dtypes (fp32 adapters stay fp32, no cast pass)
        _cuda.rt.ext.dense_lora_matmul_out(x, weight, bias, xa, B, scale, out)
        return out
    if impl == "triton":
        from qpeft.triton_kernels.lora import lora_matmul_triton

        return lora_matmul_triton(x, weight.t(), out_dtype=x.dtype, M=x.shape[0], N=weight.shape[0], bias=bias,
                                  p=xa, q_t=B.t(), scale=scale, dot_dtype=_dot_dtype(x))
    return ref.dense_lora_matmul_ref(x, weight, bias, xa, B, scale)


@register_fake("qpeft::lora_linear")
def _(x, weight, bias, xa, B, scale):
    _check_2d("x", x)
    _check_2d("weight", weight, cols=x.shape[1])
    torch._check(weight.dtype == x.dtype, lambda: f"weight dtype {weight.dtype} must equal x dtype {x.dtype}")
    _check_2d("xa", xa, rows=x.shape[0])
    _check_2d("B", B, rows=weight.shape[0], cols=xa.shape[1])
    if bias is not None:
        torch._check(bias.shape == (weight.shape[0],), lambda: f"bias must have shape ({weight.shape[0]},)")
    return x.new_empty((x.shape[0], weight.shape[0]))


# ---------------------------------------------------------------- dx = dy W + scale drop'(dyb A)
@custom_op("qpeft::lora_linear_dx", mutates_args=())
def lora_linear_dx(dy: torch.Tensor, weight: torch.Tensor, dyb: torch.Tensor, A: torch.Tensor, scale: float,
                   seed: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    impl = _select("lora_linear_dx", dy.device)
    if impl == "triton":
        from qpeft.triton_kernels.lora import lora_matmul_triton

        return lora_matmul_triton(dy, weight, out_dtype=dy.dtype, M=dy.shape[0], N=weight.shape[1], p=dyb, q_t=A,
                                  scale=scale, seed=seed, dropout_p=dropout_p, drop_lora=True,
                                  dot_dtype=_dot_dtype(dy))
    return ref.lora_dx_ref(dy, weight, dyb, A, scale, seed, dropout_p)


@register_fake("qpeft::lora_linear_dx")
def _(dy, weight, dyb, A, scale, seed, dropout_p):
    _check_2d("dy", dy)
    _check_2d("weight", weight, rows=dy.shape[1])
    _check_2d("dyb", dyb, rows=dy.shape[0])
    _check_2d("A", A, rows=dyb.shape[1], cols=weight.shape[1])
    _check_dropout(seed, dropout_p)
    return dy.new_empty((dy.shape[0], weight.shape[1]))


# ---------------------------------------------------------------- dx = dx_base + scale drop'(dyb A)
@custom_op("qpeft::lora_masked_dx", mutates_args=())
def lora_masked_dx(dx_base: torch.Tensor, dyb: torch.Tensor, A: torch.Tensor, scale: float,
                   seed: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    if _select("lora_masked_dx", dx_base.device) == "triton":
        from qpeft.triton_kernels.lora import lora_matmul_triton

        return lora_matmul_triton(None, None, out_dtype=dx_base.dtype, M=dx_base.shape[0], N=dx_base.shape[1],
                                  addend=dx_base, p=dyb, q_t=A, scale=scale, seed=seed, dropout_p=dropout_p,
                                  drop_lora=True, dot_dtype=_dot_dtype(dx_base))
    return ref.lora_masked_dx_ref(dx_base, dyb, A, scale, seed, dropout_p)


@register_fake("qpeft::lora_masked_dx")
def _(dx_base, dyb, A, scale, seed, dropout_p):
    _check_2d("dx_base", dx_base)
    _check_2d("dyb", dyb, rows=dx_base.shape[0])
    _check_2d("A", A, rows=dyb.shape[1], cols=dx_base.shape[1])
    _check_dropout(seed, dropout_p)
    return torch.empty_like(dx_base)


# ---------------------------------------------------------------- dyb, dA, dB
@custom_op("qpeft::lora_grad", mutates_args=())
def lora_grad(dy: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, B: torch.Tensor, scale: float,
              seed: torch.Tensor | None, dropout_p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _select("lora_grad", dy.device) == "triton":
        from qpeft.triton_kernels.lora import lora_matmul_triton, lora_tn_triton

        dyb = lora_matmul_triton(dy, B, out_dtype=torch.float32, M=dy.shape[0], N=B.shape[1],
                                 dot_dtype=_dot_dtype(dy))
        dA = lora_tn_triton(dyb, x, scale=scale, seed=seed, dropout_p=dropout_p, drop_q=True,
                            dot_dtype=_dot_dtype(x))
        dB = lora_tn_triton(dy, xa, scale=scale, dot_dtype=_dot_dtype(dy))
        return dyb, dA, dB
    return ref.lora_grad_ref(dy, x, xa, B, scale, seed, dropout_p)


@register_fake("qpeft::lora_grad")
def _(dy, x, xa, B, scale, seed, dropout_p):
    _check_2d("dy", dy)
    _check_2d("x", x, rows=dy.shape[0])
    _check_2d("xa", xa, rows=dy.shape[0])
    _check_2d("B", B, rows=dy.shape[1], cols=xa.shape[1])
    _check_dropout(seed, dropout_p)
    M, r, K, N = dy.shape[0], xa.shape[1], x.shape[1], dy.shape[1]
    f32 = torch.float32
    return dy.new_empty((M, r), dtype=f32), dy.new_empty((r, K), dtype=f32), dy.new_empty((N, r), dtype=f32)
