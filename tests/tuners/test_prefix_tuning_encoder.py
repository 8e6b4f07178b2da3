"""Opt-in encoder-stack prefix (`add_prefix_tuning(..., encoder_prefix=True)`) on T5 and BART: every encoder
self-attention layer gets its own K/V prefix, visible to all real tokens. Covers a hand-computed reference for one
attention layer (eager and sdpa), encoder outputs change, disabled = base, only prefix parameters train and the
loss falls, generate == step-by-step greedy, save_adapter refuses (PEFT cannot hold it), bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qpeft._hf_compat import enable_checkpointing
from qpeft.tuners.adapter_io import save_adapter
from qpeft.tuners.prefix_tuning import add_prefix_tuning
from test_prefix_tuning_seq2seq import HEAD_DIM, HEADS, LAYERS, _batch, tiny_bart, tiny_t5
from utils import assert_seq2seq_disabled_equals_base, assert_seq2seq_generate_is_greedy, tiny_llama, train_prompt_steps

N = 3  # virtual tokens
MAKERS = [tiny_t5, tiny_bart]


def _model(make, attn="sdpa", **kw):
    base = make()
    base.set_attn_implementation(attn)
    model = add_prefix_tuning(base, N, encoder_prefix=True, **kw)
    torch.manual_seed(1)  # prefixes far from zero, so a missing or misplaced one cannot go unnoticed
    for p in model.prompt_encoders["default"].parameters():
        torch.nn.init.normal_(p, std=1.0)
    return model


def _layer0_attention(base):
    encoder = base.get_encoder()
    return encoder.block[0].layer[0].SelfAttention if hasattr(encoder, "block") else encoder.layers[0].self_attn


def _reference_layer0(base, x, mask2d, prefix_flat):
    """Encoder layer-0 self-attention on keys/values [prefix; x], written out by hand in fp32.
    prefix_flat: (N, L * 2 * H * hd), PEFT's layout (layer, K/V, head, head_dim)."""
    attn = _layer0_attention(base)
    B, S, _ = x.shape
    kv = prefix_flat.view(N, LAYERS, 2, HEADS, HEAD_DIM)
    pk = kv[:, 0, 0].permute(1, 0, 2).expand(B, -1, -1, -1)  # (B, H, N, hd)
    pv = kv[:, 0, 1].permute(1, 0, 2).expand(B, -1, -1, -1)
    t5 = hasattr(attn, "relative_attention_bias")
    q_proj, k_proj, v_proj, o_proj = ((attn.q, attn.k, attn.v, attn.o) if t5
                                      else (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj))
    heads = lambda t: t.view(B, S, HEADS, HEAD_DIM).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q_proj(x)), heads(k_proj(x)), heads(v_proj(x))
    k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    scores = q @ k.transpose(-1, -2)
    if t5:  # no 1/sqrt(d) scaling; relative bias with the prefix in the place of N past tokens
        rel = torch.arange(N + S)[None, :] - (torch.arange(S)[:, None] + N)
        bucket = attn._relative_position_bucket(rel, bidirectional=True,
                                                num_buckets=attn.relative_attention_num_buckets,
                                                max_distance=attn.relative_attention_max_distance)
        scores = scores + attn.relative_attention_bias(bucket).permute(2, 0, 1)
    else:
        scores = scores * HEAD_DIM ** -0.5
    visible = torch.cat([torch.ones(B, N, dtype=torch.bool), mask2d.bool()], 1)  # prefix always visible
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    out = (F.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, S, HEADS * HEAD_DIM)
    return o_proj(out)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("make", MAKERS)
def test_encoder_attention_matches_hand_computed_reference(make, attn):
    ids, mask, labels = _batch()
    model = _model(make, attn)
    seen = {}

    def grab(mod, args, kwargs, output):
        seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen["out"] = output[0]

    handle = _layer0_attention(model.base_model).register_forward_hook(grab, with_kwargs=True)
    for given in (mask, None):  # padded rows (4-D mask), and no mask (sdpa: None reaches the attention)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=given, labels=labels)
            ref = _reference_layer0(model.base_model, seen["x"], torch.ones_like(mask) if given is None else given,
                                    model.prompt_encoders["default"].encoder_stack.prompt())
        assert seen["out"].shape == ref.shape == (2, ids.shape[1], HEADS * HEAD_DIM)
        torch.testing.assert_close(seen["out"], ref)
    handle.remove()


@pytest.mark.parametrize("make", MAKERS)
def test_encoder_outputs_change_and_hooks_are_removed(make):
    ids, mask, labels = _batch()
    model = _model(make)
    plain = add_prefix_tuning(make(), N)  # PEFT's decoder-only prefix, same decoder prefix values
    plain.prompt_encoders["default"].load_state_dict(
        {k: v for k, v in model.prompt_encoders["default"].state_dict().items() if not k.startswith("encoder_stack")})
    with torch.no_grad():
        on = model(input_ids=ids, attention_mask=mask, labels=labels)
        off = plain(input_ids=ids, attention_mask=mask, labels=labels)
        base_enc = model.base_model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert on.encoder_last_hidden_state.shape == off.encoder_last_hidden_state.shape  # prefix adds K/V, not rows
    assert torch.equal(off.encoder_last_hidden_state, base_enc)
    assert (on.encoder_last_hidden_state - base_enc).abs().amax() > 1e-2
    assert not torch.allclose(on.logits, off.logits)
    # the hooks live only for the wrapper's call: the bare encoder afterwards is the base encoder
    attns = [m for m in model.base_model.get_encoder().modules() if m._forward_pre_hooks]
    assert attns == []


@pytest.mark.parametrize("make", MAKERS)
def test_disabled_equals_base(make):
    assert_seq2seq_disabled_equals_base(make(), _model(make), *_batch())


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("make", MAKERS)
def test_only_prefix_params_train_and_loss_drops(make, projection):
    ids, mask, labels = _batch()
    model = add_prefix_tuning(make(), N, projection=projection, encoder_hidden_size=24, encoder_prefix=True)
    enc = model.prompt_encoders["default"]
    stack_params = list(enc.encoder_stack.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in enc.parameters()}
    assert stack_params and all(p.requires_grad for p in stack_params)
    before = [p.detach().clone() for p in stack_params]
    losses = train_prompt_steps(model, 6, lr=5e-2, input_ids=ids, attention_mask=mask, labels=labels)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(b, p) for b, p in zip(before, stack_params))  # the encoder prefix trained too


def test_prefix_dropout_applies_to_encoder_stack_in_training_only():
    ids, mask, labels = _batch()
    model = add_prefix_tuning(tiny_bart(), N, prefix_dropout=0.5, encoder_prefix=True)
    stack = model.prompt_encoders["default"].encoder_stack
    assert stack.prefix_dropout.p == 0.5
    torch.manual_seed(0)
    model.train()
    model.base_model.eval()  # only the adapter in training mode: BART's own dropout (0.1) must not vary the output
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, labels=labels).encoder_last_hidden_state
        b = model(input_ids=ids, attention_mask=mask, labels=labels).encoder_last_hidden_state
        model.eval()
        c = model(input_ids=ids, attention_mask=mask, labels=labels).encoder_last_hidden_state
        d = model(input_ids=ids, attention_mask=mask, labels=labels).encoder_last_hidden_state
    assert not torch.equal(a, b) and torch.equal(c, d)


@pytest.mark.parametrize("make", MAKERS)
def test_generate_is_step_by_step_greedy(make):
    ids, mask, _ = _batch()
    model = _model(make)
    assert_seq2seq_generate_is_greedy(model, ids, mask, steps=4)


def test_save_adapter_refuses_encoder_prefix(tmp_path):
    model = _model(tiny_t5)
    with pytest.raises(ValueError, match="encoder_prefix=True.*PREFIX_TUNING format"):
        save_adapter(model, tmp_path / "enc")
    assert not (tmp_path / "enc").exists()  # nothing half-written
    plain = add_prefix_tuning(tiny_t5(), N)
    assert (save_adapter(plain, tmp_path / "plain") / "adapter_model.safetensors").is_file()


def test_bad_input():
    ids, mask, labels = _batch()
    with pytest.raises(ValueError, match="encoder_prefix must be a bool"):
        add_prefix_tuning(tiny_t5(), N, encoder_prefix="yes")
    llama = tiny_llama()
    with pytest.raises(ValueError, match="encoder_prefix=True needs an encoder-decoder model"):
        add_prefix_tuning(llama, N, encoder_prefix=True)
    assert all(p.requires_grad for p in llama.parameters())  # refused before wrapping: model untouched
    base = tiny_bart()
    base.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attention implementation 'flash_attention_2'"):
        add_prefix_tuning(base, N, encoder_prefix=True)
    model = _model(tiny_t5)
    with pytest.raises(ValueError, match="encoder_outputs"):
        model(input_ids=ids, labels=labels, encoder_outputs=(torch.randn(2, ids.shape[1], HEADS * HEAD_DIM),))
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int"):
        add_prefix_tuning(tiny_bart(), 0, encoder_prefix=True)
    # checkpointed encoder layers would recompute without the prefix in backward: refused, not silently wrong
    enable_checkpointing(model.base_model)
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids=ids, attention_mask=mask, labels=labels)
