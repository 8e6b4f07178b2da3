"""A QLoRA run of a tiny MoE through trl.SFTTrainer (issue 24): the model loaded from a path with QPeftConfig (4-bit
linears and 4-bit fused experts), a plain peft.LoraConfig with target_parameters on the experts, adapter-only
checkpoints, and a resume that ends bit-identical to the uninterrupted run (fp32, CPU)."""
from __future__ import annotations

import pytest
import torch

import qpeft
from tiny_moe import tiny_moe

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402

from qpeft.integrations.peft import QPeftLoraLinear  # noqa: E402
from qpeft.integrations.peft_experts import ParamWrapper  # noqa: E402
from qpeft.modules.nf4_experts import is_nf4_experts  # noqa: E402

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _texts(n=8):
    g = torch.Generator().manual_seed(0)
    return [" ".join(f"t{int(i)}" for i in torch.randint(3, 128, (10,), generator=g)) for _ in range(n)]


def _trainer(path, out, max_steps=4):
    sft_args = trl.SFTConfig(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2,
                             learning_rate=1e-2, logging_steps=1, save_strategy="steps", save_steps=2,
                             report_to="none", use_cpu=True, bf16=False, disable_tqdm=True, seed=0, data_seed=0,
                             dataloader_num_workers=0)
    return trl.SFTTrainer(model=str(path), args=sft_args, train_dataset=Dataset.from_dict({"text": _texts()}),
                          processing_class=_tokenizer(),
                          quantization_config=qpeft.QPeftConfig(compute_dtype=torch.float32),
                          peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      target_parameters=list(TARGETS), task_type="CAUSAL_LM"))


def _adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def _experts_bytes(model):
    return {n: t.clone() for n, t in model.state_dict().items() if ".experts." in n and ".lora_" not in n}


def test_sft_trainer_qlora_on_a_4bit_moe_saves_adapters_only_and_resumes(tmp_path):
    tiny_moe("qwen3_moe").save_pretrained(tmp_path / "base")
    full = _trainer(tmp_path / "base", tmp_path / "a")
    experts = [m for m in full.model.modules() if is_nf4_experts(m)]
    assert len(experts) == 2
    assert sum(isinstance(m, QPeftLoraLinear) for m in full.model.modules()) == 8  # q/k/v/o x 2 layers
    assert sum(type(m) is ParamWrapper for m in full.model.modules()) == 4  # gate_up/down x 2 layers
    frozen = _experts_bytes(full.model)
    start = _adapters(full.model)
    full.train()
    assert full.state.global_step == 4
    after = _experts_bytes(full.model)
    assert after.keys() == frozen.keys() and all(torch.equal(after[k], frozen[k]) for k in frozen)  # base frozen
    trained = _adapters(full.model)
    moved = [n for n in trained if ".experts." in n and not torch.equal(trained[n], start[n])]
    assert len(moved) == 8, moved  # every experts A and B trained
    ckpt = tmp_path / "a" / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir()}
    assert "adapter_model.safetensors" in files and not any(f.startswith(("model", "pytorch_model")) for f in files)
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    assert all(".lora_A." in k or ".lora_B." in k for k in saved)
    # PEFT's "all-linear" on a transformers 5 MoE: the attention projections (qpeft's 4-bit layers), the experts
    # (target_parameters, named here and added by PEFT) and the router's weight (mlp.gate, dense: PEFT's own wrapper)
    assert sum(".experts." in k for k in saved) == 8 and sum(".self_attn." in k for k in saved) == 16
    assert sum(".mlp.gate." in k for k in saved) == 4 and len(saved) == 28
    resumed = _trainer(tmp_path / "base", tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(ckpt))
    # same data order and RNG from the checkpoint, fp32 on the CPU: the final adapters are bit-identical
    a, b = trained, _adapters(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
