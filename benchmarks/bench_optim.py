"""Optimizer state memory and step time on a LoRA-shaped parameter set, side by side in one process:

  torch_adamw    torch.optim.AdamW(fused=True), fp32 states (the bar: 8 state bytes per parameter)
  qpeft_cuda     qpeft.optim.AdamW8bit on the CUDA C++ backend (QPEFT_BACKEND=cuda)      [GPU]
  qpeft_triton   qpeft.optim.AdamW8bit on the Triton backend (QPEFT_BACKEND=triton)      [GPU]
  qpeft_graph    qpeft.optim.AdamW8bit(capturable=True), step() captured in a CUDA graph, timed as
                 graph.replay() (the CUDA C++ backend; no Python in the loop)                [GPU]
  qpeft_torch    qpeft.optim.AdamW8bit on the PyTorch reference (the CPU path)            [CPU]
  bnb            bitsandbytes.optim.AdamW8bit 0.50 (CUDA kernels + a sync per tensor on a GPU, its CPU path on CPU)

Parameter set: Llama-3-8B all-linear LoRA r=16 (q, k, v, o, gate, up, down per layer; A (16, in), B (out, 16);
32 layers = 448 tensors, 41.9 M parameters). On the CPU only 2 layers (28 tensors, 2.6 M parameters) so the suite
runs in seconds on 2 cores: CPU times say nothing about the GPU kernels, only about the CPU path.
state_bytes_per_param = bytes of all per-parameter state tensors (codes, absmax, fp32 states; the code books are
shared, 2 KB per optimizer) / parameters (target for 8-bit Adam: 2 + 8/256 = 2.03 <= 2.04).
GPU targets (issue 13): qpeft's multi-tensor step <= 1.2x torch's fused fp32 AdamW, >= 3x faster than bnb.
Writes benchmarks/results/<device>/optim.csv and prints a table.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import bench, env_info, on_gpu, print_table, write_csv  # noqa: E402
from benchmarks.common import backend as _backend  # noqa: E402

HIDDEN, KV, INTER, RANK = 4096, 1024, 14336, 16
LINEARS = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER),
           (INTER, HIDDEN)]  # (in, out) of q, k, v, o, gate, up, down


def lora_params(layers: int, device, dtype) -> list[torch.nn.Parameter]:
    ps = []
    for _ in range(layers):
        for fan_in, fan_out in LINEARS:
            ps.append(torch.nn.Parameter(torch.randn(RANK, fan_in, device=device, dtype=dtype) * 0.01))
            ps.append(torch.nn.Parameter(torch.randn(fan_out, RANK, device=device, dtype=dtype) * 0.01))
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-3
    return ps


def providers() -> list[str]:
    if on_gpu():
        return ["torch_adamw", "qpeft_cuda", "qpeft_triton", "qpeft_graph", "bnb"]
    return ["torch_adamw", "qpeft_torch", "bnb"]


def _optimizer(provider: str, ps):
    if provider == "torch_adamw":
        return torch.optim.AdamW(ps, lr=1e-4, fused=True)
    if provider == "bnb":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(ps, lr=1e-4)
    import qpeft.optim

    return qpeft.optim.AdamW8bit(ps, lr=1e-4, capturable=provider == "qpeft_graph")


def _graph_replay(opt):
    """opt.step captured in a CUDA graph (after the warm-up step run by the caller); returns graph.replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph.replay


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v) and not k.startswith("qmap") and k != "step":
                total += v.numel() * v.element_size()
    return total


def run(quick: bool = False) -> list[dict]:
    device = "cuda" if on_gpu() else "cpu"
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    layers = 32 if on_gpu() else 2
    reps = 5 if quick or not on_gpu() else 20
    rows = []
    for provider in providers():
        backend = {"qpeft_cuda": "cuda", "qpeft_triton": "triton", "qpeft_torch": "torch",
                   "qpeft_graph": "cuda"}.get(provider)
        ps = lora_params(layers, device, dtype)
        n = sum(p.numel() for p in ps)
        row = {"provider": provider, "set": f"llama8b-r16-{layers}layers", "tensors": len(ps), "params": n,
               "dtype": str(dtype).split(".")[-1]}
        with _backend(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                opt = _optimizer(provider, ps)
                opt.step()  # states allocated, kernels built / compiled
                row["state_bytes_per_param"] = state_bytes(opt) / n
                step = _graph_replay(opt) if provider == "qpeft_graph" else opt.step
                t = bench(step, warmup=2, reps=reps)
                row.update(ms=t["ms"], p20_ms=t["p20"], p80_ms=t["p80"], mparam_s=n / (t["ms"] * 1e-3) / 1e6)
            except Exception as e:  # e.g. the CUDA extension does not build, bnb missing
                row["error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
        del ps
    base = {r["provider"]: r for r in rows if "ms" in r}
    for r in rows:
        if "ms" in r:
            if "torch_adamw" in base:
                r["x_of_torch_fused"] = r["ms"] / base["torch_adamw"]["ms"]
            if "bnb" in base:
                r["speedup_vs_bnb"] = base["bnb"]["ms"] / r["ms"]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args(argv)
    rows = run(args.quick)
    path = write_csv("optim", rows)
    print(env_info())
    print_table(rows, ["provider", "set", "tensors", "params", "state_bytes_per_param", "ms", "x_of_torch_fused",
                       "speedup_vs_bnb", "error"])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
