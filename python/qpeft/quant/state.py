"""QuantState: everything needed to dequantize a blockwise-quantized tensor (mirrors bitsandbytes').

Serialization uses bitsandbytes' keys exactly (`Linear4bit._save_to_state_dict` writes `weight.` + each key
of `as_dict(packed=True)`), so 4-bit checkpoints move both ways between qpeft, bitsandbytes, transformers
and vLLM:
    absmax                            fp32 [blocks], or uint8 [blocks] codes with double quant
    quant_map                         fp32 [16] (4-bit) / [256] (8-bit) code book
    nested_absmax, nested_quant_map   fp32 [ceil(blocks/256)], fp32 [256]   (double quant only)
    quant_state.bitsandbytes__nf4|fp4 uint8 tensor of UTF-8 JSON: quant_type, blocksize, dtype, shape and,
                                      nested, nested_blocksize, nested_dtype, nested_offset (a float)
8-bit states ("blockwise8") use the same tensor keys with the blob key `quant_state.qpeft__blockwise8`
(bitsandbytes has no packed form for them).
"""
from __future__ import annotations

import json
import math

import torch

from ..ops import quantize  # noqa: F401  (registers qpeft::dequantize_blockwise)

__all__ = ["QuantState"]

QUANT_TYPES = ("nf4", "fp4", "blockwise8")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_BLOB_PREFIX = {"nf4": "bitsandbytes__", "fp4": "bitsandbytes__", "blockwise8": "qpeft__"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_VALID_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state", "quant_type",
               "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]  # bnb writes str(dtype).strip("torch."): the same for these dtypes


def _parse_dtype(name, key: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"QuantState.from_dict: {key} must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def pack_json(d: dict) -> torch.Tensor:
    """dict -> uint8 tensor of its UTF-8 JSON (bitsandbytes' utils.pack_dict_to_tensor)."""
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def unpack_json(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.cpu().to(torch.uint8).tolist()).decode("utf-8"))


class QuantState:
    """absmax (fp32 [blocks], or uint8 [blocks] when nested), shape (torch.Size of the original tensor),
    dtype (original dtype, the default output of dequantize), blocksize, quant_type ("nf4" | "fp4" |
    "blockwise8"), code (fp32 lookup table indexed by the stored code), offset (0-dim fp32, nested only) and
    state2 (the QuantState of the absmax codes, nested only: blocksize 256, the dynamic map)."""

    def __init__(self, absmax: torch.Tensor, shape=None, dtype: torch.dtype | None = None, blocksize: int = 64,
                 quant_type: str = "nf4", code: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                 state2: "QuantState | None" = None):
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.code = code
        self.offset = offset
        self.state2 = state2

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def __repr__(self) -> str:
        offset = f"{float(self.offset):.6g}" if self.nested and self.offset.device.type != "meta" else "?"
        nested = f", nested(blocksize={self.state2.blocksize}, offset={offset})" if self.nested else ""
        return (f"QuantState(quant_type={self.quant_type!r}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"blocksize={self.blocksize}, absmax={self.absmax.dtype}[{self.absmax.numel()}]{nested})")

    # --- device ---------------------------------------------------------------------------------------------
    def to(self, device) -> "QuantState":
        """Move every tensor to `device` (in place, like bitsandbytes); returns self."""
        self.absmax = self.absmax.to(device)
        if self.code is not None:
            self.code = self.code.to(device)
        if self.offset is not None:
            self.offset = self.offset.to(device)
        if self.state2 is not None:
            self.state2.to(device)
        return self

    # --- decoding -----------------------------------------------------------------------------------------
    def decoded_absmax(self) -> torch.Tensor:
        """fp32 [blocks] per-block absmax; with double quant code2[q] * absmax2[i // 256] + offset (fp32, as
        bitsandbytes: dequantize, then add the offset), computed by the L2 blockwise-dequant op."""
        if not self.nested:
            return self.absmax

        s2 = self.state2
        decoded = torch.ops.qpeft.dequantize_blockwise(self.absmax.reshape(-1).contiguous(), s2.absmax.contiguous(),
                                                       s2.code.contiguous(), s2.blocksize, torch.float32)
        return decoded + self.offset.float()

    # --- validation ---------------------------------------------------------------------------------------
    def validate(self, packed: torch.Tensor | None = None) -> "QuantState":
        """Raise ValueError naming the field when the fields disagree with each other or with `packed` (the
        quantized tensor: 4-bit bytes in any storage dtype, or the 8-bit codes). Returns self."""
        def bad(msg):
            raise ValueError(f"QuantState: {msg}")

        if self.quant_type not in QUANT_TYPES:
            bad(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if self.quant_type == "blockwise8":  # 8-bit blockwise: any block length (bitsandbytes' CPU quantizer)
            if not isinstance(self.blocksize, int) or isinstance(self.blocksize, bool) or self.blocksize < 1:
                bad(f"blocksize must be a positive int for blockwise8, got {self.blocksize!r}")
        elif self.blocksize not in BLOCKSIZES:
            bad(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        if self.shape is None or self.numel <= 0:
            bad(f"shape must be a non-empty shape, got {self.shape}")
        if self.dtype not in _DTYPES.values():
            bad(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        entries = 256 if self.quant_type == "blockwise8" else 16
        if not isinstance(self.code, torch.Tensor) or self.code.dtype != torch.float32 or \
                (self.quant_type != "blockwise8" and self.code.numel() != entries) or \
                not 2 <= self.code.numel() <= 256:
            bad(f"code (quant_map) must be a float32 tensor of {entries} entries for {self.quant_type}, got "
                f"{getattr(self.code, 'dtype', type(self.code).__name__)} {tuple(getattr(self.code, 'shape', ()))}")
        want_absmax = torch.uint8 if self.nested else torch.float32
        if self.absmax.dtype != want_absmax or self.absmax.numel() != self.blocks:
            bad(f"absmax must be {want_absmax} with ceil({self.numel}/{self.blocksize}) = {self.blocks} entries"
                f"{' (double quant)' if self.nested else ''}, got {self.absmax.dtype} {tuple(self.absmax.shape)}")
        if self.nested:
            s2 = self.state2
            if s2.blocksize not in BLOCKSIZES:
                bad(f"nested blocksize must be one of {BLOCKSIZES}, got {s2.blocksize!r}")
            nb = -(-self.blocks // s2.blocksize)
            if s2.absmax.dtype != torch.float32 or s2.absmax.numel() != nb:
                bad(f"nested_absmax must be float32 with ceil({self.blocks}/{s2.blocksize}) = {nb} entries, got "
                    f"{s2.absmax.dtype} {tuple(s2.absmax.shape)}")
            if s2.code is None or s2.code.dtype != torch.float32 or s2.code.numel() != 256:
                bad("nested_quant_map must be a float32 tensor of 256 entries, got "
                    f"{getattr(s2.code, 'dtype', None)} {tuple(getattr(s2.code, 'shape', ()))}")
            if not isinstance(self.offset, torch.Tensor) or self.offset.numel() != 1:
                bad(f"offset must be a 1-element tensor with double quant, got {self.offset!r}")
        elif self.offset is not None:
            bad("offset is set but there is no nested state (state2)")
        if packed is not None:
            nbytes = packed.numel() * packed.element_size()
            if self.quant_type == "blockwise8":
                if packed.dtype != torch.uint8 or packed.numel() != self.numel:
                    bad(f"the 8-bit codes must be uint8 with {self.numel} elements for shape {tuple(self.shape)}, "
                        f"got {packed.dtype} {tuple(packed.shape)}")
            elif nbytes != (self.numel + 1) // 2:
                bad(f"the packed tensor must hold (n+1)//2 = {(self.numel + 1) // 2} bytes for shape "
                    f"{tuple(self.shape)}, got {nbytes} ({packed.dtype} {tuple(packed.shape)})")
            for name, t in (("absmax", self.absmax), ("code", self.code)):
                if t.device != packed.device:
                    bad(f"{name} is on {t.device} but the packed tensor is on {packed.device}")
        return self

    # --- serialization ------------------------------------------------------------------------------------
    def as_dict(self, packed: bool = True) -> dict:
        """bitsandbytes' serialization dict. packed=True: tensors only (safetensors-ready), the non-tensor
        items in `quant_state.bitsandbytes__<quant_type>` as a uint8 tensor of UTF-8 JSON."""
        d = {"quant_type": self.quant_type, "absmax": self.absmax, "blocksize": self.blocksize,
             "quant_map": self.code, "dtype": _dtype_name(self.dtype),
             "shape": tuple(self.shape) if self.shape is not None else None}
        if self.nested:
            d.update({"nested_absmax": self.state2.absmax, "nested_blocksize": self.state2.blocksize,
                      # a copy: safetensors drops shared tensors, so two layers must not share it
                      "nested_quant_map": self.state2.code.clone(),
                      "nested_dtype": _dtype_name(self.state2.dtype or torch.float32),
                      "nested_offset": float(self.offset)})
        if not packed:
            return d
        out = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        out["quant_state." + _BLOB_PREFIX[self.quant_type] + self.quant_type] = \
            pack_json({k: v for k, v in d.items() if not isinstance(v, torch.Tensor)})
        return out

    @classmethod
    def from_dict(cls, qs_dict: dict, device=None, packed: torch.Tensor | None = None) -> "QuantState":
        """Inverse of `as_dict` (packed or not; keys may carry a prefix such as `weight.`), also for dicts
        written by bitsandbytes. Everything is checked before anything is built (`validate`, plus `packed`
        when given): a bad dict raises ValueError naming the key and nothing is modified."""
        blob_keys = [k for k, v in qs_dict.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        items = {}
        if blob_keys:
            if len(blob_keys) != 1:
                raise ValueError(f"QuantState.from_dict: expected exactly one `quant_state.bitsandbytes__nf4|fp4` "
                                 f"item, found {blob_keys}")
            suffix = blob_keys[0].split(".")[-1]
            valid = [p + q for q, p in _BLOB_PREFIX.items()]
            if suffix not in valid:
                raise ValueError(f"QuantState.from_dict: quant_state key must end with one of {valid}, "
                                 f"got {blob_keys[0]!r}")
            try:
                items.update(unpack_json(qs_dict[blob_keys[0]]))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"QuantState.from_dict: {blob_keys[0]} is not UTF-8 JSON ({e})") from None
            if items.get("quant_type") != suffix.split("__")[-1]:
                raise ValueError(f"QuantState.from_dict: {blob_keys[0]} says quant_type "
                                 f"{items.get('quant_type')!r}, its key says {suffix.split('__')[-1]!r}")
        elif "quant_type" not in {k.split(".")[-1] for k in qs_dict}:
            raise ValueError("QuantState.from_dict: expected packed (`quant_state.bitsandbytes__nf4|fp4`) or "
                             "unpacked (`quant_type`, ...) items, found neither")
        for k, v in qs_dict.items():
            if k not in blob_keys:
                items[k.split(".")[-1]] = v
        unknown = set(items) - set(_VALID_KEYS)
        if unknown:
            raise ValueError(f"QuantState.from_dict: unexpected keys {sorted(unknown)}")
        required = ["quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"]
        if "nested_absmax" in items:
            required += ["nested_blocksize", "nested_quant_map", "nested_dtype", "nested_offset"]
        missing = [k for k in required if k not in items]
        if missing:
            raise ValueError(f"QuantState.from_dict: missing keys {missing}")
        for k in ("absmax", "quant_map") + (("nested_absmax", "nested_quant_map") if "nested_absmax" in items else ()):
            if not isinstance(items[k], torch.Tensor):
                raise ValueError(f"QuantState.from_dict: {k} must be a tensor, got {type(items[k]).__name__}")
        if not isinstance(items["blocksize"], int) or isinstance(items["blocksize"], bool):
            raise ValueError(f"QuantState.from_dict: blocksize must be an int, got {items['blocksize']!r}")
        shape = items["shape"]
        if not isinstance(shape, (list, tuple, torch.Size)) or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(f"QuantState.from_dict: shape must be a list of positive ints, got {shape!r}")
        state2 = offset = None
        if "nested_absmax" in items:
            off = items["nested_offset"]
            if isinstance(off, bool) or not isinstance(off, (int, float)) or not math.isfinite(off):
                raise ValueError(f"QuantState.from_dict: nested_offset must be a finite float, got {off!r}")
            offset = torch.tensor(float(off), dtype=torch.float32)
            state2 = cls(absmax=items["nested_absmax"], shape=(items["absmax"].numel(),),
                         dtype=_parse_dtype(items["nested_dtype"], "nested_dtype"),
                         blocksize=items["nested_blocksize"], quant_type="blockwise8",
                         code=items["nested_quant_map"])
        state = cls(absmax=items["absmax"], shape=shape, dtype=_parse_dtype(items["dtype"], "dtype"),
                    blocksize=items["blocksize"], quant_type=items["quant_type"], code=items["quant_map"],
                    offset=offset, state2=state2)
        if state.absmax.device != state.code.device:  # validate() compares devices with `packed` only
            state.to(state.absmax.device)
        state.validate(packed.to(state.absmax.device) if packed is not None else None)
        # fresh tensors: the state must not alias the caller's dict (a later in-place edit stays local)
        state.absmax = state.absmax.clone()
        state.code = state.code.clone()
        if state2 is not None:
            state2.absmax, state2.code = state2.absmax.clone(), state2.code.clone()
        return state.to(device) if device is not None else state
