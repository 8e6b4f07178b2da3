"""An independent float64 (numpy) implementation of qpeft.optim's update semantics, the oracle of the reference.

Written from the specification (qpeft/reference/optim_8bit.py docstring), not from the reference's code: numpy
float64 arrays, each operation followed by an explicit rounding to fp32 (for + - * / and sqrt, the float64 result
rounded to fp32 is the correctly rounded fp32 result: 53 >= 2*24 + 2 bits), per-element nearest-code search by
bracketing each value between two consecutive codes (np.searchsorted on the code book, not on its midpoints).
"""
from __future__ import annotations

import math

import numpy as np

BLOCK = 256


def r(x):
    """Round float64 values to fp32 (kept as float64)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(x, dtype=np.float64).astype(np.float32).astype(np.float64)


def hyper_adam(lr, step, b1, b2, eps, wd):
    b1, b2 = float(np.float32(b1)), float(np.float32(b2))
    c1 = 1.0 - b1 ** step
    c2 = math.sqrt(1.0 - b2 ** step)
    return [float(r(-lr * c2 / c1)), float(r(eps * c2)), float(r(1.0 - lr * wd))]


def hyper_lion(lr, wd):
    return [float(r(lr)), float(r(1.0 - lr * wd))]


def decode(codes, absmax, qmap):
    codes = np.asarray(codes, dtype=np.int64)
    blk = np.arange(codes.size) // BLOCK
    return r(qmap[codes] * absmax[blk])


def nearest(x, qmap):
    """Index of the nearest code: between the two codes bracketing x, the upper one when x lies above their fp32
    midpoint (ties to the lower one)."""
    lo = np.clip(np.searchsorted(qmap, x, side="right") - 1, 0, qmap.size - 2)
    hi = lo + 1
    mid = r((qmap[lo] + qmap[hi]) / 2)
    return np.where(x > mid, hi, lo)


def encode(s, qmap, signed):
    n = s.size
    blocks = -(-n // BLOCK)
    absmax = np.zeros(blocks)
    codes = np.zeros(n, dtype=np.int64)
    for b in range(blocks):
        seg = s[b * BLOCK:(b + 1) * BLOCK]
        a = np.abs(seg).max()
        absmax[b] = a
        x = r(seg / a) if a > 0 else np.zeros_like(seg)
        c = nearest(x, qmap)
        if signed:
            wrong = (np.signbit(qmap[c]) != np.signbit(seg)) & (seg != 0)
            c = np.where(wrong, np.where(seg > 0, c + 1, c - 1), c)
        codes[b * BLOCK:(b + 1) * BLOCK] = c
    return codes, absmax


def step(kind, p, g, m, v, h, b1, b2):
    """One update of one tensor. p, g, m, v: float64 arrays of fp32 values (v None for lion); h: hyper row.
    Returns (p, m, v) as float64 arrays of fp32 values (p still to be rounded to the parameter dtype)."""
    b1, b2 = float(np.float32(b1)), float(np.float32(b2))
    omb1, omb2 = float(r(1.0 - b1)), float(r(1.0 - b2))
    with np.errstate(over="ignore", invalid="ignore"):
        if kind == "adam":
            s1 = r(r(m * b1) + r(omb1 * g))
            s2 = r(r(v * b2) + r(omb2 * r(g * g)))
            ok = np.isfinite(s1) & np.isfinite(s2)
            s1, s2 = np.where(ok, s1, 0.0), np.where(ok, s2, 0.0)
            upd = r(h[0] * r(s1 / r(r(np.sqrt(s2)) + h[1])))
            new_p = r(r(p + upd) * h[2])
        else:
            u = np.sign(r(r(m * b1) + r(omb1 * g)))
            s1 = r(r(m * b2) + r(omb2 * g))
            ok = np.isfinite(s1)
            s1, s2 = np.where(ok, s1, 0.0), None
            new_p = r(r(p * h[1]) - r(h[0] * u))
    return np.where(ok, new_p, p), s1, s2
