"""RoPE: qpeft.apply_rotary_pos_emb (in place and out of place) vs transformers' apply_rotary_pos_emb (eager) and
Liger-Kernel's liger_rotary_pos_emb (when installed): forward, backward, forward + backward, peak memory (GPU).

    python -m benchmarks.bench_rope [--quick]

q, k as HF attention holds them: (B, heads, S, D) transposed views of the projection outputs, rebuilt per call
by one clone of the (B, S, heads * D) projection output (the same extra copy for every provider: the in-place
paths need a non-leaf tensor). cos/sin from LlamaRotaryEmbedding (llama3 scaling).
GPU: bf16, B = 1, S in {2048 (Liger's published point: 32 q / 8 kv heads), 8192, 32768}, 32 q / 8 kv heads,
D = 128. CPU: fp32, small shapes. Writes benchmarks/results/<device>/rope.csv.
"""
from __future__ import annotations

import torch

from benchmarks.common import on_gpu, suite_main
from benchmarks.fused_kernels import COLUMNS_TAIL, liger_missing, run_providers


def shapes(quick: bool) -> list[tuple[int, int, int, int, int]]:
    """(B, S, q heads, kv heads, head dim)."""
    if not on_gpu():
        return [(1, 256, 8, 2, 64)] if quick else [(1, 256, 8, 2, 64), (2, 512, 4, 4, 128)]
    full = [(1, 2048, 32, 8, 128), (1, 8192, 32, 8, 128), (1, 32768, 32, 8, 128)]
    return full[:2] if quick else full


def run(quick: bool = False) -> list[dict]:
    import qpeft
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    dev = "cuda" if on_gpu() else "cpu"
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    rows = []
    for B, S, Hq, Hk, D in shapes(quick):
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hk,
                          max_position_embeddings=max(S, 8192),
                          rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192})
        pos = torch.arange(S, device=dev).repeat(B, 1)
        cos, sin = LlamaRotaryEmbedding(cfg).to(dev)(torch.zeros(1, device=dev, dtype=dtype), pos)
        qp = torch.randn(B, S, Hq * D, device=dev, dtype=dtype, requires_grad=True)
        kp = torch.randn(B, S, Hk * D, device=dev, dtype=dtype, requires_grad=True)
        dq = torch.randn(B, Hq, S, D, device=dev, dtype=dtype)
        dk = torch.randn(B, Hk, S, D, device=dev, dtype=dtype)

        def views():
            return (qp.clone().view(B, S, Hq, D).transpose(1, 2), kp.clone().view(B, S, Hk, D).transpose(1, 2))

        def make(name):
            if name == "hf_eager":
                fn = lambda: apply_rotary_pos_emb(*views(), cos, sin)  # noqa: E731
            elif name == "qpeft_inplace":
                fn = lambda: qpeft.apply_rotary_pos_emb(*views(), cos, sin)  # noqa: E731
            elif name == "qpeft":
                fn = lambda: qpeft.apply_rotary_pos_emb(*views(), cos, sin, inplace=False)  # noqa: E731
            elif name == "liger":
                from liger_kernel.transformers.rope import liger_rotary_pos_emb

                fn = lambda: liger_rotary_pos_emb(*views(), cos, sin)  # noqa: E731
            else:
                raise ValueError(name)
            return fn, (dq, dk), (qp, kp)

        providers = {"hf_eager": None, "qpeft_inplace": None, "qpeft": None, "liger": liger_missing()}
        rows += run_providers({"B": B, "S": S, "q_heads": Hq, "kv_heads": Hk, "D": D,
                               "dtype": str(dtype).split(".")[-1]}, providers, make)
    return rows


COLUMNS = ["B", "S", "q_heads", "kv_heads", "D", "dtype", *COLUMNS_TAIL]


def main() -> None:
    suite_main("rope", run, COLUMNS, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
