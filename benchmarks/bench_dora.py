"""DoRA vs LoRA on one 4-bit layer, forward + backward (dx, dA, dB, dmagnitude), side by side in one process:

  qpeft_qlora   qpeft.LoraLinear on QLinearNF4 (NF4, blocksize 64, double quant)
  qpeft_qdora   the same with use_dora=True (qpeft::dora_weight_norm streams the 4-bit weight once, then the fused
                LoRA op scaled per output column)
  peft_qlora    PEFT LoRA on bitsandbytes Linear4bit (NF4, double quant)
  peft_qdora    PEFT DoRA on bitsandbytes Linear4bit (dequantizes the whole weight for the norm on every forward)
  qpeft_norm    qpeft::dora_weight_norm alone (the DoRA-only work of a qpeft forward besides the column scale)

`vs_lora` is each DoRA provider's time over its own framework's LoRA time (the issue's target: qpeft <= 1.3x;
PEFT's DoRA on bitsandbytes is reported ~2x). x requires grad (as inside a network), alpha = 2 r, dropout 0,
random B and magnitude != norm so nothing can be skipped.
GPU: bf16, r in {16, 64}, (K, N) in {(4096, 4096), (4096, 14336)}, M in {512, 4096}.
CPU: fp32, tiny shapes, so the suite always runs (CPU times say nothing about the kernels).
Writes benchmarks/results/<device>/dora.csv.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import bench, on_gpu, suite_main  # noqa: E402

PROVIDERS = ("qpeft_qlora", "qpeft_qdora", "peft_qlora", "peft_qdora", "qpeft_norm")
LORA_OF = {"qpeft_qdora": "qpeft_qlora", "peft_qdora": "peft_qlora", "qpeft_norm": "qpeft_qlora"}


def grid(quick: bool) -> list[tuple[int, int, int, int]]:
    """(K, N, M, r) configurations."""
    if not on_gpu():
        shapes, ms, ranks = [(256, 256), (256, 512)], [64], ([8] if quick else [8, 16])
    elif quick:
        shapes, ms, ranks = [(4096, 4096)], [4096], [16]
    else:
        shapes, ms, ranks = [(4096, 4096), (4096, 14336)], [512, 4096], [16, 64]
    return [(K, N, M, r) for K, N in shapes for M in ms for r in ranks]


def _bnb_linear4bit(linear: nn.Linear, dtype: torch.dtype, device) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone().cpu(), requires_grad=False, compress_statistics=True,
                                 quant_type="nf4")
    q = q.to(device)
    q.support_avx512bf16_for_cpu = False  # bitsandbytes' CPU repack computes in bf16 (see test_peft_bnb_parity)
    return q


def _peft(base: nn.Module, r: int, use_dora: bool):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(nn.Sequential(base), LoraConfig(target_modules=["0"], r=r, lora_alpha=2 * r,
                                                           use_dora=use_dora))
    return model.base_model.model[0]


def build(provider: str, linear: nn.Linear, r: int, dtype: torch.dtype, device) -> nn.Module:
    from qpeft.modules.lora_linear import LoraLinear
    from qpeft.modules.qlinear_nf4 import QLinearNF4

    base = copy.deepcopy(linear).requires_grad_(False)
    if provider in ("qpeft_qlora", "qpeft_qdora", "qpeft_norm"):
        return LoraLinear(QLinearNF4.from_linear(base, compute_dtype=dtype), r=r, lora_alpha=2 * r,
                          use_dora=provider != "qpeft_qlora")
    if provider in ("peft_qlora", "peft_qdora"):
        return _peft(_bnb_linear4bit(base, dtype, device), r, use_dora=provider == "peft_qdora")
    raise ValueError(provider)


def _randomize(layer: nn.Module) -> None:
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
            elif "lora_magnitude_vector" in n:
                p.mul_(1.1)


def _step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    def fn():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(dy)
    return fn


def _norm_only(layer: nn.Module):
    from qpeft.autograd.dora import dora_weight_norm

    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    return lambda: dora_weight_norm(layer.base_layer, A, B, s)


def run(quick: bool = False) -> list[dict]:
    device = "cuda" if on_gpu() else "cpu"
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    rows = []
    for K, N, M, r in grid(quick):
        torch.manual_seed(0)
        linear = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
        x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, N, device=device, dtype=dtype)
        times = {}
        for provider in PROVIDERS:
            row = dict(K=K, N=N, M=M, r=r, provider=provider, dtype=str(dtype).split(".")[-1])
            try:
                layer = build(provider, linear, r, dtype, device).train()
                _randomize(layer)
                t = bench(_norm_only(layer) if provider == "qpeft_norm" else _step(layer, x, dy))
            except Exception as e:  # a provider that cannot run here (e.g. bnb without its backend)
                rows.append({**row, "ms": float("nan"), "p20": float("nan"), "p80": float("nan"),
                             "vs_lora": float("nan"), "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            times[provider] = t["ms"]
            lora = times.get(LORA_OF.get(provider, ""))
            rows.append({**row, "ms": t["ms"], "p20": t["p20"], "p80": t["p80"],
                         "vs_lora": t["ms"] / lora if lora else float("nan"), "error": ""})
            del layer
    return rows


COLUMNS = ["K", "N", "M", "r", "provider", "dtype", "ms", "vs_lora", "error"]


def main() -> None:
    suite_main("dora", run, COLUMNS, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
