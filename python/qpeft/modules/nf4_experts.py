"""4-bit fused experts: the storage of a mixture-of-experts block whose 3-D expert parameters are held in NF4/FP4.

transformers 5 keeps a MoE layer's experts as fused 3-D Parameters on one module (`Qwen3MoeExperts.gate_up_proj`
(E, 2I, H), `.down_proj` (E, H, I); gpt-oss transposed, (E, H, 2I) / (E, I, H), with biases). `NF4ExpertsMixin` is
mixed into such a module's class (`nf4_experts_class(type(module))`, a subclass of the model's own class, so its
forward, its `_apply_gate` and everything else stay the model's) and holds each 4-bit parameter `p` as:

    p                    uint8 Parameter (E, (d1*d2+1)//2)   the packed codes, expert e in row e (frozen)
    p_absmax_bytes       uint8 Parameter (E, 4*blocks)       fp32 absmax as raw bytes, or (E, blocks) 8-bit codes
    p_quant_map          fp32 buffer (16,)                   the NF4/FP4 code book
    p_nested_absmax      fp32 buffer (E, ceil(blocks/256))   double quant only
    p_nested_quant_map   fp32 buffer (256,)                  double quant only (the dynamic map)
    p_nested_offset      fp32 buffer (E,)                    double quant only (each expert's mean absmax)

As for QLinearNF4, what grows with the model is frozen uint8 Parameters, so FSDP2 and ZeRO-3 shard them (on the
expert dimension) and no mixed-precision policy ever casts them; the tables are small buffers. Expert e is byte for
byte bitsandbytes' Linear4bit quantization of the 2-D slice param[e] (qpeft.quantize_experts: blocks never cross
an expert).

On disk (state dict / safetensors), per 4-bit parameter `p` of the module (format version 1):

    p                                      uint8 (E, (d1*d2+1)//2)   packed, element 2i of expert e's row-major
                                                                     slice in the HIGH nibble of byte i of row e
    p.absmax                               fp32 (E, blocks)          or uint8 (E, blocks) with double quant
    p.quant_map                            fp32 (16,)
    p.nested_absmax                        fp32 (E, ceil(blocks/256))           double quant only
    p.nested_quant_map                     fp32 (256,)                          double quant only
    p.nested_offset                        fp32 (E,)                            double quant only
    p.quant_state.qpeft_experts__nf4|fp4   uint8 UTF-8 JSON {"format": "qpeft_experts", "version": 1,
                                           "quant_type", "blocksize", "dtype", "shape": [E, d1, d2],
                                           "transposed", "nested_blocksize": 256 (double quant only)}

Row e of these is exactly the bitsandbytes Linear4bit state of the slice param[e] (packed, absmax, quant_map,
nested_absmax / nested_quant_map / nested_offset, blocksize, shape (d1, d2)). `parse_experts_state` validates a
group of such tensors; nothing is modified before everything is checked.
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..quant.experts import GroupedNF4Weight, quantize_experts
from ..quant.state import pack_json, unpack_json
from ..reference.nf4_matmul import NESTED_BLOCKSIZE

__all__ = ["NF4ExpertsMixin", "ExpertsSpec", "nf4_experts_class", "is_nf4_experts", "experts_state_dict",
           "parse_experts_state", "dense_class", "EXPERTS_BLOB", "EXPERTS_SUFFIXES", "FORMAT_VERSION"]

FORMAT = "qpeft_experts"
FORMAT_VERSION = 1
EXPERTS_BLOB = "quant_state.qpeft_experts__"
# the on-disk keys of one 4-bit parameter p, relative to p ("" is p itself)
EXPERTS_SUFFIXES = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".nested_offset",
                    "." + EXPERTS_BLOB + "nf4", "." + EXPERTS_BLOB + "fp4")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_TABLES = ("quant_map", "nested_absmax", "nested_quant_map", "nested_offset")  # buffers, fp32


@dataclass(frozen=True)
class ExpertsSpec:
    """What a 4-bit experts parameter is: its logical shape (E, d1, d2), orientation (transposed: slices are
    (in, out), gpt-oss) and quantization settings; dtype is the dtype it was quantized from."""

    shape: tuple
    transposed: bool
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    dtype: torch.dtype = torch.bfloat16

    @classmethod
    def of(cls, w: GroupedNF4Weight) -> "ExpertsSpec":
        return cls(tuple(w.shape), bool(w.transposed), w.quant_type, int(w.blocksize), w.double_quant, w.dtype)


def _names(p: str) -> dict:
    return {"packed": p, "absmax": p + "_absmax_bytes", "quant_map": p + "_quant_map",
            "nested_absmax": p + "_nested_absmax", "nested_quant_map": p + "_nested_quant_map",
            "nested_offset": p + "_nested_offset"}


def _absmax_to_bytes(absmax: torch.Tensor) -> torch.Tensor:
    """(E, blocks) fp32 -> (E, 4*blocks) uint8 (its bytes); uint8 codes stay as they are. Rows are experts, so an
    FSDP2 / ZeRO-3 shard on dim 0 holds whole experts' scales."""
    if absmax.dtype == torch.uint8:
        return absmax
    return absmax.contiguous().view(torch.uint8).reshape(absmax.shape[0], -1)


def _absmax_from_bytes(absmax_bytes: torch.Tensor, double_quant: bool) -> torch.Tensor:
    if double_quant:
        return absmax_bytes
    return absmax_bytes.view(torch.float32)


def _dtensor_type():
    mod = sys.modules.get("torch.distributed.tensor")  # no DTensor exists unless this module is loaded
    return getattr(mod, "DTensor", None)


def experts_state_dict(w: GroupedNF4Weight) -> dict:
    """The on-disk tensors of one 4-bit experts parameter, keyed by suffix (see the module docstring)."""
    out = {"": w.packed, ".absmax": w.absmax, ".quant_map": w.code}
    header = {"format": FORMAT, "version": FORMAT_VERSION, "quant_type": w.quant_type, "blocksize": w.blocksize,
              "dtype": str(w.dtype).removeprefix("torch."), "shape": list(w.shape), "transposed": w.transposed}
    if w.double_quant:
        out.update({".nested_absmax": w.nested_absmax, ".nested_quant_map": w.nested_code,
                    ".nested_offset": w.offset})
        header["nested_blocksize"] = NESTED_BLOCKSIZE
    out["." + EXPERTS_BLOB + w.quant_type] = pack_json(header).to(w.packed.device)
    return out


def parse_experts_state(tensors: dict, shape=None, transposed: bool | None = None,
                        where: str = "experts") -> GroupedNF4Weight:
    """Validate one parameter's on-disk tensors ({suffix: tensor}, suffixes as in EXPERTS_SUFFIXES) and return them
    as a GroupedNF4Weight (the tensors themselves, not copies). shape / transposed: what the model expects (the
    config's); a checkpoint that disagrees raises. Raises ValueError naming `where` and the key."""
    def bad(msg):
        raise ValueError(f"{where}: {msg}")

    unknown = sorted(k for k in tensors if k not in EXPERTS_SUFFIXES)
    if unknown:
        bad(f"unexpected 4-bit experts tensors {[where + k for k in unknown]}")
    blobs = [k for k in tensors if EXPERTS_BLOB in k]
    if len(blobs) != 1:
        bad(f"expected one {where}.{EXPERTS_BLOB}nf4|fp4 header, found {len(blobs)} (not a qpeft 4-bit experts "
            f"checkpoint?)")
    try:
        header = unpack_json(tensors[blobs[0]])
    except (ValueError, UnicodeDecodeError) as e:
        bad(f"{blobs[0]} is not a JSON header: {e}")
    if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        bad(f"header format must be {FORMAT!r} version {FORMAT_VERSION}, got {header.get('format')!r} version "
            f"{header.get('version')!r}")
    qt = header.get("quant_type")
    if blobs[0] != "." + EXPERTS_BLOB + str(qt):
        bad(f"header quant_type {qt!r} does not match its key {blobs[0]!r}")
    if header.get("dtype") not in _DTYPES:
        bad(f"header dtype must be one of {sorted(_DTYPES)}, got {header.get('dtype')!r}")
    got_shape = tuple(header.get("shape") or ())
    if shape is not None and got_shape != tuple(shape):
        bad(f"the checkpoint's experts have shape {got_shape}, the model's config expects {tuple(shape)}")
    if transposed is not None and bool(header.get("transposed")) != bool(transposed):
        bad(f"header transposed={header.get('transposed')!r}, the model's experts are transposed={transposed}")
    for key in ("", ".absmax", ".quant_map"):
        if key not in tensors:
            bad(f"missing {where}{key}")
    nested = [k for k in (".nested_absmax", ".nested_quant_map", ".nested_offset") if k in tensors]
    if nested and len(nested) != 3:
        bad(f"double quant needs .nested_absmax, .nested_quant_map and .nested_offset together, got {nested}")
    if bool(nested) != ("nested_blocksize" in header):
        bad("the header and the tensors disagree about double quant")
    if nested and header["nested_blocksize"] != NESTED_BLOCKSIZE:
        bad(f"nested_blocksize must be {NESTED_BLOCKSIZE}, got {header['nested_blocksize']!r}")
    packed = tensors[""]
    if packed.dtype != torch.uint8 and packed.is_floating_point() and packed.dim() == 2:
        packed = packed.view(torch.uint8)  # bitsandbytes-style quant_storage: the same bytes
    try:
        return GroupedNF4Weight(packed, tensors[".absmax"], tensors[".quant_map"], header.get("blocksize"), got_shape,
                                bool(header.get("transposed")), tensors.get(".nested_absmax"),
                                tensors.get(".nested_quant_map"), tensors.get(".nested_offset"), quant_type=qt,
                                dtype=_DTYPES[header["dtype"]])
    except (ValueError, TypeError) as e:
        bad(str(e))


class NF4ExpertsMixin:
    """Holds some of a fused-experts module's 3-D Parameters in 4 bits (see the module docstring). Mixed in front of
    the model's experts class by `nf4_experts_class`; the module keeps its own forward and attributes.

    A parameter is first `await_nf4_`-ed (a meta placeholder of its dense shape and dtype, what a checkpoint loader
    reads the target dtype from), then filled by `set_nf4_weight_` / `quantize_nf4_`."""

    # The experts implementation that runs 4-bit experts (transformers' `config._experts_implementation`), filled
    # in by the layer that registers it (qpeft.models.moe.interface: "qpeft"); this layer knows no transformers.
    experts_implementation: str | None = None

    def forward(self, *args, **kwargs):
        """The model's own forward (transformers' dispatcher to `config._experts_implementation`), refused with a
        clear error when that names an implementation that cannot read 4-bit experts (it would index the packed
        bytes as weights)."""
        impl = getattr(getattr(self, "config", None), "_experts_implementation", None)
        want = type(self).experts_implementation
        if want is not None and self.nf4_params() and impl != want:
            raise RuntimeError(f"{type(self).__name__} holds 4-bit experts, which run only with "
                               f"experts_implementation={want!r}; the model's config says {impl!r} "
                               f"(call model.set_experts_implementation({want!r}))")
        return super().forward(*args, **kwargs)

    # --- which parameters are 4-bit -------------------------------------------------------------------------
    def nf4_params(self) -> tuple[str, ...]:
        """Names of this module's 4-bit parameters, in the module's parameter order."""
        specs = self.__dict__.get("_nf4_specs") or {}
        return tuple(n for n in self._parameters if n in specs)

    def nf4_spec(self, name: str) -> ExpertsSpec:
        specs = self.__dict__.get("_nf4_specs") or {}
        if name not in specs:
            raise KeyError(f"{type(self).__name__}: {name!r} is not a 4-bit experts parameter (have {sorted(specs)})")
        return specs[name]

    def nf4_ready(self, name: str) -> bool:
        """True once the parameter holds its quantized values (not the meta placeholder)."""
        return _names(name)["absmax"] in self._parameters

    # --- building --------------------------------------------------------------------------------------------
    def await_nf4_(self, name: str, spec: ExpertsSpec) -> None:
        """Make `name` a 4-bit parameter to be filled later: a dense-shaped meta placeholder of spec.dtype."""
        specs = self.__dict__.setdefault("_nf4_specs", {})
        self._drop_storage(name)
        specs[name] = spec
        self._parameters[name] = nn.Parameter(torch.empty(spec.shape, dtype=spec.dtype, device="meta"),
                                              requires_grad=False)

    @torch.no_grad()
    def set_nf4_weight_(self, name: str, w: GroupedNF4Weight) -> None:
        """Install a quantized stack as parameter `name` (its tensors, by reference). The stack must have the
        parameter's shape and orientation (ValueError otherwise; nothing changes)."""
        specs = self.__dict__.setdefault("_nf4_specs", {})
        if name not in self._parameters:
            raise ValueError(f"{type(self).__name__} has no parameter {name!r}")
        old = specs.get(name)
        current = self._parameters[name]
        want_shape = old.shape if old is not None else tuple(current.shape)
        want_t = old.transposed if old is not None else w.transposed
        if tuple(w.shape) != tuple(want_shape) or w.transposed != want_t:
            raise ValueError(f"{type(self).__name__}.{name}: the 4-bit stack has shape {tuple(w.shape)} "
                             f"(transposed={w.transposed}), the parameter is {tuple(want_shape)} "
                             f"(transposed={want_t})")
        n = _names(name)
        self._drop_storage(name)
        specs[name] = ExpertsSpec.of(w)
        self._parameters[name] = nn.Parameter(w.packed, requires_grad=False)  # same key: parameter order is kept
        self.register_parameter(n["absmax"], nn.Parameter(_absmax_to_bytes(w.absmax), requires_grad=False))
        for key, t in (("quant_map", w.code), ("nested_absmax", w.nested_absmax),
                       ("nested_quant_map", w.nested_code), ("nested_offset", w.offset)):
            # persistent: transformers refills non-persistent buffers of a model it loaded with uninitialised
            # memory (they are expected to be recomputed by _init_weights); the state dict hooks write our keys
            self.register_buffer(n[key], t, persistent=True)
        for p in self._nf4_tensors(name):
            p._is_hf_initialized = True  # transformers' _init_weights must never re-initialise the codes

    def quantize_nf4_(self, name: str, dense: torch.Tensor, transposed: bool, quant_type: str = "nf4",
                      blocksize: int = 64, double_quant: bool = True) -> None:
        """Quantize a dense (E, d1, d2) tensor into parameter `name`, one expert at a time, on dense's device."""
        self.set_nf4_weight_(name, quantize_experts(dense.detach(), blocksize=blocksize, quant_type=quant_type,
                                                    double_quant=double_quant, transposed=transposed))

    def _drop_storage(self, name: str) -> None:
        n = _names(name)
        self._parameters.pop(n["absmax"], None)
        for key in _TABLES:
            self._buffers.pop(n[key], None)
            self._non_persistent_buffers_set.discard(n[key])

    def _nf4_tensors(self, name: str) -> list:
        n = _names(name)
        out = [self._parameters.get(n["packed"]), self._parameters.get(n["absmax"])]
        out += [self._buffers.get(n[k]) for k in _TABLES]
        return [t for t in out if t is not None]

    # --- reading ---------------------------------------------------------------------------------------------
    def nf4_weight(self, name: str) -> GroupedNF4Weight:
        """Parameter `name` as the grouped kernels take it (views of this module's tensors, no copy)."""
        spec = self.nf4_spec(name)
        if not self.nf4_ready(name):
            raise RuntimeError(f"{type(self).__name__}.{name} has not been loaded yet (still a meta placeholder)")
        n = _names(name)
        b = self._buffers
        absmax = _absmax_from_bytes(self._parameters[n["absmax"]], spec.double_quant)
        return GroupedNF4Weight(self._parameters[name], absmax, b[n["quant_map"]], spec.blocksize, spec.shape,
                                spec.transposed, b.get(n["nested_absmax"]), b.get(n["nested_quant_map"]),
                                b.get(n["nested_offset"]), quant_type=spec.quant_type, dtype=spec.dtype)

    @torch.no_grad()
    def dequantize_nf4(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense (E, d1, d2) in `dtype` (default: the dtype it was quantized from)."""
        return self.nf4_weight(name).dequantize(dtype)

    def quantized_parameters(self) -> tuple[nn.Parameter, ...]:
        """The frozen uint8 Parameters holding 4-bit experts (qpeft.tuners.params counts quantized_numel instead)."""
        out = []
        for name in self.nf4_params():
            if self.nf4_ready(name):
                out += [self._parameters[name], self._parameters[_names(name)["absmax"]]]
        return tuple(out)

    def quantized_numel(self) -> int:
        """Logical number of expert weights held in 4 bits."""
        total = 0
        for name in self.nf4_params():
            E, d1, d2 = self.nf4_spec(name).shape
            total += E * d1 * d2
        return total

    def memory_bytes(self) -> int:
        """Bytes of the 4-bit experts' tensors (codes, scales and tables)."""
        return sum(t.numel() * t.element_size() for name in self.nf4_params() if self.nf4_ready(name)
                   for t in self._nf4_tensors(name))

    # --- module plumbing -------------------------------------------------------------------------------------
    def _storage_names(self) -> set:
        return {v for p in self.nf4_params() for k, v in _names(p).items() if k != "packed"}

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() would cast the fp32 tables: keep their dtype, take the device (as QLinearNF4 does).
        # The uint8 Parameters need no guard: dtype conversions only cast floating-point tensors.
        keep = {n: self._buffers[n] for p in self.nf4_params() for n in (_names(p)[k] for k in _TABLES)
                if self._buffers.get(n) is not None}
        for n in keep:
            self._buffers[n] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for n, t in keep.items():
                moved = fn(t)
                self._buffers[n] = moved if moved.dtype == t.dtype else t.to(device=moved.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        storage = self._storage_names()
        dtensor = _dtensor_type()

        def put(key, t):
            destination[prefix + key] = t if keep_vars else t.detach()

        for name, param in self._parameters.items():
            if param is None or name in storage:
                continue
            if name not in self.nf4_params():
                put(name, param)
            elif not self.nf4_ready(name) or param.device.type == "meta":
                put(name, param)  # a placeholder (a model built on meta lists its keys this way)
            elif dtensor is not None and isinstance(param, dtensor):
                for suffix, t in self._sharded_state(name, dtensor).items():
                    put(name + suffix, t)
            else:
                for suffix, t in experts_state_dict(self.nf4_weight(name)).items():
                    put(name + suffix, t)
        for name, buf in self._buffers.items():
            if buf is not None and name not in storage and name not in self._non_persistent_buffers_set:
                put(name, buf)

    def _sharded_state(self, name: str, dtensor) -> dict:
        """FSDP2: the state of a sharded 4-bit parameter, as DTensors of the on-disk tensors (`full_tensor()` is the
        unsharded bytes). The scales' shard is the local (E_local, 4*blocks) bytes viewed as fp32, so nothing moves.
        torch.distributed.checkpoint resolves `p.absmax` by getattr on the parameter: placeholders are attached."""
        spec = self.nf4_spec(name)
        n = _names(name)
        packed, absmax_bytes = self._parameters[name], self._parameters[n["absmax"]]
        if spec.double_quant:
            absmax = absmax_bytes
        else:
            absmax = dtensor.from_local(absmax_bytes.to_local().view(torch.float32), absmax_bytes.device_mesh,
                                        absmax_bytes.placements, run_check=False,
                                        shape=torch.Size((spec.shape[0], absmax_bytes.shape[1] // 4)),
                                        stride=(absmax_bytes.shape[1] // 4, 1))
        for attr in ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset"):
            setattr(packed, attr, None)
        packed.quant_state = types.SimpleNamespace(**{"qpeft_experts__" + q: None for q in ("nf4", "fp4")})
        b = self._buffers
        out = {"": packed, ".absmax": absmax, ".quant_map": b[n["quant_map"]]}
        header = {"format": FORMAT, "version": FORMAT_VERSION, "quant_type": spec.quant_type,
                  "blocksize": spec.blocksize, "dtype": str(spec.dtype).removeprefix("torch."),
                  "shape": list(spec.shape), "transposed": spec.transposed}
        if spec.double_quant:
            out.update({".nested_absmax": b[n["nested_absmax"]], ".nested_quant_map": b[n["nested_quant_map"]],
                        ".nested_offset": b[n["nested_offset"]]})
            header["nested_blocksize"] = NESTED_BLOCKSIZE
        out["." + EXPERTS_BLOB + spec.quant_type] = pack_json(header).to(b[n["quant_map"]].device)
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The 4-bit parameters: every tensor checked first, installed only if all of them are consistent. A state
        # dict without a parameter's packed key is a partial load (PEFT loading an adapter, a resume without the
        # frozen base): reported missing, as for QLinearNF4.
        where = prefix[:-1] or "<root>"
        parsed = {}
        dtensor = _dtensor_type()
        for name in self.nf4_params():
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            if dtensor is not None and isinstance(self._parameters[name], dtensor):
                error_msgs.append(f"{type(self).__name__} {where}: cannot load into a sharded 4-bit experts "
                                  f"parameter {name!r} (FSDP2); load the state dict before sharding")
                return
            spec = self.nf4_spec(name)
            group = {k[len(key):]: v for k, v in state_dict.items()
                     if k == key or (k.startswith(key + ".") and k[len(key):] in EXPERTS_SUFFIXES)}
            try:
                parsed[name] = parse_experts_state(group, spec.shape, spec.transposed, where=key)
            except ValueError as e:
                error_msgs.append(f"{type(self).__name__} {where}: {e}")
                return
        # everything else (biases, ...) through nn.Module's own loader, with the 4-bit tensors out of its sight
        hidden = set(self.nf4_params()) | self._storage_names()
        params, buffers = self._parameters, self._buffers
        self.__dict__["_parameters"] = {k: v for k, v in params.items() if k not in hidden}
        self.__dict__["_buffers"] = {k: v for k, v in buffers.items() if k not in hidden}
        try:
            sub = {k: v for k, v in state_dict.items()
                   if not any(k == prefix + h or k.startswith(prefix + h + ".") for h in self.nf4_params())}
            super()._load_from_state_dict(sub, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            for k, v in self._parameters.items():  # assign=True loads replace entries: keep them
                params[k] = v
            for k, v in self._buffers.items():
                buffers[k] = v
            self.__dict__["_parameters"], self.__dict__["_buffers"] = params, buffers
        if strict:
            for name in self.nf4_params():
                key = prefix + name
                unexpected_keys.extend(sorted(k for k in state_dict if k.startswith(key + ".")
                                              and k[len(key):] not in EXPERTS_SUFFIXES))
        for name, w in parsed.items():
            device = self._parameters[name].device
            device = w.packed.device if device.type == "meta" else device
            self.set_nf4_weight_(name, w.to(device) if w.packed.device != device else _cloned(w))

    def extra_repr(self) -> str:
        base = super().extra_repr()
        parts = []
        for name in self.nf4_params():
            s = self.nf4_spec(name)
            parts.append(f"{name}={tuple(s.shape)} {s.quant_type} blocksize={s.blocksize} "
                         f"double_quant={s.double_quant}{' transposed' if s.transposed else ''}")
        mem = self.memory_bytes()
        text = "4-bit experts: " + "; ".join(parts) + f", memory={mem / 2**20:.3f} MiB"
        return f"{base}, {text}" if base else text


def _cloned(w: GroupedNF4Weight) -> GroupedNF4Weight:
    c = lambda t: None if t is None else t.detach().clone()  # noqa: E731
    from dataclasses import replace

    return replace(w, packed=c(w.packed), absmax=c(w.absmax), code=c(w.code), nested_absmax=c(w.nested_absmax),
                   nested_code=c(w.nested_code), offset=c(w.offset))


_CLASSES: dict = {}


def nf4_experts_class(cls: type) -> type:
    """The subclass of an experts class that holds 4-bit parameters (created once per class, importable by name
    from this module so that pickling a model works)."""
    if issubclass(cls, NF4ExpertsMixin):
        return cls
    if cls not in _CLASSES:
        name = f"{cls.__name__}4bit"
        if name in globals():  # two experts classes of one name (from different modules)
            name = f"{name}_{len(_CLASSES)}"
        sub = types.new_class(name, (NF4ExpertsMixin, cls), {})
        sub.__module__ = __name__
        sub.__qualname__ = name
        sub.__doc__ = (f"{cls.__module__}.{cls.__qualname__} with some of its fused expert parameters held in 4 bits "
                       f"(qpeft.modules.nf4_experts.NF4ExpertsMixin).")
        globals()[name] = sub
        _CLASSES[cls] = sub
    return _CLASSES[cls]


def is_nf4_experts(module: nn.Module) -> bool:
    """A module holding at least one 4-bit experts parameter."""
    return isinstance(module, NF4ExpertsMixin) and bool(module.nf4_params())


def dense_class(module: nn.Module) -> type:
    """The model's own experts class under the 4-bit subclass."""
    for c in type(module).__mro__[1:]:
        if c is not NF4ExpertsMixin and not issubclass(c, NF4ExpertsMixin):
            return c
    return type(module)
