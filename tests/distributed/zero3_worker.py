"""One gloo rank of the DeepSpeed ZeRO-3 checks (spawned by test_zero3.py): argv = out_dir.

The same tiny Llama QLoRA model, data and single-process reference as fsdp2_worker.py; DeepSpeed's engine with
qpeft.distributed.zero3_config (fp32, gradient clipping off to compare against an unclipped reference, every
parameter partitioned) and prepare_zero3. Then: partition sizes, bytes seen in forward, the gathered state dict,
save_adapter, and a bf16-mode engine that must not touch a quantized byte. Rank 0 writes out_dir/report.json."""
from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import qpeft
from qpeft import QLinearNF4
from qpeft.distributed import prepare_zero3, zero3_config
from zero3_emulation import zero3_input_identities  # this script's directory is on sys.path
from fsdp2_worker import (STEPS, adapter_diff, batches, bnb_and_peft, check_forward_bytes, make_model,
                          quantized_bytes, reference_run, ring_average, trainable)


def flat_chunk(ws):
    """ZeRO-3's partition of rank k: elements [k * ceil(numel / ws), (k + 1) * ceil(numel / ws)) of the flattened
    tensor (reduce_scatter_coalesced, partition_parameters.py)."""
    def chunk(t, k):
        n = -(-t.numel() // ws)
        return t.view(-1)[k * n:(k + 1) * n]
    return chunk


def gathered_bytes(model):
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for m in model.modules() if isinstance(m, QLinearNF4)
                                            for p in m.quantized_parameters()]):
        return quantized_bytes(model)


def start_gloo_ranks() -> None:
    """This rank's DeepSpeed setup on the CPU (zero3_worker and zero3_moe_worker): a traceback dump before the
    spawn timeout, one thread, DeepSpeed's shm op skipped, the gloo group."""
    import deepspeed

    import faulthandler
    faulthandler.dump_traceback_later(float(os.environ.get("QPEFT_TEST_DUMP_S", "280")), exit=True)
    torch.set_num_threads(1)
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at init (first run: minutes on 2
    # cores, past the spawn timeout) that only its inference all-reduce uses, and only with LOCAL_SIZE set;
    # training collectives go through gloo. Skip the build.
    # importlib, not `import deepspeed.comm.torch as ...`: that name resolves to the attribute `torch`
    # of deepspeed.comm, which is PyTorch itself (the patch would never apply)
    import importlib

    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    assert hasattr(ds_comm_torch, "TorchBackend"), ds_comm_torch
    ds_comm_torch.build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")


def finish_gloo_ranks(out_dir: Path, rank: int, report: dict) -> None:
    """Rank 0 writes the report; every rank passes the last barrier and destroys the group."""
    if rank == 0:
        (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    dist.barrier()
    # Tear the group down here, as the fsdp2 workers do, not in interpreter finalization. This alone did not cure
    # the rare 'terminate called without an active exception' (exit -6) of a rank at shutdown; the ranks now also
    # leave through os._exit (rank_exit.py, which launch.spawn runs them under).
    dist.destroy_process_group()


def engine_for(model, dtype):
    import deepspeed

    opt = torch.optim.AdamW(list(trainable(model).values()), lr=1e-2)
    cfg = zero3_config(dtype=dtype, gradient_clipping=0.0, param_persistence_threshold=0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    prepare_zero3(engine.module)
    return engine


def main():
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    out_dir = Path(sys.argv[1])
    start_gloo_ranks()
    rank, ws = dist.get_rank(), dist.get_world_size()
    report = {"world_size": ws, "torch": torch.__version__, "deepspeed": deepspeed.__version__}
    init = make_model()
    data = batches(ws)
    orig_bytes = quantized_bytes(init)
    orig_sd = {k: v.clone() for k, v in init.state_dict().items()}
    ref = copy.deepcopy(init)
    ref_losses, ref_grads = reference_run(ref, data)
    # the single-process run with ZeRO-3's two differences emulated: its module-input identities in backward,
    # and its reduction (each g_r / ws, then gloo's ring reduce-scatter order)
    emu = copy.deepcopy(init)
    emu_hooks = zero3_input_identities(emu)
    emu_losses, emu_grads = reference_run(emu, data, average=lambda g: ring_average(g, flat_chunk(ws), True))
    for h in emu_hooks:
        h.remove()

    engine = engine_for(copy.deepcopy(init), "fp32")
    model = engine.module
    local = full = row_bytes_sum = 0
    for n, m in model.named_modules():
        if isinstance(m, QLinearNF4):
            for p in m.quantized_parameters():
                assert p.dtype == torch.uint8 and p.data.numel() == 0, (n, p.dtype, p.data.shape)  # partitioned
                held = p.ds_tensor.numel() * p.ds_tensor.element_size()
                assert held <= math.ceil(p.ds_numel / ws), (n, held, p.ds_numel)
                rows, row_bytes = p.ds_shape
                local, full, row_bytes_sum = local + held, full + rows * row_bytes, row_bytes_sum + row_bytes
    report.update(local_bytes=local, full_bytes=full, row_bytes_sum=row_bytes_sum)

    seen = {}
    handles = check_forward_bytes(model, orig_bytes, seen)
    names = list(trainable(model))
    loss_diff, grad_diff, grad_excess, grad_rel, emu_loss_diff, emu_grad_diff = [], [], [], [], [], []
    for step in range(STEPS):
        loss = engine(input_ids=data[rank], labels=data[rank]).loss
        engine.backward(loss)
        losses = [torch.zeros(()) for _ in range(ws)]
        dist.all_gather(losses, loss.detach().float())
        loss_diff.append(max((a - b).abs().item() for a, b in zip(losses, ref_losses[step])))
        emu_loss_diff.append(max((a - b).abs().item() for a, b in zip(losses, emu_losses[step])))
        avg, bound = ref_grads[step]
        gd = ge = ed = 0.0
        for n in names:
            g = safe_get_full_grad(dict(model.named_parameters())[n])
            ed = max(ed, (g.float() - emu_grads[step][0][n]).abs().max().item())
            d = (g.float() - avg[n]).abs()
            gd, ge = max(gd, d.max().item()), max(ge, (d - 4 * 2.0 ** -24 * bound[n]).max().item())
        grad_rel.append(max((safe_get_full_grad(dict(model.named_parameters())[n]).float() - avg[n]).abs().max().item()
                            / avg[n].abs().max().item() for n in names))
        grad_diff.append(gd)
        grad_excess.append(ge)
        emu_grad_diff.append(ed)
        engine.step()
    for h in handles:
        h.remove()
    params = dict(model.named_parameters())
    report.update(loss_diff=loss_diff, grad_diff=grad_diff, grad_excess=grad_excess, grad_rel=grad_rel,
                  emu_loss_diff=emu_loss_diff, emu_grad_diff=emu_grad_diff,
                  forward_checks=sum(v for k, v in seen.items() if k != "lora_dtype"),
                  param_diff=max((safe_get_full_fp32_param(params[n]) - trainable(ref)[n]).abs().max().item()
                                 for n in names),
                  emu_param_diff=max((safe_get_full_fp32_param(params[n]) - trainable(emu)[n]).abs().max().item()
                                     for n in names))
    after = gathered_bytes(model)
    report["bytes_unchanged"] = all(torch.equal(a, b) for k in orig_bytes for a, b in zip(after[k], orig_bytes[k]))
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        sd = {k: v.clone() for k, v in model.state_dict().items()}
    ref_sd = ref.state_dict()
    report["sd_keys_equal"] = sorted(sd) == sorted(ref_sd)
    report["sd_base_bytes_equal"] = all(
        torch.equal(sd[k].contiguous().view(torch.uint8), orig_sd[k].contiguous().view(torch.uint8))
        for k in ref_sd if ".lora_" not in k)
    report["sd_lora_diff"] = max((sd[k] - ref_sd[k]).abs().max().item() for k in ref_sd if ".lora_" in k)
    emu_sd = emu.state_dict()
    report["emu_sd_lora_diff"] = max((sd[k] - emu_sd[k]).abs().max().item() for k in emu_sd if ".lora_" in k)
    path = qpeft.save_adapter(model, out_dir / "adapter")
    report["adapter_written_by_others"] = (path / "adapter_model.safetensors").is_file()
    if rank == 0:
        from safetensors.torch import load_file

        saved = load_file(str(path / "adapter_model.safetensors"))
        ref_adapter = {f"base_model.model.{n}".replace(".default.weight", ".weight"): p
                       for n, p in trainable(ref).items()}
        report["adapter_keys_equal"] = sorted(saved) == sorted(ref_adapter)
        report["adapter_diff"] = max((saved[k] - ref_adapter[k]).abs().max().item() for k in saved)
        report["emu_adapter_diff"] = adapter_diff(path, emu)
        # the gathered layers load into bitsandbytes' Linear4bit, the saved adapter into PEFT
        loaded = bnb_and_peft(out_dir, sd, orig_sd, path, ref)
        report.update(bnb=loaded["bnb"], peft_loads_equal=loaded["peft_loads_equal"])

    # bf16 mode: DeepSpeed casts every float Parameter; the uint8 storage must arrive and stay byte-identical
    engine16 = engine_for(copy.deepcopy(init), "bf16")
    seen = {}
    handles = check_forward_bytes(engine16.module, orig_bytes, seen)
    loss = engine16(input_ids=data[rank], labels=data[rank]).loss
    engine16.backward(loss)
    engine16.step()
    for h in handles:
        h.remove()
    after = gathered_bytes(engine16.module)
    report["bf16"] = dict(loss=loss.float().item(), lora_dtype_in_forward=sorted(seen["lora_dtype"]),
                          forward_checks=sum(v for k, v in seen.items() if k != "lora_dtype"),
                          bytes_unchanged=all(torch.equal(a, b) for k in orig_bytes
                                              for a, b in zip(after[k], orig_bytes[k])))
    finish_gloo_ranks(out_dir, rank, report)


if __name__ == "__main__":
    main()
