"""What differs between the transformers releases qpeft supports (5.17 .. newest), detected by behaviour.

- The KV cache argument: `past_key_values` up to 5.23, `cache` from 5.24 (the old name is still accepted
  there, with a deprecation warning, and slated for removal). Models and their attention modules are asked
  which name their `forward` takes, so a model keeps working whichever release built it.
- Activation checkpointing: `gradient_checkpointing_enable/disable` up to 5.23; 5.24 adds
  `activation_checkpointing_enable/disable` and keeps the old names as deprecated aliases.

Nothing here imports transformers.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch.nn as nn

# Newest first: a forward that takes both (a wrapper forwarding **kwargs) gets the current name.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def cache_argument(fn: Callable) -> str | None:
    """The name under which `fn` (a model's or an attention module's forward) takes the KV cache, or None."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    for name in CACHE_ARGUMENTS:
        if name in params:
            return name
    return None


def cache_from(kwargs: dict) -> Any:
    """The cache passed in `kwargs` under either name (None when absent)."""
    for name in CACHE_ARGUMENTS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_given(kwargs: dict) -> str | None:
    """The name under which a non-None cache was passed in `kwargs`, or None."""
    for name in CACHE_ARGUMENTS:
        if kwargs.get(name) is not None:
            return name
    return None


def output_cache(output: Any) -> Any:
    """The cache a model returned (`output.cache` from 5.24, `output.past_key_values` before)."""
    for name in CACHE_ARGUMENTS:
        value = getattr(output, name, None) if not isinstance(output, dict) else output.get(name)
        if value is not None:
            return value
    return None


def _checkpointing_method(model: nn.Module, action: str) -> Callable:
    for name in (f"activation_checkpointing_{action}", f"gradient_checkpointing_{action}"):
        method = getattr(model, name, None)
        if callable(method):
            return method
    raise ValueError(f"{type(model).__name__} has no activation_checkpointing_{action} / "
                     f"gradient_checkpointing_{action} method (not a transformers PreTrainedModel?)")


def checkpointing_method_name(model: nn.Module, action: str) -> str:
    """`activation_checkpointing_<action>` where the model has it (transformers >= 5.24), else the
    `gradient_checkpointing_<action>` of earlier releases: the name to put in an error message."""
    return _checkpointing_method(model, action).__name__


def enable_checkpointing(model: nn.Module, use_reentrant: bool | None = None) -> None:
    """Turns on activation (gradient) checkpointing on a transformers model, whichever release."""
    method = _checkpointing_method(model, "enable")
    kwargs = {} if use_reentrant is None else {"use_reentrant": use_reentrant}
    if method.__name__.startswith("activation"):
        method(activation_checkpointing_kwargs=kwargs or None)
    else:
        method(gradient_checkpointing_kwargs=kwargs or None)


def disable_checkpointing(model: nn.Module) -> None:
    _checkpointing_method(model, "disable")()
