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
    # Packed 4-bit buffers are not parameters; a Params-style tensor that stores two 4-bit values per
    # uint8 element reports its logical count through `logical_numel` where a module provides it.
    return int(getattr(p, "logical_numel", p.numel()))


def trainable_parameters(model: nn.Module) -> ParameterReport:
    """Count trainable vs all parameters (each shared parameter once), like PEFT's
    `print_trainable_parameters`. Quantized weights count with their logical (unpacked) size when
    the module exposes it (`QLinearNF4` does, through `logical_numel` on its weight)."""
    trainable = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = _numel(p)
        total += n
        if p.requires_grad:
            trainable += n
    for m in model.modules():  # quantized layers keep their weight in buffers
        extra = getattr(m, "quantized_numel", None)
        if callable(extra):
            total += int(extra())
    return ParameterReport(trainable, total)
