"""PEFT interop of prompt tuning, P-tuning and prefix tuning: qpeft save_adapter -> peft.PeftModel.from_pretrained
gives identical outputs (and generations), a PEFT-saved adapter loads into qpeft with identical outputs, and a
failed load leaves the model as it was."""
from __future__ import annotations

import json

import pytest
import torch

import qpeft
from qpeft.tuners.adapter_io import load_adapter, save_adapter
from qpeft.tuners.p_tuning import add_p_tuning
from qpeft.tuners.prefix_tuning import add_prefix_tuning
from qpeft.tuners.prompt_tuning import PromptLearningModel, add_prompt_tuning, load_prompt_adapter
from utils import assert_generate_matches_peft, tiny_bert, tiny_llama

peft = pytest.importorskip("peft")

QPEFT_ADDERS = {
    "PROMPT_TUNING": lambda m: add_prompt_tuning(m, 4, init="vocab"),
    "P_TUNING": lambda m: add_p_tuning(m, 5, encoder="lstm", encoder_hidden_size=16),
    "PREFIX_TUNING": lambda m: add_prefix_tuning(m, 3, projection=True, encoder_hidden_size=24),
}


def _peft_config(peft_type, task_type):
    if peft_type == "PROMPT_TUNING":
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=4)
    if peft_type == "P_TUNING":
        return peft.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=5, encoder_hidden_size=16)
    return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=3, prefix_projection=True,
                                   encoder_hidden_size=24)


def _batch():
    ids = torch.randint(3, 128, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    return ids, mask


def _out(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if "logits" in out else out.last_hidden_state


MODELS = [(tiny_llama, "CAUSAL_LM"), (tiny_bert, "FEATURE_EXTRACTION")]


@pytest.mark.parametrize("peft_type", list(QPEFT_ADDERS))
@pytest.mark.parametrize("make,task_type", MODELS)
def test_qpeft_saved_loads_in_peft(tmp_path, make, task_type, peft_type):
    ids, mask = _batch()
    model = QPEFT_ADDERS[peft_type](make())
    out = _out(model, ids, mask)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == peft_type and cfg["task_type"] == task_type and cfg["inference_mode"] is True
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert list(tensors) == ["prompt_embeddings"]
    n = model.prompt_encoders["default"].num_virtual_tokens
    width = 2 * 2 * 2 * 16 if (peft_type == "PREFIX_TUNING" and make is tiny_llama) else \
        (2 * 2 * 64 if peft_type == "PREFIX_TUNING" else 64)  # prefix: L * 2 * kv_heads * head_dim
    assert tensors["prompt_embeddings"].shape == (n, width)
    pm = peft.PeftModel.from_pretrained(make(), str(tmp_path))
    assert torch.equal(_out(pm, ids, mask), out)
    if make is tiny_llama:
        ids1 = ids[:1]
        ours = model.generate(input_ids=ids1, max_new_tokens=5, do_sample=False)
        assert_generate_matches_peft(ours, pm, ids1, 5)


@pytest.mark.parametrize("peft_type", list(QPEFT_ADDERS))
@pytest.mark.parametrize("make,task_type", MODELS)
def test_peft_saved_loads_in_qpeft(tmp_path, make, task_type, peft_type):
    ids, mask = _batch()
    pm = peft.get_peft_model(make(), _peft_config(peft_type, task_type))
    pm.eval()
    ref = _out(pm, ids, mask)
    pm.save_pretrained(str(tmp_path))
    model = load_prompt_adapter(make(), tmp_path)
    assert isinstance(model, PromptLearningModel)
    torch.testing.assert_close(_out(model, ids, mask), ref, rtol=1e-6, atol=1e-6)  # PEFT recomputes its MLP
    reloaded = peft.PeftModel.from_pretrained(make(), str(tmp_path))  # PEFT's own reload: the same tensor
    assert torch.equal(_out(model, ids, mask), _out(reloaded, ids, mask))
    # saving the loaded adapter again writes the same tensor and config
    save_adapter(model, tmp_path / "again")
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"]
    b = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.equal(a, b)
    cfg = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == peft_type and cfg["num_virtual_tokens"] == pm.peft_config["default"].num_virtual_tokens


def test_named_adapter_subfolder_and_top_level_api(tmp_path):
    ids, mask = _batch()
    model = add_prompt_tuning(tiny_llama(), 3, adapter_name="task")
    qpeft.save_adapter(model, tmp_path, adapter_name="task")
    assert (tmp_path / "task" / "adapter_model.safetensors").is_file()
    wrapped = PromptLearningModel(tiny_llama())
    qpeft.load_adapter(wrapped, tmp_path / "task", adapter_name="task")
    assert torch.equal(_out(wrapped, ids, mask), _out(model, ids, mask))


def test_failed_load_leaves_model_unchanged(tmp_path):
    model = add_prefix_tuning(tiny_llama(), 3)
    save_adapter(model, tmp_path)
    other = tiny_llama(layers=3)  # wrong number of layers for this prefix
    with pytest.raises(ValueError, match="num_layers=2"):
        load_prompt_adapter(other, tmp_path)
    assert all(p.requires_grad for p in other.parameters())
    wrapped = add_prompt_tuning(tiny_llama(layers=3), 2)
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    with pytest.raises(ValueError, match="prompt_embeddings has shape|num_layers"):
        load_adapter(wrapped, tmp_path, adapter_name="second")
    assert list(wrapped.prompt_encoders) == ["default"] and wrapped.active_adapter == "default"
    assert all(torch.equal(before[k], v) for k, v in wrapped.state_dict().items())
    with pytest.raises(ValueError, match="need a prompt-learning wrapper"):
        load_adapter(tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match="already exists"):
        load_adapter(wrapped, tmp_path, adapter_name="default")
    # non-finite values are refused before anything changes
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((tmp_path / "adapter_config.json").read_text())
    save_file({"prompt_embeddings": torch.full((3, 2 * 2 * 2 * 16), float("nan"))},
              str(bad / "adapter_model.safetensors"))
    plain = PromptLearningModel(tiny_llama())
    with pytest.raises(ValueError, match="non-finite"):
        load_adapter(plain, bad)
    assert len(plain.prompt_encoders) == 0
