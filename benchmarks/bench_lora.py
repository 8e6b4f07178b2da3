"""One LoRA layer, forward + backward (dx, dA, dB), side by side in one process:

  frozen       a frozen nn.Linear in the activation dtype: the floor a LoRA layer sits on
  qpeft_lora   qpeft.LoraLinear on that nn.Linear (fused base GEMM + LoRA epilogue)
  qpeft_qlora  qpeft.LoraLinear on QLinearNF4 (NF4, blocksize 64, double quant)
  peft_lora    PEFT LoRA on the nn.Linear (fp32 adapters, PEFT's default)
  peft_qlora   PEFT LoRA on bitsandbytes Linear4bit (NF4, double quant)
  torch_compile  the plain PyTorch LoRA layer (adapters in the activation dtype) under torch.compile: the bar
               a fused kernel has to beat (style guide)

x requires grad (as inside a network), so every provider computes dx too. alpha = 2 r, dropout 0.
GPU (the issue's grid): bf16, r in {8, 16, 64}, (K, N) in {(4096, 4096), (4096, 14336)}, M in {512, 4096, 16384};
peak memory = max_memory_allocated during one step, above the memory held before it.
CPU: fp32, tiny shapes, so the suite always runs (CPU times say nothing about the kernels).
Writes benchmarks/results/<device>/lora.csv and prints a table with each provider's time / frozen.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import bench, on_gpu, suite_main  # noqa: E402

PROVIDERS = ("frozen", "qpeft_lora", "qpeft_qlora", "peft_lora", "peft_qlora", "torch_compile")


class TorchLora(nn.Module):
    """y = x W^T + s (x A^T) B^T in plain PyTorch (the reference math), for torch.compile."""

    def __init__(self, base: nn.Linear, r: int, scale: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features, device=base.weight.device,
                                               dtype=base.weight.dtype) / base.in_features**0.5)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.scale = scale

    def forward(self, x):
        return self.base(x) + self.scale * nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)


def grid(quick: bool) -> list[tuple[int, int, int, int]]:
    """(K, N, M, r) configurations."""
    if not on_gpu():
        shapes, ms, ranks = [(256, 256), (256, 512)], ([64] if quick else [64, 256]), ([8] if quick else [8, 16])
    elif quick:
        shapes, ms, ranks = [(4096, 4096)], [512, 4096], [16]
    else:
        shapes, ms, ranks = [(4096, 4096), (4096, 14336)], [512, 4096, 16384], [8, 16, 64]
    return [(K, N, M, r) for K, N in shapes for M in ms for r in ranks]


def _bnb_linear4bit(linear: nn.Linear, dtype: torch.dtype, device) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone().cpu(), requires_grad=False, compress_statistics=True,
                                 quant_type="nf4")
    return q.to(device)


def _peft(base: nn.Module, r: int):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(nn.Sequential(base), LoraConfig(target_modules=["0"], r=r, lora_alpha=2 * r))
    return model.base_model.model[0]


def build(provider: str, linear: nn.Linear, r: int, dtype: torch.dtype, device) -> nn.Module:
    from qpeft.modules.lora_linear import LoraLinear
    from qpeft.modules.qlinear_nf4 import QLinearNF4

    base = copy.deepcopy(linear).requires_grad_(False)
    if provider == "frozen":
        return base
    if provider == "qpeft_lora":
        return LoraLinear(base, r=r, lora_alpha=2 * r)
    if provider == "qpeft_qlora":
        return LoraLinear(QLinearNF4.from_linear(base, compute_dtype=dtype), r=r, lora_alpha=2 * r)
    if provider == "peft_lora":
        return _peft(base, r)
    if provider == "peft_qlora":
        return _peft(_bnb_linear4bit(base, dtype, device), r)
    if provider == "torch_compile":
        return torch.compile(TorchLora(base, r, 2.0))
    raise ValueError(provider)


def _step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    def fn():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(dy)
    return fn


def _peak_mib(fn) -> float | None:
    if not on_gpu():
        return None
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - held) / 2**20


def run(quick: bool = False) -> list[dict]:
    device = "cuda" if on_gpu() else "cpu"
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    rows = []
    for K, N, M, r in grid(quick):
        torch.manual_seed(0)
        linear = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
        x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, N, device=device, dtype=dtype)
        frozen_ms = None
        for provider in PROVIDERS:
            try:
                layer = build(provider, linear, r, dtype, device).train()
                if provider != "frozen":  # random B so no path can skip the adapter
                    with torch.no_grad():
                        for n, p in layer.named_parameters():
                            if "lora_B" in n:
                                p.normal_(0, 0.01)
                fn = _step(layer, x, dy)
                t = bench(fn)
                peak = _peak_mib(fn)
            except Exception as e:  # a provider that cannot run here (e.g. bnb without its backend)
                rows.append(dict(K=K, N=N, M=M, r=r, provider=provider, dtype=str(dtype).split(".")[-1],
                                 ms=float("nan"), p20=float("nan"), p80=float("nan"), vs_frozen=float("nan"),
                                 peak_mib=None, error=f"{type(e).__name__}: {e}"[:200]))
                continue
            if provider == "frozen":
                frozen_ms = t["ms"]
            rows.append(dict(K=K, N=N, M=M, r=r, provider=provider, dtype=str(dtype).split(".")[-1], ms=t["ms"],
                             p20=t["p20"], p80=t["p80"], vs_frozen=t["ms"] / frozen_ms if frozen_ms else float("nan"),
                             peak_mib=peak, error=""))
            del layer, fn
    return rows


COLUMNS = ["K", "N", "M", "r", "provider", "dtype", "ms", "vs_frozen", "peak_mib", "error"]


def main() -> None:
    suite_main("lora", run, COLUMNS, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
