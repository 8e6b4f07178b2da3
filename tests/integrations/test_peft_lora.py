"""QPeftLoraLinear through PEFT's own entry points (get_peft_model, model.add_adapter, PeftModel.from_pretrained) on
tiny random Llamas whose linear layers are qpeft NF4 (CPU, fp32 unless said)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

import qpeft
from qpeft.tuners.lora.model import add_lora, lora_layers, set_lora_adapter
from qpeft.modules.qlinear_nf4 import QLinearNF4
from utils import assert_close_2x, tiny_llama

peft = pytest.importorskip("peft")
from qpeft.integrations.peft import PEFT_SEES_NF4, QPeftLoraLinear, all_linear, register  # noqa: E402

PREFIX = "base_model.model."


def _min_peft_for_transformers() -> str:
    from transformers.integrations import peft as hf_peft

    return hf_peft.MIN_PEFT_VERSION


MIN_PEFT_FOR_TRANSFORMERS = _min_peft_for_transformers()


def transformers_peft_integration_works() -> bool:
    from packaging.version import Version

    return Version(peft.__version__) >= Version(MIN_PEFT_FOR_TRANSFORMERS)
# in/out features all multiples of 64 (the NF4 blocksize): bitsandbytes 0.50.2's CPU inference path reshapes absmax
# to (out, in // blocksize) and fails on the default tiny_llama's 96-wide MLP.
INTERMEDIATE = 128


def nf4_llama(seed: int = 0, compute_dtype=None):
    model = tiny_llama(seed, intermediate_size=INTERMEDIATE)
    qpeft.quantize_model(model, compute_dtype=compute_dtype)
    return model


def ids(batch: int = 2, length: int = 11, seed: int = 1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_lora(model, seed: int = 3, std: float = 0.05):
    """A and B random (B != 0: the adapter is not a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if ".lora_A." in n or ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def lora_params(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix(PREFIX): p for n, p in model.named_parameters() if ".lora_" in n}


def copy_lora(src, dst):
    """Copy adapters between a PeftModel and a qpeft add_lora model (same module paths, same parameter names)."""
    theirs = lora_params(dst)
    mine = lora_params(src)
    assert mine.keys() == theirs.keys() and mine
    with torch.no_grad():
        for n, p in mine.items():
            theirs[n].copy_(p)


def peft_nf4(seed=0, compute_dtype=None, **cfg):
    model = nf4_llama(seed, compute_dtype)
    cfg.setdefault("target_modules", "all-linear")
    pm = peft.get_peft_model(model, qpeft.lora_config(model=model, init_lora_weights=False, **cfg))
    randomize_lora(pm)
    return pm


def loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in lora_params(model).items()}


def test_import_qpeft_imports_neither_peft_nor_transformers():
    code = ("import qpeft, sys; dir(qpeft); qpeft.lora_layers; "
            "assert 'peft' not in sys.modules and 'transformers' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('peft', 'transformers'))")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert qpeft.lora_config is qpeft.integrations.peft.lora_config
    assert qpeft.QPeftLoraLinear is QPeftLoraLinear and "lora_config" in dir(qpeft)


def test_a_plain_config_works_with_no_qpeft_integration_import():
    """A script that imports qpeft, then PEFT (after a find_spec probe, as transformers makes one) and never
    qpeft.integrations: importing PEFT installs qpeft's hook, and a plain LoraConfig builds QPeftLoraLinear. (PEFT
    imported before qpeft: `import qpeft` installs it.)"""
    code = """
import importlib.util, sys, warnings
warnings.simplefilter("error", RuntimeWarning)
import torch.nn as nn
import qpeft
importlib.util.find_spec("peft")
assert "peft" not in sys.modules
import peft
assert "qpeft.integrations.peft" in sys.modules
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
qpeft.quantize_model(model)
pm = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["0", "2"]))
assert [type(pm.base_model.model[i]).__name__ for i in (0, 2)] == ["QPeftLoraLinear"] * 2
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_get_peft_model_wraps_every_qlinear_nf4():
    model = nf4_llama()
    nf4 = {n: m for n, m in model.named_modules() if isinstance(m, QLinearNF4)}
    assert len(nf4) == 14
    pm = peft.get_peft_model(model, qpeft.lora_config(r=16, target_modules="all-linear", model=model))
    layers = {n.removeprefix(PREFIX): m for n, m in pm.named_modules() if isinstance(m, QPeftLoraLinear)}
    assert layers.keys() == nf4.keys()
    assert all(layers[n].base_layer is nf4[n] and layers[n].r["default"] == 16 for n in nf4)
    assert isinstance(pm.base_model.model.lm_head, nn.Linear)  # the output head is left out, as PEFT does
    keys = set(peft.get_peft_model_state_dict(pm))
    assert PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 28
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(pm.named_parameters()) if ".lora_A.default." in n or ".lora_B.default." in n}


def test_all_linear_without_the_model_counts_the_4bit_layers():
    """qpeft.lora_config(target_modules="all-linear") with no model: resolved when PEFT injects the adapter, with
    QLinearNF4 counted; a stock LoraConfig keeps PEFT's own rule (which finds no linear layer on an NF4 model)."""
    config = qpeft.lora_config(r=16, target_modules="all-linear")
    assert config.target_modules == "all-linear"
    pm = peft.get_peft_model(nf4_llama(), config)
    layers = {n.removeprefix(PREFIX) for n, m in pm.named_modules() if isinstance(m, QPeftLoraLinear)}
    assert layers == set(all_linear(nf4_llama())) and len(layers) == 14
    assert isinstance(pm.base_model.model.lm_head, nn.Linear)
    # PEFT 0.21.2 alone resolves "all-linear" by type (nn.Linear / Conv1D only) and would find nothing on an NF4
    # model: qpeft's hook counts QLinearNF4 for a stock config too
    assert not PEFT_SEES_NF4
    stock = peft.get_peft_model(nf4_llama(), peft.LoraConfig(target_modules="all-linear"))
    assert {n.removeprefix(PREFIX) for n, m in stock.named_modules() if isinstance(m, QPeftLoraLinear)} == layers
    # a dense model through a stock config: PEFT's resolution, untouched
    dense = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules="all-linear"))
    assert sum(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in dense.modules()) == 14
    assert len(all_linear(nf4_llama())) == 14
    with pytest.raises(ValueError, match="no nn.Linear"):
        all_linear(nn.Sequential(nn.ReLU()))


@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"], "all-linear"])
def test_plain_lora_config_builds_qpeft_layers_bit_for_bit(targets):
    """get_peft_model(qpeft model, peft.LoraConfig(...)) with no qpeft call: every targeted QLinearNF4 becomes
    QPeftLoraLinear, with the same init, logits and gradients as the qpeft.lora_config path, bit for bit."""
    def build(make_config):
        model = nf4_llama()
        torch.manual_seed(7)  # the adapters' init draws
        return peft.get_peft_model(model, make_config(r=8, lora_alpha=16, target_modules=targets))

    plain, ours = build(peft.LoraConfig), build(qpeft.lora_config)
    nf4 = {n for n, m in nf4_llama().named_modules() if isinstance(m, QLinearNF4)}
    expected = nf4 if targets == "all-linear" else {n for n in nf4 if n.rsplit(".", 1)[-1] in targets}
    assert len(expected) == (14 if targets == "all-linear" else 6)
    for pm in (plain, ours):
        assert {n.removeprefix(PREFIX) for n, m in pm.named_modules() if isinstance(m, QPeftLoraLinear)} == expected
    assert set(plain.peft_config["default"].target_modules) == set(ours.peft_config["default"].target_modules)
    a, b = lora_params(plain), lora_params(ours)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the same init
    randomize_lora(plain)
    randomize_lora(ours)
    x = ids()
    y1, g1 = loss_and_grads(plain.train(), x)
    y2, g2 = loss_and_grads(ours.train(), x)
    assert torch.equal(y1, y2) and g1.keys() == g2.keys() and all(torch.equal(g1[n], g2[n]) for n in g1)


def test_peft_multi_adapter_flow_with_plain_configs(tmp_path):
    """PEFT's own multi-adapter API on a qpeft base, plain LoraConfigs only: PeftModel.load_adapter of a second
    adapter on other modules, set_adapter between them, add_adapter, delete_adapter. Each adapter gives the logits
    of a model holding it alone."""
    def single(targets, seed, r):
        pm = peft.get_peft_model(nf4_llama(), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                              init_lora_weights=False))
        randomize_lora(pm, seed=seed)
        return pm.eval()

    first, second = single(["q_proj"], 3, 4), single(["v_proj", "down_proj"], 5, 2)
    second.save_pretrained(tmp_path)
    x = ids()
    with torch.no_grad():
        y_first, y_second, y_base = first(x).logits, second(x).logits, nf4_llama()(x).logits
    pm = first
    pm.load_adapter(tmp_path, adapter_name="second")

    def holding(name):
        return {n.removeprefix(PREFIX) for n, m in pm.named_modules()
                if isinstance(m, QPeftLoraLinear) and name in m.lora_A}

    assert holding("second") == {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.v_proj", "mlp.down_proj")}
    assert len(holding("default")) == 2
    with torch.no_grad():
        pm.set_adapter("second")
        assert torch.equal(pm(x).logits, y_second)
        pm.set_adapter("default")
        assert torch.equal(pm(x).logits, y_first)
        pm.add_adapter("third", peft.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False))
        assert len(holding("third")) == 2
        pm.set_adapter("third")
        assert not torch.equal(pm(x).logits, y_base)  # init_lora_weights=False: B != 0
        pm.delete_adapter("second")
        assert "second" not in pm.peft_config and not holding("second")
        pm.set_adapter("default")
        assert torch.equal(pm(x).logits, y_first)


def test_plain_config_with_an_unsupported_option_is_refused_before_anything_changes():
    model = nf4_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"qpeft: LoraConfig\(init_lora_weights='orthogonal'\) is not supported"):
        peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj", "lm_head"],
                                                   init_lora_weights="orthogonal"))
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # an option for the dense layers alone (here the fp head): PEFT's own layer takes it, as on any model
    pm = peft.get_peft_model(model, peft.LoraConfig(target_modules=["lm_head"], init_lora_weights="orthogonal"))
    assert type(pm.base_model.model.lm_head).__name__ == "Linear" and not any(isinstance(m, QPeftLoraLinear)
                                                                                for m in pm.modules())


def test_lora_model_hook_is_version_checked_and_loud_on_an_unknown_release():
    """The hook is a patch of PEFT internals (LoraModel._prepare_model): installed silently on the releases it was
    tested with, with a RuntimeWarning on any other, and not at all (with a warning) where the method is gone."""
    from qpeft._versions import parse
    from qpeft.integrations.peft import HOOK_TESTED_PEFT, install_lora_model_hook

    # a new PEFT release in the latest lane fails here first: test the hook with it, then add it to the list
    assert parse(peft.__version__) in {parse(v) for v in HOOK_TESTED_PEFT}, peft.__version__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert install_lora_model_hook() is True  # in place since the import: nothing to do, nothing said
    assert peft.tuners.lora.LoraModel._prepare_model._qpeft

    class Newer:  # a release the hook does not know, which still has the method
        def _prepare_model(self, peft_config, model):
            self.seen = peft_config

    with pytest.warns(RuntimeWarning, match=r"PEFT 0\.99\.0 is a release .* not tested with"):
        assert install_lora_model_hook(Newer, "0.99.0") is True
    tuner = Newer()
    tuner._prepare_model("not a LoraConfig", nn.Linear(2, 2))  # passed through to the original
    assert tuner.seen == "not a LoraConfig" and Newer._prepare_model._qpeft

    class Without:
        pass

    with pytest.warns(RuntimeWarning, match=r"PEFT 0\.99\.0 has no LoraModel\._prepare_model"):
        assert install_lora_model_hook(Without, "0.99.0") is False
    assert not hasattr(Without, "_prepare_model")


@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("cfg", [dict(r=16, lora_alpha=32), dict(r=4, lora_alpha=8, use_rslora=True),
                                 dict(r=8, lora_alpha=16, lora_dropout=0.2)])
def test_forward_backward_equal_qpeft_add_lora(compute_dtype, cfg):
    """The same fused op on the same operands: logits, loss and every adapter gradient bit-identical."""
    pm = peft_nf4(compute_dtype=compute_dtype, **cfg)
    ours = add_lora(nf4_llama(compute_dtype=compute_dtype), "all-linear", init="random",
                    **{k: v for k, v in cfg.items()})
    copy_lora(pm, ours)
    pm.train()
    ours.train()
    x = ids()
    torch.manual_seed(5)  # the dropout seeds: one draw per layer call, in the same order in both models
    y1, g1 = loss_and_grads(pm, x)
    torch.manual_seed(5)
    y2, g2 = loss_and_grads(ours, x)
    assert torch.equal(y1, y2)
    assert g1.keys() == g2.keys() and all(torch.equal(g1[n], g2[n]) for n in g1)
    assert all(g.abs().sum() > 0 for g in g1.values())


def test_autocast_and_adapter_dtype_equal_qpeft_add_lora():
    """bf16 compute under CPU autocast: the same op in the autocast dtype, bit-identical to add_lora; the adapters
    stay fp32 (PEFT casts them to the base's compute dtype, get_peft_model's autocast_adapter_dtype back to fp32)."""
    pm = peft_nf4(compute_dtype=torch.bfloat16, r=8, lora_alpha=16)
    assert all(p.dtype == torch.float32 for p in lora_params(pm).values())
    ours = add_lora(nf4_llama(compute_dtype=torch.bfloat16), "all-linear", r=8, lora_alpha=16, init="random")
    copy_lora(pm, ours)
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, g1 = loss_and_grads(pm, x)
        y2, g2 = loss_and_grads(ours, x)
    assert y1.dtype == torch.bfloat16 and torch.equal(y1, y2)
    assert all(torch.equal(g1[n], g2[n]) and g1[n].dtype == torch.float32 for n in g1)


def test_adapter_dtypes_on_a_bf16_compute_base():
    """PEFT + bitsandbytes creates a new adapter in the base's compute_dtype (bf16) and get_peft_model's default
    autocast_adapter_dtype=True casts it to fp32: qpeft's layer gives the same dtypes there (False: bf16), and fp32
    where PEFT never casts (transformers' model.add_adapter), its default. tests/integrations/test_peft_bnb_parity.py
    compares with bitsandbytes."""
    model = nf4_llama(compute_dtype=torch.bfloat16)
    pm = peft.get_peft_model(model, qpeft.lora_config(model=model, r=4, target_modules="all-linear"),
                             autocast_adapter_dtype=False)
    assert {p.dtype for p in lora_params(pm).values()} == {torch.bfloat16}
    pm.add_adapter("second", qpeft.lora_config(model=pm, r=2, target_modules="all-linear"))  # autocast: True
    dtypes = {n: p.dtype for n, p in lora_params(pm).items()}
    assert len(dtypes) == 56 and all(d == (torch.float32 if ".second." in n else torch.bfloat16)
                                     for n, d in dtypes.items())
    if transformers_peft_integration_works():
        model = nf4_llama(compute_dtype=torch.bfloat16)
        model.add_adapter(qpeft.lora_config(model=model, r=4, target_modules="all-linear"))
        x = ids()
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        lora = [p for n, p in model.named_parameters() if ".lora_" in n]
        assert len(lora) == 28 and all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in lora)


def test_rank_and_alpha_patterns():
    model = nf4_llama()
    pm = peft.get_peft_model(model, qpeft.lora_config(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"],
                                                      rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 4}))
    layers = {n.removeprefix(PREFIX): m for n, m in pm.named_modules() if isinstance(m, QPeftLoraLinear)}
    assert len(layers) == 4
    for n, m in layers.items():
        r, alpha = (2, 16) if n.endswith("q_proj") else (8, 4)
        assert m.r["default"] == r and m.scaling["default"] == alpha / r
        assert m.lora_A["default"].weight.shape == (r, m.in_features)


def test_forward_matches_peft_on_the_dequantized_weights():
    """Against PEFT's own lora.Linear on nn.Linear layers holding the dequantized NF4 weights: within 2x of PEFT's
    fp32 error vs the same computation in fp64."""
    pm = peft_nf4(r=8, lora_alpha=16)
    pm.eval()

    def dense(dtype):
        model = tiny_llama(0, intermediate_size=INTERMEDIATE)
        nf4 = pm.get_base_model()
        with torch.no_grad():
            for n, m in model.named_modules():
                if isinstance(m, nn.Linear) and n != "lm_head":
                    m.weight.copy_(nf4.get_submodule(n).base_layer.dequantize(torch.float32))
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=all_linear(model), init_lora_weights=False)
        ref = peft.get_peft_model(model.to(dtype), config, autocast_adapter_dtype=False)
        copy_lora(pm, ref)
        return ref.eval()

    x = ids()
    with torch.no_grad():
        ours = pm(x).logits
        ref64 = dense(torch.float64)(x).logits
        ref32 = dense(torch.float32)(x).logits
    assert not torch.allclose(ours, nf4_llama()(x).logits, atol=1e-3)  # the adapter changes the logits
    assert_close_2x(ours, ref64, ref32, what="logits")


def test_several_active_adapters_and_set_adapter():
    pm = peft_nf4(r=4, lora_alpha=8)
    second = qpeft.lora_config(model=pm, r=2, lora_alpha=6, init_lora_weights=False, target_modules="all-linear")
    pm.add_adapter("other", second)
    randomize_lora(pm, seed=7)
    ours = add_lora(nf4_llama(), "all-linear", r=4, lora_alpha=8, init="random")
    add_lora(ours, "all-linear", r=2, lora_alpha=6, init="random", adapter_name="other")
    copy_lora(pm, ours)
    x = ids()
    for active in (["default", "other"], "other", "default"):
        pm.base_model.set_adapter(active)
        set_lora_adapter(ours, active)
        with torch.no_grad():
            assert torch.equal(pm(x).logits, ours(x).logits), active
    base = nf4_llama()
    with torch.no_grad(), pm.disable_adapter():
        assert torch.equal(pm(x).logits, base(x).logits)
    with torch.no_grad():
        assert not torch.equal(pm(x).logits, base(x).logits)


def test_several_adapters_with_dropout_in_training():
    """Two active adapters with dropout: independent masks (the first fused, the second as a rank-r product), as
    qpeft's LoraLinear does it: bit-identical logits and gradients under the same seed."""
    pm = peft_nf4(r=4, lora_alpha=8, lora_dropout=0.1)
    pm.add_adapter("other", qpeft.lora_config(model=pm, r=2, lora_alpha=6, lora_dropout=0.3, init_lora_weights=False,
                                              target_modules="all-linear"))
    randomize_lora(pm, seed=11)
    pm.base_model.set_adapter(["default", "other"])
    ours = add_lora(nf4_llama(), "all-linear", r=4, lora_alpha=8, lora_dropout=0.1, init="random")
    add_lora(ours, "all-linear", r=2, lora_alpha=6, lora_dropout=0.3, init="random", adapter_name="other")
    set_lora_adapter(ours, ["default", "other"])
    copy_lora(pm, ours)
    pm.train()
    ours.train()
    x = ids()
    torch.manual_seed(13)
    y1, g1 = loss_and_grads(pm, x)
    torch.manual_seed(13)
    y2, g2 = loss_and_grads(ours, x)
    assert torch.equal(y1, y2) and len(g1) == 56
    assert g1.keys() == g2.keys() and all(torch.equal(g1[n], g2[n]) for n in g1)
    with torch.no_grad():  # and dropout really acted: eval differs from train
        pm.eval()
        assert not torch.equal(pm(x).logits, y1)


def test_mixed_adapter_batch():
    pm = peft_nf4(r=4, lora_alpha=8)
    pm.add_adapter("other", qpeft.lora_config(model=pm, r=2, init_lora_weights=False, target_modules="all-linear"))
    randomize_lora(pm, seed=9)
    pm.eval()
    x = ids(batch=3)
    with torch.no_grad():
        mixed = pm(x, adapter_names=["other", "__base__", "default"]).logits
        pm.base_model.set_adapter("other")
        row0 = pm(x[:1]).logits
        pm.base_model.set_adapter("default")
        row2 = pm(x[2:]).logits
        with pm.disable_adapter():
            row1 = pm(x[1:2]).logits
    # one-row vs three-row batches through the same ops: equal up to fp32 GEMM blocking
    torch.testing.assert_close(mixed, torch.cat([row0, row1, row2]))


def test_merge_unmerge_and_merge_and_unload_equal_qpeft():
    pm = peft_nf4(r=8, lora_alpha=16)
    ours = add_lora(nf4_llama(), "all-linear", r=8, lora_alpha=16, init="random")
    copy_lora(pm, ours)
    name = "model.layers.1.mlp.down_proj"
    layer, ref = pm.base_model.model.get_submodule(name), ours.get_submodule(name)
    before = layer.base_layer.weight.clone()
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
        ref.merge()
    assert layer.merged and not torch.equal(layer.base_layer.weight, before)
    for a, b in zip(layer.base_layer.state_dict().values(), ref.base_layer.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))  # merged: the base alone
    layer.unmerge()
    ref.unmerge()
    assert not layer.merged
    assert torch.equal(layer.base_layer.weight, before)  # the kept pre-merge codes, not a second re-quantization
    for a, b in zip(layer.base_layer.state_dict().values(), ref.base_layer.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.warns(UserWarning, match="Already unmerged"):
        layer.unmerge()
    # PEFT's merge_and_unload: NF4 layers with the merged, re-quantized weights
    copy_lora(pm, ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        merged = pm.merge_and_unload()
        for m in lora_layers(ours).values():
            m.merge()
    assert not any(isinstance(m, QPeftLoraLinear) for m in merged.modules())
    for n, m in merged.named_modules():
        if isinstance(m, QLinearNF4):
            assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                         ours.get_submodule(n).base_layer.state_dict().values()))


def test_unmerge_after_the_base_was_written_subtracts_as_peft_does():
    """A merged base written since the merge (load_state_dict) makes the kept codes stale: unmerge subtracts the
    delta and re-quantizes (PEFT's rule) instead of putting back codes the user replaced."""
    pm = peft_nf4(r=4, lora_alpha=8)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        for p in layer.lora_B.parameters():
            p.normal_()
    original = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    with pytest.warns(UserWarning, match="re-quantizes"):
        layer.merge()
    merged = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    layer.base_layer.load_state_dict(merged)  # written in place: a new version of every tensor
    layer.unmerge()
    assert not layer.merged
    w = layer.base_layer.weight
    assert not torch.equal(w, merged["weight"])  # the delta was subtracted ...
    assert not torch.equal(w, original["weight"])  # ... by a re-quantization, not by restoring stale codes
    # ... which brings the weight back near the original (within NF4 rounding), far closer than the merged one
    from qpeft.modules.lora_linear import _dequantize_nf4
    now = _dequantize_nf4(layer.base_layer)
    layer.base_layer.load_state_dict(original)
    w0 = _dequantize_nf4(layer.base_layer)
    layer.base_layer.load_state_dict(merged)
    w1 = _dequantize_nf4(layer.base_layer)
    assert (now - w0).abs().mean() < 0.5 * (w1 - w0).abs().mean()


def test_safe_merge_rejects_non_finite_and_leaves_the_base():
    pm = peft_nf4(r=4)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    with pytest.raises(ValueError, match="adapter 'default'"):
        layer.merge(safe_merge=True)
    assert not layer.merged
    assert all(torch.equal(before[k], v) for k, v in layer.base_layer.state_dict().items())


@pytest.mark.parametrize("option", [dict(alora_invocation_tokens=[5, 6]), dict(fan_in_fan_out=True),
                                    dict(init_lora_weights="mica"), dict(init_lora_weights="orthogonal")])
def test_unsupported_options_raise_naming_them(option):
    (name, value), = option.items()
    with pytest.raises(ValueError, match=re.escape(f"{name}={value!r}")):
        qpeft.lora_config(target_modules=["q_proj"], **option)
    # a LoraConfig built by hand and registered: the layer refuses it as PEFT builds it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's own warnings for fan_in_fan_out on nn.Linear
        config = register(peft.LoraConfig(target_modules=["q_proj"], **option))
    with pytest.raises(ValueError, match=re.escape(f"{name}={value!r}")):
        peft.get_peft_model(nf4_llama(), config)


def test_second_adapter_with_unsupported_option_raises():
    pm = peft_nf4(r=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="alora_invocation_tokens"):
        pm.add_adapter("alora", register(peft.LoraConfig(target_modules=["q_proj"], alora_invocation_tokens=[5])))


@pytest.mark.parametrize("plain", [False, True], ids=["lora_config", "plain_LoraConfig"])
def test_add_adapter_transformers_integration(tmp_path, plain):
    pm = peft_nf4(r=4, lora_alpha=8)
    model = nf4_llama()
    kw = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear")
    config = peft.LoraConfig(**kw) if plain else qpeft.lora_config(model=model, **kw)
    if not transformers_peft_integration_works():
        # transformers 5.24's PEFT integration (add_adapter, set_adapter, load_adapter, ...) demands peft >= 0.22.0
        # (the image lane has 0.21.2): it refuses before looking at the model or the config
        with pytest.raises(ValueError, match=f"version >= {MIN_PEFT_FOR_TRANSFORMERS}"):
            model.add_adapter(config)
        return
    model.add_adapter(config)
    assert model._hf_peft_config_loaded
    assert sum(isinstance(m, QPeftLoraLinear) for m in model.modules()) == 14
    copy_lora(pm, model)
    x = ids()
    with torch.no_grad():
        y = pm(x).logits
        assert torch.equal(model(x).logits, y)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}  # no base weights (transformers 5.17 adds generation_config.json)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files <= {
        "adapter_config.json", "adapter_model.safetensors", "generation_config.json"}
    loaded = qpeft.peft_from_pretrained(nf4_llama(), tmp_path)
    assert sum(isinstance(m, QPeftLoraLinear) for m in loaded.modules()) == 14
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, y)
    # and transformers' own load_adapter onto a fresh qpeft base
    again = nf4_llama()
    again.load_adapter(str(tmp_path))
    assert sum(isinstance(m, QPeftLoraLinear) for m in again.modules()) == 14
    with torch.no_grad():
        assert torch.equal(again(x).logits, y)


def test_saved_adapter_reloads_with_registration_and_loads_on_a_dense_base(tmp_path):
    pm = peft_nf4(r=8, lora_alpha=16)
    pm.save_pretrained(tmp_path)
    assert "custom" not in (tmp_path / "adapter_config.json").read_text()  # PEFT does not save the mapping
    saved = peft.get_peft_model_state_dict(pm)
    x = ids()
    with torch.no_grad():
        y = pm(x).logits
    # stock PEFT onto a qpeft base (no qpeft.peft_from_pretrained): qpeft's layers, the same logits
    stock = peft.PeftModel.from_pretrained(nf4_llama(), tmp_path)
    assert sum(isinstance(m, QPeftLoraLinear) for m in stock.modules()) == 14
    with torch.no_grad():
        assert torch.equal(stock(x).logits, y)
    loaded = qpeft.peft_from_pretrained(nf4_llama(), tmp_path)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode, as PEFT's default
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, y)
    trainable = qpeft.peft_from_pretrained(nf4_llama(), tmp_path, is_trainable=True)
    assert {n.removeprefix(PREFIX) for n, p in trainable.named_parameters() if p.requires_grad} == \
        set(lora_params(trainable)) and len(lora_params(trainable)) == 28
    # stock PEFT onto a plain dense base: every tensor as saved, and the adapter applied as qpeft applies it
    dense = peft.PeftModel.from_pretrained(tiny_llama(0, intermediate_size=INTERMEDIATE), tmp_path)
    theirs = peft.get_peft_model_state_dict(dense)
    assert theirs.keys() == saved.keys() and all(torch.equal(theirs[k], saved[k]) for k in saved)
    ref = qpeft.load_adapter(tiny_llama(0, intermediate_size=INTERMEDIATE), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(dense(x).logits, ref(x).logits)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and len(cfg["target_modules"]) == 14


def test_saved_adapter_on_a_bitsandbytes_base(tmp_path):
    """Stock PEFT + transformers' bitsandbytes 4-bit base vs qpeft on the same bytes: identical logits."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dense_dir, adapter_dir = tmp_path / "dense", tmp_path / "adapter"
    tiny_llama(0, intermediate_size=INTERMEDIATE).save_pretrained(dense_dir)
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    bnb_base = AutoModelForCausalLM.from_pretrained(dense_dir, quantization_config=bnb_config, device_map="cpu",
                                                    dtype=torch.float32)
    # qpeft's base from the same checkpoint, holding bitsandbytes' bytes (QLinearNF4 reads Linear4bit's keys).
    # Quantizing the dense weights with qpeft instead gives the same packed weights but, in 2 of the 14 layers,
    # one double-quantized absmax code of 128 differs: bitsandbytes 0.50.2's CPU quantize_blockwise picks a code
    # one step away from the nearest (0.04234 vs 0.03953 for 0.04092), qpeft the nearest.
    ours_base = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    qpeft.quantize_model(ours_base, compute_dtype=torch.float32)
    ours_base.load_state_dict(bnb_base.state_dict())
    pm = peft.get_peft_model(ours_base, qpeft.lora_config(model=ours_base, r=8, lora_alpha=16,
                                                          init_lora_weights=False, target_modules="all-linear"))
    randomize_lora(pm)
    pm.save_pretrained(adapter_dir)
    theirs = peft.PeftModel.from_pretrained(bnb_base, adapter_dir)
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"  # PEFT's bnb layer
    # train mode (no dropout anywhere): bitsandbytes' CPU inference fast path (eval, no grad, AVX512-BF16)
    # repacks the weight and computes in bf16 whatever compute_dtype says; training mode takes its fp32 path
    pm.train()
    theirs.train()
    x = ids()
    with torch.no_grad():
        y_ours, y_theirs = pm(x).logits, theirs(x).logits
    assert torch.equal(y_ours, y_theirs)


def test_from_pretrained_passes_other_adapters_through_and_forward_refuses_extra_arguments(tmp_path):
    pt = peft.get_peft_model(nf4_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with torch.no_grad():
        pt.prompt_encoder["default"].embedding.weight.normal_()
    pt.save_pretrained(tmp_path)
    loaded = qpeft.peft_from_pretrained(nf4_llama(), tmp_path)  # not LoRA: no registration, PEFT's own loading
    assert isinstance(loaded.peft_config["default"], peft.PromptTuningConfig)
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, pt(input_ids=x).logits)
    layer = peft_nf4(r=2, target_modules=["q_proj"]).base_model.model.model.layers[0].self_attn.q_proj
    with pytest.raises(TypeError, match="takes x"):
        layer(torch.randn(2, 64), torch.randn(2))
