"""A numpy emulator of the few PTX instructions that qpeft's inline-assembly snippets use, so that a CPU test runs
the exact text a kernel compiles (no GPU here, and the Triton interpreter cannot run inline assembly).

Semantics from the PTX ISA (8.x): prmt.b32 (default mode: selector nibble i picks byte i of the result from the 8
bytes {b, a}, a = bytes 0-3; bit 3 of the nibble replicates the picked byte's sign bit), and/sub/mul.hi/mad.hi
on 32-bit unsigned values, mul.rn.f32 (IEEE binary32, round to nearest even), cvt.rn.{bf16x2,f16x2}.f32 d, a, b
(d's high half = a, low half = b, each rounded to nearest even), mov.b32 {lo, hi}, r (split into 16-bit halves).
Anything else raises: an unknown instruction is never skipped.
"""
from __future__ import annotations

import re

import numpy as np
import torch

_MASK32 = np.uint64(0xFFFFFFFF)


def _u32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.uint64) & _MASK32


def _f32_bits(x: np.ndarray) -> np.ndarray:
    return _u32(np.asarray(x, dtype=np.float32).view(np.uint32))


def _bits_f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.uint64).astype(np.uint32).view(np.float32)


def _round16(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float32 values -> the 16-bit patterns of `dtype` (torch rounds to nearest even)."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dtype)
    return _u32(t.view(torch.int16).numpy().astype(np.int64) & 0xFFFF)


def prmt(a: np.ndarray, b: np.ndarray, sel) -> np.ndarray:
    """PTX prmt.b32 (generic mode), elementwise on uint32 arrays: result byte i = byte (s & 7) of {b, a}
    (a = bytes 0-3), or that byte's sign bit replicated when s & 8, with s = nibble i of sel."""
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    sel = np.asarray(sel, dtype=np.uint64)
    both = a | (b << np.uint64(32))
    out = np.zeros(np.broadcast(a, b, sel).shape, dtype=np.uint64)
    for i in range(4):
        s = (sel >> np.uint64(4 * i)) & np.uint64(0xF)
        byte = (both >> ((s & np.uint64(7)) * np.uint64(8))) & np.uint64(0xFF)
        sign = np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0))
        byte = np.where(s & np.uint64(8), sign, byte)
        out |= byte << np.uint64(8 * i)
    return out.astype(np.uint32)


def _split_operands(text: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def run_ptx(asm: str, inputs: dict[int, np.ndarray], n_outputs: int) -> list[np.ndarray]:
    """Run `asm` on arrays: inputs[$k] are 32-bit patterns (uint32-valued arrays; float inputs as their bits).
    Returns the output operands $0..$n_outputs-1 (their bit patterns, 16-bit ones zero-extended)."""
    regs: dict[str, np.ndarray] = {f"${k}": _u32(v) for k, v in inputs.items()}

    def val(op: str) -> np.ndarray:
        if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", op):
            return _u32(int(op, 0) & 0xFFFFFFFF)
        if op not in regs:
            raise KeyError(f"PTX operand {op!r} read before it is written")
        return regs[op]

    body = asm.replace("{\n", "\n").strip()
    for raw in body.split(";"):
        line = raw.strip().strip("{}").strip()
        if not line or line.startswith(".reg"):
            continue
        opcode, _, rest = line.partition(" ")
        ops = _split_operands(rest)
        if opcode == "and.b32":
            regs[ops[0]] = val(ops[1]) & val(ops[2])
        elif opcode == "sub.u32":
            regs[ops[0]] = (val(ops[1]) - val(ops[2])) & _MASK32
        elif opcode == "mul.hi.u32":
            regs[ops[0]] = (val(ops[1]) * val(ops[2])) >> np.uint64(32)
        elif opcode == "mad.hi.u32":
            regs[ops[0]] = (((val(ops[1]) * val(ops[2])) >> np.uint64(32)) + val(ops[3])) & _MASK32
        elif opcode == "prmt.b32":
            regs[ops[0]] = _u32(prmt(val(ops[1]), val(ops[2]), val(ops[3])))
        elif opcode == "mul.rn.f32":
            regs[ops[0]] = _f32_bits(_bits_f32(val(ops[1])) * _bits_f32(val(ops[2])))
        elif opcode in ("cvt.rn.bf16x2.f32", "cvt.rn.f16x2.f32"):
            dt = torch.bfloat16 if "bf16" in opcode else torch.float16
            hi, lo = _round16(_bits_f32(val(ops[1])), dt), _round16(_bits_f32(val(ops[2])), dt)
            regs[ops[0]] = (hi << np.uint64(16)) | lo
        elif opcode == "mov.b32" and ops[0].startswith("{"):
            lo_name, hi_name = (s.strip() for s in ops[0].strip("{}").split(","))
            v = val(ops[1])
            regs[lo_name], regs[hi_name] = v & np.uint64(0xFFFF), v >> np.uint64(16)
        else:
            raise NotImplementedError(f"PTX instruction not emulated: {line!r}")
    return [regs[f"${k}"] for k in range(n_outputs)]
