"""`python -m benchmarks` (also `qpeft bench`): every benchmark suite behind one entry point.

Runs the suites (each module's `run(quick) -> list[dict]`), prints a table per suite, and writes to
benchmarks/results/<device>/: `<suite>.csv` (rows + versions + git revision), `plots/<suite>_*.png` (time vs
M per shape with the floor drawn), `ceilings.csv` (copy bandwidth and matmul peak measured here, the floor's
inputs) and `env.json` (device, torch / Triton / CUDA / bitsandbytes / PEFT / transformers versions, git).
Without a GPU every suite runs its small CPU shapes, so this always works.

    python -m benchmarks [--quick] [--suites quantize,nf4_matmul,...] [--no-plots] [--list]
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/__main__.py`: make `benchmarks.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import atomic_write_text, bench, env_info, on_gpu, print_table, results_dir, write_csv

# suite name -> module; per-kernel suites first, end-to-end last
SUITES = {
    "quantize": "benchmarks.bench_quantize",
    "nf4_matmul": "benchmarks.bench_nf4_matmul",
    "lora": "benchmarks.bench_lora",
    "multilora": "benchmarks.bench_multilora",
    "dora": "benchmarks.bench_dora",
    "grouped_nf4": "benchmarks.bench_grouped_nf4",
    "bottleneck": "benchmarks.bench_bottleneck",
    "rmsnorm": "benchmarks.bench_rmsnorm",
    "rope": "benchmarks.bench_rope",
    "swiglu": "benchmarks.bench_swiglu",
    "lora_mlp": "benchmarks.bench_lora_mlp",
    "lora_qkv": "benchmarks.bench_lora_qkv",
    "optim": "benchmarks.bench_optim",
    "e2e_training": "benchmarks.bench_e2e_training",
    "decode": "benchmarks.bench_decode",
}
PLOTTED = ("nf4_matmul", "lora", "bottleneck")  # suites with an M (tokens) sweep


def measure_ceilings(quick: bool) -> dict:
    """Copy bandwidth (bytes read + written per second) and dense matmul peak of this device, measured now:
    the inputs of the floor drawn in the plots. GPU: 1 GiB copy, 8192^3 bf16 matmul; CPU: 64 MiB, 1024^3 fp32."""
    gpu = on_gpu()
    dev = "cuda" if gpu else "cpu"
    n_bytes = (2**30 if gpu and not quick else 2**26)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))["ms"]
    n = 8192 if gpu and not quick else 1024
    dtype = torch.bfloat16 if gpu else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    mm_ms = bench(lambda: a @ b)["ms"]
    return {"bandwidth_Bps": 2 * n_bytes / (copy_ms / 1e3), "matmul_flops": 2 * n**3 / (mm_ms / 1e3),
            "copy_bytes": n_bytes, "matmul_n": n, "matmul_dtype": str(dtype).split(".")[-1]}


def _columns(mod, rows: list[dict]) -> list[str]:
    cols = getattr(mod, "COLUMNS", None)
    if cols:
        return [c for c in cols if any(c in r for r in rows)]
    out: list[str] = []
    for r in rows:
        out += [c for c in r if c not in out]
    return out


def run_suite(name: str, quick: bool, plots: bool, ceilings: dict | None) -> dict:
    """Run one suite; returns {"suite", "rows", "csv", "plots", "seconds"} or {"suite", "error"}."""
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(SUITES[name])
        rows = mod.run(quick=quick)
    except Exception as e:  # noqa: BLE001  one broken suite must not hide the others' results
        traceback.print_exc()
        return {"suite": name, "error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}
    print(f"\n== {name} ({len(rows)} rows, {time.perf_counter() - t0:.1f} s)")
    print_table(rows, _columns(mod, rows))
    result = {"suite": name, "rows": rows, "csv": str(write_csv(name, rows)) if rows else None, "plots": [],
              "seconds": time.perf_counter() - t0}
    if plots and name in PLOTTED and rows:
        from benchmarks.plots import plot_speed_vs_m

        plot_dir = results_dir() / "plots"
        plot_dir.mkdir(exist_ok=True)
        result["plots"] = [str(p) for p in plot_speed_vs_m(rows, name, plot_dir, ceilings)]
    return result


def build_parser(prog: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Run qpeft's benchmark suites; write CSV + PNG to "
                                 "benchmarks/results/<device>/.")
    ap.add_argument("--quick", action="store_true", help="small shapes (always the case without a GPU)")
    ap.add_argument("--suites", default=",".join(SUITES),
                    help=f"comma-separated subset of: {', '.join(SUITES)} (default: all)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--list", action="store_true", help="list the suites and exit")
    return ap


def main(argv=None, prog: str = "python -m benchmarks") -> int:
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(f"{k:14s} {v}" for k, v in SUITES.items()))
        return 0
    names = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = [s for s in names if s not in SUITES]
    if unknown or not names:
        ap.error(f"--suites: unknown suite(s) {unknown}; expected a comma-separated subset of {list(SUITES)}")
    quick = args.quick or not on_gpu()
    env = env_info()
    print("qpeft benchmarks: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    out = results_dir()
    ceilings = measure_ceilings(quick)
    print(f"ceilings: copy {ceilings['bandwidth_Bps'] / 1e9:.1f} GB/s, matmul {ceilings['matmul_flops'] / 1e12:.3f} "
          f"TFLOP/s ({ceilings['matmul_dtype']})")
    write_csv("ceilings", [ceilings])
    results = [run_suite(n, quick, not args.no_plots, ceilings) for n in names]
    failed = [r for r in results if "error" in r]
    summary = {"env": env, "quick": quick, "ceilings": ceilings,
               "suites": {r["suite"]: {k: v for k, v in r.items() if k not in ("suite", "rows")} for r in results}}
    atomic_write_text(out / "env.json", json.dumps(summary, indent=2, default=str))
    print(f"\nresults in {out}:")
    for r in results:
        state = f"FAILED ({r['error']})" if "error" in r else f"{r['csv']} + {len(r['plots'])} plot(s)"
        print(f"  {r['suite']:14s} {r['seconds']:7.1f} s  {state}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
