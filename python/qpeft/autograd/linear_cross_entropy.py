"""Autograd over the fused linear + cross-entropy ops (L3) and the public functional `linear_cross_entropy`.

Two ways to get the gradient, both exact (no gradient filtering, fp32 accumulation):
- "recompute": the forward is one blockwise online log-sum-exp pass over the vocabulary that keeps only lse (N,)
  (qpeft::linear_cross_entropy_fwd); the backward recomputes the logits blockwise (..._bwd). Three N x V x H
  products for a frozen head (logits, logits again, dX): 6·N·V·H FLOPs; a trainable head adds dW: 8.
- "forward": the input (and bias) gradient is produced in the forward from logits computed once per token
  chunk (..._fwd_bwd) and only scaled by the upstream gradient in the backward: 4·N·V·H FLOPs, a third fewer.
  It needs to know in the forward which gradients are wanted, an upstream gradient that can be applied after
  the fact (a scalar for mean / sum; per row for reduction="none", which works for dX but not for the head's
  dW / dbias), and a frozen weight (a trainable one accumulates dW over token chunks; the recompute backward
  walks vocabulary blocks instead and writes each dW block once).
"auto" takes "forward" whenever it applies (grad enabled, input needs a gradient, weight frozen, and bias frozen
or a reduced loss): by FLOPs it should win by ~1.3-1.5x on the GPU, which no GPU has measured yet; the benchmark
(benchmarks/bench_linear_cross_entropy.py) times both strategies side by side, and its result should set this
rule. Under torch.no_grad or with nothing requiring a gradient, the forward is the lse pass alone.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..ops import linear_cross_entropy as _ops  # noqa: F401  (registers torch.ops.qpeft.linear_cross_entropy_*)
from ..ops.nf4_matmul import FLOAT_DTYPES
from .nf4_matmul import weight_args

__all__ = ["linear_cross_entropy", "LinearCrossEntropyFunction"]

REDUCTIONS = ("mean", "sum", "none")
STRATEGIES = ("auto", "forward", "recompute")


class _Options(NamedTuple):
    blocksize: int
    vocab: int
    ignore_index: int
    softcap: float
    label_smoothing: float
    z_loss: float
    reduction: str
    strategy: str
    grad_enabled: bool


class LinearCrossEntropyFunction(torch.autograd.Function):
    """forward(x2d (N, H), weight (V, H) or None, bias (V,) or None, target (N,) int64, packed, absmax, code,
    nested_absmax, nested_code, offset (the 4-bit head, or Nones), denom (0-dim fp32: the mean's divisor),
    options) -> the reduced fp32 loss (a scalar, or (N,) for reduction="none")."""

    @staticmethod
    def forward(ctx, x, weight, bias, target, packed, absmax, code, nested_absmax, nested_code, offset, denom,
                opt: _Options):
        need_x, need_w, need_b = (opt.grad_enabled and n for n in ctx.needs_input_grad[:3])
        head = (weight, packed, absmax, code, nested_absmax, nested_code, offset, opt.blocksize, opt.vocab)
        opts = (opt.ignore_index, opt.softcap, opt.label_smoothing, opt.z_loss)
        valid = target != opt.ignore_index
        if opt.reduction == "mean":  # where(): no 0 * inf = nan when every row is ignored (denom 0)
            unit = torch.where(valid, 1.0 / denom, torch.zeros((), device=x.device))
        else:
            unit = valid.float()
        in_forward = need_x and not need_w and (opt.reduction != "none" or not need_b)
        if opt.strategy == "forward" and not in_forward and (need_x or need_w or need_b):
            raise ValueError("grad_strategy='forward' needs an input gradient, a frozen weight and, with "
                             "reduction='none', a frozen bias")
        in_forward = in_forward and opt.strategy != "recompute"
        ctx.opt, ctx.in_forward = opt, in_forward
        ctx.need = (need_x, need_w, need_b)
        if in_forward:
            loss, _, dx, db = torch.ops.qpeft.linear_cross_entropy_fwd_bwd(x, *head, bias, target, unit, *opts, need_b)
            ctx.save_for_backward(dx, db if need_b else None)
        else:
            loss, lse = torch.ops.qpeft.linear_cross_entropy_fwd(x, *head, bias, target, *opts)
            if need_x or need_w or need_b:
                ctx.save_for_backward(x, weight, bias, target, packed, absmax, code, nested_absmax, nested_code,
                                      offset, lse, unit)
        if opt.reduction == "none":
            return loss
        total = loss.sum()
        return total / denom if opt.reduction == "mean" else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        opt = ctx.opt
        need_x, need_w, need_b = ctx.need
        grad = grad.float()
        dx = dw = db = None
        if ctx.in_forward:
            dx_unit, db_unit = ctx.saved_tensors
            # per row for reduction="none" (dX rows are independent), else one scalar
            dx = (dx_unit * (grad[:, None] if opt.reduction == "none" else grad)).to(dx_unit.dtype)
            if need_b:
                db = (db_unit * grad).to(db_unit.dtype)
        else:
            (x, weight, bias, target, packed, absmax, code, nested_absmax, nested_code, offset, lse,
             unit) = ctx.saved_tensors
            rows = unit * grad  # (N,) for "none", a scalar broadcast otherwise
            dx, dw, db = torch.ops.qpeft.linear_cross_entropy_bwd(
                x, weight, packed, absmax, code, nested_absmax, nested_code, offset, opt.blocksize, opt.vocab, bias,
                target, lse, rows.contiguous(), opt.ignore_index, opt.softcap, opt.label_smoothing, opt.z_loss,
                need_w, need_b)
            dx = dx if need_x else None
            dw = dw if need_w else None
            db = db if need_b else None
        return dx, dw, db, None, None, None, None, None, None, None, None, None


def _is_4bit_layer(obj) -> bool:
    """A 4-bit linear layer (qpeft.QLinearNF4): an nn.Module exposing its format as `quant_state` beside its packed
    `weight` and its `in_features`. The layer classes live above the op stack, so the head is recognised by what
    it offers, not by its class."""
    return isinstance(obj, torch.nn.Module) and all(hasattr(obj, a) for a in ("quant_state", "weight", "in_features"))


def _head(linear_weight, linear_bias, H: int, x: torch.Tensor, autocast_dtype: torch.dtype | None):
    """(compute dtype, dense weight or None, bias, 4-bit pieces (6) or Nones, blocksize, vocab); raises naming
    linear_weight / linear_bias."""
    nf4 = None
    if isinstance(linear_weight, torch.Tensor):
        w = linear_weight
        if w.dim() != 2 or w.shape[1] != H:
            raise ValueError(f"linear_weight must be (vocab_size, {H}) for input (..., {H}), got {tuple(w.shape)}")
        if w.dtype not in FLOAT_DTYPES:
            raise TypeError(f"linear_weight dtype must be float16, bfloat16 or float32 (or pass a QLinearNF4 / "
                            f"(packed, QuantState) 4-bit head), got {w.dtype}")
        if w.device != x.device:
            raise ValueError(f"linear_weight is on {w.device}, input on {x.device}")
        cdt = autocast_dtype or x.dtype
        if autocast_dtype is None and w.dtype != x.dtype:
            raise TypeError(f"linear_weight dtype {w.dtype} must equal input's {x.dtype} (as F.linear; under "
                            f"autocast both are cast to the autocast dtype)")
        vocab, blocksize = w.shape[0], 0
        if linear_bias is not None and autocast_dtype is None and linear_bias.dtype != w.dtype:
            raise TypeError(f"linear_bias dtype {linear_bias.dtype} must equal linear_weight's {w.dtype}")
        dense = w.to(cdt).contiguous()
    else:
        if _is_4bit_layer(linear_weight):
            layer = linear_weight
            if layer.in_features != H:
                raise ValueError(f"linear_weight (QLinearNF4) has in_features={layer.in_features}, input has "
                                 f"hidden size {H}")
            if layer.bias is not None:
                if linear_bias is not None:
                    raise ValueError("linear_weight is a QLinearNF4 with its own bias; do not pass linear_bias too")
                linear_bias = layer.bias
            cdt = autocast_dtype or layer.compute_dtype or x.dtype
            state = layer.quant_state
            packed = layer.weight
        elif isinstance(linear_weight, (tuple, list)) and len(linear_weight) == 2:
            packed, state = linear_weight
            cdt = autocast_dtype or x.dtype
        else:
            raise TypeError(f"linear_weight must be a tensor (vocab_size, hidden), a qpeft.QLinearNF4 or a "
                            f"(packed, QuantState) pair, got {type(linear_weight).__name__}")
        try:
            packed, absmax, code, blocksize, vocab, K, nested_absmax, nested_code, offset = weight_args(packed, state)
        except (ValueError, AttributeError) as e:
            raise ValueError(f"linear_weight: not a usable 4-bit head: {e}") from None
        if K != H:
            raise ValueError(f"linear_weight (4-bit) has shape {(vocab, K)}, input has hidden size {H}")
        if packed.device != x.device:
            raise ValueError(f"linear_weight (4-bit) is on {packed.device}, input on {x.device}")
        dense = None
        nf4 = (packed.reshape(-1), absmax, code, nested_absmax, nested_code, offset)
    if linear_bias is not None:
        if not isinstance(linear_bias, torch.Tensor) or tuple(linear_bias.shape) != (vocab,):
            shape = tuple(linear_bias.shape) if isinstance(linear_bias, torch.Tensor) else type(linear_bias).__name__
            raise ValueError(f"linear_bias must be ({vocab},) (one per row of linear_weight), got {shape}")
        if linear_bias.device != x.device:
            raise ValueError(f"linear_bias is on {linear_bias.device}, input on {x.device}")
        linear_bias = linear_bias.to(cdt).contiguous()
    return cdt, dense, linear_bias, nf4 or (None,) * 6, blocksize, vocab


def linear_cross_entropy(input: torch.Tensor, linear_weight, target: torch.Tensor,
                         linear_bias: torch.Tensor | None = None, *, reduction: str = "mean",
                         ignore_index: int = -100, label_smoothing: float = 0.0, softcap: float | None = None,
                         z_loss: float = 0.0, num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """cross_entropy(linear(input, linear_weight, linear_bias), target) without materializing the logits.

    input: (..., H) float16 / bfloat16 / float32, any strides. linear_weight: the classifier head W (V, H): a
    tensor in input's dtype (frozen or trainable), a qpeft.QLinearNF4 (its bias is used; it computes in its
    compute_dtype as its forward does) or a (packed, QuantState) 4-bit pair (NF4 or FP4, bitsandbytes' layout),
    decoded block by block inside the kernels. target: (...) integer class ids in [0, V) or ignore_index.
    linear_bias: (V,) or None. Under autocast, input, a dense head and the bias are cast to the autocast dtype.

    reduction: "mean" (over the non-ignored rows; NaN when every row is ignored, as torch), "sum", or "none"
    (a loss per row of target's shape, 0 for ignored rows). num_items_in_batch (int or tensor; what the
    transformers Trainer passes under gradient accumulation): the loss is the sum divided by it, instead of by the
    number of non-ignored rows; only with reduction="mean".
    label_smoothing: as torch.nn.functional.cross_entropy. softcap: Gemma 2's final-logit softcapping c, logits
    become c * tanh(logits / c) before the softmax. z_loss: adds z_loss * lse^2 per non-ignored row (PaLM's
    auxiliary z-loss, Liger's lse_square_scale; reduced like the loss, so "mean" gives the mean of
    z_loss * lse^2 over the non-ignored rows), lse = logsumexp of the (capped) logits.

    Returns the loss in float32 (transformers' loss upcasts the logits to float32 too). Gradients flow to input,
    a dense trainable linear_weight and linear_bias, in their dtypes; a 4-bit head gets none and no weight-gradient
    buffer is ever allocated for a frozen head. Exact: every logit's gradient is computed (no filtering) with fp32
    accumulation. Not differentiable twice.
    """
    return linear_cross_entropy_impl(input, linear_weight, target, linear_bias, reduction=reduction,
                                     ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap,
                                     z_loss=z_loss, num_items_in_batch=num_items_in_batch)


def linear_cross_entropy_impl(input, linear_weight, target, linear_bias=None, *, reduction="mean",
                              ignore_index=-100, label_smoothing=0.0, softcap=None, z_loss=0.0,
                              num_items_in_batch=None, grad_strategy: str = "auto") -> torch.Tensor:
    """`linear_cross_entropy` with the gradient strategy forced ("forward" / "recompute"; see the module
    docstring): what the tests and the benchmark use to compare the two."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a tensor, got {type(input).__name__}")
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"input dtype must be float16, bfloat16 or float32, got {input.dtype}")
    if input.dim() < 1:
        raise ValueError("input must have a hidden dimension (..., H)")
    if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point or target.dtype.is_complex \
            or target.dtype == torch.bool:
        what = target.dtype if isinstance(target, torch.Tensor) else type(target).__name__
        raise TypeError(f"target must be an integer tensor of class ids (class probabilities are not supported), "
                        f"got {what}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} must equal input's without the hidden dimension "
                         f"{tuple(input.shape[:-1])}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device}, input on {input.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if grad_strategy not in STRATEGIES:
        raise ValueError(f"grad_strategy must be one of {STRATEGIES}, got {grad_strategy!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0.0, 1.0], got {label_smoothing}")
    z_loss = float(z_loss)
    if not z_loss >= 0.0 or z_loss == float("inf"):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss}")
    if softcap is not None:
        softcap = float(softcap)
        if not 0.0 < softcap < float("inf"):
            raise ValueError(f"softcap must be None or a positive finite number, got {softcap}")
    if num_items_in_batch is not None and reduction != "mean":
        raise ValueError(f"num_items_in_batch divides the summed loss (transformers' convention) and needs "
                         f"reduction='mean', got reduction={reduction!r}")

    H = input.shape[-1]
    device_type = input.device.type
    autocast_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    cdt, dense, bias, nf4, blocksize, vocab = _head(linear_weight, linear_bias, H, input, autocast_dtype)
    x2d = input.reshape(-1, H).to(cdt).contiguous()
    t1d = target.reshape(-1).long()
    if num_items_in_batch is None:
        denom = (t1d != ignore_index).sum().float()
    else:
        denom = torch.as_tensor(num_items_in_batch, device=input.device).float().reshape(())
    opt = _Options(blocksize, vocab, ignore_index, softcap or 0.0, label_smoothing, z_loss, reduction, grad_strategy,
                   torch.is_grad_enabled())
    loss = LinearCrossEntropyFunction.apply(x2d, dense, bias, t1d, *nf4, denom, opt)
    return loss.reshape(target.shape) if reduction == "none" else loss
