"""FSDP2 on a QLoRA MoE (issue 24): the 4-bit fused experts shard on the expert dimension like the linears, their
bytes are never cast, training equals the single-process run. gloo ranks spawned from pytest (fsdp2_moe_worker.py).
On torch < 2.12 shard_qlora_model refuses (test_fsdp2.py::test_fsdp2_refused_on_old_torch is that lane's test)."""
from __future__ import annotations

import math

import pytest

from qpeft.distributed.fsdp2 import FSDP2_MIN_TORCH, _torch_version

from .launch import spawn

pytest.importorskip("transformers")
pytest.importorskip("peft")

FSDP2_OK = _torch_version() >= FSDP2_MIN_TORCH


@pytest.mark.skipif(not FSDP2_OK, reason="torch < 2.12: test_fsdp2.py::test_fsdp2_refused_on_old_torch")
def test_fsdp2_qlora_moe_matches_single_process(tmp_path):
    r = spawn("fsdp2_moe_worker.py", 2, tmp_path, "train")
    # 2 layers x 2 experts parameters x (packed codes, absmax bytes), each rank holding ceil(E / 2) experts' rows
    assert r["experts_sharded"] == 8 and r["experts_shards_within_rows"]
    assert r["n_experts_lora"] == 8 and r["n_trainable"] == 16
    # two ranks: (g0 + g1) / 2 is exact in either order, so FSDP2 equals the single-process mean bit for bit
    assert r["loss_diff"] == [0.0] * len(r["loss_diff"]) and r["grad_diff"] == [0.0] * len(r["grad_diff"])
    assert r["param_diff"] == 0.0
    assert r["experts_bytes_unchanged"] and r["mp_bf16_experts_bytes_unchanged"]
    assert math.isfinite(r["mp_bf16_loss"])
    # the gathered state dict: the experts' on-disk format (qpeft.modules.nf4_experts), unsharded bytes
    assert r["sd_experts_equal"]
    # (under PEFT's two nested ParamWrappers: experts.base_layer.base_layer.<p>...)
    assert sorted(k.replace("base_layer.", "") for k in r["sd_experts_keys"]) == sorted(
        f"{p}{s}" for p in ("down_proj", "gate_up_proj")
        for s in ("", ".absmax", ".nested_absmax", ".nested_offset", ".nested_quant_map", ".quant_map",
                  ".quant_state.qpeft_experts__nf4"))
