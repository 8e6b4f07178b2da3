"""qpeft.fuse on each family (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3): tiny random CausalLMs with PEFT LoRA
on every linear layer (random B, so every adapter gets a gradient) and trainable RMSNorm weights, fp32 on the CPU.
The fused model against the untouched one with the same weights and batch: the loss and every trainable gradient
within the 2x rule of an fp64 oracle (the untouched model in fp64) -- plain, padded, packed (transformers'
DataCollatorWithFlattening: per-sequence losses of the packed batch equal each sequence alone), under gradient
checkpointing with and without offload, with gradient accumulation (num_items_in_batch); 20 Trainer steps; the
forward without labels and generation unchanged; unfuse restores every module's class exactly."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import qpeft
from utils import TINY_CAUSAL_LMS, assert_close_2x, tiny_causal_lm

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FAMILIES = list(TINY_CAUSAL_LMS)
V = 100


def lora_model(family: str, **kw):
    """The family's tiny model under PEFT LoRA r=4 on all linear layers, its RMSNorm weights trainable too."""
    model = peft.get_peft_model(tiny_causal_lm(family, **kw),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                init_lora_weights=False))
    for name, p in model.named_parameters():
        if "norm" in name:
            p.requires_grad_(True)
    return model


def triplet(model):
    """(untouched fp32, fused fp32, untouched fp64 oracle), equal weights."""
    fused = qpeft.fuse(copy.deepcopy(model))
    return model, fused, copy.deepcopy(model).double()


def loss_and_grads(model, batches):
    """Sum of the losses of `batches` (dicts of model kwargs) and the gradients of every trainable parameter."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(model(**b, use_cache=False).loss for b in batches)
    return total, torch.autograd.grad(total, params)


def assert_fused_2x(unfused, fused, oracle, batches, what=""):
    with warnings.catch_warnings():
        warnings.simplefilter("error", qpeft.FusedFallbackWarning)  # every module really ran fused
        lf, gf = loss_and_grads(fused, batches)
    lu, gu = loss_and_grads(unfused, batches)
    lo, go = loss_and_grads(oracle, batches)
    assert torch.isfinite(lf) and lf.dtype == torch.float32
    assert_close_2x(lf, lo, lu, what=f"{what} loss")
    assert len(gf) == len(go) > 0
    for i, (f, o, u) in enumerate(zip(gf, go, gu)):
        assert u.abs().max() > 0, f"{what} gradient {i} is zero: the test would not see a wrong one"
        assert_close_2x(f, o, u, what=f"{what} gradient {i}")


def ids(*shape, seed=1):
    return torch.randint(3, V, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_gradients(family):
    x = ids(2, 12)
    assert_fused_2x(*triplet(lora_model(family)), [dict(input_ids=x, labels=x)], family)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch(family):
    x = ids(3, 9)
    mask = torch.ones_like(x)
    mask[1, 7:] = 0  # right padding, shorter than the sliding window (a query with only padded keys in its
    mask[2, 6:] = 0  # window is masked out entirely, NaN in eager attention, fused or not)
    labels = x.masked_fill(mask == 0, -100)
    assert_fused_2x(*triplet(lora_model(family)), [dict(input_ids=x.masked_fill(mask == 0, 0), attention_mask=mask,
                                                        labels=labels)], family)


def packed_batch(seqs):
    """transformers' own padding-free collator: one row, position_ids restarting per sequence, the first label of
    each sequence -100."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening()([{"input_ids": s.tolist(), "labels": s.tolist()} for s in seqs])


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_sequences_give_each_sequences_loss(family):
    seqs = [ids(n, seed=n) for n in (5, 7, 3)]
    batch = packed_batch(seqs)
    assert batch["position_ids"].tolist() == [list(range(5)) + list(range(7)) + list(range(3))]
    unfused, fused, oracle = triplet(lora_model(family))
    starts = [0, 5, 12, 15]
    for i, s in enumerate(seqs):
        # the packed batch's loss over sequence i alone (its labels only) is sequence i's own loss
        labels = torch.full_like(batch["labels"], -100)
        labels[0, starts[i]:starts[i + 1]] = batch["labels"][0, starts[i]:starts[i + 1]]
        packed = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=labels)
        with torch.no_grad():
            got = fused(**packed).loss  # use_cache left to the fused forward (False with labels)
            same = unfused(**packed, use_cache=False).loss
            want = oracle(input_ids=s[None], labels=s[None], use_cache=False).loss
        assert_close_2x(got, want, same, what=f"{family} sequence {i}")
    # and the whole packed batch's loss and gradients
    assert_fused_2x(unfused, fused, oracle, [{k: batch[k] for k in ("input_ids", "position_ids", "labels")}], family)


@pytest.mark.parametrize("offload", [False, True], ids=["checkpointing", "checkpointing+offload"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing(family, offload):
    model = lora_model(family)
    fused = copy.deepcopy(model)
    fused.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    qpeft.fuse(fused, offload_checkpoints=offload)
    x = ids(2, 12)
    assert_fused_2x(model, fused, copy.deepcopy(model).double(), [dict(input_ids=x, labels=x)], family)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_accumulation_with_num_items_in_batch(family):
    """Two micro-batches, each loss the sum over its tokens divided by the tokens of both (what the Trainer passes):
    their sum is the mean over the whole batch."""
    x1, x2 = ids(2, 10, seed=1), ids(3, 6, seed=2)
    l1 = x1.clone()
    l1[0, :4] = -100  # a prompt the loss ignores
    n = int((l1[:, 1:] != -100).sum() + (x2[:, 1:] != -100).sum())
    batches = [dict(input_ids=x1, labels=l1, num_items_in_batch=torch.tensor(n)),
               dict(input_ids=x2, labels=x2, num_items_in_batch=n)]
    unfused, fused, oracle = triplet(lora_model(family))
    assert_fused_2x(unfused, fused, oracle, batches, family)
    with torch.no_grad():
        whole = fused(input_ids=torch.cat([x1[:, :6], x2]), labels=torch.cat([l1[:, :6], x2])).loss
    assert whole.item() != pytest.approx(loss_and_grads(fused, batches)[0].item())  # the pieces were not just means


@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_steps_match_the_unfused_model(family, tmp_path):
    """20 Trainer steps (AdamW, batches of 2, two micro-batches per step: num_items_in_batch): the logged losses of
    the fused model within the 2x rule of the same run in fp64."""
    from transformers import Trainer, TrainingArguments

    data = [{"input_ids": s, "labels": s} for s in ids(80, 10).tolist()]

    def train(model, name):
        args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=20, learning_rate=1e-2, logging_steps=1,
                                 save_strategy="no", report_to=[], seed=0, data_seed=0, use_cpu=True,
                                 disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h], dtype=torch.float64)

    unfused, fused, oracle = triplet(lora_model(family))
    got, same, want = train(fused, "fused"), train(unfused, "unfused"), train(oracle, "fp64")
    assert len(got) == 20 and len(set(got.tolist())) > 1
    assert_close_2x(got, want, same, eps=1e-5, what=f"{family} Trainer losses")


@pytest.mark.parametrize("family", FAMILIES)
def test_without_labels_and_generation_unchanged(family):
    unfused, fused, oracle = triplet(lora_model(family))
    x = ids(2, 7)
    with torch.no_grad():
        got, same, want = (m(input_ids=x).logits for m in (fused, unfused, oracle))
    assert_close_2x(got, want, same, what=f"{family} logits")
    out = fused.generate(input_ids=x, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, unfused.generate(input_ids=x, max_new_tokens=5, do_sample=False))
    with torch.no_grad():  # with labels: the loss and no logits
        res = fused(input_ids=x, labels=x)
    assert res.logits is None and res.loss is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_unfuse_restores_every_class(family):
    model = lora_model(family)
    before = {name: type(m) for name, m in model.named_modules()}
    keys = list(model.state_dict())
    qpeft.fuse(model, offload_checkpoints=True)
    fam = qpeft.models.fused.registry.family_of(model.get_base_model())
    swapped = {name for name, m in model.named_modules() if type(m) is not before[name]}
    roles = {type(model.get_submodule(n)).__name__ for n in swapped}
    assert roles == {fam.causal_lm, fam.decoder_layer, fam.attention, fam.mlp, fam.norm}
    assert all(issubclass(type(model.get_submodule(n)), before[n]) for n in swapped)
    assert list(model.state_dict()) == keys
    qpeft.unfuse(model)
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert not any("_qpeft_fuse" in m.__dict__ for m in model.modules())
