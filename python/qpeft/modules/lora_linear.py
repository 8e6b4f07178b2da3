"""`LoraLinear`: a frozen `nn.Linear` or `QLinearNF4` plus one or more named LoRA adapters (PEFT semantics).

Parameter names follow PEFT's in-memory layout, so state-dict keys match a PEFT model's:
`base_layer.weight`, `lora_A.<adapter>.weight` (r, in_features), `lora_B.<adapter>.weight` (out_features, r).
Defaults and scaling follow PEFT's `LoraConfig`: r=8, lora_alpha=8, scaling alpha/r (alpha/sqrt(r) with
rsLoRA), kaiming-uniform(a=sqrt(5)) A and zero B, so the layer equals its base at initialisation.
Adapters are kept in fp32 whatever the base dtype, as PEFT does by default (autocast_adapter_dtype=True):
their gradients and optimizer state then stay fp32, and the fused kernels read them at activation precision.
autocast_adapter_dtype=False creates them in the base's compute dtype instead (QLinearNF4.compute_dtype, a dense
base's weight dtype), where PEFT leaves them without its autocast (see `adapter_dtype`).
DoRA (use_dora=True) adds `lora_magnitude_vector.<adapter>.weight` (out_features,), PEFT's name; lora_bias=True
gives lora_B a bias (`lora_B.<adapter>.bias`), added as scaling * bias, as in PEFT.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn as nn

from ..autograd._lora_projection import LoraProjection
from ..autograd.dora import adapters_in_peft_order, dora_linear, dora_weight_norm
from ..autograd.lora import _nf4_parts, lora_linear
from . import merge_state
from .mixed_batch import mixed_batch_forward

__all__ = ["LoraLinear", "LoraRankWarning"]

INITS = ("kaiming", "gaussian", "random")


def is_nf4_layer(layer: nn.Module) -> bool:
    """A 4-bit layer (QLinearNF4 or anything holding a packed weight + `quant_state`)."""
    return hasattr(layer, "quant_state") and not isinstance(layer, nn.Linear)


def base_shape(layer: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or QLinearNF4."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    if is_nf4_layer(layer):
        shape = layer.quant_state.shape
        return int(shape[0]), int(shape[1])
    raise TypeError(f"LoraLinear wraps nn.Linear or QLinearNF4, got {type(layer).__name__}")


class Magnitude(nn.Module):
    """DoRA's magnitude vector m (out_features,) as `weight`: PEFT's in-memory key `lora_magnitude_vector.<adapter>
    .weight` (PEFT keeps it on a DoraLinearLayer; its adapter files drop the `.weight`)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)


def _refuse_variants(names, use_dora: dict, lora_bias: dict, who: str) -> None:
    """ValueError for an active adapter a LoraProjection cannot describe (the fused blocks then run the layer):
    DoRA (a per-row magnitude over the normalised W + delta) and lora_bias (a bias added after B)."""
    for n in names:
        if use_dora.get(n, False):
            raise ValueError(f"{who}: adapter {n!r} uses DoRA, which the fused blocks do not compute")
        if lora_bias.get(n, False):
            raise ValueError(f"{who}: adapter {n!r} has a lora_bias, which the fused blocks do not compute")


_ADAPTER_FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # what the fused ops take for A and B


def check_autocast_adapter_dtype(value) -> bool:
    """PEFT's flag is a bool; anything else (a dtype, a string, None) raises rather than being read as truthy."""
    if not isinstance(value, bool):
        raise ValueError(f"autocast_adapter_dtype must be True or False (PEFT's get_peft_model argument), "
                         f"got {value!r}")
    return value


def adapter_dtype(layer: nn.Module, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype a new adapter on base `layer` is kept in. True (PEFT's default): fp32. False: where PEFT leaves
    an adapter without its autocast, the base's compute dtype: a 4-bit layer's `compute_dtype` (None, i.e. x's
    dtype: fp32, as PEFT + bitsandbytes leaves it), an nn.Linear's weight dtype (one the fused ops do not take,
    e.g. float64: fp32)."""
    check_autocast_adapter_dtype(autocast_adapter_dtype)
    if autocast_adapter_dtype:
        return torch.float32
    dtype = getattr(layer, "compute_dtype", None) if is_nf4_layer(layer) else layer.weight.dtype
    return dtype if dtype in _ADAPTER_FLOATS else torch.float32


def dora_refusal(layer: nn.Module) -> str | None:
    """Why DoRA cannot run on this base layer, or None: it needs the dense weight of an nn.Linear or a 4-bit
    NF4/FP4 (out_features, in_features) weight with its QuantState (what qpeft::dora_weight_norm reads)."""
    if isinstance(layer, nn.Linear):
        return None
    try:
        parts = _nf4_parts(layer)
    except ValueError as e:
        return f"its 4-bit weight cannot be read ({e})"
    if parts is None:
        return f"{type(layer).__name__} is neither an nn.Linear nor a 4-bit layer with a QuantState"
    return None


class LoraRankWarning(UserWarning):
    """r exceeds min(in_features, out_features): allowed (PEFT allows it), but the adapter is not low-rank."""


def check_rank(r) -> None:
    """PEFT's rule: any int r >= 1 (bool is not an int here)."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an int >= 1, got {r!r}")


def warn_not_low_rank(where: str, r: int) -> None:
    warnings.warn(f"LoRA rank r={r} is not below the rank of {where}: the update is no longer low-rank "
                  f"(it trains more parameters than a full update of that layer would need)",
                  LoraRankWarning, stacklevel=3)


class LoraLinear(nn.Module):
    """y = base_layer(x) + sum over active adapters of scaling_a * B_a(A_a(dropout_a(x))), fused per call.

    base_layer: nn.Linear (any float dtype) or QLinearNF4; its parameters are frozen.
    r: rank, an int >= 1 (as in PEFT, r > min(in_features, out_features) is accepted with a LoraRankWarning:
        the update is then no longer low-rank, only larger); lora_alpha: scaling numerator.
    lora_dropout: dropout probability on the adapter input (training only; the mask is regenerated in
        backward from a seed, never stored).
    init: "kaiming" (PEFT default: kaiming-uniform A, zero B), "gaussian" (A ~ N(0, 1/r), zero B, as in the
        LoRA paper), or "random" (nn.Linear's default init for A *and* B: not a no-op; for tests, like PEFT's
        init_lora_weights=False).
    use_rslora: scaling lora_alpha / sqrt(r) instead of lora_alpha / r.
    use_dora: DoRA (PEFT's maths, qpeft.autograd.dora): a magnitude m per output row, initialised to
        ||W + s B A||_row, y = m / ||W + s B A||_row * (x W^T + s x A^T B^T) + bias.
    lora_bias: a trainable bias on lora_B (zero-initialised by the kaiming/gaussian inits), added as s * bias; not
        with DoRA (PEFT's rule).
    autocast_adapter_dtype: True (PEFT's default): A, B (and DoRA's magnitude, lora_B's bias) in fp32; False: in
        the base's compute dtype (QLinearNF4.compute_dtype, the dense weight's dtype), as PEFT + bitsandbytes
        leaves them with get_peft_model(..., autocast_adapter_dtype=False). Initialised in fp32 either way, then
        rounded, so both give the same values up to that rounding.
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 init: str | bool = "kaiming", use_rslora: bool = False, adapter_name: str = "default",
                 use_dora: bool = False, lora_bias: bool = False, autocast_adapter_dtype: bool = True):
        super().__init__()
        check_autocast_adapter_dtype(autocast_adapter_dtype)
        self.out_features, self.in_features = base_shape(base_layer)
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        self.use_dora: dict[str, bool] = {}
        self.lora_bias: dict[str, bool] = {}
        self._dora_merge_norm: dict[str, torch.Tensor] = {}  # ||W0 + delta||_row of each merged DoRA adapter
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.init: dict[str, str] = {}
        self.merged_adapters: list[str] = []
        self.last_merge_error: dict[str, float] = {}
        self._active: list[str] = []
        self._disabled = False
        # merge() keeps the pre-merge base weight (see modules/merge_state.py): `_premerge` {"original": Storage,
        # "stamp": the base right after the last merge}; `_held`: the merged weight set aside while
        # disable_adapters() runs the original
        self._premerge: dict | None = None
        self._held: merge_state.Held | None = None
        self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, init, use_rslora, use_dora, lora_bias,
                         autocast_adapter_dtype)
        self._active = [adapter_name]

    # ------------------------------------------------------------------ adapters
    @property
    def is_nf4(self) -> bool:
        return is_nf4_layer(self.base_layer)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def add_adapter(self, adapter_name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    init: str | bool = "kaiming", use_rslora: bool = False, use_dora: bool = False,
                    lora_bias: bool = False, autocast_adapter_dtype: bool = True) -> None:
        """Add a new adapter (not activated unless it is the layer's first; see set_adapter), in fp32 or, with
        autocast_adapter_dtype=False, in the base's compute dtype (see the class docstring)."""
        dtype = adapter_dtype(self.base_layer, autocast_adapter_dtype)
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string without '.', got {adapter_name!r}")
        if adapter_name in self.lora_A:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer")
        K, N = self.in_features, self.out_features
        check_rank(r)
        if r > min(K, N):
            warn_not_low_rank(f"a layer of shape (out={N}, in={K})", r)
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if init is True:
            init = "kaiming"
        if init is False:
            init = "random"
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if use_dora and lora_bias:  # PEFT's LoraConfig refuses the pair too
            raise ValueError("lora_bias=True is not supported for DoRA (use_dora=True); pass one of them")
        if use_dora:
            why = dora_refusal(self.base_layer)
            if why is not None:
                raise ValueError(f"use_dora=True: DoRA cannot serve this base layer: {why}")
        device = self._device()
        self.lora_A[adapter_name] = nn.Linear(K, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B[adapter_name] = nn.Linear(r, N, bias=bool(lora_bias), device=device, dtype=torch.float32)
        self.use_dora[adapter_name] = bool(use_dora)
        self.lora_bias[adapter_name] = bool(lora_bias)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = float(lora_dropout)
        self.use_rslora[adapter_name] = bool(use_rslora)
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.init[adapter_name] = init
        self.reset_lora_parameters(adapter_name)
        # initialised in fp32 (the same draws whatever the dtype), then rounded once, as PEFT casts its fp32 init
        if use_dora:  # PEFT: m = ||W + s B A||_row of the initialised adapter (||W|| when B = 0), here in fp32
            norm = dora_weight_norm(self.base_layer, self.lora_A[adapter_name].weight,
                                    self.lora_B[adapter_name].weight, self.scaling[adapter_name])
            self.lora_magnitude_vector[adapter_name] = Magnitude(norm.to(dtype))
        if dtype != torch.float32:
            self.lora_A[adapter_name].to(dtype)
            self.lora_B[adapter_name].to(dtype)

    def reset_lora_parameters(self, adapter_name: str) -> None:
        A = self.lora_A[adapter_name].weight
        B = self.lora_B[adapter_name].weight
        with torch.no_grad():
            init = self.init[adapter_name]
            bias = self.lora_B[adapter_name].bias
            if init == "kaiming":  # PEFT/loralib: the nn.Linear default for A, zero B
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
                B.zero_()
                if bias is not None:
                    bias.zero_()
            elif init == "gaussian":  # PEFT's "gaussian": std 1/r
                nn.init.normal_(A, std=1.0 / self.r[adapter_name])
                B.zero_()
                if bias is not None:
                    bias.zero_()
            else:
                self.lora_A[adapter_name].reset_parameters()
                self.lora_B[adapter_name].reset_parameters()

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Activate one adapter or several (outputs summed); active ones become trainable, others frozen."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        missing = [n for n in names if n not in self.lora_A]
        if missing:
            raise ValueError(f"unknown adapter(s) {missing}; this layer has {list(self.lora_A)}")
        for n in self.lora_A:
            self.lora_A[n].requires_grad_(n in names)
            self.lora_B[n].requires_grad_(n in names)
            if n in self.lora_magnitude_vector:
                self.lora_magnitude_vector[n].requires_grad_(n in names)
        self._active = names

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.lora_A:
            raise ValueError(f"unknown adapter {adapter_name!r}; this layer has {list(self.lora_A)}")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into the base weight; unmerge() it first")
        for d in (self.r, self.lora_alpha, self.lora_dropout, self.use_rslora, self.scaling, self.init, self.use_dora,
                  self.lora_bias):
            del d[adapter_name]
        del self.lora_A[adapter_name]
        del self.lora_B[adapter_name]
        if adapter_name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter_name]
        self._active = [n for n in self._active if n != adapter_name]

    @contextlib.contextmanager
    def disable_adapters(self):
        """Inside the context the layer computes its base output only.

        A merged layer: PEFT unmerges it once (dequantize, subtract, re-quantize on a 4-bit base) and leaves it
        unmerged, the adapters computed beside the base again after the context. qpeft swaps in the pre-merge
        weight that merge() kept, and the merged weight back on exit, both by reference: nothing is
        re-quantized, the output inside is the original base's bit for bit, and leaving restores the merged
        layer bit for bit however often the context is used. Where merge() has no valid pre-merge weight (the
        base was written since the merge, e.g. by load_state_dict), it does what PEFT does: unmerges once and
        stays unmerged. merge() inside the context raises; unmerge() inside it keeps the original weight.
        """
        swapped = False
        if self.merged_adapters and self._held is None and any(self.lora_bias.get(n) for n in self.merged_adapters):
            self.unmerge()  # a merged lora_bias changed the base bias too: PEFT's way, unmerge once
        if self.merged_adapters and self._held is None:
            premerge = self._valid_premerge()
            if premerge is not None:
                merged = merge_state.snapshot(self.base_layer, self.is_nf4, clone=False)
                merge_state.put(self.base_layer, premerge["original"], self.is_nf4)
                self._held = merge_state.Held(merged, merge_state.stamp(self.base_layer, self.is_nf4))
                swapped = True
            else:
                self.unmerge()
        prev, self._disabled = self._disabled, True
        try:
            yield self
        finally:
            self._disabled = prev
            if swapped:
                self._restore_held()

    def _restore_held(self) -> None:
        """Leaving disable_adapters(): the merged weight goes back if the base still holds the original one
        (moved with the layer or not); if the base was replaced inside the context, that is kept, unmerged."""
        held, self._held = self._held, None
        if held is None:  # unmerge() inside the context: stays unmerged
            return
        nf4 = self.is_nf4
        if merge_state.same_stamp(held.stamp, merge_state.stamp(self.base_layer, nf4)):
            original = merge_state.snapshot(self.base_layer, nf4, clone=False)
            merge_state.put(self.base_layer, held.merged, nf4)
            self._premerge = {"original": original, "stamp": merge_state.stamp(self.base_layer, nf4)}
        else:
            self.merged_adapters.clear()
            self._premerge = None

    def _valid_premerge(self) -> dict | None:
        """The kept pre-merge weight if the base still holds what the last merge wrote; a stale one is dropped."""
        premerge = self._premerge
        if premerge is not None and not merge_state.same_stamp(premerge["stamp"],
                                                                merge_state.stamp(self.base_layer, self.is_nf4)):
            self._premerge = premerge = None
        return premerge

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() / .half(): the kept weights follow the base layer (converted as it was)
        held, premerge = self.__dict__.get("_held"), self.__dict__.get("_premerge")
        if not recurse or (held is None and premerge is None):
            return super()._apply(fn, recurse)
        nf4 = self.is_nf4
        current = merge_state.stamp(self.base_layer, nf4)
        valid = merge_state.same_stamp(held.stamp if held is not None else premerge["stamp"], current)
        super()._apply(fn, recurse)
        if held is not None:
            if valid:
                held.merged = merge_state.moved(held.merged, fn, nf4)
                held.stamp = merge_state.stamp(self.base_layer, nf4)
        elif valid:
            premerge["original"] = merge_state.moved(premerge["original"], fn, nf4)
            premerge["stamp"] = merge_state.stamp(self.base_layer, nf4)
        else:
            self._premerge = None
        return self

    # ------------------------------------------------------------------ forward
    def _device(self) -> torch.device:
        for t in (*self.base_layer.parameters(), *self.base_layer.buffers()):
            return t.device
        return torch.device("cpu")

    def forward(self, x: torch.Tensor, *, adapter_names: list[str] | None = None) -> torch.Tensor:
        """adapter_names: one adapter name per row of x (its first dimension; "__base__": none), inference
        only, as PEFT's; see qpeft.modules.mixed_batch. A model-level call sets it for every layer."""
        if adapter_names is None:
            adapter_names = self.__dict__.get("_qpeft_batch_adapter_names")
        if adapter_names is not None:
            return mixed_batch_forward(self, x, adapter_names)
        names = [n for n in self._active if n not in self.merged_adapters]
        if self._disabled or not names:
            return self.base_layer(x)
        base, bias, compute_dtype, out_dtype = self._base_operand(x)
        xc = x.to(compute_dtype)
        dropping = self.training and any(self.lora_dropout[n] > 0.0 for n in names)
        if any(self.use_dora[n] for n in names):
            y = self._dora_forward(xc, base, bias, names)
            return y if out_dtype is None or y.dtype == out_dtype else y.to(out_dtype)
        for n in names:  # lora_bias: scaling * lora_B.bias joins the base bias (one epilogue add), summed in fp32
            if self.lora_bias[n] and (len(names) == 1 or not dropping or n == names[0]):  # and rounded once
                b = self.lora_B[n].bias.float() * self.scaling[n]
                bias = b if bias is None else bias.float() + b
        if len(names) == 1 or not dropping:
            # one fused call: several adapters stack along the rank, scalings folded into B
            if len(names) == 1:
                n = names[0]
                A, B, scale = self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n]
                p = self.lora_dropout[n]
            else:
                A = torch.cat([self.lora_A[n].weight.float() for n in names], 0)
                B = torch.cat([self.lora_B[n].weight.float() * self.scaling[n] for n in names], 1)
                scale, p = 1.0, 0.0
            y = lora_linear(xc, base, A, B, scale, bias, dropout_p=p, training=self.training)
        else:
            # several adapters with independent dropout masks (PEFT semantics): first one fused with the
            # base GEMM, the others as plain rank-r products (training-only path)
            n0 = names[0]
            y = lora_linear(xc, base, self.lora_A[n0].weight, self.lora_B[n0].weight, self.scaling[n0], bias,
                            dropout_p=self.lora_dropout[n0], training=True)
            for n in names[1:]:
                xd = nn.functional.dropout(xc.to(self.lora_A[n].weight.dtype), self.lora_dropout[n], training=True)
                y = y + (self.lora_B[n](self.lora_A[n](xd)) * self.scaling[n]).to(y.dtype)
        return y if out_dtype is None or y.dtype == out_dtype else y.to(out_dtype)

    def _dora_forward(self, xc: torch.Tensor, base, bias: torch.Tensor | None, names: list[str]) -> torch.Tensor:
        """One DoRA adapter: the fused DoRA op; several adapters with a DoRA one: PEFT's order, step by step."""
        if len(names) == 1:
            n = names[0]
            return dora_linear(xc, base, self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n],
                               self.lora_magnitude_vector[n].weight, bias=bias, dropout_p=self.lora_dropout[n],
                               training=self.training)
        adapters = [(self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n], self.lora_dropout[n],
                     self.lora_magnitude_vector[n].weight if self.use_dora[n] else None, self.lora_B[n].bias)
                    for n in names]
        start = base(xc) if isinstance(base, nn.Module) else nn.functional.linear(xc, base, bias)
        return adapters_in_peft_order(start, xc, base, bias, adapters, self.training)

    def _base_operand(self, x: torch.Tensor):
        """(base for lora_linear, bias, compute dtype, output dtype or None to keep the compute dtype).

        Mirrors the base layer: nn.Linear computes in its weight's dtype, QLinearNF4 in its compute_dtype
        (None: x's) and casts back to x's dtype; under autocast both compute in and return the autocast dtype.
        """
        layer = self.base_layer
        autocast = torch.is_autocast_enabled(x.device.type)
        if self.is_nf4:
            if autocast:
                return layer, layer.bias, torch.get_autocast_dtype(x.device.type), None
            return layer, layer.bias, layer.compute_dtype or x.dtype, x.dtype
        w = layer.weight
        if autocast:
            dtype = torch.get_autocast_dtype(x.device.type)
            return w.to(dtype), layer.bias, dtype, None
        return w, layer.bias, w.dtype, None

    # ------------------------------------------------------------------ merging
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """scaling * B @ A in fp32 (out_features, in_features)."""
        A = self.lora_A[adapter_name].weight.detach().float()
        B = self.lora_B[adapter_name].weight.detach().float()
        return (B @ A) * self.scaling[adapter_name]

    def _merged_target(self, n: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the fp32 weight after merging adapter n into the fp32 weight w, DoRA's norm or None). DoRA (PEFT's
        rule): m / ||W0 + delta||_row * (w + delta), W0 = w without the adapters merged before it."""
        delta = self.get_delta_weight(n)
        if not self.use_dora[n]:
            return w + delta, None
        w0 = w
        for prev in reversed(self.merged_adapters):
            if self.use_dora[prev]:
                w0 = w0 / self._dora_factor(prev, self._dora_merge_norm[prev])
            w0 = w0 - self.get_delta_weight(prev)
        norm = torch.linalg.vector_norm(w0 + delta, dim=1)
        return self._dora_factor(n, norm) * (w + delta), norm

    def _dora_factor(self, n: str, norm: torch.Tensor) -> torch.Tensor:
        return (self.lora_magnitude_vector[n].weight.detach().float() / norm)[:, None]

    def _bias_delta(self, n: str) -> torch.Tensor | None:
        """scaling * lora_B.bias (fp32) for a lora_bias adapter, else None."""
        if not self.lora_bias[n]:
            return None
        return self.lora_B[n].bias.detach().float() * self.scaling[n]

    def _dense_weight_fp32(self) -> torch.Tensor:
        if self.is_nf4:
            return _dequantize_nf4(self.base_layer)
        return self.base_layer.weight.detach().float()

    def _store_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Write fp32 w into the base (re-quantizing an NF4 base); returns what is stored, as fp32."""
        if self.is_nf4:
            _requantize_nf4(self.base_layer, w)
            return _dequantize_nf4(self.base_layer)
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.copy_(w.to(weight.dtype))
        return weight.detach().float()

    def fused_projection(self) -> LoraProjection:
        """The projection this layer computes, as the fused blocks take it (qpeft.lora_mlp / lora_qkv): its base
        with the active, unmerged adapters (one adapter; several are stacked along the rank, which needs them
        without dropout). A disabled layer gives its base alone; a mixed-adapter batch is refused."""
        if self.__dict__.get("_qpeft_batch_adapter_names") is not None:
            raise ValueError("LoraProjection.from_module: a mixed-adapter batch (adapter_names) is not "
                             "supported by the fused blocks")
        names = [n for n in self.active_adapters if n not in self.merged_adapters]
        if self._disabled or not names:
            return LoraProjection(self.base_layer)
        _refuse_variants(names, self.use_dora, self.lora_bias, "LoraProjection.from_module")
        if len(names) == 1:
            n = names[0]
            return LoraProjection(self.base_layer, self.lora_A[n].weight, self.lora_B[n].weight, self.scaling[n],
                                  dropout_p=self.lora_dropout[n])
        if any(self.lora_dropout[n] > 0.0 for n in names):
            raise ValueError(f"LoraProjection.from_module: several active adapters {names} with dropout are "
                             f"not supported by the fused blocks (independent masks per adapter)")
        A = torch.cat([self.lora_A[n].weight.float() for n in names], 0)
        B = torch.cat([self.lora_B[n].weight.float() * self.scaling[n] for n in names], 1)
        return LoraProjection(self.base_layer, A, B, 1.0)

    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> dict[str, float]:
        """Add the adapters' deltas into the base weight (default: the active, not yet merged adapters).

        Returns {adapter: max |W_stored - (W + delta)|}: the rounding of the base dtype, or for an NF4 base
        the re-quantization error (dequantize, add, re-quantize; NF4 cannot represent W + delta exactly).
        safe_merge: check the merged weight is finite before writing it.
        The pre-merge weight is kept while merged (memory: the base weight once more; an NF4 base's previous
        packed bytes and scales), so that unmerge() and disable_adapters() restore it bit for bit.
        """
        return self._merge(adapter_names, safe_merge, keep_original=True)

    def _merge(self, adapter_names, safe_merge: bool, keep_original: bool) -> dict[str, float]:
        if self._held is not None:
            raise ValueError("merge() inside disable_adapters(): the adapters are disabled there; merge after the "
                             "context")
        names = self._active if adapter_names is None else list(adapter_names)
        names = [n for n in names if n not in self.merged_adapters]
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this layer has {list(self.lora_A)}")
        base_bias = getattr(self.base_layer, "bias", None)
        no_bias = [n for n in names if self.lora_bias[n] and base_bias is None]
        if no_bias:  # PEFT: "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias."
            raise ValueError(f"cannot merge adapter(s) {no_bias}: lora_bias=True needs a base layer with a bias, "
                             f"this {type(self.base_layer).__name__} has none; the base was left unchanged")
        premerge = self._valid_premerge()
        if premerge is None and keep_original and names and not self.merged_adapters:
            # an NF4 merge replaces the quantized tensors (keeping the old ones copies nothing); a dense merge
            # writes the weight in place (its original is cloned)
            premerge = {"original": merge_state.snapshot(self.base_layer, self.is_nf4, clone=not self.is_nf4)}
        if premerge is not None and keep_original and "bias" not in premerge and base_bias is not None \
                and any(self.lora_bias[n] for n in names):
            premerge["bias"] = base_bias.detach().clone()
        errors = {}
        try:
            for n in names:
                target, norm = self._merged_target(n, self._dense_weight_fp32())
                bias_delta = self._bias_delta(n)
                new_bias = None if bias_delta is None else base_bias.detach().float() + bias_delta
                if safe_merge and not (torch.isfinite(target).all() and
                                       (new_bias is None or torch.isfinite(new_bias).all())):
                    raise ValueError(f"merging adapter {n!r} gives non-finite weights; the base was left unchanged")
                stored = self._store_weight(target)
                if new_bias is not None:
                    with torch.no_grad():
                        base_bias.copy_(new_bias.to(base_bias.dtype))
                if norm is not None:
                    self._dora_merge_norm[n] = norm
                errors[n] = (stored - target).abs().max().item()
                self.merged_adapters.append(n)
        finally:
            if premerge is not None and self.merged_adapters and keep_original:
                premerge["stamp"] = merge_state.stamp(self.base_layer, self.is_nf4)
                self._premerge = premerge
        if self.is_nf4 and errors:
            warnings.warn(f"LoraLinear.merge into an NF4 base re-quantizes the weight: max abs error {errors}; "
                          "outputs will differ slightly (use merge_and_unload for a dense merged layer)",
                          UserWarning, stacklevel=3)
        self.last_merge_error = errors
        return errors

    def unmerge(self) -> dict[str, float]:
        """Restore the base weight from before merge(): bit for bit, from the kept pre-merge weight (errors
        {adapter: 0.0}). Where that is not valid (the base was written since the merge, e.g. by load_state_dict)
        the merged adapters' deltas are subtracted as PEFT does, which is not exact (a dense base rounds, an NF4
        base is re-quantized once more); returns those errors as `merge` does."""
        if self._held is not None:  # inside disable_adapters(): the original weight is in place already
            errors = {n: 0.0 for n in reversed(self.merged_adapters)}
            self.merged_adapters.clear()
            self._held = self._premerge = None
            return errors
        premerge = self._valid_premerge()
        self._premerge = None
        if premerge is not None and self.merged_adapters:
            merge_state.put(self.base_layer, premerge["original"], self.is_nf4)
            if "bias" in premerge:
                with torch.no_grad():
                    self.base_layer.bias.copy_(premerge["bias"])
            errors = {n: 0.0 for n in reversed(self.merged_adapters)}
            self.merged_adapters.clear()
            self._dora_merge_norm.clear()
            return errors
        errors = {}
        while self.merged_adapters:
            n = self.merged_adapters.pop()
            w = self._dense_weight_fp32()
            if self.use_dora[n]:
                w = w / self._dora_factor(n, self._dora_merge_norm.pop(n))
            target = w - self.get_delta_weight(n)
            errors[n] = (self._store_weight(target) - target).abs().max().item()
            bias_delta = self._bias_delta(n)
            if bias_delta is not None:
                bias = self.base_layer.bias
                with torch.no_grad():
                    bias.copy_((bias.detach().float() - bias_delta).to(bias.dtype))
        return errors

    def merge_and_unload(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A plain layer with the active adapters merged in.

        Dense base: the base nn.Linear, merged in place (cast to `dtype` when given).
        NF4 base: a new dense nn.Linear holding dequant(W) + deltas computed in fp32, in `dtype`
        (default torch.bfloat16, QLoRA's compute dtype); the NF4 layer is not modified.
        """
        if not self.is_nf4:
            self._merge(None, safe_merge=False, keep_original=False)  # the LoraLinear is dropped: keep nothing
            self._premerge = None
            layer = self.base_layer
            return layer.to(dtype) if dtype is not None else layer
        dtype = torch.bfloat16 if dtype is None else dtype
        w = self._dense_weight_fp32()
        bias = getattr(self.base_layer, "bias", None)
        todo = [n for n in self._active if n not in self.merged_adapters]  # the merged ones: in the weight already
        no_bias = [n for n in todo if self.lora_bias[n] and bias is None]
        if no_bias:
            raise ValueError(f"cannot merge adapter(s) {no_bias}: lora_bias=True needs a base layer with a bias, "
                             f"this {type(self.base_layer).__name__} has none")
        bias = None if bias is None else bias.detach().float()
        merged_before = list(self.merged_adapters)
        try:
            for n in todo:  # DoRA's norm needs the adapters merged before it: tracked as merge() does
                w, norm = self._merged_target(n, w)
                if norm is not None:
                    self._dora_merge_norm[n] = norm
                self.merged_adapters.append(n)
                if self._bias_delta(n) is not None:
                    bias = bias + self._bias_delta(n)
        finally:
            for n in self.merged_adapters[len(merged_before):]:
                self._dora_merge_norm.pop(n, None)
            self.merged_adapters[:] = merged_before
        layer = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(w.to(dtype))
            if bias is not None:
                layer.bias.copy_(bias.to(dtype))
        layer.requires_grad_(False)
        return layer

    def extra_repr(self) -> str:
        ad = ", ".join(f"{n}(r={self.r[n]}, alpha={self.lora_alpha[n]}, dropout={self.lora_dropout[n]}"
                       f"{', rslora' if self.use_rslora[n] else ''}{', dora' if self.use_dora[n] else ''}"
                       f"{', lora_bias' if self.lora_bias[n] else ''})" for n in self.lora_A)
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{ad}], "
                f"active={self._active}, merged={self.merged_adapters}")


def _dequantize_nf4(layer: nn.Module) -> torch.Tensor:
    """fp32 (N, K) weight of a QLinearNF4."""
    return layer.dequantize(torch.float32)


def _requantize_nf4(layer: nn.Module, w: torch.Tensor) -> None:
    """Quantize fp32 w into the QLinearNF4's buffers with its own format (quant type, blocksize, double quant)."""
    parts = type(layer)._quantize(w.detach(), layer.quant_type, layer.blocksize, layer.double_quant)
    layer._set_quantized(**parts)
