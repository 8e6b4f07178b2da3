"""Auto dispatch of `qpeft::nf4_matmul` (fwd) and `qpeft::nf4_matmul_dx` (dx) on CUDA tensors: which backend
(CUDA C++ or Triton) and which Triton tiles, by direction, M, N, K, dtype and GPU.

Two sources, in this order:

1. A table measured on the GPU (`nf4_matmul_tuned.TABLES`, written by `python -m benchmarks.tune_nf4_matmul`).
   It is looked up by device name, then by compute capability (an H200 can use an H100's table: same sm_90,
   more bandwidth). Per measured weight shape (K, N), per direction, it lists M buckets: the fastest backend
   at that M and, when Triton, the fastest of the candidate tile configurations, with the median ms of every
   candidate kept next to the choice (the measurements behind it). A weight of another shape uses the
   measured shape nearest in log K + log N, if K and N together are within 2x of it (`NEAR_SHAPE_LOG2`); a
   shape further from every measured one keeps the default rule. Only 16-bit activations are tuned (the
   benchmark dtype); fp32 activations keep the default rule.
2. The default rule, reasoned and NOT measured (no GPU was available when it was written):
   - fwd, M <= 16: the CUDA decode kernels (csrc/nf4_gemv.cu): one pass over W with 16-byte evict-first loads;
     the tensor-core one dequantizes into mma.sync fragments through a register code book (the static sm_90
     model, benchmarks/static_sm90.py, Triton 3.9: 0.83-0.97 of the bandwidth floor for K, N >= 4096 at M <= 8,
     0.55-0.89 at M = 9..16; predictions, docs/nf4_matmul_performance.md). Before sm_90 also M = 17..64 for
     fp16 / bf16 with K % 256 == 0 (the tensor-core decode kernel's range).
   - fwd above M = 16, and dx at every M, on sm_90+: Triton, whose tl.dot lowers to wgmma (HGMMA 64x64x16 in the
     offline sm_90 SASS), while the CUDA C++ tiles use mma.sync, which tops out around 75% of Hopper's
     tensor-core peak (fast-kernels.md section 0). At M = 17..256 its register code-book GEMM splits K across
     programs (serial split-K): the model puts it at 1.34-1.54x bf16 cuBLAS at M = 17..64 on 8b q/o, gate/up and
     down, against 1.13-1.18x (M = 17) and 0.27x (M = 64) for the tensor-core decode kernel, which re-reads x
     through L2 per 8 rows and spills in its 8-group form; 8b k/v (N = 1024) 0.99x / 1.08x against 0.54x / 0.28x.

The plan only sets a preference: QPEFT_BACKEND=cuda|triton still forces a backend (`_backend.select`), and a
Triton run always uses the plan's tiles. Lookups are cached per (direction, M, N, K, dtype, device).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _cuda
from .._backend import is_hopper_or_newer

__all__ = ["Plan", "plan", "default_plan", "lookup_tuned", "build_table", "render_tables"]

# fwd on CUDA C++ up to this M on sm_90+ (the SIMT / tensor-core decode kernels, csrc/nf4_gemv.cu: kGemvMaxM);
# Triton above (module docstring). Before sm_90 the CUDA C++ kernels take every M: the tensor-core decode kernel
# (kDecodeMmaMaxM = 64, fp16 / bf16, K % 256 == 0), then the tile GEMM.
DEFAULT_CUDA_GEMV_MAX_M = 16
TUNED_DTYPES = (torch.float16, torch.bfloat16)
# A measured shape stands in for a weight whose |log2 K ratio| + |log2 N ratio| is at most this. A tuned Triton
# config carries the tiles and the split count measured on its own shape: applied much further away it misleads,
# e.g. q/o (4096 -> 4096) at M = 256, 128 x 128 x 128 in 2 splits (64 tiles: 128 programs), on k/v (4096 -> 1024)
# is 16 tiles, 32 programs for 132 SMs, where the default rule plans 128 programs (log distance 2)
NEAR_SHAPE_LOG2 = 1.0


@dataclass(frozen=True)
class Plan:
    backend: str                 # "cuda" or "triton": the preferred backend under QPEFT_BACKEND=auto
    triton_config: dict | None   # Triton tiles (None: the launcher's default for this M)
    source: str                  # "tuned:<table>" or "default": where the choice came from

    def config(self) -> dict | None:
        return None if self.triton_config is None else dict(self.triton_config)


def default_plan(direction: str, M: int, device: torch.device, K: int | None = None,
                 dtype: torch.dtype | None = None, N: int | None = None) -> Plan:
    """The reasoned rule (module docstring). K, dtype and N are the problem's other keys (the tuned tables' and the
    static model's signature); the default rule does not depend on them."""
    hopper = is_hopper_or_newer(device)
    if direction == "fwd":
        backend = "triton" if hopper and M > DEFAULT_CUDA_GEMV_MAX_M else "cuda"
    else:
        backend = "triton" if hopper else "cuda"
    return Plan(backend, None, "default")


def _table_for(tables: dict, name: str, capability: tuple[int, int]) -> tuple[str, dict] | None:
    if name in tables:
        return name, tables[name]
    for key, table in tables.items():
        if tuple(table.get("capability", ())) == tuple(capability):
            return key, table
    return None


def lookup_tuned(tables: dict, name: str, capability: tuple[int, int], direction: str, M: int, N: int,
                 K: int) -> Plan | None:
    """The measured choice for this problem, or None when no table covers this GPU / direction, or no measured
    shape is within `NEAR_SHAPE_LOG2` of (K, N)."""
    found = _table_for(tables, name, capability)
    if found is None:
        return None
    key, table = found
    shapes = table.get(direction)
    if not shapes:
        return None

    def distance(kn):
        return abs(math.log2(kn[0] / K)) + abs(math.log2(kn[1] / N))

    near = min(shapes, key=distance)
    if distance(near) > NEAR_SHAPE_LOG2:
        return None
    buckets = shapes[near]
    entry = next((b for b in buckets if M <= b["max_m"]), buckets[-1])
    return Plan(entry["backend"], entry.get("config"), f"tuned:{key} K={near[0]} N={near[1]} M<={entry['max_m']}")


@_cuda.cached(maxsize=4096)
def _plan_cached(direction: str, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> Plan:
    rt = _cuda.rt
    if rt.is_cuda(device) and dtype in TUNED_DTYPES:
        from . import nf4_matmul_tuned

        index = device.index if device.index is not None else rt.current_device()
        tuned = lookup_tuned(nf4_matmul_tuned.TABLES, rt.device_name(index), rt.capability(index), direction, M,
                             N, K)
        if tuned is not None:
            return tuned
    return default_plan(direction, M, device, K, dtype, N)


def plan(direction: str, M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> Plan:
    """direction "fwd": y (M, N) = x (M, K) @ W^T; "dx": dx (M, K) = dy (M, N) @ W. W is (N, K)."""
    if direction not in ("fwd", "dx"):
        raise ValueError(f"direction must be 'fwd' or 'dx', got {direction!r}")
    return _plan_cached(direction, int(M), int(N), int(K), dtype, device)


# ---------------------------------------------------------------- building the table from measurements
def build_table(rows: list[dict], capability: tuple[int, int], measured: str) -> dict:
    """One device's table from benchmark rows (benchmarks/tune_nf4_matmul.py).

    rows: dicts with dir ("fwd"/"dx"), K, N, M, candidate (a name), backend ("cuda"/"triton", or None for a
    context-only row such as dense cuBLAS), config (Triton tiles or None) and ms (median; inf when the
    candidate failed). Per (dir, K, N, M) the fastest candidate with a backend wins; consecutive M with the
    same winner merge into one bucket, whose "ms" keeps every candidate's time at every M it covers."""
    table: dict = {"capability": tuple(capability), "measured": measured, "fwd": {}, "dx": {}}
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["dir"], int(r["K"]), int(r["N"])), {}).setdefault(int(r["M"]), []).append(r)
    for (direction, K, N), by_m in sorted(groups.items()):
        buckets: list[dict] = []
        for M in sorted(by_m):
            usable = [r for r in by_m[M] if r["backend"] is not None and math.isfinite(r["ms"])]
            if not usable:
                continue
            best = min(usable, key=lambda r: r["ms"])
            times = {r["candidate"]: (round(float(r["ms"]), 5) if math.isfinite(r["ms"]) else None)
                     for r in by_m[M]}
            config = dict(best["config"]) if best["config"] else None
            if buckets and buckets[-1]["backend"] == best["backend"] and buckets[-1]["config"] == config:
                buckets[-1]["max_m"] = M
                buckets[-1]["ms"][M] = times
            else:
                buckets.append({"max_m": M, "backend": best["backend"], "config": config, "ms": {M: times}})
        if buckets:
            table[direction][(K, N)] = buckets
    return table


def render_tables(tables: dict) -> str:
    """Source of nf4_matmul_tuned.py for `tables` ({device name: table})."""
    import pprint

    header = '''"""Measured dispatch tables for qpeft::nf4_matmul / nf4_matmul_dx (read by nf4_matmul_dispatch.py).

GENERATED by `python -m benchmarks.tune_nf4_matmul --write` on a GPU; do not edit by hand. Each table:
  TABLES[device name] = {
      "capability": (major, minor), "measured": "<date, torch, triton, CUDA, qpeft git revision>",
      "fwd" | "dx": {(K, N): [{"max_m": M, "backend": "cuda" | "triton", "config": {...} | None,
                              "ms": {M: {candidate: median ms, ...}}}, ...]},
  }
A bucket serves every M up to its max_m (and the last one every larger M); "ms" holds the measurements behind
the choice (None: the candidate failed to compile or run at that size).
"""

'''
    return header + "TABLES: dict = " + pprint.pformat(tables, width=116, sort_dicts=False) + "\n"
