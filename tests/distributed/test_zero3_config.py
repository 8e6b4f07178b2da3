"""qpeft.distributed.zero3_config: the documented DeepSpeed ZeRO-3 config (no DeepSpeed needed to build it)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from qpeft.distributed import zero3_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "deepspeed_zero3.json"


def test_example_json_is_the_default_config():
    assert json.loads(EXAMPLE.read_text()) == zero3_config()


def test_zero3_config():
    cfg = zero3_config(micro_batch_size=2, dtype="bf16", gradient_clipping=0.0, param_persistence_threshold=0)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["zero_optimization"][
        "stage3_param_persistence_threshold"] == 0
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_clipping"] == 0.0
    with pytest.raises(ValueError, match="dtype must be one of"):
        zero3_config(dtype="float16")
    with pytest.raises(ValueError, match="micro_batch_size must be an int >= 1"):
        zero3_config(micro_batch_size=0)
    with pytest.raises(ValueError, match="gradient_clipping must be >= 0"):
        zero3_config(gradient_clipping=-1.0)
