"""DeepSpeed ZeRO-3's module-input identity node, for single-process emulations of ZeRO-3's backward
(zero3_worker.py) and the test of the mechanism (test_zero3.py)."""
from __future__ import annotations

import torch


class ModuleInputIdentity(torch.autograd.Function):
    """What DeepSpeed ZeRO-3 puts on every tensor input of every module (parameter_offload.py's
    PostBackwardFunctionModule, applied by a forward pre-hook; its backward only counts down to release the
    module's parameters): forward x.detach(), backward the gradient unchanged. It is an extra autograd node:
    the gradients of the module's internal uses of x are summed in its input buffer before they meet the other
    uses of x outside the module."""

    @staticmethod
    def forward(x):
        return x.detach()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g


def _wrap(v):
    if isinstance(v, torch.Tensor):
        return ModuleInputIdentity.apply(v)
    if isinstance(v, (tuple, list)):
        items = [_wrap(e) for e in v]
        return v.__class__(*items) if hasattr(v, "_fields") else v.__class__(items)
    if isinstance(v, dict):
        return {k: _wrap(e) for k, e in v.items()}
    return v


def zero3_input_identities(model):
    """Forward pre-hooks putting ModuleInputIdentity on every module's positional tensor inputs, as ZeRO-3 does
    (DeepSpeed's hook sees positional arguments only); returns the handles."""
    return [m.register_forward_pre_hook(lambda mod, args: _wrap(args)) for m in model.modules()]
