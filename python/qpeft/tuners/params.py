"""Parameter accounting shared by every PEFT method."""
from __future__ import annotations

from dataclasses import dataclass

import torch
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
    # bitsandbytes' Params4bit (recognised by class name, as PEFT does, without importing bitsandbytes) holds two
    # 4-bit values per byte of its storage dtype (quant_storage may be a float type: itemsize bytes per element).
    if type(p).__name__ == "Params4bit":
        state = getattr(p, "quant_state", None)
        if state is not None:  # the weight's own shape (an odd element count packs one spare nibble)
            return int(torch.Size(state.shape).numel())
        return int(p.numel() * 2 * p.element_size())
    return int(getattr(p, "logical_numel", p.numel()))


def trainable_parameters(model: nn.Module) -> ParameterReport:
    """Count trainable vs all parameters (each shared parameter once), like PEFT's
    `print_trainable_parameters`. Quantized weights count with their logical (unpacked) size: a qpeft 4-bit layer
    (QLinearNF4: `quantized_numel`, its uint8 storage skipped) and bitsandbytes' Params4bit (two per byte) count as
    the dense layer's in_features * out_features."""
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
