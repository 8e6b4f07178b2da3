"""Shared measurement of the fused training kernels (bench_rmsnorm, bench_rope, bench_swiglu, bench_lora_mlp,
bench_lora_qkv): forward, backward and forward + backward times, and the peak memory of a forward + backward.

A provider is a function run() -> output tensor or tuple of tensors, built from inputs that require grad; it
rebuilds what it must per call (e.g. a clone of q/k for the in-place RoPE, applied to every provider alike).
  fwd_ms      run() under torch.no_grad()
  bwd_ms      backward alone: one forward, then autograd.backward(outputs, grads, retain_graph=True) timed
  fwd_bwd_ms  run() + backward
  peak_mib    GPU only: max_memory_allocated during one forward + backward, above what was held before it
Liger-Kernel providers are included when liger_kernel imports (a row with the error otherwise).
"""
from __future__ import annotations

import torch

from benchmarks.common import bench, on_gpu


def liger_missing() -> str | None:
    """None when Liger-Kernel imports, else the reason (its kernels need a CUDA device too)."""
    try:
        import liger_kernel  # noqa: F401
    except Exception as e:
        return f"liger_kernel not installed ({type(e).__name__})"
    if not on_gpu():
        return "Liger-Kernel needs a CUDA device"
    return None


def _outs(y) -> tuple:
    return y if isinstance(y, tuple) else (y,)


def measure(run, grads, leaves) -> dict:
    """Times and peak memory of one provider. grads: one tensor per output of run(); leaves: the inputs whose
    .grad is cleared between repetitions."""
    def clear():
        for t in leaves:
            t.grad = None

    def fwd():
        with torch.no_grad():
            run()

    def fwd_bwd():
        clear()
        torch.autograd.backward(_outs(run()), grads)

    held = {}

    def bwd():
        torch.autograd.backward(held["outs"], grads, retain_graph=True)

    f = bench(fwd)
    fb = bench(fwd_bwd)
    held["outs"] = _outs(run())
    b = bench(bwd)
    held.clear()
    clear()
    return {"fwd_ms": f["ms"], "bwd_ms": b["ms"], "fwd_bwd_ms": fb["ms"], "peak_mib": peak_mib(fwd_bwd)}


def peak_mib(fn) -> float | None:
    if not on_gpu():
        return None
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - held) / 2**20


def run_providers(config: dict, providers: dict, make) -> list[dict]:
    """One row per provider: make(name) -> (run, grads, leaves), or raises (the row records the error)."""
    rows = []
    for name, skip in providers.items():
        row = {**config, "provider": name}
        if skip:
            rows.append({**row, "error": skip})
            continue
        try:
            run, grads, leaves = make(name)
            row.update(measure(run, grads, leaves))
            row["error"] = ""
        except Exception as e:  # a provider that cannot run here
            row["error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
    base = next((r for r in rows if r["provider"] == "hf_eager" and "fwd_bwd_ms" in r), None)
    for r in rows:
        if base is not None and "fwd_bwd_ms" in r:
            r["speedup_vs_eager"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return rows


COLUMNS_TAIL = ["provider", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "speedup_vs_eager", "peak_mib", "error"]
