"""UniPELT: each submodule alone equals its plain method, gates scale what they should, training, I/O, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qpeft._hf_compat import output_cache
from qpeft.tuners._prompt_common import with_cache
from qpeft.tuners.bottleneck import AdapterMergeError, add_bottleneck_adapters, bottleneck_state_dict
from qpeft.tuners.unipelt import (
    GatedLoraLinear,
    GatedPrefix,
    add_unipelt,
    load_unipelt,
    merge_unipelt,
    save_unipelt,
    set_unipelt_submodules,
    unipelt_state_dict,
)
from utils import tiny_bert, tiny_llama


def _ids(seed=1, shape=(2, 9)):
    return torch.randint(3, 128, shape, generator=torch.Generator().manual_seed(seed))


def _out(model, ids, **kw):
    o = model(input_ids=ids, **kw)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _perturb(tensors, std=0.1):
    with torch.no_grad():
        for t in tensors.values():
            t.add_(torch.randn_like(t) * std)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_adapter_only_ungated_equals_bottleneck(family):
    mk = tiny_llama if family == "llama" else tiny_bert
    uni = add_unipelt(mk(), lora=False, prefix=False, adapter=True, gating=False)
    _perturb(unipelt_state_dict(uni))
    ref = add_bottleneck_adapters(mk(), "pfeiffer", non_linearity="relu")
    mine = unipelt_state_dict(uni)
    theirs = bottleneck_state_dict(ref)
    with torch.no_grad():
        for k, v in theirs.items():
            v.copy_(mine[k.replace("bottleneck_adapter", "unipelt_adapter")])
        ids = _ids()
        torch.testing.assert_close(_out(uni, ids), _out(ref, ids))


def test_lora_only_ungated_equals_peft_lora():
    from peft import LoraConfig, get_peft_model

    uni = add_unipelt(tiny_llama(), lora=True, prefix=False, adapter=False, gating=False, lora_r=4, lora_alpha=8)
    _perturb(unipelt_state_dict(uni))
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    mine = unipelt_state_dict(uni)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                key = n.replace("base_model.model.", "").replace(".default.weight", "")
                p.copy_(mine[key])
        ids = _ids()
        ours = _out(uni, ids)
        torch.testing.assert_close(ours, peft_model(ids).logits, atol=1e-5, rtol=1e-5)
        assert (ours - _out(tiny_llama(), ids)).abs().max() > 1e-3


def test_prefix_only_ungated_equals_hf_cache_prefix():
    """Independent path: HF's own DynamicCache pre-filled with the prefix, positions 0..S-1 for real tokens."""
    from transformers import DynamicCache

    uni = add_unipelt(tiny_llama(), lora=False, prefix=True, adapter=False, gating=False, prefix_length=3)
    _perturb(unipelt_state_dict(uni), std=0.5)
    base = tiny_llama()
    ids = _ids()
    B, S = ids.shape
    cache = DynamicCache()
    prefixes = [m for m in uni.modules() if isinstance(m, GatedPrefix)]
    with torch.no_grad():
        for i, pre in enumerate(prefixes):
            cache.update(pre.prefix_key.expand(B, -1, -1, -1).clone(),
                         pre.prefix_value.expand(B, -1, -1, -1).clone(), i)
        ref = base(input_ids=ids, **with_cache(base, cache), attention_mask=torch.ones(B, 3 + S, dtype=torch.long),
                   position_ids=torch.arange(S).expand(B, -1)).logits
        ours = _out(uni, ids)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert (ours - _out(base, ids)).abs().max() > 1e-3


def test_prefix_with_generation_cache():
    """Incremental decoding (HF cache under the prefix) gives the same last-token logits as one full pass."""
    model = add_unipelt(tiny_llama(), lora=True, prefix=True, adapter=True, gating=True, prefix_length=3)
    _perturb(unipelt_state_dict(model), std=0.3)
    ids = _ids()
    # the gates average over the tokens each call sees; make them input-independent for this comparison
    _with_const_gates(model, 0.3)
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        cache = output_cache(model(input_ids=ids[:, :-1], use_cache=True))
        assert cache.get_seq_length() == ids.shape[1] - 1  # the prefix is not stored in the cache
        step = model(input_ids=ids[:, -1:], **with_cache(model, cache), use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def _with_const_gates(model, value_logit):
    """Set every gate to weight 0, bias b: g = sigmoid(b) for every input."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".gate." in n:
                p.zero_()
                if n.endswith("bias"):
                    p.fill_(value_logit)


@pytest.mark.parametrize("part", ["lora", "prefix", "adapter"])
def test_gate_scales_its_submodule(part):
    """With a constant gate g, gated output == ungated output with the submodule's contribution scaled by g."""
    flags = {"lora": part == "lora", "prefix": part == "prefix", "adapter": part == "adapter"}
    gated = add_unipelt(tiny_llama(), gating=True, **flags)
    _perturb(unipelt_state_dict(gated), std=0.3)
    _with_const_gates(gated, 0.4)
    g = torch.sigmoid(torch.tensor(0.4)).item()
    plain = add_unipelt(tiny_llama(), gating=False, **flags)
    src = unipelt_state_dict(gated)
    with torch.no_grad():
        for k, v in unipelt_state_dict(plain).items():
            v.copy_(src[k])
            if part == "lora" and k.endswith("lora_B"):
                v.mul_(g / (16 / 8))  # gate replaces alpha / r
            if part == "prefix":
                v.mul_(g)             # gate multiplies prefix K and V
        if part == "adapter":
            for m in plain.modules():
                if hasattr(m, "scaling") and m.__class__.__name__ == "BottleneckAdapter":
                    m.scaling = g     # gate multiplies the up-projection output
        ids = _ids()
        torch.testing.assert_close(_out(gated, ids), _out(plain, ids), atol=1e-5, rtol=1e-5)


def test_gate_is_per_example_sequence_mean():
    layer = GatedLoraLinear(nn.Linear(16, 8), r=2, lora_alpha=4, lora_dropout=0.0, gated=True)
    with torch.no_grad():
        layer.gate.weight.normal_()
    x = torch.randn(3, 5, 16)
    from qpeft.tuners.unipelt import _gate_value

    g = _gate_value(layer.gate, x)
    assert g.shape == (3, 1, 1)
    torch.testing.assert_close(g.view(-1), torch.sigmoid(x @ layer.gate.weight.T + layer.gate.bias).mean(dim=(1, 2)))
    assert g.view(-1).std() > 0  # differs between examples


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_switches_train_and_grads(family):
    model = tiny_llama() if family == "llama" else tiny_bert(num_labels=3)
    head = None if family == "llama" else ["classifier"]
    ids = _ids()
    with torch.no_grad():
        base = _out(model, ids)
    add_unipelt(model, modules_to_save=head)
    set_unipelt_submodules(model, lora=False, prefix=False, adapter=False)
    with torch.no_grad():
        torch.testing.assert_close(_out(model, ids), base, atol=0, rtol=0)  # all off: the base model
    set_unipelt_submodules(model, lora=True, prefix=True, adapter=True)
    model.train()
    labels = ids if family == "llama" else torch.tensor([0, 2])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for i in range(10):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        if i == 0:
            trained = {n for n, p in model.named_parameters() if p.grad is not None}
            expect = set(unipelt_state_dict(model)) | {n for n, _ in model.named_parameters()
                                                       if n.startswith("classifier")}
            assert trained == expect
            assert any(".gate." in n for n in trained) and any("prefix_key" in n for n in trained)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses  # train mode: dropout makes single steps noisy


def test_bert_prefix_masks_eager_sdpa_and_padding():
    ids = _ids(shape=(2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    outs = {}
    for impl in ("eager", "sdpa"):
        model = tiny_bert()
        model.config._attn_implementation = impl
        add_unipelt(model, lora=False, prefix=True, adapter=False, gating=False, prefix_length=4)
        torch.manual_seed(5)
        _perturb(unipelt_state_dict(model), std=0.5)
        with torch.no_grad():
            outs[impl] = model(input_ids=ids, attention_mask=mask).last_hidden_state
            # padding must not leak: row 1 padded == row 1 truncated
            short = model(input_ids=ids[1:, :5]).last_hidden_state
        torch.testing.assert_close(outs[impl][1:, :5], short, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs["eager"], outs["sdpa"], atol=1e-5, rtol=1e-5)


def test_save_load_roundtrip(tmp_path):
    src = add_unipelt(tiny_bert(num_labels=2), modules_to_save=["classifier"])
    _perturb(unipelt_state_dict(src))
    save_unipelt(src, tmp_path / "u")
    dst = load_unipelt(tiny_bert(num_labels=2), tmp_path / "u")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(dst(ids).logits, src(ids).logits)
    # a checkpoint from a model of another width fails and leaves the target as it was
    other = add_unipelt(tiny_bert(num_labels=2, hidden_size=32), modules_to_save=["classifier"])
    save_unipelt(other, tmp_path / "o")
    fresh = tiny_bert(num_labels=2)
    with torch.no_grad():
        before = fresh(ids).logits
    names = [n for n, _ in fresh.named_parameters()]
    with pytest.raises(ValueError):
        load_unipelt(fresh, tmp_path / "o")
    assert [n for n, _ in fresh.named_parameters()] == names
    assert all(p.requires_grad for p in fresh.parameters())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, before, atol=0, rtol=0)


def test_bad_input():
    with pytest.raises(ValueError, match="enable at least one"):
        add_unipelt(tiny_llama(), lora=False, prefix=False, adapter=False)
    with pytest.raises(ValueError, match="reduction_factor=128 leaves no hidden units"):
        add_unipelt(tiny_llama(), reduction_factor=128)
    with pytest.raises(ValueError, match="prefix_length"):
        add_unipelt(tiny_llama(), prefix_length=0)
    with pytest.raises(TypeError, match="no layer type it can wrap"):
        add_unipelt(nn.Sequential(nn.Linear(4, 4)))
    model = tiny_llama()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation"):
        add_unipelt(model)
    with pytest.raises(AdapterMergeError, match="cannot be merged"):
        merge_unipelt(add_unipelt(tiny_llama()))
    m = add_unipelt(tiny_llama(), prefix=False)
    with pytest.raises(ValueError, match="prefix=True"):
        set_unipelt_submodules(m, prefix=True)


def test_on_4bit_model():
    import qpeft

    model = tiny_llama()
    qpeft.quantize_model(model, compute_dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        base = _out(model, ids)
    add_unipelt(model, lora_r=4)
    assert sum(isinstance(m, GatedLoraLinear) for m in model.modules()) == 4
    set_unipelt_submodules(model, lora=False, prefix=False, adapter=False)
    with torch.no_grad():
        torch.testing.assert_close(_out(model, ids), base, atol=0, rtol=0)
    set_unipelt_submodules(model, lora=True, prefix=True, adapter=True)
    model(input_ids=ids, labels=ids).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(unipelt_state_dict(model))
