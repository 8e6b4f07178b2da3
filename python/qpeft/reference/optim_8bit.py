"""Pure-PyTorch multi-tensor optimizer update of qpeft.optim: the CPU path, the fallback and the oracle.

One semantics on every device and backend: bitsandbytes' CUDA kernels' (kOptimizerStatic8bit{2,1}State-
Blockwise, kOptimizer32bit2State), with the non-finite guard on every optimizer. Per element, in fp32:

  adam (2 states):  s1 = m_old * b1 + (1 - b1) * g
                    s2 = v_old * b2 + (1 - b2) * (g * g)
                    p  = (p + step_size * (s1 / (sqrt(s2) + eps_c2))) * decay
  lion (1 state):   u  = sign(m_old * b1 + (1 - b1) * g)
                    p  = p * decay - lr * u
                    s1 = m_old * b2 + (1 - b2) * g
  guard:            where s1 or s2 is not finite (a NaN/Inf gradient, or g*g overflowing fp32 above 1.8e19):
                    that element's states become 0 and its parameter is left untouched (not decayed either)

Every operation is one fp32 rounding in the order written (no FMA: the kernels forbid contraction), the
hyper-parameters come per tensor from `hyper` (T, 4) fp32, computed once on the host in float64
(`adam_hyper` / `lion_hyper`), so every backend reads the same fp32 scalars:
  adam: [step_size = -lr * c2 / c1, eps_c2 = eps * c2, decay = 1 - lr * wd, 0], c1 = 1 - b1^t, c2 = sqrt(1 - b2^t)
  lion: [lr, decay = 1 - lr * wd, 0, 0]
decay = 1 - lr*wd is applied after the Adam step as in bnb's CUDA kernel (bnb's CPU path applies it before), and
before the Lion step as in bnb's Lion kernel. b1, b2 are fp32 values; 1 - b is computed in fp32.

States: fp32 tensors (shape of the parameter), or 8-bit: uint8 codes (shape of the parameter) with one fp32
absmax per block of 256 consecutive elements (the last block may be partial), decoded as qmap[code] * absmax.
Requantization after the update, per block: absmax = max |s| over the block (0 if the block is all zero), and
the code is the number of fp32 code-book midpoints (qmap[i] + qmap[i+1]) / 2 strictly below s / absmax (IEEE
division; 0 when absmax is 0): the nearest code, ties to the lower one. Sign fix of the signed map (m): where
qmap[code] and s (non-zero) differ in sign bit, the code moves one step towards s (bnb's CUDA kernel; its CPU
path has no such fix and rounds through a 65536-bin table instead).
"""
from __future__ import annotations

import math

import numpy as np
import torch

BLOCKSIZE = 256  # bitsandbytes' blockwise optimizer block (0.44+)
OPTIMIZERS = ("adam", "lion")


def f32(x: float) -> float:
    """x rounded to the nearest fp32 value (as a Python float)."""
    return float(np.float32(x))


def adam_hyper(lr: float, step: int, beta1: float, beta2: float, eps: float, weight_decay: float) -> list[float]:
    """[step_size, eps_c2, decay, 0] of one tensor, from float64 on the host (the same on every backend)."""
    c1 = 1.0 - f32(beta1) ** step
    c2 = math.sqrt(1.0 - f32(beta2) ** step)
    return [f32(-lr * c2 / c1), f32(eps * c2), f32(1.0 - lr * weight_decay), 0.0]


def lion_hyper(lr: float, weight_decay: float) -> list[float]:
    """[lr, decay, 0, 0] of one tensor."""
    return [f32(lr), f32(1.0 - lr * weight_decay), 0.0, 0.0]


def hyper_table(optimizer: str, lr, step: torch.Tensor, beta1: float, beta2: float, eps: float,
                weight_decay: float) -> torch.Tensor:
    """The (T, 4) fp32 `hyper` table of T tensors, computed with torch ops on `step`'s device (what the optimizer
    classes pass to the op; adam_hyper / lion_hyper are the same formulas on Python floats).

    step: int64 (T,) step counts (>= 1) on the device; lr: a Python float or a 0-dim / (T,) float tensor on that
    device. Every input of the arithmetic is a device tensor or a Python constant, so the table can be computed
    inside a CUDA graph: a replay reads the steps and the learning rate from device memory, where the optimizer
    increments them and a scheduler fills them in place (capturable=True), instead of a host table frozen at
    capture time. One code path for every mode: a capturable and a non-capturable optimizer build their tables
    with the same kernels from the same float64 values, so they update bit-identically."""
    t = step.to(torch.float64)
    lr = lr.to(device=t.device, dtype=torch.float64) if isinstance(lr, torch.Tensor) else lr
    lr_t = torch.zeros_like(t) + lr  # (T,) float64, whatever lr's shape
    if optimizer == "lion":
        zero = torch.zeros_like(t)
        return torch.stack([lr_t, 1.0 - lr_t * weight_decay, zero, zero], dim=1).float()
    c1 = 1.0 - torch.pow(f32(beta1), t)
    c2 = torch.sqrt(1.0 - torch.pow(f32(beta2), t))
    return torch.stack([(-lr_t * c2) / c1, eps * c2, 1.0 - lr_t * weight_decay, torch.zeros_like(t)], dim=1).float()


def midpoints(qmap: torch.Tensor) -> torch.Tensor:
    """The 255 fp32 midpoints of a sorted 256-entry code book."""
    return (qmap[:-1] + qmap[1:]) / 2


def _per_block(values: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """absmax[i // 256] laid out like `values` (flat, n)."""
    return absmax.repeat_interleave(BLOCKSIZE)[: values.numel()]


def dequantize_state(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """uint8 codes (any shape) -> fp32 flat qmap[code] * absmax[block]."""
    flat = codes.reshape(-1)
    return qmap[flat.long()] * _per_block(flat, absmax)


def quantize_state(s: torch.Tensor, qmap: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 flat state -> (uint8 codes [n], absmax fp32 [blocks]) with the rounding described above."""
    n = s.numel()
    blocks = -(-n // BLOCKSIZE)
    padded = torch.nn.functional.pad(s.abs(), (0, blocks * BLOCKSIZE - n))
    absmax = padded.view(blocks, BLOCKSIZE).amax(dim=1)
    scale = _per_block(s, absmax)
    scaled = torch.where(scale > 0, s / torch.where(scale > 0, scale, 1.0), 0.0)
    code = torch.bucketize(scaled, midpoints(qmap), right=False)  # number of midpoints strictly below
    if signed:
        flip = (torch.signbit(qmap[code]) != torch.signbit(s)) & (s != 0)
        code = torch.where(flip, code + torch.where(s > 0, 1, -1), code)
    return code.to(torch.uint8), absmax


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """IEEE (correctly rounded) fp32 square root. torch's fp32 CPU sqrt is not: on an AVX512 machine 16.5% of
    1e6 random inputs differed by one ulp from numpy's sqrt. The fp64 root rounded to fp32 is exact (53 >= 2*24+2
    bits, so the double rounding is innocuous), matching sqrt.rn on the GPUs."""
    return torch.sqrt(x.double()).float()


def optim_8bit_step_ref(params: list[torch.Tensor], grads: list[torch.Tensor], state1: list[torch.Tensor],
                        state2: list[torch.Tensor], absmax1: list[torch.Tensor], absmax2: list[torch.Tensor],
                        qmap1: torch.Tensor, qmap2: torch.Tensor, hyper: torch.Tensor, beta1: float, beta2: float,
                        optimizer: str) -> None:
    """In-place update of every tensor of the lists (see the module docstring); absmax lists empty = fp32 states."""
    quantized = len(absmax1) > 0
    b1 = torch.tensor(beta1, dtype=torch.float32)
    b2 = torch.tensor(beta2, dtype=torch.float32)
    omb1, omb2 = 1 - b1, 1 - b2  # fp32 subtractions
    hyper = hyper.to(torch.float32)
    for i, p in enumerate(params):
        g = grads[i].reshape(-1).float()
        p32 = p.reshape(-1).float()
        h = hyper[i]
        if quantized:
            m = dequantize_state(state1[i], absmax1[i], qmap1)
        else:
            m = state1[i].reshape(-1)
        if optimizer == "adam":
            v = dequantize_state(state2[i], absmax2[i], qmap2) if quantized else state2[i].reshape(-1)
            s1 = m * b1 + omb1 * g
            s2 = v * b2 + omb2 * (g * g)
            ok = torch.isfinite(s1) & torch.isfinite(s2)
            s1 = torch.where(ok, s1, 0.0)
            s2 = torch.where(ok, s2, 0.0)
            new_p = (p32 + h[0] * (s1 / (_sqrt_rn(s2) + h[1]))) * h[2]
        else:
            u = torch.sign(m * b1 + omb1 * g)
            s1 = m * b2 + omb2 * g
            ok = torch.isfinite(s1)
            s1 = torch.where(ok, s1, 0.0)
            s2 = None
            new_p = p32 * h[1] - h[0] * u
        p.view(-1).copy_(torch.where(ok, new_p, p32))
        if quantized:
            c1, a1 = quantize_state(s1, qmap1, signed=True)
            state1[i].view(-1).copy_(c1)
            absmax1[i].copy_(a1)
            if s2 is not None:
                c2, a2 = quantize_state(s2, qmap2, signed=False)
                state2[i].view(-1).copy_(c2)
                absmax2[i].copy_(a2)
        else:
            state1[i].view(-1).copy_(s1)
            if s2 is not None:
                state2[i].view(-1).copy_(s2)
