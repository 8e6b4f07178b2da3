"""Tune the nf4_matmul auto dispatch on this GPU: time every candidate (the CUDA C++ kernel and a set of Triton
tile configurations) for the forward and the input gradient, pick the fastest per (shape, M), and write the
table that `qpeft/ops/nf4_matmul_dispatch.py` reads.

    python -m benchmarks.tune_nf4_matmul            # measure; CSV to benchmarks/results/<gpu>/tune_nf4_matmul.csv
    python -m benchmarks.tune_nf4_matmul --write    # ... and regenerate python/qpeft/ops/nf4_matmul_tuned.py
    python -m benchmarks.tune_nf4_matmul --quick    # tiny shapes, two candidates per regime (CPU: the Triton
                                                    # interpreter, to exercise the plumbing; no --write there)

GPU: the shapes and M of bench_nf4_matmul (Llama-style (K, N) up to 8192 x 28672, M = 1..16384) and the k/v
projection of GQA models (4096 -> 1024: the dispatch uses a measured shape only within 2x of the weight's, see
qpeft/ops/nf4_matmul_dispatch.py), bf16, NF4, blocksize 64, double-quantized absmax (the QLoRA default). The sweep
stops starting new shapes after --budget-s seconds (default 480: `bash tests/run_gpu.sh tune` is one 10-minute
device call, build and JIT compiles included), so a slow machine still writes the shapes it measured whole.
Each time is triton.testing.do_bench's median, which flushes the L2 between runs (a 256 MB write), so the weight
is read from HBM as in a real model. Each candidate allocates its output as the op does. Dense cuBLAS is timed
alongside for context (not a candidate).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.bench_nf4_matmul import GPU_M, GPU_SHAPES, _dx_args, _fwd_args, raw_cuda_dx, raw_cuda_fwd
from benchmarks.common import bench, env_info, on_gpu, print_table, write_csv

QUICK_SHAPES = [(128, 96)]
TUNE_SHAPES = GPU_SHAPES + [(4096, 1024)]
BUDGET_S = 480.0
QUICK_M = [1, 4, 32]

# Triton tile candidates (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Decode keeps whole-K programs
# (no split: no scratch buffer) and varies how many rows of W each program streams; GEMM tiles are Hopper
# wgmma shapes (64/128-row warpgroup tiles) plus small-M ones so M = 17..64 does not pad to 128 rows. Every
# candidate was compiled offline for sm_90 (Triton 3.9, bf16, NF4 blocksize 64, double quant) and kept only
# when ptxas reported no register spill and shared memory <= 227 KB: e.g. fwd 128x128x64 (8 warps) spills
# 120 B, 128x256x64 1232 B, and 64x256x64 at 4 stages needs 238 KB of shared memory, so none of them is here.
# dx names its tiles (BLOCK_M rows of dy, BLOCK_N reduction step over N, BLOCK_K columns of dx).
_FWD_GEMV_M1 = [(1, 8, 256, 4, None), (1, 16, 256, 4, None), (1, 8, 512, 4, None), (1, 16, 256, 8, None),
                (1, 8, 512, 8, None), (1, 16, 128, 4, None), (1, 4, 512, 4, None)]
_FWD_DECODE = [(16, 16, 128, 4, None), (16, 32, 128, 4, None), (16, 16, 256, 8, None), (16, 32, 128, 8, None),
               (16, 32, 256, 8, None), (16, 64, 64, 4, None), (16, 32, 64, 4, None)]
# M > 16: the default tile lists (qpeft.triton_kernels.nf4_matmul._FWD/_DX_GEMM_TILES and the register code book's
# _FWD/_DX_GEMM_TILES_BOOK, all spill-free) plus these,
# keeping only tiles that pad M by less than 2x
_FWD_GEMM_EXTRA = [(64, 128, 64, 8, 3), (64, 128, 64, 8, 4), (128, 128, 32, 8, 3), (128, 64, 64, 8, 4),
                   (64, 64, 128, 8, 3), (32, 128, 64, 8, 3), (32, 128, 32, 4, 4)]
# dx at decode M: the grid is (M / BLOCK_M, K / BLOCK_K), so only narrow K tiles fill the GPU (K = 4096 with
# BLOCK_K = 64 is 64 programs for 132 SMs)
_DX_DECODE = [(16, 64, 16, 4, None), (16, 128, 16, 4, None), (16, 64, 32, 4, None), (16, 128, 32, 4, None),
              (16, 256, 16, 8, None), (16, 256, 32, 8, None), (16, 64, 64, 4, None)]
_DX_GEMM_EXTRA = [(128, 64, 128, 8, 4), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 32, 128, 8, 4),
                  (64, 256, 64, 8, 3), (64, 128, 32, 4, 4), (32, 128, 64, 8, 3), (16, 128, 64, 4, 3)]


_SPLITS = (2, 4, 8)
# ... and this forward split tile, measured but not dispatched: 64 x 256 x 128, 8 warps (213-249 registers,
# spill-free to LoRA rank 256 under Triton 3.6, 3.8 and 3.9) reads x half as often as the 128-column tiles. The
# static sm_90 model puts 70b k/v (8192 -> 1024) at M = 256 at 0.92x bf16 cuBLAS with it in 8 splits against 0.80x
# for 128 x 128 x 128, at its assumed 6.5 TB/s of L2; but its SMs cap it at 0.99x while the 128-row tile meets
# 1.0x from ~8.3 TB/s, so the default keeps the tile that can meet the target and a GPU run decides
_FWD_SPLIT_EXTRA = ((64, 256, 128, 8, 3),)


def triton_candidates(direction: str, M: int, quick: bool) -> list[dict]:
    from qpeft.triton_kernels import nf4_matmul as k

    if M <= 16:
        pool = (_FWD_GEMV_M1 if M == 1 else _FWD_DECODE) if direction == "fwd" else _DX_DECODE
    else:
        tiles = (list(k._FWD_GEMM_TILES) + _FWD_GEMM_EXTRA + list(k._FWD_GEMM_TILES_BOOK) if direction == "fwd"
                 else list(k._DX_GEMM_TILES) + _DX_GEMM_EXTRA + list(k._DX_GEMM_TILES_BOOK))
        tiles = list(dict.fromkeys(tiles))  # the register code book's tiles (16-bit activations) once each
        pool = [t for t in tiles if t[0] == 16 or t[0] < 2 * M]
    configs = [k.tile_config(t) for t in pool]
    key = "SPLIT_K" if direction == "fwd" else "SPLIT_N"
    for c in configs:
        c[key] = 1
    if M <= k.SPLIT_MAX_M:  # the serial split of the reduction (16-bit activations; the launchers' M <= 256 plans)
        split_tiles = ((k._SPLIT_TILE, k._SPLIT_TILE_WIDE, k._SPLIT_TILE_WIDE_NARROW_N, k._SPLIT_TILE_NARROW_N,
                        k._SPLIT_TILE_NARROW_N_SMALL_M) + _FWD_SPLIT_EXTRA
                       if direction == "fwd" else
                       (k._DX_SPLIT_TILE_DECODE, k._DX_SPLIT_TILE, k._DX_SPLIT_TILE_WIDE,
                        k._DX_SPLIT_TILE_WIDE_NARROW_N, k._DX_SPLIT_TILE_WIDE_NARROW_N_SHORT))
        # as the launchers issue them (the forward's: `fwd_split_config`, its narrow-N tiles keep the last split's
        # own partial)
        configs += [k.fwd_split_config(t, split) if direction == "fwd" else dict(k.tile_config(t), SPLIT_N=split)
                    for t in split_tiles if t[0] == 16 or t[0] < 2 * M for split in _SPLITS]
        if direction == "dx":  # ... and unsplit, dx's 64-row tiles for narrow reductions (`_dx_narrow_tile`)
            configs += [dict(k.tile_config(t), SPLIT_N=1)
                        for t in (k._DX_SPLIT_TILE_WIDE_NARROW_N, k._DX_SPLIT_TILE_WIDE_NARROW_N_SHORT) if t[0] < 2 * M]
    if quick:
        configs = configs[:2]
    return configs


def _name(cfg: dict | None) -> str:
    if cfg is None:
        return "triton:default"
    s = f"triton:{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']}w{cfg['num_warps']}"
    s += f"s{cfg['num_stages']}" if "num_stages" in cfg else ""
    split = cfg.get("SPLIT_K", cfg.get("SPLIT_N", 1))
    return s + (f"k{split}" if split > 1 else "")


def _time(fn) -> float:
    """Median ms. GPU: do_bench (L2 flushed before every run) with a shorter budget than the benchmark
    suites' (warmup 10 ms, 40 ms of runs): ~2,200 timings (with dense cuBLAS, the CUDA kernel and the default) are
    about 2 minutes of runs, the rest of the call is the JIT compiles, hence --budget-s."""
    if on_gpu():
        import triton.testing as tt

        return float(tt.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    return bench(fn, warmup=1, reps=3)["ms"]


def measure(shapes, ms_list, dtype, device, quick: bool, budget_s: float | None = None,
            clock=time.monotonic) -> list[dict]:
    """Rows of every candidate's time per (direction, shape, M). With budget_s, no shape starts after that many
    seconds (a shape is measured whole or not at all: its M buckets end at the largest M measured, and a table cut
    inside a shape would give the larger M the split tiles of M <= 256); the skipped shapes are printed."""
    import qpeft
    from qpeft import _backend
    from qpeft.autograd.nf4_matmul import weight_args
    from qpeft.triton_kernels.nf4_matmul import nf4_matmul_dx_triton, nf4_matmul_triton

    has_cuda_ext = device == "cuda" and _backend.cuda_ext_status()[0]
    rows = []
    start = clock()
    for i, (K, N) in enumerate(shapes):
        if budget_s is not None and clock() - start > budget_s:
            print(f"tune budget of {budget_s:g} s spent: shapes {shapes[i:]} not measured (the default rule keeps "
                  f"them unless a measured shape is near)")
            break
        W = torch.randn(N, K, device=device, dtype=dtype) / math.sqrt(K)
        args = weight_args(*qpeft.quantize_4bit(W, blocksize=64, quant_type="nf4", double_quant=True))
        for M in ms_list:
            x = torch.randn(M, K, device=device, dtype=dtype)
            dy = torch.randn(M, N, device=device, dtype=dtype)
            # direction -> (activation, dense cuBLAS, raw CUDA op, Triton launcher, its weight arguments)
            specs = {"fwd": (x, lambda: x @ W.t(), raw_cuda_fwd, nf4_matmul_triton, _fwd_args(args)),
                     "dx": (dy, lambda: dy @ W, raw_cuda_dx, nf4_matmul_dx_triton, _dx_args(args))}
            for direction, (a, dense, cuda_op, triton_op, t_args) in specs.items():
                cands: list[tuple[str, str | None, dict | None, object]] = [("dense", None, None, dense)]
                if has_cuda_ext:
                    cands.append(("cuda", "cuda", None, lambda op=cuda_op, a=a: op(args, a)))
                for cfg in [None] + triton_candidates(direction, M, quick):
                    cands.append((_name(cfg), "triton", cfg, lambda op=triton_op, a=a, t=t_args, cfg=cfg: op(
                        a, *t, config=None if cfg is None else dict(cfg))))
                for name, backend, cfg, fn in cands:
                    try:
                        ms = _time(fn)
                    except Exception as e:  # noqa: BLE001  (e.g. a tile that needs too much shared memory)
                        print(f"{name} {direction} K={K} N={N} M={M}: {type(e).__name__}: {str(e)[:200]}")
                        ms = math.inf
                    rows.append(dict(dir=direction, K=K, N=N, M=M, candidate=name, backend=backend,
                                     config=cfg if cfg is None else dict(cfg), ms=ms))
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """One row per (dir, K, N, M): the winner, its ms, the CUDA / default-Triton / dense ms."""
    out: dict = {}
    for r in rows:
        key = (r["dir"], r["K"], r["N"], r["M"])
        s = out.setdefault(key, dict(dir=r["dir"], K=r["K"], N=r["N"], M=r["M"], best=None, best_ms=math.inf))
        if r["candidate"] in ("dense", "cuda", "triton:default"):
            s[r["candidate"] + "_ms"] = r["ms"]
        if r["backend"] is not None and r["ms"] < s["best_ms"]:
            s["best"], s["best_ms"] = r["candidate"], r["ms"]
    for s in out.values():
        if "dense_ms" in s and math.isfinite(s["best_ms"]):
            s["best_vs_dense"] = s["dense_ms"] / s["best_ms"]
    return list(out.values())


def write_table(rows: list[dict]) -> Path:
    from qpeft._io import atomic_write_text
    from qpeft.ops import nf4_matmul_dispatch, nf4_matmul_tuned

    env = env_info()
    measured = (f"{env['date']}: torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, "
                f"qpeft {env['qpeft_git']}; bf16, NF4 blocksize 64, double quant; do_bench median, L2 flushed")
    tables = dict(nf4_matmul_tuned.TABLES)
    tables[torch.cuda.get_device_name()] = nf4_matmul_dispatch.build_table(
        rows, torch.cuda.get_device_capability(), measured)
    path = Path(nf4_matmul_tuned.__file__)
    atomic_write_text(path, nf4_matmul_dispatch.render_tables(tables))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, two Triton candidates per regime")
    ap.add_argument("--write", action="store_true", help="regenerate python/qpeft/ops/nf4_matmul_tuned.py")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S,
                    help=f"start no new shape after this many seconds (default {BUDGET_S:g})")
    args = ap.parse_args(argv)
    if not args.budget_s > 0:
        ap.error(f"--budget-s: expected seconds > 0, got {args.budget_s}")
    gpu = on_gpu()
    if args.write and (not gpu or args.quick):
        ap.error("--write needs a GPU and the full sweep (a table measured on tiny shapes would mislead dispatch)")
    quick = args.quick or not gpu
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float16  # the Triton interpreter has no bf16 arithmetic
    shapes, ms_list = (QUICK_SHAPES, QUICK_M) if quick else (TUNE_SHAPES, GPU_M)
    rows = measure(shapes, ms_list, dtype, device, quick, args.budget_s)
    print(env_info())
    table = summary(rows)
    print_table(table)
    print("wrote", write_csv("tune_nf4_matmul", rows))
    if args.write:
        print("wrote", write_table(rows))


if __name__ == "__main__":
    main()
