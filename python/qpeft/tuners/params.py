"""Parameter accounting shared by every PEFT method."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

__all__ = ["trainable_parameters", "ParameterReport"]


@dataclass(frozen=True)
class ParameterReport:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def _numel(p) -> int:
    # A Params-style tensor that stores two 4-bit values per uint8 element reports its logical count through
    # `logical_numel` where it provides one (QLinearNF4's storage is counted by its quantized_numel instead).
    return int(getattr(p, "logical_numel", p.numel()))


def trainable_parameters(model: nn.Module) -> ParameterReport:
    """Count trainable vs all parameters (each shared parameter once), like PEFT's
    `print_trainable_parameters`. Quantized weights count with their logical (unpacked) size when
    the module exposes it (`QLinearNF4` does, through `logical_numel` on its weight)."""
    trainable = total = 0
    seen: set[int] = set()
    for m in model.modules():  # QLinearNF4's packed uint8 Parameters: counted by quantized_numel below
        quantized = getattr(m, "quantized_parameters", None)
        if callable(quantized):
            seen.update(id(p) for p in quantized())
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = _numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    for m in model.modules():  # quantized layers count their weight's logical size
        extra = getattr(m, "quantized_numel", None)
        if callable(extra):
            total += int(extra())
    return ParameterReport(trainable, total)
