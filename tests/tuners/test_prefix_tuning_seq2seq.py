"""Prompt-side methods on encoder-decoder models (T5, BART), as PEFT's PeftModelForSeq2SeqLM does them:
prefix tuning -> decoder self-attention prefix through an EncoderDecoderCache (PEFT's layout and its
num_transformer_submodules=2 split), prompt tuning / P-tuning -> first n of 2n virtual tokens before the encoder
input. Covers cache layout, masks, disabled = base, gradients and training, generate == step-by-step greedy,
PEFT round trips both ways, bad input."""
from __future__ import annotations

import json

import pytest
import torch

from qpeft.tuners.adapter_io import load_adapter, save_adapter
from qpeft.tuners._prompt_common import PromptLearningModel, prefix_cache, with_cache
from qpeft.tuners.p_tuning import add_p_tuning
from qpeft.tuners.p_tuning_v2 import add_p_tuning_v2
from qpeft.tuners.prefix_tuning import add_prefix_tuning
from qpeft.tuners.prompt_tuning import add_prompt_tuning, load_prompt_adapter
from utils import (assert_generate_matches_peft, assert_seq2seq_disabled_equals_base, assert_seq2seq_generate_is_greedy,
                   tiny_llama, train_prompt_steps)

peft = pytest.importorskip("peft")

VOCAB, LAYERS, HEADS, HEAD_DIM = 128, 2, 4, 8
D_MODEL = HEADS * HEAD_DIM


def tiny_t5(seed: int = 0, num_decoder_layers: int | None = None):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=D_MODEL, d_kv=HEAD_DIM, d_ff=64, num_layers=LAYERS,
                   num_decoder_layers=num_decoder_layers, num_heads=HEADS, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_bart(seed: int = 0):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    # forced_eos_token_id=None: generate must be plain greedy to compare it with a step-by-step loop.
    cfg = BartConfig(vocab_size=VOCAB, d_model=D_MODEL, encoder_layers=LAYERS, decoder_layers=LAYERS,
                     encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=64,
                     decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                     decoder_start_token_id=2, forced_eos_token_id=None)
    model = BartForConditionalGeneration(cfg).eval()
    model.generation_config.forced_eos_token_id = None
    return model


MAKERS = [tiny_t5, tiny_bart]
ADDERS = {
    "PREFIX_TUNING": lambda m: add_prefix_tuning(m, 3),
    "PREFIX_PROJ": lambda m: add_prefix_tuning(m, 3, projection=True, encoder_hidden_size=24),
    "PROMPT_TUNING": lambda m: add_prompt_tuning(m, 4, init="vocab"),
    "P_TUNING": lambda m: add_p_tuning(m, 3, encoder="lstm", encoder_hidden_size=16),
}


def _randomize(model: PromptLearningModel) -> None:
    """Adapters with an output far from zero, so a missing or misplaced prompt cannot go unnoticed."""
    torch.manual_seed(1)
    for p in model.prompt_encoders[model.active_adapter].parameters():
        torch.nn.init.normal_(p, std=1.0)


def _batch(B=2, L=6, T=4):
    ids = torch.randint(3, VOCAB, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, -2:] = 0  # right padding in the encoder input of row 1
    labels = torch.randint(3, VOCAB, (B, T))
    return ids, mask, labels


# ------------------------------------------------------------------------------------------------ layout / forward
@pytest.mark.parametrize("make", MAKERS)
def test_prefix_cache_layout_is_pefts(make):
    from transformers import EncoderDecoderCache

    model = add_prefix_tuning(make(), 3)
    enc = model.prompt_encoders["default"]
    assert enc.embedding.weight.shape == (3, LAYERS * 2 * D_MODEL)  # PEFT: [n, num_layers * 2 * token_dim]
    flat = torch.randn(3, LAYERS * 2 * D_MODEL)
    cache = prefix_cache(model.base_model, flat, 2)
    assert isinstance(cache, EncoderDecoderCache)
    assert cache.get_seq_length() == 3 and cache.cross_attention_cache.get_seq_length() == 0
    assert not any(cache.is_updated.values())
    view = flat.view(3, 2 * LAYERS, HEADS, HEAD_DIM)  # (n, 2L entries, heads, head_dim)
    for j in range(LAYERS):  # PEFT's split of the doubled entries: decoder layer j <- entries 4j, 4j+1 (mod 2L)
        k, v = cache.self_attention_cache.layers[j].keys, cache.self_attention_cache.layers[j].values
        assert k.shape == (2, HEADS, 3, HEAD_DIM)
        assert torch.equal(k[1], view[:, (4 * j) % (2 * LAYERS)].transpose(0, 1))
        assert torch.equal(v[0], view[:, (4 * j + 1) % (2 * LAYERS)].transpose(0, 1))


@pytest.mark.parametrize("make,projection", [(tiny_t5, False), (tiny_bart, True)])
def test_prefix_forward_is_base_with_decoder_cache(make, projection):
    ids, mask, labels = _batch()
    dec_mask = torch.ones(2, 4, dtype=torch.long)
    model = add_prefix_tuning(make(), 3, projection=projection, encoder_hidden_size=20)
    _randomize(model)
    base = model.base_model
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dec_mask)
        cache = prefix_cache(base, model.prompt_encoders["default"].prompt(), 2)
        ref = base(input_ids=ids, attention_mask=mask, labels=labels, **with_cache(base, cache),
                   decoder_attention_mask=torch.cat([torch.ones(2, 3, dtype=torch.long), dec_mask], 1))
        plain = base(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == plain.logits.shape == (2, 4, VOCAB)  # no extra output positions
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)
    # the encoder gets no prefix (PEFT; transformers' encoders drop past_key_values), the decoder does
    torch.testing.assert_close(out.encoder_last_hidden_state, plain.encoder_last_hidden_state, rtol=0, atol=0)
    assert not torch.allclose(out.logits, plain.logits)


@pytest.mark.parametrize("kind", ["PROMPT_TUNING", "P_TUNING"])
@pytest.mark.parametrize("make", MAKERS)
def test_embedding_prompt_goes_before_encoder_input(make, kind):
    ids, mask, labels = _batch()
    model = ADDERS[kind](make())
    _randomize(model)
    enc = model.prompt_encoders["default"]
    n = enc.num_virtual_tokens
    assert enc.embedding.weight.shape[0] == 2 * n  # PEFT's total_virtual_tokens for seq2seq
    base = model.base_model
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        prompt = enc.prompt()
        assert prompt.shape == (2 * n, D_MODEL)
        embeds = torch.cat([prompt[:n].expand(2, -1, -1), base.get_input_embeddings()(ids)], 1)
        ref = base(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, n, dtype=torch.long), mask], 1),
                   labels=labels)
    assert out.logits.shape == (2, 4, VOCAB)
    assert out.encoder_last_hidden_state.shape == (2, n + 6, D_MODEL)
    assert torch.equal(out.logits, ref.logits) and torch.equal(out.loss, ref.loss)


@pytest.mark.parametrize("kind", ["PREFIX_TUNING", "PROMPT_TUNING"])
@pytest.mark.parametrize("make", MAKERS)
def test_encoder_padding_is_masked(make, kind):
    ids, mask, labels = _batch()
    model = ADDERS[kind](make())
    _randomize(model)
    ids2 = ids.clone()
    ids2[1, -2:] = (ids2[1, -2:] + 7) % VOCAB  # change only the padded tokens of row 1
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, labels=labels).logits
        b = model(input_ids=ids2, attention_mask=mask, labels=labels).logits
    torch.testing.assert_close(a, b)  # padded keys get exp(-inf) = 0 weight: same up to fp32 rounding


@pytest.mark.parametrize("kind", ["PREFIX_TUNING", "PROMPT_TUNING"])
@pytest.mark.parametrize("make", MAKERS)
def test_disabled_equals_base(make, kind):
    model = ADDERS[kind](make())
    _randomize(model)
    assert_seq2seq_disabled_equals_base(make(), model, *_batch())


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("kind", ["PREFIX_PROJ", "P_TUNING"])
@pytest.mark.parametrize("make", MAKERS)
def test_only_prompt_params_train_and_loss_drops(make, kind):
    ids, mask, labels = _batch()
    model = ADDERS[kind](make())  # base in eval mode: no dropout noise in the loss curve
    losses = train_prompt_steps(model, 6, lr=5e-2, input_ids=ids, attention_mask=mask, labels=labels)
    assert losses[-1] < losses[0]
    assert all(not p.requires_grad for p in model.base_model.parameters())


# ------------------------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("kind", ["PREFIX_TUNING", "PROMPT_TUNING"])
@pytest.mark.parametrize("make", MAKERS)
def test_generate_is_step_by_step_greedy(make, kind):
    ids, mask, _ = _batch()
    model = ADDERS[kind](make())
    _randomize(model)
    assert_seq2seq_generate_is_greedy(model, ids, mask, steps=5)


# ------------------------------------------------------------------------------------------------ PEFT interop
def _peft_config(kind):
    if kind == "PROMPT_TUNING":
        return peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=4)
    if kind == "P_TUNING":
        return peft.PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, encoder_hidden_size=16)
    return peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, prefix_projection=True,
                                   encoder_hidden_size=24)


def _logits(model, ids, mask, labels):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, labels=labels).logits


@pytest.mark.parametrize("kind", ["PREFIX_PROJ", "PROMPT_TUNING", "P_TUNING"])
@pytest.mark.parametrize("make", MAKERS)
def test_qpeft_saved_loads_in_peft(tmp_path, make, kind):
    ids, mask, labels = _batch()
    model = ADDERS[kind](make())
    _randomize(model)
    out = _logits(model, ids, mask, labels)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_2_SEQ_LM" and cfg["num_transformer_submodules"] == 2
    assert cfg["num_layers"] == LAYERS and cfg["token_dim"] == D_MODEL
    pm = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    assert torch.equal(_logits(pm, ids, mask, labels), out)
    dec_mask = torch.ones(2, 4, dtype=torch.long)
    dec_mask[1, -1] = 0  # a padded decoder position: PEFT prepends n ones to the decoder mask for prefixes
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dec_mask).logits
        theirs = pm(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dec_mask).logits
    assert torch.equal(ours, theirs)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert_generate_matches_peft(model.generate(**kw), pm, ids, 4, mask=mask)


@pytest.mark.parametrize("kind", ["PREFIX_PROJ", "PROMPT_TUNING", "P_TUNING"])
@pytest.mark.parametrize("make", MAKERS)
def test_peft_saved_loads_in_qpeft(tmp_path, make, kind):
    ids, mask, labels = _batch()
    torch.manual_seed(2)
    pm = peft.get_peft_model(make(), _peft_config(kind))
    for p in pm.prompt_encoder["default"].parameters():
        torch.nn.init.normal_(p, std=1.0)
    pm.eval()
    live = _logits(pm, ids, mask, labels)
    pm.save_pretrained(tmp_path)
    # PEFT in inference mode (what it loads from the file) uses the saved prompt_embeddings; a live PEFT model
    # runs the reparameterization MLP on a (B, n) batch instead of (1, n): same values up to fp32 rounding.
    pm = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    ref = _logits(pm, ids, mask, labels)
    torch.testing.assert_close(ref, live)
    model = load_prompt_adapter(make(), tmp_path)
    assert torch.equal(_logits(model, ids, mask, labels), ref)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert_generate_matches_peft(model.generate(**kw), pm, ids, 4, mask=mask)
    # and back: qpeft re-saves the same tensor and config fields
    save_adapter(model, tmp_path / "again")
    from safetensors.torch import load_file
    assert torch.equal(load_file(tmp_path / "again" / "adapter_model.safetensors")["prompt_embeddings"],
                       load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"])


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input(tmp_path):
    with pytest.raises(NotImplementedError, match="decoder layers=3"):
        add_prefix_tuning(tiny_t5(num_decoder_layers=3), 2)  # PEFT's prefix is sized from the encoder
    with pytest.raises(NotImplementedError, match="encoder-decoder model type 't5'"):
        add_p_tuning_v2(tiny_t5(), 2, layers=[0])
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int"):
        add_prefix_tuning(tiny_t5(), 0)

    ids, mask, labels = _batch()
    model = add_prefix_tuning(tiny_t5(), 2)
    with pytest.raises(ValueError, match="past_key_values"):
        model(input_ids=ids, labels=labels, past_key_values=prefix_cache(model.base_model,
                                                                         torch.randn(2, LAYERS * 2 * D_MODEL), 2))
    with pytest.raises(ValueError, match="input_ids is required"):
        model.generate(attention_mask=mask, max_new_tokens=2)
    prompt = add_prompt_tuning(tiny_t5(), 2)
    with pytest.raises(ValueError, match="encoder_outputs"):
        prompt(input_ids=ids, labels=labels, encoder_outputs=(torch.randn(2, 6, D_MODEL),))

    # a seq2seq file does not load into a decoder-only model, nor a decoder file into T5; models stay unchanged
    save_adapter(model, tmp_path / "s2s")
    llama = PromptLearningModel(tiny_llama())
    with pytest.raises(ValueError, match="num_transformer_submodules=2"):
        load_adapter(llama, tmp_path / "s2s")
    assert len(llama.prompt_encoders) == 0
    save_adapter(add_prefix_tuning(tiny_llama(), 2), tmp_path / "dec")
    t5 = tiny_t5()
    with pytest.raises(ValueError, match="num_transformer_submodules=1"):
        load_prompt_adapter(t5, tmp_path / "dec")
    assert all(p.requires_grad for p in t5.parameters())

    # a seq2seq prompt-tuning file must hold PEFT's 2n rows
    save_adapter(prompt, tmp_path / "pt")
    from safetensors.torch import load_file, save_file
    emb = load_file(tmp_path / "pt" / "adapter_model.safetensors")["prompt_embeddings"]
    assert emb.shape == (4, D_MODEL)
    save_file({"prompt_embeddings": emb[:2].contiguous()}, tmp_path / "pt" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"expected \(4, 32\)"):
        load_prompt_adapter(tiny_t5(), tmp_path / "pt")
