"""L2 ops `qpeft::nf4_matmul` (y = x @ W^T) and `qpeft::nf4_matmul_dx` (dx = dy @ W) on a 4-bit weight.

Schemas are fixed by docs/ARCHITECTURE.md. The weight W (N, K) arrives as its decoded pieces: packed uint8
[(N*K+1)//2, 1], absmax (fp32 [blocks], or uint8 [blocks] with nested_absmax/nested_code/offset), the
16-entry fp32 code book and the blocksize. Both ops return new tensors (mutates_args=()), so the fakes are
plain `new_empty`s and torch.compile(fullgraph=True) traces through them without a graph break.

Backend choice happens inside the implementation: `nf4_matmul_dispatch.plan` picks the preferred backend and
Triton tiles by M, N, K, dtype and GPU (a table measured on the GPU when there is one, else a documented
default), and `_backend.select` applies QPEFT_BACKEND and availability: CUDA C++ raw op, Triton launcher, or
the PyTorch reference (CPU). Nothing is allocated but the returned tensor, and nothing syncs with the host,
so both ops can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
from torch.library import custom_op, register_fake

from .. import _cuda
from .._backend import _warn_once
from .._backend import select as select_backend
from . import nf4_matmul_dispatch
from ..reference import nf4_matmul as ref

__all__ = ["nf4_matmul", "nf4_matmul_dx", "check_weight_args", "cuda_forward_input"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# csrc/nf4_matmul.cu + nf4_gemv.cu: the decode kernels' ranges (kDecodeMmaMaxM for the tensor-core kernel,
# kGemvMaxM for the SIMT one) and the tensor-core kernel's K step (kDecPassK); both need 16-byte aligned x and W
CUDA_DECODE_MMA_MAX_M = 64
CUDA_DECODE_SIMT_MAX_M = 16
CUDA_DECODE_K_STEP = 256


def cuda_forward_input(x2d: torch.Tensor, packed: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The activation to hand the CUDA C++ forward (qpeft_C::nf4_matmul_out), and a one-time warning per reason
    when a decode-sized call (M <= 64, fp16 / bf16) cannot take the tensor-core decode kernel:
    - x not 16-byte aligned (a view at an odd offset): copied here, M x K elements, far less than the weight the
      kernel streams, so the call stays on the fast kernel;
    - blocksize 32 or K % 256 != 0: the SIMT kernel at M <= 16, the tiled GEMM above;
    - K % 32 != 0 or a misaligned packed weight: the tiled GEMM.
    fp32 activations take the SIMT kernel (M <= 16) or the tiled GEMM (no tensor cores for fp32): documented,
    not warned. Larger M goes to the tiled GEMM, which handles any alignment at full speed."""
    M, K = x2d.shape
    if M > CUDA_DECODE_MMA_MAX_M or (x2d.dtype == torch.float32 and M > CUDA_DECODE_SIMT_MAX_M):
        return x2d
    if x2d.data_ptr() % 16:
        x2d = x2d.clone()  # a fresh allocation: the caching allocator aligns every block to 512 bytes
    if packed.data_ptr() % 16:
        reason = "the packed weight is not 16-byte aligned (a view at an offset)"
    elif K % 32:
        reason = f"K={K} is not a multiple of 32"
    elif x2d.dtype == torch.float32:
        return x2d
    elif blocksize < 64:
        reason = f"blocksize {blocksize} < 64"
    elif K % CUDA_DECODE_K_STEP:
        reason = f"K={K} is not a multiple of {CUDA_DECODE_K_STEP}"
    else:
        return x2d
    simt = M <= CUDA_DECODE_SIMT_MAX_M and K % 32 == 0 and packed.data_ptr() % 16 == 0
    _warn_once(f"qpeft.nf4_matmul: {reason}, so decode-sized calls (M <= {CUDA_DECODE_MMA_MAX_M}) on the CUDA "
               f"backend use the {'SIMT kernel' if simt else 'tiled GEMM'} instead of the tensor-core decode kernel "
               f"(several times slower)")
    return x2d


def check_weight_args(a: torch.Tensor, a_name: str, packed: torch.Tensor, absmax: torch.Tensor,
                      code: torch.Tensor, blocksize: int, N: int, K: int,
                      nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                      offset: torch.Tensor | None) -> None:
    """Validate the activation `a` and the packed weight W (N, K). torch._check keeps this traceable
    (fakes call it too) and raises RuntimeError with the message in eager mode."""
    torch._check(a.dim() == 2, lambda: f"{a_name} must be 2-D, got shape {tuple(a.shape)}")
    torch._check(a.dtype in FLOAT_DTYPES,
                 lambda: f"{a_name} must be float16, bfloat16 or float32, got {a.dtype}")
    torch._check(a.is_contiguous(), lambda: f"{a_name} must be contiguous (call .contiguous() first)")
    torch._check(packed.is_contiguous(), lambda: "packed must be contiguous")
    torch._check(blocksize in BLOCKSIZES, lambda: f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    torch._check(N > 0 and K > 0, lambda: f"weight shape must be positive, got N={N}, K={K}")
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    torch._check(packed.numel() == (N * K + 1) // 2,
                 lambda: f"packed must hold (N*K+1)//2 = {(N * K + 1) // 2} bytes for W ({N}, {K}), "
                         f"got shape {tuple(packed.shape)}")
    blocks = (N * K + blocksize - 1) // blocksize
    torch._check(absmax.numel() == blocks,
                 lambda: f"absmax must have ceil(N*K/blocksize) = {blocks} entries for W ({N}, {K}) and "
                         f"blocksize {blocksize}, got shape {tuple(absmax.shape)}")
    torch._check(code.dtype == torch.float32 and code.numel() == 16,
                 lambda: f"code must be a float32 tensor of 16 entries, got {code.dtype} {tuple(code.shape)}")
    nested = nested_absmax is not None
    torch._check(nested == (nested_code is not None) == (offset is not None),
                 lambda: "nested_absmax, nested_code and offset must be given together (double quant)")
    if nested:
        torch._check(absmax.dtype == torch.uint8,
                     lambda: f"absmax must be uint8 codes with double quant, got {absmax.dtype}")
        nblocks = (blocks + ref.NESTED_BLOCKSIZE - 1) // ref.NESTED_BLOCKSIZE
        torch._check(nested_absmax.dtype == torch.float32 and nested_absmax.numel() == nblocks,
                     lambda: f"nested_absmax must be float32 with ceil(blocks/256) = {nblocks} entries, got "
                             f"{nested_absmax.dtype} {tuple(nested_absmax.shape)}")
        torch._check(nested_code.dtype == torch.float32 and nested_code.numel() == 256,
                     lambda: f"nested_code must be float32 with 256 entries, got "
                             f"{nested_code.dtype} {tuple(nested_code.shape)}")
        torch._check(offset.dtype == torch.float32 and offset.numel() == 1,
                     lambda: f"offset must be a float32 scalar, got {offset.dtype} {tuple(offset.shape)}")
    else:
        torch._check(absmax.dtype == torch.float32, lambda: f"absmax must be float32, got {absmax.dtype}")
    for name, t in (("packed", packed), ("absmax", absmax), ("code", code), ("nested_absmax", nested_absmax),
                    ("nested_code", nested_code), ("offset", offset)):
        if t is not None:
            torch._check(t.device == a.device,
                         lambda: f"{name} is on {t.device} but {a_name} is on {a.device}")


def _check_epilogue(a: torch.Tensor, a_name: str, rows_name: str, rows: torch.Tensor | None, cols_name: str,
                    cols: torch.Tensor | None, out_features: int, cols_transposed: bool) -> None:
    """LoRA epilogue: rows (M, r) @ cols -> (M, out_features); cols is (out_features, r) or (r, out_features)."""
    torch._check((rows is None) == (cols is None), lambda: f"{rows_name} and {cols_name} must be given together")
    if rows is None:
        return
    M = a.shape[0]
    r = rows.shape[-1]
    want = (out_features, r) if not cols_transposed else (r, out_features)
    torch._check(rows.dim() == 2 and rows.shape[0] == M,
                 lambda: f"{rows_name} must be ({M}, r), got {tuple(rows.shape)}")
    torch._check(cols.dim() == 2 and tuple(cols.shape) == want,
                 lambda: f"{cols_name} must be {want}, got {tuple(cols.shape)}")
    for name, t in ((rows_name, rows), (cols_name, cols)):
        torch._check(t.dtype == a.dtype, lambda: f"{name} must have {a_name}'s dtype {a.dtype}, got {t.dtype}")
        torch._check(t.device == a.device, lambda: f"{name} is on {t.device} but {a_name} is on {a.device}")
        torch._check(t.is_contiguous(), lambda: f"{name} must be contiguous")


def _check_fwd(x2d, packed, absmax, code, blocksize, N, nested_absmax, nested_code, offset, bias, lora_xa,
               lora_B) -> None:
    check_weight_args(x2d, "x", packed, absmax, code, blocksize, N, x2d.shape[-1], nested_absmax, nested_code,
                      offset)
    if bias is not None:
        torch._check(tuple(bias.shape) == (N,), lambda: f"bias must have shape ({N},), got {tuple(bias.shape)}")
        torch._check(bias.dtype == x2d.dtype, lambda: f"bias must have x's dtype {x2d.dtype}, got {bias.dtype}")
        torch._check(bias.device == x2d.device, lambda: f"bias is on {bias.device} but x is on {x2d.device}")
    _check_epilogue(x2d, "x", "lora_xa", lora_xa, "lora_B", lora_B, N, cols_transposed=False)


def _check_dx(dy2d, packed, absmax, code, blocksize, K, nested_absmax, nested_code, offset, lora_dyb,
              lora_A) -> None:
    check_weight_args(dy2d, "dy", packed, absmax, code, blocksize, dy2d.shape[-1], K, nested_absmax, nested_code,
                      offset)
    _check_epilogue(dy2d, "dy", "lora_dyb", lora_dyb, "lora_A", lora_A, K, cols_transposed=True)


@custom_op("qpeft::nf4_matmul", mutates_args=())
def nf4_matmul(x2d: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
               blocksize: int, N: int, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
               offset: torch.Tensor | None, bias: torch.Tensor | None, lora_xa: torch.Tensor | None,
               lora_B: torch.Tensor | None, lora_scale: float) -> torch.Tensor:
    """(M, N) in x2d's dtype = x2d (M, K) @ W^T + bias + lora_scale * lora_xa @ lora_B^T (fp32 accumulate)."""
    _check_fwd(x2d, packed, absmax, code, blocksize, N, nested_absmax, nested_code, offset, bias, lora_xa, lora_B)
    if x2d.shape[0] == 0:  # empty batch: no kernel launch (a zero-size grid is an error in Triton/CUDA)
        return x2d.new_empty((0, N))
    M = x2d.shape[0]
    plan = nf4_matmul_dispatch.plan("fwd", M, N, x2d.shape[1], x2d.dtype, x2d.device)
    impl = select_backend("nf4_matmul", x2d.device, prefer_triton=plan.backend == "triton")
    if impl == "cuda":
        x2d = cuda_forward_input(x2d, packed, blocksize)
        out = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
        _cuda.rt.ext.nf4_matmul_out(x2d, packed, absmax, code, blocksize, nested_absmax, nested_code, offset,
                                    bias, lora_xa, lora_B, lora_scale, out)
        return out
    if impl == "triton":
        from qpeft.triton_kernels.nf4_matmul import nf4_matmul_triton

        return nf4_matmul_triton(x2d, packed, absmax, code, blocksize, N, nested_absmax, nested_code, offset,
                                 bias, lora_xa, lora_B, lora_scale, config=plan.config())
    return ref.nf4_matmul_ref(x2d, packed, absmax, code, blocksize, N, nested_absmax, nested_code, offset, bias,
                              lora_xa, lora_B, lora_scale)


@register_fake("qpeft::nf4_matmul")
def _nf4_matmul_fake(x2d, packed, absmax, code, blocksize, N, nested_absmax, nested_code, offset, bias, lora_xa,
                     lora_B, lora_scale):
    _check_fwd(x2d, packed, absmax, code, blocksize, N, nested_absmax, nested_code, offset, bias, lora_xa, lora_B)
    return x2d.new_empty((x2d.shape[0], N))


@custom_op("qpeft::nf4_matmul_dx", mutates_args=())
def nf4_matmul_dx(dy2d: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                  blocksize: int, K: int, nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                  offset: torch.Tensor | None, lora_dyb: torch.Tensor | None, lora_A: torch.Tensor | None,
                  lora_scale: float) -> torch.Tensor:
    """(M, K) in dy2d's dtype = dy2d (M, N) @ W + lora_scale * lora_dyb (M, r) @ lora_A (r, K)."""
    _check_dx(dy2d, packed, absmax, code, blocksize, K, nested_absmax, nested_code, offset, lora_dyb, lora_A)
    if dy2d.shape[0] == 0:
        return dy2d.new_empty((0, K))
    plan = nf4_matmul_dispatch.plan("dx", dy2d.shape[0], dy2d.shape[1], K, dy2d.dtype, dy2d.device)
    impl = select_backend("nf4_matmul_dx", dy2d.device, prefer_triton=plan.backend == "triton")
    if impl == "cuda":
        dx = torch.empty((dy2d.shape[0], K), dtype=dy2d.dtype, device=dy2d.device)
        _cuda.rt.ext.nf4_matmul_dx_out(dy2d, packed, absmax, code, blocksize, nested_absmax, nested_code,
                                       offset, lora_dyb, lora_A, lora_scale, dx)
        return dx
    if impl == "triton":
        from qpeft.triton_kernels.nf4_matmul import nf4_matmul_dx_triton

        return nf4_matmul_dx_triton(dy2d, packed, absmax, code, blocksize, K, nested_absmax, nested_code, offset,
                                    lora_dyb, lora_A, lora_scale, config=plan.config())
    return ref.nf4_matmul_dx_ref(dy2d, packed, absmax, code, blocksize, K, nested_absmax, nested_code, offset,
                                 lora_dyb, lora_A, lora_scale)


@register_fake("qpeft::nf4_matmul_dx")
def _nf4_matmul_dx_fake(dy2d, packed, absmax, code, blocksize, K, nested_absmax, nested_code, offset, lora_dyb,
                        lora_A, lora_scale):
    _check_dx(dy2d, packed, absmax, code, blocksize, K, nested_absmax, nested_code, offset, lora_dyb, lora_A)
    return dy2d.new_empty((dy2d.shape[0], K))
