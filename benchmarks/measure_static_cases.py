"""Measure on a GPU exactly the cases the static sm_90 model predicts (benchmarks/static_sm90.py), so one GPU call
calibrates it: each Llama-3-8B / 70B layer shape x M in static_sm90.MS, forward and dx, bf16, NF4 blocksize 64
with double quant; the op as users get it (auto dispatch) and bf16 cuBLAS side by side, median of
triton.testing.do_bench with weights rotated over enough copies that they come from HBM, not L2, and decode
sizes (M <= 16) also per call under a CUDA graph. Writes benchmarks/results/<gpu>/static_cases.csv; then
`python -m benchmarks.static_sm90 --calibrate <that csv>` puts measured next to predicted.

    python -m benchmarks.measure_static_cases [--shapes 8b|70b|all] [--ms 1,16,...]   (tests/run_gpu.sh quick)
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import bench, env_info, on_gpu, print_table, write_csv
from benchmarks.static_sm90 import MS, SHAPES

L2_FLUSH_BYTES = 150e6  # 3x the 50 MB L2


def _case(K: int, N: int, ms: list[int], directions: tuple[str, ...], device: str = "cuda",
          flush_bytes: float = L2_FLUSH_BYTES) -> list[dict]:
    """The rows of one layer shape. `device` / `flush_bytes` are the CPU test's seam (tests/ops/
    test_nf4_matmul_sm90.py runs this on tiny shapes so the one GPU call that calibrates the model cannot fail on
    the script)."""
    import qpeft
    from qpeft.autograd.nf4_matmul import weight_args
    from qpeft.ops.nf4_matmul_dispatch import plan

    dev, dtype = device, torch.bfloat16
    copies = max(1, math.ceil(flush_bytes / (N * K * 0.52)))
    q_args, dense = [], []
    for _ in range(copies):
        W = torch.randn(N, K, device=dev, dtype=dtype) / math.sqrt(K)
        packed, state = qpeft.quantize_4bit(W, blocksize=64, quant_type="nf4", double_quant=True)
        q_args.append(weight_args(packed, state))
    dense_copies = max(1, math.ceil(flush_bytes / (N * K * 2)))
    dense = [torch.randn(N, K, device=dev, dtype=dtype) / math.sqrt(K) for _ in range(dense_copies)]
    rows = []
    for M in ms:
        for direction in directions:
            a = torch.randn(M, K if direction == "fwd" else N, device=dev, dtype=dtype)

            def ours(i):
                p, ab, c, bs, n, k, na, nc, off = q_args[i % copies]
                if direction == "fwd":
                    return torch.ops.qpeft.nf4_matmul(a, p, ab, c, bs, n, na, nc, off, None, None, None, 0.0)
                return torch.ops.qpeft.nf4_matmul_dx(a, p, ab, c, bs, k, na, nc, off, None, None, 0.0)

            def cublas(i):
                w = dense[i % dense_copies]
                return a @ w.t() if direction == "fwd" else a @ w

            row = {"K": K, "N": N, "M": M, "direction": direction,
                   "backend": plan(direction, M, N, K, dtype, torch.device(dev)).backend}
            for name, fn in (("qpeft", ours), ("cublas", cublas)):
                state = {"i": 0}

                def step(fn=fn, state=state):
                    state["i"] += 1
                    return fn(state["i"])

                row[f"{name}_ms"] = bench(step)["ms"]
                if M <= 16:
                    n_calls = max(copies, dense_copies)
                    row[f"{name}_graph_ms"] = bench(lambda fn=fn: [fn(i) for i in range(n_calls)],
                                                    cuda_graph=True)["ms"] / n_calls
            rows.append(row)
    return rows


def run(shapes: str = "all", ms=MS, directions=("fwd", "dx"), checkpoint=None) -> list[dict]:
    """The rows of every layer shape; `checkpoint(rows so far)` after each shape (main writes the CSV there, so a
    run stopped by tests/run_gpu.sh's time bound (SIGTERM: no Python cleanup runs) still leaves the shapes it
    finished for `static_sm90 --calibrate`)."""
    if not on_gpu():
        raise SystemExit("measure_static_cases needs a CUDA GPU (the static model itself runs on the CPU)")
    rows = []
    for model, layers in SHAPES.items():
        if shapes not in ("all", model):
            continue
        for layer, K, N in layers:
            for r in _case(K, N, list(ms), tuple(directions)):
                rows.append({"model": model, "layer": layer, **r})
                print(rows[-1], flush=True)
            if checkpoint is not None:
                checkpoint(rows)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="all", choices=["all", "8b", "70b"])
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--directions", default="fwd,dx")
    args = ap.parse_args(argv)
    rows = run(args.shapes, [int(m) for m in args.ms.split(",")], tuple(args.directions.split(",")),
               checkpoint=lambda rows: write_csv("static_cases", rows))  # atomic: never a half-written file
    print(env_info())
    print_table(rows)
    print("wrote", write_csv("static_cases", rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
