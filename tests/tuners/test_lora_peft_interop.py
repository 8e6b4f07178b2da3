"""Adapter files in PEFT's format, both ways, against the installed `peft` on a small random Llama (CPU)."""
from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import qpeft
from qpeft.tuners.lora.model import add_lora, lora_layers
from qpeft.tuners.lora.options import LORA_VARIANTS, SUPPORTED_VARIANTS
from utils import tiny_llama

peft = pytest.importorskip("peft")


def _ids():
    return torch.randint(3, 128, (2, 13), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        out = model(_ids())
    return out.logits


@pytest.mark.parametrize("kw", [
    dict(target_modules="all-linear", r=4, lora_alpha=8),
    dict(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=32, use_rslora=True),
    dict(target_modules="all-linear", r=40, lora_alpha=16),  # r > 32 outputs of k/v_proj: PEFT accepts it too
])
@pytest.mark.filterwarnings("ignore::qpeft.LoraRankWarning")
def test_qpeft_saved_loads_in_peft(tmp_path, kw):
    model = add_lora(tiny_llama(), init="random", **kw)
    with torch.no_grad():  # random B as well: the adapter is not a no-op
        for m in lora_layers(model).values():
            m.lora_B["default"].weight.normal_(0, 0.05)
    y = _logits(model)
    assert not torch.allclose(y, _logits(tiny_llama()))
    qpeft.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == kw["r"] and cfg["lora_alpha"] == kw["lora_alpha"]
    assert cfg["bias"] == "none" and cfg["fan_in_fan_out"] is False and cfg["task_type"] == "CAUSAL_LM"
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert key in tensors and tensors[key].shape == (kw["r"], 64)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*missing adapter keys.*")
        pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(_logits(pm), y, rtol=1e-5, atol=1e-5)
    # PEFT's own state dict holds exactly our tensors
    ours = {k: v for k, v in tensors.items()}
    theirs = peft.get_peft_model_state_dict(pm)
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(theirs[k], ours[k], rtol=0, atol=0)


def _peft_saved(tmp_path, adapter_name="default", **cfg):
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(init_lora_weights=False, **cfg),
                             adapter_name=adapter_name)
    pm.save_pretrained(str(tmp_path))
    return pm


@pytest.mark.parametrize("cfg", [
    dict(target_modules="all-linear", r=4, lora_alpha=16),
    dict(target_modules=["k_proj", "down_proj"], r=2, lora_alpha=4, use_rslora=True, lora_dropout=0.1),
    dict(target_modules=["q_proj", "o_proj"], r=4, lora_alpha=8, rank_pattern={"o_proj": 2},
         alpha_pattern={"o_proj": 6}),
])
def test_peft_saved_loads_in_qpeft(tmp_path, cfg):
    pm = _peft_saved(tmp_path, **cfg)
    pm.eval()
    y = _logits(pm)
    model = qpeft.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(model), y, rtol=1e-5, atol=1e-5)
    assert len(lora_layers(model)) == sum(1 for n, _ in pm.named_modules() if n.endswith("lora_A"))
    # and back: qpeft re-saves the same tensors under the same keys
    out = tmp_path / "resaved"
    qpeft.save_adapter(model, out)
    a = load_file(str(tmp_path / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pm2 = peft.PeftModel.from_pretrained(tiny_llama(), str(out))
    torch.testing.assert_close(_logits(pm2), y, rtol=1e-5, atol=1e-5)


def test_named_adapter_subfolder_and_second_adapter(tmp_path):
    model = add_lora(tiny_llama(), ["q_proj"], r=2, init="random", adapter_name="one")
    model = add_lora(model, ["v_proj"], r=2, init="random", adapter_name="two")
    qpeft.save_adapter(model, tmp_path, adapter_name="two")
    assert (tmp_path / "two" / "adapter_config.json").is_file()
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "two"))
    fresh = qpeft.load_adapter(tiny_llama(), tmp_path / "two")
    torch.testing.assert_close(_logits(fresh), _logits(pm), rtol=1e-5, atol=1e-5)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: type(m) for n, m in model.named_modules()}


def _assert_unchanged(model, snap):
    state, types = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_mismatched_shapes_raise_and_leave_model_unchanged(tmp_path):
    _peft_saved(tmp_path, target_modules=["q_proj", "v_proj"], r=4)
    wide = tiny_llama(hidden_size=96)  # every lora_A has the wrong in_features
    snap = _snapshot(wide)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*expected lora_A \(4, 96\).*"
                                         r"the file has lora_A \(4, 64\)"):
        qpeft.load_adapter(wide, tmp_path)
    _assert_unchanged(wide, snap)
    # one bad tensor among good ones: still nothing applied, also on a model that already has LoRA layers
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    bad = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[bad] = torch.randn(32, 3)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    model = add_lora(tiny_llama(), ["q_proj"], r=4, init="random", adapter_name="other")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj.*lora_B \(32, 4\).*lora_B \(32, 3\)"):
        qpeft.load_adapter(model, tmp_path)
    _assert_unchanged(model, snap)


def test_unknown_module_and_unsupported_config_raise(tmp_path):
    _peft_saved(tmp_path, target_modules=["q_proj"], r=2)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.randn(2, 64)
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight"] = torch.randn(64, 2)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"), metadata={"format": "pt"})
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.9\.self_attn\.q_proj.*does not exist"):
        qpeft.load_adapter(model, tmp_path)
    _assert_unchanged(model, snap)
    other = tmp_path / "fan_in_fan_out"
    _peft_saved(other, target_modules=["q_proj"], r=2)
    cfg = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**cfg, "fan_in_fan_out": True}))
    with pytest.raises(ValueError, match=r"fan_in_fan_out=True\) is not supported"):
        qpeft.load_adapter(model, other)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq"])
def test_base_rewriting_init_refused_by_qpeft_load_adapter(tmp_path, init):
    """An adapter saved with an init that rewrites the base (PEFT re-runs it on load) is refused by qpeft's own
    load path, which adds A, B only, naming init_lora_weights and the paths that work; nothing changes. EVA and
    the plain inits load."""
    _peft_saved(tmp_path, target_modules=["q_proj"], r=2)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": init}))
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=re.escape(f"init_lora_weights={init!r}: PEFT re-runs this init")):
        qpeft.load_adapter(model, tmp_path)
    _assert_unchanged(model, snap)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "init_lora_weights": "eva"}))
    qpeft.load_adapter(model, tmp_path)
    assert any(".lora_A." in n for n, _ in model.named_parameters())


def _variant_value(name: str):
    """A valid value turning on PEFT's LoRA variant `name` (a field of peft.LoraConfig with is_lora_variant)."""
    from peft.tuners.lora import config as c

    return {"use_dora": lambda: True, "alora_invocation_tokens": lambda: [5, 6], "velora_config": c.VeloraConfig,
            "monteclora_config": c.MontecloraConfig, "use_bdlora": c.BdLoraConfig, "arrow_config": c.ArrowConfig,
            "kasa_config": c.KasaConfig}[name]()


@pytest.mark.parametrize("name", sorted(set(LORA_VARIANTS) - set(SUPPORTED_VARIANTS)))
def test_lora_variants_refused_on_every_load_path_with_one_message(tmp_path, name):
    """An adapter_config.json with a LoRA variant on (aLoRA's alora_invocation_tokens, DoRA, VeLoRA, ...; the list
    is PEFT's, see test_lora_options): qpeft.load_adapter (dense or 4-bit base), qpeft.peft_from_pretrained, stock
    PeftModel.from_pretrained on a 4-bit base and PeftModel.load_adapter as a second adapter of a qpeft PeftModel
    all refuse it with the same message, and leave the model as it was. (Loaded as plain LoRA, an aLoRA adapter
    gave logits 0.71 away from PEFT's.)"""
    pytest.importorskip("transformers")
    _peft_saved(tmp_path, target_modules=["q_proj", "v_proj"], r=4)  # LoRA tensors; the config gets the variant
    peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, **{name: _variant_value(name)}).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())[name]
    dense, nf4, nf4_peft = tiny_llama(), tiny_llama(), tiny_llama()
    qpeft.quantize_model(nf4)
    qpeft.quantize_model(nf4_peft)
    nf4_peft = peft.get_peft_model(nf4_peft, peft.LoraConfig(r=2, target_modules=["k_proj"]))
    messages = []
    for model, load in ((dense, qpeft.load_adapter), (nf4, qpeft.load_adapter), (nf4, qpeft.peft_from_pretrained),
                        (nf4, peft.PeftModel.from_pretrained),
                        (nf4_peft, lambda model, path: model.load_adapter(path, adapter_name="variant"))):
        snap = _snapshot(model)
        with pytest.raises(ValueError) as err:
            load(model, tmp_path)
        _assert_unchanged(model, snap)
        messages.append(str(err.value))
    if name == "kasa_config":  # as a second adapter PEFT refuses it itself first: KaSA cannot join a LoRA adapter
        assert messages.pop().startswith("KaSA cannot be combined")
    assert len(set(messages)) == 1 and f"LoraConfig({name}=" in messages[0], messages
    assert list(nf4_peft.peft_config) == ["default"]


def test_qlora_adapter_roundtrip(tmp_path):
    from qpeft.tuners.lora.model import prepare_for_qlora

    model = prepare_for_qlora(tiny_llama(), r=4, lora_alpha=8, init="random")
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B["default"].weight.normal_(0, 0.05)
    qpeft.save_adapter(model, tmp_path)
    other = qpeft.load_adapter(prepare_for_qlora(tiny_llama(), r=4, lora_alpha=8), tmp_path)
    torch.testing.assert_close(_logits(other), _logits(model), rtol=0, atol=0)
    # the same file on the unquantized model through PEFT: the adapter tensors are PEFT's
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    theirs = peft.get_peft_model_state_dict(pm)
    ours = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
