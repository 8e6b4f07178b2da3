"""Decode speed: tokens/s generating new tokens from a 4-bit LLaMA-style model at batch 1 and 8.

Providers, all through transformers' `generate` (greedy, KV cache, every sequence forced to the full length):
- bf16:     the unquantized model (the reference a 4-bit model must beat at small batch)
- qpeft:    qpeft.quantize_model (QLinearNF4, NF4 blocksize 64, double quant)
- bnb:      bitsandbytes Linear4bit with the same settings (what BitsAndBytesConfig(load_in_4bit) builds)

GPU: the ~1.1B and ~8B configs of bench_e2e_training, 32-token prompt, 128 new tokens, bf16; median of 3.
CPU (or no GPU): the tiny config, 8-token prompt, 8 new tokens, fp32; only shows the suite runs.

    python -m benchmarks.bench_decode [--quick]
"""
from __future__ import annotations

import gc
import statistics
import time

import torch

from benchmarks.bench_e2e_training import bnb_quantize_, build_llama, model_configs
from benchmarks.common import on_gpu, suite_main

PROVIDERS = ("bf16", "qpeft", "bnb")
BATCHES = (1, 8)


def make_model(provider: str, cfg_kw: dict, dtype: torch.dtype, device):
    model = build_llama(cfg_kw, dtype, device).eval()
    model.config.use_cache = True
    model.generation_config.pad_token_id = 0
    if provider == "qpeft":
        import qpeft

        qpeft.quantize_model(model, quant_type="nf4", compute_dtype=dtype)
    elif provider == "bnb":
        bnb_quantize_(model, dtype)
    elif provider != "bf16":
        raise ValueError(f"unknown provider {provider!r}")
    return model


@torch.no_grad()
def time_generate(model, batch: int, prompt_len: int, new_tokens: int, vocab: int, device, reps: int) -> dict:
    ids = torch.randint(3, vocab, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)

    def gen():
        # min_new_tokens = max_new_tokens: a random model may emit EOS early; every run decodes the full length
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False)

    out = gen()  # warm-up (allocator, kernels, JIT build)
    assert out.shape == (batch, prompt_len + new_tokens), out.shape
    times = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        gen()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    return {"s": s, "tokens_per_s": batch * new_tokens / s}


def run(quick: bool = False) -> list[dict]:
    gpu = on_gpu()
    device = "cuda" if gpu else "cpu"
    configs = model_configs(gpu, quick)
    dtype = torch.bfloat16 if gpu else torch.float32
    prompt_len, new_tokens, reps = (32, 128, 3) if gpu else (8, 8, 7)  # CPU: shared cores, more repeats
    rows = []
    for cfg_name, (cfg_kw, _, _) in configs.items():
        for prov in PROVIDERS:
            model = None
            try:
                model = make_model(prov, cfg_kw, dtype, device)
                for batch in BATCHES:
                    row = {"model": cfg_name, "provider": prov, "batch": batch, "new_tokens": new_tokens,
                           "dtype": "bf16" if gpu else "fp32"}
                    row.update(time_generate(model, batch, prompt_len, new_tokens, cfg_kw["vocab_size"], device, reps))
                    rows.append(row)
            except Exception as e:  # noqa: BLE001  a provider this machine cannot run: skip it, say why
                err = f"{type(e).__name__}: {str(e)[:160]}"
                print(f"skipping {prov} on {cfg_name}: {err}")
                rows.append({"model": cfg_name, "provider": prov, "error": err})
            finally:
                del model
                gc.collect()
                if gpu:
                    torch.cuda.empty_cache()
    ref = {(r["model"], r["batch"]): r["tokens_per_s"] for r in rows
           if r.get("provider") == "bf16" and "tokens_per_s" in r}
    for r in rows:
        if "tokens_per_s" in r and (r["model"], r["batch"]) in ref:
            r["x_vs_bf16"] = r["tokens_per_s"] / ref[(r["model"], r["batch"])]
    return rows


COLUMNS = ["model", "provider", "batch", "new_tokens", "s", "tokens_per_s", "x_vs_bf16", "error"]


def main() -> None:
    suite_main("decode", run, COLUMNS, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    main()
