"""Pure-PyTorch blockwise quantizers: the CPU path, the fallback and the oracle of the kernels.

Semantics (bit-identical to bitsandbytes' PyTorch backend, `backends/default/ops.py`, which is what
bitsandbytes runs for 4-bit quantization on CPU; its CUDA kernels agree up to the tail-block quirk below):
- blocks of `blocksize` run over the flattened row-major tensor; the last block may be partial;
- everything is computed in fp32: absmax = max|x| per block;
  full blocks:      scaled = clamp(x * (1 / max(absmax, 1e-38)), -1, 1)
  the partial tail: scaled = clamp(x / max(absmax, 1e-38), -1, 1), and its *stored* absmax is the clamped
                    one (bnb computes the tail separately: a division and a clamped absmax);
- the code is the position of `scaled` among the fp32 midpoints of the sorted code book, counting the
  midpoints strictly below it (torch.bucketize, so exact ties go to the lower code); FP4 positions map to
  bit-pattern codes through `codes.FP4_SORTED_CODES`;
- 4-bit packing: element 2i in the HIGH nibble of byte i; an odd element count is padded with the code of
  0.0 (NF4: 7, FP4: 0);
- dequantize: code[q] * absmax[block] in fp32, rounded once to the output dtype.

Note: bitsandbytes' *native* CPU 8-bit kernel (libbitsandbytes_cpu, used by its public quantize_blockwise
on CPU tensors) rounds through a 65536-entry lookup table of scaled values, so it picks the nearest code
only to within 2/65535; its CUDA kernel and its PyTorch backend round exactly, as this reference does.

Linear (integer) quantization, qpeft's own format:
- symmetric: scale = absmax / qmax with qmax = 2^(bits-1) - 1; q = clamp(round(x * (qmax / absmax)),
  -qmax, qmax); 8-bit stored as int8, 4-bit as the nibble q + 8;
- asymmetric: lo = min(min x, 0), hi = max(max x, 0), scale = (hi - lo) / (2^bits - 1),
  zero = clamp(round(-lo / scale), 0, 2^bits - 1); q = clamp(round(x / scale) + zero, 0, 2^bits - 1),
  stored as uint8 (8-bit) or nibbles (4-bit); dequantize (q - zero) * scale. round() is half-to-even.
"""
from __future__ import annotations

import torch

from ..formats import codes

# bnb clamps absmax to 1e-38 before taking its reciprocal: an all-zero block then scales by 1e38 (finite in
# fp32) and every element rounds to the code of 0 instead of NaN.
ABSMAX_FLOOR = 1e-38


def _blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def _scale_blocks(A: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled fp32 [n] clamped to [-1, 1], absmax fp32 [blocks]) with bnb's full-block/tail split."""
    flat = A.reshape(-1).float()
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    body = flat[:full].reshape(full // blocksize, blocksize)
    absmax = body.abs().amax(dim=1) if full else flat.new_empty(0)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=ABSMAX_FLOOR).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        tail_absmax = flat[full:].abs().amax().clamp(min=ABSMAX_FLOOR)
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    return scaled, absmax


def midpoints(sorted_code: torch.Tensor) -> torch.Tensor:
    """fp32 midpoints between consecutive entries of a sorted code book (len - 1 entries)."""
    c = sorted_code.float()
    return (c[:-1] + c[1:]) / 2


def _lookup(q: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    return code.float()[q.long()]


def _scale_by_block(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values fp32 [n] * absmax[i // blocksize], fp32."""
    n = values.numel()
    pad = _blocks(n, blocksize) * blocksize - n
    padded = torch.nn.functional.pad(values, (0, pad))
    return (padded.view(-1, blocksize) * absmax.float().view(-1, 1)).reshape(-1)[:n]


# --- 4-bit NF4 / FP4 ---------------------------------------------------------------------------------------
def quantize_4bit_ref(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A: any shape, fp32/fp16/bf16 -> (packed uint8 [(n+1)//2], absmax fp32 [ceil(n/blocksize)])."""
    sorted_values, codes_by_position = codes.sorted_codebook(quant_type, A.device)
    scaled, absmax = _scale_blocks(A, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))  # the pad element is 0.0 -> the code of zero
    q = codes_by_position[torch.bucketize(scaled, midpoints(sorted_values), out_int32=True)]
    packed = (q[0::2] << 4) | q[1::2]
    return packed, absmax


def unpack_4bit_ref(packed: torch.Tensor, n: int) -> torch.Tensor:
    """packed uint8 [(n+1)//2] -> codes uint8 [n] (high nibble first)."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:n]


def dequantize_4bit_ref(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                        shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """packed uint8 [(n+1)//2], absmax fp32 [blocks], code fp32 [16] -> tensor of `shape` in `dtype`."""
    n = 1
    for s in shape:
        n *= s
    values = _lookup(unpack_4bit_ref(packed, n), code)
    return _scale_by_block(values, absmax, blocksize).to(dtype).reshape(shape)


# --- 8-bit blockwise against a sorted code book --------------------------------------------------------------
def quantize_blockwise_ref(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A: any shape, fp32/fp16/bf16; code: sorted fp32 [<= 256] -> (q uint8 [n], absmax fp32 [blocks])."""
    scaled, absmax = _scale_blocks(A, blocksize)
    q = torch.bucketize(scaled, midpoints(code.to(A.device)), out_int32=True)
    return q.to(torch.uint8), absmax


def dequantize_blockwise_ref(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                             dtype: torch.dtype) -> torch.Tensor:
    """q uint8 [n] -> code[q] * absmax[i // blocksize] in `dtype`, [n]."""
    values = _lookup(q.reshape(-1), code)
    return _scale_by_block(values, absmax, blocksize).to(dtype)


def decode_absmax_ref(qabsmax: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor,
                      nested_blocksize: int, offset: torch.Tensor) -> torch.Tensor:
    """Double quant: absmax[i] = nested_code[q[i]] * nested_absmax[i // nested_blocksize] + offset (fp32,
    two roundings: bnb dequantizes, then adds the offset)."""
    return dequantize_blockwise_ref(qabsmax, nested_absmax, nested_code, nested_blocksize, torch.float32) \
        + offset.float()


# --- linear (integer) quantization -------------------------------------------------------------------------------
def linear_qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the integer codes before storage."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return -qmax, qmax
    return 0, 2 ** bits - 1


def quantize_linear_ref(A: torch.Tensor, bits: int, blocksize: int,
                        symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A: any shape -> (codes, scale fp32 [blocks], zero uint8 [blocks]).

    codes: 8-bit int8 [n] (symmetric) or uint8 [n]; 4-bit packed uint8 [(n+1)//2] (symmetric nibble q + 8).
    zero is the zero point (all 0 when symmetric: the codes are signed).
    """
    flat = A.reshape(-1).float()
    n = flat.numel()
    nb = _blocks(n, blocksize)
    qmin, qmax = linear_qrange(bits, symmetric)
    blocks = torch.nn.functional.pad(flat, (0, nb * blocksize - n)).view(nb, blocksize)
    if symmetric:
        absmax = blocks.abs().amax(dim=1)
        scale = absmax / qmax
        inv = torch.where(absmax > 0, qmax / absmax.clamp(min=ABSMAX_FLOOR), torch.zeros_like(absmax))
        q = torch.clamp(torch.round(blocks * inv.view(-1, 1)), qmin, qmax)
        zero = torch.zeros(nb, dtype=torch.uint8, device=A.device)
    else:
        # The padding zeros of a partial tail block do not change lo/hi: both include 0 anyway.
        lo = blocks.amin(dim=1).clamp(max=0)
        hi = blocks.amax(dim=1).clamp(min=0)
        scale = (hi - lo) / qmax
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero_f = torch.clamp(torch.round(-lo / safe), qmin, qmax)
        q = torch.clamp(torch.round(blocks / safe.view(-1, 1)) + zero_f.view(-1, 1), qmin, qmax)
        zero = zero_f.to(torch.uint8)
    q = q.reshape(-1)[:n].to(torch.int32)
    if bits == 8:
        out = q.to(torch.int8) if symmetric else q.to(torch.uint8)
    else:
        nib = (q + 8 if symmetric else q).to(torch.uint8)
        if n % 2:
            nib = torch.nn.functional.pad(nib, (0, 1), value=8 if symmetric else int(0))
        out = (nib[0::2] << 4) | nib[1::2]
    return out, scale, zero


def dequantize_linear_ref(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, blocksize: int,
                          symmetric: bool, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of quantize_linear_ref: (q - zero) * scale in fp32, rounded once to `dtype`, in `shape`."""
    n = 1
    for s in shape:
        n *= s
    if bits == 8:
        ints = q.reshape(-1).to(torch.int32)
    else:
        ints = unpack_4bit_ref(q, n).to(torch.int32) - (8 if symmetric else 0)
    zeros = torch.repeat_interleave(zero.to(torch.int32), blocksize)[:n]
    values = (ints - zeros).float()
    return _scale_by_block(values, scale, blocksize).to(dtype).reshape(shape)
