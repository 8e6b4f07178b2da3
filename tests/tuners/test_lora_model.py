"""Model-level LoRA: add_lora matching and errors, freezing, training steps, gradient checkpointing,
prepare_for_qlora, merging and adapter switching on small random Hugging Face models."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn as nn

import qpeft
from qpeft._hf_compat import enable_checkpointing
from qpeft.tuners.lora.model import (
    add_lora,
    delete_lora_adapter,
    disable_lora,
    lora_layers,
    merge_and_unload,
    merge_lora,
    prepare_for_qlora,
    set_lora_adapter,
    unmerge_lora,
)
from qpeft.modules.lora_linear import LoraLinear, LoraRankWarning
from qpeft.modules.qlinear_nf4 import QLinearNF4
from utils import tiny_bert, tiny_llama

LLAMA_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _ids(seed=0, shape=(2, 11)):
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


def test_target_list_suffix_match_and_freeze():
    model = add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4)
    names = set(lora_layers(model))
    assert names == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    rep = qpeft.trainable_parameters(model)
    assert rep.trainable == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))  # q: 64->64, v: 64->32 (GQA)
    assert rep.total == sum(p.numel() for p in model.parameters())


def test_all_linear_skips_output_layer_and_regex():
    model = add_lora(tiny_llama(), "all-linear", r=2)
    leaves = {n.split(".")[-1] for n in lora_layers(model)}
    assert leaves == LLAMA_LINEARS and isinstance(model.lm_head, nn.Linear)
    model = add_lora(tiny_llama(), r"model\.layers\.1\.mlp\.(up|down)_proj", r=2)
    assert set(lora_layers(model)) == {"model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"}
    # an exact full path in a list
    model = add_lora(tiny_llama(), ["model.layers.0.self_attn.o_proj"], r=2)
    assert set(lora_layers(model)) == {"model.layers.0.self_attn.o_proj"}


def test_identity_at_init_and_bert():
    model = tiny_llama()
    ids = _ids()
    with torch.no_grad():
        y0 = model(ids).logits
        add_lora(model, "all-linear", r=4)
        torch.testing.assert_close(model(ids).logits, y0, rtol=0, atol=0)
    bert = add_lora(tiny_bert(), ["query", "value"], r=4, lora_alpha=16)
    assert len(lora_layers(bert)) == 4
    out = bert(input_ids=_ids()).last_hidden_state
    assert out.shape == (2, 11, 64)


@pytest.mark.parametrize("targets, match", [
    (["q_proj", "qq_proj"], r"\['qq_proj'\] matched no .*available Linear modules include \['model"),
    (r"model\.nothing.*", "regex .* matched no module"),
    ([], "empty"),
    (["model.layers.0.self_attn"], "matched no"),
    (r"model\.layers\.0\.self_attn", "supports only nn.Linear"),
])
def test_bad_targets_raise_and_leave_model_unchanged(targets, match):
    model = tiny_llama()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=match):
        add_lora(model, targets)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("r", [0, -1, 2.0, None])
def test_bad_rank(r):
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"add_lora: r must be an int >= 1, got " + re.escape(repr(r))):
        add_lora(model, "all-linear", r=r)
    assert not lora_layers(model)


def test_rank_above_layer_width_warns_once_and_trains():
    model = tiny_llama()  # k_proj / v_proj have 32 outputs: r = 33 is not low-rank for them (PEFT accepts it)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        add_lora(model, "all-linear", r=33, lora_alpha=16)
    rank_warnings = [w for w in caught if issubclass(w.category, LoraRankWarning)]
    assert len(rank_warnings) == 1, [str(w.message) for w in rank_warnings]
    message = str(rank_warnings[0].message)
    assert "r=33" in message and "self_attn.k_proj (out=32, in=64)" in message
    assert rank_warnings[0].filename == __file__  # points at the caller's add_lora line
    layers = lora_layers(model)
    assert layers["model.layers.0.self_attn.v_proj"].lora_A["default"].weight.shape == (33, 64)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(_ids(), labels=_ids()).loss
    loss.backward()
    opt.step()
    assert all(m.lora_B["default"].weight.abs().sum() > 0 for m in layers.values())


def test_prepare_for_qlora_default_rank_on_a_tiny_model():
    model = tiny_llama()  # hidden 64: QLoRA's default r=64 exceeds the 32-wide k/v projections
    with pytest.warns(LoraRankWarning):
        prepare_for_qlora(model)
    layers = lora_layers(model)
    assert layers and all(m.r == {"default": 64} and m.is_nf4 for m in layers.values())
    assert torch.isfinite(model(_ids()).logits).all()


def test_training_steps_update_only_adapters():
    model = add_lora(tiny_llama(), "all-linear", r=4, lora_alpha=8, lora_dropout=0.1, init="gaussian")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(shape=(2, 16))
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (".lora_" in n), n
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (".lora_" in n), n


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_matches(use_reentrant):
    def grads(checkpointing):
        model = add_lora(tiny_llama(), "all-linear", r=4, init="random", lora_dropout=0.2)
        model.train()
        if checkpointing:
            enable_checkpointing(model, use_reentrant=use_reentrant)
            if use_reentrant:
                model.enable_input_require_grads()  # PEFT does this for a frozen embedding
        ids = _ids(shape=(2, 12))
        torch.manual_seed(7)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) == 28
    for n in plain:  # same dropout masks on recomputation (the seed comes from the saved RNG state)
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_several_adapters_switch_disable_delete():
    model = tiny_llama()
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
    add_lora(model, ["q_proj", "v_proj"], r=4, init="random", adapter_name="a")
    add_lora(model, ["q_proj", "v_proj", "down_proj"], r=2, init="random", adapter_name="b")
    with torch.no_grad():
        ya = model(ids).logits  # "a" stays active
        set_lora_adapter(model, "b")
        yb = model(ids).logits
        set_lora_adapter(model, ["a", "b"])
        yab = model(ids).logits
        with disable_lora(model):
            torch.testing.assert_close(model(ids).logits, base, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model(ids).logits, yab, rtol=0, atol=0)
    assert not torch.allclose(ya, yb) and not torch.allclose(ya, yab)
    assert model.model.layers[0].mlp.down_proj.active_adapters == ["b"]
    with pytest.raises(ValueError, match="unknown adapter"):
        set_lora_adapter(model, "c")
    delete_lora_adapter(model, "a")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, yb, rtol=1e-5, atol=1e-5)


def test_merge_unmerge_and_merge_and_unload_model():
    model = add_lora(tiny_llama(), "all-linear", r=4, init="random")
    ids = _ids()
    with torch.no_grad():
        y = model(ids).logits
        errs = merge_lora(model)
        assert len(errs) == 14 and all(e["default"] == 0.0 for e in errs.values())
        torch.testing.assert_close(model(ids).logits, y, rtol=1e-4, atol=1e-4)
        unmerge_lora(model)
        assert torch.equal(model(ids).logits, y)  # unmerge restores the base bit for bit
        merged = merge_and_unload(model)
        assert not lora_layers(merged) and not any(isinstance(m, LoraLinear) for m in merged.modules())
        torch.testing.assert_close(merged(ids).logits, y, rtol=1e-4, atol=1e-4)


def test_disable_lora_on_a_merged_qlora_model_restores_it_bit_for_bit():
    """Issue 21, model level: every use of disable_lora re-quantized each merged NF4 layer twice, so the merged
    model drifted further from its adapters with each use. Now the kept pre-merge weights are swapped in and
    out: the base logits inside and the merged logits after, bit for bit, use after use."""
    model = prepare_for_qlora(tiny_llama(), r=4, lora_alpha=8, init="random", compute_dtype=torch.float32)
    for layer in lora_layers(model).values():
        with torch.no_grad():
            layer.lora_B["default"].weight.mul_(0.1)
    ids = _ids()
    with torch.no_grad():
        with disable_lora(model):
            base = model(ids).logits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "re-quantizes"
            merge_lora(model)
        merged = model(ids).logits
        assert not torch.equal(merged, base)
        for _ in range(5):  # 50 uses per layer: tests/test_lora_linear.py
            with disable_lora(model):
                assert torch.equal(model(ids).logits, base)
            assert torch.equal(model(ids).logits, merged)
        unmerge_lora(model)
        with disable_lora(model):
            assert torch.equal(model(ids).logits, base)


def test_prepare_for_qlora():
    model = tiny_llama()
    ids = _ids()
    with torch.no_grad():
        y_fp32 = model(ids).logits
    model = prepare_for_qlora(model, r=8, lora_alpha=16)
    layers = lora_layers(model)
    assert len(layers) == 14
    for m in layers.values():
        q = m.base_layer
        assert isinstance(q, QLinearNF4) and q.quant_type == "nf4" and q.double_quant and q.blocksize == 64
        assert q.compute_dtype == torch.bfloat16 and m.scaling["default"] == 2.0
    assert isinstance(model.lm_head, nn.Linear)
    with torch.no_grad():
        y = model(ids).logits
    # identity adapters on an NF4 + bf16 base: close to the fp32 model, not equal
    rel = (y - y_fp32).norm() / y_fp32.norm()
    assert 0 < rel < 0.2
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all((p.grad is not None) == (".lora_" in n) for n, p in model.named_parameters())
    assert model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.grad.abs().sum() > 0
    rep = qpeft.trainable_parameters(model)
    assert 0 < rep.trainable < rep.total
