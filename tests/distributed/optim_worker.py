"""One gloo rank of the qpeft.optim-under-FSDP2 checks (spawned by test_fsdp2_optim.py): argv = out_dir, case.

case "train": the tiny QLoRA model of fsdp2_worker (28 LoRA matrices, fp32, 128 to 384 elements) sharded with
shard_qlora_model trains 3 steps with each class of CLASSES, each rank on its own micro-batch. min_8bit_size=200
puts the LoRA matrices of >= 256 elements on 8-bit states (decided on the whole parameter: their shards hold
64 to 192 elements) and k/v's B (32 x 4 = 128) on fp32 states, in one group. Checked on every rank:
- states live on the local shard (state1/state2 of the shard's shape, ceil(local / 256) absmax values), the
  8-bit decision is the global one, a rank with an empty shard (4 rows on 3 ranks) has empty states and counts
  its steps;
- against one process (FSDP2's gradient reduction emulated, fsdp2_worker.ring_average, which makes the gradients
  bit-identical): the parameters and every state equal, bit for bit, a single process that steps each rank's
  shard as a separate tensor (the 8-bit blocks of 256 start at each shard's first element: by design they are
  not the whole tensor's blocks); for the fp32-state class (PagedAdamW: its unpaged twin on CPU) also the plain
  single-process run on whole tensors, and at 3 ranks the difference to a single process that averages the
  micro-batch gradients plainly (at 2 ranks FSDP2's average is the plain mean bit for bit: test_fsdp2);
- for the paged classes (RESUMED), resume before step 3, bit-identical to the uninterrupted step 3, through the
  optimizer's own state_dict()/load_state_dict(), DCP (get_optimizer_state_dict + torch.distributed.checkpoint
  save / load + set_optimizer_state_dict: DCP's metadata file is a pickle, which DCP itself loads; qpeft never
  does) and the gathered full state dict (full_state_dict=True, loaded with broadcast_from_rank0=True).
case "bad" (a float MLP sharded by fully_shard, which torch 2.11 can do too): a mismatched state dict (group
count, group size, unknown parameter, shapes, a plain tensor where a DTensor belongs, a different number of quant
shards) raises ValueError naming the entry and leaves the optimizer as it was; a parameter added after sharding
(a plain tensor, a DTensor with another placement or mesh) is refused by add_param_group naming it, and by
step() when put into a group directly, before anything is updated.
Rank 0 writes out_dir/report.json; any failed check raises (non-zero exit)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist

import qpeft.optim
from fsdp2_worker import batches, dim0_chunk, make_model, ring_average, run_case, trainable

STEPS = 3
MIN_8BIT = 200
# name: (class, kwargs); lr 1e-2 as test_fsdp2's AdamW, so every step moves the adapters visibly. On CPU a paged
# class is its unpaged twin (PagedLion8bit runs Lion8bit's code), so these four cover every state layout.
CLASSES = {
    "AdamW8bit": (qpeft.optim.AdamW8bit, dict(lr=1e-2, min_8bit_size=MIN_8BIT)),
    "PagedAdamW8bit": (qpeft.optim.PagedAdamW8bit, dict(lr=1e-2, min_8bit_size=MIN_8BIT)),
    "PagedLion8bit": (qpeft.optim.PagedLion8bit, dict(lr=1e-3, weight_decay=0.1, min_8bit_size=MIN_8BIT)),
    "PagedAdamW": (qpeft.optim.PagedAdamW, dict(lr=1e-2)),
}
STATE_KEYS = ("state1", "state2", "absmax1", "absmax2")
# resumed three ways: the paged classes cover 2-state 8-bit + fp32, 1-state 8-bit + fp32 and fp32-only states
RESUMED = ("PagedAdamW8bit", "PagedLion8bit", "PagedAdamW")


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Reference:
    """One process: per step each micro-batch's gradient, averaged by `average`, then a qpeft.optim step on
    either the whole tensors or each rank's dim-0 chunk as a separate tensor (`chunked`: the sharded run's
    8-bit blocking). min_8bit_size is decided on the whole parameter, as the sharded optimizer does."""

    def __init__(self, init, data, ws, cls, kwargs, average, chunked):
        self.model, self.data, self.average = copy.deepcopy(init), data, average
        self.params = trainable(self.model)
        chunk = dim0_chunk(ws) if chunked else (lambda t, k: t)
        self.pieces = {}  # (name, k) -> the leaf tensor the optimizer updates (rank k's rows)
        for n, p in self.params.items():
            for k in range(ws if chunked else 1):
                c = chunk(p.detach(), k)
                if c.numel():
                    self.pieces[(n, k)] = c.clone().requires_grad_()
        self.chunk = chunk
        kw = {k: v for k, v in kwargs.items() if k != "min_8bit_size"}
        thr = kwargs.get("min_8bit_size", 4096)
        big = [t for (n, _), t in self.pieces.items() if self.params[n].numel() >= thr]
        small = [t for (n, _), t in self.pieces.items() if self.params[n].numel() < thr]
        self.opts = [cls(big, min_8bit_size=1, **kw)] if big else []
        if small:
            self.opts.append(cls(small, min_8bit_size=1 << 40, **kw))

    def step(self):
        per = []
        for ids in self.data:
            self.model.zero_grad(set_to_none=True)
            self.model(input_ids=ids, labels=ids).loss.backward()
            per.append({n: p.grad.clone() for n, p in self.params.items()})
        avg = {n: self.average([g[n] for g in per]) for n in per[0]}
        for (n, k), t in self.pieces.items():
            t.grad = self.chunk(avg[n], k).clone()
        for o in self.opts:
            o.step()
        with torch.no_grad():
            for (n, k), t in self.pieces.items():
                self.chunk(self.params[n].data, k).copy_(t)

    def state(self, n, k):
        for o in self.opts:
            if self.pieces[(n, k)] in o.state:
                return o.state[self.pieces[(n, k)]]
        raise KeyError((n, k))


def sharded_step(model, opt, ids):
    opt.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()


def check_layout(model, opt, rank, ws):
    """States on the local shard, 8-bit decided on the whole parameter; returns (#8-bit, #fp32, #empty)."""
    counts = [0, 0, 0]
    for n, p in trainable(model).items():
        lp, st = local(p), opt.state[p]
        quant = st["state1"].dtype == torch.uint8
        assert quant == (p.numel() >= MIN_8BIT and opt.bits == 8), (n, p.numel(), st["state1"].dtype)
        for k in ("state1", "state2"):
            if k in st:
                assert st[k].shape == lp.shape and not hasattr(st[k], "to_local"), (n, k, st[k].shape, lp.shape)
        for k in ("absmax1", "absmax2"):
            if k in st:
                assert st[k].numel() == -(-lp.numel() // 256), (n, k, st[k].numel(), lp.numel())
        assert st["step"] == STEPS, (n, st["step"])
        counts[0 if quant else 1] += 1
        counts[2] += lp.numel() == 0
    return counts


def state_equal(st, ref_st) -> bool:
    return all(torch.equal(st[k], ref_st[k]) for k in STATE_KEYS if k in st) and \
        sorted(k for k in st if k in STATE_KEYS) == sorted(k for k in ref_st if k in STATE_KEYS)


def params_diff(model, ref) -> float:
    return max((full(p) - ref.params[n]).abs().max().item() for n, p in trainable(model).items())


def snapshot(model):
    return {n: full(p).detach().clone() for n, p in trainable(model).items()}


def restore(model, values):
    """The LoRA values of `values` (full tensors) into the sharded model (each rank keeps its rows)."""
    from qpeft.distributed import load_full_state_dict

    load_full_state_dict(model, values if dist.get_rank() == 0 else None, strict=False)


def case_train(out_dir: Path, rank: int, ws: int) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from qpeft.distributed import shard_qlora_model

    init = make_model()
    data = batches(ws)
    ring = lambda g: ring_average(g, dim0_chunk(ws), False)  # noqa: E731  (FSDP2's reduce-scatter, ReduceOp.AVG)
    mean = lambda g: torch.stack(g).sum(0) / len(g)  # noqa: E731
    report = {"world_size": ws, "classes": {}}
    for name, (cls, kwargs) in CLASSES.items():
        r = {}
        model = shard_qlora_model(copy.deepcopy(init))
        opt = cls(list(trainable(model).values()), **kwargs)
        emu = Reference(init, data, ws, cls, kwargs, ring, chunked=True)
        refs = [emu]
        if opt.bits == 32:  # fp32 states: also the plain single-process run on whole tensors
            whole = Reference(init, data, ws, cls, kwargs, ring, chunked=False)
            refs.append(whole)
            if ws > 2:  # two ranks: FSDP2's average is the plain mean bit for bit (test_fsdp2), so emu is plain
                plain = Reference(init, data, ws, cls, kwargs, mean, chunked=False)
                refs.append(plain)
        saved = {}
        for s in range(STEPS):
            if s == STEPS - 1 and name in RESUMED:  # the state before the last step, three ways
                saved["params"] = snapshot(model)
                saved["own"] = opt.state_dict()
                dcp.save(get_optimizer_state_dict(model, opt), checkpoint_id=str(out_dir / f"dcp-{name}"))
                saved["full"] = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
            sharded_step(model, opt, data[rank])
            for ref in refs:
                ref.step()
        r["n_8bit"], r["n_fp32"], r["n_empty"] = check_layout(model, opt, rank, ws)
        chunk = dim0_chunk(ws)
        r["emu_param_diff"] = params_diff(model, emu)
        r["emu_states_equal"] = all(
            lp.numel() == 0 or state_equal(opt.state[p], emu.state(n, rank))
            for n, p in trainable(model).items() for lp in [local(p)])
        if opt.bits == 32:  # fp32 states are elementwise: the shard's states are the whole tensor's rows
            r["whole_param_diff"] = params_diff(model, whole)
            if ws > 2:
                r["plain_param_diff"] = params_diff(model, plain)
            r["whole_states_equal"] = all(
                torch.equal(opt.state[p][k], chunk(whole.state(n, 0)[k], rank))
                for n, p in trainable(model).items() for k in ("state1", "state2"))
        flags = torch.tensor([r["emu_states_equal"], r.get("whole_states_equal", True)], dtype=torch.int64)
        counts = torch.tensor([r["n_empty"]])
        dist.all_reduce(counts)
        r["empty_shards_all_ranks"] = int(counts)
        report["classes"][name] = r
        if name in RESUMED:
            r.update(full_layout(model, saved["full"]))
            r["resume"] = check_resume(init, cls, kwargs, model, opt, saved, data, out_dir / f"dcp-{name}", rank)
            flags = torch.cat([flags, torch.tensor(list(r["resume"].values()), dtype=torch.int64)])
        # every rank's view, gathered (each rank checks its own shard's states)
        every = [torch.zeros_like(flags) for _ in range(ws)]
        dist.all_gather(every, flags)
        r["all_ranks_ok"] = all(bool(e.all()) for e in every)
    return report


def check_resume(init, cls, kwargs, model, opt, saved, data, dcp_dir, rank) -> dict:
    """Before step 3 the state was saved three ways; a fresh sharded model and optimizer take it and step:
    parameters and states must equal the uninterrupted step 3 bit for bit. Returns {way: equal}, and what the
    gathered (full) state dict looks like."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    from qpeft.distributed import shard_qlora_model

    after = snapshot(model)
    r = {}
    for way in ("own", "dcp", "full"):
        m2 = shard_qlora_model(copy.deepcopy(init))
        restore(m2, saved["params"])
        o2 = cls(list(trainable(m2).values()), **kwargs)
        if way == "own":
            o2.load_state_dict(saved["own"])
        elif way == "dcp":  # DCP's own metadata file is a pickle, read by DCP (what a user of DCP runs)
            sd = get_optimizer_state_dict(m2, o2)
            dcp.load(sd, checkpoint_id=str(dcp_dir))
            set_optimizer_state_dict(m2, o2, sd)
        else:
            set_optimizer_state_dict(m2, o2, saved["full"] if rank == 0 else {},
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        sharded_step(m2, o2, data[rank])
        r[way] = all(torch.equal(full(p), after[n]) for n, p in trainable(m2).items()) and all(
            state_equal(o2.state[p2], opt.state[p]) and o2.state[p2]["step"] == STEPS
            for (n, p), p2 in zip(trainable(model).items(), trainable(m2).values()))
    return r


def full_layout(model, full_osd) -> dict:
    """The gathered state dict: every state1 at its parameter's global shape; the 8-bit ones' quant_shards."""
    states = full_osd["state"]
    return dict(
        full_state1_global=all(st["__bnb_optimizer_quant_state__"]["state1"].shape == trainable(model)[fqn].shape
                               for fqn, st in states.items()),
        full_quant_shards=sorted({st.get("quant_shards") for st in states.values()}, key=str))


# --- bad input ----------------------------------------------------------------------------------------------
def _snapshot_opt(opt):
    return ([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
             for p, st in opt.state.items()},
            [list(g["params"]) for g in opt.param_groups])


def _unchanged(opt, snap) -> bool:
    groups, states, params = snap
    return ([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
            and [list(g["params"]) for g in opt.param_groups] == params
            and {id(p) for p in opt.state} == set(states)
            and all(all(torch.equal(st[k], v) if torch.is_tensor(v) else st[k] == v for k, v in states[id(p)].items())
                    for p, st in opt.state.items()))


def _error(fn) -> str | None:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def case_bad(out_dir: Path, rank: int, ws: int) -> dict:
    """On a float MLP sharded by FSDP2's fully_shard (which torch 2.11 can shard too: only the uint8 storage of
    the 4-bit layers needs 2.12), so both lanes run it."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 40), torch.nn.GELU(), torch.nn.Linear(40, 8))
    for m in (model[0], model[2], model):
        fully_shard(m)
    params = list(model.parameters())  # weights of 640 and 320 elements (8-bit states), biases (fp32)
    opt = qpeft.optim.AdamW8bit(params, lr=1e-2, min_8bit_size=MIN_8BIT)
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(rank))

    def backward():
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()

    def snapshot_params():
        return [full(p).detach().clone() for p in params]

    backward()
    opt.step()
    good = opt.state_dict()
    i8 = next(i for i, p in enumerate(params) if opt.state[p]["state1"].dtype == torch.uint8)
    j = next(i for i, p in enumerate(params) if p.shape != params[i8].shape)

    def with_state(i, **changes):
        sd = copy.deepcopy(good)
        st = sd["state"][i]
        for k, v in changes.items():
            if k in st["__bnb_optimizer_quant_state__"]:
                st["__bnb_optimizer_quant_state__"][k] = v
            else:
                st[k] = v
        return sd

    W = "__bnb_optimizer_quant_state__"
    bad = {
        "groups": {**good, "param_groups": good["param_groups"] * 2},
        "group_size": {**good, "param_groups": [{**good["param_groups"][0],
                                                 "params": good["param_groups"][0]["params"][:-1]}]},
        "unknown_key": {**good, "state": {**good["state"], 999: good["state"][i8]}},
        "shape": with_state(i8, state1=good["state"][j][W]["state1"]),
        "plain": with_state(i8, state1=good["state"][i8][W]["state1"].full_tensor()),
        "quant_shards": with_state(i8, quant_shards=ws + 1),
        "absmax": with_state(i8, absmax1=good["state"][j][W]["absmax1"]) if "absmax1" in good["state"][j][W]
        else with_state(i8, absmax1=torch.zeros(3)),
    }
    out = {"load": {}}
    for name, sd in bad.items():
        snap = _snapshot_opt(opt)
        msg = _error(lambda: opt.load_state_dict(sd))
        out["load"][name] = {"error": msg, "unchanged": _unchanged(opt, snap)}
    # the good state dict still loads (and nothing above was half-loaded into it)
    opt.load_state_dict(good)

    mesh = params[0].device_mesh
    snap = _snapshot_opt(opt)
    other_mesh = DeviceMesh("cpu", list(reversed(range(ws))))  # every rank calls (it creates a group)
    added = {
        "plain": torch.nn.Parameter(torch.randn(8, 4)),
        "replicated": torch.nn.Parameter(distribute_tensor(torch.zeros(8, 4), mesh, [Replicate()])),
        "other_mesh": torch.nn.Parameter(DTensor.from_local(torch.zeros(8 // ws, 4), other_mesh, [Shard(0)],
                                                            run_check=False)),
    }
    out["add"] = {}
    for name, p in added.items():
        msg = _error(lambda: opt.add_param_group({"params": [p]}))
        out["add"][name] = {"error": msg, "unchanged": _unchanged(opt, snap) and len(opt.param_groups) == 1}
    # put into a group directly (as code that edits param_groups does): step() refuses before updating anything
    before = snapshot_params()
    backward()
    plain = added["plain"]
    plain.grad = torch.ones_like(plain)
    opt.param_groups[0]["params"].append(plain)
    msg = _error(opt.step)
    opt.param_groups[0]["params"].pop()
    out["step_plain"] = {"error": msg, "unchanged": _unchanged(opt, snap) and all(
        torch.equal(full(p), b) for p, b in zip(params, before))}
    # a DTensor parameter whose gradient is a plain tensor
    g = params[0].grad
    params[0].grad = torch.zeros(params[0].shape)
    msg = _error(opt.step)
    params[0].grad = g
    out["step_plain_grad"] = {"error": msg, "unchanged": _unchanged(opt, snap) and all(
        torch.equal(full(p), b) for p, b in zip(params, before))}
    opt.step()  # the optimizer still works
    out["then_steps"] = int(opt.state[params[0]]["step"])
    out["i8"], out["j"] = i8, j
    return out


if __name__ == "__main__":
    run_case({"train": case_train, "bad": case_bad})
