"""The torch.optim.Optimizer behind every qpeft.optim class: state layout, the multi-tensor step, checkpoints.

State per parameter, with bitsandbytes' names (so that checkpoints load both ways):
  step: int (incremented before the update, so the first update is step 1)
  state1 (m) and, for Adam, state2 (v): uint8 codes of the parameter's shape plus absmax1/absmax2 fp32
  [ceil(n/256)] and the code books qmap1 (signed dynamic map) / qmap2 (unsigned), when the parameter has at least
  `min_8bit_size` elements (decided on the whole parameter: under FSDP bitsandbytes decides on the shard); fp32
  states of the parameter's shape otherwise, and for every parameter of the 32-bit classes.
`step()` updates each parameter group with one call of `torch.ops.qpeft.optim_8bit_step` per (device, state kind):
one kernel launch per group and parameter dtype on a GPU, never a host sync. Semantics: qpeft/reference/optim_8bit.py.
The per-tensor hyper-parameters (bias corrections, lr, decay) are computed on the parameters' device by
`reference.hyper_table` from the steps and the learning rate.

capturable=True (torch.optim.Adam's argument) makes `step()` CUDA-graph capturable: `step` is an int64 device
tensor per parameter, incremented on the device, and each group's lr is a float64 0-dim device tensor (a float lr
is converted at construction; LR schedulers fill it in place), so a replayed graph reads the current step and lr
from device memory. The update is bit-identical to capturable=False (same table, same kernels). Re-capture after
load_state_dict (it installs new state tensors), as with torch's optimizers.
`state_dict()` writes bitsandbytes' layout (the quantization tensors under "__bnb_optimizer_quant_state__", step an
int); `load_state_dict()` reads that layout and bitsandbytes' older flat one; both contain only tensors, ints,
floats, tuples and strings, so `torch.load(weights_only=True)` reads them.

DTensor parameters (FSDP2): states on the local shard, sized to it; state_dict() gives them as DTensors sharded
like the parameters (what DCP's get/set_optimizer_state_dict expect); every parameter of one optimizer sharded
the same way (add_param_group and step() refuse otherwise). The rules and the 8-bit blocking per shard: _sharded.py.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from itertools import chain

import torch

from .. import _cuda
from ..formats import codes
from ..ops import optim_8bit as _ops  # noqa: F401  (registers qpeft::optim_8bit_step)
from ..reference.optim_8bit import BLOCKSIZE, f32, hyper_table
from . import _sharded
from . import paged as _paged

WRAP_KEY = "__bnb_optimizer_quant_state__"  # bitsandbytes >= 0.49.2 (PR #1840)
WRAPPED_KEYS = ("state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2")
PAGE_MIN_SIZE = 4096  # default: page every state but tiny ones (bitsandbytes pages only >= 1e5 elements, so
#                       r=16 LoRA factors of a 7B model, 65,536 elements, are never paged there)

_warned: set[str] = set()


def warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, UserWarning, stacklevel=3)


def _scalar_group(group: dict) -> dict:
    """A param group with its one-element tensor values (lr, a scheduler's initial_lr) as Python floats."""
    return {k: (v.item() if isinstance(v, torch.Tensor) and k != "params" and v.numel() == 1 else v)
            for k, v in group.items()}


class Optimizer8bitBase(torch.optim.Optimizer):
    """Shared base; use the classes of qpeft.optim. `kind` "adam" (2 states) or "lion" (1 state)."""

    kind = "adam"

    def __init__(self, params, defaults: dict, *, bits: int, min_8bit_size: int = 4096, is_paged: bool = False,
                 page_min_size: int = PAGE_MIN_SIZE, capturable: bool = False):
        if bits not in (8, 32):
            raise ValueError(f"bits must be 8 or 32, got {bits}")
        if not isinstance(min_8bit_size, int) or min_8bit_size < 1:
            raise ValueError(f"min_8bit_size must be an int >= 1, got {min_8bit_size!r}")
        if not isinstance(page_min_size, int) or page_min_size < 0:
            raise ValueError(f"page_min_size must be an int >= 0, got {page_min_size!r}")
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be a bool, got {capturable!r}")
        self.capturable = capturable
        self._check_hparams(defaults, "defaults")
        self.bits = bits
        self.min_8bit_size = min_8bit_size
        self.is_paged = bool(is_paged)
        self.page_min_size = page_min_size
        self._qmaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pagers: dict[torch.device, _paged.PagedStates] = {}
        self._checked_params: tuple = ()  # the parameters _check_sharding last accepted (by identity)
        super().__init__(params, defaults)
        for i, group in enumerate(self.param_groups):
            self._check_hparams(group, f"param_groups[{i}]")
            if capturable:
                group["lr"] = self._lr_tensor(group, f"param_groups[{i}]")

    # ------------------------------------------------------------------------------------------ validation
    def _check_hparams(self, group: dict, where: str) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        if isinstance(lr, torch.Tensor):
            if not getattr(self, "capturable", False):
                raise TypeError(f"{where}: lr must be a Python float, got a Tensor (a Tensor lr needs "
                                f"capturable=True)")
            if lr.numel() != 1 or not lr.dtype.is_floating_point:
                raise ValueError(f"{where}: lr must be a float Tensor with one element, got {lr.dtype} "
                                 f"{tuple(lr.shape)}")
            # its value is on the device: reading it here would be a host sync in every step
        elif not lr >= 0.0:
            raise ValueError(f"{where}: lr must be >= 0, got {lr}")
        if not wd >= 0.0:
            raise ValueError(f"{where}: weight_decay must be >= 0, got {wd}")
        betas = group["betas"]
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"{where}: betas must be two floats in [0, 1), got {betas}")
        if not group.get("eps", 0.0) >= 0.0:
            raise ValueError(f"{where}: eps must be >= 0, got {group['eps']}")

    def _lr_tensor(self, group: dict, where: str) -> torch.Tensor:
        """The group's lr as a float64 0-dim tensor on its parameters' device (capturable=True)."""
        devices = {p.device for p in group["params"]}
        if len(devices) != 1:
            raise ValueError(f"{where}: capturable=True needs every parameter of a group on one device, got "
                             f"{sorted(map(str, devices))}")
        dev = devices.pop()
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.device != dev:
                raise ValueError(f"{where}: lr is a Tensor on {lr.device}; capturable=True needs it on the "
                                 f"parameters' device {dev}")
            if not lr.item() >= 0.0:
                raise ValueError(f"{where}: lr must be >= 0, got {lr.item()}")
            return lr
        return torch.tensor(float(lr), dtype=torch.float64, device=dev)

    # ------------------------------------------------------------------------------------------ DTensor params
    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, refusing a group whose parameters are sharded differently from the others'
        (a plain tensor among FSDP2's DTensors: a parameter added after sharding); the optimizer is unchanged."""
        super().add_param_group(param_group)
        try:
            self._check_sharding()
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_sharding(self) -> None:
        """_sharded.check_params when the parameter set changed (param_groups can be edited in place, as
        accelerate's FSDP2 preparation does)."""
        ids = tuple(id(p) for g in self.param_groups for p in g["params"])
        if ids != self._checked_params:
            _sharded.check_params(self.param_groups)
            self._checked_params = ids

    # ------------------------------------------------------------------------------------------ state
    def _qmap(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The two code books, one copy per device shared by every parameter (as bitsandbytes)."""
        if device not in self._qmaps:
            self._qmaps[device] = (codes.dynamic_map(signed=True, device=device),
                                   codes.dynamic_map(signed=False, device=device))
        return self._qmaps[device]

    def _pager(self, p: torch.Tensor) -> _paged.PagedStates | None:
        """The paged allocator of p's device when p's states are paged, else None."""
        if not self.is_paged:
            return None
        if not _cuda.rt.is_cuda(p.device):
            warn_once(f"qpeft.optim.{type(self).__name__}: paged optimizers page optimizer states between GPU and "
                      f"host memory; parameters on {p.device.type} get ordinary (unpaged) states, and the update is "
                      f"identical to {type(self).__name__.replace('Paged', '')}'s.")
            return None
        if p.numel() < self.page_min_size:
            return None
        if p.device not in self._pagers:
            self._pagers[p.device] = _paged.PagedStates(p.device)
        return self._pagers[p.device]

    def _zeros(self, p: torch.Tensor, dtype: torch.dtype, pager) -> torch.Tensor:
        if pager is not None:
            return pager.zeros(p.shape, dtype)
        return torch.zeros(p.shape, dtype=dtype, device=p.device)

    def _init_state(self, p: torch.Tensor) -> dict:
        # a DTensor's states live on its local shard (`lp`), at the shard's size; the 8-bit decision is made on
        # the whole parameter (p.numel() is the global count), so it does not change with the mesh (_sharded)
        lp = _sharded.local(p)
        pager = self._pager(lp)
        quant = self.bits == 8 and p.numel() >= self.min_8bit_size  # strict <: 4096 elements get 8-bit states
        st = {"step": self._step_value(0, lp.device)}
        names = ("state1", "state2") if self.kind == "adam" else ("state1",)
        for k, name in enumerate(names):
            st[name] = self._zeros(lp, torch.uint8 if quant else torch.float32, pager)
            if quant:
                st[f"qmap{k + 1}"] = self._qmap(lp.device)[k]
                blocks = -(-lp.numel() // BLOCKSIZE)
                st[f"absmax{k + 1}"] = torch.zeros(blocks, dtype=torch.float32, device=lp.device)
        return st

    def _step_value(self, step: int, device: torch.device):
        """A state's step as stored: an int (bitsandbytes' layout), or an int64 0-dim device tensor (capturable)."""
        if self.capturable:
            return torch.tensor(step, dtype=torch.int64, device=device)
        return step

    # ------------------------------------------------------------------------------------------ step
    def _hyper(self, group: dict, device: torch.device, steps: list) -> torch.Tensor:
        """The (T, 4) fp32 hyper table of one bucket, on `device` (reference.hyper_table)."""
        if self.capturable:
            t = torch.stack(steps)
        else:
            t = torch.tensor(steps, dtype=torch.int64)
            if _cuda.rt.is_cuda(device):  # no host sync: pinned staging, asynchronous copy on the current stream
                t = _cuda.rt.pin(t)
            t = t.to(device, non_blocking=True)
        b1, b2 = group["betas"]
        return hyper_table(self.kind, group["lr"], t, b1, b2, group["eps"], group["weight_decay"])

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns closure() when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_sharding()
        for gi, group in enumerate(self.param_groups):  # every gradient checked before any update
            for i, p in enumerate(group["params"]):
                if p.grad is not None and _sharded.is_dtensor(p):
                    _sharded.check_grad(p, f"param_groups[{gi}]['params'][{i}]")
        for gi, group in enumerate(self.param_groups):
            self._check_hparams(group, f"param_groups[{gi}]")
            b1, b2 = (f32(b) for b in group["betas"])
            buckets: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"qpeft.optim.{type(self).__name__} does not support sparse gradients")
                st = self.state[p]
                if not st:
                    st.update(self._init_state(p))
                if not self.capturable:
                    st["step"] += 1
                lp = _sharded.local(p)  # a DTensor's local shard and gradient; `p` itself otherwise
                if lp.numel() == 0:
                    # an empty shard (FSDP2: 4 rows on 3 ranks are 2, 2, 0): nothing to update; its step counts
                    # (capturable: below) as on the ranks that hold rows
                    if self.capturable:
                        st["step"] += 1
                    continue
                quant = st["state1"].dtype == torch.uint8
                b = buckets[(lp.device, quant)]
                b["p"].append(lp)
                b["g"].append(_sharded.local(p.grad))
                b["st"].append(st)
            for (device, quant), b in buckets.items():
                steps = [st["step"] for st in b["st"]]
                if self.capturable:
                    torch._foreach_add_(steps, 1)  # on the device: a graph replay increments them too
                self._update(device, quant, b, self._hyper(group, device, steps), b1, b2)
        return loss

    def _update(self, device, quant: bool, b: dict, hyper: torch.Tensor, b1: float, b2: float) -> None:
        adam = self.kind == "adam"
        params, grads, copies = [], [], []
        for p, g in zip(b["p"], b["g"]):
            g = g if g.is_contiguous() else g.contiguous()
            if p.is_contiguous():
                params.append(p.data)
            else:  # updated in a contiguous copy, written back below
                tmp = p.data.contiguous()
                params.append(tmp)
                copies.append((p, tmp))
            grads.append(g)
        sts = b["st"]
        lists = {k: [st[k] for st in sts] for k in (("state1", "state2") if adam else ("state1",))}
        staged = []
        for ts in lists.values():
            for i, t in enumerate(ts):
                pager = self._pagers.get(device)
                if pager is not None and pager.owns(t):
                    ts[i] = pager.stage(t)  # prefetch (managed) or a device copy (pinned-host fallback)
                    staged.append((pager, t, ts[i]))
        absmax1 = [st["absmax1"] for st in sts] if quant else []
        absmax2 = [st["absmax2"] for st in sts] if (quant and adam) else []
        qmap1, qmap2 = self._qmap(device)
        torch.ops.qpeft.optim_8bit_step(params, grads, lists["state1"], lists.get("state2", []), absmax1, absmax2,
                                        qmap1, qmap2, hyper, b1, b2, self.kind)
        for pager, home, dev in staged:
            pager.unstage(home, dev)
        for p, tmp in copies:
            p.data.copy_(tmp)

    # ------------------------------------------------------------------------------------------ paging
    def evict(self) -> None:
        """Push every paged state to host memory now (on the current stream), e.g. before a memory-hungry phase;
        the next step() brings them back. A no-op for states that are not paged (CPU parameters among them)."""
        for pager in self._pagers.values():
            for st in self.state.values():
                for k in ("state1", "state2"):
                    t = st.get(k)
                    if t is not None and pager.owns(t):
                        pager.evict(t)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _sync_paged(self) -> None:
        for pager in self._pagers.values():
            if self.capturable:  # copies back may come from graph replays, which record no event
                _cuda.rt.synchronize(pager.device)
            pager.synchronize()

    def state_dict(self) -> dict:
        """bitsandbytes' layout; with capturable=True the device steps and lr are written as an int and a float
        (as bitsandbytes stores them), so either kind of optimizer, and bitsandbytes', loads the result."""
        self._sync_paged()
        sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]  # super() numbers them in this order
        state = {}
        for k, st in sd["state"].items():
            if _sharded.is_dtensor(params[k]):  # DTensor copies sharded like the parameter (_sharded)
                st = _sharded.wrap_state(params[k], st, ("absmax1", "absmax2"))
            out = {key: v for key, v in st.items() if key not in WRAPPED_KEYS}
            if isinstance(out.get("step"), torch.Tensor):
                out["step"] = int(out["step"].item())
            out[WRAP_KEY] = {key: st[key] for key in WRAPPED_KEYS if key in st}
            state[k] = out
        return {"state": state, "param_groups": [_scalar_group(g) for g in sd["param_groups"]]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load our state_dict() or bitsandbytes' (wrapped or flat layout). Validates everything before changing
        the optimizer; states are copied onto each parameter's device (into paged memory for paged states)."""
        self._check_sharding()
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) or \
                not isinstance(state_dict.get("param_groups"), list):
            keys = list(state_dict)[:4] if isinstance(state_dict, dict) else ""
            raise ValueError(f"state_dict must be a dict with 'state' (a dict) and 'param_groups' (a list), got "
                             f"{type(state_dict).__name__} {keys}")
        groups = self.param_groups
        # Tensor hyper-parameters (torch's capturable optimizers store lr, schedulers initial_lr as tensors) are read
        # as their values; a capturable optimizer keeps its own lr tensors and fills them below
        saved_groups = [_scalar_group(sg) for sg in state_dict["param_groups"]]
        if len(groups) != len(saved_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} parameter groups, the optimizer {len(groups)}")
        for i, (g, sg) in enumerate(zip(groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(f"state_dict's param_groups[{i}] has {len(sg['params'])} parameters, the "
                                 f"optimizer's {len(g['params'])}")
            self._check_hparams(sg, f"state_dict param_groups[{i}]")
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in groups)))
        new_state = {}
        for key, saved in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"state_dict has a state for parameter {key!r}, which no parameter group lists")
            p = id_map[key]
            new_state[p] = self._load_param_state(p, saved, key)
        self.state = defaultdict(dict, new_state)
        loaded = []
        for g, sg in zip(groups, saved_groups):
            ng = {**sg, "params": g["params"]}
            if self.capturable:
                g["lr"].fill_(sg["lr"])  # the same tensor: whatever holds it (a scheduler, a graph) sees the value
                ng["lr"] = g["lr"]
            loaded.append(ng)
        self.param_groups = loaded

    def _load_param_state(self, p: torch.Tensor, saved: dict, key) -> dict:
        flat = {k: v for k, v in saved.items() if k != WRAP_KEY}
        flat.update(saved.get(WRAP_KEY, {}))
        where = f"state_dict['state'][{key!r}]"
        step = flat.get("step")
        if isinstance(step, torch.Tensor):
            step = step.item()
        if step is None or int(step) != step or step < 0:
            raise ValueError(f"{where}['step'] must be an int >= 0, got {flat.get('step')!r}")
        names = ("state1", "state2") if self.kind == "adam" else ("state1",)
        if "state1" not in flat or not isinstance(flat["state1"], torch.Tensor):
            raise ValueError(f"{where} has no 'state1' tensor")
        quant = flat["state1"].dtype == torch.uint8
        # a DTensor parameter: its states are the saved DTensors' local shards (checked against its sharding)
        if _sharded.is_dtensor(p):
            flat.update(_sharded.unwrap_state(p, _sharded.local(p), flat, quant, where))
        else:
            _sharded.check_unsharded_state(flat, where)
        lp = _sharded.local(p)
        pager = self._pager(lp)
        st = {"step": self._step_value(int(step), lp.device)}
        for k, name in enumerate(names):
            t = flat.get(name)
            want = torch.uint8 if quant else torch.float32
            if not isinstance(t, torch.Tensor) or t.dtype != want or t.numel() != lp.numel():
                raise ValueError(f"{where}['{name}'] must be a {want} tensor with {lp.numel()} elements, got "
                                 f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
            buf = self._zeros(lp, want, pager)
            buf.view(-1).copy_(t.reshape(-1))
            st[name] = buf
            if quant:
                qmap = flat.get(f"qmap{k + 1}")
                mine = self._qmap(lp.device)[k]
                if not isinstance(qmap, torch.Tensor) or qmap.shape != (256,) or \
                        not torch.equal(qmap.to(mine.device, torch.float32), mine):
                    raise ValueError(f"{where}['qmap{k + 1}'] must be bitsandbytes' "
                                     f"{'signed' if k == 0 else 'unsigned'} dynamic map (256 fp32 entries)")
                st[f"qmap{k + 1}"] = mine
                blocks = -(-lp.numel() // BLOCKSIZE)
                a = flat.get(f"absmax{k + 1}")
                if not isinstance(a, torch.Tensor) or a.dtype != torch.float32 or a.numel() != blocks:
                    raise ValueError(f"{where}['absmax{k + 1}'] must be fp32 with ceil(n/256) = {blocks} entries, "
                                     f"got {getattr(a, 'dtype', type(a))} {tuple(getattr(a, 'shape', ()))}")
                st[f"absmax{k + 1}"] = a.reshape(-1).to(lp.device, copy=True)
        return st
