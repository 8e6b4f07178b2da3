"""Loading a QLoRA model straight into FSDP2 shards: rank 0 reads and quantizes, one decoder layer at a time,
and every rank keeps only its shard (the FSDP2 meta-device recipe of torchtitan / torchtune, with qpeft's
quantize-on-load).

    model = qpeft.distributed.load_sharded_qlora(path, qpeft.QPeftConfig(), lora=dict(r=16, lora_alpha=32))

Every rank builds the model from config.json with its parameters on the meta device (buffers such as rotary
`inv_freq` are computed for real by the modules' own __init__: they are small and identical on every rank),
swaps the linears for QLinearNF4 exactly as `from_pretrained(..., quantization_config=QPeftConfig(...))` does
(the same QPeftHfQuantizer picks the layers), adds LoRA (`lora=` or `adapter=`), shards with
`shard_qlora_model` and materialises only the shards (`to_empty`). Then, for each decoder layer and finally the
rest of the model, rank 0 reads just that unit's tensors from the safetensors checkpoint (safe_open: lazily),
quantizes its linear weights (QLinearNF4._quantize, the op from_pretrained uses: byte-identical), packs the
unit's full tensors into one uint8 buffer and broadcasts it; each rank copies its rows into its local shards and
drops the buffer. So a rank other than 0 never holds more than one unit's full tensors, and never opens the
checkpoint. A pre-quantized checkpoint (qpeft's save_pretrained, or transformers + bitsandbytes 4-bit) is copied
byte for byte, not re-quantized.

`load_full_state_dict(model, state_dict)` uses the same per-unit broadcast to load a full (gathered) state dict
in the model's own keys (bitsandbytes' Linear4bit keys for the 4-bit layers: what
`get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))` returns) into a sharded model, for
resuming. torch's `set_model_state_dict(..., full_state_dict=True)` cannot do it for QLinearNF4: DCP matches keys
against `named_parameters()` / `named_buffers()` (`weight`, `absmax_bytes`, `quant_map`, ...), not the state
dict's bitsandbytes keys (`weight.absmax`, `weight.quant_state.bitsandbytes__nf4`, ...), so with
`broadcast_from_rank0=True` the ranks other than 0 receive only the packed `weight` (`_broadcast_tensors` keeps a
received tensor only under a key of the local model state), and the layer's own `_load_from_state_dict` refuses
a sharded layer rather than guess the missing statistics.

Sharded checkpoints (DCP): `torch.distributed.checkpoint.save` / `load` of `get_model_state_dict(model)` with
the default file-system storage round-trips the uint8 shards bit-exactly (tried at 2 gloo ranks on torch 2.15:
`load` writes in place into the state dict's tensors, which alias QLinearNF4's shards and buffers, so no
`set_model_state_dict` is needed), but its `.metadata` file is a pickle (`FileSystemReader.read_metadata` calls
`pickle.load`) and qpeft never loads pickles; the safetensors-based `HuggingFaceStorageWriter` / `Reader` pair
reloaded different values in the same trial (not investigated). So resume here goes through the gathered
state dict in safetensors (`load_full_state_dict`) and the adapter files.

Consistency: rank 0 checks every tensor of a unit (present, shape, dtype, header) before anything is sent; on a
problem every rank raises the same ShardedLoadError and no model is returned (a half-loaded model is never
handed out). Any other failure, on any rank, before or during loading (a directory without weights, a read
error, a bad argument, memory) also reaches every rank as the same exception (errors.py: the ranks meet after
each phase and after each unit's broadcast), never as another rank's "Connection closed by peer" or a hang. The
broadcast carries raw bytes and int64 headers only: nothing is pickled.
"""
from __future__ import annotations

import contextlib
import json
import math
import types
from pathlib import Path

import torch
import torch.nn as nn

from .. import _cuda
from .._dtensor import _dtensor_type
from ..modules.lora_linear import LoraLinear
from ..modules.qlinear_nf4 import QUANT_TYPES, QLinearNF4, absmax_to_bytes, parse_bnb_state
from ..tuners.adapter_io import load_adapter, read_adapter_files
from ..tuners.lora.model import add_lora
from . import errors
from .errors import ShardedLoadError
from .fsdp2 import check_fsdp2_supported, decoder_layers, shard_qlora_model

__all__ = ["load_sharded_qlora", "load_full_state_dict", "ShardedLoadError"]

_BASE = ".base_layer"
_ALIGN = 16  # every tensor starts 16-byte aligned in the unit buffer, so .view(dtype) of a slice is legal
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_QTABLES = ("quant_map", "nested_absmax", "nested_quant_map", "offset")
# what the last load did on this rank (read by tests/distributed/load_worker.py for the memory checks)
LAST_LOAD_STATS: dict = {}


# --- building the empty model ------------------------------------------------------------------------------
@contextlib.contextmanager
def _parameters_on_meta():
    """Every Parameter registered inside is moved to the meta device as it is registered (accelerate's
    `init_empty_weights(include_buffers=False)`): nn.Linear's torch.empty is never touched, its init runs on meta,
    and buffers (rotary inv_freq, computed from the config) stay real."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _saved_quantization(config) -> dict | None:
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    return q if isinstance(q, dict) else q.to_dict()


def _resolve_config(config, quantization_config):
    """(QPeftConfig, pre_quantized): the checkpoint's own quantization if it has one (transformers' rule: the
    passed config then only contributes compute_dtype, and blocksize for a bitsandbytes checkpoint)."""
    from ..integrations.transformers import QUANT_METHOD, QPeftConfig

    if quantization_config is not None and not isinstance(quantization_config, QPeftConfig):
        raise TypeError(f"load_sharded_qlora: quantization_config must be None or a qpeft.QPeftConfig, got "
                        f"{type(quantization_config).__name__}")
    saved = _saved_quantization(config)
    if saved is None:
        return quantization_config or QPeftConfig(), False
    method = str(saved.get("quant_method"))
    if method == QUANT_METHOD:
        fields = {k: saved[k] for k in ("quant_type", "blocksize", "double_quant", "compute_dtype",
                                        "modules_to_not_convert") if k in saved}
        cfg = QPeftConfig(**fields)
    elif method in ("bitsandbytes", "QuantizationMethod.BITS_AND_BYTES") and saved.get("load_in_4bit"):
        cfg = QPeftConfig.from_bitsandbytes(saved)
        if quantization_config is not None:
            cfg.blocksize = quantization_config.blocksize
    else:
        raise ValueError(f"load_sharded_qlora: the checkpoint is quantized with {method!r}; only qpeft and "
                         f"bitsandbytes 4-bit checkpoints load into QLinearNF4 layers")
    if quantization_config is not None:
        cfg.compute_dtype = quantization_config.compute_dtype
    return cfg, True


def _build_meta_model(config, qcfg, pre_quantized: bool, dtype: torch.dtype):
    """The model with QLinearNF4 layers, parameters on meta: what from_pretrained builds before reading."""
    from transformers import AutoModelForCausalLM

    from ..integrations.transformers import QPeftHfQuantizer

    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantizer = QPeftHfQuantizer(qcfg, pre_quantized=pre_quantized)
    model.is_quantized, model.quantization_method = True, qcfg.quant_method
    quantizer._process_model_before_weight_loading(
        model, keep_in_fp32_modules=getattr(model, "_keep_in_fp32_modules", None))
    model.config.quantization_config = qcfg
    model.hf_quantizer = quantizer
    for m in model.modules():
        if isinstance(m, QLinearNF4):
            # awaiting_weight's placeholder is the dense (out, in) weight (transformers reads its dtype); FSDP2
            # must shard the packed uint8 storage instead: same meta shapes as a quantized layer
            shape = torch.empty(m.out_features, m.in_features, dtype=m.weight_dtype, device="meta")
            m._set_quantized(**QLinearNF4._quantize(shape, m.quant_type, m.blocksize, m.double_quant))
    return model


# --- what rank 0 reads ------------------------------------------------------------------------------------
class _Checkpoint:
    """A safetensors checkpoint (a file, or a save_pretrained directory, single or sharded) read lazily: only
    the headers are parsed up front, each tensor is read when asked for. Rank 0 only."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        if path.is_file():
            files = [path]
        elif (path / "model.safetensors.index.json").is_file():
            index = json.loads((path / "model.safetensors.index.json").read_text())
            files = [path / f for f in sorted(set(index["weight_map"].values()))]
        elif (path / "model.safetensors").is_file():
            files = [path / "model.safetensors"]
        else:
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
        self._handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}
        self.bytes_read = 0

    def __contains__(self, key):
        return key in self._where

    def keys(self):
        return self._where.keys()

    def get(self, key: str) -> torch.Tensor:
        t = self._where[key].get_tensor(key)
        self.bytes_read += t.numel() * t.element_size()
        return t


class _DictSource:
    """A full state dict in the model's own keys (rank 0's copy)."""

    def __init__(self, state_dict: dict):
        self._sd = state_dict
        self.used: set[str] = set()

    def __contains__(self, key):
        return key in self._sd

    def keys(self):
        return self._sd.keys()

    def get(self, key):
        self.used.add(key)
        return self._sd[key]


def _checkpoint_key(fqn: str) -> str:
    """Model key -> checkpoint key: LoRA wraps a layer as `<layer>.base_layer` (transformers' loader renames the
    same way, integrations/transformers.py BASE_LAYER)."""
    fqn = fqn.replace(_BASE + ".", ".")
    return fqn[:-len(_BASE)] if fqn.endswith(_BASE) else fqn


# --- the per-unit plan (identical on every rank) -------------------------------------------------------------
def _units(model: nn.Module):
    """[(name, [(fqn, module)])]: each decoder layer, then everything outside them (embeddings, norm, head)."""
    layers = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    inside = set()
    units = []
    for layer in layers:
        mods = list(layer.named_modules(prefix=names[id(layer)]))
        inside.update(id(m) for _, m in mods)
        units.append((names[id(layer)], mods))
    rest = [(n, m) for n, m in model.named_modules() if id(m) not in inside]
    units.append(("<rest>", rest))
    return units


def _slots(fqn: str, module: nn.Module, seen: set):
    """The tensors of `module` a unit fills: [(slot name, target tensor)]. Tied parameters once (`seen`);
    non-persistent buffers never (every rank computed them in __init__)."""
    out = []
    if isinstance(module, QLinearNF4):
        names = ["weight", "absmax_bytes", *(n for n in _QTABLES if getattr(module, n) is not None)]
        if module.bias is not None:
            names.append("bias")
        return [(n, getattr(module, n)) for n in names]
    for n, p in module._parameters.items():
        if p is not None and id(p) not in seen:
            seen.add(id(p))
            out.append((n, p))
    for n, b in module._buffers.items():
        if b is not None and n not in module._non_persistent_buffers_set:
            out.append((n, b))
    return out


def _global(t: torch.Tensor):
    return tuple(t.shape), t.dtype


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# --- rank 0: the unit's full tensors ------------------------------------------------------------------------
class _Rank0:
    def __init__(self, source, mode: str, aliases: dict, adapter: dict | None, lora_init: bool,
                 keep_missing: bool = False):
        self.source, self.mode, self.aliases = source, mode, aliases
        self.adapter, self.lora_init = adapter, lora_init
        self.keep_missing = keep_missing  # load_full_state_dict(strict=False): absent tensors keep their values
        self.pending: dict[str, torch.Tensor] = {}  # LoRA values generated when their LoraLinear was visited

    def key(self, fqn: str) -> str:
        return _checkpoint_key(fqn) if self.mode == "checkpoint" else fqn

    def lookup(self, fqn: str) -> torch.Tensor | None:
        for name in self.aliases.get(fqn, [fqn]):  # a tied parameter: any of its names
            k = self.key(name)
            if k in self.source:
                return self.source.get(k)
        return None

    def qlinear(self, fqn: str, m: QLinearNF4) -> tuple[dict, tuple]:
        prefix = self.key(fqn) + "."
        blob = [prefix + "weight.quant_state.bitsandbytes__" + q for q in QUANT_TYPES]
        if any(b in self.source for b in blob):  # bitsandbytes' Linear4bit keys: the bytes as they are
            keys = [k for k in self.source.keys() if k.startswith(prefix + "weight") or k == prefix + "bias"]
            sd = {k: self.source.get(k) for k in keys}
            try:
                parsed = parse_bnb_state(sd, prefix, m.out_features, m.in_features)
            except (KeyError, ValueError) as e:
                raise ShardedLoadError(f"{fqn}: {e.args[0]}") from None
            if (parsed["nested_absmax"] is not None) != m.double_quant or parsed["blocksize"] != m.blocksize:
                raise ShardedLoadError(
                    f"{fqn}: the checkpoint layer has blocksize {parsed['blocksize']}, double quant "
                    f"{parsed['nested_absmax'] is not None}; the model was built with blocksize {m.blocksize}, "
                    f"double quant {m.double_quant} (pass a quantization_config that matches the checkpoint)")
            values = {n: parsed[n] for n in ("weight", "quant_map", "nested_absmax", "nested_quant_map", "offset")}
            values["absmax_bytes"] = absmax_to_bytes(parsed["absmax"])
            header = (QUANT_TYPES.index(parsed["quant_type"]), parsed["blocksize"], _DTYPES.index(parsed["dtype"]))
        elif prefix + "weight" in self.source:  # a dense weight: quantize it as from_pretrained does
            w = self.source.get(prefix + "weight")
            if not w.is_floating_point():
                raise ShardedLoadError(f"{fqn}: checkpoint weight {prefix}weight is {w.dtype} without a "
                                       f"bitsandbytes quant_state header")
            if tuple(w.shape) != (m.out_features, m.in_features):
                raise ShardedLoadError(f"size mismatch for {prefix}weight: checkpoint {tuple(w.shape)}, model "
                                       f"{(m.out_features, m.in_features)}")
            w = w.to(m.weight_dtype)  # transformers casts to the placeholder's dtype before quantize_weight_
            try:
                q = QLinearNF4._quantize(w, m.quant_type, m.blocksize, m.double_quant)
            except ValueError as e:
                raise ShardedLoadError(f"{fqn}: {e}") from None
            values = {n: q.get(n) for n in ("weight", "quant_map", "nested_absmax", "nested_quant_map", "offset")}
            values["absmax_bytes"] = absmax_to_bytes(q["absmax"])
            header = (QUANT_TYPES.index(m.quant_type), m.blocksize, _DTYPES.index(w.dtype))
        elif self.keep_missing and not any(k.startswith(prefix + "weight") for k in self.source.keys()):
            names = ["weight", "absmax_bytes", *_QTABLES, "bias"]
            return dict.fromkeys(names), (QUANT_TYPES.index(m.quant_type), m.blocksize, _DTYPES.index(m.weight_dtype))
        else:
            raise ShardedLoadError(f"{fqn}: the checkpoint has no {prefix}weight")
        if m.bias is not None:
            b = self.source.get(prefix + "bias") if prefix + "bias" in self.source else None
            if b is None:
                raise ShardedLoadError(f"{fqn}: the checkpoint has no {prefix}bias")
            values["bias"] = b.to(m.bias.dtype)
        return values, header

    def lora(self, fqn: str, m: LoraLinear):
        """LoRA A / B of every adapter of the layer: from the adapter file, or freshly initialised exactly as
        LoraLinear.add_adapter does on one process (two nn.Linear inits, then reset_lora_parameters), so that
        `torch.manual_seed(s)` before loading gives the values add_lora gives after the same seed."""
        for name in m.lora_A:
            a_key, b_key = f"{fqn}.lora_A.{name}.weight", f"{fqn}.lora_B.{name}.weight"
            if self.adapter is not None:
                pa, pb = (f"base_model.model.{_checkpoint_key(fqn)}.lora_{x}.weight" for x in "AB")
                if pa in self.adapter and pb in self.adapter:
                    self.pending[a_key], self.pending[b_key] = self.adapter[pa], self.adapter[pb]
                continue
            if not self.lora_init:
                continue
            r = m.r[name]
            stand_in = types.SimpleNamespace(
                lora_A={name: nn.Linear(m.in_features, r, bias=False, dtype=torch.float32)},
                lora_B={name: nn.Linear(r, m.out_features, bias=False, dtype=torch.float32)},
                init=m.init, r=m.r)
            LoraLinear.reset_lora_parameters(stand_in, name)
            self.pending[a_key] = stand_in.lora_A[name].weight.detach()
            self.pending[b_key] = stand_in.lora_B[name].weight.detach()

    def unit(self, plan) -> tuple[list, list]:
        """The full values of a unit's slots (None: keep the rank's own value: buffers absent from the source),
        and the QLinearNF4 headers; ShardedLoadError on any problem."""
        values, headers = [], []
        for fqn, m, slots in plan:
            if isinstance(m, LoraLinear):
                self.lora(fqn, m)
            if isinstance(m, QLinearNF4):
                got, header = self.qlinear(fqn, m)
                headers.append(header)
                values += [got[n] for n, _ in slots]
                continue
            for n, t in slots:
                key = f"{fqn}.{n}" if fqn else n
                v = self.pending.pop(key, None)
                if v is None:
                    v = self.lookup(key)
                if v is None:
                    if n in m._buffers or self.keep_missing:
                        values.append(None)
                        continue
                    raise ShardedLoadError(f"missing key {self.key(key)} (model parameter {key})")
                values.append(v.to(t.dtype) if v.is_floating_point() and t.is_floating_point() else v)
        flat = [(f"{fqn}.{n}" if fqn else n, t) for fqn, m, slots in plan for n, t in slots]
        for (key, t), v in zip(flat, values):
            if v is None:
                continue
            if _global(v) != _global(t):
                raise ShardedLoadError(f"size or dtype mismatch for {key}: source {tuple(v.shape)} {v.dtype}, "
                                       f"model {tuple(t.shape)} {t.dtype}")
        return values, headers


# --- every rank: broadcast and keep the local rows ----------------------------------------------------------
def _local_copy(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of `full` into `target` (a DTensor shard: the rows FSDP2's torch.chunk gives it)."""
    dtensor = _dtensor_type()
    if dtensor is not None and isinstance(target, dtensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(full.shape, target.device_mesh, target.placements)
        index = tuple(slice(o, o + s) for s, o in zip(shape, offset))
        target.to_local().copy_(full[index])
    else:
        target.copy_(full)


class _Broadcaster:
    def __init__(self, group, device):
        import torch.distributed as dist

        self.dist, self.group, self.device = dist, group, device
        self.rank = dist.get_rank(group)
        self.src = dist.get_global_rank(group, 0) if group is not None else 0

    def send(self, t: torch.Tensor) -> torch.Tensor:
        self.dist.broadcast(t, src=self.src, group=self.group)
        return t

    def status(self, error: BaseException | None) -> None:
        """Rank 0's verdict: every rank raises the same error (its ShardedLoadError as it is), or none does."""
        errors.from_rank0(error, self.group, self.device)

    def agree(self, error: BaseException | None) -> None:
        """Every rank's verdict: any rank's failure is raised on every rank."""
        errors.agree(error, self.group, self.device)


def _pack(buf: torch.Tensor, values: list, sizes: list) -> None:
    pos = 0
    for v, size in zip(values, sizes):
        if size:
            v = v.detach().contiguous().reshape(-1).view(torch.uint8)
            buf[pos:pos + v.numel()].copy_(v)
        pos += size


def _load_units(model: nn.Module, rank0: _Rank0 | None, group, device, stats: dict) -> None:
    """Per unit: rank 0 reads and checks it (its failure, of any kind, raised on every rank before anything of
    the unit is sent), broadcasts the unit's bytes, every rank copies its rows. A failure on any rank (allocating
    the buffer, copying) is agreed on before the next broadcast, and after the last unit, so every rank raises it
    and none waits in a broadcast that will not come."""
    bc = _Broadcaster(group, device)
    seen: set = set()
    pending = None  # this rank's failure in the previous unit's copy, raised everywhere at the next agreement
    for _unit_name, modules in _units(model):
        plan = [(fqn, m, _slots(fqn, m, seen)) for fqn, m in modules]
        flat = [t for _, _, slots in plan for _, t in slots]
        qlayers = [m for _, m, _ in plan if isinstance(m, QLinearNF4)]
        values = headers = error = None
        if bc.rank == 0:
            try:
                values, headers = rank0.unit(plan)
            except Exception as e:  # ShardedLoadError from the checks, or the file's (OSError, safetensors', ...)
                error = e
        bc.status(error)
        # which slots carry a value (a buffer absent from the source keeps the rank's own), and the headers
        meta = torch.zeros(len(flat) + 3 * len(qlayers), dtype=torch.int64, device=device)
        if bc.rank == 0:
            meta[:len(flat)] = torch.tensor([v is not None for v in values], dtype=torch.int64)
            if qlayers:
                meta[len(flat):] = torch.tensor(headers, dtype=torch.int64).reshape(-1)
        bc.send(meta)
        present = meta[:len(flat)].tolist()
        sizes = [_aligned(_nbytes(*_global(t))) if p else 0 for t, p in zip(flat, present)]
        total = sum(sizes)
        buf = full = None
        try:
            if total:
                buf = torch.empty(total, dtype=torch.uint8, device=device)  # the unit's full tensors, once
                if bc.rank == 0:
                    _pack(buf, values, sizes)
        except Exception as e:
            pending = pending or e
        bc.agree(pending)
        if total:
            bc.send(buf)
            try:
                pos = 0
                with torch.no_grad():
                    for t, size in zip(flat, sizes):
                        if size:
                            shape, dtype = _global(t)
                            full = buf[pos:pos + _nbytes(shape, dtype)].view(dtype).reshape(shape)
                            _local_copy(t, full)
                        pos += size
            except Exception as e:
                pending = e
            stats["max_unit_bytes"] = max(stats.get("max_unit_bytes", 0), total)
            stats["received_bytes"] = stats.get("received_bytes", 0) + total
            del buf, full  # `full` views the buffer: both go, or the trim below cannot return it
        for m, h in zip(qlayers, meta[len(flat):].reshape(-1, 3).tolist()):
            m.quant_type, m.blocksize, m.weight_dtype = QUANT_TYPES[h[0]], h[1], _DTYPES[h[2]]
        stats["units"] = stats.get("units", 0) + 1
        if bc.rank == 0 and rank0 is not None and hasattr(rank0.source, "bytes_read"):
            stats["max_unit_read_bytes"] = max(stats.get("max_unit_read_bytes", 0),
                                               rank0.source.bytes_read - stats.get("read_bytes", 0))
            stats["read_bytes"] = rank0.source.bytes_read
        if device.type == "cpu":
            # The unit's buffer (and on rank 0 its dense and quantized temporaries) is freed here, but glibc
            # keeps freed heap: without a trim the ranks != 0 of benchmarks/bench_shard.py (1 GB bf16 Llama,
            # 4 ranks) ended the load ~300 MiB above their shards (872 MiB RssAnon against rank 0's 556 MiB,
            # which trimmed), and with the trim but the last unit's buffer still referenced, rank 1 at 2 ranks
            # kept 910 MiB where a trim after the load gave 660.
            from ..integrations.transformers import _return_freed_heap_to_os

            _return_freed_heap_to_os()
    bc.agree(pending)


def _tied_aliases(model: nn.Module) -> dict:
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return {n: group for group in names.values() for n in group}


def _group(mesh, where: str):
    """The process group of `mesh` (None: the default group); RuntimeError when torch.distributed is not
    initialised (no collective could tell the other ranks). A `mesh` that is not a 1-D DeviceMesh is reported
    by the argument checks; the ranks agree on that failure over the default group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    if not dist.is_initialized():
        raise RuntimeError(f"{where}: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first, e.g. under torchrun)")
    if isinstance(mesh, DeviceMesh) and mesh.ndim == 1:
        return mesh.get_group()
    return None


def _check_mesh(mesh, where: str) -> None:
    from torch.distributed.device_mesh import DeviceMesh

    if mesh is not None and (not isinstance(mesh, DeviceMesh) or mesh.ndim != 1):
        raise ValueError(f"{where}: mesh must be None or a 1-D DeviceMesh (HSDP / 2-D meshes are not supported), "
                         f"got {mesh!r}")


def _device(device):
    if device is None:
        return torch.device("cuda", _cuda.rt.current_device()) if _cuda.rt.available() else torch.device("cpu")
    try:
        return torch.device(device)
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"load_sharded_qlora: device must be a torch.device or its name, got {device!r}") from e


# --- public API -------------------------------------------------------------------------------------------
def load_sharded_qlora(pretrained_model_name_or_path, quantization_config=None, *, lora: dict | None = None,
                       adapter=None, mesh=None, mixed_precision=None, torch_dtype=None, device=None):
    """Build a transformers causal LM from a local checkpoint directory directly as an FSDP2-sharded qpeft
    QLoRA model; every rank calls it (a collective) and gets its shards. Returns the model in eval mode.

    pretrained_model_name_or_path: a local directory with config.json and model.safetensors (or a sharded
        safetensors index): a full-precision checkpoint (quantized on rank 0 as `from_pretrained(...,
        quantization_config=QPeftConfig(...))` does, byte for byte) or a qpeft / bitsandbytes 4-bit one (bytes
        copied). quantization_config: a `qpeft.QPeftConfig` (None: QPeftConfig()); for a pre-quantized checkpoint
        its own config wins, as in transformers, except compute_dtype.
    lora: keyword arguments of `qpeft.add_lora` (target_modules, r, lora_alpha, lora_dropout, init, use_rslora):
        LoRA layers added before sharding, initialised on rank 0 as add_lora does (seed with torch.manual_seed
        on rank 0 for reproducible values). adapter: instead, a PEFT / `qpeft.save_adapter` directory whose LoRA
        layers and values are loaded (resume).
    mesh: None or a 1-D DeviceMesh; mixed_precision: None or a `MixedPrecisionPolicy` (see shard_qlora_model).
    torch_dtype: the dtype of the non-quantized weights and of the weights before quantization (None: the
        checkpoint config's dtype, else float32). device: where the shards live (None: the current CUDA
        device, else the CPU); the broadcast runs on it, so it must suit the process group's backend.

    Every failure, on any rank, raises the same exception on every rank (qpeft.distributed.errors): TypeError /
    ValueError naming the argument on bad input, ShardedLoadError when the checkpoint does not fit the model,
    FileNotFoundError for a directory without weights (rank 0 opens them before any rank shards), and any other
    failure of a rank (reading, memory, ...) with its type where it is a builtin one, else as ShardedLoadError;
    a failure that not every rank had names the rank(s). No model is returned then. RuntimeError when
    torch.distributed is not initialised, FSDP2UnsupportedError on torch < 2.12 (before any collective).
    """
    check_fsdp2_supported()
    group = _group(mesh, "load_sharded_qlora")
    # Every failure, on any rank, reaches every rank as the same exception (errors.agree): each phase runs under
    # try on every rank and the ranks meet after it; a rank that raised on its own would leave the others in the
    # first broadcast ("Connection closed by peer", or a hang)
    comm_device = errors.collective_device(group)
    model = rank0 = failure = None
    try:
        model, rank0, device = _prepare(pretrained_model_name_or_path, quantization_config, lora, adapter, mesh,
                                        torch_dtype, device, group)
    except Exception as e:
        failure = e
    errors.agree(failure, group, comm_device)
    try:
        kept = {(id(m), n): b.detach().clone() for m in model.modules() for n, b in m._buffers.items()
                if b is not None and b.device.type != "meta"}
        shard_qlora_model(model, mesh=mesh, mixed_precision=mixed_precision)
        model.to_empty(device=device)
        with torch.no_grad():
            for m in model.modules():  # the buffers every rank computed (to_empty emptied them)
                for n, b in m._buffers.items():
                    if (id(m), n) in kept:
                        b.copy_(kept[(id(m), n)])
    except Exception as e:
        failure = e
    errors.agree(failure, group, comm_device)
    stats = LAST_LOAD_STATS
    stats.clear()
    _load_units(model, rank0, group, device, stats)
    if rank0 is not None:
        stats["checkpoint_opened"] = True
    return model.eval()


def _prepare(pretrained_model_name_or_path, quantization_config, lora, adapter, mesh, torch_dtype, device, group):
    """load_sharded_qlora's rank-local part: the argument checks, the meta model with its LoRA layers, and on rank
    0 the opened checkpoint and adapter; returns (model, rank 0's reader or None, device)."""
    import torch.distributed as dist

    path = Path(pretrained_model_name_or_path) if isinstance(pretrained_model_name_or_path, (str, Path)) else None
    if path is None or not (path / "config.json").is_file():
        raise ValueError(f"load_sharded_qlora: pretrained_model_name_or_path must be a local directory with a "
                         f"config.json (download it first, e.g. huggingface_hub.snapshot_download), got "
                         f"{pretrained_model_name_or_path!r}")
    if lora is not None and adapter is not None:
        raise ValueError("load_sharded_qlora: pass lora (a new adapter) or adapter (a saved one), not both")
    if lora is not None and not isinstance(lora, dict):
        raise TypeError(f"load_sharded_qlora: lora must be None or a dict of qpeft.add_lora arguments, got "
                        f"{type(lora).__name__}")
    if torch_dtype is not None and torch_dtype not in _DTYPES:
        raise ValueError(f"load_sharded_qlora: torch_dtype must be None or one of {_DTYPES}, got {torch_dtype!r}")
    _check_mesh(mesh, "load_sharded_qlora")
    device = _device(device)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    qcfg, pre_quantized = _resolve_config(config, quantization_config)
    dtype = torch_dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = _build_meta_model(config, qcfg, pre_quantized, dtype)

    adapter_tensors = None
    if lora is not None:
        add_lora(model, **lora)
    elif adapter is not None:
        load_adapter(model, adapter)  # validates and builds the LoRA layers (values: rank 0, below)
        if dist.get_rank(group) == 0:
            adapter_tensors = read_adapter_files(adapter)[1]
    rank0 = None
    if dist.get_rank(group) == 0:
        # opened (headers parsed) before any rank shards: a directory without weights fails here, on every rank
        rank0 = _Rank0(_Checkpoint(path), "checkpoint", _tied_aliases(model), adapter_tensors,
                       lora_init=lora is not None)
    return model, rank0, device


def _dry_run(model: nn.Module, rank0: _Rank0) -> None:
    """Rank 0 checks every unit (keys, shapes, dtypes, 4-bit headers) before anything is sent, so that a bad
    dict leaves the model as it was; the values are built and dropped one unit at a time (the dict is already in
    memory, and a packed layer is only parsed, not re-quantized). Raises ShardedLoadError."""
    seen: set = set()
    for _, modules in _units(model):
        plan = [(fqn, m, _slots(fqn, m, seen)) for fqn, m in modules]
        try:
            rank0.unit(plan)
        except ShardedLoadError as e:
            raise ShardedLoadError(f"load_full_state_dict: nothing was loaded: {e}") from None
        except Exception as e:  # e.g. a value that is not a tensor
            raise ShardedLoadError(f"load_full_state_dict: nothing was loaded: {type(e).__name__}: {e}") from e


def load_full_state_dict(model: nn.Module, state_dict: dict | None, *, mesh=None, strict: bool = True) -> None:
    """Load a full (gathered, unsharded) state dict in the model's own keys into a model sharded by
    `shard_qlora_model` / `load_sharded_qlora`; every rank calls, only rank 0's `state_dict` is read (the others
    may pass None). The 4-bit layers take bitsandbytes' Linear4bit keys (what `get_model_state_dict(model,
    options=StateDictOptions(full_state_dict=True))` or a bitsandbytes save gives), bytes copied as they are.

    strict: every key of the model's state dict must be in the dict (a tied parameter under any of its names)
    and every key of the dict must belong to the model, checked on rank 0 before anything is sent; buffers
    absent from the dict keep their values. strict=False: whatever is absent keeps its value (e.g. a dict of the
    LoRA tensors only). Raises ShardedLoadError on every rank, before anything changed: rank 0 checks the key
    set, then every unit's shapes, dtypes and 4-bit headers, before the first broadcast; any other failure on
    a rank is raised on every rank too (errors.py)."""
    import torch.distributed as dist

    _check_mesh(mesh, "load_full_state_dict")
    group = _group(mesh, "load_full_state_dict")
    params = [p for p in model.parameters()]
    device = params[0].device if params else _device(None)
    rank0 = None
    error = None
    if dist.get_rank(group) == 0:
        try:  # any failure here (not only the checks' ShardedLoadError) is raised on every rank by status()
            rank0 = _check_full_state_dict(model, state_dict, strict)
        except Exception as e:
            error = e
    _Broadcaster(group, device).status(error)
    stats = LAST_LOAD_STATS
    stats.clear()
    _load_units(model, rank0, group, device, stats)


def _check_full_state_dict(model: nn.Module, state_dict, strict: bool) -> _Rank0:
    """Rank 0: the reader of `state_dict` once its key set (strict) and every unit check out; ShardedLoadError
    otherwise."""
    if not isinstance(state_dict, dict):
        raise ShardedLoadError(f"load_full_state_dict: state_dict must be a dict on rank 0, got "
                               f"{type(state_dict).__name__}")
    rank0 = _Rank0(_DictSource(state_dict), "state_dict", _tied_aliases(model), None, False, keep_missing=not strict)
    if strict:
        expected = set(model.state_dict().keys())  # local: no collective (FSDP2's sharded state dict)
        missing = sorted(k for k in expected if k not in state_dict
                         and not any(a in state_dict for a in _tied_aliases(model).get(k, ())))
        unexpected = sorted(k for k in state_dict if k not in expected)
        if missing or unexpected:
            raise ShardedLoadError(f"load_full_state_dict: the state dict does not match the model; nothing was "
                                   f"loaded: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected "
                                   f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    _dry_run(model, rank0)
    return rank0
