"""qpeft.optim on FSDP2-sharded (DTensor) parameters, on gloo ranks spawned from pytest (optim_worker.py): states
on the local shard, equality with one process, resume through state_dict / DCP, and bad input. The training
case needs torch >= 2.12 (the 4-bit storage of the QLoRA model); the bad-input case shards a float MLP, which
torch 2.11 can shard too, so both lanes run it."""
from __future__ import annotations

import pytest

from qpeft.distributed import FSDP2_MIN_TORCH
from qpeft.distributed.fsdp2 import _torch_version

from .launch import spawn

pytest.importorskip("transformers")

FSDP2_OK = _torch_version() >= FSDP2_MIN_TORCH


@pytest.mark.skipif(not FSDP2_OK, reason="torch < 2.12 cannot shard the QLoRA model (test_fsdp2.py tests the "
                                         "refusal); test_bad_input_... runs the optimizer on DTensors here")
@pytest.mark.parametrize("world_size", [2, 3])
def test_optimizers_on_fsdp2_match_one_process_and_resume(tmp_path, world_size):
    r = spawn("optim_worker.py", world_size, tmp_path, "train")
    assert r["world_size"] == world_size
    assert sorted(r["classes"]) == ["AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedLion8bit"]
    for name, c in r["classes"].items():
        eight_bit = name != "PagedAdamW"
        # min_8bit_size=200 on the whole parameter: 24 LoRA matrices of >= 256 elements on 8-bit states (their
        # shards hold 64 to 192), k/v's B (128 elements) on fp32 states; 3 ranks leave rank 2 without rows of
        # the 14 A matrices (4 rows: 2, 2, 0)
        assert (c["n_8bit"], c["n_fp32"]) == ((24, 4) if eight_bit else (0, 28)), (name, c)
        assert c["empty_shards_all_ranks"] == (14 if world_size == 3 else 0), (name, c)
        # bit for bit against one process given the same gradients (FSDP2's reduction emulated), stepping each
        # rank's shard as a tensor: parameters and every state on every rank
        assert c["emu_param_diff"] == 0.0 and c["emu_states_equal"] and c["all_ranks_ok"], (name, c)
        if not eight_bit:
            # fp32 states are elementwise: equal to the plain single-process run on whole tensors too
            assert c["whole_param_diff"] == 0.0 and c["whole_states_equal"], (name, c)
            if world_size == 3:
                # against a plain mean of the micro-batch gradients: at 2 ranks FSDP2's average is that mean bit
                # for bit (test_fsdp2), so the equality above is it; at 3 ranks test_fsdp2's bound for gloo's
                # reordered 3-term sum (1e-3 of one lr=1e-2 step)
                assert c["plain_param_diff"] <= 1e-5, (name, c)
        if name.startswith("Paged"):
            # the gathered (full) state dict: states at the parameters' global shapes; 8-bit ones blocked per
            # shard (quant_shards = world size), fp32 ones without it (they gather to one process's layout)
            assert c["full_state1_global"], (name, c)
            assert c["full_quant_shards"] == ([world_size, None] if eight_bit else [None]), (name, c)
            # resume before step 3: bit-identical step 3 through the optimizer's own state dict, DCP and the
            # gathered full state dict
            assert c["resume"] == {"own": True, "dcp": True, "full": True}, (name, c)


def test_bad_input_on_fsdp2_parameters_names_it_and_changes_nothing(tmp_path):
    r = spawn("optim_worker.py", 2, tmp_path, "bad")
    expect = {  # load_state_dict: what each error names
        "groups": "state_dict has 2 parameter groups, the optimizer 1",
        "group_size": "state_dict's param_groups[0] has 3 parameters, the optimizer's 4",
        "unknown_key": "state_dict has a state for parameter 999",
        "shape": f"state_dict['state'][{r['i8']}]['state1'] must be a DTensor sharded like its parameter",
        "plain": f"state_dict['state'][{r['i8']}]['state1'] must be a DTensor sharded like its parameter",
        "quant_shards": f"state_dict['state'][{r['i8']}]['quant_shards']: these 8-bit states were blocked over 3",
        "absmax": f"state_dict['state'][{r['i8']}]['absmax1'] must be a (2, ",
    }
    for name, want in expect.items():
        got = r["load"][name]
        assert got["error"] is not None and want in got["error"], (name, got["error"])
        assert got["unchanged"], name
    assert "set_optimizer_state_dict" in r["load"]["plain"]["error"]  # how to load a gathered state dict
    # a parameter added after sharding: add_param_group names it and what differs, the optimizer keeps 1 group
    for name, what in (("plain", "is a plain Parameter of shape (8, 4), but"),
                       ("replicated", "mesh of ranks [0, 1] with placements (Replicate(),), but"),
                       ("other_mesh", "mesh of ranks [1, 0] with placements (Shard(dim=0),), but")):
        got = r["add"][name]
        assert got["error"] is not None and got["error"].startswith("param_groups[1]['params'][0] "), (name, got)
        assert what in got["error"] and "added after sharding" in got["error"] and got["unchanged"], (name, got)
    assert r["step_plain"]["error"].startswith("param_groups[0]['params'][4] is a plain Parameter")
    assert r["step_plain"]["unchanged"]
    assert r["step_plain_grad"]["error"].startswith("param_groups[0]['params'][0].grad must be a DTensor")
    assert r["step_plain_grad"]["unchanged"]
    assert r["then_steps"] == 2
