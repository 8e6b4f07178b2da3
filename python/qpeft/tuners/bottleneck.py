"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021), inserted without editing model source.

    y = x + scaling * up(act(down(x)))      down: Linear(H, R), up: Linear(R, H), R = H // reduction_factor

Placement, as AdapterHub's `adapters` does it:
- "houlsby" (DoubleSeqBn): after the attention output projection and after the feed-forward output,
  before the residual add (and LayerNorm); swish by default.
- "pfeiffer" (SeqBn): after the feed-forward output only; relu by default.
Llama-style decoder layers: on the outputs of `self_attn.o_proj` and `mlp.down_proj`.
BERT-style layers: on the outputs of `BertSelfOutput.dropout` / `BertOutput.dropout` (dense -> dropout ->
adapter -> LayerNorm(. + input)), AdapterHub's position. A forward hook applies the adapter; the adapter
module is registered on the parent as `bottleneck_adapter`, so base parameter names are unchanged.

The block runs through the fused `qpeft::bottleneck_adapter` op (Triton on GPU, reference on CPU).
Adapters are non-linear in x, so they cannot be merged into the base weights (`merge_bottleneck_adapters`
raises saying so).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn

from .._io import atomic_paths
from ..autograd.bottleneck import bottleneck_adapter
from ..reference.bottleneck import activation_id, activation_ref

__all__ = ["BottleneckAdapter", "add_bottleneck_adapters", "remove_bottleneck_adapters", "bottleneck_adapter",
           "merge_bottleneck_adapters", "bottleneck_state_dict", "save_bottleneck_adapters",
           "load_bottleneck_adapters", "find_adapter_sites", "AdapterMergeError", "freeze_except",
           "is_linear_like"]

ADAPTER_ATTR = "bottleneck_adapter"
CONFIGS = {"houlsby": {"sites": ("attn", "ffn"), "non_linearity": "swish"},
           "pfeiffer": {"sites": ("ffn",), "non_linearity": "relu"}}
INITS = ("bert", "houlsby", "mam_adapter")
CONFIG_FILE = "bottleneck_config.json"
WEIGHTS_FILE = "bottleneck_adapters.safetensors"


class AdapterMergeError(TypeError):
    """Raised when asked to merge a method whose update is not a weight delta (adapters, UniPELT)."""


class BottleneckAdapter(nn.Module):
    """down (H -> R), activation, up (R -> H), residual; optional UniPELT gate sigmoid(Linear(H -> 1)).

    hidden_size H, bottleneck_size R >= 1. init: "bert" (both N(0, 0.02), AdapterHub's default),
    "houlsby" (truncated normal std 1e-2 at +-2e-2) or "mam_adapter" (kaiming-uniform down, zero up: exact
    identity). Biases start at zero. fused=False runs plain nn.Linear modules (the benchmark baseline).
    """

    def __init__(self, hidden_size: int, bottleneck_size: int, non_linearity: str = "swish", init: str = "bert",
                 scaling: float = 1.0, use_gate: bool = False, fused: bool = True, device=None, dtype=None):
        super().__init__()
        if bottleneck_size < 1:
            raise ValueError(f"bottleneck_size must be >= 1, got {bottleneck_size}")
        activation_id(non_linearity)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.hidden_size, self.bottleneck_size = hidden_size, bottleneck_size
        self.non_linearity, self.init, self.scaling, self.fused = non_linearity, init, float(scaling), fused
        self.active = True
        self.down = nn.Linear(hidden_size, bottleneck_size, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck_size, hidden_size, device=device, dtype=dtype)
        self.gate = nn.Linear(hidden_size, 1, device=device, dtype=dtype) if use_gate else None
        self._hook_handle = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.init == "bert":
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.normal_(self.up.weight, std=0.02)
        elif self.init == "houlsby":
            for w in (self.down.weight, self.up.weight):
                nn.init.trunc_normal_(w, std=1e-2, a=-2e-2, b=2e-2)
        else:  # mam_adapter
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.bias)
        if self.gate is not None:  # AdapterHub's gates: N(0, 0.02) weight, zero bias -> gate ~ 0.5 at start
            nn.init.normal_(self.gate.weight, std=0.02)
            nn.init.zeros_(self.gate.bias)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """up(act(down(x))) with plain modules (unfused)."""
        return self.up(activation_ref(self.down(x), self.non_linearity))

    def gate_value(self, x: torch.Tensor) -> torch.Tensor:
        """sigmoid(Linear(x)) averaged over the sequence: (B, 1, 1) for x (B, S, H), (1, 1) for (S, H)."""
        return torch.sigmoid(self.gate(x)).mean(dim=-2, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        in_dtype = x.dtype
        x = x.to(self.down.weight.dtype)
        if self.gate is not None:
            y = x + self.scaling * self.gate_value(x) * self.delta(x)
        elif self.fused:
            y = bottleneck_adapter(x, self.down.weight, self.down.bias, self.up.weight, self.up.bias,
                                   self.non_linearity, self.scaling)
        else:
            y = x + self.scaling * self.delta(x)
        return y.to(in_dtype)

    def _hook(self, module, args, output):
        return self(output)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, "
                f"non_linearity={self.non_linearity!r}, scaling={self.scaling}, fused={self.fused}, "
                f"gate={self.gate is not None}")


def is_linear_like(m) -> bool:
    """nn.Linear, or a 4-bit QLinearNF4-style layer (packed weight + quant_state, in/out_features)."""
    return isinstance(m, nn.Linear) or (hasattr(m, "quant_state") and hasattr(m, "out_features"))


def _float_dtype_device(m: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The float dtype/device an adapter next to `m` should use: a 4-bit layer's original weight dtype."""
    t = next((t for t in [*m.parameters(), *m.buffers()]), None)
    device = t.device if t is not None else torch.device("cpu")
    if hasattr(m, "quant_state"):
        return getattr(m, "weight_dtype", torch.float32), device
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w.dtype, device
    t = next((t for t in m.parameters() if t.is_floating_point()), None)
    return (t.dtype if t is not None else torch.float32), device


def find_adapter_sites(model: nn.Module) -> list[tuple[str, str, nn.Module, nn.Module, int]]:
    """[(parent_name, kind "attn"|"ffn", parent, hooked_module, hidden_size)] for Llama- and BERT-style layers."""
    sites = []
    for name, mod in model.named_modules():
        attn, mlp = getattr(mod, "self_attn", None), getattr(mod, "mlp", None)
        o_proj, down_proj = getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None)
        if is_linear_like(o_proj) and is_linear_like(down_proj):
            prefix = f"{name}." if name else ""
            sites.append((prefix + "self_attn", "attn", attn, attn.o_proj, attn.o_proj.out_features))
            sites.append((prefix + "mlp", "ffn", mlp, mlp.down_proj, mlp.down_proj.out_features))
            continue
        cls = type(mod).__name__
        dense = getattr(mod, "dense", None)
        if (cls.endswith("Output") and is_linear_like(dense) and hasattr(mod, "LayerNorm")
                and isinstance(getattr(mod, "dropout", None), nn.Dropout)):
            kind = "attn" if cls.endswith("SelfOutput") else "ffn"
            sites.append((name, kind, mod, mod.dropout, dense.out_features))
    return sites


def add_bottleneck_adapters(model: nn.Module, config: str = "houlsby", reduction_factor: float = 16,
                            bottleneck_size: int | None = None, non_linearity: str | None = None,
                            init: str = "bert", scaling: float = 1.0, fused: bool = True,
                            freeze_base: bool = True, modules_to_save: list[str] | None = None) -> nn.Module:
    """Insert bottleneck adapters into every Llama- or BERT-style layer of `model` (in place); returns it.

    config: "houlsby" (attention + feed-forward) or "pfeiffer" (feed-forward only).
    bottleneck_size R, else R = hidden_size // reduction_factor (must be >= 1).
    non_linearity: None = the config's default ("swish" Houlsby, "relu" Pfeiffer); see reference.ACTIVATIONS.
    freeze_base: set requires_grad=False on every pre-existing parameter, so only adapters train, except
    modules_to_save: module names (exact or dotted suffix, e.g. ["classifier"]) that stay fully trainable,
    as PEFT's option of that name (a new task head must train).
    """
    if config not in CONFIGS:
        raise ValueError(f"config must be one of {sorted(CONFIGS)}, got {config!r}")
    non_linearity = non_linearity or CONFIGS[config]["non_linearity"]
    activation_id(non_linearity)
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if bottleneck_size is None and not (isinstance(reduction_factor, (int, float)) and reduction_factor > 0):
        raise ValueError(f"reduction_factor must be a positive number, got {reduction_factor!r}")
    sites = [s for s in find_adapter_sites(model) if s[1] in CONFIGS[config]["sites"]]
    if not sites:
        raise TypeError(f"add_bottleneck_adapters: {type(model).__name__} has no layer type it can wrap: expected "
                        "Llama-style decoder layers (self_attn.o_proj + mlp.down_proj Linear) or BERT-style "
                        "*SelfOutput/*Output blocks (dense Linear + dropout + LayerNorm)")
    if any(hasattr(parent, ADAPTER_ATTR) for _, _, parent, _, _ in sites):
        raise ValueError("add_bottleneck_adapters: model already has bottleneck adapters; "
                         "call remove_bottleneck_adapters first")
    sizes = {}
    for name, _, _, _, hidden in sites:
        r = bottleneck_size if bottleneck_size is not None else int(hidden // reduction_factor)
        if r < 1:
            arg = (f"bottleneck_size={bottleneck_size}" if bottleneck_size is not None
                   else f"reduction_factor={reduction_factor}")
            raise ValueError(f"add_bottleneck_adapters: {arg} leaves no hidden units for {name} "
                             f"(hidden size {hidden}); need a bottleneck of at least 1")
        sizes[name] = r
    if freeze_base:
        freeze_except(model, modules_to_save)
    for name, _, parent, hooked, hidden in sites:
        dtype, device = _float_dtype_device(hooked if is_linear_like(hooked) else parent)
        adapter = BottleneckAdapter(hidden, sizes[name], non_linearity, init, scaling, fused=fused,
                                    device=device, dtype=dtype)
        parent.add_module(ADAPTER_ATTR, adapter)
        adapter._hook_handle = hooked.register_forward_hook(adapter._hook)
    model._qpeft_bottleneck_config = {"config": config, "reduction_factor": reduction_factor,
                                      "bottleneck_size": bottleneck_size, "non_linearity": non_linearity,
                                      "init": init, "scaling": scaling}
    return model


def freeze_except(model: nn.Module, modules_to_save: list[str] | None) -> None:
    """requires_grad=False everywhere except in modules named in modules_to_save (exact or dotted suffix)."""
    keep = list(modules_to_save or [])
    found = set()
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod in model.named_modules():
        for k in keep:
            if name == k or name.endswith("." + k):
                found.add(k)
                for p in mod.parameters():
                    p.requires_grad_(True)
    if set(keep) - found:
        raise ValueError(f"modules_to_save: no module named {sorted(set(keep) - found)} in {type(model).__name__}")


def _adapters(model: nn.Module) -> list[tuple[str, BottleneckAdapter]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)]


def remove_bottleneck_adapters(model: nn.Module) -> nn.Module:
    """Detach every bottleneck adapter (hooks and modules); the model computes its original function again."""
    for name, adapter in _adapters(model):
        if adapter._hook_handle is not None:
            adapter._hook_handle.remove()
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        delattr(parent, name.rsplit(".", 1)[-1])
    if hasattr(model, "_qpeft_bottleneck_config"):
        del model._qpeft_bottleneck_config
    return model


def merge_bottleneck_adapters(model: nn.Module):
    """Always raises: y = x + up(act(down(x))) is non-linear in x, so no weight change reproduces it."""
    raise AdapterMergeError("bottleneck adapters cannot be merged into the base weights: the block "
                            "x + up(act(down(x))) is non-linear in x (an activation sits between the projections); "
                            "keep the adapters as modules, or use LoRA/AdaLoRA/BitFit if a merged model is needed")


def bottleneck_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter parameters by their full names in `model` (model.layers.0.mlp.bottleneck_adapter.up.weight, ...)."""
    return {f"{n}.{k}": v for n, a in _adapters(model) for k, v in a.state_dict().items()}


def save_bottleneck_adapters(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write bottleneck_config.json + bottleneck_adapters.safetensors (PEFT has no bottleneck format)."""
    from safetensors.torch import save_file

    cfg = getattr(model, "_qpeft_bottleneck_config", None)
    if cfg is None:
        raise ValueError("save_bottleneck_adapters: model has no bottleneck adapters")
    text = json.dumps({"method": "bottleneck", **cfg}, indent=2, sort_keys=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in bottleneck_state_dict(model).items()}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_paths(out / WEIGHTS_FILE, out / CONFIG_FILE) as (weights_tmp, config_tmp):  # both or neither
        save_file(tensors, weights_tmp, metadata={"format": "pt"})
        Path(config_tmp).write_text(text)
    return out


def load_bottleneck_adapters(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Inject adapters as saved (if absent) and load their weights. Everything (config, names, shapes, finite
    values) is checked before any weight is written; on any error the model is left as it was."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / CONFIG_FILE).read_text())
    if cfg.pop("method", None) != "bottleneck":
        raise ValueError(f"load_bottleneck_adapters: {path / CONFIG_FILE} is not a bottleneck adapter config")
    tensors = load_file(str(path / WEIGHTS_FILE))
    for k, v in tensors.items():
        if not torch.isfinite(v).all():
            raise ValueError(f"load_bottleneck_adapters: tensor {k} has non-finite values")
    had = bool(_adapters(model))
    # Inject (hooks + fresh modules only; no base tensor is touched), check, and undo on failure.
    if not had:
        add_bottleneck_adapters(model, **{k: cfg[k] for k in ("config", "reduction_factor", "bottleneck_size",
                                                              "non_linearity", "init", "scaling")},
                                freeze_base=False)
    try:
        current = bottleneck_state_dict(model)
        missing, unexpected = sorted(set(current) - set(tensors)), sorted(set(tensors) - set(current))
        if missing or unexpected:
            raise ValueError(f"load_bottleneck_adapters: key mismatch; missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
        for k, v in tensors.items():
            if v.shape != current[k].shape:
                raise ValueError(f"load_bottleneck_adapters: {k} has shape {tuple(v.shape)}, model expects "
                                 f"{tuple(current[k].shape)}")
    except Exception:
        if not had:
            remove_bottleneck_adapters(model)
        raise
    with torch.no_grad():
        for k, v in current.items():
            v.copy_(tensors[k])
    return model
