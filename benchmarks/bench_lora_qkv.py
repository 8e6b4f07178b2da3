"""The LoRA Q/K/V projections: qpeft.lora_qkv (one autograd node, one shared shrink) vs the unfused paths on the
same weights: PEFT LoRA on bitsandbytes Linear4bit q/k/v (QLoRA as users run it) and qpeft's LoraLinear modules
(NF4) called one by one, plus the dense-base pair: forward, backward, forward + backward, peak memory (GPU).
LoRA on q, k and v, r = 16, alpha = 32, dropout 0; x requires grad; B random.

    python -m benchmarks.bench_lora_qkv [--quick]

GPU: bf16, Llama-3-8B's attention (K = 4096; q 4096, k and v 1024: GQA), tokens M in {2048, 8192}.
CPU: fp32, K = 256 (q 256, k/v 64). Writes benchmarks/results/<device>/lora_qkv.csv.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from benchmarks.bench_lora_mlp import R, _randomize_b
from benchmarks.common import on_gpu, suite_main
from benchmarks.fused_kernels import COLUMNS_TAIL, run_providers

TARGETS = ("q_proj", "k_proj", "v_proj")


def shapes(quick: bool) -> list[tuple[int, int, int]]:
    """(M tokens, K, kv out features); q has K out features."""
    if not on_gpu():
        return [(128, 256, 64)]
    full = [(2048, 4096, 1024), (8192, 4096, 1024)]
    return full[:1] if quick else full


def _projections(K: int, Nkv: int, dtype, device) -> nn.Module:
    mod = nn.Module()
    for name, n in zip(TARGETS, (K, Nkv, Nkv)):
        setattr(mod, name, nn.Linear(K, n, bias=False, device=device, dtype=dtype))
    return mod.requires_grad_(False)


def run(quick: bool = False) -> list[dict]:
    from peft import LoraConfig, get_peft_model

    from benchmarks.bench_lora import _bnb_linear4bit
    from qpeft.autograd.lora_qkv import lora_qkv
    from qpeft.modules.lora_linear import LoraLinear
    from qpeft.modules.qlinear_nf4 import QLinearNF4

    dev = "cuda" if on_gpu() else "cpu"
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    rows = []
    for M, K, Nkv in shapes(quick):
        torch.manual_seed(0)
        projs = _projections(K, Nkv, dtype, dev)
        x = torch.randn(M, K, device=dev, dtype=dtype, requires_grad=True)
        dys = tuple(torch.randn(M, n, device=dev, dtype=dtype) for n in (K, Nkv, Nkv))

        def make(name):
            mod = copy.deepcopy(projs)
            if name.startswith("peft"):
                if name == "peft_qlora":
                    for t in TARGETS:
                        setattr(mod, t, _bnb_linear4bit(getattr(mod, t), dtype, dev))
                mod = get_peft_model(mod, LoraConfig(target_modules=list(TARGETS), r=R, lora_alpha=2 * R))
                inner = mod.base_model.model
            else:
                for t in TARGETS:
                    lin = getattr(mod, t)
                    base = QLinearNF4.from_linear(lin, compute_dtype=dtype) if name != "qpeft_fused_dense" else lin
                    setattr(mod, t, LoraLinear(base, r=R, lora_alpha=2 * R))
                inner = mod
            _randomize_b(mod)
            mod.train()
            if name in ("qpeft_fused", "qpeft_fused_dense"):
                fn = lambda: lora_qkv(x, inner.q_proj, inner.k_proj, inner.v_proj, training=True)  # noqa: E731
            else:
                fn = lambda: (inner.q_proj(x), inner.k_proj(x), inner.v_proj(x))  # noqa: E731
            return fn, dys, (x, *(p for p in mod.parameters() if p.requires_grad))

        providers = {"peft_qlora": None, "qpeft_unfused": None, "qpeft_fused": None, "peft_lora": None,
                     "qpeft_fused_dense": None}
        rows += run_providers({"M": M, "K": K, "N_kv": Nkv, "r": R, "dtype": str(dtype).split(".")[-1]},
                              providers, make)
        base = next((r for r in rows if r["provider"] == "peft_qlora" and r["M"] == M and "fwd_bwd_ms" in r), None)
        for r in rows:
            if base is not None and r["M"] == M and "fwd_bwd_ms" in r:
                r["speedup_vs_peft_qlora"] = base["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    return rows


COLUMNS = ["M", "K", "N_kv", "r", "dtype", *COLUMNS_TAIL[:4], "speedup_vs_peft_qlora", *COLUMNS_TAIL[5:]]


def main() -> None:
    suite_main("lora_qkv", run, COLUMNS, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
