"""Public blockwise quantizers (bit-compatible with bitsandbytes) and linear integer quantizers.

    packed, state = qpeft.quantize_4bit(W)              # NF4, blocksize 64, double quant (QLoRA defaults)
    W2 = qpeft.dequantize_4bit(packed, state)           # original shape and dtype
    q, state = qpeft.quantize_blockwise(x)              # 8-bit dynamic code, blocksize 256
    q, lstate = qpeft.quantize_linear(x, bits=4, symmetric=False)

Quantizing is a one-off step, so these functions check the data itself (dtype, emptiness, NaN/Inf through
the per-block scales: one small device sync) and accept any strides (they call .contiguous()); the L2 ops
in qpeft.ops.quantize do the work on the backend chosen per call (CUDA C++, Triton or the PyTorch
reference on CPU). Inputs are detached: quantization has no gradient, and a weight that requires grad must
not drag an autograd graph (whose backward could only fail) into the quantized state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _backend, _cuda
from ..formats import codes
from ..ops import quantize as ops
from .state import QuantState

__all__ = ["quantize_4bit", "dequantize_4bit", "quantize_blockwise", "dequantize_blockwise", "quantize_linear",
           "dequantize_linear", "LinearQuantState", "NESTED_BLOCKSIZE"]

NESTED_BLOCKSIZE = 256  # double quant: the absmax codes are 8-bit blockwise in blocks of 256 (bnb, QLoRA)
_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32, torch.int32)


def _check_tensor(A, name: str = "A") -> None:
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(A).__name__}")
    if A.dtype not in ops.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {A.dtype}")
    if A.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(A.shape)}); nothing to quantize")


def _check_finite(A: torch.Tensor, scales: torch.Tensor, name: str = "A") -> None:
    """Reject NaN/Inf in A by looking at the per-block scales the op returned: the ops' contract is that a
    block holding a NaN or Inf gets a non-finite absmax, so this reads 1/blocksize of the data instead of a
    second pass over A (which would cost as much as the quantization itself: 2n bytes read). An Inf always
    shows (max |x| = inf); a backend whose max drops NaN (CUDA fmaxf does) is found by a one-off probe, and
    then A itself is checked for NaN."""
    def fail():
        bad = int((~torch.isfinite(A)).sum())
        raise ValueError(f"{name} has {bad} non-finite values (inf/nan); cannot quantize")

    if not bool(torch.isfinite(scales).all()):
        fail()
    if not _absmax_flags_nan(A.device, _backend.requested()) and bool(torch.isnan(A).any()):
        fail()


@_cuda.cached  # the answer depends on the backend the runtime offers
def _absmax_flags_nan(device: torch.device, requested_backend: str) -> bool:
    """Whether the quantize ops on `device` (with this QPEFT_BACKEND) return a NaN absmax for a NaN block."""
    probe = torch.zeros(64, device=device)
    probe[3] = float("nan")
    _, absmax4 = torch.ops.qpeft.quantize_4bit(probe, 64, "nf4")
    _, absmax8 = torch.ops.qpeft.quantize_blockwise(probe, codes.dynamic_map(device=device), 64)
    return bool(torch.isnan(absmax4).all()) and bool(torch.isnan(absmax8).all())


def _check_blocksize(blocksize, name: str = "blocksize", any_size: bool = False) -> None:
    """any_size (8-bit blockwise): any int >= 1, as bitsandbytes' CPU quantizer accepts (its CUDA kernels take
    64..4096; qpeft's kernels take ops.BLOCKSIZES and run the PyTorch reference for the other lengths)."""
    if not isinstance(blocksize, int) or isinstance(blocksize, bool):
        raise ValueError(f"{name} must be {'a positive int' if any_size else f'one of {ops.BLOCKSIZES}'}, got "
                         f"{blocksize!r}")
    if any_size and blocksize < 1:
        raise ValueError(f"{name} must be a positive int, got {blocksize!r}")
    if not any_size and blocksize not in ops.BLOCKSIZES:
        raise ValueError(f"{name} must be one of {ops.BLOCKSIZES}, got {blocksize!r}")


def _check_dtype(dtype, name: str = "dtype") -> None:
    if dtype not in ops.FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {dtype}")


# --- 4-bit ----------------------------------------------------------------------------------------------
def quantize_4bit(A: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True,
                  quant_storage: torch.dtype = torch.uint8) -> tuple[torch.Tensor, QuantState]:
    """Quantize A (any shape and strides; fp32/fp16/bf16) to 4-bit NF4 or FP4 in blocks of `blocksize`
    (32..4096, over the flattened tensor; the last block may be partial), exactly as bitsandbytes.

    Returns (packed, state): packed is [(n+1)//2 // itemsize, 1] of `quant_storage` (uint8 by default;
    other dtypes only reinterpret the same bytes, for FSDP), element 2i in the high nibble of byte i.
    double_quant (bnb's compress_statistics): the fp32 absmax is stored as 8-bit dynamic-map codes of
    (absmax - mean) in blocks of 256 (state.absmax uint8, state.state2, state.offset).
    """
    _check_tensor(A)
    _check_blocksize(blocksize)
    if quant_type not in ops.QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if quant_storage not in _STORAGE_DTYPES:
        raise ValueError(f"quant_storage must be one of {_STORAGE_DTYPES}, got {quant_storage}")
    n = A.numel()
    nbytes = (n + 1) // 2
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    if nbytes % itemsize:
        raise ValueError(f"quant_storage={quant_storage}: {nbytes} packed bytes are not a multiple of its "
                         f"{itemsize}-byte elements; use quant_storage=torch.uint8 for this tensor")
    packed, absmax = torch.ops.qpeft.quantize_4bit(A.detach().contiguous(), blocksize, quant_type)
    _check_finite(A, absmax)
    code = codes.nf4(A.device) if quant_type == "nf4" else codes.fp4(A.device)
    state = QuantState(absmax=absmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize, quant_type=quant_type,
                       code=code)
    if double_quant:
        _compress_absmax(state)
    packed = packed.view(quant_storage).reshape(-1, 1) if quant_storage != torch.uint8 else packed.reshape(-1, 1)
    return packed, state


def _compress_absmax(state: QuantState) -> None:
    """bnb's compress_statistics: offset = mean(absmax) (0-dim fp32), 8-bit dynamic codes of absmax - offset."""
    offset = state.absmax.mean()
    code2 = codes.dynamic_map(device=state.absmax.device)
    qabsmax, absmax2 = torch.ops.qpeft.quantize_blockwise(state.absmax - offset, code2, NESTED_BLOCKSIZE)
    state.state2 = QuantState(absmax=absmax2, shape=(state.absmax.numel(),), dtype=torch.float32,
                              blocksize=NESTED_BLOCKSIZE, quant_type="blockwise8", code=code2)
    state.absmax = qabsmax
    state.offset = offset


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of quantize_4bit: a tensor of state.shape in `dtype` (default state.dtype).
    code[q] * absmax in fp32, rounded once to the output dtype (bit-identical to bitsandbytes)."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a qpeft QuantState, got {type(state).__name__} "
                        "(convert a bitsandbytes state with QuantState.from_dict(bnb_state.as_dict(packed=True)))")
    if state.quant_type not in ops.QUANT_TYPES:
        raise ValueError(f"state.quant_type must be 'nf4' or 'fp4' for dequantize_4bit, got {state.quant_type!r}")
    state.validate(packed)
    dtype = dtype or state.dtype
    _check_dtype(dtype)
    raw = packed.contiguous().view(torch.uint8).reshape(-1)
    return torch.ops.qpeft.dequantize_4bit(raw, state.decoded_absmax().contiguous(), state.code.contiguous(),
                                           state.blocksize, list(state.shape), dtype)


# --- 8-bit blockwise ------------------------------------------------------------------------------------------
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor | None = None,
                       blocksize: int = 256) -> tuple[torch.Tensor, QuantState]:
    """8-bit blockwise quantization against a sorted code book (default: the signed dynamic map), in blocks of any
    length `blocksize` >= 1 (bitsandbytes' CPU range; 32..4096 powers of two run qpeft's kernels on a GPU, other
    lengths the PyTorch reference).

    Returns (q uint8 of A's shape, state) with state.quant_type "blockwise8". `code`: 2..256 sorted fp32
    values in [-1, 1] (e.g. qpeft.formats.codes.quantile_code(A)); codes index it.
    """
    _check_tensor(A)
    _check_blocksize(blocksize, any_size=True)
    if code is None:
        code = codes.dynamic_map(device=A.device)
    if not isinstance(code, torch.Tensor) or code.dim() != 1 or not 2 <= code.numel() <= 256 \
            or not code.is_floating_point():
        raise ValueError(f"code must be a 1-D float tensor of 2..256 entries, got "
                         f"{getattr(code, 'dtype', type(code).__name__)} {tuple(getattr(code, 'shape', ()))}")
    code = code.to(A.device, torch.float32).contiguous()
    if not bool(torch.isfinite(code).all()) or bool((code[1:] < code[:-1]).any()) or bool(code.abs().max() > 1):
        raise ValueError("code must be finite, sorted ascending and within [-1, 1]")
    q, absmax = torch.ops.qpeft.quantize_blockwise(A.detach().contiguous(), code, blocksize)
    _check_finite(A, absmax)
    state = QuantState(absmax=absmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize, quant_type="blockwise8",
                       code=code)
    return q.reshape(A.shape), state


def dequantize_blockwise(q: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of quantize_blockwise: code[q] * absmax in fp32, rounded once; state.shape, `dtype`."""
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a qpeft QuantState, got {type(state).__name__}")
    if state.quant_type != "blockwise8":
        raise ValueError(f"state.quant_type must be 'blockwise8' for dequantize_blockwise, got {state.quant_type!r}")
    state.validate(q)
    dtype = dtype or state.dtype
    _check_dtype(dtype)
    out = torch.ops.qpeft.dequantize_blockwise(q.contiguous().reshape(-1), state.decoded_absmax().contiguous(),
                                               state.code.contiguous(), state.blocksize, dtype)
    return out.reshape(state.shape)


# --- linear (integer) -------------------------------------------------------------------------------------------
@dataclass
class LinearQuantState:
    """scale fp32 [blocks]; zero uint8 [blocks] (zero point, all 0 when symmetric); bits 4|8; blocksize;
    symmetric; shape and dtype of the original tensor. Codes: 8-bit int8 (symmetric) / uint8 [n]; 4-bit
    packed uint8 [(n+1)//2] high nibble first (symmetric nibble = q + 8)."""
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    blocksize: int
    symmetric: bool
    shape: torch.Size
    dtype: torch.dtype

    def to(self, device) -> "LinearQuantState":
        self.scale, self.zero = self.scale.to(device), self.zero.to(device)
        return self


def quantize_linear(A: torch.Tensor, bits: int = 8, blocksize: int = 64,
                    symmetric: bool = True) -> tuple[torch.Tensor, LinearQuantState]:
    """Uniform integer quantization per block: absmax (symmetric: q in [-(2^(b-1)-1), 2^(b-1)-1], scale =
    absmax / qmax) or zero-point (asymmetric: q in [0, 2^b - 1] over [min(x, 0), max(x, 0)]). Round half to
    even. Returns (codes, LinearQuantState); see LinearQuantState for the code layout."""
    _check_tensor(A)
    _check_blocksize(blocksize)
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    q, scale, zero = torch.ops.qpeft.quantize_linear(A.detach().contiguous(), bits, blocksize, symmetric)
    _check_finite(A, scale)
    return q, LinearQuantState(scale, zero, bits, blocksize, symmetric, A.shape, A.dtype)


def dequantize_linear(q: torch.Tensor, state: LinearQuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inverse of quantize_linear: (q - zero) * scale in fp32, rounded once; state.shape, `dtype`."""
    if not isinstance(state, LinearQuantState):
        raise TypeError(f"state must be a LinearQuantState, got {type(state).__name__}")
    dtype = dtype or state.dtype
    _check_dtype(dtype)
    n = math.prod(state.shape)
    want = n if state.bits == 8 else (n + 1) // 2
    if q.numel() != want:
        raise ValueError(f"q must have {want} elements for shape {tuple(state.shape)} at {state.bits} bits, "
                         f"got {tuple(q.shape)}")
    return torch.ops.qpeft.dequantize_linear(q.contiguous(), state.scale.contiguous(), state.zero.contiguous(),
                                             state.bits, state.blocksize, state.symmetric, list(state.shape), dtype)
