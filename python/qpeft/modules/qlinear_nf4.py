"""QLinearNF4: a drop-in nn.Linear whose weight is stored as 4-bit NF4/FP4 (bitsandbytes' format).

Storage (no tensor subclass): the two tensors that grow with the layer are frozen **uint8 Parameters**, so
FSDP2 and DeepSpeed ZeRO-3 shard them like any parameter and no mixed-precision policy ever casts them:
`weight`, the packed bytes [(N*K+1)//2, 1], and `absmax_bytes`, the per-block scales as raw bytes
([blocks, 4], the fp32 absmax's bytes; or [blocks, 1], the 8-bit codes with double quant). The kernels read
them through free views (`absmax` is `absmax_bytes` viewed back as fp32). The small tables are non-persistent
buffers: `quant_map` (16-entry code book) and, with double quant, `nested_absmax` (one fp32 per 256 blocks),
`nested_quant_map`, `offset`.

The state dict uses bitsandbytes' Linear4bit keys exactly (`weight`, `weight.absmax` (fp32 or uint8 codes),
`weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4|fp4`,
`bias`), written and read by custom hooks, so checkpoints move both ways.

Moving the module (.to / .cuda / .half) moves the tensors but never changes their dtypes and never
re-quantizes: the packed bytes and scales are the quantized weight.
"""
from __future__ import annotations

import math
import sys
import types

import torch
import torch.nn as nn

from ..autograd.nf4_matmul import nf4_matmul_parts
from ..formats import codes
from ..ops import quantize as quant_ops  # noqa: F401  (registers qpeft::quantize_4bit / quantize_blockwise)
from ..quant.functional import dequantize_4bit
from ..quant.state import QuantState
from ..reference.nf4_matmul import NESTED_BLOCKSIZE

__all__ = ["QLinearNF4"]

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Quantize at most this many weights at a time in from_linear: 2^24 fp32 elements = 64 MiB of
# temporaries, instead of ~5x the layer (fp32 copy, scaled copy, codes) for a 28672 x 8192 layer (2.3 GB).
QUANT_CHUNK = 1 << 24
_QUANT_TENSORS = ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")
_STORAGE_PARAMETERS = ("weight", "absmax_bytes")  # frozen uint8 Parameters: what FSDP / ZeRO-3 shard
_TABLE_BUFFERS = ("quant_map", "nested_absmax", "nested_quant_map", "offset")  # small, replicated
_BLOB = "quant_state.bitsandbytes__"


def parse_bnb_state(state_dict: dict, prefix: str, out_features: int, in_features: int) -> dict:
    """Validate the Linear4bit keys under `prefix` (through QuantState.from_dict) and return the buffers
    {"weight" (uint8 [(n+1)//2, 1]), "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset"} plus
    "quant_type", "blocksize", "dtype"; nothing is modified. Raises KeyError/ValueError naming the key."""
    if prefix + "weight" not in state_dict:
        raise KeyError(f"missing {prefix}weight")
    items = {k[len(prefix) + len("weight."):]: v for k, v in state_dict.items() if k.startswith(prefix + "weight.")}
    if not any(k.startswith(_BLOB) for k in items):
        raise KeyError(f"missing {prefix}weight.{_BLOB}nf4|fp4 (not a bitsandbytes 4-bit layer)")
    weight = state_dict[prefix + "weight"]
    state = QuantState.from_dict(items, packed=weight)
    if state.quant_type not in QUANT_TYPES:
        raise ValueError(f"{prefix}weight: quant_type must be nf4 or fp4, got {state.quant_type!r}")
    if tuple(state.shape) != (out_features, in_features):
        raise ValueError(f"{prefix}weight: quantized shape {tuple(state.shape)} does not match this layer's "
                         f"(out_features, in_features) = {(out_features, in_features)}")
    if state.nested and state.state2.blocksize != NESTED_BLOCKSIZE:
        raise ValueError(f"{prefix}weight.nested_blocksize must be {NESTED_BLOCKSIZE}, got {state.state2.blocksize}")
    packed = weight.contiguous().view(torch.uint8).reshape(-1, 1)
    s2 = state.state2
    return dict(weight=packed, absmax=state.absmax.reshape(-1), quant_map=state.code.reshape(-1),
                nested_absmax=s2.absmax.reshape(-1) if s2 else None,
                nested_quant_map=s2.code.reshape(-1) if s2 else None,
                offset=state.offset.reshape(()) if s2 else None, quant_type=state.quant_type,
                blocksize=state.blocksize, dtype=state.dtype)


def absmax_to_bytes(absmax: torch.Tensor) -> torch.Tensor:
    """fp32 absmax [blocks] -> its bytes [blocks, 4]; uint8 codes [blocks] -> [blocks, 1]. Rows are blocks, so a
    dim-0 shard never splits one scale's bytes."""
    if absmax.dtype == torch.uint8:
        return absmax.reshape(-1, 1)
    if absmax.dtype != torch.float32:
        raise ValueError(f"absmax must be float32 or uint8 codes, got {absmax.dtype}")
    return absmax.contiguous().reshape(-1).view(torch.uint8).reshape(-1, 4)


def absmax_from_bytes(absmax_bytes: torch.Tensor, double_quant: bool) -> torch.Tensor:
    """The inverse view of absmax_to_bytes (free: no copy)."""
    if double_quant:
        return absmax_bytes.reshape(-1)
    return absmax_bytes.view(torch.float32).reshape(-1)


def _dtensor_type():
    """torch.distributed.tensor.DTensor if that module is loaded (no DTensor can exist otherwise), else None:
    QLinearNF4 never imports torch.distributed itself."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def _absmax_dtensor(absmax_bytes, double_quant: bool, dtensor):
    """The DTensor of the scales over absmax_bytes' row shards (FSDP2): each local [rows, 4] shard viewed as fp32
    (rows are whole scales), so no bytes move."""
    from torch.distributed.tensor import Shard

    if any(not (isinstance(p, Shard) and p.dim == 0) for p in absmax_bytes.placements):
        raise ValueError(f"absmax_bytes must be sharded on dim 0 (rows are whole scales), got placements "
                         f"{absmax_bytes.placements}")
    local = absmax_from_bytes(absmax_bytes.to_local(), double_quant)
    blocks = absmax_bytes.shape[0]
    return dtensor.from_local(local, absmax_bytes.device_mesh, absmax_bytes.placements, run_check=False,
                              shape=torch.Size([blocks]), stride=(1,))


@torch.no_grad()
def check_finite_weight(w: torch.Tensor, what: str = "weight", start: int = 0) -> None:
    """Raise ValueError naming `what` when w holds inf/nan (its flat index + start in the message), QUANT_CHUNK
    elements at a time: one read of w, never more than a chunk's mask (16 MiB for 2^24 elements) held."""
    if w.device.type == "meta":
        return
    flat = w.detach().reshape(-1)
    for s in range(0, flat.numel(), QUANT_CHUNK):
        ok = torch.isfinite(flat[s:s + QUANT_CHUNK])
        if not bool(ok.all()):
            raise ValueError(f"{what} has non-finite values (inf/nan), the first at flat index "
                             f"{start + s + int((~ok).nonzero()[0])}; cannot quantize")


class QLinearNF4(nn.Module):
    """y = x @ W^T + bias with W (out_features, in_features) stored in 4 bits (NF4 or FP4, blocks of
    `blocksize`, optionally double-quantized absmax). x: (..., in_features), any float dtype; the matmul runs
    in `compute_dtype` (None: x's dtype; under autocast: the autocast dtype) with fp32 accumulation and the
    result is cast back to x's dtype (kept in the autocast dtype under autocast)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 compute_dtype: torch.dtype | None = torch.bfloat16, quant_type: str = "nf4", blocksize: int = 64,
                 double_quant: bool = True, device=None, dtype: torch.dtype | None = None):
        super().__init__()
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        if blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.quant_type, self.blocksize = compute_dtype, quant_type, blocksize
        self.weight_dtype = dtype or torch.get_default_dtype()
        dense = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=self.weight_dtype)
        self.bias = dense.bias
        self._set_quantized(**self._quantize(dense.weight.detach(), quant_type, blocksize, double_quant))

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = torch.bfloat16,
                    quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True) -> "QLinearNF4":
        """Quantize an existing nn.Linear on its own device, QUANT_CHUNK weights at a time."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    compute_dtype=compute_dtype, quant_type=quant_type, blocksize=blocksize,
                    double_quant=double_quant, device="meta", dtype=w.dtype)  # meta: no throw-away init
        layer._set_quantized(**cls._quantize(w.detach(), quant_type, blocksize, double_quant))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    @staticmethod
    def _quantize(w: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool) -> dict:
        n = w.numel()
        blocks = math.ceil(n / blocksize)
        if w.device.type == "meta":  # shapes only (from_linear fills them; load_state_dict may too)
            packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device="meta")
            absmax = torch.empty(blocks, dtype=torch.uint8 if double_quant else torch.float32, device="meta")
            nested = {}
            if double_quant:
                nested = dict(nested_absmax=torch.empty(math.ceil(blocks / NESTED_BLOCKSIZE), device="meta"),
                              nested_quant_map=torch.empty(256, device="meta"), offset=torch.empty((), device="meta"))
            return dict(weight=packed, absmax=absmax, quant_map=torch.empty(16, device="meta"), **nested)
        flat = w.reshape(-1)
        packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=w.device)
        absmax = torch.empty(blocks, dtype=torch.float32, device=w.device)
        chunk = max(blocksize, QUANT_CHUNK // blocksize * blocksize)  # whole blocks, so bytes never split
        for start in range(0, n, chunk):
            part = flat[start:start + chunk]
            check_finite_weight(part, "weight", start)
            p, a = torch.ops.qpeft.quantize_4bit(part.contiguous(), blocksize, quant_type)
            packed[start // 2:start // 2 + p.numel()] = p.reshape(-1, 1)
            absmax[start // blocksize:start // blocksize + a.numel()] = a.reshape(-1)
        out = dict(weight=packed, absmax=absmax, quant_map=(codes.nf4 if quant_type == "nf4" else codes.fp4)(w.device))
        if double_quant:  # bitsandbytes' compress_statistics: offset = mean, 8-bit dynamic code per 256 blocks
            offset = absmax.mean()
            code2 = codes.dynamic_map(device=w.device)
            q, absmax2 = torch.ops.qpeft.quantize_blockwise(absmax - offset, code2, NESTED_BLOCKSIZE)
            out.update(absmax=q.reshape(-1), nested_absmax=absmax2.reshape(-1).float(), nested_quant_map=code2,
                       offset=offset)
        return out

    def _set_quantized(self, weight, absmax, quant_map, nested_absmax=None, nested_quant_map=None, offset=None,
                       **_):
        # Parameters (frozen, uint8: never cast, sharded by FSDP2 / ZeRO-3) and buffers. _save_to_state_dict /
        # _load_from_state_dict write and read bitsandbytes' keys themselves; the buffers are still registered
        # persistent, because transformers replaces every non-persistent buffer of a model it has just loaded by
        # uninitialised memory (expecting the model's _init_weights to recompute it).
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.absmax_bytes = nn.Parameter(absmax_to_bytes(absmax), requires_grad=False)
        for name, t in zip(_TABLE_BUFFERS, (quant_map, nested_absmax, nested_quant_map, offset)):
            self.register_buffer(name, t, persistent=True)

    @classmethod
    def awaiting_weight(cls, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype | None = None,
                        **kwargs) -> "QLinearNF4":
        """A layer on the meta device whose `weight` is a dense-shaped (out_features, in_features) placeholder of
        `dtype`, to be filled by `quantize_weight_` or `load_bnb_tensors_`. transformers reads the placeholder's
        dtype to decide what to cast a checkpoint tensor to (5.17 casts even a weight about to be quantized: to
        uint8, were the placeholder the packed bytes)."""
        layer = cls(in_features, out_features, bias=bias, device="meta", dtype=dtype, **kwargs)
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=layer.weight_dtype, device="meta"),
                                    requires_grad=False)
        return layer

    @torch.no_grad()
    def quantize_weight_(self, weight: torch.Tensor) -> None:
        """Quantize a dense (out_features, in_features) weight into this layer, on the weight's device (the
        transformers quantizer calls this as each checkpoint tensor is read). Keeps quant_type, blocksize and
        double quant; the dtype it was quantized from becomes weight_dtype (bitsandbytes' quant_state dtype)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight must have shape (out_features, in_features) = "
                             f"{(self.out_features, self.in_features)}, got {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise ValueError(f"weight must be a floating-point tensor to quantize, got {weight.dtype}")
        double_quant = self.double_quant
        self._set_quantized(**self._quantize(weight.detach(), self.quant_type, self.blocksize, double_quant))
        self.weight_dtype = weight.dtype

    @torch.no_grad()
    def load_bnb_tensors_(self, tensors: dict, device: torch.device | str | None = None, name: str = "") -> None:
        """Set this layer from bitsandbytes' Linear4bit tensors without the module prefix ({"weight": packed,
        "weight.absmax": ..., "weight.quant_state.bitsandbytes__nf4": ...}; no bias). Validates everything
        first (ValueError naming `name` and the key); quant_type / blocksize / double quant follow the header."""
        try:
            parsed = parse_bnb_state(tensors, "", self.out_features, self.in_features)
        except (KeyError, ValueError) as e:
            raise ValueError(f"{name or 'QLinearNF4'}: {e.args[0]}") from None
        device = device or parsed["weight"].device
        self.quant_type, self.blocksize, self.weight_dtype = parsed["quant_type"], parsed["blocksize"], parsed["dtype"]
        self._set_quantized(**{n: (parsed[n].to(device).clone() if parsed[n] is not None else None)
                               for n in _QUANT_TENSORS})

    # --- properties ---------------------------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def absmax(self) -> torch.Tensor:
        """The per-block scales as the kernels read them: fp32 [blocks] (a view of `absmax_bytes`), or the
        uint8 codes [blocks] with double quant."""
        return absmax_from_bytes(self.absmax_bytes, self.double_quant)

    def quantized_parameters(self) -> tuple[nn.Parameter, ...]:
        """The frozen uint8 Parameters holding the quantized weight (counted by quantized_numel instead)."""
        return tuple(getattr(self, n) for n in _STORAGE_PARAMETERS)

    def quantized_numel(self) -> int:
        """Logical number of weights held in 4 bits (qpeft.tuners.params counts it instead of the packed bytes)."""
        return self.in_features * self.out_features

    def memory_bytes(self) -> int:
        tensors = (*self.quantized_parameters(), *(getattr(self, n) for n in _TABLE_BUFFERS))
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def quant_state(self):
        """The weight's QuantState (qpeft.quant.state.QuantState), sharing this module's buffers."""
        return self._quant_state(self.absmax)

    def _quant_state(self, absmax: torch.Tensor):
        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, shape=torch.Size([self.nested_absmax.numel()]),
                                dtype=torch.float32, blocksize=NESTED_BLOCKSIZE, quant_type="blockwise8",
                                code=self.nested_quant_map, offset=None, state2=None)
        return QuantState(absmax=absmax, shape=torch.Size([self.out_features, self.in_features]),
                          dtype=self.weight_dtype, blocksize=self.blocksize, quant_type=self.quant_type,
                          code=self.quant_map, offset=self.offset, state2=state2)

    # --- compute ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            cdt, out_dtype = torch.get_autocast_dtype(x.device.type), None
        else:
            cdt, out_dtype = self.compute_dtype or x.dtype, x.dtype
        y = nf4_matmul_parts(x.to(cdt), self.weight, self.absmax, self.quant_map, self.blocksize,
                             self.out_features, self.in_features, self.nested_absmax, self.nested_quant_map,
                             self.offset, bias=self.bias)
        return y if out_dtype is None else y.to(out_dtype)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense (out_features, in_features) weight in `dtype` (default: the dtype it was quantized from)."""
        return dequantize_4bit(self.weight, self.quant_state, dtype or self.weight_dtype)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() / .type() would cast the fp32 code books and nested absmax: keep every table
        # buffer's dtype and only take the device the function moves it to (no re-quantization either). The
        # uint8 Parameters need no guard: torch's dtype conversions only cast floating-point tensors.
        saved = {n: self._buffers[n] for n in _TABLE_BUFFERS if self._buffers.get(n) is not None}
        for n in saved:
            self._buffers[n] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for n, t in saved.items():
                moved = fn(t)
                self._buffers[n] = moved if moved.dtype == t.dtype else t.to(device=moved.device)
        return self

    def extra_repr(self) -> str:
        dense = self.in_features * self.out_features * 2
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}, memory={self.memory_bytes() / 2**20:.3f} MiB "
                f"(bf16: {dense / 2**20:.3f} MiB)")

    # --- bitsandbytes-compatible state dict ------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        def put(key, t):
            destination[prefix + key] = t if keep_vars else t.detach()

        put("weight", self.weight)
        # torch.distributed.checkpoint's get_model_state_dict resolves each key by getattr from the model
        # (`_get_fqns`): `...weight.absmax` needs an `absmax` attribute on the weight object (bitsandbytes
        # #1405: "'DTensor' object has no attribute 'absmax'"). Placeholders on whatever self.weight is now (the
        # sharded DTensor under FSDP2); the values come from this dict. Only on a DTensor: a plain weight with a
        # `quant_state` attribute would look like bitsandbytes' Params4bit to PEFT and transformers.
        dtensor = _dtensor_type()
        if dtensor is not None and isinstance(self.weight, dtensor):
            self.weight.absmax = self.weight.quant_map = None
            self.weight.nested_absmax = self.weight.nested_quant_map = None
            self.weight.quant_state = types.SimpleNamespace(**{"bitsandbytes__" + q: None for q in QUANT_TYPES})
        if self.bias is not None:
            put("bias", self.bias)
        if self.weight.device.type == "meta":
            # a model built on the meta device (transformers lists the keys it expects this way): the same keys,
            # the JSON header as an empty placeholder (its values are not known before loading)
            for key, t in (("absmax", self.absmax), ("quant_map", self.quant_map),
                           ("nested_absmax", self.nested_absmax), ("nested_quant_map", self.nested_quant_map)):
                if t is not None:
                    put("weight." + key, t)
            put("weight." + _BLOB + self.quant_type, torch.empty(0, dtype=torch.uint8, device="meta"))
            return
        if dtensor is not None and isinstance(self.absmax_bytes, dtensor):  # sharded: the scales' DTensor
            absmax = _absmax_dtensor(self.absmax_bytes, self.double_quant, dtensor)
        else:
            absmax = self.absmax
        for key, t in self._quant_state(absmax).as_dict(packed=True).items():  # bitsandbytes' keys, JSON header
            put("weight." + key, t)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Validate everything first; touch the module only when the whole layer is consistent.
        ours = {k for k in state_dict if k.startswith(prefix)}  # no child modules: every such key is ours
        if prefix + "weight" not in state_dict:
            # The packed weight is what makes a load of this layer: without it the layer is missing (strict loads
            # raise on that), also on a sharded layer. A partial load is not refused: PEFT's
            # set_peft_model_state_dict of an adapter under FSDP2 when the Trainer resumes, or DeepSpeed's
            # exclude_frozen_parameters checkpoint, which drops the Parameters `weight` / `absmax_bytes` by name
            # but keeps the statistics' bitsandbytes keys (`weight.absmax`, `weight.quant_map`, ...).
            missing_keys.append(prefix + "weight")
            if self.bias is not None and prefix + "bias" not in state_dict:
                missing_keys.append(prefix + "bias")
            return
        dtensor = _dtensor_type()
        if dtensor is not None and isinstance(self.weight, dtensor):
            error_msgs.append(f"QLinearNF4 {prefix[:-1] or '<root>'}: cannot load into a sharded layer (FSDP2); "
                              f"load the state dict before qpeft.distributed.shard_qlora_model")
            return
        try:
            parsed = parse_bnb_state(state_dict, prefix, self.out_features, self.in_features)
        except (KeyError, ValueError) as e:
            error_msgs.append(f"QLinearNF4 {prefix[:-1] or '<root>'}: {e.args[0]}")
            return
        bias = state_dict.get(prefix + "bias")
        if self.bias is not None:
            if bias is None:  # as nn.Linear: the weight still loads, the bias is reported missing
                missing_keys.append(prefix + "bias")
            elif tuple(bias.shape) != (self.out_features,):
                error_msgs.append(f"size mismatch for {prefix}bias: expected ({self.out_features},), "
                                  f"got {tuple(bias.shape)}")
                return
        elif bias is not None and strict:
            unexpected_keys.append(prefix + "bias")
        known = {prefix + "weight", prefix + "bias", *(prefix + "weight." + s for s in (
            "absmax", "quant_map", "nested_absmax", "nested_quant_map", _BLOB + "nf4", _BLOB + "fp4"))}
        if strict:
            unexpected_keys.extend(sorted(k for k in ours if k not in known))
        device = self.weight.device if self.weight.device.type != "meta" else parsed["weight"].device
        self.quant_type, self.blocksize, self.weight_dtype = parsed["quant_type"], parsed["blocksize"], parsed["dtype"]
        self._set_quantized(**{n: (parsed[n].to(device).clone() if parsed[n] is not None else None)
                               for n in _QUANT_TENSORS})
        if self.bias is not None and bias is not None:
            with torch.no_grad():
                if self.bias.device.type == "meta":
                    self.bias = nn.Parameter(bias.to(device).clone(), requires_grad=self.bias.requires_grad)
                else:
                    self.bias.copy_(bias)
