"""qpeft.optim on DTensor parameters: FSDP2 (`fully_shard`, `qpeft.distributed.shard_qlora_model`), or any
DTensor sharded on a 1-D mesh along one dimension (`Shard(d)`) or replicated.

States live on the local shard: `p.to_local()` and `p.grad.to_local()` go to the update kernel, and every state
is allocated at the local shard's shape (1/world_size of the parameter), never at the global one. The rules:
- min_8bit_size is decided on the whole parameter (`p.numel()`, global), as on one process: the state precision
  of a parameter does not change with the mesh (bitsandbytes under FSDP1 and torchao under FSDP2 decide on the
  shard, bitsandbytes #2080, torchao #4912). Paging (`page_min_size`) is a memory decision, made on the shard.
- The 8-bit blockwise quantization (one absmax per 256 consecutive elements of the flattened tensor) runs per
  local shard: a shard's blocks start at its first element. So with `Shard(d)` the 8-bit states equal a single
  process's only when every shard's size is a multiple of 256; in general they equal a single process that
  steps each shard as a separate tensor (what the tests compare bit for bit). fp32 states are elementwise: a
  sharded run is bit-identical to one process given the same gradients. A replicated DTensor's blocks are the
  whole tensor's, as on one process.
- An empty local shard (FSDP2 pads uneven dim-0 chunks: 4 rows on 3 ranks are 2, 2, 0) has empty states; its
  `step` counts as on every other rank.

state_dict() (what `torch.distributed.checkpoint.state_dict.get_optimizer_state_dict` reads) gives, for a
DTensor parameter, its states as DTensors sharded like the parameter (copies of the live states, so that a
failed load through DCP, which writes into these tensors, leaves the optimizer as it was): state1 / state2 at
the parameter's global shape; absmax1 / absmax2 of `Shard(d)` parameters as a (world_size, max_blocks) DTensor,
one row per shard (a shard's ceil(local numel / 256) values, zero-padded to the largest shard's count), with
`quant_shards` = world_size next to `step`: the number of shards the 8-bit blocks were computed over. A
gathered (full_state_dict) copy of 8-bit states therefore loads only into the same sharding (the same world
size: checked), never into one process; fp32 states gather to the single-process layout and load anywhere.
"""
from __future__ import annotations

import sys

import torch

from ..reference.optim_8bit import BLOCKSIZE

QUANT_SHARDS_KEY = "quant_shards"


def dtensor_type():
    mod = sys.modules.get("torch.distributed.tensor")  # no DTensor can exist unless this module is loaded
    return getattr(mod, "DTensor", None)


def is_dtensor(t) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(t, cls)


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return f"a {type(t).__name__}"
    if not is_dtensor(t):
        return f"a plain {type(t).__name__} of shape {tuple(t.shape)}"
    mesh = t.device_mesh
    return (f"a DTensor of shape {tuple(t.shape)} on the {mesh.device_type} mesh of ranks {mesh.mesh.tolist()} "
            f"with placements {tuple(t.placements)}")


def _same_sharding(a, b) -> bool:
    return (a.device_mesh is b.device_mesh or a.device_mesh == b.device_mesh) and \
        tuple(a.placements) == tuple(b.placements)


def _check_supported(p, where: str) -> None:
    from torch.distributed.tensor import Replicate, Shard

    pl = tuple(p.placements)
    if p.device_mesh.ndim != 1 or not (type(pl[0]) is Shard or isinstance(pl[0], Replicate)):
        raise ValueError(f"{where}: qpeft.optim supports DTensor parameters on a 1-D mesh, sharded along one "
                         f"dimension (Shard(d), as FSDP2's fully_shard) or replicated; got {_describe(p)}")


def check_params(param_groups: list, where: str = "param_groups") -> bool:
    """Every parameter a plain tensor, or every one a DTensor on one 1-D mesh with one placement; returns whether
    they are DTensors. A plain tensor among DTensors is a parameter added after sharding (or kept from before
    it): FSDP2 neither shards nor reduces it, so each rank would train its own copy."""
    first = first_where = None
    for gi, group in enumerate(param_groups):
        for i, p in enumerate(group["params"]):
            here = f"{where}[{gi}]['params'][{i}]"
            if is_dtensor(p):
                _check_supported(p, here)
            if first is None:
                first, first_where = p, here
                continue
            if is_dtensor(p) != is_dtensor(first) or (is_dtensor(p) and not _same_sharding(p, first)):
                raise ValueError(
                    f"{here} is {_describe(p)}, but {first_where} is {_describe(first)}: every parameter of a "
                    f"qpeft.optim optimizer must be sharded the same way. A parameter added after sharding is "
                    f"neither sharded nor reduced across ranks by FSDP2 (each rank would train its own copy): "
                    f"shard the model first (fully_shard / qpeft.distributed.shard_qlora_model), then build the "
                    f"optimizer from its parameters.")
    return first is not None and is_dtensor(first)


def check_grad(p, where: str) -> None:
    """A DTensor parameter's gradient must be a DTensor sharded like it (FSDP2's reduce-scattered gradient);
    anything else (a plain tensor, a pending Partial reduction) would update the shard with the wrong values."""
    g = p.grad
    if not is_dtensor(g) or not _same_sharding(g, p) or g.shape != p.shape:
        raise ValueError(f"{where}.grad must be a DTensor sharded like its parameter ({_describe(p)}), got "
                         f"{_describe(g)}")


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor the kernel updates in place: a DTensor's local shard (its storage: writes reach the parameter),
    or `t` itself."""
    if is_dtensor(t):
        return t._local_tensor
    return t


def quant_shards(p) -> int:
    """How many shards the 8-bit blocks of `p` are computed over: the mesh size for Shard(d), else 1."""
    from torch.distributed.tensor import Shard

    if is_dtensor(p) and type(p.placements[0]) is Shard:
        return p.device_mesh.size()
    return 1


def max_blocks(p) -> int:
    """The largest shard's number of 256-element blocks (torch.chunk's first chunk is the largest)."""
    shape = list(p.shape)
    d = p.placements[0].dim
    shape[d] = -(-shape[d] // p.device_mesh.size())
    n = 1
    for s in shape:
        n *= s
    return -(-n // BLOCKSIZE)


def wrap_state(p, st: dict, quant_keys: tuple) -> dict:
    """The state_dict() entry of DTensor parameter `p` from its live local state `st`: DTensor copies."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    out = dict(st)
    for k in ("state1", "state2"):
        if k in st:
            out[k] = DTensor.from_local(st[k].clone(), mesh, placements, run_check=False, shape=p.shape,
                                        stride=p.stride())
    shards = quant_shards(p)
    for k in quant_keys:
        if k not in st:
            continue
        a = st[k]
        if shards == 1:
            out[k] = DTensor.from_local(a.clone(), mesh, (Replicate(),), run_check=False)
            continue
        mb = max_blocks(p)
        padded = torch.zeros(1, mb, dtype=a.dtype, device=a.device)
        padded[0, :a.numel()] = a
        out[k] = DTensor.from_local(padded, mesh, (Shard(0),), run_check=False, shape=(shards, mb), stride=(mb, 1))
    if any(k in st for k in quant_keys) and shards > 1:
        out[QUANT_SHARDS_KEY] = shards
    return out


def unwrap_state(p, lp: torch.Tensor, flat: dict, quant: bool, where: str) -> dict:
    """The local tensors of the saved states of DTensor parameter `p` (local shard `lp`), checked: DTensors
    sharded like `p` (state1 / state2) and the absmax layout of wrap_state, the same number of quant shards.
    Raises ValueError naming the entry; changes nothing."""
    from torch.distributed.tensor import Replicate, Shard

    out = {}
    for k in ("state1", "state2"):
        t = flat.get(k)
        if t is None:
            continue
        if not is_dtensor(t) or not _same_sharding(t, p) or t.shape != p.shape:
            raise ValueError(
                f"{where}['{k}'] must be a DTensor sharded like its parameter ({_describe(p)}), got "
                f"{_describe(t)}. A single-process "
                f"or gathered (full) state dict loads with torch.distributed.checkpoint.state_dict."
                f"set_optimizer_state_dict(model, optimizer, state_dict, options=StateDictOptions("
                f"full_state_dict=True, broadcast_from_rank0=True))")
        out[k] = t.to_local()
    if not quant:
        return out
    shards, saved_shards = quant_shards(p), flat.get(QUANT_SHARDS_KEY, 1)
    if saved_shards != shards:
        raise ValueError(f"{where}['{QUANT_SHARDS_KEY}']: these 8-bit states were blocked over {saved_shards} "
                         f"shard(s), this parameter has {shards}: 8-bit states resume only with the same "
                         f"sharding (world size); fp32 states reshard freely")
    blocks = -(-lp.numel() // BLOCKSIZE)
    for k in ("absmax1", "absmax2"):
        a = flat.get(k)
        if a is None:
            continue
        if shards == 1:
            ok = is_dtensor(a) and a.device_mesh == p.device_mesh and tuple(a.placements) == (Replicate(),) \
                and a.shape == (blocks,)
            want = f"a replicated DTensor of {blocks} entries on the parameter's mesh"
        else:
            mb = max_blocks(p)
            ok = is_dtensor(a) and a.device_mesh == p.device_mesh and tuple(a.placements) == (Shard(0),) \
                and a.shape == (shards, mb)
            want = f"a ({shards}, {mb}) DTensor sharded by rows (Shard(0)) on the parameter's mesh"
        if not ok:
            raise ValueError(f"{where}['{k}'] must be {want} (one row of per-shard absmax per rank), got "
                             f"{_describe(a)}")
        out[k] = a.to_local().reshape(-1)[:blocks]
    return out


def check_unsharded_state(flat: dict, where: str) -> None:
    """A plain parameter's saved states: no DTensor (a sharded state dict: gather it first), and 8-bit states
    blocked over the whole tensor (a gathered copy of per-shard blocks would decode to the wrong values)."""
    for k, v in flat.items():
        if is_dtensor(v):
            raise ValueError(f"{where}['{k}'] is a DTensor, but its parameter is a plain tensor: load a sharded "
                             f"optimizer state into the sharded model's optimizer, or gather it first "
                             f"(get_optimizer_state_dict(..., options=StateDictOptions(full_state_dict=True)))")
    shards = flat.get(QUANT_SHARDS_KEY, 1)
    if shards != 1:
        raise ValueError(f"{where}['{QUANT_SHARDS_KEY}'] = {shards}: these 8-bit states were blocked per shard of "
                         f"a {shards}-way sharded parameter and load only into the same sharding; this parameter "
                         f"is not sharded")
