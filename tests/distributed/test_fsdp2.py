"""FSDP2 (torch.distributed.fsdp.fully_shard) on gloo ranks spawned from pytest: training equality with a
single-process run, per-rank storage of the 4-bit base, the gathered state dict (bitsandbytes' keys and bytes,
loads into Linear4bit), save_adapter from the sharded model (PEFT loads it), bf16 / fp16 mixed precision.
On torch < 2.12 (whose fully_shard cannot shard uint8 Parameters) the same spawn checks the refusal instead."""
from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from qpeft.distributed import FSDP2_MIN_TORCH, check_fsdp2_supported, shard_qlora_model
from qpeft.distributed.fsdp2 import FSDP2UnsupportedError, _torch_version, decoder_layers

from .launch import free_port, spawn

pytest.importorskip("transformers")
from utils import tiny_llama  # noqa: E402

FSDP2_OK = _torch_version() >= FSDP2_MIN_TORCH


@pytest.mark.skipif(not FSDP2_OK, reason="torch < 2.12: test_fsdp2_refused_on_old_torch is this lane's test")
@pytest.mark.parametrize("world_size", [2, 3])
def test_fsdp2_qlora_matches_single_process(tmp_path, world_size):
    r = spawn("fsdp2_worker.py", world_size, tmp_path, "train")
    assert r["world_size"] == world_size
    # per-rank storage of the 4-bit base: 1/world_size of the whole plus at most one row per Parameter
    assert r["local_bytes"] <= r["full_bytes"] / world_size + r["row_bytes_sum"]
    assert r["full_bytes"] <= r["sum_local_bytes"] <= r["full_bytes"] + world_size * r["row_bytes_sum"]
    assert r["forward_checks"] == 14 * 3  # 14 LoRA layers saw the gathered bytes in each of 3 steps
    assert r["bytes_unchanged"]
    # bit-exact against the single-process run with FSDP2's reduction emulated (fsdp2_worker.ring_average):
    # losses and gradients at every step, parameters, gathered state dict and adapter after 3 steps
    assert r["emu_loss_diff"] == [0.0] * 3 and r["emu_grad_diff"] == [0.0] * 3
    assert r["emu_param_diff"] == 0.0 and r["emu_sd_lora_diff"] == 0.0 and r["emu_adapter_diff"] == 0.0
    if world_size == 2:
        # two ranks: (g0 + g1) / 2 is exact in either order, so the emulation is the plain mean: bit-exact
        assert r["loss_diff"] == [0.0] * 3 and r["grad_diff"] == [0.0] * 3
        assert r["param_diff"] == 0.0 and r["sd_lora_diff"] == 0.0 and r["adapter_diff"] == 0.0
    else:
        # three ranks: FSDP2 reduce-scatters with ReduceOp.AVG (fp32); gloo's ring gives rank k's rows the sum
        # (g_{k+1} + g_{k+2}) + g_k, then / 3, where the reference sums (g0 + g1) + g2: rank 2's rows are
        # exact, ranks 0's and 1's differ by the rounding of a reassociated 3-term sum. Step 0 (identical
        # parameters): exact loss, gradients within that reordering bound (4 * 2^-24 * sum|g_i| / 3 per element,
        # checked in the worker: grad_excess <= 0). Later steps start from parameters that differ by ulps: 1e-5
        # is 1e-3 of one AdamW step (lr 1e-2), far below what a missing or doubled rank would change (the size
        # of a step).
        assert r["loss_diff"][0] == 0.0 and r["grad_excess"][0] <= 0.0
        assert max(r["loss_diff"]) <= 1e-5 and max(r["grad_diff"]) <= 1e-5
        assert r["param_diff"] <= 1e-5 and r["sd_lora_diff"] <= 1e-5 and r["adapter_diff"] <= 1e-5
    # gathered state dict (DCP get_model_state_dict, full_state_dict=True): bitsandbytes' keys, unsharded bytes
    assert r["sd_keys_equal"] and r["sd_base_bytes_equal"] and r["sd_sharded_equal"]
    assert r["sd_bnb_keys"] == ["weight", "weight.absmax", "weight.nested_absmax", "weight.nested_quant_map",
                                "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"]
    assert {k: v["double_quant"] for k, v in r["bnb"].items()} == {"model.layers.0.self_attn.q_proj": True,
                                                                    "model.layers.1.self_attn.q_proj": False}
    assert all(v["state_dict_equal"] and v["dequant_equal"] for v in r["bnb"].values())
    # save_adapter: only the 28 LoRA matrices gathered (fp32, no uint8 base bytes), rank 0 wrote, PEFT loads it
    assert r["adapter_gathers"] == 28 and r["adapter_gathers_only_lora"] and r["adapter_written_by_others"]
    assert r["adapter_keys_equal"] and r["peft_loads_equal"]
    # mixed precision casts the LoRA matrices (seen in forward) and no quantized byte
    for dt in ("torch.bfloat16", "torch.float16"):
        mp = r["mp"][dt]
        assert mp["lora_dtype_in_forward"] == [dt] and mp["forward_checks"] == 14
        assert mp["bytes_unchanged"] and torch.isfinite(torch.tensor(mp["loss"]))


@pytest.mark.skipif(FSDP2_OK, reason="torch >= 2.12 shards uint8 Parameters (test_fsdp2_qlora_matches_...)")
def test_fsdp2_refused_on_old_torch(tmp_path):
    r = spawn("fsdp2_worker.py", 2, tmp_path, "refuse")
    assert r["shard_error"] is not None and torch.__version__ in r["shard_error"]
    assert "torch>=2.12" in r["shard_error"] and "zero3_config" in r["shard_error"]
    # the failure the error stands for: torch's own fully_shard on the frozen uint8 Parameters
    assert r["raw_error"] is not None and "only Tensors of floating point dtype can require gradients" in r["raw_error"]


def test_check_fsdp2_supported_by_version():
    if FSDP2_OK:
        check_fsdp2_supported()  # no error
    else:
        with pytest.raises(FSDP2UnsupportedError, match=re.escape(f"torch {torch.__version__} is installed")):
            check_fsdp2_supported()


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.skipif(not FSDP2_OK, reason="torch < 2.12 refuses before validating (test_check_fsdp2_supported)")
def test_shard_qlora_model_rejects_bad_arguments(one_rank_group):
    import qpeft

    model = qpeft.prepare_for_qlora(tiny_llama(), r=4, compute_dtype=torch.float32)
    with pytest.raises(TypeError, match="mixed_precision must be None or a torch.distributed.fsdp"):
        shard_qlora_model(model, mixed_precision=torch.bfloat16)
    with pytest.raises(TypeError, match="reshard_after_forward must be a bool"):
        shard_qlora_model(model, reshard_after_forward=2)
    with pytest.raises(ValueError, match="mesh must be None or a 1-D DeviceMesh"):
        shard_qlora_model(model, mesh="cpu")
    with pytest.raises(ValueError, match="found no decoder layers"):
        shard_qlora_model(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    from torch.distributed.fsdp import FSDPModule

    shard_qlora_model(model)  # one rank: sharding is the identity, the model still runs
    assert isinstance(model, FSDPModule) and all(isinstance(m, FSDPModule) for m in model.model.layers)
    ids = torch.tensor([[3, 4, 5, 6]])
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


def test_shard_qlora_model_needs_a_process_group():
    if not FSDP2_OK:
        pytest.skip("torch < 2.12 refuses first (test_check_fsdp2_supported_by_version)")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        shard_qlora_model(tiny_llama())


def test_decoder_layers_of_a_llama():
    model = tiny_llama(layers=3)
    assert decoder_layers(model) == list(model.model.layers)
