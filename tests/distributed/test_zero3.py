"""DeepSpeed ZeRO-3 on gloo ranks spawned from pytest (CPU accelerator, auto-detected): the tiny Llama QLoRA
model under qpeft.distributed.zero3_config + prepare_zero3 against a single-process run; uint8 partitions; the
gathered state dict; save_adapter; a bf16-mode engine leaves every quantized byte intact. Runs on every torch
lane (ZeRO-3 never calls requires_grad on the uint8 Parameters, so torch 2.11 works too)."""
from __future__ import annotations

import pytest

from .launch import spawn

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")


@pytest.mark.parametrize("world_size", [2, 3])
def test_zero3_qlora_matches_single_process(tmp_path, world_size):
    r = spawn("zero3_worker.py", world_size, tmp_path)
    assert r["world_size"] == world_size
    # each rank holds ceil(numel / world_size) bytes of every uint8 Parameter
    assert r["local_bytes"] <= r["full_bytes"] / world_size + r["row_bytes_sum"]
    assert r["forward_checks"] == 14 * 3 and r["bytes_unchanged"]
    # Forward is exact (the step-0 losses equal the reference bit for bit: same bytes, same kernels). DeepSpeed's
    # backward is not bit-exact against torch's even at 2 ranks: the step-0 LoRA gradients differ by a few ulps
    # (2.4e-8 on a largest gradient of 0.067 = 3.6e-7 relative, largest in layer 0, the end of backward; it
    # persists with memory_efficient_linear off, so the cause inside DeepSpeed is not identified). Tolerances: step-0
    # gradients 1e-6 relative to the largest gradient (a few ulps); parameters after 3 AdamW steps (lr 1e-2) 1e-4,
    # 1e-2 of one step, where a missing or doubled rank would change a step by its whole size.
    assert r["loss_diff"][0] == 0.0
    assert r["grad_rel"][0] <= 1e-6 and max(r["grad_diff"]) <= 1e-5 and max(r["loss_diff"]) <= 1e-5
    assert r["param_diff"] <= 1e-4 and r["sd_lora_diff"] <= 1e-4 and r["adapter_diff"] <= 1e-4
    # state dict inside GatheredParameters: bitsandbytes' keys, the unsharded bytes, loads into Linear4bit;
    # the adapter saved by rank 0 loads in PEFT
    assert r["sd_keys_equal"] and r["sd_base_bytes_equal"]
    assert r["adapter_written_by_others"] and r["adapter_keys_equal"] and r["peft_loads_equal"]
    assert {k: v["double_quant"] for k, v in r["bnb"].items()} == {"model.layers.0.self_attn.q_proj": True,
                                                                    "model.layers.1.self_attn.q_proj": False}
    assert all(v["state_dict_equal"] and v["dequant_equal"] for v in r["bnb"].values())
    # DeepSpeed's bf16 mode casts the float Parameters (LoRA seen as bf16 in forward), never the uint8 storage
    bf16 = r["bf16"]
    assert bf16["lora_dtype_in_forward"] == ["torch.bfloat16"] and bf16["forward_checks"] == 14
    assert bf16["bytes_unchanged"] and bf16["loss"] == bf16["loss"]  # not NaN
