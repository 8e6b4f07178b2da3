"""transformers.Trainer and trl.SFTTrainer on PEFT models whose 4-bit layers are QPeftLoraLinear (tiny Llama, fp32,
CPU, a few steps): adapter-only checkpoints, bit-identical resume, gradient checkpointing, gradient accumulation
normalised by the real token count."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import qpeft
from qpeft.modules.qlinear_nf4 import QLinearNF4
from utils import tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from qpeft.integrations.peft import QPeftLoraLinear  # noqa: E402

PREFIX = "base_model.model."
SEQ = 12
# The ignored (-100) label positions per sample differ (0, 3, 7, 1, ...): a loss averaged per micro-batch and then
# over micro-batches would weight tokens unequally, so only normalising by the real token count passes.
IGNORED = (0, 3, 7, 1, 5, 2, 6, 4)


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, 128, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[SEQ - IGNORED[i % len(IGNORED)]:] = -100
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels}


def peft_model(seed: int = 0):
    model = tiny_llama(seed, intermediate_size=128)
    qpeft.quantize_model(model, compute_dtype=None)
    config = qpeft.lora_config(model=model, r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():  # B != 0
        for n, p in sorted(pm.named_parameters()):
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    return pm


def checkpointing_field() -> str:
    """TrainingArguments' name for it: activation_checkpointing from transformers 5.24 (gradient_checkpointing stays
    as a deprecated alias), gradient_checkpointing before."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
                logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0, data_seed=0,
                dataloader_num_workers=0, disable_tqdm=True, lr_scheduler_type="linear", warmup_steps=0)
    base.update(kw)
    return TrainingArguments(**base)


class Record(TrainerCallback):
    """The adapters' gradients just before each optimizer step."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


class LossTrainer(Trainer):
    """Records every micro-batch loss as compute_loss returns it (exact, unlike the rounded log_history), and the
    micro-batch itself (the sampler shuffles the rows)."""

    def compute_loss(self, model, inputs, *a, **kw):
        loss = super().compute_loss(model, inputs, *a, **kw)
        self.losses = getattr(self, "losses", []) + [(loss[0] if isinstance(loss, tuple) else loss).item()]
        self.batches = getattr(self, "batches", []) + [{k: v.clone() for k, v in inputs.items()}]
        return loss


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def test_trainer_checkpoints_are_adapter_only_and_resume_bit_identically(tmp_path):
    full = LossTrainer(model=peft_model(), args=args(tmp_path / "a", save_strategy="steps", save_steps=2),
                       train_dataset=TokenData())
    full.train()
    assert len(full.losses) == 4
    ckpt = tmp_path / "a" / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
            "trainer_state.json"} <= files
    assert not any(f.startswith(("model", "pytorch_model")) for f in files), files
    assert files <= {"adapter_model.safetensors", "adapter_config.json", "README.md", "optimizer.pt", "scheduler.pt",
                     "rng_state.pth", "trainer_state.json", "training_args.bin"}, files
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    assert len(saved) == 28 and all(".lora_A." in k or ".lora_B." in k for k in saved)

    resumed = LossTrainer(model=peft_model(), args=args(tmp_path / "b"), train_dataset=TokenData())
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert sum(isinstance(m, QPeftLoraLinear) for m in resumed.model.modules()) == 14
    # fp32 on the CPU, same data order (the sampler's seed and the RNG states come back from the checkpoint):
    # steps 3 and 4 and the final adapters are bit-identical to the uninterrupted run
    assert resumed.losses == full.losses[2:]
    a, b = lora_state(full.model), lora_state(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _one_step(tmp_path, **kw):
    record = Record()
    tr = LossTrainer(model=peft_model(), args=args(tmp_path, max_steps=1, **kw), train_dataset=TokenData(4),
                     callbacks=[record])
    tr.train()
    assert len(record.grads) == 1
    batch = {k: torch.cat([b[k] for b in tr.batches]) for k in tr.batches[0]}
    return sum(tr.losses), record.grads[0], batch, tr


def _reference(batch_loss: str, batch: dict):
    """Loss and adapter gradients of one batch of 4 computed by hand: "tokens" = cross-entropy summed over all
    valid (shifted) tokens of the batch and divided by their count; "per_micro" = averaged within each half-batch,
    then over the halves."""
    pm = peft_model()
    pm.train()
    if batch_loss == "tokens":  # the sum of token losses over their count (what num_items_in_batch asks for)
        count = batch["labels"][:, 1:].ne(-100).sum()
        loss = pm(**batch, num_items_in_batch=count).loss
        torch.testing.assert_close(loss, pm(**batch).loss)  # = cross-entropy's own mean over the batch's tokens
    else:
        loss = sum(pm(**{k: v[h:h + 2] for k, v in batch.items()}).loss for h in (0, 2)) / 2
    loss.backward()
    return loss.item(), {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}


def test_gradient_accumulation_normalises_by_the_token_count(tmp_path):
    loss1, g1, batch1, _ = _one_step(tmp_path / "x", per_device_train_batch_size=4)
    loss2, g2, batch2, _ = _one_step(tmp_path / "y", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert all(torch.equal(batch1[k], batch2[k]) for k in batch1)  # the same 4 rows in the same order
    ref_loss, ref = _reference("tokens", batch1)
    _, wrong = _reference("per_micro", batch1)
    assert g1.keys() == g2.keys() == ref.keys() and len(g1) == 28
    # without accumulation the Trainer computes exactly the hand-made batch loss
    assert loss1 == ref_loss and all(torch.equal(g1[n], ref[n]) for n in ref)
    # with it, two half-batches each divided by the batch's token count and summed: the same up to fp32 rounding
    # of the different summation order (hence not bit-identical)
    assert loss2 == pytest.approx(ref_loss, rel=1.3e-6)
    for n in ref:
        torch.testing.assert_close(g2[n], ref[n])
    # and the test can tell: averaging per micro-batch gives clearly different gradients
    assert max((wrong[n] - ref[n]).abs().max().item() for n in ref) > 1e-3


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, use_reentrant):
    field = checkpointing_field()
    loss0, g0, _, plain = _one_step(tmp_path / "plain", per_device_train_batch_size=4)
    loss1, g1, _, ckpt = _one_step(tmp_path / "ckpt", per_device_train_batch_size=4,
                                   **{field: True, f"{field}_kwargs": {"use_reentrant": use_reentrant}})
    assert checkpointing_on(ckpt.model) and not checkpointing_on(plain.model)
    # the recomputed forward runs the same ops on the same inputs (no dropout): bit-identical
    assert loss1 == loss0
    assert g0.keys() == g1.keys() and all(torch.equal(g0[n], g1[n]) for n in g0)


def checkpointing_on(model) -> bool:
    """The decoder's own flag (`gradient_checkpointing`; `activation_checkpointing` where 5.24 renamed it)."""
    return any(getattr(m, "gradient_checkpointing", False) is True or getattr(m, "activation_checkpointing", False)
               is True for m in model.get_base_model().modules())


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 128)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("how", ["peft_config", "peft_model", "plain_peft_config"])
def test_sft_trainer_trains_qpeft_lora_layers(tmp_path, how):
    """SFTTrainer on a qpeft model, the adapter from qpeft.lora_config or (plain_peft_config) a stock
    peft.LoraConfig as TRL recipes write it."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"t{int(i)}" for i in torch.randint(3, 128, (10,), generator=g)) for _ in range(4)]
    model = tiny_llama(0, intermediate_size=128)
    qpeft.quantize_model(model, compute_dtype=None)
    packed = {n: m.weight.clone() for n, m in model.named_modules() if isinstance(m, QLinearNF4)}
    if how == "plain_peft_config":
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    else:
        config = qpeft.lora_config(model=model, r=4, lora_alpha=8, target_modules="all-linear")
    kw = dict(peft_config=config) if how != "peft_model" else {}
    if how == "peft_model":
        model = peft.get_peft_model(model, config)
    sft_args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, logging_steps=1, save_strategy="steps", save_steps=2,
                             report_to="none", use_cpu=True, bf16=False, disable_tqdm=True)
    tr = trl.SFTTrainer(model=model, args=sft_args, train_dataset=Dataset.from_dict({"text": texts}),
                        processing_class=_tokenizer(), **kw)
    tr.train()
    assert isinstance(tr.model, peft.PeftModel)
    layers = {n.removeprefix(PREFIX): m for n, m in tr.model.named_modules() if isinstance(m, QPeftLoraLinear)}
    assert layers.keys() == packed.keys()
    assert all(torch.equal(layers[n].base_layer.weight, packed[n]) for n in packed)  # the 4-bit base is frozen
    assert all(m.lora_B["default"].weight.abs().sum() > 0 for m in layers.values())  # B trained away from 0
    assert tr.state.global_step == 2 and all("loss" in h for h in tr.state.log_history[:2])
    files = {p.name for p in (tmp_path / "checkpoint-2").iterdir()}
    assert "adapter_model.safetensors" in files and not any(f.startswith("model") for f in files), files


def test_trainer_on_add_adapter_model(tmp_path):
    """transformers' own PEFT integration (model.add_adapter): Trainer trains and saves the adapter only, but cannot
    resume from it (transformers' _load_from_checkpoint reads adapter files only for a PeftModel)."""
    from transformers.integrations import peft as hf_peft
    from packaging.version import Version

    model = tiny_llama(0, intermediate_size=128)
    qpeft.quantize_model(model, compute_dtype=None)
    config = qpeft.lora_config(model=model, r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    if Version(peft.__version__) < Version(hf_peft.MIN_PEFT_VERSION):
        # transformers 5.24 demands peft >= 0.22.0 for add_adapter & co. (the image lane has 0.21.2)
        with pytest.raises(ValueError, match=f"version >= {hf_peft.MIN_PEFT_VERSION}"):
            model.add_adapter(config)
        return
    model.add_adapter(config)
    full = LossTrainer(model=model, args=args(tmp_path / "a", save_strategy="steps", save_steps=2),
                       train_dataset=TokenData())
    full.train()
    files = {p.name for p in (tmp_path / "a" / "checkpoint-2").iterdir()}
    assert "adapter_model.safetensors" in files and not any(f.startswith(("model", "pytorch_model")) for f in files)
    again = tiny_llama(0, intermediate_size=128)
    qpeft.quantize_model(again, compute_dtype=None)
    again.add_adapter(qpeft.lora_config(model=again, r=4, lora_alpha=8, target_modules="all-linear",
                                        init_lora_weights=False))
    resumed = LossTrainer(model=again, args=args(tmp_path / "b"), train_dataset=TokenData())
    # transformers 5.17 Trainer._load_from_checkpoint: a model that is not a PeftModel goes to the full-model
    # loader, which finds no model*.safetensors (the same for any add_adapter model, quantized or not)
    with pytest.raises(ValueError, match="Can't find a checkpoint index"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    # the checkpoint itself is a sound PEFT adapter: it loads onto a fresh qpeft base, every tensor as saved
    from safetensors.torch import load_file

    fresh = tiny_llama(0, intermediate_size=128)
    qpeft.quantize_model(fresh, compute_dtype=None)
    loaded = qpeft.peft_from_pretrained(fresh, tmp_path / "a" / "checkpoint-2")
    assert sum(isinstance(m, QPeftLoraLinear) for m in loaded.modules()) == 14
    saved, theirs = load_file(str(tmp_path / "a" / "checkpoint-2" / "adapter_model.safetensors")), \
        peft.get_peft_model_state_dict(loaded)
    assert saved.keys() == theirs.keys() and len(saved) == 28 and all(torch.equal(saved[k], theirs[k]) for k in saved)


@pytest.mark.parametrize("plain", [False, True], ids=["lora_config", "plain_LoraConfig"])
def test_sft_trainer_from_a_path_quantizes_on_load_and_trains(tmp_path, plain):
    """SFTTrainer(model=<path>, quantization_config=QPeftConfig(), peft_config=qpeft.lora_config(...) or a plain
    peft.LoraConfig(...)): TRL loads the model through qpeft's quantizer, wraps it with PEFT, trains qpeft's LoRA
    layers and saves the adapter."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    base = tiny_llama(0, intermediate_size=128)
    base.save_pretrained(tmp_path / "base")
    reference = tiny_llama(0, intermediate_size=128)
    qpeft.quantize_model(reference, compute_dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"t{int(i)}" for i in torch.randint(3, 128, (10,), generator=g)) for _ in range(4)]
    sft_args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, logging_steps=1, save_strategy="steps", save_steps=2,
                             report_to="none", use_cpu=True, bf16=False, disable_tqdm=True)
    tr = trl.SFTTrainer(model=str(tmp_path / "base"), args=sft_args, train_dataset=Dataset.from_dict({"text": texts}),
                        processing_class=_tokenizer(),
                        quantization_config=qpeft.QPeftConfig(compute_dtype=torch.float32),
                        peft_config=(peft.LoraConfig if plain else qpeft.lora_config)(
                            r=4, lora_alpha=8, target_modules="all-linear"))
    layers = {n.removeprefix(PREFIX): m for n, m in tr.model.named_modules() if isinstance(m, QPeftLoraLinear)}
    assert len(layers) == 14
    ours = {n: m for n, m in reference.named_modules() if isinstance(m, QLinearNF4)}
    # the base TRL loaded is byte for byte what quantize_model makes of the same weights
    assert all(torch.equal(layers[n].base_layer.weight, ours[n].weight) and
               torch.equal(layers[n].base_layer.absmax_bytes, ours[n].absmax_bytes) for n in ours)
    tr.train()
    assert all(m.lora_B["default"].weight.abs().sum() > 0 for m in layers.values())
    assert all(torch.equal(layers[n].base_layer.weight, ours[n].weight) for n in ours)  # frozen
    files = {p.name for p in (tmp_path / "out" / "checkpoint-2").iterdir()}
    assert "adapter_model.safetensors" in files and not any(f.startswith("model") for f in files), files
