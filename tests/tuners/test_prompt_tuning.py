"""Prompt tuning: shapes and masks, identity when disabled, gradients, training, init modes, generate, bad input."""
from __future__ import annotations

import pytest
import torch

import qpeft
from qpeft.tuners.prompt_tuning import PromptLearningModel, add_prompt_tuning
from utils import tiny_bert, tiny_llama


class CharTokenizer:
    """A tokenizer stub (no files, no network): one id per character, [CLS]=1 ... [SEP]=2, pad=0, mask=3."""

    mask_token, mask_token_id, pad_token_id, padding_side = "@", 3, 0, "right"

    def __init__(self, vocab_size: int = 128):
        self.vocab_size = vocab_size

    def _ids(self, text, add_special_tokens=True):
        ids = [self.mask_token_id if c == "@" else 4 + ord(c) % (self.vocab_size - 4) for c in text]
        return [1, *ids, 2] if add_special_tokens else ids

    def __call__(self, texts, padding=False, truncation=False, max_length=None, return_tensors=None,
                 add_special_tokens=True):
        single = isinstance(texts, str)
        rows = [self._ids(t, add_special_tokens) for t in ([texts] if single else texts)]
        if truncation and max_length:
            rows = [r[:max_length] for r in rows]
        if return_tensors != "pt":
            return {"input_ids": rows[0] if single else rows}
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def _batch(B=3, L=7, vocab=128, pad_rows=(1,)):
    ids = torch.randint(3, vocab, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    for r in pad_rows:
        mask[r, :2] = 0  # left padding on some rows
    return ids, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama_forward_matches_manual_concat(dtype):
    ids, mask = _batch()
    model = add_prompt_tuning(tiny_llama().to(dtype), 5)
    base = model.base_model
    labels = ids.clone()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        prompt = model.prompt_encoders["default"].embedding.weight.to(dtype).expand(3, -1, -1)
        embeds = torch.cat([prompt, base.get_input_embeddings()(ids)], 1)
        ref = base(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(3, 5, dtype=torch.long), mask], 1),
                   labels=torch.cat([torch.full((3, 5), -100), labels], 1))
    assert out.logits.shape == (3, 5 + 7, 128) and out.logits.dtype == dtype
    assert torch.equal(out.logits, ref.logits)
    assert torch.equal(out.loss, ref.loss)
    assert torch.isfinite(out.loss)


def test_bert_forward_shapes_masks_token_types():
    ids, mask = _batch()
    tt = torch.randint(0, 2, ids.shape)
    model = add_prompt_tuning(tiny_bert(), 4)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        base = model.base_model
        emb = torch.cat([model.prompt_encoders["default"].prompt().expand(3, -1, -1),
                         base.get_input_embeddings()(ids)], 1)
        ref = base(inputs_embeds=emb, attention_mask=torch.cat([torch.ones(3, 4, dtype=torch.long), mask], 1),
                   token_type_ids=torch.cat([torch.zeros(3, 4, dtype=torch.long), tt], 1))
    assert out.last_hidden_state.shape == (3, 4 + 7, 64)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    # the padding mask still matters: changing a padded token leaves the other positions unchanged
    ids2 = ids.clone()
    ids2[1, 0] = (ids2[1, 0] + 1) % 128
    with torch.no_grad():
        out2 = model(input_ids=ids2, attention_mask=mask, token_type_ids=tt)
    torch.testing.assert_close(out2.last_hidden_state[1, 4 + 2:], out.last_hidden_state[1, 4 + 2:])


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_disabled_equals_base(make):
    ids, mask = _batch()
    base = make()
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask)
    model = add_prompt_tuning(make(), 6)
    with torch.no_grad():
        with model.disable_adapters():
            out = model(input_ids=ids, attention_mask=mask)
        on = model(input_ids=ids, attention_mask=mask)
    key = "logits" if "logits" in ref else "last_hidden_state"
    assert torch.equal(out[key], ref[key])
    assert on[key].shape[1] == ref[key].shape[1] + 6  # enabled again after the context


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_only_prompt_gets_gradients_and_loss_drops(make):
    ids, mask = _batch()
    model = add_prompt_tuning(make(), 4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_encoders.default.embedding.weight"]
    report = qpeft.trainable_parameters(model)
    assert report.trainable == 4 * 64
    assert report.total == 4 * 64 + sum(p.numel() for p in model.base_model.parameters())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)

    def loss_fn():
        if make is tiny_llama:
            return model(input_ids=ids, attention_mask=mask, labels=ids).loss
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        return (out[:, 4:] - target).pow(2).mean()  # regress the real tokens' states to a fixed target

    target = torch.randn(3, 7, 64)

    losses = []
    for _ in range(8):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, n
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


def test_init_vocab_and_text():
    base = tiny_llama()
    emb = base.get_input_embeddings().weight.detach().clone()
    model = add_prompt_tuning(base, 5, init="vocab")
    w = model.prompt_encoders["default"].embedding.weight.detach()
    # every row is some vocabulary embedding
    assert all(bool((emb == row).all(-1).any()) for row in w)
    tok = CharTokenizer()
    model2 = add_prompt_tuning(tiny_llama(), 7, init="text", init_text="abc", tokenizer=tok)
    ids = tok("abc")["input_ids"]  # [CLS] a b c [SEP]: 5 ids, repeated then cut to 7
    expected = emb[torch.tensor((ids * 2)[:7])]
    assert torch.equal(model2.prompt_encoders["default"].embedding.weight.detach(), expected)
    model3 = add_prompt_tuning(tiny_llama(), 2, init="text", init_text="abcdef", tokenizer=tok)
    assert torch.equal(model3.prompt_encoders["default"].embedding.weight.detach(), emb[torch.tensor(ids[:2])])


def test_generate_equals_stepwise_greedy():
    ids = torch.randint(3, 128, (2, 5))
    model = add_prompt_tuning(tiny_llama(), 3)
    out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    seq = ids.clone()
    for _ in range(6):  # no cache: the full sequence each step
        with torch.no_grad():
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)
    with model.disable_adapters():
        plain = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(plain, model.base_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False))


def test_multiple_adapters_and_switching():
    ids, mask = _batch()
    model = add_prompt_tuning(tiny_llama(), 3)
    model = add_prompt_tuning(model, 5, adapter_name="other")
    assert model.active_adapter == "other"
    with torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask).logits.shape[1] == 12
        model.set_adapter("default")
        assert model(input_ids=ids, attention_mask=mask).logits.shape[1] == 10
    with pytest.raises(ValueError, match="adapter_name 'other' already exists"):
        add_prompt_tuning(model, 2, adapter_name="other")


def test_bad_input():
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int, got 0"):
        add_prompt_tuning(tiny_llama(), 0)
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int, got -3"):
        add_prompt_tuning(tiny_llama(), -3)
    with pytest.raises(ValueError, match="init='text' needs a tokenizer"):
        add_prompt_tuning(tiny_llama(), 4, init="text", init_text="hello")
    with pytest.raises(ValueError, match="init must be one of"):
        add_prompt_tuning(tiny_llama(), 4, init="zeros")
    with pytest.raises(ValueError, match="init_text"):
        add_prompt_tuning(tiny_llama(), 4, init="text", init_text="", tokenizer=CharTokenizer())
    base = tiny_llama()
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        add_prompt_tuning(base, 0)
    assert all(p.requires_grad for p in base.parameters())  # a failed add leaves the model as it was
    model = add_prompt_tuning(tiny_llama(), 2)
    ids = torch.randint(3, 128, (1, 4))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="past_key_values"):
        model(input_ids=ids, past_key_values=object())
    with pytest.raises(ValueError, match="is not a generative decoder"):
        add_prompt_tuning(tiny_bert(), 2).generate(input_ids=ids)
    with pytest.raises(ValueError, match="already a PromptLearningModel"):
        PromptLearningModel(model)
