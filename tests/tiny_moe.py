"""Tiny random transformers 5 mixture-of-experts models (fused 3-D experts), one per family qpeft tests: the
shapes are small but every feature of a family is on (shared experts, gpt-oss' transposed experts with biases and
its clamped SwiGLU, DeepSeek-V3's grouped routing)."""
from __future__ import annotations

import torch

_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)


def _configs():
    import transformers as t

    return {
        "qwen3_moe": (t.Qwen3MoeConfig, t.Qwen3MoeForCausalLM,
                      dict(intermediate_size=96, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                           decoder_sparse_step=1, head_dim=16)),
        "qwen2_moe": (t.Qwen2MoeConfig, t.Qwen2MoeForCausalLM,
                      dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                           num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)),
        "mixtral": (t.MixtralConfig, t.MixtralForCausalLM,
                    dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)),
        "olmoe": (t.OlmoeConfig, t.OlmoeForCausalLM,
                  dict(intermediate_size=32, num_experts=4, num_experts_per_tok=2)),
        "gpt_oss": (t.GptOssConfig, t.GptOssForCausalLM,
                    dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                         sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
        "deepseek_v3": (t.DeepseekV3Config, t.DeepseekV3ForCausalLM,
                        dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=4,
                             num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
                             topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                             qk_nope_head_dim=8, v_head_dim=16, num_key_value_heads=4)),
    }


FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3")


def tiny_moe(family: str, seed: int = 0, experts_implementation: str | None = "eager", width: int | None = None,
             **overrides):
    """A small random MoE causal LM of `family` in fp32, eval mode, with random (non-zero) expert biases. width:
    hidden size and experts' intermediate size both `width` (one layer), for sizes where the per-expert tables no
    longer dominate the bytes."""
    config_cls, model_cls, kw = _configs()[family]
    if width is not None:
        kw = {**kw, "hidden_size": width, "num_hidden_layers": 1, "first_k_dense_replace": 0,
              "layer_types": ["full_attention"]}
        kw = {k: v for k, v in kw.items() if k in _configs()[family][2] or k in ("hidden_size", "num_hidden_layers")}
        kw["moe_intermediate_size" if "moe_intermediate_size" in kw else "intermediate_size"] = width
    torch.manual_seed(seed)
    cfg = config_cls(**{**_COMMON, **kw, **overrides})
    model = model_cls(cfg).eval()
    if experts_implementation is not None:
        model.set_experts_implementation(experts_implementation)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name and name.endswith("_bias"):
                p.normal_(0, 0.02)  # gpt-oss initialises them to zero: a test of zeros proves nothing
            elif "router" in name or name.endswith("gate.weight"):
                p.normal_(0, 0.5)   # a router that actually spreads tokens over the experts
            elif name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.1)
    return model
