"""End-to-end QLoRA training step: qpeft vs Hugging Face PEFT + bitsandbytes, tokens/s and peak memory.

One step = forward, backward and AdamW on the adapters of a LLaMA-style decoder built from a config (random
init: speed does not depend on the values), LoRA r=16 alpha=32 dropout 0 on every linear layer but lm_head,
NF4 base (blocksize 64, double quant), gradient checkpointing, batch x sequence tokens of random ids.

- qpeft:     qpeft.prepare_for_qlora (QLinearNF4 + LoraLinear)
- peft_bnb:  the path users take today: bitsandbytes Linear4bit (transformers' BitsAndBytesConfig layer
             swap, done here on the built model) + peft.get_peft_model(LoraConfig(target_modules="all-linear"))
- peft_bf16: PEFT LoRA on the bf16 base (GPU only: the memory/speed reference without quantization)

GPU: ~1.1B (hidden 2048, 22 layers, vocab 32000) and ~8B (hidden 4096, 32 layers, vocab 128256) at 4 x 2048
tokens, bf16 autocast; median of 4 steps after 2 warm-up (performance.md's protocol). Target on an H100:
qpeft >= 2x the tokens/s of peft_bnb at equal or lower peak memory.
CPU (or quick=True without a GPU): a tiny config at 2 x 64 tokens in fp32, 3 steps; only shows the suite runs.

    python -m benchmarks.bench_e2e_training [--quick]
"""
from __future__ import annotations

import gc
import statistics
import time

import torch
import torch.nn as nn

from benchmarks.common import on_gpu, suite_main

# name -> (LlamaConfig kwargs, batch, seq)
GPU_CONFIGS = {
    "llama-1.1B": (dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                        num_key_value_heads=4, vocab_size=32000), 4, 2048),
    "llama-8B": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256), 4, 2048),
}
CPU_CONFIGS = {
    "llama-tiny": (dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=512), 2, 64),
}
LORA_R, LORA_ALPHA = 16, 32


def llama_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(max_position_embeddings=4096, tie_word_embeddings=False, use_cache=False,
                       attn_implementation="sdpa", **kw)


def build_llama(cfg_kw: dict, dtype: torch.dtype, device, seed: int = 0) -> nn.Module:
    """A randomly initialised LlamaForCausalLM in `dtype` on `device` (built there: an 8B model in fp32 on
    the host would need 32 GB)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(llama_config(**cfg_kw))
    finally:
        torch.set_default_dtype(old)
    return model


def bnb_quantize_(model: nn.Module, compute_dtype: torch.dtype, skip=("lm_head",)) -> nn.Module:
    """Swap every nn.Linear but `skip` for bitsandbytes Linear4bit (NF4, blocksize 64, compress_statistics),
    as transformers does for BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True)."""
    import bitsandbytes as bnb

    device = next(model.parameters()).device
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] not in skip]
    for name in names:
        lin = model.get_submodule(name)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", blocksize=64)
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        q = q.to(device)  # Params4bit quantizes when moved to its device
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, q)
    return model


def make_provider(name: str, cfg_kw: dict, dtype: torch.dtype, device) -> nn.Module:
    """The model of provider `name` with LoRA r=16 alpha=32 on all linear layers (lm_head excluded)."""
    model = build_llama(cfg_kw, dtype, device)
    if name == "qpeft":
        import qpeft

        qpeft.prepare_for_qlora(model, r=LORA_R, lora_alpha=LORA_ALPHA, compute_dtype=dtype)
    elif name in ("peft_bnb", "peft_bf16"):
        from peft import LoraConfig, get_peft_model

        if name == "peft_bnb":
            bnb_quantize_(model, dtype)
        model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    else:
        raise ValueError(f"unknown provider {name!r}")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_training(model: nn.Module, batch: int, seq: int, vocab: int, device, autocast_dtype, warmup: int,
                  reps: int) -> dict:
    """Median seconds per step over `reps` steps after `warmup`, and the peak memory of those steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    dev_type = torch.device(device).type

    def step():
        with torch.autocast(dev_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    _sync(device)
    if dev_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev_type == "cuda" else float("nan")
    return {"step_s": statistics.median(times), "peak_gib": peak, "trainable": sum(p.numel() for p in params)}


def providers(gpu: bool) -> list[str]:
    return ["qpeft", "peft_bnb", "peft_bf16"] if gpu else ["qpeft", "peft_bnb"]


def model_configs(gpu: bool, quick: bool) -> dict:
    """The LLaMA-style configs a suite runs: ~1.1B and ~8B on a GPU (1.1B only with --quick), tiny on CPU."""
    if not gpu:
        return CPU_CONFIGS
    return {"llama-1.1B": GPU_CONFIGS["llama-1.1B"]} if quick else GPU_CONFIGS


def run(quick: bool = False) -> list[dict]:
    gpu = on_gpu()
    device = "cuda" if gpu else "cpu"
    configs = model_configs(gpu, quick)
    dtype = torch.bfloat16 if gpu else torch.float32
    autocast_dtype = torch.bfloat16 if gpu else None
    warmup, reps = (2, 4) if gpu else (1, 5)
    rows = []
    for cfg_name, (cfg_kw, batch, seq) in configs.items():
        base = {}
        for prov in providers(gpu):
            row = {"model": cfg_name, "batch": batch, "seq": seq, "provider": prov, "dtype": str(dtype).split(".")[-1]}
            model = None
            try:
                model = make_provider(prov, cfg_kw, dtype, device)
                row["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
                row.update(time_training(model, batch, seq, cfg_kw["vocab_size"], device, autocast_dtype, warmup, reps))
                row["tokens_per_s"] = batch * seq / row["step_s"]
            except Exception as e:  # noqa: BLE001  a provider this machine cannot run: skip it, say why
                row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                print(f"skipping {prov} on {cfg_name}: {row['error']}")
            finally:
                del model
                gc.collect()
                if gpu:
                    torch.cuda.empty_cache()
            base[prov] = row
            rows.append(row)
        ref = base.get("peft_bnb", {}).get("tokens_per_s")
        for row in rows[-len(base):]:
            if ref and "tokens_per_s" in row:
                row["x_vs_peft_bnb"] = row["tokens_per_s"] / ref
    return rows


COLUMNS = ["model", "batch", "seq", "provider", "step_s", "tokens_per_s", "x_vs_peft_bnb", "peak_gib", "error"]


def main() -> None:
    suite_main("e2e_training", run, COLUMNS, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
