"""Prefix tuning: PEFT's prefix layout into a DynamicCache (GQA: KV heads), forward = base model with that cache,
masks, identity when disabled, gradients, training, dropout, generate vs step-by-step, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qpeft.tuners._prompt_common import prefix_cache, with_cache
from qpeft.tuners.prefix_tuning import PrefixEncoder, add_prefix_tuning
from utils import tiny_bert, tiny_llama, train_prompt_steps


def _batch(B=3, L=6, left_pad=True):
    ids = torch.randint(3, 128, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    if left_pad:
        mask[1, :2] = 0
    return ids, mask


def test_cache_layout_gqa():
    model = add_prefix_tuning(tiny_llama(), 5)  # 2 layers, 4 query heads, 2 KV heads, head_dim 16
    enc = model.prompt_encoders["default"]
    assert enc.embedding.weight.shape == (5, 2 * 2 * 2 * 16)
    flat = enc.prompt().detach()
    cache = prefix_cache(model.base_model, flat, 3)
    assert cache.get_seq_length() == 5
    view = flat.view(5, 2 * 2, 2, 16)  # (n, 2L, kv_heads, head_dim): layer-major, K then V
    for layer in range(2):
        k, v = cache.layers[layer].keys, cache.layers[layer].values
        assert k.shape == (3, 2, 5, 16)
        assert torch.equal(k[1], view[:, 2 * layer].transpose(0, 1))
        assert torch.equal(v[2], view[:, 2 * layer + 1].transpose(0, 1))


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_forward_is_base_with_prefix_cache(make, projection):
    ids, mask = _batch()
    model = add_prefix_tuning(make(), 4, projection=projection, encoder_hidden_size=20)
    base = model.base_model
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        cache = prefix_cache(base, model.prompt_encoders["default"].prompt(), 3)
        ref = base(input_ids=ids, attention_mask=torch.cat([torch.ones(3, 4, dtype=torch.long), mask], 1),
                   **with_cache(base, cache))
        plain = base(input_ids=ids, attention_mask=mask)
    key = "logits" if "logits" in ref else "last_hidden_state"
    assert out[key].shape == plain[key].shape  # a prefix adds no output positions
    assert torch.equal(out[key], ref[key])
    assert not torch.allclose(out[key], plain[key])


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_mask_hides_padding_from_prefixed_model(make):
    ids, mask = _batch()
    model = add_prefix_tuning(make(), 3)
    ids2 = ids.clone()
    ids2[1, :2] = (ids2[1, :2] + 7) % 128  # change only padded tokens of row 1
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask)
        b = model(input_ids=ids2, attention_mask=mask)
    key = "logits" if "logits" in a else "last_hidden_state"
    torch.testing.assert_close(a[key][1, 2:], b[key][1, 2:], rtol=1e-5, atol=1e-5)
    assert torch.equal(a[key][0], b[key][0])


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_disabled_equals_base(make):
    ids, mask = _batch()
    with torch.no_grad():
        ref = make()(input_ids=ids, attention_mask=mask)
        model = add_prefix_tuning(make(), 4)
        with model.disable_adapters():
            out = model(input_ids=ids, attention_mask=mask)
    key = "logits" if "logits" in ref else "last_hidden_state"
    assert torch.equal(out[key], ref[key])


@pytest.mark.parametrize("projection", [False, True])
def test_only_prefix_trains_and_loss_drops(projection):
    ids, mask = _batch()
    model = add_prefix_tuning(tiny_llama(), 4, projection=projection, encoder_hidden_size=32)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"prompt_encoders.default.embedding.weight"}
    if projection:
        expected |= {f"prompt_encoders.default.transform.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    assert names == expected
    losses = train_prompt_steps(model, 8, input_ids=ids, attention_mask=mask, labels=ids)
    assert losses[-1] < losses[0] - 1e-3, losses


def test_prefix_dropout_only_in_training():
    enc = PrefixEncoder(4, 2, 32, prefix_dropout=0.5)
    enc.eval()
    assert torch.equal(enc.prompt(), enc.embedding.weight)
    enc.train()
    dropped = enc.prompt()
    zeros = (dropped == 0).float().mean().item()
    assert 0.3 < zeros < 0.7  # Bernoulli(0.5) over 256 values
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], 2 * enc.embedding.weight[kept])


def test_projection_structure():
    enc = PrefixEncoder(3, 2, 32, projection=True, encoder_hidden_size=24)
    assert enc.embedding.weight.shape == (3, 32)
    assert [type(m) for m in enc.transform] == [nn.Linear, nn.Tanh, nn.Linear]
    ref = enc.transform[2](torch.tanh(enc.transform[0](enc.embedding.weight)))
    assert ref.shape == (3, 2 * 2 * 32)
    assert torch.equal(enc.prompt(), ref)


@pytest.mark.parametrize("padded", [False, True])
def test_generate_equals_stepwise(padded):
    ids, mask = _batch(B=2, L=5, left_pad=padded)
    if not padded:
        mask = torch.ones_like(ids)
    model = add_prefix_tuning(tiny_llama(), 4)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    seq, m = ids, mask
    for _ in range(6):  # the prefix re-injected at every step, no generation cache
        with torch.no_grad():
            nxt = model(input_ids=seq, attention_mask=m).logits[:, -1].argmax(-1, keepdim=True)
        seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out, seq)


class _NoCacheModel(nn.Module):
    """A model whose forward takes no KV cache (neither `cache` nor `past_key_values`)."""

    class config:  # noqa: N801
        model_type = "toy"
        is_encoder_decoder = False
        hidden_size = num_hidden_layers = num_attention_heads = 4

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids=None, attention_mask=None):
        return self.emb(input_ids)


def test_bad_input():
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int, got 0"):
        add_prefix_tuning(tiny_llama(), 0)
    with pytest.raises(ValueError, match="prefix_dropout"):
        add_prefix_tuning(tiny_llama(), 2, prefix_dropout=1.0)
    with pytest.raises(ValueError, match="model type 'toy' cannot take a prefix"):
        add_prefix_tuning(_NoCacheModel(), 2)
    from transformers import T5Config, T5ForConditionalGeneration

    # d_kv * num_heads != d_model: PEFT's seq2seq prefix layout cannot describe this T5
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(NotImplementedError, match="encoder-decoder model type 't5'"):
        add_prefix_tuning(t5, 2)
    model = add_prefix_tuning(tiny_llama(), 2)
    with pytest.raises(ValueError, match="past_key_values"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long), past_key_values=prefix_cache(model.base_model,
                                                                                      torch.zeros(2, 128), 1))
