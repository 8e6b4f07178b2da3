"""Triton multi-tensor optimizer update (qpeft::optim_8bit_step), bit-identical to
qpeft.reference.optim_8bit (see its docstring for the semantics, which are bitsandbytes' CUDA kernels').

One launch updates every tensor of a call that shares a parameter dtype: a LoRA model has hundreds of small
tensors (448 for Llama-8B all-linear r=16), and bitsandbytes launches a kernel and synchronizes the device once
per tensor. The launcher writes a table of per-tensor pointers (int64 addresses) and the first block of each
tensor; program b finds its tensor by a binary search over those starts (ceil(log2(T + 1)) loads, 9 for 448
tensors), so the grid is the total number of 256-element blocks and no tensor gets a launch of its own.

Each program owns one 256-element block: it loads p, g and the states, updates in fp32, reduces the new absmax
of the block (tl.max over 256 values in registers), requantizes (8-step binary search over the midpoints padded
to 256 with +inf) and stores. fp32 states (tensors below min_8bit_size) use the same kernel with QUANT=False.
Bit-exactness with the reference: IEEE division and square root (div_rn / sqrt_rn; Triton's plain `/` and
tl.sqrt are approximate on NVIDIA GPUs) and the launch option enable_fp_fusion=False, without which the
multiply-adds of the moment updates would be contracted into FMAs (one rounding instead of two).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qpeft import _cuda
from qpeft.reference.optim_8bit import BLOCKSIZE, midpoints

__all__ = ["optim_8bit_step_triton"]

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# meta table columns (int64): addresses of p, g, state1, state2, absmax1, absmax2, numel, row of hyper
_META_COLS = 8


@triton.jit
def _isfinite(x):
    return (x == x) & (tl.abs(x) < float("inf"))


@triton.jit
def _requantize(s, mid_ptr, qmap_ptr, inb, SIGNED: tl.constexpr):
    """fp32 block [BLOCK] -> (codes int32 [BLOCK], absmax scalar) as reference.quantize_state."""
    amax = tl.max(tl.where(inb, tl.abs(s), 0.0), axis=0)
    safe = tl.where(amax > 0, amax, 1.0)
    scaled = tl.where(amax > 0, tl.math.div_rn(s, safe), 0.0)
    pos = tl.zeros(s.shape, dtype=tl.int32)
    for k in tl.static_range(8):  # steps 128, 64, ..., 1: pos = number of midpoints < scaled
        m = tl.load(mid_ptr + pos + ((128 >> k) - 1))
        pos += tl.where(scaled > m, 128 >> k, 0)
    if SIGNED:  # bnb's sign fix: a non-zero m never decodes to the opposite sign
        qv = tl.load(qmap_ptr + pos)
        flip = ((qv.to(tl.int32, bitcast=True) < 0) != (s.to(tl.int32, bitcast=True) < 0)) & (s != 0)
        pos = tl.where(flip, tl.where(s > 0, pos + 1, pos - 1), pos)
    return pos, amax


@triton.jit
def _optim_8bit_step_kernel(
    # per-tensor table: meta int64 [T, 8], starts int64 [T + 1] (first block of each tensor; starts[T] = total)
    meta_ptr, starts_ptr, hyper_ptr, T,
    # code books (fp32 [256]) and their midpoints padded with +inf (fp32 [256])
    qmap1_ptr, qmap2_ptr, mid1_ptr, mid2_ptr,
    # fp32 scalars of the group
    beta1, beta2,
    # meta
    P_DTYPE: tl.constexpr, QUANT: tl.constexpr, LION: tl.constexpr, LOG_T: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    lo = tl.zeros([], dtype=tl.int64)
    hi = lo + T
    for _ in tl.static_range(LOG_T):  # invariant: starts[lo] <= pid < starts[hi]
        mid = (lo + hi) // 2
        go = tl.load(starts_ptr + mid) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    t = lo
    row = meta_ptr + t * 8
    n = tl.load(row + 6)
    blk = pid - tl.load(starts_ptr + t)
    offs = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inb = offs < n
    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(P_DTYPE))
    p = tl.load(p_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    hrow = hyper_ptr + tl.load(row + 7) * 4  # the tensor's row of hyper (a call may mix parameter dtypes)
    h0 = tl.load(hrow)
    h1 = tl.load(hrow + 1)
    h2 = tl.load(hrow + 2)
    omb1 = 1.0 - beta1
    omb2 = 1.0 - beta2
    if QUANT:
        c1_ptr = tl.load(row + 2).to(tl.pointer_type(tl.uint8))
        a1_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        c1 = tl.load(c1_ptr + offs, mask=inb, other=0).to(tl.int32)
        m = tl.load(qmap1_ptr + c1) * tl.load(a1_ptr + blk)
    else:
        m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        m = tl.load(m_ptr + offs, mask=inb, other=0.0)
    if LION:
        u = m * beta1 + omb1 * g
        sgn = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0))  # a NaN u only comes with ok = False
        s1 = m * beta2 + omb2 * g
        ok = _isfinite(s1)
        s1 = tl.where(ok, s1, 0.0)
        new_p = p * h1 - h0 * sgn
        s2 = s1  # unused
    else:
        if QUANT:
            c2_ptr = tl.load(row + 3).to(tl.pointer_type(tl.uint8))
            a2_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
            c2 = tl.load(c2_ptr + offs, mask=inb, other=0).to(tl.int32)
            v = tl.load(qmap2_ptr + c2) * tl.load(a2_ptr + blk)
        else:
            v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
            v = tl.load(v_ptr + offs, mask=inb, other=0.0)
        s1 = m * beta1 + omb1 * g
        s2 = v * beta2 + omb2 * (g * g)
        ok = _isfinite(s1) & _isfinite(s2)
        s1 = tl.where(ok, s1, 0.0)
        s2 = tl.where(ok, s2, 0.0)
        new_p = (p + h0 * tl.math.div_rn(s1, tl.sqrt_rn(s2) + h1)) * h2
    tl.store(p_ptr + offs, new_p.to(P_DTYPE), mask=inb & ok)
    if QUANT:
        q1, amax1 = _requantize(s1, mid1_ptr, qmap1_ptr, inb, True)
        tl.store(c1_ptr + offs, q1.to(tl.uint8), mask=inb)
        tl.store(a1_ptr + blk, amax1)
        if not LION:
            q2, amax2 = _requantize(s2, mid2_ptr, qmap2_ptr, inb, False)
            tl.store(c2_ptr + offs, q2.to(tl.uint8), mask=inb)
            tl.store(a2_ptr + blk, amax2)
    else:
        tl.store(m_ptr + offs, s1, mask=inb)
        if not LION:
            tl.store(v_ptr + offs, s2, mask=inb)


_CAPTURED_TABLES: list[tuple[torch.Tensor, torch.Tensor]] = []


def _padded_midpoints(qmap: torch.Tensor) -> torch.Tensor:
    return torch.cat([midpoints(qmap), qmap.new_full((1,), float("inf"))])


# 256 elements per program = one quantization block; 2 warps = 4 elements per thread (untuned: tuning on an
# H100 is owed).
NUM_WARPS = 2


def optim_8bit_step_triton(params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2, hyper, beta1: float,
                           beta2: float, optimizer: str) -> None:
    """Inputs as qpeft::optim_8bit_step (checked there); launches once per parameter dtype on the current stream."""
    lion = optimizer == "lion"
    quant = len(absmax1) > 0
    dev = params[0].device
    mid1, mid2 = _padded_midpoints(qmap1), _padded_midpoints(qmap2)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(p.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        rows, starts, total = [], [], 0
        for i in idx:
            n = params[i].numel()
            rows.append([params[i].data_ptr(), grads[i].data_ptr(), state1[i].data_ptr(),
                         state2[i].data_ptr() if not lion else 0,
                         absmax1[i].data_ptr() if quant else 0,
                         absmax2[i].data_ptr() if (quant and not lion) else 0, n, i])
            starts.append(total)
            total += -(-n // BLOCKSIZE)
        starts.append(total)
        # the table is built on the host and copied without a host sync (pinned memory, non_blocking)
        meta = torch.tensor(rows, dtype=torch.int64)
        st = torch.tensor(starts, dtype=torch.int64)
        if _cuda.rt.is_cuda(dev):
            meta, st = _cuda.rt.pin(meta), _cuda.rt.pin(st)
            if _cuda.rt.is_capturing():
                # a CUDA graph replays these copies from the same host addresses: keep the buffers for good
                # (torch >= 2.11's host allocator also never recycles blocks used in a capture; 72 B per tensor)
                _CAPTURED_TABLES.append((meta, st))
            meta = meta.to(dev, non_blocking=True)
            st = st.to(dev, non_blocking=True)
        log_t = max(1, (len(idx)).bit_length())
        _optim_8bit_step_kernel[(total,)](
            meta, st, hyper, len(idx),
            qmap1, qmap2, mid1, mid2,
            beta1, beta2,
            P_DTYPE=_TL_DTYPES[dtype], QUANT=quant, LION=lion, LOG_T=log_t, BLOCK=BLOCKSIZE,
            num_warps=NUM_WARPS, enable_fp_fusion=False,
        )
