"""4-bit fused MoE experts through transformers 5 (issue 24): QPeftConfig quantizes every family's 3-D experts on
load (from sharded per-expert checkpoints, streamed one expert at a time), the "qpeft" ExpertsInterface
implementation runs them, save_pretrained / from_pretrained round-trips them byte for byte, and bad input raises.
Tiny random models of each tested family (tests/tiny_moe.py) on the CPU, fp32."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn as nn

import qpeft
from tiny_moe import FAMILIES, tiny_moe
from utils import assert_close_2x

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from qpeft.integrations.transformers import QPeftConfig  # noqa: E402
from qpeft.models.moe import dequantize_experts_module, find_experts, quantize_model_experts  # noqa: E402
from qpeft.modules.nf4_experts import is_nf4_experts  # noqa: E402


def _ids(seed=1):
    return torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids=None):
    with torch.no_grad():
        return model(_ids() if ids is None else ids).logits


def _experts(model):
    return find_experts(model)


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _save_dense(family, path):
    model = tiny_moe(family)
    model.save_pretrained(path, max_shard_size="40KB")  # sharded, as real-size checkpoints are
    assert len(list(path.glob("model-*.safetensors"))) > 3
    return model


def _dequantized(model, dtype):
    """The same model with each 4-bit experts module replaced by its dequantized weights, run by transformers'
    eager experts loop."""
    ref = copy.deepcopy(model)
    for t in _experts(ref):
        dequantize_experts_module(t.module, dtype)
    ref.set_experts_implementation("eager")
    return ref.to(dtype)


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_experts_logits_equal_the_dequantized_model(family):
    model = tiny_moe(family)
    converted = quantize_model_experts(model)
    assert converted == [t.name for t in _experts(model)] and converted
    qpeft.models.moe.interface.register_experts_implementation()
    model.set_experts_implementation("qpeft")
    ids = _ids()
    out = _logits(model, ids)
    ref64 = _logits(_dequantized(model, torch.float64), ids)
    ref32 = _logits(_dequantized(model, torch.float32), ids)
    assert_close_2x(out, ref64, ref32, what=f"{family} logits")
    assert not torch.equal(out, _logits(tiny_moe(family), ids))  # the 4-bit experts are what ran


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_on_load_streams_every_family_and_reloads_byte_for_byte(tmp_path, family):
    _save_dense(family, tmp_path / "dense")
    config = QPeftConfig(compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=config,
                                                 dtype=torch.bfloat16)
    experts = _experts(model)
    assert experts and all(is_nf4_experts(t.module) for t in experts)
    assert model.config._experts_implementation == "qpeft"
    for t in experts:
        gate_up = t.module.nf4_weight(t.param_names[0])
        assert gate_up.dtype == torch.bfloat16 and gate_up.double_quant and gate_up.quant_type == "nf4"
    # the router (a custom module in transformers 5) stays dense; shared experts are linears: 4-bit
    mlp = model.model.layers[-1].mlp
    router = getattr(mlp, "router", None) or mlp.gate
    assert not isinstance(router, qpeft.QLinearNF4) and router.weight.is_floating_point()
    shared = getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts", None)
    assert (shared is not None) == (family in ("qwen2_moe", "deepseek_v3"))
    if shared is not None:
        assert all(isinstance(getattr(shared, n), qpeft.QLinearNF4) for n in ("gate_proj", "up_proj", "down_proj"))
    # on load == quantizing the dense model in place (bf16 weights, one expert at a time, byte for byte)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16)
    assert not any(is_nf4_experts(m) for m in reference.modules())
    qpeft.quantize_model(reference, compute_dtype=torch.float32)
    _assert_same_state(model.state_dict(), reference.state_dict())
    y = _logits(model)
    assert torch.equal(y, _logits(reference))
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert reloaded.config._experts_implementation == "qpeft"
    _assert_same_state(reloaded.state_dict(), model.state_dict())
    assert torch.equal(_logits(reloaded), y)


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_experts_take_at_most_027_of_their_bf16_bytes(family):
    """4 bits per weight + an 8-bit absmax code per 64 weights (4.125 bits) + per-expert tables; at width 256
    the tables no longer dominate as they do in the tiny models."""
    model = tiny_moe(family, width=256).to(torch.bfloat16)
    quantize_model_experts(model)
    for t in _experts(model):
        numel = t.module.quantized_numel()
        assert numel == sum(t.module.nf4_spec(p).shape[0] * t.module.nf4_spec(p).shape[1] * t.module.nf4_spec(p)
                            .shape[2] for p in t.param_names)
        assert t.module.memory_bytes() <= 0.27 * 2 * numel, (t.name, t.module.memory_bytes() / (2 * numel))


def test_in_place_quantize_model_records_its_config_and_reloads(tmp_path):
    """quantize_model on a model not loaded by from_pretrained: its experts become 4-bit, save_pretrained writes
    them fused (not split per expert by the model's reversed merge) with a config that reloads them."""
    model = tiny_moe("qwen3_moe")
    report = qpeft.quantize_model(model, skip_modules=("lm_head", "q_proj", "k_proj", "v_proj", "o_proj"),
                                  compute_dtype=torch.float32)
    experts = [n for n in report.converted if n.endswith("experts")]
    assert experts == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert model.config._experts_implementation == "qpeft"
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.gate_up_proj.quant_state.qpeft_experts__nf4" in keys
    assert not any(".experts.0." in k for k in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    _assert_same_state(reloaded.state_dict(), model.state_dict())
    assert type(reloaded.model.layers[0].self_attn.q_proj) is nn.Linear
    assert torch.equal(_logits(reloaded), _logits(model))


def test_modules_to_not_convert_keeps_experts_dense(tmp_path):
    _save_dense("qwen3_moe", tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=QPeftConfig(modules_to_not_convert=["layers.1.mlp.experts",
                                                                                   "lm_head"]))
    e0, e1 = model.model.layers[0].mlp.experts, model.model.layers[1].mlp.experts
    assert is_nf4_experts(e0) and not is_nf4_experts(e1)
    assert e1.gate_up_proj.dtype == torch.float32 and e1.gate_up_proj.shape == (4, 64, 64)
    y = _logits(model)  # the dense experts run through the "qpeft" implementation's dense fallback
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert not is_nf4_experts(reloaded.model.layers[1].mlp.experts)
    _assert_same_state(reloaded.state_dict(), model.state_dict())
    assert torch.equal(_logits(reloaded), y)


def test_dequantize_gives_back_dense_experts(tmp_path):
    _save_dense("mixtral", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=QPeftConfig(compute_dtype=torch.float32))
    w = model.model.layers[0].mlp.experts.dequantize_nf4("gate_up_proj", torch.float32)
    y = _logits(model)
    dense = model.dequantize()
    experts = dense.model.layers[0].mlp.experts
    assert not is_nf4_experts(experts) and type(experts).__name__ == "MixtralExperts"
    assert torch.equal(experts.gate_up_proj, w)
    torch.testing.assert_close(_logits(dense), y, rtol=1e-4, atol=1e-4)  # same weights, dense fp32 matmuls


def test_4bit_experts_refuse_another_experts_implementation():
    model = tiny_moe("olmoe")
    quantize_model_experts(model)
    model.set_experts_implementation("eager")
    with pytest.raises(RuntimeError, match=r"run only with experts_implementation='qpeft'.*set_experts_implementation"):
        _logits(model)


def test_a_checkpoint_whose_experts_disagree_with_the_config_raises_naming_them(tmp_path, caplog, capfd):
    _save_dense("qwen3_moe", tmp_path / "dense")
    AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=QPeftConfig()).save_pretrained(
        tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["moe_intermediate_size"] = 48  # the config now expects (4, 96, 64) gate_up stacks
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((ValueError, RuntimeError)) as info:
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    report = str(info.value) + caplog.text + ''.join(capfd.readouterr())  # each conversion's error is logged
    assert re.search(r"model\.layers\.\d\.mlp\.experts\.gate_up_proj: the checkpoint's experts have shape "
                     r"\(4, 64, 64\), the model's config expects \(4, 96, 64\)", report)


def test_a_dense_checkpoint_with_fewer_experts_than_the_config_raises(tmp_path, caplog, capfd):
    _save_dense("mixtral", tmp_path / "dense")
    cfg = json.loads((tmp_path / "dense" / "config.json").read_text())
    cfg["num_local_experts"] = 5
    (tmp_path / "dense" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((ValueError, RuntimeError)) as info:
        AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=QPeftConfig())
    report = str(info.value) + caplog.text + ''.join(capfd.readouterr())
    assert re.search(r"model\.layers\.\d\.mlp\.experts\.(gate_up|down)_proj: the checkpoint has", report)
    assert "the model's config expects 5 experts" in report


def test_a_non_finite_expert_leaves_the_model_as_it_was():
    model = tiny_moe("qwen3_moe")
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 3, 4] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.experts\.down_proj"):
        qpeft.quantize_model(model)
    assert not any(is_nf4_experts(m) for m in model.modules())
    assert not any(isinstance(m, qpeft.QLinearNF4) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True)


def test_an_expert_index_out_of_range_from_a_custom_router_raises():
    model = tiny_moe("qwen3_moe")
    quantize_model_experts(model)
    qpeft.models.moe.interface.register_experts_implementation()
    model.set_experts_implementation("qpeft")
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(5, 64)
    index = torch.tensor([[0, 1], [2, 3], [1, 4], [0, 2], [3, 1]])  # 4 is not an expert of 4
    with pytest.raises(ValueError, match=r"top_k_index"):
        experts(x, index, torch.full((5, 2), 0.5))


def test_quantize_on_load_quantizes_one_expert_slice_at_a_time(tmp_path, monkeypatch):
    """A per-expert checkpoint (Mixtral's experts.<e>.w1/w3/w2) is merged and quantized expert by expert: every
    quantization the experts' loader runs gets one expert's 2-D slice, E per parameter, never the 3-D stack."""
    from qpeft.integrations import transformers_moe

    seen = []
    real = transformers_moe.quantize_4bit

    def recording(w, *args, **kwargs):
        seen.append(tuple(w.shape))
        return real(w, *args, **kwargs)

    monkeypatch.setattr(transformers_moe, "quantize_4bit", recording)
    _save_dense("mixtral", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=QPeftConfig(compute_dtype=torch.float32))
    assert sorted(seen) == sorted([(64, 64)] * 4 * 2 + [(64, 32)] * 4 * 2)  # gate_up (2I, H), down (H, I); 2 layers
    reference = AutoModelForCausalLM.from_pretrained(tmp_path)
    qpeft.quantize_model(reference, compute_dtype=torch.float32)
    _assert_same_state(model.state_dict(), reference.state_dict())


def test_the_4bit_experts_module_compiles_fullgraph():
    """transformers' experts dispatcher -> the "qpeft" implementation -> the grouped NF4 ops, one graph."""
    model = tiny_moe("qwen3_moe")
    quantize_model_experts(model)
    qpeft.models.moe.interface.register_experts_implementation()
    model.set_experts_implementation("qpeft")
    experts = model.model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 64, generator=g)
    index = torch.tensor([[0, 1], [1, 0], [2, 1], [0, 2], [1, 2], [2, 0], [0, 1]])  # expert 3 gets no token
    weights = torch.rand(7, 2, generator=g)
    torch._dynamo.reset()
    compiled = torch.compile(experts, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, index, weights), experts(x, index, weights))


def test_fp4_experts_without_double_quant_round_trip(tmp_path):
    """QPeftConfig(quant_type="fp4", double_quant=False, blocksize=128): the experts follow the config as the
    linears do (fp32 absmax, no nested tables), equal quantize_model's bytes and reload byte for byte."""
    _save_dense("olmoe", tmp_path / "dense")
    config = QPeftConfig(quant_type="fp4", double_quant=False, blocksize=128, compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=config)
    w = model.model.layers[0].mlp.experts.nf4_weight("gate_up_proj")
    assert w.quant_type == "fp4" and not w.double_quant and w.blocksize == 128 and w.absmax.dtype == torch.float32
    keys = {k.split("experts.", 1)[1] for k in model.state_dict() if ".layers.0.mlp.experts.gate_up_proj" in k}
    assert keys == {"gate_up_proj", "gate_up_proj.absmax", "gate_up_proj.quant_map",
                    "gate_up_proj.quant_state.qpeft_experts__fp4"}
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    qpeft.quantize_model(reference, quant_type="fp4", double_quant=False, blocksize=128, compute_dtype=torch.float32)
    _assert_same_state(model.state_dict(), reference.state_dict())
    y = _logits(model)
    assert torch.equal(y, _logits(reference))
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    _assert_same_state(reloaded.state_dict(), model.state_dict())
    assert torch.equal(_logits(reloaded), y)


def test_expert_parallel_sentinel_ids_are_dropped():
    """transformers' expert parallelism routes a token slot whose expert lives on another rank to id num_experts
    (weight 0): on a module it marked `_is_expert_parallel` those slots contribute nothing, as in its own
    implementations; elsewhere the same id raises (test_an_expert_index_out_of_range...)."""
    model = tiny_moe("qwen3_moe")
    quantize_model_experts(model)
    qpeft.models.moe.interface.register_experts_implementation()
    model.set_experts_implementation("qpeft")
    experts = model.model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g)
    index = torch.tensor([[0, 4], [2, 3], [4, 4], [1, 2], [3, 4]])  # 4: on another rank
    weights = torch.rand(5, 2, generator=g)
    kept = index != 4
    want = experts(x, index.masked_fill(~kept, 0), weights * kept)  # the sentinel slots with weight 0
    experts._is_expert_parallel = True
    got = experts(x, index, weights)
    assert torch.equal(got, want) and got[2].abs().max() == 0  # token 2 had both slots elsewhere
