"""Static sm_90 performance model of the NF4 matmul paths: predictions from the compiled code, no GPU.

For each NF4 path (the CUDA C++ kernels of csrc/ and the Triton kernels), each Llama-3-8B / 70B layer shape, each
M in MS, forward (y = x W^T) and input gradient (dx = dy W), it compiles for sm_90 exactly the kernels the path
launches (nvcc -cubin for csrc/, triton.compile of the recorded launches for Triton), reads their SASS and reports
per launch: main-loop instructions per decoded weight (by issue pipe), load widths, where the code book is read,
the MMA kind, registers, shared memory, occupancy, waves; then the issue-bound and latency-bound ceilings, the
predicted time as a fraction of the bandwidth floor (M <= 16) or as a speed ratio to bf16 cuBLAS (M >= 17 and
every dx), and what bounds it (L2, DRAM, SM issue or SM latency). `dispatched` marks the path the auto dispatch
picks on an H100 (qpeft/ops/nf4_matmul_dispatch.py with the device reported as sm_90).

    python -m benchmarks.static_sm90 [--shapes 8b|70b|all] [--paths dispatched|all] [--out DIR]
    python -m benchmarks.static_sm90 --calibrate measured.csv   # compare with a GPU run (tests/run_gpu.sh quick)
    python -m benchmarks.static_sm90 --sweep-l2 5.5,6.5,8,10,12  # targets met at each assumed L2 bandwidth (TB/s)
    python -m benchmarks.static_sm90 --l2-bandwidth 8 --tag l2-8  # the whole model at a calibrated L2 bandwidth

Results: benchmarks/results/sm90-static/static_sm90_triton<ver>.csv and .md (one pair per Triton version: run it
in both test lanes).

The model (every number an assumption until a GPU calibrates it; `--calibrate` reports measured / predicted):
- H100 SXM: 132 SMs at 1.755 GHz (the clock the issue's budget uses; the SXM part boosts to 1.98 GHz but
  sustains less under load, and a lower clock only tightens the instruction budget), 4 schedulers per SM issuing
  one warp-instruction per clock each, 65,536 registers, 228 KB shared memory, 64 warps and 32 CTAs per SM.
- Memory: 3.02 TB/s (the copy bandwidth measured in ../shared/reference/performance.md) = 13.0 B/clk/SM, i.e.
  25.3 NF4 weights (0.516 B each with double quant) per clock per SM at the floor. A global load served by HBM
  releases its scoreboard 900 cycles after issue under load, an L2 hit 300, shared memory 30 (`Latencies`).
  Operands re-read by several CTAs (x per row tile of W, W per M tile) come from L2 at 6.5 TB/s (measurements of
  L2 bandwidth on H100 range 5.5 (PCIe, 114 SMs) to ~12 TB/s; no reuse between co-resident CTAs is assumed).
- Pipes (thread-ops/clk/SM, sass_sm90.PIPE_RATES): fp32 FMA 128, IMAD 64 (sharing the 128 FMA slots), ALU 64
  (LOP3/IADD3/SHF/PRMT/ISETP/SEL/MOV/LEA), conversions (F2F/F2FP/I2F) and MUFU 16, shuffles 32, L1 / shared data
  path 128 B/clk (a 128-bit load of 32 lanes = 4 clocks).
- Tensor cores: dense bf16 4096 FLOP/clk/SM (2048 MAC). bf16 cuBLAS is modelled at its measured 700 TFLOP/s
  (= 73.8% of that peak at 1.755 GHz) and HGMMA kernels at the same efficiency; mma.sync (HMMA) at 0.66 of it
  (published microbenchmarks put Hopper's mma.sync at about two-thirds of wgmma; fast-kernels.md: "mma.sync tops
  out around 75%").
- A launch's time: the longest of the DRAM time of its unique bytes, the L2 time of its re-reads, and the busiest
  SM's main-loop passes (ceil(CTAs / 132) per wave, waves of 132 x occupancy) at min(issue-bound rate,
  latency-bound rate) per SM; plus one HBM latency of ramp. Issue-bound rate: one pass per max(dispatch =
  instructions / 4, per-pipe cycles, tensor cycles). Latency-bound rate: resident warps / cycles of one warp's
  pass alone (sass_sm90.simulate: in-order issue, the scoreboard waits and stall counts of the SASS).
  Dequantization and MMA overlap (max, not sum) when an SM holds two or more warps per scheduler; the busiest
  SM's work includes the zero-padding of partial tiles.
- Serial split-K (the Triton forward with 16-bit activations, SPLIT_K > 1; dx: SPLIT_N > 1 splits its N reduction):
  every split writes its fp32 partial tile and the last one reads them all back (2 x splits x the output's
  elements x 4 bytes through L2; with 2 splits it reads only the other's: 3 x). Its per-tile counters need no
  memset kernel: the last split zeroes its counter again and the buffer is cached per stream
  (triton_kernels/_split_counters.py).
- Floors: decode fraction = max(unique bytes / 3.02 TB/s, FLOPs / 700 TFLOP/s) / predicted time; cuBLAS time =
  max(bf16 bytes / 3.02 TB/s, FLOPs / 700 TFLOP/s) plus one launch ramp (its roofline at the measured ceilings,
  so ratios are conservative where cuBLAS falls short of it, e.g. 4096 x 4096, which it runs at 63-70% of
  that roofline at M = 1..256: `CUBLAS_MEASURED_US`, reported beside it as `vs_measured_cublas`). `ceiling`:
  the most any one-launch kernel gets, at the NF4 floor plus the ramp. Where the bf16 roofline is bound by
  FLOPs (M = 256 on every layer but k/v) that is 1.00x: the tensor pipe runs at most at cuBLAS's efficiency
  here, so the 1.0x target of M = 17..256 asks there for a kernel without any loss.
Targets (performance.md): M = 1..16 >= 80% of the floor (K, N >= 4096); M = 17..256 >= 1.0x cuBLAS;
M >= 1024 >= 0.95x cuBLAS (forward and dx).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/static_sm90.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sass_sm90 import (PIPE_RATES, Kernel, Latencies, LoopProfile, main_loop, parse_resource_usage,
                                  parse_sass)

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "benchmarks" / "results" / "sm90-static"


# ------------------------------------------------------------------------------------------ the machine
@dataclass(frozen=True)
class H100:
    sms: int = 132
    clock_hz: float = 1.755e9
    schedulers: int = 4
    bandwidth: float = 3.02e12
    l2_bandwidth: float = 6.5e12         # L2 -> SMs for re-read operands (x tiles, W tiles of other M tiles)
    cublas_flops: float = 700e12
    peak_macs_per_clk: int = 2048        # dense bf16 per SM (4096 FLOP)
    hmma_fraction: float = 0.66          # mma.sync vs wgmma
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    smem_per_cta_reserved: int = 1024
    max_warps: int = 64
    max_ctas: int = 32
    nf4_bytes_per_weight: float = (4 + 8 / 64 + 32 / (64 * 256)) / 8
    lat: Latencies = field(default_factory=Latencies)

    @property
    def mma_efficiency(self) -> float:
        return self.cublas_flops / (2 * self.peak_macs_per_clk * self.sms * self.clock_hz)

    @property
    def floor_weights_per_clk(self) -> float:
        return self.bandwidth / self.clock_hz / self.sms / self.nf4_bytes_per_weight


HW = H100()

# bf16 cuBLAS forward (y = x W^T, x (M, K), W (N, K)) measured on an H100 80GB HBM3 (torch 2.11.0+cu130, median of
# triton.testing.do_bench, weights rotated over several copies): ../shared/reference/performance.md's anchor table,
# microseconds by (K, N, M). The model's cuBLAS is its roofline; these say how far below it the real library runs
# at each shape (at M = 256 on 4096 x 4096: 20.6 us against a 13.0 us roofline), so a row can be read against both.
CUBLAS_MEASURED_US = {
    (4096, 4096): {1: 17.6, 4: 17.6, 16: 18.1, 64: 17.0, 256: 20.6, 1024: 51.1, 4096: 201.7},
    (4096, 14336): {1: 44.7, 4: 44.9, 16: 45.4, 64: 46.9, 256: 53.7, 1024: 180.0, 4096: 742.4},
    (14336, 4096): {1: 46.7, 4: 46.8, 16: 47.5, 64: 49.3, 256: 61.8, 1024: 174.1, 4096: 743.5},
    (8192, 28672): {1: 169.2, 4: 170.2, 16: 169.8, 64: 176.4, 256: 204.7, 1024: 704.2, 4096: 2849.3},
}


def set_l2_bandwidth(bytes_per_s: float) -> None:
    """The model's L2 bandwidth from here on (`--l2-bandwidth`; the calibration's lever: measurements on H100 range
    5.5 to ~12 TB/s)."""
    global HW
    HW = replace(HW, l2_bandwidth=bytes_per_s)

# (K, N) per layer: y = x W^T, W (N, K)
SHAPES = {
    "8b": [("q/o", 4096, 4096), ("k/v", 4096, 1024), ("gate/up", 4096, 14336), ("down", 14336, 4096)],
    "70b": [("q/o", 8192, 8192), ("k/v", 8192, 1024), ("gate/up", 8192, 28672), ("down", 28672, 8192)],
}
# ... and other models users fine-tune, outside issue 27's Llama-3 table and outside "all": `--shapes others`
# (results tagged others-triton<version>). Their widths are not multiples of 4096, so waves of 128-column tiles
# fill the 132 SMs differently (Llama-3.2-3B's 3072: 192 tiles of 128 x 128 at M = 1024, 1.45 waves)
OTHER_SHAPES = {
    "qwen2.5-7b": [("q/o", 3584, 3584), ("k/v", 3584, 512), ("gate/up", 3584, 18944), ("down", 18944, 3584)],
    "qwen3-8b": [("q/o", 4096, 4096), ("k/v", 4096, 1024), ("gate/up", 4096, 12288), ("down", 12288, 4096)],
    "gemma2-9b": [("q", 3584, 4096), ("o", 4096, 3584), ("k/v", 3584, 2048), ("gate/up", 3584, 14336),
                  ("down", 14336, 3584)],
    "llama3.2-3b": [("q/o", 3072, 3072), ("k/v", 3072, 1024), ("gate/up", 3072, 8192), ("down", 8192, 3072)],
    "llama3.2-1b": [("q/o", 2048, 2048), ("k/v", 2048, 512), ("gate/up", 2048, 8192), ("down", 8192, 2048)],
}
MS = [1, 4, 8, 16, 17, 64, 128, 256, 1024, 4096]


# ------------------------------------------------------------------------------------------ launches
@dataclass
class Launch:
    """One kernel launch of a path and how its main loop maps onto the work."""
    path: str
    kernel: Kernel
    usage: dict
    shared: int                  # bytes per CTA (static + dynamic)
    ctas: int
    warps_per_cta: int
    passes_per_warp: float       # main-loop passes one warp makes
    weights_per_pass: float      # weights one warp's pass decodes
    useful_macs_per_pass: float  # multiply-accumulates of the real M rows per pass
    note: str = ""
    l2_reread: float = 0.0       # bytes re-read through L2 beyond the unique DRAM bytes (x per row tile, ...)
    loop: LoopProfile | None = None

    def __post_init__(self):
        self.loop = main_loop(self.kernel)


def occupancy(l: Launch) -> int:
    """CTAs per SM (registers allocated per warp in units of 256, shared memory, warps, CTAs)."""
    regs = max(l.usage.get("REG", 32), 24)
    per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = HW.regs_per_sm // (per_warp * l.warps_per_cta)
    by_smem = HW.smem_per_sm // (l.shared + HW.smem_per_cta_reserved) if l.shared else HW.max_ctas
    by_warps = HW.max_warps // l.warps_per_cta
    return max(0, min(by_regs, by_smem, by_warps, HW.max_ctas))


def pass_cycles(l: Launch, resident_warps: int) -> dict:
    """SM cycles of one warp pass per resource, when the SM is kept busy (issue-bound view). The tensor pipe
    overlaps the other pipes when the SM holds two or more warps per scheduler (one warp's MMAs run while
    another decodes); with fewer, a warp's own MMAs and decode follow each other."""
    lp = l.loop
    c = lp.counts
    n = len(lp.path)
    fma = (c["fp32"] + c["imad"]) * 32 / PIPE_RATES["fp32"]
    out = {
        "dispatch": n / HW.schedulers,
        "alu": c["alu"] * 32 / PIPE_RATES["alu"],
        "fma": max(fma, c["imad"] * 32 / PIPE_RATES["imad"]),
        "conv": (c["conv"] + c["mufu"]) * 32 / PIPE_RATES["conv"],
        "lsu": lp.lsu_cycles(),
    }
    macs = lp.tensor_macs()
    if macs:
        rate = HW.peak_macs_per_clk * HW.mma_efficiency * (1.0 if lp.kinds() == "HGMMA" else HW.hmma_fraction)
        tensor = macs / rate
        if resident_warps >= 2 * HW.schedulers:
            out["tensor"] = tensor
        else:
            out["dispatch"] += tensor
    return out


def _time_s(l: Launch, rate_fn) -> float:
    """Seconds of the busiest SM: waves of 132 x occupancy CTAs, the last one partial."""
    occ = max(1, occupancy(l))
    per_cta = l.warps_per_cta * l.passes_per_warp
    full, rest = divmod(l.ctas, HW.sms * occ)
    cycles = full * (occ * per_cta / rate_fn(occ)) if full else 0.0
    if rest:
        r = math.ceil(rest / HW.sms)
        cycles += r * per_cta / rate_fn(r)
    return cycles / HW.clock_hz


def launch_times(l: Launch) -> dict:
    """Issue-bound, latency-bound and combined seconds of one launch (DRAM and ramp not included)."""
    alone = l.loop.cycles_alone(HW.lat)

    def issue_rate(r):  # passes per clock per SM with r CTAs resident
        return 1.0 / max(pass_cycles(l, r * l.warps_per_cta).values())

    def lat_rate(r):
        return r * l.warps_per_cta / alone

    return {"issue": _time_s(l, issue_rate), "latency": _time_s(l, lat_rate),
            "both": _time_s(l, lambda r: min(issue_rate(r), lat_rate(r))), "alone_cycles": alone}


# ------------------------------------------------------------------------------------------ the paths
def _h100_plan(direction: str, M: int, N: int, K: int, dtype):
    """What qpeft's auto dispatch picks on an H100 (the tuned table if it has one for sm_90, else the default
    rule), asked on this CPU-only machine by reporting the device as an sm_90 H100."""
    import torch

    from qpeft.ops import nf4_matmul_dispatch as d
    from qpeft.ops import nf4_matmul_tuned

    tuned = d.lookup_tuned(nf4_matmul_tuned.TABLES, "NVIDIA H100 80GB HBM3", (9, 0), direction, M, N, K)
    if tuned is not None and dtype in d.TUNED_DTYPES:
        return tuned
    saved = d.is_hopper_or_newer
    d.is_hopper_or_newer = lambda device: True
    try:
        try:
            try:
                return d.default_plan(direction, M, torch.device("cuda", 0), K, dtype, N)
            except TypeError:  # a dispatcher from before the N rule
                return d.default_plan(direction, M, torch.device("cuda", 0), K, dtype)
        except TypeError:  # a dispatcher from before the K / dtype rule (BEFORE runs of the model)
            return d.default_plan(direction, M, torch.device("cuda", 0))
    finally:
        d.is_hopper_or_newer = saved


def _fake_weight(N: int, K: int):
    """Uninitialized tensors of the shapes the op passes (NF4, blocksize 64, double quant): nothing runs."""
    import torch

    blocks = N * K // 64
    return (torch.empty(((N * K + 1) // 2, 1), dtype=torch.uint8), torch.empty(blocks, dtype=torch.uint8),
            torch.empty(16), 64, torch.empty(-(-blocks // 256)), torch.empty(256), torch.empty(1))


def triton_launches(direction: str, M: int, N: int, K: int, config: dict | None = None):
    """The Triton launcher's launches for this problem (bf16, no epilogue), recorded, not run."""
    import torch

    from benchmarks.sm90_compile import recorded_triton_launches
    from qpeft.triton_kernels.nf4_matmul import nf4_matmul_dx_triton, nf4_matmul_triton

    packed, absmax, code, bs, na, nc, off = _fake_weight(N, K)
    with recorded_triton_launches() as rec:
        if direction == "fwd":
            x = torch.empty((M, K), dtype=torch.bfloat16)
            nf4_matmul_triton(x, packed, absmax, code, bs, N, na, nc, off, config=config)
        else:
            dy = torch.empty((M, N), dtype=torch.bfloat16)
            nf4_matmul_dx_triton(dy, packed, absmax, code, bs, K, na, nc, off, config=config)
    return rec


def triton_l2_reread(name: str, c: dict, grid: tuple, M: int, N: int, K: int) -> tuple[float, bool]:
    """(bytes re-read through L2, serial split) of one Triton NF4 launch of an (M, N, K) problem with constexprs
    `c` on `grid`: x (dy) once per N (K) tile, W once per M tile, the serial split's fp32 partials (the kernel's
    own count, `split_partial_tiles` in triton_kernels/nf4_matmul.py). A launch over a span of the output's columns
    (the launcher's LEAD spans, N_TILE_START / K_TILE_START) counts its own N (forward) or K (dx) columns."""
    from qpeft.triton_kernels.nf4_matmul import split_partial_tiles

    bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    m_tiles = math.ceil(M / bm)
    if name == "_nf4_matmul_kernel":
        N = min(N - c.get("N_TILE_START", 0) * bn, grid[0 if c.get("SWAP_AXES") else 1] * bn)
        reread = math.ceil(N / bn) * M * K * 2 + m_tiles * N * K * HW.nf4_bytes_per_weight
        split, serial = c.get("SPLIT_K", 1), bool(c.get("SERIAL_SPLIT"))
        partials = split_partial_tiles(split, bool(c.get("KEEP_OWN_PARTIAL")))
        return reread + (partials * M * N * 4 if serial else 0), serial
    if name == "_nf4_matmul_dx_kernel":
        K = min(K - c.get("K_TILE_START", 0) * bk, grid[1] * bk)
        reread = math.ceil(K / bk) * M * N * 2 + m_tiles * N * K * HW.nf4_bytes_per_weight
        split = c.get("SPLIT_N", 1)
        partials = split_partial_tiles(split, bool(c.get("KEEP_OWN_PARTIAL")))
        return reread + partials * M * K * 4, split > 1
    raise ValueError(name)


def _triton_launch(rec, direction, M, N, K) -> Launch:
    sass, usage, shared = rec.sass()
    kernels = parse_sass(sass)
    (name, kern), = kernels.items()
    res = parse_resource_usage(usage)[name]
    c = rec.constexprs()
    warps = rec.options().get("num_warps", 4)
    ctas = rec.grid[0] * rec.grid[1] * rec.grid[2]
    bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    if rec.name == "_nf4_matmul_kernel":
        split = c.get("SPLIT_K", 1)
        span = math.ceil(K / (split * bk)) * bk
        iters = math.ceil(span / bk)
        rows = M / rec.grid[0]           # real rows per M tile, on average
    elif rec.name == "_nf4_matmul_dx_kernel":
        split = c.get("SPLIT_N", 1)
        iters = math.ceil(N / (split * bn))
        rows = M / rec.grid[0]
    else:
        raise ValueError(rec.name)
    weights = bn * bk / warps
    reread, serial = triton_l2_reread(rec.name, c, rec.grid, M, N, K)
    return Launch("triton", kern, res, shared, ctas, warps, iters, weights, weights * min(rows, bm), l2_reread=reread,
                  note=f"{bm}x{bn}x{bk} w{warps}"
                  + (f" s{rec.options()['num_stages']}" if "num_stages" in rec.options() else "")
                  + (f" split{split}" if serial else ""))


def _cuda_kernel(tu: str, needle: str) -> tuple[Kernel, dict]:
    from benchmarks.sm90_compile import sass_of_cu

    sass, usage = sass_of_cu(tu)
    kernels = parse_sass(sass)
    res = parse_resource_usage(usage)
    hits = [n for n in kernels if needle in n]
    if len(hits) != 1:
        raise KeyError(f"{needle!r} matches {hits} in {tu}")
    return kernels[hits[0]], res[hits[0]]


DEC_L1_BYTES = 192 * 1024  # kDecL1Bytes: the x of one CTA an SM's L1 keeps for its later CTAs


def decode_row_groups(N: int, M: int, K: int, r8: int, warps: int, ctas_per_sm: int) -> int:
    """decode_row_groups of csrc/nf4_gemv.cu: row groups of 8 r8 rows per CTA sharing each read of x."""
    if M * K * 2 <= DEC_L1_BYTES or warps < 4 or warps % 2:
        return 1
    return 2 if math.ceil(N / (8 * r8 * 2)) >= HW.sms * ctas_per_sm * 31 // 32 else 1


def decode_geometry(M: int, N: int, K: int, tg: int) -> dict:
    """launch_decode_t of csrc/nf4_gemv.cu for tg groups of 8 tokens: 8-row tiles per warp (r8), row groups per CTA
    (rg), warps per CTA and per row group (kw), passes of 256 k, CTAs."""
    r8 = 2 if tg == 4 else 1   # decode_max_r8: 8-row tiles per warp
    while r8 > 1 and math.ceil(N / (8 * r8)) < HW.sms * 31 // 32:  # decode_row_tiles
        r8 //= 2
    passes = K // 256                  # kDecPassK: a warp pass = 8 r8 rows x 256 k
    warps = min(8, passes)             # kDecMaxWarps: split-K across the warps of a row group
    rg = decode_row_groups(N, M, K, r8, warps, 2 if tg <= 2 else 1)  # __launch_bounds__' CTAs per SM
    return dict(passes=passes, warps=warps, r8=r8, rg=rg, kw=warps // rg, ctas=math.ceil(N / (8 * r8 * rg)))


def cuda_launches(direction: str, M: int, N: int, K: int) -> list[Launch]:
    """The CUDA C++ launches of qpeft_C::nf4_matmul_out / nf4_matmul_dx_out for bf16 activations, mirroring the
    host code of csrc/nf4_matmul.cu and csrc/nf4_gemv.cu (keep the two in step)."""
    from benchmarks.sm90_compile import sass_of_cu

    out = []
    if direction == "fwd" and "nf4_decode_mma_kernel" not in sass_of_cu("nf4_gemv.cu")[0]:
        return _cuda_launches_main_5a321ff(direction, M, N, K)
    if direction == "fwd" and M <= 64 and K % 256 == 0:  # nf4_decode_mma_applies (bf16, blocksize 64)
        tg = 1 if M <= 8 else 2 if M <= 16 else 4 if M <= 32 else 8  # groups of 8 tokens
        kern, res = _cuda_kernel("nf4_gemv.cu", f"nf4_decode_mma_kernelI13__nv_bfloat16Li{tg}ELb1E")
        geo = decode_geometry(M, N, K, tg)
        r8, rg, warps, ctas = geo["r8"], geo["rg"], geo["warps"], geo["ctas"]
        per_warp = math.ceil(geo["passes"] / geo["kw"])
        # the loop body holds two passes (alternating load buffers); its SASS path decodes max_r8 tiles, so with
        # fewer (small N) the instructions per weight are overstated
        w_iter = 2 * 8 * r8 * 256
        l = Launch("cuda_decode", kern, res, res.get("SHARED", 0), ctas, warps, per_warp / 2, w_iter, w_iter * M,
                   note=f"mma.sync {tg}x8 tokens, {r8}x8 rows" + (f" x{rg} groups" if rg > 1 else "") + f", w{warps}")
        # x through L2: every CTA reads its tokens' whole x (each row group covers all of K; the groups of a CTA
        # read the same x at the same time). CTAs resident on an SM together walk the same passes at the same time
        # (one L2 read serves them through L1): one read per SM and residency; when a CTA's x fits in L1
        # (<= 192 KB) the SM's later CTAs find it there too: one read per SM
        per_cta = M * K * 2
        reads = min(ctas, HW.sms)
        if per_cta > DEC_L1_BYTES:
            reads = max(math.ceil(ctas / max(1, occupancy(l))), reads)
        l.l2_reread = reads * per_cta
        out.append(l)
        return out
    if direction == "fwd" and M <= 16 and K % 32 == 0:  # the SIMT kernel (fp32 / blocksize 32 / K % 256 != 0)
        mt, rows = (1, 4) if M <= 1 else (4, 4) if M <= 4 else (8, 4) if M <= 8 else (16, 2)
        kern, res = _cuda_kernel("nf4_gemv.cu", f"nf4_gemv_kernelI13__nv_bfloat16Li{mt}ELi{rows}E")
        chunks = K // 32
        ctas = math.ceil(math.ceil(N / rows) / 4)
        out.append(Launch("cuda_gemv", kern, res, res.get("SHARED", 0), ctas, 4, math.ceil(chunks / 32),
                          rows * 32 * 32, rows * 32 * 32 * M, note=f"SIMT MT={mt}", l2_reread=ctas * M * K * 2))
        return out
    kind = 0 if direction == "fwd" else 1
    kern, res = _cuda_kernel("nf4_matmul.cu", f"tile_gemm_kernelI13__nv_bfloat16Li{kind}E")
    nout, red = (N, K) if direction == "fwd" else (K, N)
    ctas = math.ceil(M / 64) * math.ceil(nout / 64)
    per_pass = 64 * 32 / 4
    mt, nt = math.ceil(M / 64), math.ceil(nout / 64)
    return [Launch("cuda_tile", kern, res, res.get("SHARED", 0), ctas, 4, math.ceil(red / 32), per_pass,
                   per_pass * min(M, 64), note="64x64x32 wmma",
                   l2_reread=nt * M * red * 2 + mt * N * K * HW.nf4_bytes_per_weight)]


def _cuda_launches_main_5a321ff(direction: str, M: int, N: int, K: int) -> list[Launch]:
    """The CUDA forward as main 5a321ff launched it (the BEFORE of issue 27): for M <= 16 the SIMT GEMV in passes
    of <= 8 rows (MT 1 / 4 / 8, 4 rows per warp, 4 warps per CTA), else the tiled GEMM."""
    if M > 16 or K % 32:
        kern, res = _cuda_kernel("nf4_matmul.cu", "tile_gemm_kernelI13__nv_bfloat16Li0E")
        per_pass = 64 * 32 / 4
        mt, nt = math.ceil(M / 64), math.ceil(N / 64)
        return [Launch("cuda_tile", kern, res, res.get("SHARED", 0), mt * nt, 4, math.ceil(K / 32), per_pass,
                       per_pass * min(M, 64), note="64x64x32 wmma",
                       l2_reread=nt * M * K * 2 + mt * N * K * HW.nf4_bytes_per_weight)]
    out = []
    for m_base in range(0, M, 8):
        rows = min(M - m_base, 8)
        mt = 1 if rows <= 1 else 4 if rows <= 4 else 8
        kern, res = _cuda_kernel("nf4_gemv.cu", f"nf4_gemv_kernelI13__nv_bfloat16Li{mt}E")
        ctas = math.ceil(math.ceil(N / 4) / 4)
        out.append(Launch("cuda_gemv", kern, res, res.get("SHARED", 0), ctas, 4, math.ceil(K // 32 / 32),
                          4 * 32 * 32, 4 * 32 * 32 * rows, note=f"SIMT MT={mt}", l2_reread=ctas * rows * K * 2))
    return out


# ------------------------------------------------------------------------------------------ evaluation
def _bytes(direction, M, N, K, nf4=True) -> float:
    w = N * K * (HW.nf4_bytes_per_weight if nf4 else 2)
    return w + 2 * (M * K + M * N)


def launch_ramp_s() -> float:
    """Seconds of one launch's ramp: one HBM latency before its first loads return (the model adds it per launch)."""
    return HW.lat.dram / HW.clock_hz


def _bound(t_sm: float, t_issue: float, t_lat: float, dram: float, t_l2: float) -> str:
    """Which term of max(SMs, DRAM, L2) sets a prediction: "L2" (re-reads, partials), "DRAM" (unique bytes), or the
    SMs' work, "SM issue" or "SM latency" by whichever of the two views is slower (the SM time takes the lower
    rate of the two per wave). A row bound by L2 moves with the assumed L2 bandwidth (`--l2-bandwidth`); the
    others do not."""
    if t_l2 >= max(t_sm, dram):
        return "L2"
    if dram >= t_sm:
        return "DRAM"
    return "SM issue" if t_issue >= t_lat else "SM latency"


def evaluate(path: str, launches: list[Launch], direction: str, M: int, N: int, K: int) -> dict:
    flops = 2 * M * N * K
    floor = max(_bytes(direction, M, N, K) / HW.bandwidth, flops / HW.cublas_flops)
    ramp = launch_ramp_s()
    # cuBLAS is one launch and pays the ramp every launch of ours pays (its 700 TFLOP/s was measured at 8192^3,
    # where one ramp is 0.03% of the time)
    cublas = max(_bytes(direction, M, N, K, nf4=False) / HW.bandwidth, flops / HW.cublas_flops) + ramp
    dram = _bytes(direction, M, N, K) / HW.bandwidth
    times = [launch_times(l) for l in launches]
    t_issue = sum(t["issue"] for t in times)
    t_lat = sum(t["latency"] for t in times)
    t_both = sum(t["both"] for t in times)
    t_l2 = sum(l.l2_reread for l in launches) / HW.l2_bandwidth
    total = max(t_both, dram, t_l2) + ramp * len(launches)
    bound = _bound(t_both, t_issue, t_lat, dram, t_l2)
    l0 = launches[0]
    cycles = pass_cycles(l0, l0.warps_per_cta * max(1, occupancy(l0)))
    sm_pipe = max(cycles, key=cycles.get)
    lp = l0.loop
    decoded = sum(l.ctas * l.warps_per_cta * l.passes_per_warp * l.weights_per_pass for l in launches)
    instr_per_w = len(lp.path) * 32 / l0.weights_per_pass
    c = lp.counts
    per_w = {p: c[p] * 32 / l0.weights_per_pass for p in ("alu", "fp32", "imad", "lsu", "conv", "tensor")}
    mem_lookups = sum(1 for i in lp.path if i.base in ("LDS", "LDG", "LDGSTS") and i.width_bits() <= 32) * 32 \
        / l0.weights_per_pass
    prmt = lp.opcodes.get("PRMT", 0) * 32 / l0.weights_per_pass
    if mem_lookups >= 0.25:
        kinds = sorted({i.opcode for i in lp.path if i.base in ("LDS", "LDG", "LDGSTS") and i.width_bits() <= 32})
        book = f"memory: {mem_lookups:.2f} narrow loads/weight ({', '.join(kinds[:3])})"
    elif prmt >= 0.25:
        book = f"registers: {prmt:.2f} PRMT/weight"
    else:
        book = "registers"
    decode = M <= 16 and direction == "fwd"
    row = {
        "path": l0.path if path.startswith("cuda") else path, "direction": direction, "K": K, "N": N, "M": M,
        "kernel": l0.kernel.name[:60], "config": "; ".join(l.note for l in launches), "launches": len(launches),
        "ctas": l0.ctas, "threads": 32 * l0.warps_per_cta, "regs": l0.usage.get("REG"), "smem": l0.shared,
        "spills": l0.usage.get("LOCAL", 0) + l0.usage.get("STACK", 0),
        "occupancy": occupancy(l0), "waves": round(l0.ctas / (HW.sms * max(1, occupancy(l0))), 2),
        "instr_per_weight": round(instr_per_w, 2), "W_decodes": round(decoded / (N * K), 2),
        **{f"{p}_per_w": round(v, 3) for p, v in per_w.items()},
        "loads": lp.load_widths(), "codebook": book, "mma": lp.kinds(),
        "inflight_B_per_warp": lp.inflight_bytes, "pass_cycles_alone": round(times[0]["alone_cycles"]),
        "l2_reread_MB": round(sum(l.l2_reread for l in launches) / 1e6, 2), "l2_us": round(t_l2 * 1e6, 3),
        "floor_us": round(floor * 1e6, 3), "cublas_us": round(cublas * 1e6, 3),
        "predicted_us": round(total * 1e6, 3), "bound": bound, "sm_pipe": sm_pipe,
    }
    if decode:
        row["issue_ceiling"] = round(min(1.0, floor / max(t_issue, 1e-30)), 3)
        row["latency_ceiling"] = round(min(1.0, floor / max(t_lat + ramp * len(launches), 1e-30)), 3)
        row["predicted"] = round(floor / total, 3)
        row["metric"] = "fraction of floor"
        row["target"] = 0.80 if min(N, K) >= 4096 else None
    else:
        row["issue_ceiling"] = round(cublas / max(t_issue + ramp * len(launches), 1e-30), 3)
        row["latency_ceiling"] = round(cublas / max(t_lat + ramp * len(launches), 1e-30), 3)
        row["predicted"] = round(cublas / total, 3)
        row["metric"] = "x bf16 cuBLAS"
        row["target"] = 1.0 if M <= 256 else 0.95
        # the most any one-launch kernel gets in this model: running at the NF4 floor (its unique bytes at 3.02 TB/s
        # or its FLOPs at cuBLAS's own tensor-core efficiency on all 132 SMs). Where the bf16 roofline is bound by
        # FLOPs that is 1.00x: a 1.0x target there asks for a kernel with no loss at all (no partial wave, no L2
        # re-read beyond the DRAM time, no dequantization that the tensor pipe does not hide)
        row["ceiling"] = round(cublas / (floor + ramp), 3)
        measured = CUBLAS_MEASURED_US.get((K, N), {}).get(M) if direction == "fwd" else None
        row["cublas_measured_us"] = measured
        row["vs_measured_cublas"] = None if measured is None else round(measured * 1e-6 / total, 3)
    row["meets"] = None if row["target"] is None else row["predicted"] >= row["target"]
    return row


def paths_for(direction: str, M: int, N: int, K: int, which: str) -> list[tuple[str, bool, object]]:
    """[(path name, dispatched on H100, launches thunk)]."""
    import torch

    plan = _h100_plan(direction, M, N, K, torch.bfloat16)
    out = []
    cuda_name = "cuda_decode" if direction == "fwd" and (M <= 16 or M <= 64 and K % 256 == 0) else "cuda_tile"
    cands = [(cuda_name, plan.backend == "cuda", lambda: cuda_launches(direction, M, N, K)),
             ("triton", plan.backend == "triton",
              lambda: [_triton_launch(r, direction, M, N, K)
                       for r in triton_launches(direction, M, N, K, plan.config())])]
    for name, chosen, thunk in cands:
        if which == "all" or chosen:
            out.append((name, chosen, thunk))
    return out


def run(shapes: str = "all", which: str = "all", ms=MS, directions=("fwd", "dx"), verbose=True) -> list[dict]:
    rows = []
    for model, layers in (OTHER_SHAPES if shapes == "others" else SHAPES).items():
        if shapes not in ("all", "others", model):
            continue
        for layer, K, N in layers:
            for direction in directions:
                for M in ms:
                    for name, chosen, thunk in paths_for(direction, M, N, K, which):
                        row = evaluate(name, thunk(), direction, M, N, K)
                        row = {"model": model, "layer": layer, "dispatched": chosen, **row}
                        rows.append(row)
                        if verbose:
                            print(f"{model:>3} {layer:>7} {direction:>3} M={M:<5} {name:<10} "
                                  f"{'*' if chosen else ' '} {row['instr_per_weight']:6.2f} instr/w  "
                                  f"issue {row['issue_ceiling']:.2f}  lat {row['latency_ceiling']:.2f}  "
                                  f"pred {row['predicted']:.2f} {row['metric']}", flush=True)
    return rows


def _bound_label(row: dict) -> str:
    """A row's `bound` for the tables, an SM bound with the pipe that bounds its issue view: "SM issue (tensor)"."""
    return f"{row['bound']} ({row['sm_pipe']})" if row["bound"].startswith("SM") else row["bound"]


def _cell(value) -> str:
    """A ratio for the tables: two decimals, "-" where the row has none."""
    return "-" if value is None else f"{value:.2f}"


def write(rows: list[dict], out: Path, tag: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_p, md_p = out / f"static_sm90_{tag}.csv", out / f"static_sm90_{tag}.md"
    keys = list(rows[0])
    for r in rows:
        keys += [k for k in r if k not in keys]
    tmp = csv_p.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, csv_p)
    lines = [f"# Static sm_90 model ({tag}): predictions, not measurements", "",
             "Dispatched path per problem (bf16, NF4 blocksize 64, double quant). instr/w: main-loop thread-"
             "instructions per decoded weight; ceilings and prediction as a fraction of the bandwidth floor "
             "(fwd M <= 16) or x bf16 cuBLAS (otherwise); bound: the term that sets the prediction (L2 at "
             f"{HW.l2_bandwidth / 1e12:g} TB/s; SM: the pipe that bounds the issue view); ceiling: the most any "
             "one-launch kernel gets in the model (running at the NF4 floor); vs measured: the prediction against "
             "the bf16 cuBLAS time measured on an H100 (performance.md's anchors, forward). See "
             "benchmarks/static_sm90.py for the model.", "",
             "| model | layer (K, N) | dir | M | path | kernel config | instr/w | code book | MMA | regs | occ | "
             "issue | latency | predicted | bound | ceiling | vs measured | target |",
             "|---|---|---|---:|---|---|---:|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        if not r["dispatched"]:
            continue
        target = "-" if r["target"] is None else f"{r['target']:.2f} {'met' if r['meets'] else 'MISSED'}"
        lines.append(f"| {r['model']} | {r['layer']} ({r['K']}, {r['N']}) | {r['direction']} | {r['M']} | "
                     f"{r['path']} | {r['config']} | {r['instr_per_weight']:.2f} | {r['codebook']} | {r['mma']} | "
                     f"{r['regs']} | {r['occupancy']} | {r['issue_ceiling']:.2f} | {r['latency_ceiling']:.2f} | "
                     f"{r['predicted']:.2f} {'floor' if r['metric'].startswith('fraction') else 'x cuBLAS'} | "
                     f"{_bound_label(r)} | {_cell(r.get('ceiling'))} | {_cell(r.get('vs_measured_cublas'))} | "
                     f"{target} |")
    tmp = md_p.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, md_p)
    return csv_p, md_p


def calibrate(measured_csv: Path, predicted_csv: Path, out: Path) -> tuple[Path, Path]:
    """Measured (benchmarks/measure_static_cases.py on a GPU) next to predicted (this model's CSV for the same
    Triton version), per dispatched case: the measured fraction of the floor (M <= 16 forward: CUDA-graph time
    when measured) or speed vs the cuBLAS measured in the same run, the prediction, and measured / predicted. The
    median of that ratio per path says how far to trust the model on that path.
    Rows the model has bound by L2 also give the L2 bandwidth the measurement implies: their L2 bytes over the
    measured time less the launch ramp (a lower bound: on the GPU such a row may be bound by something else). The
    median is the value to rerun the model with (`--l2-bandwidth`), the model's least certain number."""
    import statistics

    ramp_us = launch_ramp_s() * 1e6

    with open(predicted_csv) as f:
        pred = {(r["model"], r["layer"], r["direction"], int(r["M"])): r for r in csv.DictReader(f)
                if r["dispatched"] == "True"}
    rows = []
    with open(measured_csv) as f:
        for m in csv.DictReader(f):
            key = (m["model"], m["layer"], m["direction"], int(m["M"]))
            p = pred.get(key)
            if p is None:
                continue
            ours = float(m.get("qpeft_graph_ms") or m["qpeft_ms"])
            if p["metric"].startswith("fraction"):
                measured = float(p["floor_us"]) / 1e3 / ours
            else:
                measured = float(m.get("cublas_graph_ms") or m["cublas_ms"]) / ours
            predicted = float(p["predicted"])
            bound = p.get("bound") or ""  # CSVs of the model before its bound column have none
            busy_us = ours * 1e3 - ramp_us * int(p.get("launches") or 1)
            implied = (float(p["l2_reread_MB"]) / busy_us if bound == "L2" and busy_us > 0 else None)  # MB/us=TB/s
            rows.append({"model": key[0], "layer": key[1], "direction": key[2], "M": key[3], "path": p["path"],
                         "metric": p["metric"], "predicted": predicted, "measured": round(measured, 3),
                         "measured_over_predicted": round(measured / predicted, 3) if predicted else None,
                         "measured_us": round(ours * 1e3, 3), "predicted_us": float(p["predicted_us"]),
                         "bound": bound, "implied_l2_TBps": None if implied is None else round(implied, 2),
                         "device": m.get("device", "")})
    out.mkdir(parents=True, exist_ok=True)
    device = re.sub(r"[^A-Za-z0-9_.-]+", "_", rows[0]["device"] if rows else "unknown")
    csv_p, md_p = out / f"calibration_{device}.csv", out / f"calibration_{device}.md"
    with open(csv_p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["model"])
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Static sm_90 model vs measurement ({device})", "",
             "| path | cases | median measured / predicted | min | max |", "|---|---:|---:|---:|---:|"]
    for path in sorted({r["path"] for r in rows}):
        ratios = [r["measured_over_predicted"] for r in rows if r["path"] == path and r["measured_over_predicted"]]
        if ratios:
            lines.append(f"| {path} | {len(ratios)} | {statistics.median(ratios):.2f} | {min(ratios):.2f} | "
                         f"{max(ratios):.2f} |")
    implied = [r["implied_l2_TBps"] for r in rows if r["implied_l2_TBps"] is not None]
    if implied:
        lines += ["", f"L2 bandwidth implied by the {len(implied)} rows the model has bound by L2: median "
                      f"{statistics.median(implied):.2f} TB/s (min {min(implied):.2f}, max {max(implied):.2f}; "
                      f"assumed {HW.l2_bandwidth / 1e12:g}). A lower bound where a row is bound by something else "
                      f"on the GPU; rerun the model with `--l2-bandwidth {statistics.median(implied):.2f}`."]
    lines += ["", "| model | layer | dir | M | path | predicted | measured | metric | bound |",
              "|---|---|---|---:|---|---:|---:|---|---|"]
    lines += [f"| {r['model']} | {r['layer']} | {r['direction']} | {r['M']} | {r['path']} | {r['predicted']:.2f} | "
              f"{r['measured']:.2f} | {r['metric']} | {r['bound']} |" for r in rows]
    md_p.write_text("\n".join(lines) + "\n")
    return csv_p, md_p


def compare(before_csv: Path, after_csv: Path, model: str = "8b") -> str:
    """Markdown table of the dispatched path per case, before vs after: instructions per weight and the
    predicted fraction of the floor / speed vs cuBLAS, with the target."""
    def load(p):
        with open(p) as f:
            return {(r["layer"], r["K"], r["N"], r["direction"], int(r["M"])): r for r in csv.DictReader(f)
                    if r["dispatched"] == "True" and r["model"] == model}

    before, after = load(before_csv), load(after_csv)
    lines = ["| layer (K, N) | dir | M | before: path, instr/w | before: predicted | after: path, instr/w | "
             "after: predicted | target |", "|---|---|---:|---|---:|---|---:|---|"]
    layers = list(dict.fromkeys(k[0] for k in after))
    for key in sorted(after, key=lambda k: (layers.index(k[0]), k[3] != "fwd", k[4])):
        a, b = after[key], before.get(key)
        unit = "floor" if a["metric"].startswith("fraction") else "x cuBLAS"
        target = "-" if not a["target"] else (f"{float(a['target']):.2f} "
                                               f"{'met' if a['meets'] == 'True' else 'MISSED'}")
        bcol = (f"{b['path']}, {float(b['instr_per_weight']):.2f} | {float(b['predicted']):.2f} {unit}" if b
                else "- | -")
        lines.append(f"| {key[0]} ({key[1]}, {key[2]}) | {key[3]} | {key[4]} | {bcol} | {a['path']}, "
                     f"{float(a['instr_per_weight']):.2f} | {float(a['predicted']):.2f} {unit} | {target} |")
    return "\n".join(lines) + "\n"


def sweep_l2(bandwidths: list[float], shapes: str = "all", ms=MS, directions=("fwd", "dx")) -> str:
    """Markdown: the dispatched rows with a target that the model meets at each assumed L2 bandwidth (TB/s), and
    the rows still missed at the highest one with what bounds them there. What a GPU calibration of the L2
    bandwidth can and cannot flip."""
    saved = HW.l2_bandwidth
    results = {}
    try:
        for bw in bandwidths:
            set_l2_bandwidth(bw * 1e12)
            results[bw] = [r for r in run(shapes, "dispatched", ms, directions, verbose=False)
                           if r["target"] is not None]
    finally:
        set_l2_bandwidth(saved)

    def key(r):
        return f"{r['model']} {r['layer']} {r['direction']} M = {r['M']}"

    lines = ["| L2 TB/s | met | missed, bound by L2 | missed, bound by the SMs or DRAM | missed, target at or above "
             "the model's ceiling |", "|---:|---:|---:|---:|---:|"]
    for bw, rows in results.items():
        missed = [r for r in rows if not r["meets"]]
        by_l2 = sum(r["bound"] == "L2" for r in missed)
        lines.append(f"| {bw:g} | {len(rows) - len(missed)} of {len(rows)} | {by_l2} | {len(missed) - by_l2} | "
                     f"{sum(_target_at_ceiling(r) for r in missed)} |")
    top = max(results)
    lines += ["", f"Missed at {top:g} TB/s:", "", "| row | predicted | bound | ceiling | vs measured cuBLAS |",
              "|---|---:|---|---:|---:|"]
    lines += [f"| {key(r)} | {r['predicted']:.2f} | {_bound_label(r)} | {_cell(r.get('ceiling'))} | "
              f"{_cell(r.get('vs_measured_cublas'))} |" for r in results[top] if not r["meets"]]
    return "\n".join(lines) + "\n"


def _target_at_ceiling(row: dict) -> bool:
    """The row's target is at or above the most any one-launch kernel gets in the model (`evaluate`'s ceiling):
    met only by a kernel at the NF4 floor, with no loss at all."""
    return row.get("ceiling") is not None and row["target"] is not None and row["target"] >= row["ceiling"] - 5e-4


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="all", choices=["all", "8b", "70b", "others"],
                    help="all: Llama-3 8B and 70B (issue 27's table); others: Qwen2.5-7B, Qwen3-8B, Gemma-2-9B, "
                         "Llama-3.2-3B / 1B (results tagged others-triton<version>)")
    ap.add_argument("--paths", default="all", choices=["all", "dispatched"])
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--directions", default="fwd,dx")
    ap.add_argument("--out", default=str(OUT_DIR))
    ap.add_argument("--tag", default=None, help="file name tag (default: triton<version>)")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE_CSV", "AFTER_CSV"),
                    help="markdown table of two model runs (dispatched paths of --shapes, default 8b)")
    ap.add_argument("--l2-bandwidth", type=float, default=None, metavar="TB/s",
                    help=f"L2 bandwidth for re-read operands (default {HW.l2_bandwidth / 1e12:g}, an assumption: "
                         f"a GPU run calibrates it); give --tag too, the results name the Triton version only")
    ap.add_argument("--sweep-l2", default=None, metavar="TB/s,...",
                    help="markdown: targets met at each of these L2 bandwidths, and what bounds the rest")
    ap.add_argument("--calibrate", default=None, metavar="MEASURED_CSV",
                    help="compare a GPU run of benchmarks.measure_static_cases with this model's predictions")
    args = ap.parse_args(argv)
    from benchmarks.sm90_compile import triton_version

    if args.compare:
        print(compare(Path(args.compare[0]), Path(args.compare[1]), args.shapes if args.shapes != "all" else "8b"))
        return 0
    if args.sweep_l2:
        bws = [float(v) for v in args.sweep_l2.split(",")]
        if not all(b > 0 for b in bws):
            raise SystemExit(f"--sweep-l2: expected TB/s > 0, got {args.sweep_l2}")
        print(sweep_l2(bws, args.shapes, [int(m) for m in args.ms.split(",")], tuple(args.directions.split(","))))
        return 0
    if args.calibrate:
        predicted = Path(args.out) / f"static_sm90_{args.tag or 'triton' + triton_version()}.csv"
        csv_p, md_p = calibrate(Path(args.calibrate), predicted, Path(args.out))
        print(md_p.read_text())  # into the GPU run's log: the per-path ratios and the implied L2 bandwidth
        print(f"wrote {csv_p}\nwrote {md_p}")
        return 0

    if args.l2_bandwidth is not None:
        if not args.l2_bandwidth > 0:
            raise SystemExit(f"--l2-bandwidth: expected TB/s > 0, got {args.l2_bandwidth}")
        if args.tag is None:
            raise SystemExit("--l2-bandwidth: give --tag as well (the default results file is the 6.5 TB/s model's)")
        set_l2_bandwidth(args.l2_bandwidth * 1e12)
    rows = run(args.shapes, args.paths, [int(m) for m in args.ms.split(",")], tuple(args.directions.split(",")))
    tag = args.tag or f"{'others-' if args.shapes == 'others' else ''}triton{triton_version()}"
    for p in write(rows, Path(args.out), tag):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
