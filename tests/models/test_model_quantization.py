"""quantize_model on Hugging Face models (tiny random Llama): layers converted, memory report, logits equal to the
model with dequantized dense weights, HF generate, and loading a checkpoint that transformers + bitsandbytes
quantized (BitsAndBytesConfig, on CPU) into a quantize_model-converted model with identical logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import qpeft
from qpeft.modules.qlinear_nf4 import QLinearNF4
from qpeft.models.quantization import load_quantized_checkpoint, quantize_model
from utils import tiny_llama

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _dense_twin(model):
    """A copy of `model` where every QLinearNF4 is an nn.Linear holding its dequantized fp32 weight."""
    import copy

    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, QLinearNF4):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantize(torch.float32))
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, lin)
    return twin


def test_quantize_model_converts_all_linears_but_lm_head():
    model = tiny_llama()
    report = quantize_model(model, compute_dtype=torch.float32)
    assert len(report.converted) == 2 * len(LLAMA_LINEARS) and report.skipped == ["lm_head"]
    assert isinstance(model.lm_head, nn.Linear)
    assert all(isinstance(model.get_submodule(n), QLinearNF4) for n in report.converted)
    assert report.bytes_after < report.bytes_before and report.bytes_saved > 0 and "MiB" in str(report)
    ids = torch.randint(3, 128, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _dense_twin(model)(ids).logits, rtol=1e-4, atol=1e-4)


def test_target_modules_list_and_regex():
    model = tiny_llama()
    report = quantize_model(model, target_modules=["q_proj", "v_proj"], blocksize=32, quant_type="fp4")
    assert sorted(n.rsplit(".", 1)[-1] for n in report.converted) == ["q_proj"] * 2 + ["v_proj"] * 2
    assert isinstance(model.model.layers[0].self_attn.k_proj, nn.Linear)
    assert model.model.layers[1].self_attn.v_proj.quant_type == "fp4"
    model = tiny_llama()
    report = quantize_model(model, target_modules=r".*layers\.1\.mlp\..*")
    assert len(report.converted) == 3
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        quantize_model(tiny_llama(), target_modules=["nope"])
    report = qpeft.quantize_model(tiny_llama(), target_modules=["o_proj"])  # the top-level API
    assert len(report.converted) == 2


def test_parameter_count_is_logical():
    model = tiny_llama()
    before = qpeft.trainable_parameters(model).total
    quantize_model(model)
    assert qpeft.trainable_parameters(model).total == before


def test_generate_after_quantize_model():
    model = tiny_llama()
    quantize_model(model, compute_dtype=torch.float32)
    ids = torch.randint(3, 128, (1, 6))
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    twin = _dense_twin(model).generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 12) and torch.equal(out, twin)
    bf16 = tiny_llama()
    quantize_model(bf16)  # default bf16 compute
    assert bf16.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 10)


@pytest.fixture(scope="module")
def bnb_checkpoint(tmp_path_factory):
    """A tiny Llama quantized by transformers + bitsandbytes (NF4, double quant) on CPU and saved."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("bnb_ckpt")
    # intermediate 128: K % 64 == 0 everywhere (bitsandbytes 0.50.2's CPU dequantize mis-places blocks
    # that span rows, so its outputs are no oracle there; our side handles it, see test_nf4_matmul.py)
    tiny_llama(intermediate_size=128).save_pretrained(root / "dense")
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(root / "dense", quantization_config=cfg, device_map="cpu",
                                                     dtype=torch.float32).eval()
    except Exception as e:  # transformers/bitsandbytes combination without CPU 4-bit support
        pytest.skip(f"transformers cannot quantize with bitsandbytes on CPU here: {e}")
    for m in model.modules():  # bnb's AVX512-bf16 repacking path is a different (bf16) computation
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    model.save_pretrained(root / "q")
    return model, root / "q"


def test_load_transformers_bitsandbytes_checkpoint(bnb_checkpoint):
    bnb_model, path = bnb_checkpoint
    model = tiny_llama(seed=1, intermediate_size=128)  # different random weights: all must come from the file
    quantize_model(model, compute_dtype=torch.float32, double_quant=False)  # the file's format wins
    load_quantized_checkpoint(model, path)
    layer = model.model.layers[1].mlp.down_proj
    assert layer.double_quant and layer.quant_type == "nf4"
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, bnb_model(ids).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=5, do_sample=False),
                       bnb_model.generate(ids[:1], max_new_tokens=5, do_sample=False))


def test_failed_checkpoint_load_leaves_model_unchanged(bnb_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = bnb_checkpoint
    model = tiny_llama(seed=1)  # intermediate 96: every MLP layer has the wrong shape
    quantize_model(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"gate_proj: .*quantized shape \(128, 64\) does not match .*\(96, 64\)"):
        load_quantized_checkpoint(model, path)
    sd = load_file(str(path / "model.safetensors"))
    del sd["model.norm.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    good = tiny_llama(seed=1, intermediate_size=128)
    quantize_model(good)
    good_before = {k: v.clone() for k, v in good.state_dict().items()}
    with pytest.raises(ValueError, match="missing key model.norm.weight"):
        load_quantized_checkpoint(good, tmp_path)
    for m, snap in ((model, before), (good, good_before)):
        after = m.state_dict()
        assert all(torch.equal(snap[k], after[k]) for k in snap)


def test_strict_load_refuses_a_checkpoint_bias_for_a_layer_without_one(tmp_path):
    """nn.Linear's rule: under strict=True a bias the layer does not have is an unexpected key (it used to be
    dropped silently: outputs then off by that bias); strict=False ignores it."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(64, 32, bias=True), nn.ReLU(), nn.Linear(32, 16, bias=False))
    with torch.no_grad():
        src[0].bias.normal_()  # far from zero: dropping it would change every output
    quantize_model(src, skip_modules=(), compute_dtype=torch.float32)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "model.safetensors"))
    torch.manual_seed(1)
    dst = nn.Sequential(nn.Linear(64, 32, bias=False), nn.ReLU(), nn.Linear(32, 16, bias=False))
    quantize_model(dst, skip_modules=(), compute_dtype=torch.float32)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ValueError, match=r"unexpected keys: \['0.bias'\]"):
        load_quantized_checkpoint(dst, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())  # nothing loaded
    load_quantized_checkpoint(dst, tmp_path, strict=False)  # ignored, as nn.Module.load_state_dict(strict=False)
    assert torch.equal(dst[0].weight, src[0].weight) and dst[0].bias is None


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_a_non_finite_weight_leaves_the_whole_model_as_it_was(family):
    """quantize_model converts in place: a NaN in the last linear (after every other linear and the MoE experts
    would have been converted) raises naming that layer and changes nothing, as a failed load must."""
    if family == "llama":
        model = tiny_llama()
    else:
        pytest.importorskip("transformers")
        from tiny_moe import tiny_moe

        model = tiny_moe(family)
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")][-1]
    with torch.no_grad():
        model.get_submodule(last).weight[1, 2] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=last.replace(".", r"\.") + ".*non-finite"):
        quantize_model(model, compute_dtype=torch.float32)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before if not before[k].isnan().any())
    assert all(torch.equal(after[k].isnan(), before[k].isnan()) for k in before)
