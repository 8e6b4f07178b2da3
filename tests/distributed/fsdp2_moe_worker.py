"""One gloo rank of the FSDP2 check on a 4-bit MoE (spawned by test_fsdp2_moe.py): argv = out_dir, case "train".

A tiny Qwen3-MoE with 4-bit linears and 4-bit fused experts, PEFT LoRA on q/v and on the experts
(target_parameters, random A and B), trains 2 AdamW steps sharded with qpeft.distributed.shard_qlora_model, each rank
on its own micro-batch, against the single-process run with the gradients averaged (fsdp2_worker.reference_run).
Checked: each rank holds only its rows (experts on dim 0) of the experts' uint8 Parameters, the experts' bytes never
change (also under a bf16 MixedPrecisionPolicy), losses and gradients equal the reference, and the gathered state
dict holds the experts' on-disk format with the unsharded bytes. Rank 0 writes out_dir/report.json."""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp2_worker import STEPS, batches, reference_run, run_case, trainable  # noqa: E402

import qpeft  # noqa: E402
import qpeft.integrations.peft  # noqa: E402,F401  (qpeft's PEFT hooks)
from qpeft.models.moe.interface import register_experts_implementation  # noqa: E402
from qpeft.modules.nf4_experts import is_nf4_experts  # noqa: E402
from tiny_moe import tiny_moe  # noqa: E402


def make_model():
    import peft

    model = tiny_moe("qwen3_moe")
    qpeft.quantize_model(model, compute_dtype=torch.float32)
    register_experts_implementation()
    model.set_experts_implementation("qpeft")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                    target_parameters=["mlp.experts.gate_up_proj",
                                                                       "mlp.experts.down_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in sorted(pm.named_parameters()):
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pm.train()


def experts_bytes(model) -> dict:
    out = {}
    for n, m in model.named_modules():
        if is_nf4_experts(m):
            for i, p in enumerate(m.quantized_parameters()):
                out[f"{n}#{i}"] = p.full_tensor().clone() if hasattr(p, "full_tensor") else p.detach().clone()
    return out


def case_train(out_dir: Path, rank: int, ws: int) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import DTensor

    from qpeft.distributed import shard_qlora_model

    report = {"world_size": ws}
    init = make_model()
    data = batches(ws)
    orig = experts_bytes(init)
    orig_sd = {k: v.clone() for k, v in init.state_dict().items()}
    ref = copy.deepcopy(init)
    ref_losses, ref_grads = reference_run(ref, data)

    model = copy.deepcopy(init)
    shard_qlora_model(model)
    shards = []
    for n, m in model.named_modules():
        if is_nf4_experts(m):
            for p in m.quantized_parameters():
                assert isinstance(p, DTensor) and p.dtype == torch.uint8, (n, type(p), p.dtype)
                rows, row_bytes = p.shape
                held = p.to_local().untyped_storage().nbytes()
                shards.append(held <= math.ceil(rows / ws) * row_bytes)
    report["experts_sharded"] = len(shards)
    report["experts_shards_within_rows"] = all(shards)

    opt = torch.optim.AdamW(list(trainable(model).values()), lr=1e-2)
    loss_diff, grad_diff = [], []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=data[rank], labels=data[rank]).loss
        loss.backward()
        losses = [torch.zeros(()) for _ in range(ws)]
        torch.distributed.all_gather(losses, loss.detach())
        loss_diff.append(max((a - b).abs().item() for a, b in zip(losses, ref_losses[step])))
        avg, _ = ref_grads[step]
        grad_diff.append(max((p.grad.full_tensor() - avg[n]).abs().max().item()
                             for n, p in trainable(model).items()))
        opt.step()
    report.update(loss_diff=loss_diff, grad_diff=grad_diff, n_trainable=len(trainable(model)),
                  n_experts_lora=sum(".experts." in n for n in trainable(model)))
    report["param_diff"] = max((p.full_tensor() - trainable(ref)[n]).abs().max().item()
                               for n, p in trainable(model).items())
    after = experts_bytes(model)
    report["experts_bytes_unchanged"] = after.keys() == orig.keys() and all(torch.equal(after[k], orig[k])
                                                                           for k in orig)
    gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    keys = [k for k in orig_sd if ".experts." in k and ".lora_" not in k]
    report["sd_experts_keys"] = sorted(k.split("experts.", 1)[1] for k in keys if ".layers.0." in k)
    report["sd_experts_equal"] = all(k in gathered and gathered[k].dtype == orig_sd[k].dtype
                                     and torch.equal(gathered[k], orig_sd[k]) for k in keys)

    m = copy.deepcopy(init)
    shard_qlora_model(m, mixed_precision=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                              reduce_dtype=torch.float32))
    o = torch.optim.AdamW(list(trainable(m).values()), lr=1e-2)
    loss = m(input_ids=data[rank], labels=data[rank]).loss
    loss.backward()
    o.step()
    after = experts_bytes(m)
    report["mp_bf16_experts_bytes_unchanged"] = all(torch.equal(after[k], orig[k]) for k in orig)
    report["mp_bf16_loss"] = loss.item()
    return report


if __name__ == "__main__":
    run_case({"train": case_train})
