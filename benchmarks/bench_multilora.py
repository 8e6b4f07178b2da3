"""Many LoRA adapters in one batch (inference), one layer, tokens/s side by side in one process:

  base          the frozen base layer alone (the floor)
  qpeft_single  qpeft.LoraLinear with one active adapter, the same batch (the issue's <= 1.3x bar)
  qpeft_multi   qpeft.LoraLinear(x, adapter_names=[...]): base once + qpeft::lora_shrink/expand_gathered
  peft_multi    PEFT's LoRA layer with the same adapters, forward(x, adapter_names=[...]) (its per-adapter loop)

Batches: `seqs` sequences, `tokens` rows each (decode: 1, prefill: many), `adapters` distinct adapters
assigned round-robin (each present), ranks cycling over `ranks` (heterogeneous: 8, 16, 32, 64 on a GPU).
The base is NF4 (QLinearNF4 for qpeft, bitsandbytes Linear4bit for PEFT) on a GPU in bf16, nn.Linear in fp32
on the CPU (tiny shapes, so the suite always runs; CPU times say nothing about the kernels).
GPU grid (the issue's): seqs 1..64, adapters 1..64, (K, N) = (4096, 4096); the targets are qpeft_multi
>= 10x peft_multi at 32 adapters in a batch of 32, and qpeft_multi <= 1.3x qpeft_single.
Writes benchmarks/results/<device>/multilora.csv.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import bench, on_gpu, suite_main  # noqa: E402

PROVIDERS = ("base", "qpeft_single", "qpeft_multi", "peft_multi")


def grid(quick: bool) -> list[dict]:
    if not on_gpu():
        K = N = 256
        cases = [(8, 1, 8), (32, 1, 8), (32, 1, 32), (4, 32, 4)] if not quick else [(8, 1, 8), (4, 16, 4)]
        ranks = (8, 16)
    else:
        K = N = 4096
        cases = [(1, 1, 1), (8, 1, 8), (32, 1, 1), (32, 1, 8), (32, 1, 32), (64, 1, 64), (8, 512, 8), (4, 2048, 4)]
        if quick:
            cases = [(32, 1, 32), (8, 512, 8)]
        ranks = (8, 16, 32, 64)
    return [dict(K=K, N=N, seqs=s, tokens=t, adapters=a, ranks=ranks) for s, t, a in cases]


def _names(n: int) -> list[str]:
    return [f"a{i}" for i in range(n)]


def _qpeft_layer(base: nn.Module, adapters: int, ranks, dtype):
    from qpeft.modules.lora_linear import LoraLinear
    from qpeft.modules.qlinear_nf4 import QLinearNF4

    b = QLinearNF4.from_linear(copy.deepcopy(base), compute_dtype=dtype) if on_gpu() else copy.deepcopy(base)
    layer = None
    for i, n in enumerate(_names(adapters)):
        r = ranks[i % len(ranks)]
        if layer is None:
            layer = LoraLinear(b, r=r, lora_alpha=2 * r, init="random", adapter_name=n)
        else:
            layer.add_adapter(n, r=r, lora_alpha=2 * r, init="random")
    return layer.eval()


def _peft_layer(base: nn.Module, adapters: int, ranks, dtype, device):
    from peft import LoraConfig, get_peft_model

    b = copy.deepcopy(base)
    if on_gpu():
        from benchmarks.bench_lora import _bnb_linear4bit

        b = _bnb_linear4bit(b, dtype, device)
    names = _names(adapters)
    model = None
    for i, n in enumerate(names):
        r = ranks[i % len(ranks)]
        cfg = LoraConfig(target_modules=["0"], r=r, lora_alpha=2 * r, init_lora_weights=False)
        if model is None:
            model = get_peft_model(nn.Sequential(b), cfg, adapter_name=n)
        else:
            model.add_adapter(n, cfg)
    return model.base_model.model[0].eval()


def run(quick: bool = False) -> list[dict]:
    device = "cuda" if on_gpu() else "cpu"
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    rows = []
    for case in grid(quick):
        K, N, S, T, L, ranks = (case[k] for k in ("K", "N", "seqs", "tokens", "adapters", "ranks"))
        torch.manual_seed(0)
        base = nn.Linear(K, N, bias=False, device=device, dtype=dtype).requires_grad_(False)
        x = torch.randn(S, T, K, device=device, dtype=dtype)
        names = [_names(L)[i % L] for i in range(S)]
        base_ms = None
        for provider in PROVIDERS:
            try:
                if provider == "base":
                    layer = base
                    fn = lambda: layer(x)  # noqa: E731
                elif provider.startswith("qpeft"):
                    layer = _qpeft_layer(base, L, ranks, dtype)
                    fn = (lambda: layer(x)) if provider == "qpeft_single" else (lambda: layer(x, adapter_names=names))
                else:
                    layer = _peft_layer(base, L, ranks, dtype, device)
                    fn = lambda: layer(x, adapter_names=names)  # noqa: E731
                with torch.no_grad():
                    t = bench(fn)
            except Exception as e:  # a provider that cannot run here (e.g. bnb without its GPU backend)
                rows.append(dict(K=K, N=N, seqs=S, tokens=T, adapters=L, ranks="/".join(map(str, ranks)),
                                 provider=provider, dtype=str(dtype).split(".")[-1], ms=float("nan"),
                                 tokens_per_s=float("nan"), vs_base=float("nan"),
                                 error=f"{type(e).__name__}: {e}"[:200]))
                continue
            if provider == "base":
                base_ms = t["ms"]
            rows.append(dict(K=K, N=N, seqs=S, tokens=T, adapters=L, ranks="/".join(map(str, ranks)),
                             provider=provider, dtype=str(dtype).split(".")[-1], ms=t["ms"],
                             tokens_per_s=S * T / (t["ms"] / 1e3), vs_base=t["ms"] / base_ms if base_ms else
                             float("nan"), error=""))
    return rows


COLUMNS = ["K", "N", "seqs", "tokens", "adapters", "ranks", "provider", "dtype", "ms", "tokens_per_s", "vs_base",
           "error"]


def main() -> None:
    suite_main("multilora", run, COLUMNS, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
