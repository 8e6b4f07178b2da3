"""BitFit: only biases train, selected biases, added zero biases, merge + reload, save/load, bad input."""
from __future__ import annotations

import pytest
import torch

from qpeft.tuners.bitfit import apply_bitfit, bitfit_state_dict, load_bitfit, merge_bitfit, save_bitfit
from utils import tiny_bert, tiny_llama


def _ids():
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def _train(model, steps=10, lr=3e-2, labels=None):
    ids = _ids()
    labels = ids if labels is None else labels
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for i in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        if i == 0:
            grads = {n for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        losses.append(loss.item())
    return losses, grads


def test_bert_all_biases_only_and_loss_falls():
    model = tiny_bert(num_labels=3)
    apply_bitfit(model, modules_to_save=["classifier"])
    model.train()
    losses, grads = _train(model, labels=torch.tensor([0, 2]))
    assert grads == {n for n, _ in model.named_parameters() if n.endswith(".bias") or n.startswith("classifier")}
    assert any("LayerNorm.bias" in n for n in grads) and any("attention.self.query.bias" in n for n in grads)
    assert losses[-1] < losses[0] - 0.2 and losses[-1] == min(losses), losses


def test_selected_biases_only():
    model = tiny_bert()
    apply_bitfit(model, bias_names=["query", "intermediate.dense"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"encoder.layer.{i}.{k}.bias" for i in range(2)
                         for k in ("attention.self.query", "intermediate.dense")}
    model2 = tiny_bert()
    apply_bitfit(model2, bias_names=r"encoder\.layer\.0\.output\.dense")  # a regex on whole names
    assert {n for n, p in model2.named_parameters() if p.requires_grad} == {"encoder.layer.0.output.dense.bias"}


def test_llama_added_biases_identity_train_merge_reload(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
    apply_bitfit(model, add_missing_biases=True)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base, atol=0, rtol=0)  # zero biases: unchanged
    added = model._qpeft_bitfit["added"]
    assert len(added) == 2 * 7 and not any("lm_head" in n for n in added)  # 7 projections per layer
    model.train()
    losses, grads = _train(model, steps=12)
    assert grads == {f"{n}.bias" for n in added}
    assert losses[-1] < losses[0] - 0.2 and losses[-1] == min(losses), losses
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    save_bitfit(model, tmp_path / "merged", merge=True)
    assert model.config.attention_bias and model.config.mlp_bias
    assert not any(p.requires_grad for p in model.parameters())
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, trained, atol=1e-5, rtol=1e-5)


def test_save_load_biases_and_failed_load(tmp_path):
    src = apply_bitfit(tiny_llama(), bias_names=["v_proj", "down_proj"], add_missing_biases=True)
    with torch.no_grad():
        for p in bitfit_state_dict(src).values():
            p.normal_(std=0.1)
    save_bitfit(src, tmp_path / "a")
    dst = load_bitfit(tiny_llama(), tmp_path / "a")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(dst(ids).logits, src(ids).logits)
    assert {n for n, p in dst.named_parameters() if p.requires_grad} == set(bitfit_state_dict(src))
    other = apply_bitfit(tiny_llama(hidden_size=32, heads=2, kv_heads=1), bias_names=["v_proj"],
                         add_missing_biases=True)
    save_bitfit(other, tmp_path / "b")
    fresh = tiny_llama()
    with pytest.raises(ValueError, match="shape"):
        load_bitfit(fresh, tmp_path / "b")
    assert all(getattr(m, "bias", None) is None for n, m in fresh.named_modules() if n.endswith("v_proj"))
    assert all(p.requires_grad for p in fresh.parameters())


def test_merge_requires_bitfit_and_bad_input():
    with pytest.raises(ValueError, match="add_missing_biases=True"):
        apply_bitfit(tiny_llama())  # Llama has no biases at all
    with pytest.raises(ValueError, match="bias_names"):
        apply_bitfit(tiny_bert(), bias_names=["nonexistent"])
    with pytest.raises(TypeError, match="bias_names.*input_layernorm.*LlamaRMSNorm"):
        apply_bitfit(tiny_llama(), bias_names=["input_layernorm"], add_missing_biases=True)
    with pytest.raises(ValueError, match="apply_bitfit first"):
        merge_bitfit(tiny_bert())
