"""AdaLoRA (Zhang et al., ICLR 2023): SVD-form LoRA whose rank budget is pruned during training, PEFT's math.

Per targeted layer: dW = P Lambda Q = lora_B (out, r) @ (lora_E (r, 1) * lora_A (r, in)),
    y = base(x) + dropout(x) @ (A*E)^T @ B^T * lora_alpha / (ranknum + 1e-5)
with ranknum fixed at init_r (PEFT never changes it, so pruning does not rescale the update). The forward is
the fused LoRA path (`qpeft.lora_linear` with A*E as A), so it runs on nn.Linear and QLinearNF4 bases alike.

Training loop (as in PEFT):
    loss = task_loss + orthogonal_regularization(model)     # orth_reg_weight * mean ||P^T P - I||_F
    loss.backward(); optimizer.step()
    update_and_allocate(model, step)                         # after backward, before zero_grad
    optimizer.zero_grad()
`update_and_allocate` smooths the importance |w * grad| (EMA beta1) and its uncertainty (EMA beta2), scores
each triplet (E_i, row A_i, column B_i) by score(E) + mean score of A's row + mean score of B's column, and
zeroes the E entries of the lowest-scoring triplets down to the cubic budget
    b(t) = init_bgt (t <= tinit); target_bgt + (init_bgt - target_bgt) (1 - (t - tinit)/(T - tfinal - tinit))^3;
           target_bgt for t > T - tfinal,
masking every deltaT steps. The final rank pattern is saved in adapter_config.json and the saved tensors are
pruned to it, exactly as PEFT 0.21 writes them (`qpeft.save_adapter` / `load_adapter`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..autograd.lora import lora_linear
from .adapter_io import AdapterMethod, register_method
from .bottleneck import freeze_except
from .lora.mixed_batch import enable_adapter_names

__all__ = ["AdaLoraLinear", "add_adalora", "update_and_allocate", "orthogonal_regularization", "budget_schedule",
           "adalora_layers", "adalora_rank_pattern", "merge_adalora"]

PREFIX = "base_model.model."


def _is_nf4(layer: nn.Module) -> bool:
    return hasattr(layer, "quant_state") and not isinstance(layer, nn.Linear)


def _base_shape(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    if _is_nf4(layer):
        return int(layer.quant_state.shape[0]), int(layer.quant_state.shape[1])
    raise TypeError(f"AdaLoRA wraps nn.Linear or QLinearNF4 layers, got {type(layer).__name__}")


class AdaLoraLinear(nn.Module):
    """A frozen Linear/QLinearNF4 `base_layer` plus an SVD-form update of rank r (PEFT's SVDLinear).

    lora_A (r, in), lora_E (r, 1), lora_B (out, r) are fp32 parameters (PEFT keeps adapters in fp32);
    init: E = 0, A, B ~ N(0, 0.02) so the layer equals its base at start. ranknum: the rank used in the
    scaling lora_alpha / (ranknum + 1e-5); it stays at init_r when the layer is pruned or resized.
    """

    # mixed-adapter batches (model(..., adapter_names=...)) are refused, as PEFT 0.21.2 does: its AdaLoRA layers
    # pass the argument on to the base layer, which raises TypeError (qpeft.tuners.lora.mixed_batch reads this)
    adapter_names_refusal = "adapter_names is not supported for AdaLoRA layers (PEFT 0.21.2 refuses it too: its " \
                            "AdaLoRA layers pass the argument on to the base layer, which raises TypeError)"

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 ranknum: float | None = None, adapter_name: str = "default"):
        super().__init__()
        out_f, in_f = _base_shape(base_layer)
        if r < 0:
            raise ValueError(f"r must be >= 0, got {r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        self.base_layer = base_layer
        self.in_features, self.out_features = in_f, out_f
        self.adapter_name = adapter_name
        self.lora_alpha, self.lora_dropout = float(lora_alpha), float(lora_dropout)
        self.ranknum = float(r if ranknum is None else ranknum)
        dev = next((t.device for t in base_layer.parameters()), None)
        self.lora_A = nn.Parameter(torch.empty(r, in_f, device=dev))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=dev))
        self.lora_B = nn.Parameter(torch.empty(out_f, r, device=dev))
        with torch.no_grad():
            nn.init.normal_(self.lora_A, std=0.02)
            nn.init.normal_(self.lora_B, std=0.02)
        self.disabled = False

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    @property
    def scale(self) -> float:
        # PEFT: scaling = lora_alpha (if > 0 else r), divided by (ranknum + 1e-5) in the forward
        alpha = self.lora_alpha if self.lora_alpha > 0 else self.ranknum
        return alpha / (self.ranknum + 1e-5)

    def delta_weight(self) -> torch.Tensor:
        """fp32 (out, in) update B @ (A * E) * scale."""
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scale

    @torch.no_grad()
    def resize(self, keep: torch.Tensor) -> None:
        """Keep only the triplets where `keep` (bool [r]) is True (PEFT's resize by rank pattern)."""
        idx = keep.to(torch.bool).nonzero().flatten().to(self.lora_A.device)
        self.lora_A = nn.Parameter(self.lora_A[idx].clone(), requires_grad=self.lora_A.requires_grad)
        self.lora_E = nn.Parameter(self.lora_E[idx].clone(), requires_grad=self.lora_E.requires_grad)
        self.lora_B = nn.Parameter(self.lora_B[:, idx].clone(), requires_grad=self.lora_B.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.r == 0:
            return self.base_layer(x)

        return lora_linear(x, self.base_layer, self.lora_A * self.lora_E, self.lora_B, self.scale,
                           dropout_p=self.lora_dropout, training=self.training)

    def extra_repr(self) -> str:
        return f"r={self.r}, ranknum={self.ranknum:g}, lora_alpha={self.lora_alpha:g}, lora_dropout={self.lora_dropout}"


@dataclass
class AdaLoraState:
    adapter_name: str
    config: dict
    init_bgt: int
    target_bgt: int
    ipt: dict = field(default_factory=dict)
    exp_avg_ipt: dict = field(default_factory=dict)
    exp_avg_unc: dict = field(default_factory=dict)


def adalora_layers(model: nn.Module) -> dict[str, AdaLoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaLoraLinear)}


def _state(model: nn.Module) -> AdaLoraState:
    st = getattr(model, "_qpeft_adalora", None)
    if st is None:
        raise ValueError(f"{type(model).__name__} has no AdaLoRA adapter; call add_adalora first")
    return st


def _match_targets(model: nn.Module, target_modules) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(target_modules, str):
        pat = re.compile(target_modules)
        hits = [n for n in names if pat.fullmatch(n)]
    else:
        targets = list(target_modules or [])
        if not targets:
            raise ValueError("target_modules must name at least one module (a list of names or a regex)")
        hits = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
    hits = [n for n in hits if not any(n.startswith(h + ".") for h in hits)]  # outermost match only
    if not hits:
        raise ValueError(f"target_modules={target_modules!r} matched no module of {type(model).__name__}")
    for n in hits:
        m = model.get_submodule(n)
        if not (isinstance(m, nn.Linear) or _is_nf4(m)):
            raise TypeError(f"target_modules={target_modules!r} matched {n} of type {type(m).__name__}; AdaLoRA "
                            "can only wrap nn.Linear or QLinearNF4 layers")
    return hits


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _validate_schedule(init_r, target_r, tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight, total_step):
    if total_step is None or int(total_step) <= 0:
        raise ValueError(f"total_step must be a positive int (AdaLoRA's budget schedule needs it), got {total_step!r}")
    if not (isinstance(init_r, int) and init_r >= 1):
        raise ValueError(f"init_r must be an int >= 1, got {init_r!r}")
    if not (isinstance(target_r, int) and 0 <= target_r <= init_r):
        raise ValueError(f"target_r must be an int in [0, init_r={init_r}], got {target_r!r}")
    if tinit < 0 or tfinal < 0 or tinit >= total_step - tfinal:
        raise ValueError(f"tinit={tinit}, tfinal={tfinal}, total_step={total_step} leave no budgeting phase "
                         "(need 0 <= tinit < total_step - tfinal)")
    if not (isinstance(deltaT, int) and deltaT >= 1):
        raise ValueError(f"deltaT must be an int >= 1, got {deltaT!r}")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 < b < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {b}")
    if orth_reg_weight < 0:
        raise ValueError(f"orth_reg_weight must be >= 0, got {orth_reg_weight}")


def add_adalora(model: nn.Module, target_modules, init_r: int = 12, target_r: int = 8, tinit: int = 0,
                tfinal: int = 0, deltaT: int = 1, beta1: float = 0.85, beta2: float = 0.85,
                orth_reg_weight: float = 0.5, total_step: int | None = None, lora_alpha: float = 8,
                lora_dropout: float = 0.0, adapter_name: str = "default",
                modules_to_save: list[str] | None = None) -> nn.Module:
    """Wrap `target_modules` (list of names/suffixes, or a full-match regex) with AdaLoraLinear; in place.

    Defaults are PEFT's AdaLoraConfig defaults (lora_alpha=8 is LoraConfig's). Every other parameter is
    frozen except `modules_to_save` (e.g. a new classifier head). Returns the model.
    """
    _validate_schedule(init_r, target_r, tinit, tfinal, deltaT, beta1, beta2, orth_reg_weight, total_step)
    if getattr(model, "_qpeft_adalora", None) is not None:
        raise ValueError("model already has an AdaLoRA adapter (PEFT trains one AdaLoRA adapter at a time)")
    names = _match_targets(model, target_modules)

    freeze_except(model, modules_to_save)
    for n in names:
        _set_module(model, n, AdaLoraLinear(model.get_submodule(n), init_r, lora_alpha, lora_dropout,
                                            adapter_name=adapter_name))
    cfg = {"target_modules": sorted(target_modules) if not isinstance(target_modules, str) else target_modules,
           "init_r": init_r, "target_r": target_r, "tinit": tinit, "tfinal": tfinal, "deltaT": deltaT,
           "beta1": beta1, "beta2": beta2, "orth_reg_weight": orth_reg_weight, "total_step": int(total_step),
           "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "rank_pattern": None,
           "modules_to_save": list(modules_to_save) if modules_to_save else None}
    model._qpeft_adalora = AdaLoraState(adapter_name, cfg, init_bgt=init_r * len(names),
                                        target_bgt=target_r * len(names))

    enable_adapter_names(model)  # so that adapter_names= is refused as PEFT does, never silently ignored
    return model


def budget_schedule(step: int, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int,
                    deltaT: int) -> tuple[int, bool]:
    """(budget, mask now?) at `step`: PEFT's RankAllocator.budget_schedule."""
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    mul = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * mul ** 3 + target_bgt), step % deltaT == 0


def _triplets(layer: AdaLoraLinear):
    return (("A", layer.lora_A), ("E", layer.lora_E), ("B", layer.lora_B))


@torch.no_grad()
def _update_ipt(model: nn.Module, st: AdaLoraState) -> None:
    b1, b2 = st.config["beta1"], st.config["beta2"]
    for name, layer in adalora_layers(model).items():
        for k, p in _triplets(layer):
            if p.grad is None:
                raise RuntimeError(f"update_and_allocate: {name}.lora_{k} has no gradient; call it after "
                                   "loss.backward() and before optimizer.zero_grad()")
            key = (name, k)
            ipt = (p * p.grad).abs()
            avg = st.exp_avg_ipt.get(key, torch.zeros_like(p))
            unc = st.exp_avg_unc.get(key, torch.zeros_like(p))
            avg = b1 * avg + (1 - b1) * ipt                          # sensitivity EMA
            unc = b2 * unc + (1 - b2) * (ipt - avg).abs()            # uncertainty EMA
            st.ipt[key], st.exp_avg_ipt[key], st.exp_avg_unc[key] = ipt, avg, unc


@torch.no_grad()
def _mask_to_budget(model: nn.Module, st: AdaLoraState, budget: int) -> dict[str, list[bool]]:
    layers = adalora_layers(model)
    scores = {}
    for name in layers:
        def s(k):
            key = (name, k)
            if key not in st.exp_avg_ipt:
                raise RuntimeError("update_and_allocate: no importance scores yet (scores start at the first "
                                   "call before total_step - tfinal)")
            return st.exp_avg_ipt[key] * st.exp_avg_unc[key]
        # triplet score: element score of E + row-mean over A + column-mean over B (PEFT's _combine_ipt)
        scores[name] = (s("E").view(-1) + s("A").mean(dim=1) + s("B").mean(dim=0)).view(-1)
    k = st.init_bgt - budget
    all_scores = torch.cat([v for v in scores.values()])
    if k >= 1:
        threshold = torch.kthvalue(all_scores.float(), k=k)[0]
    else:  # nothing to prune (PEFT would call kthvalue with k=0 and fail)
        threshold = torch.tensor(-math.inf, device=all_scores.device)
    pattern = {}
    for name, layer in layers.items():
        drop = scores[name].float() <= threshold.to(scores[name].device)
        layer.lora_E.masked_fill_(drop.view(-1, 1), 0.0)
        pattern[f"{name}.lora_E"] = (~drop).cpu().tolist()
    return pattern


@torch.no_grad()
def _mask_using_rank_pattern(model: nn.Module, pattern: dict) -> None:
    for name, layer in adalora_layers(model).items():
        keep = torch.tensor(pattern[f"{name}.lora_E"], dtype=torch.bool, device=layer.lora_E.device)
        layer.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)


def update_and_allocate(model: nn.Module, step: int) -> int:
    """PEFT's AdaLoraModel.update_and_allocate: call every step after backward(), before zero_grad().

    Returns the budget (total kept rank over all layers) in force after this step.
    """
    st = _state(model)
    c = st.config
    T, tfinal = c["total_step"], c["tfinal"]
    budget, mask_now = budget_schedule(step, st.init_bgt, st.target_bgt, c["tinit"], tfinal, T, c["deltaT"])
    if step < T - tfinal:
        _update_ipt(model, st)
        if mask_now:
            c["rank_pattern"] = _mask_to_budget(model, st, budget)
    elif step == T - tfinal:  # final allocation with the scores gathered so far
        c["rank_pattern"] = _mask_to_budget(model, st, budget)
        st.ipt.clear(), st.exp_avg_ipt.clear(), st.exp_avg_unc.clear()
    elif c["rank_pattern"] is not None:  # final fine-tuning: keep pruned triplets at zero
        _mask_using_rank_pattern(model, c["rank_pattern"])
    return budget


def adalora_rank_pattern(model: nn.Module) -> dict[str, list[bool]] | None:
    return _state(model).config["rank_pattern"]


def orthogonal_regularization(model: nn.Module, weighted: bool = True) -> torch.Tensor:
    """orth_reg_weight * mean over all lora_A / lora_B of ||A A^T - I||_F, ||B^T B - I||_F (PEFT's term;
    Frobenius norm, not squared). Add it to the task loss. weighted=False omits orth_reg_weight."""
    st = _state(model)
    terms = []
    for layer in adalora_layers(model).values():
        for cov in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            terms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
    reg = torch.stack(terms).mean()
    return reg * st.config["orth_reg_weight"] if weighted else reg


@torch.no_grad()
def merge_adalora(model: nn.Module) -> nn.Module:
    """Fold every AdaLoRA update into its dense base weight and remove the adapter; returns the model.
    QLinearNF4 bases are refused (merging into 4-bit weights needs re-quantization: use LoRA's merge path)."""
    layers = adalora_layers(model)
    for name, layer in layers.items():
        if not isinstance(layer.base_layer, nn.Linear):
            raise TypeError(f"merge_adalora: {name} has a {type(layer.base_layer).__name__} base; only dense "
                            "nn.Linear bases can be merged exactly")
    for name, layer in layers.items():
        w = layer.base_layer.weight
        w.copy_((w.float() + layer.delta_weight().to(w.device)).to(w.dtype))
        _set_module(model, name, layer.base_layer)
    model._qpeft_adalora = None
    return model


# ------------------------------------------------------------------------------ PEFT format (adapter_io)


def _adapter_names(model: nn.Module) -> list[str]:
    st = getattr(model, "_qpeft_adalora", None)
    return [st.adapter_name] if st is not None else []


def _peft_config(model: nn.Module, adapter_name: str) -> dict:
    c = _state(model).config
    pattern = c["rank_pattern"]
    return {"peft_type": "ADALORA", "task_type": None, "target_modules": c["target_modules"],
            "init_r": c["init_r"], "target_r": c["target_r"], "tinit": c["tinit"], "tfinal": c["tfinal"],
            "deltaT": c["deltaT"], "beta1": c["beta1"], "beta2": c["beta2"], "orth_reg_weight": c["orth_reg_weight"],
            "total_step": c["total_step"], "rank_pattern": None if pattern is None else dict(pattern),
            "r": 8, "lora_alpha": c["lora_alpha"], "lora_dropout": c["lora_dropout"], "fan_in_fan_out": False,
            "bias": "none", "modules_to_save": c["modules_to_save"], "init_lora_weights": True,
            "use_rslora": False, "use_dora": False, "base_model_name_or_path": getattr(
                getattr(model, "config", None), "_name_or_path", None) or None}


def _peft_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    c = _state(model).config
    pattern = c["rank_pattern"] or {}
    out = {}
    for name, layer in adalora_layers(model).items():
        A, E, B = layer.lora_A, layer.lora_E, layer.lora_B
        keep = pattern.get(f"{name}.lora_E")
        if keep is not None and len(keep) == layer.r:  # prune to the rank pattern (not yet resized)
            idx = torch.tensor(keep, dtype=torch.bool, device=A.device)
            A, E, B = A[idx], E[idx], B[:, idx]
        out[f"{PREFIX}{name}.lora_A"], out[f"{PREFIX}{name}.lora_E"], out[f"{PREFIX}{name}.lora_B"] = A, E, B
    for mod in c["modules_to_save"] or []:
        for n, p in model.named_parameters():
            owner = n.rsplit(".", 1)[0]
            if owner == mod or owner.endswith("." + mod):
                out[f"{PREFIX}{n}"] = p
    return out


def _peft_load(model: nn.Module, config: dict, tensors: dict, adapter_name: str) -> None:
    """Validate everything, then inject (or resize) AdaLoraLinear layers and copy the tensors."""
    init_r = int(config.get("init_r", 12))
    targets = config.get("target_modules")
    if isinstance(targets, dict):
        raise ValueError("load_adapter: ADALORA target_modules must be a list or a regex string")
    pattern = config.get("rank_pattern") or {}
    existing = adalora_layers(model)
    if existing:
        names = list(existing)
    else:
        names = _match_targets(model, targets)
    plan = {}
    expected = set()
    for n in names:
        base = existing[n].base_layer if n in existing else model.get_submodule(n)
        out_f, in_f = _base_shape(base)
        keep = pattern.get(f"{n}.lora_E")
        r = int(sum(bool(v) for v in keep)) if keep is not None else init_r
        shapes = {"lora_A": (r, in_f), "lora_E": (r, 1), "lora_B": (out_f, r)}
        for k, shp in shapes.items():
            key = f"{PREFIX}{n}.{k}"
            expected.add(key)
            if key not in tensors:
                raise ValueError(f"load_adapter: missing tensor {key}")
            if tuple(tensors[key].shape) != shp:
                raise ValueError(f"load_adapter: {key} has shape {tuple(tensors[key].shape)}, expected {shp} "
                                 f"(init_r={init_r}, rank pattern {'given' if keep is not None else 'absent'})")
            if not torch.isfinite(tensors[key]).all():
                raise ValueError(f"load_adapter: {key} has non-finite values")
        plan[n] = (base, r)
    others = {k: v for k, v in tensors.items() if k not in expected}
    params = dict(model.named_parameters())
    for k, v in others.items():  # modules_to_save entries: must exist with the same shape
        pname = k[len(PREFIX):] if k.startswith(PREFIX) else k
        if pname not in params or params[pname].shape != v.shape:
            raise ValueError(f"load_adapter: unexpected tensor {k} (no parameter {pname} of shape {tuple(v.shape)})")
    # all checks passed: mutate
    with torch.no_grad():
        for n, (base, r) in plan.items():
            layer = existing.get(n)
            if layer is None:
                layer = AdaLoraLinear(base, r, config.get("lora_alpha", 8), config.get("lora_dropout", 0.0),
                                      ranknum=init_r, adapter_name=adapter_name)
                _set_module(model, n, layer)
            dev = layer.lora_A.device
            layer.lora_A = nn.Parameter(tensors[f"{PREFIX}{n}.lora_A"].to(dev, torch.float32).clone(),
                                        requires_grad=False)
            layer.lora_E = nn.Parameter(tensors[f"{PREFIX}{n}.lora_E"].to(dev, torch.float32).clone(),
                                        requires_grad=False)
            layer.lora_B = nn.Parameter(tensors[f"{PREFIX}{n}.lora_B"].to(dev, torch.float32).clone(),
                                        requires_grad=False)
            layer.ranknum = float(init_r)
            layer.lora_alpha = float(config.get("lora_alpha", 8))
        for k, v in others.items():
            p = params[k[len(PREFIX):] if k.startswith(PREFIX) else k]
            p.copy_(v.to(p.device, p.dtype))
    cfg = {"target_modules": targets, "init_r": init_r, "target_r": int(config.get("target_r", 8)),
           "tinit": int(config.get("tinit", 0)), "tfinal": int(config.get("tfinal", 0)),
           "deltaT": int(config.get("deltaT", 1)), "beta1": config.get("beta1", 0.85),
           "beta2": config.get("beta2", 0.85), "orth_reg_weight": config.get("orth_reg_weight", 0.5),
           "total_step": config.get("total_step"), "lora_alpha": config.get("lora_alpha", 8),
           "lora_dropout": config.get("lora_dropout", 0.0), "rank_pattern": dict(pattern) if pattern else None,
           "modules_to_save": config.get("modules_to_save")}
    model._qpeft_adalora = AdaLoraState(adapter_name, cfg, init_bgt=init_r * len(plan),
                                        target_bgt=cfg["target_r"] * len(plan))

    enable_adapter_names(model)


register_method(AdapterMethod("ADALORA", _adapter_names, _peft_config, _peft_state_dict, _peft_load))
