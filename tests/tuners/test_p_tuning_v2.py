"""P-tuning v2: deep prompts on a selectable set of layers (others exactly unchanged), classification head on
the first / last token, gradients, training, generate with a layer subset, bad input."""
from __future__ import annotations

import pytest
import torch

from qpeft.tuners._prompt_common import prefix_cache, with_cache
from qpeft.tuners.p_tuning_v2 import add_p_tuning_v2
from utils import assert_generate_is_greedy, tiny_bert, tiny_llama, train_prompt_steps


def _batch(B=3, L=6):
    ids = torch.randint(3, 128, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[2, -2:] = 0  # right padding
    return ids, mask


def test_all_layers_equals_prefix_cache():
    ids, mask = _batch()
    model = add_p_tuning_v2(tiny_bert(), 4)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = model.base_model(input_ids=ids, attention_mask=torch.cat([torch.ones(3, 4, dtype=torch.long), mask], 1),
                               **with_cache(model.base_model, prefix_cache(
                                   model.base_model, model.prompt_encoders["default"].prompt(), 3)))
    assert torch.equal(out, ref.last_hidden_state)


@pytest.mark.parametrize("layers", [[1], [0]])
def test_layer_subset_leaves_other_layers_unchanged(layers):
    ids, mask = _batch()
    base = tiny_llama(layers=3)
    with torch.no_grad():
        hb = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    model = add_p_tuning_v2(tiny_llama(layers=3), 4, layers=layers)
    enc = model.prompt_encoders["default"]
    assert enc.embedding.weight.shape == (4, len(layers) * 2 * 2 * 16)  # params only for the chosen layers
    flat = enc.prompt().detach().view(4, 3, -1)
    others = [i for i in range(3) if i not in layers]
    assert torch.equal(flat[:, others], torch.zeros_like(flat[:, others]))
    with torch.no_grad():
        hw = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    first = layers[0]
    # hidden_states[i + 1] is layer i's output; layers before the first prompted one equal the base model
    # (RoPE is relative, so the position shift by the prefix slot does not change them)
    for i in range(first):
        torch.testing.assert_close(hw[i + 1], hb[i + 1], rtol=1e-6, atol=1e-6)
    assert (hw[first + 1] - hb[first + 1]).abs().max() > 1e-3


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_unprompted_layers_ignore_prefix_values(make):
    """In a layer outside `layers` the prefix slot is masked: even non-zero K/V there change nothing."""
    ids, mask = _batch()
    model = add_p_tuning_v2(make(), 3, layers=[1])
    key = "logits" if make is tiny_llama else "last_hidden_state"
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)[key]
        enc = model.prompt_encoders["default"]
        orig = enc.prompt

        def noisy_prompt():
            p = orig().view(3, 2, -1).clone()
            p[:, 0] = torch.randn_like(p[:, 0]) * 3
            return p.view(3, -1)

        enc.prompt = noisy_prompt
        out2 = model(input_ids=ids, attention_mask=mask)[key]
        enc.prompt = orig
        out3 = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    torch.testing.assert_close(out, out2, rtol=1e-5, atol=1e-5)
    assert torch.equal(out3[key], out)


@pytest.mark.parametrize("make,pool", [(tiny_bert, "first"), (tiny_llama, "last")])
def test_head_logits_and_training(make, pool):
    ids, mask = _batch()
    labels = torch.tensor([0, 2, 1])
    model = add_p_tuning_v2(make(), 4, num_labels=3, projection=True, encoder_hidden_size=16)
    head = model.heads["default"]
    assert head.pool == pool
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        hs = model.base_model(input_ids=ids, attention_mask=torch.cat([torch.ones(3, 4, dtype=torch.long), mask], 1),
                              **with_cache(model.base_model, prefix_cache(
                                  model.base_model, model.prompt_encoders["default"].prompt(), 3)),
                              output_hidden_states=True)
        h = getattr(hs, "last_hidden_state", None)
        h = hs.hidden_states[-1] if h is None else h
        pooled = h[:, 0] if pool == "first" else h[torch.arange(3), mask.sum(1) - 1]
        ref = head.classifier(pooled)
    assert out.logits.shape == (3, 3)
    torch.testing.assert_close(out.logits, ref)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(ref, labels))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("prompt_encoders.default.", "heads.default.")) for n in names)
    losses = train_prompt_steps(model, 10, input_ids=ids, attention_mask=mask, labels=labels)
    assert losses[-1] < losses[0] - 1e-3, losses


def test_generate_with_layer_subset_equals_stepwise():
    ids = torch.randint(3, 128, (2, 5))
    model = add_p_tuning_v2(tiny_llama(layers=3), 3, layers=[0, 2])
    assert_generate_is_greedy(model, ids, 5)


def test_disabled_equals_base():
    ids, mask = _batch()
    with torch.no_grad():
        ref = tiny_bert()(input_ids=ids, attention_mask=mask).last_hidden_state
        model = add_p_tuning_v2(tiny_bert(), 4, layers=[1])
        with model.disable_adapters():
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(out, ref)


def test_bad_input():
    with pytest.raises(ValueError, match=r"layers: indices \[2\] out of range for a model with 2 layers"):
        add_p_tuning_v2(tiny_llama(), 4, layers=[0, 2])
    with pytest.raises(ValueError, match=r"layers: indices \[-1\] out of range"):
        add_p_tuning_v2(tiny_bert(), 4, layers=[-1])
    with pytest.raises(ValueError, match="layers must name at least one layer"):
        add_p_tuning_v2(tiny_bert(), 4, layers=[])
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int, got -1"):
        add_p_tuning_v2(tiny_bert(), -1)
    with pytest.raises(ValueError, match="num_labels must be a positive int, got 0"):
        add_p_tuning_v2(tiny_bert(), 4, num_labels=0)
    with pytest.raises(ValueError, match="pool must be 'first' or 'last'"):
        add_p_tuning_v2(tiny_bert(), 4, num_labels=2, pool="mean")
