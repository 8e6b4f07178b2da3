"""The LoRA MLP block: qpeft.lora_mlp (one autograd node) vs the unfused paths on the same weights: transformers'
LlamaMLP with PEFT LoRA on bitsandbytes Linear4bit (QLoRA as users run it) and with qpeft's LoraLinear modules
(NF4), plus the dense-base pair (PEFT LoRA on nn.Linear vs lora_mlp on the same nn.Linear weights): forward,
backward, forward + backward, peak memory (GPU). LoRA on gate, up and down, r = 16, alpha = 32, dropout 0; x
requires grad, as inside a network; B is random so no path can skip the adapter.

    python -m benchmarks.bench_lora_mlp [--quick]

GPU: bf16, Llama-3-8B's MLP (H = 4096, I = 14336), tokens M in {2048, 8192}. CPU: fp32, H = 256, I = 512.
Writes benchmarks/results/<device>/lora_mlp.csv.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from benchmarks.common import on_gpu, suite_main
from benchmarks.fused_kernels import COLUMNS_TAIL, run_providers

R = 16
TARGETS = ("gate_proj", "up_proj", "down_proj")


def shapes(quick: bool) -> list[tuple[int, int, int]]:
    """(M tokens, H, I)."""
    if not on_gpu():
        return [(128, 256, 512)]
    full = [(2048, 4096, 14336), (8192, 4096, 14336)]
    return full[:1] if quick else full


def _randomize_b(module: nn.Module) -> None:
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)


def build_mlp(H: int, I: int, dtype, device) -> nn.Module:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = LlamaConfig(hidden_size=H, intermediate_size=I, hidden_act="silu")
    return LlamaMLP(cfg).to(device, dtype).requires_grad_(False)


def qpeft_modules(mlp: nn.Module, dtype, nf4: bool) -> nn.Module:
    """A copy of mlp with each projection a qpeft LoraLinear (over QLinearNF4 when nf4)."""
    from qpeft.modules.lora_linear import LoraLinear
    from qpeft.modules.qlinear_nf4 import QLinearNF4

    out = copy.deepcopy(mlp)
    for name in TARGETS:
        lin = getattr(out, name)
        base = QLinearNF4.from_linear(lin, compute_dtype=dtype) if nf4 else lin
        setattr(out, name, LoraLinear(base, r=R, lora_alpha=2 * R))
    _randomize_b(out)
    return out.train()


def peft_modules(mlp: nn.Module, dtype, device, nf4: bool) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    out = copy.deepcopy(mlp)
    if nf4:
        from benchmarks.bench_lora import _bnb_linear4bit

        for name in TARGETS:
            setattr(out, name, _bnb_linear4bit(getattr(out, name), dtype, device))
    model = get_peft_model(out, LoraConfig(target_modules=list(TARGETS), r=R, lora_alpha=2 * R))
    _randomize_b(model)
    return model.train()


def run(quick: bool = False) -> list[dict]:
    from qpeft.autograd.lora_mlp import lora_mlp

    dev = "cuda" if on_gpu() else "cpu"
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    rows = []
    for M, H, I in shapes(quick):
        torch.manual_seed(0)
        mlp = build_mlp(H, I, dtype, dev)
        x = torch.randn(M, H, device=dev, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, H, device=dev, dtype=dtype)

        def make(name):
            if name in ("peft_qlora", "peft_lora"):
                mod = peft_modules(mlp, dtype, dev, nf4=name == "peft_qlora")
                fn = lambda: mod(x)  # noqa: E731
            elif name == "qpeft_unfused":
                mod = qpeft_modules(mlp, dtype, nf4=True)
                fn = lambda: mod(x)  # noqa: E731
            elif name in ("qpeft_fused", "qpeft_fused_dense"):
                mod = qpeft_modules(mlp, dtype, nf4=name == "qpeft_fused")
                fn = lambda: lora_mlp(x, mod.gate_proj, mod.up_proj, mod.down_proj, "silu", training=True)  # noqa: E731
            else:
                raise ValueError(name)
            params = [p for p in mod.parameters() if p.requires_grad]
            return fn, (dy,), (x, *params)

        providers = {"peft_qlora": None, "qpeft_unfused": None, "qpeft_fused": None, "peft_lora": None,
                     "qpeft_fused_dense": None}
        rows += run_providers({"M": M, "H": H, "I": I, "r": R, "dtype": str(dtype).split(".")[-1]}, providers,
                              make)
        base = next((r for r in rows if r["provider"] == "peft_qlora" and r["M"] == M and "fwd_bwd_ms" in r), None)
        for r in rows:
            if base is not None and r["M"] == M and "fwd_bwd_ms" in r:
                r["speedup_vs_peft_qlora"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return rows


COLUMNS = ["M", "H", "I", "r", "dtype", *COLUMNS_TAIL[:4], "speedup_vs_peft_qlora", *COLUMNS_TAIL[5:]]


def main() -> None:
    suite_main("lora_mlp", run, COLUMNS, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
