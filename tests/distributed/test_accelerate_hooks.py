"""One-process checks of what qpeft adds for accelerate's launchers (the launches themselves are in
test_accelerate_launch.py): QPeftLoraLinear registering its 4-bit base as ZeRO-3 external parameters once the
engine has partitioned them, and the FSDP2 auto-wrap policy qpeft substitutes for PEFT's."""
from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

import qpeft

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from qpeft.integrations.peft import QPeftLoraLinear  # noqa: E402


def _peft_model():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from utils import tiny_llama

    model = tiny_llama(0)
    qpeft.quantize_model(model, compute_dtype=None)
    return peft.get_peft_model(model, qpeft.lora_config(model=model, r=4, target_modules="all-linear"))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_zero3_base_parameters_are_registered_once_partitioned():
    pm = _peft_model()
    layers = [m for m in pm.modules() if isinstance(m, QPeftLoraLinear)]
    ids = torch.arange(3, 11).reshape(1, -1)
    y0 = pm(input_ids=ids).logits
    # no engine: nothing carries ds_id, nothing is registered
    assert not any(hasattr(m, "_external_params") for m in layers)
    layer = layers[0]
    base_params = list(layer.get_base_layer().parameters(recurse=False))
    for i, p in enumerate(base_params):
        p.ds_id = i  # what deepspeed.initialize sets when ZeRO-3 partitions a Parameter
    y1 = pm(input_ids=ids).logits
    assert torch.equal(y0, y1)
    # the first forward after partitioning registered exactly the base's own Parameters (weight, absmax_bytes)
    registered = dict(layer._external_params)
    assert sorted(registered) == sorted(id(p) for p in base_params) and len(registered) == 2
    assert all(registered[id(p)] is p for p in base_params) and layer._zero3_registered
    assert not any(hasattr(m, "_external_params") for m in layers[1:])
    pm(input_ids=ids)
    assert dict(layer._external_params) == registered  # once


def test_fsdp2_wrap_policy_replaces_only_what_accelerate_cannot_use():
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy

    from qpeft.integrations.accelerate import _wrap_policy_for_qpeft, has_qpeft_layers

    pm = _peft_model()
    assert has_qpeft_layers(pm)

    class Plugin:
        auto_wrap_policy = None

    plugin = Plugin()
    # what Trainer sets for every PEFT model (update_fsdp_plugin_peft): an FSDP1 _or_policy partial, which
    # accelerate's FSDP2 path ignores (no decoder layer would get its own group)
    plugin.auto_wrap_policy = fsdp_auto_wrap_policy(pm)
    assert _wrap_policy_for_qpeft(plugin) is transformer_auto_wrap_policy
    for kept in (None, "transformer_based_wrap", transformer_auto_wrap_policy,
                 functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={torch.nn.Linear}),
                 functools.partial(size_based_auto_wrap_policy, min_num_params=10)):
        plugin.auto_wrap_policy = kept
        assert _wrap_policy_for_qpeft(plugin) is kept


def test_install_wraps_once_and_only_under_accelerates_fsdp_environment(monkeypatch):
    pytest.importorskip("accelerate")
    import accelerate.accelerator as acc
    from transformers import Trainer

    from qpeft.integrations import accelerate as hooks

    monkeypatch.setattr(acc, "fsdp2_prepare_model", acc.fsdp2_prepare_model)
    monkeypatch.setattr(Trainer, "save_model", Trainer.save_model)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not hooks.fsdp_requested()
    _peft_model()  # building QPeftLoraLinear layers outside an FSDP launch installs nothing
    assert not getattr(acc.fsdp2_prepare_model, "_qpeft", False) and not getattr(Trainer.save_model, "_qpeft", False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    _peft_model()
    first = acc.fsdp2_prepare_model, Trainer.save_model
    assert all(getattr(f, "_qpeft", False) for f in first)
    hooks.install()
    assert (acc.fsdp2_prepare_model, Trainer.save_model) == first


def test_fsdp2_prepare_of_a_qpeft_model_on_old_torch_raises_naming_the_versions(monkeypatch):
    """torch 2.11's fully_shard cannot shard the uint8 storage: under accelerate the wrapper refuses first, with
    qpeft's error (the same check as shard_qlora_model), and never reaches accelerate's preparation."""
    from qpeft import _versions as fsdp2  # the FSDP2 version check lives in qpeft._versions
    from qpeft.integrations.accelerate import _patched

    called = []
    prepare = _patched(lambda accelerator, model: called.append(model))

    class Plugin:
        cpu_ram_efficient_loading, auto_wrap_policy = True, None

    class Accelerator:
        class state:
            fsdp_plugin = Plugin()

    monkeypatch.setattr(fsdp2, "_torch_version", lambda: (2, 11))
    with pytest.raises(fsdp2.FSDP2UnsupportedError, match=r"needs torch>=2\.12"):
        prepare(Accelerator(), _peft_model())
    assert not called and Plugin.cpu_ram_efficient_loading is True
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))  # no qpeft layer: accelerate's own path, untouched
    prepare(Accelerator(), plain)
    assert called == [plain]


def _two_adapter_model():
    """A PEFT model with qpeft layers and two adapters with distinct random values: the trainable policy
    ("default") and a frozen second adapter, as TRL's DPOTrainer(ref_adapter_name="reference") has."""
    pm = _peft_model()
    pm.add_adapter("reference", qpeft.lora_config(model=pm.get_base_model(), r=4, target_modules="all-linear"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
                p.requires_grad_(".default." in n)
    return pm


def _fsdp_save_model(pm, out, monkeypatch):
    """The patched Trainer.save_model on a real Trainer, its FSDP state set as accelerate sets it
    (SHARDED_STATE_DICT)."""
    import types

    from transformers import Trainer, TrainingArguments

    from qpeft.integrations.accelerate import _patched_save_model

    trainer = Trainer(model=pm, args=TrainingArguments(output_dir=str(out), use_cpu=True, report_to=[]))
    plugin = types.SimpleNamespace(state_dict_type="StateDictType.SHARDED_STATE_DICT")
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
    monkeypatch.setattr(trainer, "accelerator", types.SimpleNamespace(
        state=types.SimpleNamespace(fsdp_plugin=plugin), wait_for_everyone=lambda: None))
    _patched_save_model(Trainer.save_model)(trainer, str(out))


def _expected_files(pm, out) -> dict:
    """What PEFT writes for every adapter without FSDP: {adapter: {key: tensor}}."""
    from safetensors.torch import load_file

    pm.save_pretrained(str(out))
    return {name: load_file(str(out / ("" if name == "default" else name) / "adapter_model.safetensors"))
            for name in ("default", "reference")}


def _check_saved(out, expected) -> None:
    from safetensors.torch import load_file

    for name, want in expected.items():
        got = load_file(str(out / ("" if name == "default" else name) / "adapter_model.safetensors"))
        assert sorted(got) == sorted(want) and len(got) == 28, name
        assert all(torch.equal(got[k], want[k]) for k in want), name
    # the two adapters hold different values (so the check above tells them apart)
    assert not any(torch.equal(expected["default"][k], expected["reference"][k]) for k in expected["default"])


def test_fsdp_save_model_writes_every_adapter_with_its_own_tensors(tmp_path, monkeypatch):
    """Trainer.save_model under FSDP (SHARDED_STATE_DICT) with a frozen second adapter: reference/ must hold the
    reference adapter's tensors, not the policy's (PEFT's fallback when the state dict lacks an adapter's keys)."""
    pm = _two_adapter_model()
    expected = _expected_files(pm, tmp_path / "plain")
    _fsdp_save_model(pm, tmp_path / "fsdp", monkeypatch)
    _check_saved(tmp_path / "fsdp", expected)


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 12),
                    reason="FSDP2 shards uint8 Parameters from torch 2.12 (test_fsdp2.py tests the refusal)")
def test_fsdp_save_model_gathers_every_adapter_from_fsdp2_shards(tmp_path, monkeypatch):
    """The same with the model sharded by FSDP2 (one gloo rank: every adapter tensor is a DTensor, the frozen
    ones too, and is gathered with full_tensor())."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from qpeft.distributed import shard_qlora_model

    from .launch import free_port

    pm = _two_adapter_model()
    expected = _expected_files(pm, tmp_path / "plain")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        shard_qlora_model(pm)
        assert all(isinstance(p, DTensor) for n, p in pm.named_parameters() if ".lora_" in n)
        _fsdp_save_model(pm, tmp_path / "fsdp", monkeypatch)
    finally:
        dist.destroy_process_group()
    _check_saved(tmp_path / "fsdp", expected)
