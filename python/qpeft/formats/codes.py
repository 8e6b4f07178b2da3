"""Code books (lookup tables) of the blockwise quantizers, bit-identical to bitsandbytes'.

Every function returns a fresh fp32 tensor on `device` (default CPU), indexed by the stored code:
- `nf4()` / `fp4()`: 16 entries for the 4-bit types (FP4 in bit-pattern order, not sorted);
- `dynamic_map()`: the signed 256-entry dynamic code used for 8-bit blockwise and double quantization;
- `normal_map(offset)`: the normal-quantile construction behind NF4 (256 entries, zero padded);
- `quantile_code(x, bits)`: a code book estimated from data by equal-mass quantiles.
A code book used for quantization must be sorted ascending and lie in [-1, 1] (the quantizers scale each
block by its absmax into [-1, 1] and round to the nearest entry); `fp4()` is the one exception, and is
handled through `FP4_SORTED_CODES`.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["nf4", "fp4", "dynamic_map", "normal_map", "quantile_code", "sorted_codebook"]

# NF4 as hard-coded in bitsandbytes (functional.get_4bit_type, kernels.cu nf4_dequantization_lut). It was
# computed once in fp32 torch; recomputing it in float64 moves entries by ~1e-7, so the table is used as is
# (bitsandbytes issue #1772).
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

# FP4 (E2M1, exponent bias 2) raw values of the 3 magnitude bits in bit-pattern order; bit 3 is the sign.
# bitsandbytes writes code 8 as the integer -0, i.e. +0.0, so no negative zero appears in the table.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

# The FP4 codes listed in ascending order of their values: quantizing finds the position among the sorted
# values and stores FP4_SORTED_CODES[position]. Codes 0 and 8 are both 0.0; this order (0 before 8) is what
# torch.argsort gives for bitsandbytes' table on CPU, so x in (-1/384, 0] -> code 0 and (0, 1/384] -> code 8.
FP4_SORTED_CODES = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)


def nf4(device=None) -> torch.Tensor:
    """The 16 NormalFloat-4 values (sorted, code 7 = 0.0, endpoints +-1.0), fp32."""
    return torch.tensor(_NF4, dtype=torch.float32, device=device)


def fp4(device=None) -> torch.Tensor:
    """The 16 FP4 values in bit-pattern order: raw E2M1 values / 12 in fp32 (code 1 = 1/192)."""
    raw = torch.tensor(_FP4_RAW, dtype=torch.float32, device=device)
    return raw / 12.0  # fp32 division, as bitsandbytes' data.div_(data.abs().max())


def sorted_codebook(quant_type: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values in ascending order, the code stored for each position) of a 4-bit type."""
    if quant_type == "nf4":
        return nf4(device), torch.arange(16, dtype=torch.uint8, device=device)
    if quant_type == "fp4":
        order = torch.tensor(FP4_SORTED_CODES, dtype=torch.long, device=device)
        return fp4(device)[order], order.to(torch.uint8)
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8, device=None) -> torch.Tensor:
    """The dynamic (tree) 8-bit code (Dettmers 2015), bit-identical to bnb's `create_dynamic_map`.

    Signed default: for exponent i = 0..6, the 2^i midpoints of linspace(0.1, 1, 2^i + 1) (fp32) scaled by
    10^(i-6), with both signs, plus 0 and 1.0; sorted. code[127] = 0, code[255] = 1, code[0] = -0.99297.
    """
    # built once per argument set (building it takes ~1.5 ms of Python, every double-quantized layer needs it)
    return _dynamic_map_cpu(signed, max_exponent_bits, total_bits).to(device, copy=True)


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(signed: bool, max_exponent_bits: int, total_bits: int) -> torch.Tensor:
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else \
            2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        bounds = torch.linspace(0.1, 1, int(items), dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()  # fp32 tensor times a Python scalar: the same fp32 rounding as bnb
        if signed:
            data += (-scale * means).tolist()
    if additional_items > 0:
        bounds = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    if len(data) != 2 ** total_bits:
        raise ValueError(f"dynamic_map: {len(data)} values for total_bits={total_bits}; "
                         f"max_exponent_bits={max_exponent_bits} does not fit")
    data += [0.0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def normal_map(offset: float = 0.9677083, use_extra_value: bool = True, device=None) -> torch.Tensor:
    """The NormalFloat construction (QLoRA): normal quantiles at equal-mass points, scaled to [-1, 1].

    With `use_extra_value` (NF4): 8 positive quantiles norm.ppf(linspace(offset, 0.5, 9)[:-1]) and 7 negative
    ones -norm.ppf(linspace(offset, 0.5, 8)[:-1]), plus zeros up to 256 entries, sorted and divided by the
    maximum; the 16 NF4 values are code[:8] and code[-8:]. Otherwise 7 + 7 symmetric values. `offset` is the
    outermost quantile: norm.ppf(0.9677083) = 1.848 standard deviations. Matches bnb's `create_normal_map`
    (torch.special.ndtri instead of scipy's norm.ppf: the same Cephes algorithm in float64).
    """
    if not 0.5 < offset < 1.0:
        raise ValueError(f"normal_map: offset must be in (0.5, 1), got {offset}")
    pos = 9 if use_extra_value else 8
    v1 = torch.special.ndtri(torch.linspace(offset, 0.5, pos)[:-1].double()).tolist()
    v3 = (-torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())).tolist()
    zeros = [0.0] * (256 - (pos - 1) - 7)
    values = torch.tensor(v1 + zeros + v3, dtype=torch.float32).sort().values
    values /= values.max()
    return values.to(device)


def quantile_code(x: torch.Tensor, bits: int = 8, device=None) -> torch.Tensor:
    """A code book of 2^bits values fitted to the data `x` by equal-mass quantiles, usable as `code` of
    `qpeft.quantize_blockwise` (sorted ascending, max |value| = 1).

    Like bnb's `create_quantile_map`: 2^bits - 1 quantiles of x at the centres of equal-probability bins,
    (j + 0.5) / (2^bits - 1), plus an exact 0 (so zeros stay exact), sorted and divided by the largest
    magnitude. NF4 is this construction with the normal distribution's quantiles instead of the data's.
    For more than 2^24 values a deterministic strided subsample is used (torch.quantile's size limit).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"quantile_code: x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"quantile_code: bits must be an int in 1..8, got {bits!r}")
    flat = x.detach().reshape(-1).double()
    if flat.numel() == 0:
        raise ValueError("quantile_code: x is empty")
    if not torch.isfinite(flat).all():
        raise ValueError("quantile_code: x has non-finite values (inf/nan)")
    limit = 1 << 24
    if flat.numel() > limit:
        flat = flat[:: -(-flat.numel() // limit)]
    k = 2 ** bits - 1
    probs = (torch.arange(k, dtype=torch.float64, device=flat.device) + 0.5) / k
    q = torch.quantile(flat, probs)
    values = torch.cat([q, q.new_zeros(1)]).sort().values
    top = values.abs().max()
    if top == 0:
        raise ValueError("quantile_code: x is all zeros; no scale to fit")
    return (values / top).float().to(device if device is not None else x.device)
