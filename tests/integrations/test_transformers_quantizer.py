"""qpeft's transformers quantizer (quant_method "qpeft"): quantize on load from sharded safetensors, reloads of
what save_pretrained writes (also after an in-place quantize_model / prepare_for_qlora), bitsandbytes 4-bit
checkpoints both ways, and bad input. Tiny random Llama models on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import qpeft
from qpeft.modules.qlinear_nf4 import QLinearNF4
from utils import tiny_llama

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from qpeft.integrations.transformers import QPeftConfig, to_bitsandbytes_config  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _ids(seed=1):
    return torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(seed))


def _logits(model):
    with torch.no_grad():
        return model(_ids()).logits


def _save_dense(path, **kw):
    """A sharded fp32 checkpoint (one shard per few tensors), as from_pretrained meets large models."""
    model = tiny_llama(**kw)
    model.save_pretrained(path, max_shard_size="40KB")
    assert len(list(path.glob("model-*.safetensors"))) > 3
    return model


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys(), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _quantized_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, QLinearNF4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant_type, double_quant, blocksize", [("nf4", True, 64), ("fp4", False, 128)])
def test_quantize_on_load_equals_quantize_model(tmp_path, dtype, quant_type, double_quant, blocksize):
    _save_dense(tmp_path)
    config = QPeftConfig(quant_type=quant_type, double_quant=double_quant, blocksize=blocksize,
                         compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, dtype=dtype)
    assert _quantized_names(model) == sorted(f"model.layers.{i}.{'mlp' if n in MLP else 'self_attn'}.{n}"
                                             for i in range(2) for n in LINEARS)
    assert type(model.lm_head) is nn.Linear  # transformers' default skip: the output head
    assert model.is_quantized and model.config.quantization_config.quant_method == "qpeft"
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    qpeft.quantize_model(reference, quant_type=quant_type, double_quant=double_quant, blocksize=blocksize,
                         compute_dtype=torch.float32)
    _assert_same_state(model.state_dict(), reference.state_dict())
    assert torch.equal(_logits(model), _logits(reference))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad and layer.weight_dtype == dtype


def test_modules_to_not_convert(tmp_path):
    _save_dense(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=QPeftConfig(modules_to_not_convert=[*MLP, "lm_head"]))  # transformers: suffixes
    assert _quantized_names(model) == sorted(f"model.layers.{i}.self_attn.{n}" for i in range(2)
                                             for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear and type(model.lm_head) is nn.Linear


def test_save_pretrained_reloads_byte_for_byte_without_a_config(tmp_path):
    _save_dense(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=QPeftConfig())
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved == {"quant_method": "qpeft", "quant_type": "nf4", "blocksize": 64, "double_quant": True,
                     "compute_dtype": "bfloat16", "modules_to_not_convert": None}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert _quantized_names(reloaded) == _quantized_names(model)
    _assert_same_state(reloaded.state_dict(), model.state_dict())
    assert torch.equal(_logits(reloaded), _logits(model))
    reloaded.save_pretrained(tmp_path / "again")  # a pre-quantized load saves again (no conversion to reverse)
    _assert_same_state(AutoModelForCausalLM.from_pretrained(tmp_path / "again").state_dict(), model.state_dict())


def test_a_fresh_process_with_qpeft_imported_reloads_the_checkpoint(tmp_path):
    """`import qpeft` registers "qpeft" when transformers is imported later; without that transformers would
    load the checkpoint unquantized, with freshly initialised linear weights."""
    _save_dense(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=QPeftConfig())
    model.save_pretrained(tmp_path / "q")
    torch.save(_logits(model), tmp_path / "logits.pt")
    code = (f"import qpeft, torch, sys\nassert 'transformers' not in sys.modules\n"
            f"from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'q')!r})\n"
            f"up = m.model.layers[0].mlp.up_proj\n"
            f"assert type(up).__name__ == 'QLinearNF4', type(up)\n"
            f"ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(1))\n"
            f"with torch.no_grad(): y = m(ids).logits\n"
            f"assert torch.equal(y, torch.load({str(tmp_path / 'logits.pt')!r}, weights_only=True))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_passed_config_sets_the_compute_dtype_of_a_qpeft_checkpoint(tmp_path, recwarn):
    """One rule for pre-quantized checkpoints (bitsandbytes' above, load_sharded_qlora's): the checkpoint's format
    wins, the passed QPeftConfig sets the compute dtype (transformers alone would ignore it, with a warning)."""
    from qpeft.distributed.loading import _resolve_config

    _save_dense(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=QPeftConfig(
        quant_type="fp4", blocksize=128, double_quant=False, modules_to_not_convert=["lm_head", "down_proj"]))
    model.save_pretrained(tmp_path / "q")
    passed = QPeftConfig(compute_dtype=torch.float16)  # nf4, 64, double quant: the checkpoint's win
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization_config=passed)
    layers = [m for m in reloaded.modules() if isinstance(m, QLinearNF4)]
    assert layers and all(m.compute_dtype == torch.float16 for m in layers)
    assert not any("will be used" in str(w.message) for w in recwarn)  # transformers' "passed config ignored"
    cfg = reloaded.config.quantization_config
    assert (cfg.quant_type, cfg.blocksize, cfg.double_quant, cfg.compute_dtype) == ("fp4", 128, False, "float16")
    assert cfg.to_dict() == _resolve_config(model.config, passed)[0].to_dict()  # load_sharded_qlora's rule
    assert type(reloaded.model.layers[0].mlp.down_proj) is nn.Linear
    _assert_same_state(reloaded.state_dict(), model.state_dict())
    x = torch.randn(3, 64)
    ours, saved = reloaded.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        y_bf16 = saved(x)
        saved.compute_dtype = torch.float16
        assert torch.equal(ours(x), saved(x)) and not torch.equal(ours(x), y_bf16)
    # without a passed config the checkpoint's compute dtype stays
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert all(m.compute_dtype == torch.bfloat16 for m in again.modules() if isinstance(m, QLinearNF4))


@pytest.mark.parametrize("how", ["quantize_model", "prepare_for_qlora"])
def test_in_place_conversion_records_its_config_and_reloads(tmp_path, how):
    model = tiny_llama()
    if how == "quantize_model":
        qpeft.quantize_model(model, skip_modules=("lm_head", "down_proj"), compute_dtype=torch.float32)
    else:
        qpeft.prepare_for_qlora(model, r=4, compute_dtype=torch.float32)
    assert model.config.quantization_config.quant_method == "qpeft"
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    base = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    _assert_same_state(reloaded.state_dict(), base)
    assert _quantized_names(reloaded) == sorted(n.replace(".base_layer", "") for n in _quantized_names(model))
    if how == "quantize_model":
        assert type(reloaded.model.layers[0].mlp.down_proj) is nn.Linear
        assert torch.equal(_logits(reloaded), _logits(model))
    else:  # the adapter is not part of the base: with it disabled the outputs agree
        with qpeft.disable_lora(model):
            assert torch.equal(_logits(reloaded), _logits(model))


def _bnb_model(path, quant_type="nf4", double_quant=True):
    from transformers import BitsAndBytesConfig

    pytest.importorskip("bitsandbytes")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32)


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_bitsandbytes_checkpoint_loads_into_qpeft_layers_and_back(tmp_path, quant_type, double_quant):
    # intermediate 128: bitsandbytes 0.50.2's CPU kernels mis-place blocks that span rows (K % 64 != 0)
    _save_dense(tmp_path / "dense", intermediate_size=128)
    bnb_model = _bnb_model(tmp_path / "dense", quant_type, double_quant)
    bnb_model.save_pretrained(tmp_path / "bnb")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "bnb", quantization_config=QPeftConfig(
        compute_dtype=torch.float32))
    assert isinstance(ours.model.layers[0].self_attn.q_proj, QLinearNF4)
    assert ours.config.quantization_config.quant_type == quant_type
    assert ours.config.quantization_config.double_quant == double_quant
    _assert_same_state(ours.state_dict(), bnb_model.state_dict())
    # bitsandbytes' eval-mode CPU path repacks the weight for another kernel (0.0025 apart here); its training
    # path dequantizes and multiplies, as qpeft does: identical logits
    bnb_model.train()
    ours.train()
    assert torch.equal(_logits(ours), _logits(bnb_model))
    # the reverse: transformers picks the loader from config.json alone, so a qpeft checkpoint loads in
    # transformers + bitsandbytes once its quantization_config says bitsandbytes (the tensors already do)
    ours.save_pretrained(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    config["quantization_config"] = to_bitsandbytes_config(ours.config.quantization_config)
    (tmp_path / "ours" / "config.json").write_text(json.dumps(config))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)
    assert type(back.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    _assert_same_state(back.state_dict(), bnb_model.state_dict())


def test_qpeft_checkpoint_with_a_bitsandbytes_config_is_refused_by_transformers(tmp_path):
    """What transformers does not allow: a checkpoint whose config.json says qpeft with a BitsAndBytesConfig
    passed (it refuses configs of another class for a quantized checkpoint) - it raises, nothing loads."""
    from transformers import BitsAndBytesConfig

    _save_dense(tmp_path / "dense")
    AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=QPeftConfig()).save_pretrained(
        tmp_path / "q")
    with pytest.raises(ValueError, match="quantized with QPeftConfig but you are passing a BitsAndBytesConfig"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q", quantization_config=BitsAndBytesConfig(load_in_4bit=True))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(blocksize=48), ValueError, r"blocksize must be one of \(32, 64, .*\), got 48"),
    (dict(quant_type="int4"), ValueError, r"quant_type must be one of \('nf4', 'fp4'\), got 'int4'"),
    (dict(compute_dtype=torch.int8), ValueError, r"compute_dtype must be one of \['bfloat16', 'float16', 'float32'\]"),
    (dict(double_quant="yes"), ValueError, "double_quant must be True or False"),
    (dict(modules_to_not_convert="lm_head"), ValueError, "modules_to_not_convert must be None or a list"),
    (dict(load_in_4bit=True), TypeError, r"unexpected argument\(s\) \['load_in_4bit'\]"),
])
def test_bad_config_values_raise_naming_them(kwargs, error, match):
    with pytest.raises(error, match=match):
        QPeftConfig(**kwargs)


def test_config_round_trips_through_json():
    config = QPeftConfig(quant_type="fp4", blocksize=256, double_quant=False, compute_dtype="float16",
                         modules_to_not_convert=["lm_head", "mlp.down_proj"])
    again = QPeftConfig.from_dict(json.loads(config.to_json_string()))
    assert again.to_dict() == config.to_dict() and again.torch_compute_dtype == torch.float16


def test_architecture_without_linear_layers_raises(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel has no nn.Linear layer to quantize .*Conv1D"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=QPeftConfig())


def test_checkpoint_whose_header_disagrees_raises_naming_the_layer(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    _save_dense(tmp_path / "dense")
    AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=QPeftConfig()).save_pretrained(
        tmp_path / "q")
    shard = tmp_path / "q" / "model.safetensors"
    tensors = load_file(str(shard))
    key = "model.layers.1.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    header = json.loads(bytes(tensors[key].tolist()))
    header["shape"] = [header["shape"][0] + 1, header["shape"][1]]  # a header for another layer shape
    tensors[key] = torch.tensor(list(json.dumps(header).encode()), dtype=torch.uint8)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises((ValueError, RuntimeError)) as info:
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    report = str(info.value) + caplog.text
    # 6208 = 97 x 64 weights by the header: the layer's 96 absmax codes cannot be its statistics
    assert "model.layers.1.mlp.up_proj: QuantState: absmax must be torch.uint8 with ceil(6208/64) = 97" in report


def test_disk_offload_is_refused(tmp_path):
    _save_dense(tmp_path)
    with pytest.raises(ValueError, match="entries on 'disk' are not supported"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=QPeftConfig(),
                                             device_map={"model": "cpu", "lm_head": "disk"})


def test_dequantize_gives_back_dense_linear_layers(tmp_path):
    _save_dense(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=QPeftConfig(compute_dtype=torch.float32))
    y = _logits(model)
    dense = model.dequantize()
    assert not _quantized_names(dense) and type(dense.model.layers[0].mlp.up_proj) is nn.Linear
    torch.testing.assert_close(_logits(dense), y, rtol=1e-5, atol=1e-5)  # same weights, dense fp32 matmul


def test_device_map_auto_sizes_the_4bit_layers_and_loads_the_same_bytes(tmp_path):
    """device_map="auto" runs accelerate's size estimate through param_element_size (called with sub-modules and
    relative names); on a CPU-only machine the map is the CPU and the bytes equal the default load's."""
    _save_dense(tmp_path)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=QPeftConfig(), device_map="auto")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=QPeftConfig())
    _assert_same_state(auto.state_dict(), plain.state_dict())
    from qpeft.integrations.transformers import QPeftHfQuantizer

    quantizer = auto.hf_quantizer
    assert isinstance(quantizer, QPeftHfQuantizer)
    layer = auto.model.layers[0].self_attn.q_proj
    # 4 bits per weight plus one 8-bit absmax code per 64 weights (double quant)
    assert quantizer.param_element_size(auto.model, "layers.0.self_attn.q_proj.weight", layer.weight) == 0.5 + 1 / 64
    assert quantizer.param_element_size(auto, "lm_head.weight", auto.lm_head.weight) == 4
