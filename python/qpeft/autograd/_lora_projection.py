"""One LoRA projection of a fused block (lora_mlp, lora_qkv): its description, its resolution into the tensors
the `qpeft::` ops take, and the forward / backward pieces both blocks share.

    y = base(x) + bias + scale * (dropout(x) A^T) B^T       base dense W (N, K) or NF4/FP4; A (r, K), B (N, r)

The pieces call `torch.ops.qpeft.*` only (plus plain matmuls for a dense base without an adapter), exactly as
LoraFunction does: the NF4 base runs through qpeft::nf4_matmul / nf4_matmul_dx with the LoRA epilogue, the
dense base through qpeft::lora_linear / lora_linear_dx, dropout masks come from a hashed int64 seed (regenerated
in backward, never stored), and dA / dB are accumulated in fp32 by qpeft::lora_grad.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn

from ..ops import lora as _lora_ops  # noqa: F401  (registers qpeft::lora_*)
from .lora import _nf4_parts

__all__ = ["LoraProjection"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# per projection, the tensors handed to autograd.Function.apply (so needs_input_grad covers A, B and bias)
TENSORS = ("weight", "packed", "absmax", "code", "nested_absmax", "nested_code", "offset", "bias", "A", "B", "seed")
N_TENSORS = len(TENSORS)
I_BIAS, I_A, I_B = TENSORS.index("bias"), TENSORS.index("A"), TENSORS.index("B")


class LoraProjection(NamedTuple):
    """A frozen base projection with an optional LoRA adapter, as a fused block takes it.

    base: the frozen weight W (N, K): a dense tensor, an nn.Linear, a QLinearNF4, or an NF4/FP4
        (packed, QuantState) pair (qpeft's or bitsandbytes' state).
    A (r, K), B (N, r): the adapter (any float dtype; PEFT keeps fp32), or both None for a projection without one.
    scale: lora_alpha / r (or / sqrt(r) with rsLoRA). bias: (N,) or None; None takes an nn.Linear's /
        QLinearNF4's own bias. dropout_p: dropout on the adapter input, applied only when the block is called
        with training=True. seed: a 1-element int64 tensor fixing that dropout mask (default: drawn from torch's
        generator per call, in projection order, exactly as qpeft.lora_linear draws it).
    """

    base: object
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    scale: float = 1.0
    bias: torch.Tensor | None = None
    dropout_p: float = 0.0
    seed: torch.Tensor | None = None

    @classmethod
    def from_module(cls, module: nn.Module) -> "LoraProjection":
        """The projection a module computes: nn.Linear / QLinearNF4 (no adapter), or qpeft's LoraLinear with
        its active, unmerged adapters (one adapter; several are stacked along the rank as LoraLinear does, which
        needs them without dropout). A disabled LoraLinear gives its base alone."""
        # a LoRA layer says which projection it computes (qpeft's LoraLinear: its active unmerged adapters); the
        # layer classes live above the op stack, so they are asked, not imported
        fused = getattr(module, "fused_projection", None)
        if callable(fused):
            return fused()
        if isinstance(module, nn.Linear) or hasattr(module, "quant_state"):
            return cls(module)
        raise TypeError(f"LoraProjection.from_module takes an nn.Linear, QLinearNF4 or LoraLinear, got "
                        f"{type(module).__name__}")


class Resolved(NamedTuple):
    """A projection resolved for one call: tensors in TENSORS order plus the static metadata."""

    tensors: tuple
    blocksize: int
    N: int
    K: int
    scale: float
    p: float           # dropout probability in effect (0.0 outside training)
    has_lora: bool
    nf4: bool


def as_projection(name: str, proj) -> LoraProjection:
    if isinstance(proj, LoraProjection):
        return proj
    if isinstance(proj, nn.Module):
        return LoraProjection.from_module(proj)
    raise TypeError(f"{name} must be a LoraProjection or a module (nn.Linear, QLinearNF4, LoraLinear), got "
                    f"{type(proj).__name__}")


def compute_dtype(name: str, proj: LoraProjection, x: torch.Tensor) -> torch.dtype:
    """The dtype the projection computes in, as its module would (LoraLinear._base_operand): the autocast dtype
    under autocast, else a dense weight's dtype, else QLinearNF4's compute_dtype (None: x's dtype)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    base = proj.base
    if isinstance(base, nn.Linear):
        return base.weight.dtype
    if isinstance(base, torch.Tensor):
        return base.dtype
    if isinstance(base, nn.Module):
        return getattr(base, "compute_dtype", None) or x.dtype
    return x.dtype


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def resolve(name: str, proj: LoraProjection, x2d: torch.Tensor, training: bool) -> Resolved:
    """Validate `proj` against x2d (M, K) (already in the compute dtype) and lay it out for the ops."""

    K = x2d.shape[1]
    dt = x2d.dtype
    base, bias = proj.base, proj.bias
    weight = None
    nf4 = None
    if isinstance(base, nn.Linear):
        weight = base.weight
        bias = base.bias if bias is None else bias
    elif isinstance(base, torch.Tensor):
        weight = base
    else:
        nf4 = _nf4_parts(base)
        _check(nf4 is not None, f"{name}.base must be a weight tensor, an nn.Linear, a QLinearNF4 or a "
                                f"(packed, QuantState) pair, got {type(base).__name__}")
        if bias is None and isinstance(base, nn.Module):
            bias = getattr(base, "bias", None)
    if weight is not None:
        _check(not (weight.requires_grad and torch.is_grad_enabled()),
               f"{name}: the base weight must be frozen (requires_grad=False): the fused blocks compute no "
               f"gradient for it")
        _check(weight.dim() == 2, f"{name}: the base weight must be 2-D (N, K), got shape {tuple(weight.shape)}")
        _check(weight.device == x2d.device, f"{name}: the base weight is on {weight.device} but x is on "
                                            f"{x2d.device}")
        N, wK = weight.shape
        weight = weight.to(dt).contiguous()  # a no-op unless under autocast, as LoraLinear casts it
        tensors = [weight, None, None, None, None, None, None]
        blocksize = 0
    else:
        packed, absmax, code, blocksize, N, wK, nested_absmax, nested_code, offset = nf4
        _check(packed.device == x2d.device, f"{name}: the base weight is on {packed.device} but x is on "
                                            f"{x2d.device}")
        tensors = [None, packed, absmax, code, nested_absmax, nested_code, offset]
    _check(wK == K, f"{name}: x has {K} features but the base weight has shape ({N}, {wK})")
    if bias is not None:
        _check(tuple(bias.shape) == (N,), f"{name}.bias must have shape ({N},), got {tuple(bias.shape)}")
        _check(bias.device == x2d.device, f"{name}.bias is on {bias.device} but x is on {x2d.device}")
        bias = bias.to(dt)
    A, B = proj.A, proj.B
    _check((A is None) == (B is None), f"{name}: A and B must be given together (or both None)")
    has_lora = A is not None
    p = float(proj.dropout_p)
    _check(0.0 <= p < 1.0, f"{name}.dropout_p must be in [0, 1), got {proj.dropout_p}")
    _check(math.isfinite(float(proj.scale)), f"{name}.scale must be finite, got {proj.scale}")
    seed = None
    if has_lora:
        _check(isinstance(A, torch.Tensor) and isinstance(B, torch.Tensor) and A.dtype in _FLOATS
               and B.dtype in _FLOATS, f"{name}: A and B must be float tensors")
        _check(A.dim() == 2 and A.shape[1] == K and A.shape[0] >= 1,
               f"{name}.A must have shape (r, {K}) with r >= 1, got {tuple(A.shape)}")
        r = A.shape[0]
        _check(tuple(B.shape) == (N, r), f"{name}.B must have shape ({N}, {r}), got {tuple(B.shape)}")
        _check(A.device == x2d.device and B.device == x2d.device,
               f"{name}: A ({A.device}) and B ({B.device}) must be on x's device {x2d.device}")
        A, B = A.contiguous(), B.contiguous()
        if training and p > 0.0:
            seed = proj.seed
            if seed is None:
                seed = torch.randint(0, 2**31 - 1, (1,), device=x2d.device, dtype=torch.int64)
            else:
                _check(isinstance(seed, torch.Tensor) and seed.dtype == torch.int64 and seed.numel() == 1,
                       f"{name}.seed must be a 1-element int64 tensor, got {getattr(seed, 'dtype', type(seed))}")
                seed = seed.reshape(1).to(x2d.device)
    if seed is None:
        p = 0.0
    return Resolved((*tensors, bias, A, B, seed), int(blocksize), int(N), int(K), float(proj.scale), p, has_lora,
                    weight is None)


# ------------------------------------------------------------------------------------------------ pieces
def _epi(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """An NF4 epilogue operand: the activation dtype, contiguous (the op requires both)."""
    return t.to(dt).contiguous()


def forward(x2d: torch.Tensor, t: tuple, meta, xa: torch.Tensor | None) -> torch.Tensor:
    """base(x) + bias + scale * xa B^T for one resolved projection (xa fp32 (M, r) or None without adapter)."""
    weight, packed, absmax, code, nested_absmax, nested_code, offset, bias, A, B, seed = t
    ops = torch.ops.qpeft
    if weight is not None:
        if meta.has_lora:
            return ops.lora_linear(x2d, weight, bias, xa.contiguous(), B, meta.scale)
        return torch.nn.functional.linear(x2d, weight, bias)
    dt = x2d.dtype
    return ops.nf4_matmul(x2d, packed, absmax, code, meta.blocksize, meta.N, nested_absmax, nested_code, offset,
                          bias, _epi(xa, dt) if meta.has_lora else None, _epi(B, dt) if meta.has_lora else None,
                          meta.scale if meta.has_lora else 0.0)


def lora_grads(dy: torch.Tensor, x2d: torch.Tensor, t: tuple, meta, xa: torch.Tensor, need_ab: bool):
    """(dyb fp32 (M, r), dA fp32 or None, dB fp32 or None) of one projection with an adapter."""
    *_, B, seed = t
    if need_ab:
        return torch.ops.qpeft.lora_grad(dy, x2d, xa.contiguous(), B, meta.scale, seed, meta.p)
    # frozen adapter: only dyb = dy B for dx (the rank-r pass with B^T as "A")
    return torch.ops.qpeft.lora_xa(dy, B.t().contiguous(), None, 0.0), None, None


def input_grad(dy: torch.Tensor, t: tuple, meta, dyb: torch.Tensor | None) -> torch.Tensor:
    """dx = dy W + scale drop'(dyb A) of one projection (dyb None without adapter)."""
    weight, packed, absmax, code, nested_absmax, nested_code, offset, bias, A, B, seed = t
    ops = torch.ops.qpeft
    if weight is not None:
        if meta.has_lora:
            return ops.lora_linear_dx(dy, weight, dyb, A, meta.scale, seed, meta.p)
        return dy @ weight
    dt = dy.dtype
    if meta.has_lora and meta.p == 0.0:
        return ops.nf4_matmul_dx(dy, packed, absmax, code, meta.blocksize, meta.K, nested_absmax, nested_code,
                                 offset, _epi(dyb, dt), _epi(A, dt), meta.scale)
    dx = ops.nf4_matmul_dx(dy, packed, absmax, code, meta.blocksize, meta.K, nested_absmax, nested_code, offset,
                           None, None, 0.0)
    if meta.has_lora:  # the NF4 epilogue cannot apply the dropout mask: the masked LoRA term in a second pass
        dx = ops.lora_masked_dx(dx, dyb, A, meta.scale, seed, meta.p)
    return dx


def accumulate(acc: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """acc + part in fp32: the input gradient of x summed over the projections that read x, rounded once at the
    end (`.to(x.dtype)`) rather than after every addition as autograd's accumulation of separate layers does."""
    if acc is None:
        return part.float()  # the op's fresh output itself when it is fp32 already
    return acc.add_(part)


def shrink(x2d: torch.Tensor, projs: list[tuple]) -> list[torch.Tensor | None]:
    """xa = drop(x) A^T (fp32 (M, r)) for each (tensors, meta) with an adapter, None for the others. Adapters
    without dropout share one pass over x (their A's stacked along the rank, the result split by columns);
    each adapter with dropout has its own mask and pass, as PEFT's separate dropout modules do."""
    ops = torch.ops.qpeft
    out: list[torch.Tensor | None] = [None] * len(projs)
    shared = [i for i, (t, m) in enumerate(projs) if m.has_lora and m.p == 0.0]
    if len(shared) == 1:
        t, _ = projs[shared[0]]
        out[shared[0]] = ops.lora_xa(x2d, t[I_A], None, 0.0)
    elif shared:
        A_cat = torch.cat([projs[i][0][I_A].float() for i in shared], 0)
        xa = ops.lora_xa(x2d, A_cat, None, 0.0)
        start = 0
        for i in shared:
            r = projs[i][0][I_A].shape[0]
            out[i] = xa[:, start:start + r]
            start += r
    for i, (t, m) in enumerate(projs):
        if m.has_lora and m.p > 0.0:
            out[i] = ops.lora_xa(x2d, t[I_A], t[-1], m.p)
    return out
