"""An evaluation text that exists on every machine: docstrings of Python's standard library, and perplexity.

The text depends only on the Python version (the stdlib's docstrings), not on the network or on any package,
so perplexities printed by the demo are comparable between runs and machines with the same Python.
"""
from __future__ import annotations

import importlib
import inspect
import math

import torch

__all__ = ["STDLIB_MODULES", "stdlib_docstrings", "perplexity"]

# Modules with long, well-written English docstrings; pure-Python, present in every CPython build.
STDLIB_MODULES = ("textwrap", "json", "functools", "collections", "heapq", "bisect", "statistics", "fractions",
                  "difflib", "shlex", "string", "argparse", "csv", "calendar", "enum", "dataclasses", "pathlib",
                  "random", "inspect", "typing")


def stdlib_docstrings(min_chars: int = 20000, modules: tuple[str, ...] = STDLIB_MODULES) -> str:
    """Docstrings of `modules` (module first, then public members sorted by name), joined by blank lines,
    until at least `min_chars` characters; deterministic for a given Python version."""
    if min_chars <= 0:
        raise ValueError(f"min_chars must be > 0, got {min_chars}")
    parts: list[str] = []
    total = 0
    for mod_name in modules:
        mod = importlib.import_module(mod_name)
        docs = [inspect.getdoc(mod)]
        for name in sorted(getattr(mod, "__all__", None) or dir(mod)):
            obj = getattr(mod, name, None)
            if name.startswith("_") or getattr(obj, "__module__", None) != mod_name:
                continue  # only the module's own public objects, once
            docs.append(inspect.getdoc(obj))
        for doc in docs:
            if doc and len(doc) > 40:
                parts.append(doc)
                total += len(doc) + 2
                if total >= min_chars:
                    return "\n\n".join(parts)
    return "\n\n".join(parts)


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, seq_len: int = 256, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) of `model` over 1-D `input_ids`, cut into non-overlapping windows of `seq_len`
    (a trailing partial window is dropped). Logits are upcast to fp32 for the loss."""
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be 1-D, got shape {tuple(input_ids.shape)}")
    n_windows = input_ids.numel() // seq_len
    if n_windows == 0:
        raise ValueError(f"input_ids has {input_ids.numel()} tokens, fewer than seq_len={seq_len}")
    device = next(model.parameters()).device
    windows = input_ids[: n_windows * seq_len].view(n_windows, seq_len).to(device)
    nll, count = 0.0, 0
    for i in range(0, n_windows, batch_size):
        ids = windows[i:i + batch_size]
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(nll / count)
