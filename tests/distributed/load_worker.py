"""One gloo rank of the sharded-loading checks (spawned by test_load.py through launch.spawn): argv = out_dir, case.

case "load": rank 0 writes three tiny Llama checkpoints (fp32 untied -> nf4 + double quant; bf16 with tied
embeddings -> fp4 without double quant; the first one quantized and saved by qpeft -> pre-quantized, bytes
copied). Each loads with load_sharded_qlora; its gathered state dict (DCP full_state_dict) must equal the
single-process `from_pretrained(..., quantization_config=QPeftConfig(...))` byte for byte, buffers (rotary
inv_freq) too. Memory: ranks other than 0 never open the checkpoint and never receive more than the largest
unit's full tensors at once (one decoder layer, or the embeddings + head), counted from the reference model;
local shard bytes <= 1/world + one row. Bad input: each argument's error, and a corrupt checkpoint raises the
same ShardedLoadError on every rank.
case "train": a reference QLoRA model (from_pretrained + add_lora after a seed) saves its adapter; the sharded
model loads the base and that adapter (and, separately, the same seed's fresh LoRA init must be identical), then
both train 3 AdamW steps (the reference averaging per-rank micro-batch gradients, as FSDP2's reduce-scatter).
Resume: after step 2 the full model and optimizer state dicts go to safetensors; a freshly loaded sharded model
takes them (load_full_state_dict, set_optimizer_state_dict) and its step 3 must equal the uninterrupted run's
bit for bit; the adapter saved after training loads back (adapter=) with the same bytes; load_full_state_dict
refuses a wrong key set on every rank before changing anything, and with strict=False changes only what it is
given (LoRA only: the base keeps its bytes).
Rank 0 writes out_dir/report.json; any failed check raises (non-zero exit)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

import qpeft
from qpeft import QLinearNF4

from fsdp2_worker import batches, run_case, trainable  # this script's directory is on sys.path

STEPS = 3


def tiny(tied=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # vocab 128 x hidden 64 (32 KiB fp32 per embedding): 4 layers of ~18 KiB quantized each
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def variants(root: Path):
    from qpeft import QPeftConfig

    return {
        "nf4_dq_fp32": (root / "fp32", QPeftConfig(double_quant=True, compute_dtype=torch.float32), torch.float32),
        "fp4_bf16_tied": (root / "bf16", QPeftConfig(quant_type="fp4", double_quant=False,
                                                      compute_dtype=torch.float32), torch.bfloat16),
        "prequantized": (root / "preq", None, torch.float32),
    }


def write_checkpoints(root: Path):
    from transformers import AutoModelForCausalLM

    tiny().save_pretrained(root / "fp32")
    tiny(tied=True).to(torch.bfloat16).save_pretrained(root / "bf16")
    v = variants(root)
    q = AutoModelForCausalLM.from_pretrained(root / "fp32", quantization_config=v["nf4_dq_fp32"][1],
                                             dtype=torch.float32)
    q.save_pretrained(root / "preq")


def reference(path, cfg, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=dtype).eval()


def as_bytes(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def unit_bytes(ref):
    """Full bytes of each unit (decoder layer / the rest) from the unsharded reference: its parameters and its
    persistent buffers (QLinearNF4's packed weight, absmax bytes, tables), each tied parameter once."""
    units, seen, count = {}, set(), {}
    for name, t in [*ref.named_parameters(), *ref.named_buffers()]:
        if id(t) in seen or name.endswith("inv_freq"):
            continue
        seen.add(id(t))
        parts = name.split(".")
        unit = ".".join(parts[:3]) if parts[:2] == ["model", "layers"] else "rest"
        units[unit] = units.get(unit, 0) + t.numel() * t.element_size()
        count[unit] = count.get(unit, 0) + 1
    return units, count


def shard_bytes(model, ws):
    from torch.distributed.tensor import DTensor

    local = full = rows = 0
    for m in model.modules():
        if isinstance(m, QLinearNF4):
            for p in m.quantized_parameters():
                assert isinstance(p, DTensor) and p.dtype == torch.uint8
                n, row = p.shape
                held = p.to_local().untyped_storage().nbytes()
                assert held <= n * row / ws + row, (held, n, row, ws)
                local, full, rows = local + held, full + n * row, rows + row
    return local, full, rows


def case_load(out_dir: Path, rank: int, ws: int) -> dict:
    import safetensors
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from qpeft.distributed import load_sharded_qlora
    from qpeft.distributed import loading

    root = out_dir / "ckpt"
    if rank == 0:
        write_checkpoints(root)
    dist.barrier()
    report = {"world_size": ws, "variants": {}}
    opened, window = [], [False]
    real_open = safetensors.safe_open

    def counting_open(*a, **kw):
        # a module first imported inside the window keeps this function: count only the loader's own calls
        if window[0]:
            opened.append(str(a[0]))
        return real_open(*a, **kw)

    for name, (path, cfg, dtype) in variants(root).items():
        opened.clear()
        safetensors.safe_open, window[0] = counting_open, True
        try:
            model = load_sharded_qlora(path, cfg, torch_dtype=dtype, device="cpu")
        finally:
            safetensors.safe_open, window[0] = real_open, False
        stats = dict(loading.LAST_LOAD_STATS)
        gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        ref = reference(path, cfg or qpeft.QPeftConfig(compute_dtype=torch.float32), dtype)
        ref_sd = ref.state_dict()
        r = {}
        r["keys_equal"] = sorted(gathered) == sorted(ref_sd)
        r["bytes_equal"] = r["keys_equal"] and all(
            gathered[k].dtype == ref_sd[k].dtype and gathered[k].shape == ref_sd[k].shape
            and torch.equal(as_bytes(gathered[k]), as_bytes(ref_sd[k])) for k in ref_sd)
        r["n_keys"], r["n_quantized"] = len(ref_sd), sum(isinstance(m, QLinearNF4) for m in ref.modules())
        r["quant_types"] = sorted({m.quant_type for m in model.modules() if isinstance(m, QLinearNF4)})
        r["double_quant"] = sorted({m.double_quant for m in model.modules() if isinstance(m, QLinearNF4)})
        r["weight_dtypes"] = sorted({str(m.weight_dtype) for m in model.modules() if isinstance(m, QLinearNF4)})
        r["buffers_equal"] = all(torch.equal(b, ref.get_buffer(n)) for n, b in model.named_buffers()
                                 if n.endswith("inv_freq"))
        r["n_inv_freq"] = sum(n.endswith("inv_freq") for n, _ in model.named_buffers())
        r["tied"] = model.lm_head.weight is model.model.embed_tokens.weight
        r["ref_tied"] = ref.lm_head.weight is ref.model.embed_tokens.weight
        ids = torch.tensor([[3, 4, 5, 6, 7]])
        r["logits_equal"] = torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
        units, count = unit_bytes(ref)
        r["max_unit_bytes"], r["largest_unit"] = stats["max_unit_bytes"], max(units.values())
        r["largest_unit_tensors"] = max(count.values())
        r["total_bytes"] = sum(units.values())
        r["received_bytes"] = stats["received_bytes"]
        r["units"] = stats["units"]
        local, full, rows = shard_bytes(model, ws)
        sums = torch.tensor([local])
        dist.all_reduce(sums)
        r.update(local_bytes=local, full_bytes=full, row_bytes_sum=rows, sum_local_bytes=int(sums))
        # what the other ranks did, gathered to rank 0: opened files, received bytes
        mine = torch.tensor([len(opened), stats["max_unit_bytes"], int("checkpoint_opened" in stats)])
        every = [torch.zeros(3, dtype=torch.int64) for _ in range(ws)]
        dist.all_gather(every, mine)
        r["opened_per_rank"] = [int(e[0]) for e in every]
        r["loader_read_per_rank"] = [int(e[2]) for e in every]
        r["max_unit_bytes_per_rank"] = [int(e[1]) for e in every]
        report["variants"][name] = r
    report["errors"] = bad_input(root, rank)
    return report


def bad_input(root: Path, rank: int) -> dict:
    """Each bad argument's message; a corrupt checkpoint (one layer's weight of the wrong shape) raises the same
    ShardedLoadError on every rank."""
    from safetensors.torch import load_file, save_file

    from qpeft.distributed import ShardedLoadError, load_sharded_qlora

    out = {}
    calls = {
        "path": lambda: load_sharded_qlora(root / "nowhere"),
        "quantization_config": lambda: load_sharded_qlora(root / "fp32", {"quant_type": "nf4"}),
        "torch_dtype": lambda: load_sharded_qlora(root / "fp32", torch_dtype=torch.int8),
        "lora": lambda: load_sharded_qlora(root / "fp32", lora=4),
        "lora_and_adapter": lambda: load_sharded_qlora(root / "fp32", lora={}, adapter=root),
    }
    for name, call in calls.items():
        try:
            call()
            out[name] = None
        except (TypeError, ValueError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    bad = root / "bad"
    if rank == 0:
        import shutil

        shutil.copytree(root / "fp32", bad)
        sd = load_file(str(bad / "model.safetensors"))
        sd["model.layers.2.mlp.up_proj.weight"] = sd["model.layers.2.mlp.up_proj.weight"][:, :32].contiguous()
        save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    dist.barrier()
    try:
        load_sharded_qlora(bad, qpeft.QPeftConfig(compute_dtype=torch.float32), device="cpu")
        msg = None
    except ShardedLoadError as e:
        msg = str(e)
    msgs = [None] * dist.get_world_size()
    dist.all_gather_object(msgs, msg)  # test plumbing only (the loader itself never pickles)
    out["corrupt_per_rank"] = msgs
    return out


def case_errors(out_dir: Path, rank: int, ws: int) -> dict:
    """Failures that are not rank 0's ShardedLoadError checks, before and during loading: each must raise the
    same exception on every rank (never "Connection closed by peer" or a hang on the others), and the group
    must stay in step (a correct load after them works)."""
    from qpeft.distributed import load_sharded_qlora
    from qpeft.distributed import loading

    root = out_dir / "ckpt"
    cfg = qpeft.QPeftConfig(compute_dtype=torch.float32)
    if rank == 0:
        root.mkdir(parents=True)
        tiny().save_pretrained(root / "fp32")
        (root / "no_weights").mkdir()
        (root / "no_weights" / "config.json").write_text((root / "fp32" / "config.json").read_text())
    dist.barrier()

    def fail_at(n, exc, on_rank):
        """A stand-in for `fn` that raises `exc` on its n-th call on rank `on_rank`."""
        def wrap(fn):
            calls = [0]

            def wrapped(*a, **kw):
                calls[0] += 1
                if rank == on_rank and calls[0] == n:
                    raise exc
                return fn(*a, **kw)
            return wrapped
        return wrap

    real_get, real_copy = loading._Checkpoint.get, loading._local_copy
    cases = {
        # rank 0 alone reads the weights: a directory with a config.json but no safetensors
        "no_weights": lambda: load_sharded_qlora(root / "no_weights", cfg, device="cpu"),
        # the checkpoint is only on rank 0's file system (rank 1 fails its argument check alone)
        "path_on_rank0_only": lambda: load_sharded_qlora(root / "fp32" if rank == 0 else root / "elsewhere",
                                                         cfg, device="cpu"),
        # a read error on rank 0 in the middle of loading (the 20th of 39 tensor reads: decoder layer 3 of 4)
        "read_error": lambda: load_sharded_qlora(root / "fp32", cfg, device="cpu"),
        # a failure on rank 1 while it copies its rows (the 100th of 179 copies: decoder layer 3)
        "copy_error_rank1": lambda: load_sharded_qlora(root / "fp32", cfg, device="cpu"),
    }
    patches = {
        "read_error": (loading._Checkpoint, "get", fail_at(20, OSError("[Errno 5] Input/output error"), 0)(real_get)),
        "copy_error_rank1": (loading, "_local_copy", fail_at(100, MemoryError("out of memory"), 1)(real_copy)),
    }
    out = {}
    for name, call in cases.items():
        target, attr, fn = patches.get(name, (None, None, None))
        if target is not None:
            setattr(target, attr, fn)
        try:
            call()
            msg = None
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
        finally:
            if target is not None:
                setattr(target, attr, real_get if attr == "get" else real_copy)
        msgs = [None] * ws
        dist.all_gather_object(msgs, msg)  # test plumbing only (the loader itself never pickles)
        out[name] = msgs
    # every rank is still in step: a correct load now works and loads every unit
    model = load_sharded_qlora(root / "fp32", cfg, device="cpu")
    out["then_loads_units"] = loading.LAST_LOAD_STATS["units"]
    out["then_n_quantized"] = sum(isinstance(m, QLinearNF4) for m in model.modules())
    return {"world_size": ws, "errors": out}


# --- training and resume ----------------------------------------------------------------------------------
LORA = dict(target_modules="all-linear", r=4, lora_alpha=8, init="random")  # random B: non-zero LoRA gradients


def step(model, opt, ids):
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    return loss.detach()


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def save_full_state(model, opt, path: Path, rank: int):
    """The gathered model and optimizer state dicts as one safetensors file (rank 0): tensors under
    model.<key> / optim.<fqn>.<state>, the optimizer's param_groups as JSON metadata."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, opt, options=opts)
    if rank == 0:
        tensors = {f"model.{k}": v.contiguous() for k, v in msd.items()}
        for fqn, state in osd["state"].items():
            for k, v in state.items():
                tensors[f"optim.{fqn}.{k}"] = v.reshape(v.shape).contiguous()
        save_file(tensors, str(path), metadata={"param_groups": json.dumps(osd["param_groups"])})
    dist.barrier()


def load_full_state(model, opt, path: Path, rank: int):
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    from qpeft.distributed import load_full_state_dict

    msd = osd = None
    if rank == 0:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            groups = json.loads(f.metadata()["param_groups"])
        msd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        state = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                fqn, name = k[len("optim."):].rsplit(".", 1)
                state.setdefault(fqn, {})[name] = v
        osd = {"state": state, "param_groups": groups}
    load_full_state_dict(model, msd)
    set_optimizer_state_dict(model, opt, osd if rank == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def case_train(out_dir: Path, rank: int, ws: int) -> dict:
    from qpeft.distributed import load_sharded_qlora

    root = out_dir / "ckpt"
    path, cfg = root / "fp32", qpeft.QPeftConfig(compute_dtype=torch.float32)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        tiny().save_pretrained(path)
    dist.barrier()
    report = {"world_size": ws}
    ref = reference(path, cfg, torch.float32)
    torch.manual_seed(7)
    qpeft.add_lora(ref, **LORA)
    ref.train()
    if rank == 0:
        qpeft.save_adapter(ref, out_dir / "adapter0")
    dist.barrier()
    init_lora = {n: p.detach().clone() for n, p in trainable(ref).items()}

    # the same seed's fresh init on rank 0 equals add_lora's
    torch.manual_seed(7)
    fresh = load_sharded_qlora(path, cfg, lora=LORA, torch_dtype=torch.float32, device="cpu")
    report["fresh_init_equal"] = sorted(trainable(fresh)) == sorted(init_lora) and all(
        torch.equal(full(p), init_lora[n]) for n, p in trainable(fresh).items())
    del fresh

    model = load_sharded_qlora(path, cfg, adapter=out_dir / "adapter0", torch_dtype=torch.float32, device="cpu")
    model.train()
    report["adapter_init_equal"] = sorted(trainable(model)) == sorted(init_lora) and all(
        torch.equal(full(p), init_lora[n]) for n, p in trainable(model).items())
    data = batches(ws)

    # reference: per step, each rank's micro-batch loss and gradient, averaged, AdamW step
    ref_opt = torch.optim.AdamW(list(trainable(ref).values()), lr=1e-2)
    ref_losses = []
    for _ in range(STEPS):
        per, losses = [], []
        for ids in data:
            ref.zero_grad(set_to_none=True)
            loss = ref(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
            per.append({n: p.grad.clone() for n, p in trainable(ref).items()})
        for n, p in trainable(ref).items():
            p.grad = torch.stack([g[n] for g in per]).sum(0) / len(data)
        ref_opt.step()
        ref_losses.append(losses)

    opt = torch.optim.AdamW(list(trainable(model).values()), lr=1e-2)
    loss_diff, losses = [], []
    for s in range(STEPS):
        if s == STEPS - 1:
            save_full_state(model, opt, out_dir / "resume.safetensors", rank)
        loss = step(model, opt, data[rank])
        every = [torch.zeros(()) for _ in range(ws)]
        dist.all_gather(every, loss)
        losses.append(every)
        loss_diff.append(max((a - b).abs().item() for a, b in zip(every, ref_losses[s])))
    report["loss_diff"] = loss_diff
    report["param_diff"] = max((full(p) - trainable(ref)[n]).abs().max().item()
                               for n, p in trainable(model).items())
    trained = {n: full(p).clone() for n, p in trainable(model).items()}

    # resume: a fresh sharded model (new LoRA values: a different seed) takes the step-2 state, then step 3
    torch.manual_seed(99)
    resumed = load_sharded_qlora(path, cfg, lora=LORA, torch_dtype=torch.float32, device="cpu")
    resumed.train()
    ropt = torch.optim.AdamW(list(trainable(resumed).values()), lr=1e-2)
    with torch.no_grad():  # wipe the base too, so that its bytes must come from the saved state dict
        for p in resumed.parameters():
            if not p.requires_grad:
                p.to_local().zero_()
    load_full_state(resumed, ropt, out_dir / "resume.safetensors", rank)
    loss = step(resumed, ropt, data[rank])
    report["resume_loss_equal"] = torch.equal(loss, losses[-1][rank])
    report["resume_params_equal"] = all(torch.equal(full(p), trained[n]) for n, p in trainable(resumed).items())
    report["resume_steps"] = [int(s["step"]) for s in ropt.state.values()][:1]
    gathered_base = {n: full(p) for n, p in resumed.named_parameters() if not p.requires_grad}
    base = {n: full(p) for n, p in model.named_parameters() if not p.requires_grad}
    report["resume_base_equal"] = sorted(gathered_base) == sorted(base) and all(
        torch.equal(as_bytes(gathered_base[n]), as_bytes(base[n])) for n in base)

    # the adapter saved after training loads back into a sharded model
    qpeft.save_adapter(model, out_dir / "adapter3")
    back = load_sharded_qlora(path, cfg, adapter=out_dir / "adapter3", torch_dtype=torch.float32, device="cpu")
    report["adapter_resume_equal"] = all(torch.equal(full(p), trained[n]) for n, p in trainable(back).items())
    report["n_lora"] = len(trained)

    # load_full_state_dict refuses a wrong key set on every rank, before changing anything
    from qpeft.distributed import ShardedLoadError, load_full_state_dict

    before = {n: full(p).clone() for n, p in trainable(back).items()}
    try:
        load_full_state_dict(back, {"model.nope": torch.zeros(1)} if rank == 0 else None)
        report["strict_error"] = None
    except ShardedLoadError as e:
        report["strict_error"] = str(e)
    report["strict_unchanged"] = all(torch.equal(full(p), before[n]) for n, p in trainable(back).items())
    # a shape error in the last unit is found before the first unit changes (rank 0 checks every unit first)
    last = list(trainable(back))[-1]
    bad = {**init_lora, last: init_lora[last][:, :-1].clone()}
    try:
        load_full_state_dict(back, bad if rank == 0 else None, strict=False)
        report["late_error"] = None
    except ShardedLoadError as e:
        report["late_error"] = str(e)
    report["late_unchanged"] = all(torch.equal(full(p), before[n]) for n, p in trainable(back).items())
    # strict=False with only the LoRA tensors: those change (to the initial values), the base keeps its bytes
    base_before = {n: full(p).clone() for n, p in back.named_parameters() if not p.requires_grad}
    load_full_state_dict(back, init_lora if rank == 0 else None, strict=False)
    report["partial_lora_equal"] = all(torch.equal(full(p), init_lora[n]) for n, p in trainable(back).items())
    report["partial_base_kept"] = all(torch.equal(full(p), base_before[n]) for n, p in back.named_parameters()
                                      if not p.requires_grad)
    return report


if __name__ == "__main__":
    run_case({"load": case_load, "train": case_train, "errors": case_errors})
