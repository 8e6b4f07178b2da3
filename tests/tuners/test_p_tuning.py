"""P-tuning v1: encoder structure (MLP / biLSTM + MLP, as PEFT), forward = prompt-encoder output prepended,
gradients only in the encoder, training, disable, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qpeft.tuners.p_tuning import PTuningEncoder, add_p_tuning
from utils import assert_generate_is_greedy, tiny_bert, tiny_llama, train_prompt_steps


def _batch(B=2, L=6):
    ids = torch.randint(3, 128, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, :1] = 0
    return ids, mask


def test_mlp_encoder_matches_formula():
    enc = PTuningEncoder(5, 16, "mlp", encoder_hidden_size=12)
    x = enc.embedding.weight
    l1, l2, l3 = enc.mlp_head[0], enc.mlp_head[2], enc.mlp_head[4]
    ref = l3(torch.relu(l2(torch.relu(l1(x)))))
    assert [type(m) for m in enc.mlp_head] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert (l1.in_features, l1.out_features, l3.out_features) == (16, 12, 16)
    assert torch.equal(enc.prompt(), ref)


def test_lstm_encoder_matches_formula():
    enc = PTuningEncoder(5, 16, "lstm", encoder_hidden_size=8, encoder_num_layers=2)
    assert enc.lstm_head.bidirectional and enc.lstm_head.num_layers == 2 and enc.lstm_head.hidden_size == 8
    seq = enc.lstm_head(enc.embedding.weight.unsqueeze(0))[0][0]
    assert seq.shape == (5, 16)
    assert torch.equal(enc.prompt(), enc.mlp_head(seq))
    assert enc.prompt().shape == (5, 16)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_bert])
def test_forward_is_encoder_output_prepended(make, encoder):
    ids, mask = _batch()
    model = add_p_tuning(make(), 4, encoder=encoder, encoder_hidden_size=24)
    base = model.base_model
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
        prompt = model.prompt_encoders["default"].prompt().expand(2, -1, -1)
        ref = base(inputs_embeds=torch.cat([prompt, base.get_input_embeddings()(ids)], 1),
                   attention_mask=torch.cat([torch.ones(2, 4, dtype=torch.long), mask], 1))
        with model.disable_adapters():
            off = model(input_ids=ids, attention_mask=mask)
        plain = base(input_ids=ids, attention_mask=mask)
    key = "logits" if "logits" in ref else "last_hidden_state"
    assert out[key].shape[1] == 4 + 6
    assert torch.equal(out[key], ref[key])
    assert torch.equal(off[key], plain[key])


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_only_encoder_trains_and_loss_drops(encoder):
    ids, mask = _batch()
    model = add_p_tuning(tiny_llama(), 4, encoder=encoder, encoder_hidden_size=32)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("prompt_encoders.default.") for n in names)
    losses = train_prompt_steps(model, 8, input_ids=ids, attention_mask=mask, labels=ids)
    assert losses[-1] < losses[0] - 1e-3, losses


def test_generate_equals_stepwise_greedy():
    ids = torch.randint(3, 128, (2, 4))
    model = add_p_tuning(tiny_llama(), 3)
    assert_generate_is_greedy(model, ids, 5)


def test_bad_input():
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int, got 0"):
        add_p_tuning(tiny_llama(), 0)
    with pytest.raises(ValueError, match="encoder must be 'mlp' or 'lstm', got 'gru'"):
        add_p_tuning(tiny_llama(), 4, encoder="gru")
    with pytest.raises(ValueError, match="encoder_hidden_size must be a positive int"):
        add_p_tuning(tiny_llama(), 4, encoder_hidden_size=0)
    with pytest.raises(ValueError, match="encoder_dropout"):
        add_p_tuning(tiny_llama(), 4, encoder="lstm", encoder_dropout=1.5)
