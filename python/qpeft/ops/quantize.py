"""L2 ops of the blockwise quantizers (schemas fixed by docs/ARCHITECTURE.md):

    qpeft::quantize_4bit(A, blocksize, quant_type) -> (packed uint8 [(n+1)//2], absmax fp32 [blocks])
    qpeft::dequantize_4bit(packed, absmax, code, blocksize, shape, dtype) -> Tensor(shape, dtype)
    qpeft::quantize_blockwise(A, code, blocksize) -> (q uint8 [n], absmax fp32 [blocks])
    qpeft::dequantize_blockwise(q, absmax, code, blocksize, dtype) -> Tensor [n]
        (any blocksize >= 1, as bitsandbytes' CPU quantizer; the kernels take BLOCKSIZES, 32..4096, and the
        other lengths run the PyTorch reference on every device)
    qpeft::quantize_linear(A, bits, blocksize, symmetric) -> (codes, scale fp32 [blocks], zero uint8 [blocks])
    qpeft::dequantize_linear(q, scale, zero, bits, blocksize, symmetric, shape, dtype) -> Tensor(shape, dtype)

All take contiguous tensors (the public API in qpeft.quant.functional calls .contiguous() and checks the data:
dtypes, blocksize, non-finite values); the checks here are shape/dtype only (torch._check, so the fakes run
them too and nothing syncs with the device). Every op returns new tensors (mutates_args=()).
Contract of the quantize ops on every backend: a block holding a NaN or an Inf gets a non-finite absmax
(scale), which is how the public API rejects non-finite input without a second pass over A.
Backend per call: CUDA C++ raw op (`qpeft_C::*_out`, through `_cuda.rt.ext`; destination passing), Triton, or
the reference.
The linear quantizers have only the reference implementation (they are a one-off step on small tensors).
"""
from __future__ import annotations

import torch
from torch.library import custom_op, register_fake

from .. import _backend, _cuda
from ..reference import quantize as ref

__all__ = ["quantize_4bit", "dequantize_4bit", "quantize_blockwise", "dequantize_blockwise", "quantize_linear",
           "dequantize_linear", "BLOCKSIZES", "QUANT_TYPES", "FLOAT_DTYPES"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The reference quantizer (the CPU path) holds ~17 bytes per element in temporaries (an fp32 copy, |A|, the scaled
# values, int32 bucket indices): 140 MiB for one 4096 x 2048 projection, measured in the peak of a Qwen3-30B-A3B-
# width 4-bit load on the CPU, over its bound (final model + largest tensor + 10%; benchmarks/bench_load.py). Fed
# chunks of whole blocks its results are the same (blocks are independent) and the transient ~17 MiB.
REF_QUANT_CHUNK = 1 << 20


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_blocksize(blocksize: int, any_size: bool) -> None:
    if any_size:  # the 8-bit blockwise ops: any block length, as bitsandbytes' CPU quantizer
        torch._check(blocksize >= 1, lambda: f"blocksize must be a positive int, got {blocksize}")
    else:
        torch._check(blocksize in BLOCKSIZES, lambda: f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")


def _check_input(A: torch.Tensor, blocksize: int, any_size: bool = False) -> None:
    torch._check(A.dtype in FLOAT_DTYPES, lambda: f"A must be float32, float16 or bfloat16, got {A.dtype}")
    torch._check(A.is_contiguous(), lambda: "A must be contiguous (call .contiguous() first)")
    torch._check(A.numel() > 0, lambda: "A must not be empty")
    _check_blocksize(blocksize, any_size)


def _check_scales(absmax: torch.Tensor, n: int, blocksize: int, like: torch.Tensor, name: str = "absmax",
                  any_size: bool = False) -> None:
    _check_blocksize(blocksize, any_size)
    blocks = (n + blocksize - 1) // blocksize
    torch._check(absmax.dtype == torch.float32, lambda: f"{name} must be float32, got {absmax.dtype}")
    torch._check(absmax.numel() == blocks,
                 lambda: f"{name} must have ceil(n/blocksize) = {blocks} entries, got shape {tuple(absmax.shape)}")
    torch._check(absmax.is_contiguous(), lambda: f"{name} must be contiguous")
    torch._check(absmax.device == like.device, lambda: f"{name} is on {absmax.device}, expected {like.device}")


def _check_code(code: torch.Tensor, like: torch.Tensor, entries: int | None) -> None:
    torch._check(code.dtype == torch.float32, lambda: f"code must be float32, got {code.dtype}")
    torch._check(code.dim() == 1, lambda: f"code must be 1-D, got shape {tuple(code.shape)}")
    if entries is None:
        torch._check(2 <= code.numel() <= 256, lambda: f"code must have 2..256 entries, got {code.numel()}")
    else:
        torch._check(code.numel() == entries, lambda: f"code must have {entries} entries, got {code.numel()}")
    torch._check(code.is_contiguous(), lambda: "code must be contiguous")
    torch._check(code.device == like.device, lambda: f"code is on {code.device}, expected {like.device}")


def _check_out_dtype(dtype: torch.dtype) -> None:
    torch._check(dtype in FLOAT_DTYPES, lambda: f"dtype must be float32, float16 or bfloat16, got {dtype}")


# --- 4-bit ----------------------------------------------------------------------------------------------
@custom_op("qpeft::quantize_4bit", mutates_args=())
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_input(A, blocksize)
    torch._check(quant_type in QUANT_TYPES, lambda: f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    impl = _backend.select("quantize_4bit", A.device)
    if impl == "cuda":
        n = A.numel()
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=A.device)
        absmax = torch.empty((n + blocksize - 1) // blocksize, dtype=torch.float32, device=A.device)
        _cuda.rt.ext.quantize_4bit_out(A, blocksize, quant_type, packed, absmax)
        return packed, absmax
    if impl == "triton":
        from qpeft.triton_kernels.quantize import quantize_4bit_triton

        return quantize_4bit_triton(A, blocksize, quant_type)
    return _quantize_4bit_ref_chunked(A, blocksize, quant_type)


def _quantize_4bit_ref_chunked(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ref.quantize_4bit_ref, REF_QUANT_CHUNK elements (whole blocks: an even count, so no byte is split) at once."""
    n = A.numel()
    chunk = max(blocksize, REF_QUANT_CHUNK // blocksize * blocksize)
    if n <= chunk:
        return ref.quantize_4bit_ref(A, blocksize, quant_type)
    flat = A.reshape(-1)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=A.device)
    absmax = torch.empty((n + blocksize - 1) // blocksize, dtype=torch.float32, device=A.device)
    for start in range(0, n, chunk):
        p, a = ref.quantize_4bit_ref(flat[start:start + chunk], blocksize, quant_type)
        packed[start // 2:start // 2 + p.numel()] = p
        absmax[start // blocksize:start // blocksize + a.numel()] = a
    return packed, absmax


@register_fake("qpeft::quantize_4bit")
def _(A, blocksize, quant_type):
    _check_input(A, blocksize)
    torch._check(quant_type in QUANT_TYPES, lambda: f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    n = A.numel()
    return (A.new_empty((n + 1) // 2, dtype=torch.uint8),
            A.new_empty((n + blocksize - 1) // blocksize, dtype=torch.float32))


def _check_dequantize_4bit(packed, absmax, code, blocksize, shape, dtype) -> None:
    n = _numel(shape)
    torch._check(n > 0, lambda: f"shape must be non-empty, got {list(shape)}")
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    torch._check(packed.is_contiguous(), lambda: "packed must be contiguous")
    torch._check(packed.numel() == (n + 1) // 2,
                 lambda: f"packed must hold (n+1)//2 = {(n + 1) // 2} bytes for shape {list(shape)}, "
                         f"got shape {tuple(packed.shape)}")
    _check_scales(absmax, n, blocksize, packed)
    _check_code(code, packed, 16)
    _check_out_dtype(dtype)


@custom_op("qpeft::dequantize_4bit", mutates_args=())
def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                    shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    _check_dequantize_4bit(packed, absmax, code, blocksize, shape, dtype)
    impl = _backend.select("dequantize_4bit", packed.device)
    if impl == "cuda":
        out = torch.empty(shape, dtype=dtype, device=packed.device)
        _cuda.rt.ext.dequantize_4bit_out(packed, absmax, code, blocksize, out)
        return out
    if impl == "triton":
        from qpeft.triton_kernels.quantize import dequantize_4bit_triton

        return dequantize_4bit_triton(packed, absmax, code, blocksize, shape, dtype)
    return ref.dequantize_4bit_ref(packed, absmax, code, blocksize, shape, dtype)


@register_fake("qpeft::dequantize_4bit")
def _(packed, absmax, code, blocksize, shape, dtype):
    _check_dequantize_4bit(packed, absmax, code, blocksize, shape, dtype)
    return packed.new_empty(shape, dtype=dtype)


# --- 8-bit blockwise ------------------------------------------------------------------------------------------
@custom_op("qpeft::quantize_blockwise", mutates_args=())
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_input(A, blocksize, any_size=True)
    _check_code(code, A, None)
    if blocksize not in BLOCKSIZES:  # the kernels tile by these powers of two; any other length: the reference
        return ref.quantize_blockwise_ref(A, code, blocksize)
    impl = _backend.select("quantize_blockwise", A.device)
    if impl == "cuda":
        n = A.numel()
        q = torch.empty(n, dtype=torch.uint8, device=A.device)
        absmax = torch.empty((n + blocksize - 1) // blocksize, dtype=torch.float32, device=A.device)
        _cuda.rt.ext.quantize_blockwise_out(A, code, blocksize, q, absmax)
        return q, absmax
    if impl == "triton":
        from qpeft.triton_kernels.quantize import quantize_blockwise_triton

        return quantize_blockwise_triton(A, code, blocksize)
    return ref.quantize_blockwise_ref(A, code, blocksize)


@register_fake("qpeft::quantize_blockwise")
def _(A, code, blocksize):
    _check_input(A, blocksize, any_size=True)
    _check_code(code, A, None)
    n = A.numel()
    return (A.new_empty(n, dtype=torch.uint8), A.new_empty((n + blocksize - 1) // blocksize, dtype=torch.float32))


def _check_dequantize_blockwise(q, absmax, code, blocksize, dtype) -> None:
    torch._check(q.dtype == torch.uint8, lambda: f"q must be uint8, got {q.dtype}")
    torch._check(q.is_contiguous(), lambda: "q must be contiguous")
    torch._check(q.numel() > 0, lambda: "q must not be empty")
    _check_scales(absmax, q.numel(), blocksize, q, any_size=True)
    _check_code(code, q, None)
    _check_out_dtype(dtype)


@custom_op("qpeft::dequantize_blockwise", mutates_args=())
def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                         dtype: torch.dtype) -> torch.Tensor:
    _check_dequantize_blockwise(q, absmax, code, blocksize, dtype)
    if blocksize not in BLOCKSIZES:
        return ref.dequantize_blockwise_ref(q, absmax, code, blocksize, dtype)
    impl = _backend.select("dequantize_blockwise", q.device)
    if impl == "cuda":
        out = torch.empty(q.numel(), dtype=dtype, device=q.device)
        _cuda.rt.ext.dequantize_blockwise_out(q.reshape(-1), absmax, code, blocksize, out)
        return out
    if impl == "triton":
        from qpeft.triton_kernels.quantize import dequantize_blockwise_triton

        return dequantize_blockwise_triton(q, absmax, code, blocksize, dtype)
    return ref.dequantize_blockwise_ref(q, absmax, code, blocksize, dtype)


@register_fake("qpeft::dequantize_blockwise")
def _(q, absmax, code, blocksize, dtype):
    _check_dequantize_blockwise(q, absmax, code, blocksize, dtype)
    return q.new_empty(q.numel(), dtype=dtype)


# --- linear (integer) -------------------------------------------------------------------------------------------
def _linear_codes_like(like: torch.Tensor, n: int, bits: int, symmetric: bool) -> torch.Tensor:
    if bits == 8:
        return like.new_empty(n, dtype=torch.int8 if symmetric else torch.uint8)
    return like.new_empty((n + 1) // 2, dtype=torch.uint8)


@custom_op("qpeft::quantize_linear", mutates_args=())
def quantize_linear(A: torch.Tensor, bits: int, blocksize: int,
                    symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_input(A, blocksize)
    torch._check(bits in (4, 8), lambda: f"bits must be 4 or 8, got {bits}")
    return ref.quantize_linear_ref(A, bits, blocksize, symmetric)


@register_fake("qpeft::quantize_linear")
def _(A, bits, blocksize, symmetric):
    _check_input(A, blocksize)
    torch._check(bits in (4, 8), lambda: f"bits must be 4 or 8, got {bits}")
    n = A.numel()
    blocks = (n + blocksize - 1) // blocksize
    return (_linear_codes_like(A, n, bits, symmetric), A.new_empty(blocks, dtype=torch.float32),
            A.new_empty(blocks, dtype=torch.uint8))


def _check_dequantize_linear(q, scale, zero, bits, blocksize, symmetric, shape, dtype) -> None:
    n = _numel(shape)
    torch._check(n > 0, lambda: f"shape must be non-empty, got {list(shape)}")
    torch._check(bits in (4, 8), lambda: f"bits must be 4 or 8, got {bits}")
    want_dtype = torch.int8 if (bits == 8 and symmetric) else torch.uint8
    want_numel = n if bits == 8 else (n + 1) // 2
    torch._check(q.dtype == want_dtype, lambda: f"q must be {want_dtype} for bits={bits}, symmetric={symmetric}, "
                                                f"got {q.dtype}")
    torch._check(q.numel() == want_numel,
                 lambda: f"q must have {want_numel} elements for shape {list(shape)}, got {tuple(q.shape)}")
    torch._check(q.is_contiguous(), lambda: "q must be contiguous")
    _check_scales(scale, n, blocksize, q, "scale")
    torch._check(zero.dtype == torch.uint8 and zero.numel() == scale.numel(),
                 lambda: f"zero must be uint8 with {scale.numel()} entries, got {zero.dtype} {tuple(zero.shape)}")
    _check_out_dtype(dtype)


@custom_op("qpeft::dequantize_linear", mutates_args=())
def dequantize_linear(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, blocksize: int,
                      symmetric: bool, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    _check_dequantize_linear(q, scale, zero, bits, blocksize, symmetric, shape, dtype)
    return ref.dequantize_linear_ref(q, scale, zero, bits, blocksize, symmetric, shape, dtype)


@register_fake("qpeft::dequantize_linear")
def _(q, scale, zero, bits, blocksize, symmetric, shape, dtype):
    _check_dequantize_linear(q, scale, zero, bits, blocksize, symmetric, shape, dtype)
    return q.new_empty(shape, dtype=dtype)
