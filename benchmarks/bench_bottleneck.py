"""Fused bottleneck adapter block vs the unfused nn modules (and torch.compile of them), forward and fwd+bwd.

    python -m benchmarks.bench_bottleneck            # GPU: Llama/BERT hidden sizes; CPU: small shapes
    python -m benchmarks.bench_bottleneck --quick    # a couple of shapes

Providers, one process, same inputs:
  unfused  BottleneckAdapter(fused=False): down Linear -> act -> up Linear -> residual add (4+ kernels)
  compile  torch.compile(unfused module) (Inductor fuses the elementwise ops around the two GEMMs)
  fused    BottleneckAdapter(fused=True): qpeft::bottleneck_adapter (the Triton kernel on a GPU; on the CPU
           the op runs its PyTorch reference, so CPU rows only check that the suite runs)
Columns: median ms (p20/p80), effective GB/s over the hidden-state bytes a pass must move (x read + y written
forward; dy, x read + dx written backward), peak MB on GPU. Results: benchmarks/results/<device>/bottleneck.csv.
"""
from __future__ import annotations


import torch

from benchmarks.common import bench, on_gpu, suite_main
from qpeft.tuners.bottleneck import BottleneckAdapter


def shapes(quick: bool) -> list[tuple[int, int, int]]:
    """(tokens M, hidden H, bottleneck R): reduction factor 16 as in Houlsby/Pfeiffer defaults."""
    if not on_gpu():
        return [(256, 256, 16), (509, 384, 24)] if not quick else [(256, 256, 16)]
    full = [(4096, 768, 48), (8192, 768, 48), (4096, 2048, 128), (8192, 4096, 256), (16384, 4096, 256),
            (4093, 4096, 64)]
    return full[:2] if quick else full


def run(quick: bool = False) -> list[dict]:
    dev = "cuda" if on_gpu() else "cpu"
    dtypes = [torch.bfloat16, torch.float16] if on_gpu() else [torch.float32]
    rows = []
    for dtype in dtypes:
        for M, H, R in shapes(quick):
            torch.manual_seed(0)
            fused = BottleneckAdapter(H, R, "swish", init="bert", fused=True, device=dev, dtype=dtype)
            unfused = BottleneckAdapter(H, R, "swish", init="bert", fused=False, device=dev, dtype=dtype)
            unfused.load_state_dict(fused.state_dict())
            providers = {"unfused": unfused, "fused": fused}
            if on_gpu() or not quick:
                providers["compile"] = torch.compile(unfused)
            x = torch.randn(M, H, device=dev, dtype=dtype)
            xg = x.clone().requires_grad_(True)
            dy = torch.randn_like(x)
            bytes_fwd = 2 * M * H * x.element_size()
            bytes_bwd = 3 * M * H * x.element_size()
            for name, mod in providers.items():
                def fwd():
                    with torch.no_grad():
                        mod(x)

                def full():
                    y = mod(xg)
                    y.backward(dy)
                    xg.grad = None
                    for p in mod.parameters():
                        p.grad = None

                for mode, fn, nbytes in (("fwd", fwd, bytes_fwd), ("fwd+bwd", full, bytes_fwd + bytes_bwd)):
                    if on_gpu():
                        torch.cuda.reset_peak_memory_stats()
                    t = bench(fn, reps=10 if not on_gpu() else 20)
                    rows.append({"dtype": str(dtype).replace("torch.", ""), "M": M, "H": H, "R": R, "mode": mode,
                                 "provider": name, "ms": t["ms"], "p20": t["p20"], "p80": t["p80"],
                                 "GB/s": nbytes / (t["ms"] * 1e-3) / 1e9,
                                 "peak_MB": torch.cuda.max_memory_allocated() / 2**20 if on_gpu() else float("nan")})
    # speedup of fused over unfused, per shape and mode
    base = {(r["dtype"], r["M"], r["H"], r["R"], r["mode"]): r["ms"] for r in rows if r["provider"] == "unfused"}
    for r in rows:
        r["speedup_vs_unfused"] = base[(r["dtype"], r["M"], r["H"], r["R"], r["mode"])] / r["ms"]
    return rows


COLUMNS = ["dtype", "M", "H", "R", "mode", "provider", "ms", "p20", "p80", "GB/s", "peak_MB", "speedup_vs_unfused"]


def main() -> None:
    suite_main("bottleneck", run, COLUMNS, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
