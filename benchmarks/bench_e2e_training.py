"""End-to-end QLoRA training step: qpeft vs Hugging Face PEFT + bitsandbytes, tokens/s and peak memory.

One step = forward, backward and AdamW on the adapters of a LLaMA-style decoder built from a config (random
init: speed does not depend on the values), LoRA r=16 alpha=32 dropout 0 on every linear layer but lm_head,
NF4 base (blocksize 64, double quant), gradient checkpointing, batch x sequence tokens of random ids.

- qpeft:       qpeft.prepare_for_qlora (QLinearNF4 + LoraLinear)
- qpeft_fused: the same + qpeft.fuse(model) (fused RMSNorm, LoRA MLP / QKV + RoPE, loss through
               linear_cross_entropy without logits)
- qpeft_fused_offload: the same with fuse(model, offload_checkpoints=True) (GPU only: a no-op on the CPU)
- peft_bnb:    the path users take today: bitsandbytes Linear4bit (transformers' BitsAndBytesConfig layer
               swap, done here on the built model) + peft.get_peft_model(LoraConfig(target_modules="all-linear"))
               and transformers' eager loss (logits, then cross-entropy)
- peft_bnb_fused: peft_bnb + qpeft.fuse(model) (a PEFT + bitsandbytes script with one added line)
- peft_bf16:   PEFT LoRA on the bf16 base (GPU only: the memory/speed reference without quantization)

Runs (TRAIN_RUNS): GPU ~1.1B (hidden 2048, 22 layers, vocab 32000) at 4 x 2048 tokens, and Llama-3-8B shapes
(hidden 4096, 32 layers, vocab 128256) at 1 x 2048, 1 x 8192 and 1 x 8192 packed (4 sequences of 2048 in one
row, position_ids restarting per sequence as transformers' DataCollatorWithFlattening makes them), bf16
autocast; median of 4 steps after 2 warm-up (performance.md's protocol); tokens/s and max_memory_allocated.
Target on an H100: qpeft_fused >= 2x the tokens/s of peft_bnb at lower peak memory.
`--max-context CAP_GIB` (GPU): the longest single sequence (multiple of 1024) whose training step fits in
CAP_GIB of device memory, per provider, on the 8B shapes (a bisection over step attempts, OOM = does not fit).
CPU (or quick=True without a GPU): a tiny config at 2 x 64 tokens, plain and packed, in fp32, 10 steps; it shows
the suite runs and the relative cost of the Python paths, not GPU speed.

    python -m benchmarks.bench_e2e_training [--quick] [--max-context 80]
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
import warnings

import torch
import torch.nn as nn

from benchmarks.common import on_gpu, print_table, suite_main, write_csv

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
# training runs: (run name, config name, batch, seq, sequences packed per row (1: not packed))
GPU_RUNS = [("llama-1.1B", "llama-1.1B", 4, 2048, 1), ("llama-8B", "llama-8B", 1, 2048, 1),
            ("llama-8B", "llama-8B", 1, 8192, 1), ("llama-8B-packed", "llama-8B", 1, 8192, 4)]
CPU_RUNS = [("llama-tiny", "llama-tiny", 2, 64, 1), ("llama-tiny-packed", "llama-tiny", 2, 64, 4)]


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
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")
    model = build_llama(cfg_kw, dtype, device)
    if name.startswith("qpeft"):
        import qpeft

        qpeft.prepare_for_qlora(model, r=LORA_R, lora_alpha=LORA_ALPHA, compute_dtype=dtype)
    else:
        from peft import LoraConfig, get_peft_model

        if name.startswith("peft_bnb"):
            bnb_quantize_(model, dtype)
        model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if "fused" in name:
        import qpeft

        qpeft.fuse(model, offload_checkpoints=name.endswith("_offload"))
    model.train()
    return model


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def training_batch(batch: int, seq: int, vocab: int, device, packed: int = 1, seed: int = 0) -> dict:
    """Random ids (batch, seq) as model kwargs with labels. packed > 1: each row holds `packed` sequences of
    seq // packed tokens, position_ids restarting at 0 and the first label of each sequence -100, as
    transformers' DataCollatorWithFlattening makes them (no attention_mask: transformers finds the sequences
    from the position_ids)."""
    if packed < 1 or seq % packed:
        raise ValueError(f"packed must be a divisor of seq={seq} (>= 1), got {packed}")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    out = {"input_ids": ids.to(device), "labels": ids.to(device)}
    if packed > 1:
        n = seq // packed
        labels = ids.clone()
        labels[:, ::n] = -100
        out["labels"] = labels.to(device)
        out["position_ids"] = torch.arange(n).repeat(packed).expand(batch, seq).contiguous().to(device)
    return out


@contextlib.contextmanager
def _fused_or_fail(model: nn.Module):
    """For a fused model, a FusedFallbackWarning (a module ran unfused) fails the row: the numbers would not be
    the fused path's."""
    fused = any("_qpeft_fuse" in m.__dict__ for m in model.modules())
    with warnings.catch_warnings():
        if fused:
            from qpeft import FusedFallbackWarning

            warnings.simplefilter("error", FusedFallbackWarning)
        yield


def time_training(model: nn.Module, batch: int, seq: int, vocab: int, device, autocast_dtype, warmup: int,
                  reps: int, packed: int = 1) -> dict:
    """Median seconds per step over `reps` steps after `warmup`, and the peak memory of those steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    inputs = training_batch(batch, seq, vocab, device, packed)
    dev_type = torch.device(device).type

    def step():
        with torch.autocast(dev_type, dtype=autocast_dtype, enabled=autocast_dtype is not None), \
                _fused_or_fail(model):
            loss = model(**inputs).loss
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


PROVIDERS = ("qpeft", "qpeft_fused", "qpeft_fused_offload", "peft_bnb", "peft_bnb_fused", "peft_bf16")


def providers(gpu: bool) -> list[str]:
    if gpu:
        return list(PROVIDERS)
    return ["qpeft", "qpeft_fused", "peft_bnb", "peft_bnb_fused"]


def longest_fitting(fits, lo: int, hi: int, step: int) -> int | None:
    """The largest multiple of `step` in [lo, hi] for which fits(n) is True, assuming fits is monotone (True up
    to some n, False above), by bisection; None when fits(lo) is False."""
    if lo % step or hi % step or lo > hi:
        raise ValueError(f"lo={lo} and hi={hi} must be multiples of step={step} with lo <= hi")
    if not fits(lo):
        return None
    good, bad = lo, hi + step
    while bad - good > step:
        mid = (good + bad) // 2 // step * step
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def max_context(cap_gib: float, cfg_name: str = "llama-8B", lo: int = 1024, hi: int = 524288) -> list[dict]:
    """GPU: per provider, the longest single sequence whose training step runs within `cap_gib` of device memory
    (torch.cuda.set_per_process_memory_fraction; an OutOfMemoryError is "does not fit")."""
    cfg_kw = GPU_CONFIGS[cfg_name][0]
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib / total))
    rows = []
    for prov in providers(True):
        model = make_provider(prov, cfg_kw, torch.bfloat16, "cuda")

        def fits(seq, model=model):
            try:
                time_training(model, 1, seq, cfg_kw["vocab_size"], "cuda", torch.bfloat16, warmup=0, reps=1)
                return True
            except torch.cuda.OutOfMemoryError:
                return False
            finally:
                gc.collect()
                torch.cuda.empty_cache()

        rows.append({"model": cfg_name, "provider": prov, "cap_gib": cap_gib,
                     "max_seq": longest_fitting(fits, lo, hi, 1024)})
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return rows


def model_configs(gpu: bool, quick: bool) -> dict:
    """The LLaMA-style configs a suite runs: ~1.1B and ~8B on a GPU (1.1B only with --quick), tiny on CPU."""
    if not gpu:
        return CPU_CONFIGS
    return {"llama-1.1B": GPU_CONFIGS["llama-1.1B"]} if quick else GPU_CONFIGS


def run(quick: bool = False) -> list[dict]:
    gpu = on_gpu()
    device = "cuda" if gpu else "cpu"
    configs = {**GPU_CONFIGS, **CPU_CONFIGS}
    runs = (GPU_RUNS[:1] if quick else GPU_RUNS) if gpu else CPU_RUNS
    dtype = torch.bfloat16 if gpu else torch.float32
    autocast_dtype = torch.bfloat16 if gpu else None
    warmup, reps = (2, 4) if gpu else (2, 10)
    rows = []
    for run_name, cfg_name, batch, seq, packed in runs:
        cfg_kw = configs[cfg_name][0]
        base = {}
        for prov in providers(gpu):
            row = {"model": run_name, "batch": batch, "seq": seq, "packed": packed, "provider": prov,
                   "dtype": str(dtype).split(".")[-1]}
            model = None
            try:
                model = make_provider(prov, cfg_kw, dtype, device)
                row["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
                row.update(time_training(model, batch, seq, cfg_kw["vocab_size"], device, autocast_dtype, warmup, reps,
                                         packed))
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


COLUMNS = ["model", "batch", "seq", "packed", "provider", "step_s", "tokens_per_s", "x_vs_peft_bnb", "peak_gib",
           "error"]


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--max-context", type=float, default=None, metavar="CAP_GIB")
    args, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.max_context is not None:
        if not on_gpu():
            raise SystemExit("--max-context needs a GPU (it measures device memory)")
        rows = max_context(args.max_context)
        print_table(rows)
        print("wrote", write_csv("e2e_max_context", rows))
        return
    suite_main("e2e_training", run, COLUMNS, description=__doc__.splitlines()[0], argv=rest)


if __name__ == "__main__":
    main()
