"""pytest-benchmark: one QLoRA training step (qpeft vs PEFT + bitsandbytes) and greedy decoding (bf16 vs
qpeft vs bitsandbytes) of a LLaMA-style model: the 1.1B config on a GPU, the tiny one on the CPU."""
import pytest
import torch

from benchmarks.conftest import DEVICE, DTYPE, GPU, run_synced

CONFIG = "llama-1.1B" if GPU else "llama-tiny"


def _configs():
    from benchmarks.bench_e2e_training import CPU_CONFIGS, GPU_CONFIGS

    return {**CPU_CONFIGS, **GPU_CONFIGS}[CONFIG]


@pytest.mark.parametrize("provider", ["qpeft", "peft_bnb"])
def test_qlora_training_step(benchmark, provider):
    from benchmarks.bench_e2e_training import make_provider

    cfg, batch, seq = _configs()
    try:
        model = make_provider(provider, cfg, DTYPE, DEVICE)
    except ImportError as e:
        pytest.skip(f"{provider}: {e}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), device=DEVICE)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=GPU):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    loss = benchmark.pedantic(run_synced(step), rounds=3, warmup_rounds=1)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("provider", ["bf16", "qpeft", "bnb"])
def test_decode(benchmark, provider, batch):
    from benchmarks.bench_decode import make_model

    cfg, _, _ = _configs()
    try:
        model = make_model(provider, cfg, DTYPE, DEVICE)
    except ImportError as e:
        pytest.skip(f"{provider}: {e}")
    new = 128 if GPU else 4
    ids = torch.randint(3, cfg["vocab_size"], (batch, 8), device=DEVICE)

    def gen():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False)

    out = benchmark.pedantic(run_synced(torch.no_grad()(gen)), rounds=3, warmup_rounds=1)
    assert out.shape == (batch, 8 + new)
