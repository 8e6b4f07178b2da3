"""Mixture-of-experts block, one layer's experts, side by side in one process (forward, and forward + backward):

  hf_grouped_mm   transformers' experts module on 16-bit experts, experts_implementation="grouped_mm"
  hf_eager        the same module with its eager loop over the experts hit
  qpeft_nf4       qpeft.grouped_nf4_experts on NF4 experts (blocksize 64, double quant), no adapter
  qpeft_nf4_lora  the same with a rank-16 LoRA on gate_up_proj and down_proj, applied inside the grouped kernels

Shapes: Qwen3-30B-A3B (E 128, H 2048, I 768) and Mixtral-8x7B (E 8, H 4096, I 14336), tokens 1 .. 16384,
top-k 2 and 8, uniform random routing; bf16 on a GPU. Backward: gradients of the hidden states (and of the LoRA
A/B for qpeft_nf4_lora; the experts are frozen everywhere), the routing weights not differentiated.
`weight_MB` is the experts' bytes (16-bit vs packed NF4 + absmax + double-quant state).
Without a GPU the suite runs tiny fp32 shapes on the CPU (the reference path: times say nothing about the
kernels); GPU numbers are owed until a GPU run writes benchmarks/results/<gpu>/grouped_nf4.csv.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import bench, on_gpu, suite_main  # noqa: E402

PROVIDERS = ("hf_grouped_mm", "hf_eager", "qpeft_nf4", "qpeft_nf4_lora")
MODELS = {"qwen3_30b_a3b": dict(E=128, H=2048, I=768), "mixtral_8x7b": dict(E=8, H=4096, I=14336)}


def grid(quick: bool) -> list[dict]:
    if not on_gpu():
        models = {"tiny": dict(E=8, H=64, I=32)}
        cases = [(16, 2), (64, 2), (64, 8)] if not quick else [(16, 2)]
    else:
        models = MODELS
        tokens = (1, 16, 128, 1024, 4096, 16384) if not quick else (16, 4096)
        cases = [(t, k) for t in tokens for k in (2, 8)]
    return [dict(model=m, **shape, tokens=t, top_k=k) for m, shape in models.items() for t, k in cases]


def _hf_module(E, H, I, k, dtype, device):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    # Qwen3-MoE, Mixtral, OLMoE and DeepSeek share this experts forward (gate_up (E, 2I, H), down (E, H, I), SwiGLU)
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k)
    m = Qwen3MoeExperts(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        m.gate_up_proj.normal_(0, H ** -0.5)
        m.down_proj.normal_(0, I ** -0.5)
    return m.requires_grad_(False)


def _routing(T, E, k, device):
    logits = torch.randn(T, E, device=device)
    w, idx = torch.softmax(logits, dim=-1).topk(k, dim=-1)
    return idx, (w / w.sum(-1, keepdim=True))


def _step(fn, x, lora_params, backward: bool):
    if not backward:
        with torch.no_grad():
            return fn(x)
    xx = x.detach().requires_grad_(True)
    out = fn(xx)
    out.backward(torch.ones_like(out))
    for p in lora_params:
        p.grad = None
    return out


def run(quick: bool = False) -> list[dict]:
    device = "cuda" if on_gpu() else "cpu"
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    if not on_gpu():
        # tiny CPU shapes: intra-op threads only add OpenMP wake-ups (on the 2 shared cores here a 64 x 64
        # matmul took 2.8 ms with 2 threads, 0.024 ms with 1)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _run(quick, device, dtype)
        finally:
            torch.set_num_threads(threads)
    return _run(quick, device, dtype)


def _run(quick, device, dtype) -> list[dict]:
    from qpeft.quant.experts import ExpertsLoRA, grouped_nf4_experts, quantize_experts

    rows = []
    built = {}
    for case in grid(quick):
        E, H, I, T, k = (case[n] for n in ("E", "H", "I", "tokens", "top_k"))
        if case["model"] not in built:
            built.clear()  # one model's weights at a time (Mixtral's 16-bit experts: 2.8 GB per layer)
            torch.manual_seed(0)
            hf = _hf_module(E, H, I, k, dtype, device)
            gu, dn = quantize_experts(hf.gate_up_proj.data), quantize_experts(hf.down_proj.data)
            r = 16
            lora = [torch.randn(E, r, H, device=device, dtype=dtype) * H ** -0.5,
                    torch.randn(E, 2 * I, r, device=device, dtype=dtype) * 0.01,
                    torch.randn(E, r, I, device=device, dtype=dtype) * I ** -0.5,
                    torch.randn(E, H, r, device=device, dtype=dtype) * 0.01]
            lora = [t.requires_grad_(True) for t in lora]
            nf4_bytes = sum(t.numel() * t.element_size() for w in (gu, dn) for t in
                            (w.packed, w.absmax, w.nested_absmax, w.offset) if t is not None)
            built[case["model"]] = (hf, gu, dn, lora, nf4_bytes)
        hf, gu, dn, lora, nf4_bytes = built[case["model"]]
        torch.manual_seed(1)
        x = torch.randn(T, H, device=device, dtype=dtype)
        idx, w = _routing(T, E, k, device)
        w = w.to(dtype)
        weight_16 = (hf.gate_up_proj.numel() + hf.down_proj.numel()) * hf.gate_up_proj.element_size()
        for backward in (False, True):
            base_ms = None
            for provider in PROVIDERS:
                params = []
                if provider.startswith("hf"):
                    hf.config._experts_implementation = "grouped_mm" if provider == "hf_grouped_mm" else "eager"
                    fn = lambda xx: hf(xx, idx, w)  # noqa: E731
                    wmb = weight_16 / 2 ** 20
                else:
                    lo = (ExpertsLoRA(lora[0], lora[1], 2.0), ExpertsLoRA(lora[2], lora[3], 2.0)) \
                        if provider == "qpeft_nf4_lora" else (None, None)
                    params = lora if provider == "qpeft_nf4_lora" else []
                    fn = lambda xx, lo=lo: grouped_nf4_experts(xx, idx, w, gu, dn, gate_up_lora=lo[0],  # noqa: E731
                                                               down_lora=lo[1])
                    wmb = nf4_bytes / 2 ** 20
                try:
                    t = bench(lambda: _step(fn, x, params, backward))
                except Exception as e:  # a provider that cannot run here: recorded, not fatal
                    rows.append(dict(case, provider=provider, pass_="fwd+bwd" if backward else "fwd",
                                     dtype=str(dtype).split(".")[-1], ms=float("nan"), tokens_per_s=float("nan"),
                                     vs_grouped_mm=float("nan"), weight_MB=wmb, error=f"{type(e).__name__}: {e}"[:200]))
                    continue
                if provider == "hf_grouped_mm":
                    base_ms = t["ms"]
                rows.append(dict(case, provider=provider, pass_="fwd+bwd" if backward else "fwd",
                                 dtype=str(dtype).split(".")[-1], ms=t["ms"], tokens_per_s=T / (t["ms"] / 1e3),
                                 vs_grouped_mm=t["ms"] / base_ms if base_ms else float("nan"), weight_MB=wmb,
                                 error=""))
    return rows


COLUMNS = ["model", "E", "H", "I", "tokens", "top_k", "provider", "pass_", "dtype", "ms", "tokens_per_s",
           "vs_grouped_mm", "weight_MB", "error"]


def main() -> None:
    suite_main("grouped_nf4", run, COLUMNS, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
