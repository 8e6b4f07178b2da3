"""qpeft.tuners.lora.options: the one rule for LoRA options on every load/build path, without PEFT and against PEFT."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from qpeft.tuners.lora.options import (
    LORA_VARIANTS,
    SUPPORTED_INITS,
    SUPPORTED_VARIANTS,
    UNSUPPORTED,
    lora_variant_fields,
    unsupported_option,
)


def test_imports_neither_peft_nor_transformers():
    code = ("import sys, qpeft.tuners.lora.options as o; "
            "assert o.unsupported_option({'alora_invocation_tokens': [3]}) is not None; "
            "assert not any(m.split('.')[0] in ('peft', 'transformers') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", sorted(set(LORA_VARIANTS) - set(SUPPORTED_VARIANTS)))
def test_every_variant_refused_in_a_config_dict(name):
    reason = unsupported_option({"peft_type": "LORA", "r": 4, name: {"on": 1} if name.endswith("config") else [3]})
    assert reason is not None and f"LoraConfig({name}=" in reason


@pytest.mark.parametrize("config", [
    {},  # PEFT's defaults
    {"r": 8, "lora_alpha": 16, "init_lora_weights": "gaussian", "use_dora": False, "alora_invocation_tokens": None,
     "megatron_config": None, "use_rslora": True, "target_modules": ["q_proj"]},
    {"alora_invocation_tokens": [], "velora_config": {}},  # falsy: off, as PEFT's resolve_lora_variant reads them
    {"use_dora": True}, {"lora_bias": True},  # DoRA and lora_bias: implemented by both layers
    {"init_lora_weights": "pissa"}, {"init_lora_weights": "pissa_niter_16"}, {"init_lora_weights": "olora"},
    {"init_lora_weights": "corda"}, {"init_lora_weights": "eva"},
    {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": 2}},
])
def test_plain_lora_configs_pass(config):
    assert unsupported_option(config) is None


@pytest.mark.parametrize("config, name", [
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"use_qalora": True}, "use_qalora"), ({"init_lora_weights": "orthogonal"}, "init_lora_weights"),
    ({"init_lora_weights": "pissa_niter_0"}, "init_lora_weights"),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 2}}, "loftq_config"),
    ({"init_lora_weights": "mica"}, "init_lora_weights")])
def test_unsupported_options_named(config, name):
    assert f"LoraConfig({name}=" in unsupported_option(config)


def test_lists_agree_with_the_installed_peft():
    """qpeft's own lists (used without PEFT) are PEFT's: every is_lora_variant field of peft.LoraConfig, each with
    PEFT's default as the off value; every UNSUPPORTED option a LoraConfig field whose default is the off value."""
    peft = pytest.importorskip("peft")
    fields = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
    variants = {n for n, f in fields.items() if f.metadata.get("is_lora_variant")}
    assert variants == set(LORA_VARIANTS), f"PEFT {peft.__version__}'s LoRA variants differ from LORA_VARIANTS"
    for name, off in {**LORA_VARIANTS, **UNSUPPORTED}.items():
        assert fields[name].default == off and not off, name
    assert fields["init_lora_weights"].default in SUPPORTED_INITS
    # a LoraConfig object and a dict of the same options: the same answer (the dataclass is consulted too)
    assert lora_variant_fields(peft.LoraConfig()) == list(LORA_VARIANTS)
    config = peft.LoraConfig(alora_invocation_tokens=[5, 6])
    assert unsupported_option(config) == unsupported_option(config.to_dict()) is not None
