"""AdaLoRA: identity at init, training, budget schedule and pruning, orthogonality term, PEFT interop."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import qpeft
from qpeft.tuners.adalora import (
    AdaLoraLinear,
    adalora_layers,
    adalora_rank_pattern,
    add_adalora,
    budget_schedule,
    merge_adalora,
    orthogonal_regularization,
    update_and_allocate,
)
from utils import tiny_bert, tiny_llama

TARGETS = ["q_proj", "v_proj"]


def _ids(seed=1):
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(seed))


def _train(model, steps, lr=0.5, peft_model=None):
    """SGD on a fixed batch with update_and_allocate each step; returns (losses, budgets)."""
    ids = _ids()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, budgets = [], []
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss + orthogonal_regularization(model)
        loss.backward()
        opt.step()
        budgets.append(update_and_allocate(model, step))
        opt.zero_grad()
        losses.append(loss.item())
    return losses, budgets


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_identity_at_init_and_layers(family):
    model = tiny_llama() if family == "llama" else tiny_bert()
    ids = _ids()
    out = (lambda m: m(ids).logits) if family == "llama" else (lambda m: m(ids).last_hidden_state)
    with torch.no_grad():
        base = out(model)
        add_adalora(model, TARGETS if family == "llama" else ["query", "value"], init_r=6, target_r=3, total_step=10)
        torch.testing.assert_close(out(model), base, atol=0, rtol=0)  # E = 0: exactly the base model
    layers = adalora_layers(model)
    assert len(layers) == 4 and all(isinstance(m, AdaLoraLinear) and m.r == 6 for m in layers.values())
    lyr = next(iter(layers.values()))
    assert lyr.lora_A.dtype == torch.float32 and lyr.lora_E.abs().sum() == 0
    assert 0.015 < lyr.lora_A.std().item() < 0.025  # N(0, 0.02) like PEFT


def test_only_adapter_params_train_and_loss_falls():
    model = add_adalora(tiny_llama(), TARGETS, init_r=6, target_r=3, total_step=30, tinit=5, tfinal=5,
                        lora_alpha=32)
    ids = _ids()
    loss = model(input_ids=ids, labels=ids).loss + orthogonal_regularization(model)
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n
    model.zero_grad()
    losses, _ = _train(model, 12, lr=2.0)
    assert losses[-1] < losses[0] - 0.05 and losses[-1] == min(losses), losses


def test_budget_schedule_formula():
    init, target, tinit, tfinal, T = 48, 16, 3, 4, 20
    for step in range(T + 3):
        b, mask = budget_schedule(step, init, target, tinit, tfinal, T, deltaT=2)
        if step <= tinit:
            assert (b, mask) == (init, False)
        elif step > T - tfinal:
            assert (b, mask) == (target, True)
        else:
            t = (step - tinit) / (T - tfinal - tinit)
            assert b == int((init - target) * (1 - t) ** 3 + target) and mask == (step % 2 == 0)
    # strictly shrinking during the budgeting phase, and monotone overall
    seq = [budget_schedule(s, init, target, tinit, tfinal, T, 1)[0] for s in range(T + 1)]
    assert all(a >= b for a, b in zip(seq, seq[1:])) and seq[tinit + 1] < init and seq[-1] == target


def test_rank_pattern_shrinks_to_target():
    init_r, target_r, T, tinit, tfinal = 6, 2, 10, 2, 2
    model = add_adalora(tiny_llama(), TARGETS, init_r=init_r, target_r=target_r, total_step=T, tinit=tinit,
                        tfinal=tfinal)
    n_layers = len(adalora_layers(model))
    kept = []
    ids = _ids()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(T + 2):
        (model(input_ids=ids, labels=ids).loss + orthogonal_regularization(model)).backward()
        opt.step()
        budget = update_and_allocate(model, step)
        opt.zero_grad()
        expect = budget_schedule(step, init_r * n_layers, target_r * n_layers, tinit, tfinal, T, 1)[0]
        assert budget == expect
        pattern = adalora_rank_pattern(model)
        if step <= tinit:
            assert pattern is None
        else:
            kept.append(sum(sum(v) for v in pattern.values()))
            assert kept[-1] == budget  # exactly `budget` triplets survive (continuous scores: no ties)
            nonzero = sum(int((m.lora_E != 0).sum()) for m in adalora_layers(model).values())
            assert nonzero == kept[-1]  # pruned singular values are zero in the model
    assert all(a >= b for a, b in zip(kept, kept[1:]))
    assert kept[-1] == target_r * n_layers


def test_orthogonality_term():
    model = add_adalora(tiny_llama(), TARGETS, init_r=4, target_r=2, total_step=10, orth_reg_weight=0.3)
    reg = orthogonal_regularization(model)
    assert reg.item() > 0.1
    with torch.no_grad():
        for m in adalora_layers(model).values():
            q, _ = torch.linalg.qr(torch.randn(m.in_features, m.r))
            m.lora_A.copy_(q.T)  # orthonormal rows: A A^T = I
            q, _ = torch.linalg.qr(torch.randn(m.out_features, m.r))
            m.lora_B.copy_(q)    # orthonormal columns: B^T B = I
    assert orthogonal_regularization(model).item() < 1e-5
    # and it matches PEFT's expression on random matrices
    with torch.no_grad():
        for m in adalora_layers(model).values():
            m.lora_A.normal_()
            m.lora_B.normal_()
    terms = []
    for m in adalora_layers(model).values():
        terms.append(torch.norm(m.lora_A @ m.lora_A.T - torch.eye(4), p="fro"))
        terms.append(torch.norm(m.lora_B.T @ m.lora_B - torch.eye(4), p="fro"))
    torch.testing.assert_close(orthogonal_regularization(model), 0.3 * torch.stack(terms).mean())


def test_merge_matches_unmerged():
    model = add_adalora(tiny_llama(), TARGETS, init_r=4, target_r=2, total_step=10, lora_alpha=16)
    with torch.no_grad():
        for m in adalora_layers(model).values():
            m.lora_E.normal_()
        ids = _ids()
        before = model(ids).logits
        merge_adalora(model)
        assert not adalora_layers(model)
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match="target_r"):
        add_adalora(tiny_llama(), TARGETS, init_r=4, target_r=8, total_step=10)
    with pytest.raises(ValueError, match="total_step"):
        add_adalora(tiny_llama(), TARGETS)
    with pytest.raises(ValueError, match="tinit"):
        add_adalora(tiny_llama(), TARGETS, total_step=10, tinit=6, tfinal=4)
    with pytest.raises(TypeError, match="target_modules.*input_layernorm.*LlamaRMSNorm"):
        add_adalora(tiny_llama(), ["input_layernorm"], total_step=10)
    with pytest.raises(ValueError, match="target_modules"):
        add_adalora(tiny_llama(), ["nonexistent"], total_step=10)
    model = add_adalora(tiny_llama(), TARGETS, total_step=10)
    with pytest.raises(RuntimeError, match="after loss.backward"):
        update_and_allocate(model, 0)


# ------------------------------------------------------------------------------- PEFT interop


def _randomize(model):
    with torch.no_grad():
        for m in adalora_layers(model).values():
            m.lora_E.normal_(std=0.5)


def test_qpeft_saved_loads_in_peft(tmp_path):
    from peft import PeftModel

    model = add_adalora(tiny_llama(), TARGETS, init_r=6, target_r=2, total_step=6, tinit=1, tfinal=1,
                        lora_alpha=16)
    _randomize(model)
    _train(model, 8)
    pattern = adalora_rank_pattern(model)
    qpeft.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["rank_pattern"] == pattern and cfg["init_r"] == 6
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    r0 = sum(pattern["model.layers.0.self_attn.q_proj.lora_E"])
    assert sd[f"{key}.lora_A"].shape == (r0, 64) and sd[f"{key}.lora_B"].shape == (64, r0)  # pruned as PEFT
    ids = _ids(5)
    with torch.no_grad():
        ours = model(ids).logits
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
        assert not [x for x in w if "missing adapter keys" in str(x.message).lower()]
        theirs = peft_model(ids).logits
        base = tiny_llama()(ids).logits
    assert (ours - base).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_peft_saved_loads_in_qpeft(tmp_path):
    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = AdaLoraConfig(init_r=6, target_r=2, total_step=6, tinit=1, tfinal=1, target_modules=TARGETS,
                        lora_alpha=16)
    peft_model = get_peft_model(tiny_llama(), cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_E" in n:
                p.normal_(std=0.5)
    ids = _ids()
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    for step in range(8):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        peft_model.base_model.update_and_allocate(step)
        opt.zero_grad()
    peft_model.save_pretrained(tmp_path)
    peft_model.eval()
    model = tiny_llama()
    qpeft.load_adapter(model, tmp_path)
    saved_pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    for name, layer in adalora_layers(model).items():
        assert layer.r == sum(saved_pattern[f"{name}.lora_E"]) and layer.ranknum == 6
    ids = _ids(5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, peft_model(ids).logits, atol=1e-5, rtol=1e-5)
    # and our re-save of the loaded (resized) adapter is PEFT-identical
    qpeft.save_adapter(model, tmp_path / "again")
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "adapter_model.safetensors")), load_file(str(tmp_path / "again" /
                                                                                  "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_failed_load_leaves_model_unchanged(tmp_path):
    small = add_adalora(tiny_llama(hidden_size=32, heads=2, kv_heads=1), TARGETS, init_r=4, target_r=2,
                        total_step=10)
    _randomize(small)
    qpeft.save_adapter(small, tmp_path)
    model = tiny_llama()
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    names_before = [n for n, _ in model.named_modules()]
    with pytest.raises(ValueError, match="shape"):
        qpeft.load_adapter(model, tmp_path)
    assert [n for n, _ in model.named_modules()] == names_before and not adalora_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)


def test_nf4_base_uses_lora_path():
    """AdaLoRA on a QLinearNF4 base (QLoRA-style): base output + the SVD-form update, gradients on A, E, B."""
    from qpeft.modules.qlinear_nf4 import QLinearNF4

    torch.manual_seed(0)
    q = QLinearNF4.from_linear(torch.nn.Linear(48, 40), compute_dtype=torch.float32)
    layer = AdaLoraLinear(q, r=5, lora_alpha=16)
    with torch.no_grad():
        layer.lora_E.normal_()
    x = torch.randn(3, 7, 48)
    y = layer(x)
    with torch.no_grad():
        expect = q(x) + x @ (layer.lora_A * layer.lora_E).T @ layer.lora_B.T * (16 / (5 + 1e-5))
    torch.testing.assert_close(y, expect, atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (layer.lora_A, layer.lora_E, layer.lora_B))
    model = torch.nn.Sequential()
    model.add_module("proj", layer)
    model._qpeft_adalora = None
    with pytest.raises(TypeError, match="QLinearNF4"):
        merge_adalora(model)
