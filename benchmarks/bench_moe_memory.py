"""Model memory of a Qwen3-30B-A3B-shaped MoE in bf16, in bitsandbytes-style 4-bit (linears NF4, fused experts left
in bf16: what transformers + bitsandbytes does today, bitsandbytes issue #1849) and in qpeft 4-bit (linears and
experts NF4, blocksize 64, double quant).

    python -m benchmarks.bench_moe_memory [--quick]

Computed from the parameter and buffer bytes of a real-width model built on the CPU with few decoder layers (one by
default; --quick: a tiny config) and quantized for real: `bf16` as built, `bnb_4bit_experts_bf16` after
`qpeft.quantize_model(model, experts=False)` (QLinearNF4 holds bitsandbytes' Linear4bit format byte for byte, so
its bytes are Linear4bit's), `qpeft_4bit` after quantizing the experts too. A full model is extrapolated linearly:
the bytes outside the decoder layers + num_hidden_layers x one layer's bytes (the layers are identical in shape).
Nothing is timed; the numbers do not depend on the device. Results: benchmarks/results/<device>/moe_memory.csv.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import suite_main  # noqa: E402

GIB = 2 ** 30
# Qwen/Qwen3-30B-A3B's config.json (the shape; weights are random here)
QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, tie_word_embeddings=False,
                     max_position_embeddings=4096)
TINY = dict(QWEN3_30B_A3B, vocab_size=256, hidden_size=128, moe_intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, num_hidden_layers=4)


def _bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def measure(shape: dict, built_layers: int = 1) -> list[dict]:
    """The three rows (bytes of the whole model, extrapolated from `built_layers` real-width layers)."""
    import qpeft
    from qpeft.models.moe import quantize_model_experts
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    layers = shape["num_hidden_layers"]
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**{**shape, "num_hidden_layers": built_layers})).eval()
    finally:
        torch.set_default_dtype(previous)
    experts_numel = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n) // built_layers

    def row(what: str) -> dict:
        layer = _bytes(model.model.layers[0])
        outside = _bytes(model) - sum(_bytes(block) for block in model.model.layers)
        total = outside + layers * layer
        return dict(model="qwen3_30b_a3b_shaped" if shape is QWEN3_30B_A3B else "tiny", layers=layers,
                    built_layers=built_layers, storage=what, layer_bytes=layer, outside_layers_bytes=outside,
                    model_bytes=total, model_GiB=round(total / GIB, 3))

    rows = [row("bf16")]
    rows[0]["experts_share_of_weights"] = round(layers * experts_numel * 2 / rows[0]["model_bytes"], 4)
    qpeft.quantize_model(model, experts=False, compute_dtype=torch.bfloat16)  # lm_head stays bf16, as transformers'
    rows.append(row("bnb_4bit_experts_bf16"))
    quantize_model_experts(model)
    rows.append(row("qpeft_4bit"))
    for r in rows:
        r["vs_bf16"] = round(r["model_bytes"] / rows[0]["model_bytes"], 4)
    return rows


def run(quick: bool = False) -> list[dict]:
    return measure(TINY if quick else QWEN3_30B_A3B)


if __name__ == "__main__":
    suite_main("moe_memory", run, description=__doc__)
