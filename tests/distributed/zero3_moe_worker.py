"""One gloo rank of the DeepSpeed ZeRO-3 check on a 4-bit MoE (spawned by test_zero3_moe.py): argv = out_dir.

fsdp2_moe_worker's model (tiny Qwen3-MoE, 4-bit linears and fused experts, PEFT LoRA on q/v and the experts) in
DeepSpeed's engine with qpeft.distributed.zero3_config + prepare_zero3 (fp32, no clipping), each rank on its own
micro-batch, against the single-process run. Checked: the experts' uint8 Parameters are partitioned, their bytes
never change, the forward losses equal the reference bit for bit, the gradients agree. Rank 0 writes the report."""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fsdp2_moe_worker import experts_bytes, make_model  # noqa: E402
from fsdp2_worker import STEPS, batches, reference_run, trainable  # noqa: E402
from zero3_worker import finish_gloo_ranks, start_gloo_ranks  # noqa: E402

from qpeft.distributed import prepare_zero3, zero3_config  # noqa: E402
from qpeft.modules.nf4_experts import is_nf4_experts  # noqa: E402


def main():
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    out_dir = Path(sys.argv[1])
    start_gloo_ranks()
    rank, ws = dist.get_rank(), dist.get_world_size()
    report = {"world_size": ws}
    init = make_model()
    data = batches(ws)
    orig = experts_bytes(init)
    ref = copy.deepcopy(init)
    ref_losses, ref_grads = reference_run(ref, data)

    model = copy.deepcopy(init)
    opt = torch.optim.AdamW(list(trainable(model).values()), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=zero3_config(
        dtype="fp32", gradient_clipping=0.0, param_persistence_threshold=0))
    prepare_zero3(engine.module)
    model = engine.module
    parts = []
    for m in model.modules():
        if is_nf4_experts(m):
            for p in m.quantized_parameters():
                held = p.ds_tensor.numel() * p.ds_tensor.element_size()
                parts.append(p.dtype == torch.uint8 and p.data.numel() == 0 and held <= math.ceil(p.ds_numel / ws))
    report["experts_partitioned"] = len(parts)
    report["experts_partitions_ok"] = all(parts)
    names = list(trainable(model))
    loss_diff, grad_rel = [], []
    for step in range(STEPS):
        loss = engine(input_ids=data[rank], labels=data[rank]).loss
        engine.backward(loss)
        losses = [torch.zeros(()) for _ in range(ws)]
        dist.all_gather(losses, loss.detach().float())
        loss_diff.append(max((a - b).abs().item() for a, b in zip(losses, ref_losses[step])))
        avg, _ = ref_grads[step]
        params = dict(model.named_parameters())
        grad_rel.append(max((safe_get_full_grad(params[n]).float() - avg[n]).abs().max().item()
                            / avg[n].abs().max().item() for n in names))
        engine.step()
    report.update(loss_diff=loss_diff, grad_rel=grad_rel, n_trainable=len(names))
    with deepspeed.zero.GatheredParameters([p for m in model.modules() if is_nf4_experts(m)
                                            for p in m.quantized_parameters()]):
        after = experts_bytes(model)
    report["experts_bytes_unchanged"] = after.keys() == orig.keys() and all(torch.equal(after[k], orig[k])
                                                                           for k in orig)
    finish_gloo_ranks(out_dir, rank, report)


if __name__ == "__main__":
    main()
