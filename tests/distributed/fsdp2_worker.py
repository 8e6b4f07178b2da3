"""One gloo rank of the FSDP2 checks (spawned by test_fsdp2.py through launch.spawn): argv = out_dir, case.

case "train": a tiny Llama QLoRA model (layer 0 double-quantized: absmax as uint8 codes [blocks, 1]; layer 1
fp32 absmax as bytes [blocks, 4]; random LoRA A and B, fp32) trains 3 AdamW steps sharded, each rank on its own
micro-batch, against a single-process reference computed on every rank from the same initial model (the
reference averages the per-micro-batch gradients, as FSDP2's reduce-scatter does). Then: local shard bytes, the
gathered state dict (DCP) vs the unsharded one and bitsandbytes' Linear4bit, save_adapter (only the adapter
gathered, rank 0 writes, PEFT loads it), and bf16 / fp16 MixedPrecisionPolicy runs that must not touch a byte.
case "refuse" (torch < 2.12): shard_qlora_model's error, and the raw fully_shard failure it stands for.
Rank 0 writes out_dir/report.json; any failed check raises (non-zero exit)."""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import qpeft
from qpeft import QLinearNF4, add_lora, quantize_model
from qpeft.modules.lora_linear import LoraLinear
from utils import tiny_llama

STEPS = 3


def make_model():
    model = tiny_llama(seed=0)
    # layer 0: double quant (absmax_bytes = 8-bit codes [blocks, 1]); layer 1: fp32 absmax bytes [blocks, 4]
    quantize_model(model, target_modules=r"model\.layers\.0\..*", double_quant=True, compute_dtype=torch.float32)
    quantize_model(model, target_modules=r"model\.layers\.1\..*", double_quant=False, compute_dtype=torch.float32)
    add_lora(model, "all-linear", r=4, lora_alpha=8, init="random")  # random B: non-zero LoRA gradients
    return model.train()


def batches(world_size):
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(3, 128, (2, 8), generator=g) for _ in range(world_size)]


def quantized_bytes(model):
    """{layer path: (weight, absmax_bytes)} as plain uint8 tensors (full_tensor() of shards)."""
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, QLinearNF4):
            out[n] = tuple(p.full_tensor().clone() if hasattr(p, "full_tensor") else p.detach().clone()
                           for p in m.quantized_parameters())
    return out


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def reference_run(model, data, average=None):
    """Single process: per step, every micro-batch's loss and gradient; the gradients averaged (by default the
    plain mean, torch.stack(per).sum(0) / len(data); `average(per_rank_grads) -> grad` to emulate an engine's
    reduction instead); AdamW step."""
    opt = torch.optim.AdamW(list(trainable(model).values()), lr=1e-2)
    losses, grads = [], []
    for _ in range(STEPS):
        per = []
        step_losses = []
        for ids in data:
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            step_losses.append(loss.detach().clone())
            per.append({n: p.grad.clone() for n, p in trainable(model).items()})
        if average is None:
            avg = {n: torch.stack([g[n] for g in per]).sum(0) / len(data) for n in per[0]}
        else:
            avg = {n: average([g[n] for g in per]) for n in per[0]}
        bound = {n: torch.stack([g[n].abs() for g in per]).sum(0) / len(data) for n in per[0]}
        for n, p in trainable(model).items():
            p.grad = avg[n].clone()
        opt.step()
        losses.append(step_losses)
        grads.append((avg, bound))
    return losses, grads


def ring_average(grads, chunk, predivide):
    """Emulates an average over ranks by gloo's reduce-scatter (measured on 2 and 3 CPU ranks, torch 2.11 and 2.15):
    rank k's output chunk is the left fold g_{k+1} + g_{k+2} + ... + g_k (indices mod world size, one fp32
    rounding per addition), so at 3 ranks chunk 0 is (g1 + g2) + g0, chunk 1 (g2 + g0) + g1, chunk 2 (g0 + g1) +
    g2, where the plain mean sums (g0 + g1) + g2 everywhere. predivide: each g_r / ws before the sum (DeepSpeed's
    reduce_scatter_coalesced), else the sum / ws after (FSDP2's ReduceOp.AVG). chunk(tensor, k): the view of
    rank k's part of a full gradient (FSDP2: rows of dim 0; ZeRO-3: elements of the flattened tensor)."""
    ws = len(grads)
    out = torch.empty_like(grads[0])
    for k in range(ws):
        acc = None
        for r in [(k + 1 + i) % ws for i in range(ws)]:
            c = chunk(grads[r], k) / ws if predivide else chunk(grads[r], k)
            acc = c.clone() if acc is None else acc + c
        if acc.numel():
            chunk(out, k).copy_(acc if predivide else acc / ws)
    return out


def dim0_chunk(ws):
    """FSDP2's shard of rank k: rows [k * ceil(rows / ws), (k + 1) * ceil(rows / ws)) of dim 0 (torch.chunk)."""
    def chunk(t, k):
        rows = -(-t.shape[0] // ws)
        return t[k * rows:(k + 1) * rows]
    return chunk


def check_forward_bytes(model, expected, seen):
    """Forward pre-hooks: inside each LoraLinear's forward its QLinearNF4 base holds plain, full-size
    Parameters (FSDP2 has all-gathered them) whose bytes equal the unsharded layer's; the absmax view works."""
    handles = []
    for n, m in model.named_modules():
        if isinstance(m, LoraLinear):
            def hook(mod, args, n=n):
                base = mod.base_layer
                w, a = base.weight, base.absmax_bytes
                assert type(w) is torch.nn.Parameter and type(a) is torch.nn.Parameter, (type(w), type(a))
                ew, ea = expected[n + ".base_layer"]
                assert torch.equal(w, ew) and torch.equal(a, ea), f"{n}: gathered bytes differ"
                ref_absmax = ea.reshape(-1) if base.double_quant else ea.view(torch.float32).reshape(-1)
                assert torch.equal(base.absmax, ref_absmax)
                seen[n] = seen.get(n, 0) + 1
                lora_a = mod.lora_A[mod.active_adapters[0]].weight
                seen.setdefault("lora_dtype", set()).add(str(lora_a.dtype))
            handles.append(m.register_forward_pre_hook(hook))
    return handles


def case_train(out_dir: Path, rank: int, ws: int) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import DTensor

    from qpeft.distributed import shard_qlora_model

    report = {"world_size": ws}
    init = make_model()
    data = batches(ws)
    orig_bytes = quantized_bytes(init)
    orig_sd = {k: v.clone() for k, v in init.state_dict().items()}

    ref = copy.deepcopy(init)
    ref_losses, ref_grads = reference_run(ref, data)
    # the same run with FSDP2's reduction emulated: gloo's ring reduce-scatter order, then / ws (ReduceOp.AVG)
    emu = copy.deepcopy(init)
    emu_losses, emu_grads = reference_run(emu, data, average=lambda g: ring_average(g, dim0_chunk(ws), False))

    model = copy.deepcopy(init)
    shard_qlora_model(model)
    # per-rank storage of the 4-bit base: each Parameter's local shard <= ceil(rows / ws) rows
    local = full = row_bytes_sum = 0
    for n, m in model.named_modules():
        if isinstance(m, QLinearNF4):
            for p in m.quantized_parameters():
                assert isinstance(p, DTensor) and p.dtype == torch.uint8, (n, type(p), p.dtype)
                rows, row_bytes = p.shape
                held = p.to_local().untyped_storage().nbytes()  # FSDP2's padded shard: what the rank holds
                assert held <= math.ceil(rows / ws) * row_bytes, (n, held, rows, row_bytes)
                assert held <= rows * row_bytes / ws + row_bytes
                local, full = local + held, full + rows * row_bytes
                row_bytes_sum += row_bytes
    total_local = torch.tensor([local])
    dist.all_reduce(total_local)
    report.update(local_bytes=local, full_bytes=full, sum_local_bytes=int(total_local), row_bytes_sum=row_bytes_sum)

    seen = {}
    handles = check_forward_bytes(model, orig_bytes, seen)
    opt = torch.optim.AdamW(list(trainable(model).values()), lr=1e-2)
    loss_diff, grad_diff, grad_excess, emu_loss_diff, emu_grad_diff = [], [], [], [], []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=data[rank], labels=data[rank]).loss
        loss.backward()
        losses = [torch.zeros(()) for _ in range(ws)]
        dist.all_gather(losses, loss.detach())
        loss_diff.append(max((a - b).abs().item() for a, b in zip(losses, ref_losses[step])))
        emu_loss_diff.append(max((a - b).abs().item() for a, b in zip(losses, emu_losses[step])))
        avg, bound = ref_grads[step]
        gd = ge = ed = 0.0
        for n, p in trainable(model).items():
            g = p.grad.full_tensor()
            ed = max(ed, (g - emu_grads[step][0][n]).abs().max().item())
            d = (g - avg[n]).abs()
            gd = max(gd, d.max().item())
            # a + b + c summed in another order: each partial sum rounds once (<= 2^-24 relative), so the
            # difference is within 2 * 2^-24 * sum |g_i| / ws per element, plus the rounding of the division
            ge = max(ge, (d - 4 * 2.0 ** -24 * bound[n]).max().item())
        grad_diff.append(gd)
        grad_excess.append(ge)
        emu_grad_diff.append(ed)
        opt.step()
    for h in handles:
        h.remove()
    report.update(loss_diff=loss_diff, grad_diff=grad_diff, grad_excess=grad_excess, emu_loss_diff=emu_loss_diff,
                  emu_grad_diff=emu_grad_diff, forward_checks=sum(v for k, v in seen.items() if k != "lora_dtype"))
    param_diff = max((p.full_tensor() - trainable(ref)[n]).abs().max().item() for n, p in trainable(model).items())
    report["param_diff"] = param_diff
    report["emu_param_diff"] = max((p.full_tensor() - trainable(emu)[n]).abs().max().item()
                                   for n, p in trainable(model).items())
    after = quantized_bytes(model)
    report["bytes_unchanged"] = all(torch.equal(a, b) for k in orig_bytes for a, b in zip(after[k], orig_bytes[k]))

    # the gathered state dict (torch.distributed.checkpoint) vs the unsharded model's
    gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    ref_sd = ref.state_dict()
    report["sd_keys_equal"] = sorted(gathered) == sorted(ref_sd) == sorted(orig_sd)
    base_keys = [k for k in ref_sd if ".lora_" not in k]
    report["sd_base_bytes_equal"] = all(
        gathered[k].dtype == ref_sd[k].dtype and gathered[k].shape == ref_sd[k].shape
        and torch.equal(gathered[k].contiguous().view(torch.uint8), orig_sd[k].contiguous().view(torch.uint8))
        for k in base_keys)
    report["sd_lora_diff"] = max((gathered[k] - ref_sd[k]).abs().max().item() for k in ref_sd if ".lora_" in k)
    emu_sd = emu.state_dict()
    report["emu_sd_lora_diff"] = max((gathered[k] - emu_sd[k]).abs().max().item() for k in emu_sd if ".lora_" in k)
    report["sd_bnb_keys"] = sorted(k.split("q_proj.base_layer.")[1] for k in gathered
                                   if k.startswith("model.layers.0.self_attn.q_proj.base_layer."))
    # the plain sharded state_dict(): DTensors whose full_tensor() are the same bytes
    sharded_sd = model.state_dict()
    report["sd_sharded_equal"] = all(
        torch.equal((v.full_tensor() if isinstance(v, DTensor) else v).contiguous().view(torch.uint8),
                    gathered[k].contiguous().view(torch.uint8)) for k, v in sharded_sd.items())

    # save_adapter: gathers only the adapter (every full_tensor() call recorded), rank 0 writes
    gathered_dtypes = []
    full_tensor = DTensor.full_tensor

    def recording(self, *a, **kw):
        gathered_dtypes.append((str(self.dtype), tuple(self.shape)))
        return full_tensor(self, *a, **kw)

    DTensor.full_tensor = recording
    try:
        path = qpeft.save_adapter(model, out_dir / "adapter")
    finally:
        DTensor.full_tensor = full_tensor
    n_lora = sum(1 for n in trainable(model))
    report["adapter_gathers"] = len(gathered_dtypes)
    report["adapter_gathers_only_lora"] = (len(gathered_dtypes) == n_lora
                                           and all(d == "torch.float32" for d, _ in gathered_dtypes))
    report["adapter_written_by_others"] = (path / "adapter_model.safetensors").is_file()  # after the barrier

    # bf16 / fp16 mixed precision: every quantized byte intact during forward and after a step
    report["mp"] = {}
    for dt in (torch.bfloat16, torch.float16):
        m = copy.deepcopy(init)
        shard_qlora_model(m, mixed_precision=MixedPrecisionPolicy(param_dtype=dt, reduce_dtype=torch.float32))
        seen = {}
        handles = check_forward_bytes(m, orig_bytes, seen)
        o = torch.optim.AdamW(list(trainable(m).values()), lr=1e-2)
        loss = m(input_ids=data[rank], labels=data[rank]).loss
        loss.backward()
        o.step()
        for h in handles:
            h.remove()
        after = quantized_bytes(m)
        report["mp"][str(dt)] = dict(
            loss=loss.item(), lora_dtype_in_forward=sorted(seen["lora_dtype"]),
            forward_checks=sum(v for k, v in seen.items() if k != "lora_dtype"),
            bytes_unchanged=all(torch.equal(a, b) for k in orig_bytes for a, b in zip(after[k], orig_bytes[k])))

    if rank == 0:
        report.update(bnb_and_peft(out_dir, gathered, orig_sd, path, ref))
        report["emu_adapter_diff"] = adapter_diff(path, emu)
    return report


def adapter_diff(path, model):
    """Largest |saved adapter - model's LoRA matrices| (PEFT's key names)."""
    from safetensors.torch import load_file

    saved = load_file(str(path / "adapter_model.safetensors"))
    ours = {f"base_model.model.{n}".replace(".default.weight", ".weight"): p for n, p in trainable(model).items()}
    assert sorted(saved) == sorted(ours)
    return max((saved[k] - ours[k]).abs().max().item() for k in saved)


def bnb_and_peft(out_dir, gathered, orig_sd, path, ref):
    """Rank 0: the gathered layers load into bitsandbytes' Linear4bit (its own state dict then equals ours byte
    for byte, its dequantized weight equals QLinearNF4's); the saved adapter loads in PEFT with our values."""
    import bitsandbytes as bnb
    import peft
    from safetensors.torch import load_file

    out = {"bnb": {}}
    for layer in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"):
        prefix = layer + ".base_layer."
        sd = {k[len(prefix):]: v for k, v in gathered.items() if k.startswith(prefix)}
        q = ref.get_submodule(layer).base_layer
        lin = bnb.nn.Linear4bit(q.in_features, q.out_features, bias=False, compute_dtype=torch.float32,
                                quant_type="nf4")
        stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
        lin.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, requires_grad=False, device="cpu",
                                                         module=lin)
        theirs = lin.state_dict()
        same = sorted(theirs) == sorted(sd) and all(
            torch.equal(theirs[k].contiguous().view(torch.uint8), sd[k].contiguous().view(torch.uint8)) for k in sd)
        w_bnb = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).float()
        out["bnb"][layer] = dict(state_dict_equal=same, dequant_equal=torch.equal(w_bnb, q.dequantize(torch.float32)),
                                 double_quant=q.double_quant)
    saved = load_file(str(path / "adapter_model.safetensors"))
    ref_adapter = {f"base_model.model.{n}": p for n, p in trainable(ref).items()}
    ref_adapter = {k.replace(".default.weight", ".weight"): v for k, v in ref_adapter.items()}
    out["adapter_keys_equal"] = sorted(saved) == sorted(ref_adapter)
    out["adapter_diff"] = max((saved[k] - ref_adapter[k]).abs().max().item() for k in saved)
    pm = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(path))
    theirs = peft.get_peft_model_state_dict(pm)
    out["peft_loads_equal"] = sorted(theirs) == sorted(saved) and all(torch.equal(theirs[k], saved[k]) for k in saved)
    return out


def case_refuse(out_dir: Path, rank: int, ws: int) -> dict:
    from torch.distributed.fsdp import fully_shard

    from qpeft.distributed import shard_qlora_model
    from qpeft.distributed.fsdp2 import FSDP2UnsupportedError

    model = make_model()
    report = {"torch": torch.__version__}
    try:
        shard_qlora_model(model)
        report["shard_error"] = None
    except FSDP2UnsupportedError as e:
        report["shard_error"] = str(e)
    try:  # what the error stands for: torch's own fully_shard on the uint8 Parameters
        fully_shard(model.model.layers[0])
        report["raw_error"] = None
    except RuntimeError as e:
        report["raw_error"] = str(e)
    return report


def run_case(cases: dict) -> None:
    """A worker's entry point: argv = out_dir case; runs cases[case](out_dir, rank, ws) on a gloo group and rank 0
    writes its report to out_dir/report.json (what launch.spawn reads)."""
    out_dir, case = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)  # the reference and the ranks use the same kernels, blocking and reduction order
    dist.init_process_group("gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    try:
        report = cases[case](out_dir, rank, ws)
        if rank == 0:
            (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_case({"train": case_train, "refuse": case_refuse})
