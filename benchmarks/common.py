"""Shared benchmark plumbing: timing (median of many runs), environment record, CSV output.

Benchmarks live here and never in tests. On a GPU, times come from triton.testing.do_bench (L2 flushed
between runs) or do_bench_cudagraph; on the CPU (small shapes, so the suites always run) from a
perf_counter loop. Results go to benchmarks/results/<gpu-or-cpu-name>/<suite>.csv with the versions.
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

from qpeft._io import atomic_write_text

RESULTS_ROOT = Path(__file__).resolve().parent / "results"


def on_gpu() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    if on_gpu():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
        return str(getattr(m, "__version__", "?"))
    except Exception:
        return "n/a"


def git_revision() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return "unknown"


def env_info() -> dict:
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": _version("triton"),
        "bitsandbytes": _version("bitsandbytes"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "qpeft_git": git_revision(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def gpu_rep_ms() -> float:
    """Milliseconds of GPU time each GPU measurement repeats its function for (warm-up: a quarter of it).
    Default 100; QPEFT_BENCH_REP_MS overrides it: tests/run_gpu.sh quick sets 20 (do_bench_cudagraph's own
    default), since at 100 a CUDA-graph measurement of a ~3 us decode kernel captures ~33,000 launches through
    Python (~1-2 s each, 80 of them in the quick nf4_matmul suite alone) and the quick steps would not fit
    their time bounds; 20 ms still takes thousands of samples of a microsecond kernel."""
    v = os.environ.get("QPEFT_BENCH_REP_MS")
    if v is None:
        return 100.0
    try:
        rep = float(v)
    except ValueError:
        rep = -1.0
    if not rep > 0:
        raise ValueError(f"QPEFT_BENCH_REP_MS must be a positive number of milliseconds, got {v!r}")
    return rep


def bench(fn, *, warmup: int = 3, reps: int = 20, cuda_graph: bool = False) -> dict:
    """Median / p20 / p80 time of fn() in milliseconds (GPU: over gpu_rep_ms() of GPU time; CPU: `reps` runs
    after `warmup`)."""
    if on_gpu():
        import triton.testing as tt

        rep = gpu_rep_ms()
        if cuda_graph:
            ms = tt.do_bench_cudagraph(fn, rep=rep)
            return {"ms": ms, "p20": ms, "p80": ms}
        med, p20, p80 = tt.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=rep / 4, rep=rep)
        return {"ms": med, "p20": p20, "p80": p80}
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return {"ms": statistics.median(times), "p20": times[int(0.2 * (len(times) - 1))],
            "p80": times[int(0.8 * (len(times) - 1))]}


def results_dir() -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", device_name())
    d = RESULTS_ROOT / safe
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_csv(suite: str, rows: list[dict]) -> Path:
    """Write rows (dicts with the same keys) plus the environment columns to results/<device>/<suite>.csv."""
    path = results_dir() / f"{suite}.csv"
    env = env_info()
    rows = [{**r, **env} for r in rows]
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())  # a failed run never leaves a truncated result behind
    return path


def print_table(rows: list[dict], cols: list[str] | None = None) -> None:
    """Print rows as aligned columns (default: every key that occurs, in first-seen order)."""
    if not rows:
        return
    if cols is None:
        cols = []
        for r in rows:
            cols += [k for k in r if k not in cols]

    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.rjust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).rjust(widths[c]) for c in cols))


def suite_main(suite: str, run, columns: list[str] | None = None, description: str | None = None,
               argv: list[str] | None = None) -> list[dict]:
    """Command line of one suite script: `--quick`, run, print the environment and table, write the CSV."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="fewer/smaller configurations (CPU runs are always small)")
    args = ap.parse_args(argv)
    rows = run(quick=args.quick)
    print(env_info())
    print_table(rows, columns)
    print("wrote", write_csv(suite, rows))
    return rows


@contextlib.contextmanager
def backend(name: str | None):
    """Run the body with QPEFT_BACKEND=name (None: as it is), restoring the previous value."""
    old = os.environ.get("QPEFT_BACKEND")
    if name is not None:
        os.environ["QPEFT_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("QPEFT_BACKEND", None)
        else:
            os.environ["QPEFT_BACKEND"] = old


def rss_anon(pid: int) -> int:
    """Bytes of a process's anonymous memory (RssAnon in /proc/<pid>/status): what a load or a step really
    allocates; memory-mapped checkpoint pages are page cache and not counted."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0
