"""PNG plots of benchmark rows: time vs M (tokens) per shape, one line per provider, the floor dashed.

Rows come in two layouts, both handled:
- long: a "provider" column and a "ms" column (bench_lora, bench_bottleneck);
- wide: one column of milliseconds per provider (bench_nf4_matmul: dense, qpeft_*, bnb, ...).
The floor is an "ideal*_ms" column when the suite computes one (GPU nf4_matmul), else
max(bytes moved / copy bandwidth, FLOPs / matmul peak) from the measured ceilings of this machine.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from qpeft._io import atomic_paths

__all__ = ["plot_speed_vs_m", "provider_columns", "shape_key", "roofline_ms"]

# columns that are never a provider's time
_NOT_PROVIDER = re.compile(r"^(K|N|M|r|R|H|p20|p80|p20_ms|p80_ms|peak.*|.*_frac|speedup.*|.*vs_.*|x_vs.*|GB/s|tb_s|"
                           r"ideal.*|error|ms|blocksize)$")
_SHAPE_COLS = ("K", "N", "H", "R", "r", "dir", "mode", "dtype", "op", "shape")


def provider_columns(rows: list[dict]) -> list[str]:
    """Wide layout: numeric columns that hold a provider's milliseconds."""
    cols: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in cols and isinstance(v, float) and not _NOT_PROVIDER.match(k):
                cols.append(k)
    return cols


def shape_key(row: dict) -> tuple:
    return tuple((c, row[c]) for c in _SHAPE_COLS if c in row)


def roofline_ms(M: int, N: int, K: int, bits_per_weight: float, act_bytes: int, bandwidth: float,
                flops: float) -> float:
    """max(weight + activation bytes / bandwidth, 2MNK / flops) in ms: the fastest any kernel can be."""
    moved = N * K * bits_per_weight / 8 + (M * K + M * N) * act_bytes
    return 1e3 * max(moved / bandwidth, 2 * M * N * K / flops)


def _series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    if rows and "provider" in rows[0]:
        for r in rows:
            if isinstance(r.get("ms"), float):
                out[str(r["provider"])].append((r["M"], r["ms"]))
    else:
        for c in provider_columns(rows):
            out[c] += [(r["M"], r[c]) for r in rows if isinstance(r.get(c), float)]
    return {k: sorted(v) for k, v in out.items()}


def plot_speed_vs_m(rows: list[dict], suite: str, out_dir: Path, ceilings: dict | None = None,
                    bits_per_weight: float = 4.127) -> list[Path]:
    """One PNG per shape for rows that have an "M" column; returns the paths written ([] if nothing to plot
    or matplotlib is missing). ceilings: {"bandwidth_Bps", "matmul_flops"} for the computed floor."""
    rows = [r for r in rows if "M" in r and not r.get("error")]
    if not rows:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots: matplotlib is not installed (pip install matplotlib); no PNG written")
        return []
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[shape_key(r)].append(r)
    paths = []
    for key, grp in groups.items():
        series = _series(grp)
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, pts in series.items():
            ax.plot([m for m, _ in pts], [t for _, t in pts], marker="o", label=name)
        floor = _floor(grp, ceilings, bits_per_weight)
        if floor:
            ax.plot([m for m, _ in floor], [t for _, t in floor], "k--", label="floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("time per call (ms), lower is faster")
        title = ", ".join(f"{k}={v}" for k, v in key)
        ax.set_title(f"{suite}: {title}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{suite}_{'_'.join(f'{k}{v}' for k, v in key)}")
        path = Path(out_dir) / f"{name}.png"
        with atomic_paths(path) as (tmp,):  # a result plot is replaced only by a complete one
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


def _floor(rows: list[dict], ceilings: dict | None, bits: float) -> list[tuple[int, float]]:
    ideal = ([c for c in rows[0] if c.startswith("ideal") and "nf4" in c]
             or [c for c in rows[0] if c.startswith("ideal")])
    by_m: dict[int, float] = {}
    if ideal:
        for r in rows:
            by_m[r["M"]] = r[ideal[0]]
    elif ceilings and all(c in rows[0] for c in ("K", "N")):
        act = 2 if str(rows[0].get("dtype", "")) in ("bfloat16", "float16", "bf16", "fp16") else 4
        for r in rows:
            by_m[r["M"]] = roofline_ms(r["M"], r["N"], r["K"], bits, act, ceilings["bandwidth_Bps"],
                                       ceilings["matmul_flops"])
    return sorted(by_m.items())
