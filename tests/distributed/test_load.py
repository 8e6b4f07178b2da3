"""Loading straight into FSDP2 shards (qpeft.distributed.load_sharded_qlora) and resuming a sharded model
(load_full_state_dict), on gloo ranks spawned from pytest (tests/distributed/load_worker.py). On torch < 2.12
the loader refuses with the version error (it shards with FSDP2)."""
from __future__ import annotations

import re

import pytest
import torch

from qpeft.distributed import FSDP2_MIN_TORCH
from qpeft.distributed.fsdp2 import FSDP2UnsupportedError, _torch_version

from .launch import spawn

pytest.importorskip("transformers")

FSDP2_OK = _torch_version() >= FSDP2_MIN_TORCH
needs_fsdp2 = pytest.mark.skipif(not FSDP2_OK, reason="torch < 2.12: test_loader_refused_on_old_torch is this "
                                                      "lane's test")


@needs_fsdp2
@pytest.mark.parametrize("world_size", [2, 3])
def test_load_sharded_matches_from_pretrained(tmp_path, world_size):
    r = spawn("load_worker.py", world_size, tmp_path, "load")
    assert r["world_size"] == world_size
    expect = {"nf4_dq_fp32": (["nf4"], [True], ["torch.float32"], False),
              "fp4_bf16_tied": (["fp4"], [False], ["torch.bfloat16"], True),
              "prequantized": (["nf4"], [True], ["torch.float32"], False)}
    assert sorted(r["variants"]) == sorted(expect)
    for name, v in r["variants"].items():
        quant_types, dq, dtypes, tied = expect[name]
        # the gathered state dict is from_pretrained's byte for byte (28 quantized linears of 4 layers), and
        # so are the rotary buffers and the logits
        assert v["keys_equal"] and v["bytes_equal"], name
        assert v["n_quantized"] == 28 and v["n_keys"] > 100, name
        assert (v["quant_types"], v["double_quant"], v["weight_dtypes"]) == (quant_types, dq, dtypes), name
        assert v["buffers_equal"] and v["n_inv_freq"] == 2 and v["logits_equal"], name
        assert v["tied"] == v["ref_tied"] == tied, name
        # memory: only rank 0 opens the checkpoint; every rank receives the units one at a time, the largest
        # being the largest unit's full tensors (+ <= 15 alignment bytes per tensor), all of them once
        assert v["opened_per_rank"] == [1] + [0] * (world_size - 1), name
        assert v["loader_read_per_rank"] == [1] + [0] * (world_size - 1), name
        assert v["units"] == 5  # 4 decoder layers + the rest
        slack = 15 * v["largest_unit_tensors"]
        assert all(v["largest_unit"] <= b <= v["largest_unit"] + slack for b in v["max_unit_bytes_per_rank"]), name
        assert v["largest_unit"] < v["total_bytes"] / 2, name  # so "one unit at a time" is a real bound
        assert v["total_bytes"] <= v["received_bytes"] <= v["total_bytes"] + 15 * v["n_keys"], name
        # per-rank storage of the 4-bit base: 1/world_size + one row per Parameter
        assert v["local_bytes"] <= v["full_bytes"] / world_size + v["row_bytes_sum"], name
        assert v["full_bytes"] <= v["sum_local_bytes"] <= v["full_bytes"] + world_size * v["row_bytes_sum"], name
    e = r["errors"]
    assert e["path"].startswith("ValueError") and "pretrained_model_name_or_path" in e["path"]
    assert e["quantization_config"].startswith("TypeError") and "quantization_config" in e["quantization_config"]
    assert e["torch_dtype"].startswith("ValueError") and "torch_dtype" in e["torch_dtype"]
    assert e["lora"].startswith("TypeError") and "lora must be" in e["lora"]
    assert "not both" in e["lora_and_adapter"]
    # a corrupt checkpoint: the same error on every rank (no rank goes on with a half-loaded model)
    msg = "size mismatch for model.layers.2.mlp.up_proj.weight: checkpoint (96, 32), model (96, 64)"
    assert e["corrupt_per_rank"] == [msg] * world_size


@needs_fsdp2
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_training_and_resume(tmp_path, world_size):
    r = spawn("load_worker.py", world_size, tmp_path, "train")
    assert r["world_size"] == world_size and r["n_lora"] == 56
    # LoRA values: rank 0's fresh init after torch.manual_seed(7) is add_lora's after the same seed; the
    # adapter file loads exactly
    assert r["fresh_init_equal"] and r["adapter_init_equal"]
    if world_size == 2:
        # two ranks: (g0 + g1) / 2 is exact in either order, so training is bit-exact (as test_fsdp2)
        assert r["loss_diff"] == [0.0] * 3 and r["param_diff"] == 0.0
    else:
        # three ranks: gloo sums three gradients in another order than the reference (test_fsdp2's bound:
        # step 0 exact, later steps within 1e-5 = 1e-3 of one AdamW step at lr 1e-2)
        assert r["loss_diff"][0] == 0.0 and max(r["loss_diff"]) <= 1e-5 and r["param_diff"] <= 1e-5
    # resume from the step-2 full state dicts (safetensors) into a fresh sharded model: step 3 bit-identical
    assert r["resume_loss_equal"] and r["resume_params_equal"] and r["resume_base_equal"]
    assert r["resume_steps"] == [3]
    assert r["adapter_resume_equal"]
    assert r["strict_error"] is not None and "unexpected ['model.nope']" in r["strict_error"]
    assert r["strict_unchanged"]
    assert r["late_error"] is not None and "size or dtype mismatch" in r["late_error"] and \
        "nothing was loaded" in r["late_error"]
    assert r["late_unchanged"]
    assert r["partial_lora_equal"] and r["partial_base_kept"]  # strict=False: only the given tensors change


@pytest.mark.skipif(FSDP2_OK, reason="torch >= 2.12 loads (test_load_sharded_matches_from_pretrained)")
def test_loader_refused_on_old_torch(tmp_path):
    from qpeft.distributed import load_sharded_qlora

    with pytest.raises(FSDP2UnsupportedError, match=re.escape(f"torch {torch.__version__} is installed")):
        load_sharded_qlora(tmp_path)


@needs_fsdp2
def test_shard_refuses_a_half_meta_model():
    import torch.distributed as dist

    from qpeft.distributed import shard_qlora_model

    from .launch import free_port
    from utils import tiny_llama

    import qpeft

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = qpeft.prepare_for_qlora(tiny_llama(), r=4, compute_dtype=torch.float32)
        model.model.norm.weight = torch.nn.Parameter(torch.empty(64, device="meta"))
        with pytest.raises(ValueError, match="some parameters are on the meta device and some are not"):
            shard_qlora_model(model)
    finally:
        dist.destroy_process_group()


@needs_fsdp2
def test_every_failure_reaches_every_rank(tmp_path):
    """Not only rank 0's ShardedLoadError checks: a directory without weights (FileNotFoundError on rank 0), a
    checkpoint missing on rank 1's file system, a read error on rank 0 and a failure on rank 1 in the middle of
    loading each raise the same exception on every rank, and the ranks stay in step (a load afterwards works)."""
    r = spawn("load_worker.py", 2, tmp_path, "errors")
    e = r["errors"]
    for name, msgs in e.items():
        if name.startswith("then_"):
            continue
        assert msgs[0] is not None and msgs == [msgs[0]] * 2, (name, msgs)
    assert e["no_weights"][0].startswith("FileNotFoundError: no model.safetensors or model.safetensors.index.json")
    assert "[failed on rank 0 of 2; every rank raises this error]" in e["no_weights"][0]
    assert e["path_on_rank0_only"][0].startswith("ValueError: load_sharded_qlora: pretrained_model_name_or_path")
    assert "[failed on rank 1 of 2; every rank raises this error]" in e["path_on_rank0_only"][0]
    assert e["read_error"][0].startswith("OSError: [Errno 5] Input/output error [failed on rank 0 of 2")
    assert e["copy_error_rank1"][0].startswith("MemoryError: out of memory [failed on rank 1 of 2")
    assert e["then_loads_units"] == 5 and e["then_n_quantized"] == 28
