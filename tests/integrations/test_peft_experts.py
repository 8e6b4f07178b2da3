"""LoRA on qpeft's 4-bit MoE experts through PEFT's own `LoraConfig(target_parameters=[...])` (issue 24): gradients
against PEFT's ParamWrapper on the dequantized model, a stock-PEFT round trip onto a dense base, merge/unmerge, and
bad input. Tiny random MoE models (tests/tiny_moe.py) on the CPU, fp32."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from tiny_moe import tiny_moe
from utils import assert_close_2x

peft = pytest.importorskip("peft")
from peft.tuners.lora.layer import ParamWrapper as PeftParamWrapper  # noqa: E402

from qpeft.integrations.peft_experts import ParamWrapper  # noqa: E402  (installs nothing by itself)
import qpeft.integrations.peft  # noqa: E402,F401  (qpeft's PEFT hooks: what a user's import of qpeft.integrations does)
from qpeft.models.moe import dequantize_experts_module, find_experts, quantize_model_experts  # noqa: E402
from qpeft.models.moe.interface import register_experts_implementation  # noqa: E402
from qpeft.quant.experts import quantize_experts  # noqa: E402

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
PREFIX = "base_model.model."


def _ids(seed=1):
    return torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(seed))


def _4bit(family):
    model = tiny_moe(family)
    quantize_model_experts(model)
    register_experts_implementation()
    model.set_experts_implementation("qpeft")
    return model


def _dense_of(model4, dtype):
    """The same base with each 4-bit experts module replaced by its dequantized weights (transformers' eager loop)."""
    ref = copy.deepcopy(model4)
    for t in find_experts(ref):
        dequantize_experts_module(t.module, dtype)
    ref.set_experts_implementation("eager")
    return ref.to(dtype)


def _config(**kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=list(TARGETS), **kw)


def _lora(model) -> dict:
    return {n.removeprefix(PREFIX): p for n, p in model.named_parameters() if ".lora_" in n}


def _randomize(pm, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(_lora(pm).items()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _copy_lora(src, dst):
    mine, theirs = _lora(src), _lora(dst)
    assert mine.keys() == theirs.keys() and mine
    with torch.no_grad():
        for n, p in mine.items():
            theirs[n].copy_(p.to(theirs[n].dtype))


def _loss_and_grads(pm, x):
    pm.zero_grad(set_to_none=True)
    out = pm(input_ids=x, labels=x)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in _lora(pm).items()}


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_lora_on_4bit_experts_matches_peft_paramwrapper_on_the_dequantized_model(family):
    base = _4bit(family)
    dense = {dtype: _dense_of(base, dtype) for dtype in (torch.float64, torch.float32)}
    pm = peft.get_peft_model(base, _config())
    wrappers = [m for m in pm.modules() if isinstance(m, PeftParamWrapper)]
    assert wrappers and all(type(m) is ParamWrapper for m in wrappers)  # qpeft's, for the 4-bit experts
    _randomize(pm)
    refs = {}
    for dtype in (torch.float64, torch.float32):
        ref = peft.get_peft_model(dense[dtype], _config())
        assert all(type(m) is PeftParamWrapper for m in ref.modules() if isinstance(m, PeftParamWrapper))
        _copy_lora(pm, ref)
        refs[dtype] = _loss_and_grads(ref, _ids())
    logits, grads = _loss_and_grads(pm, _ids())
    assert_close_2x(logits, refs[torch.float64][0], refs[torch.float32][0], what=f"{family} logits")
    assert grads.keys() == refs[torch.float32][1].keys() and len(grads) == 2 * 2 * 2  # 2 layers x 2 params x A/B
    for n in grads:
        assert grads[n].abs().max() > 0, n
        assert_close_2x(grads[n], refs[torch.float64][1][n], refs[torch.float32][1][n], what=f"{family} {n}")
    # the base stayed 4-bit and frozen, only the adapters train
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == {PREFIX + n for n in _lora(pm)}


def test_an_experts_adapter_saved_with_qpeft_loads_with_stock_peft_on_a_dense_base(tmp_path):
    base = _4bit("qwen3_moe")
    pm = peft.get_peft_model(base, _config())
    _randomize(pm)
    pm.save_pretrained(tmp_path)
    saved = peft.get_peft_model_state_dict(pm)
    assert sorted(saved) == sorted(f"base_model.model.model.layers.{i}.mlp.experts.lora_{ab}.weight"
                                   for i in range(2) for ab in "AB") or len(saved) == 8
    x = _ids()
    with torch.no_grad():
        y = pm(x).logits
    # stock PEFT onto the dequantized fp32 base: PEFT's own ParamWrapper, every tensor as saved, the same outputs
    results = {}
    for dtype in (torch.float64, torch.float32):
        dense = peft.PeftModel.from_pretrained(_dense_of(_4bit("qwen3_moe"), dtype), tmp_path)
        assert all(type(m) is PeftParamWrapper for m in dense.modules() if isinstance(m, PeftParamWrapper))
        theirs = peft.get_peft_model_state_dict(dense)
        assert theirs.keys() == saved.keys()
        assert all(torch.equal(theirs[k].float(), saved[k]) for k in saved)
        with torch.no_grad():
            results[dtype] = dense(x).logits
        # the file loses nothing: stock PEFT on the same dense base with the adapter built in memory (get_peft_model
        # and the tensors copied from qpeft's model) gives the loaded model's logits bit for bit
        built = peft.get_peft_model(_dense_of(_4bit("qwen3_moe"), dtype), _config())
        _copy_lora(pm, built)
        with torch.no_grad():
            assert torch.equal(built(x).logits, results[dtype]), dtype
    # qpeft's 4-bit model itself vs stock PEFT: the same function computed in another order (grouped LoRA
    # shrink/expand beside x @ W_e^T, where PEFT's ParamWrapper runs x @ (W_e + s * B_e A_e)^T), so the 2x rule
    assert_close_2x(y, results[torch.float64], results[torch.float32], what="logits vs stock PEFT")
    # and back onto a 4-bit base with stock PEFT's loader: qpeft's wrappers, the same logits bit for bit
    again = peft.PeftModel.from_pretrained(_4bit("qwen3_moe"), tmp_path)
    assert any(type(m) is ParamWrapper for m in again.modules())
    with torch.no_grad():
        assert torch.equal(again(x).logits, y)


def test_merge_and_unmerge_on_4bit_experts():
    """Merging writes the NF4 quantization of W + delta (PEFT's delta, computed by PEFT's ParamWrapper on the
    dequantized base); unmerging gives back the 4-bit experts bit for bit."""
    model = _4bit("mixtral")
    ref = peft.get_peft_model(_dense_of(model, torch.float32), _config())
    pm = peft.get_peft_model(model, _config())
    _randomize(pm)
    _copy_lora(pm, ref)
    experts = pm.base_model.model.model.layers[0].mlp.experts
    base = experts
    while hasattr(base, "base_layer"):
        base = base.base_layer
    theirs = {m.parameter_name: m for m in ref.base_model.model.model.layers[0].mlp.experts.modules()
              if isinstance(m, PeftParamWrapper)}
    expected = {}
    for name, wrapper in theirs.items():
        w = base.dequantize_nf4(name, torch.float32) + wrapper.get_delta_weight("default").float()
        expected[name] = quantize_experts(w, transposed=False).dequantize(torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    x = _ids()
    with torch.no_grad():
        y = pm(x).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pm.merge_adapter()
        assert any("re-quantizes" in str(w.message) for w in caught)
        merged = pm(x).logits
        assert not torch.equal(base.state_dict()["gate_up_proj"], before["gate_up_proj"])
        for name, want in expected.items():
            torch.testing.assert_close(base.dequantize_nf4(name, torch.float32), want, rtol=0, atol=0)
        assert not torch.equal(merged, y)
        pm.unmerge_adapter()
        after = base.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        assert torch.equal(pm(x).logits, y)


def test_a_target_parameters_entry_that_matches_nothing_raises_naming_it():
    with pytest.raises(ValueError, match=r"target_parameters entry 'mlp.experts.gate_proj' matches no parameter.*"
                                         r"experts parameters: \['down_proj', 'gate_up_proj'\]\)"):
        peft.get_peft_model(_4bit("qwen3_moe"), peft.LoraConfig(
            r=4, target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.gate_proj"]))


def test_an_init_that_needs_a_dense_weight_is_refused():
    with pytest.raises(ValueError, match=r"init_lora_weights in \(True, False, 'gaussian'\).*'pissa'"):
        peft.get_peft_model(_4bit("qwen3_moe"), _config(init_lora_weights="pissa"))


def test_all_linear_on_a_model_with_4bit_linears_and_experts_adapts_both():
    """PEFT resolves "all-linear" on a transformers 5 MoE in its v4->v5 config conversion, before qpeft's LoraModel
    hook runs; its own resolution does not count QLinearNF4, so the 4-bit attention projections were dropped
    silently (target_modules became set()). qpeft's hook on that resolution counts them."""
    import qpeft
    from qpeft.integrations.peft import QPeftLoraLinear

    model = tiny_moe("qwen3_moe")
    qpeft.quantize_model(model, compute_dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    adapted = sorted(n.removeprefix(PREFIX) for n, m in pm.named_modules() if isinstance(m, QPeftLoraLinear))
    assert adapted == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2)
                             for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    # and PEFT's own "all-linear" rule on a v5 MoE also targets the experts' parameters: qpeft's wrappers there
    assert sum(type(m) is ParamWrapper for m in pm.modules()) == 4


def test_the_moe_all_linear_hook_is_version_checked_and_loud_on_an_unknown_release():
    import types

    from qpeft.integrations.peft import install_moe_all_linear_hook

    from peft.utils import transformers_weight_conversion as twc
    assert getattr(twc._maybe_include_all_linear_layers, "_qpeft", False)  # in place since the import
    assert install_moe_all_linear_hook() is True
    newer = types.SimpleNamespace(_maybe_include_all_linear_layers=lambda config, model: config)
    with pytest.warns(RuntimeWarning, match=r"PEFT 0\.99\.0 is a release qpeft's MoE 'all-linear' hook"):
        assert install_moe_all_linear_hook(newer, "0.99.0") is True
    assert newer._maybe_include_all_linear_layers._qpeft
    assert install_moe_all_linear_hook(types.SimpleNamespace(), "0.99.0") is False  # nothing to wrap: nothing done
