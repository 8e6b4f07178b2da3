"""L2 ops of rotary position embedding: `qpeft::rope` (out of place) and `qpeft::rope_` (in place).

    qpeft::rope(Tensor x, Tensor cos, Tensor sin, Tensor? position_ids, bool backward) -> Tensor
    qpeft::rope_(Tensor(a!) x, Tensor cos, Tensor sin, Tensor? position_ids, bool backward) -> ()
x (B, S, H, D) float, any strides with a unit last one (the in-place op rotates q/k where the projection wrote
them); cos/sin (Bc, S, Dr) per token (Bc 1 or B), or a table (P, Dr) with position_ids (Bp, S) int32/int64
(Bp 1 or B); Dr even, 2 <= Dr <= D: the first Dr features rotate, the rest pass through. backward=True applies
the transposed map (the gradient). Semantics in reference/rope.py. `qpeft::rope_` is the one op of this stem
that mutates its input (declared in its schema, so torch.compile functionalizes it); the autograd layer pairs
it with ctx.mark_dirty (autograd/rope.py). Triton on CUDA tensors (or under the interpreter), else the
reference; no CUDA C++ kernel. Out-of-range position_ids fail an assert (on a GPU asynchronously, no sync).
"""
from __future__ import annotations

import torch
from torch.library import custom_op, register_fake

from .._backend import select as _select_backend  # not `from .. import _backend`: qpeft.__getattr__
from ..reference.rope import rope_ref

__all__: list[str] = []  # ops are reached as torch.ops.qpeft.rope / rope_; the functional is qpeft.apply_rotary_pos_emb

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int32, torch.int64)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None) -> None:
    torch._check(x.dim() == 4, lambda: f"x must be 4-D (B, S, H, D), got shape {tuple(x.shape)}")
    torch._check(x.dtype in _FLOATS, lambda: f"x must be float32/float16/bfloat16, got {x.dtype}")
    torch._check(x.stride(-1) == 1 or x.shape[-1] == 1,
                 lambda: f"x must have a unit stride in its last dimension, got strides {x.stride()}")
    B, S, _, D = x.shape
    torch._check(cos.shape == sin.shape, lambda: f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must match")
    torch._check(cos.dtype in _FLOATS and sin.dtype == cos.dtype,
                 lambda: f"cos and sin must have one float dtype, got {cos.dtype} and {sin.dtype}")
    Dr = cos.shape[-1]
    torch._check(Dr % 2 == 0 and 2 <= Dr <= D,
                 lambda: f"cos/sin last dimension (rotary dim) must be even and in [2, {D}], got {Dr}")
    if position_ids is None:
        torch._check(cos.dim() == 3 and cos.shape[0] in (1, B) and cos.shape[1] == S,
                     lambda: f"cos/sin must be (1 or {B}, {S}, rotary dim) without position_ids, got "
                             f"{tuple(cos.shape)}")
    else:
        torch._check(cos.dim() == 2, lambda: f"with position_ids, cos/sin must be a (positions, rotary dim) "
                                             f"table, got {tuple(cos.shape)}")
        torch._check(position_ids.dtype in _INTS, lambda: f"position_ids must be int32/int64, got {position_ids.dtype}")
        torch._check(position_ids.dim() == 2 and position_ids.shape[0] in (1, B) and position_ids.shape[1] == S,
                     lambda: f"position_ids must be (1 or {B}, {S}), got {tuple(position_ids.shape)}")
        torch._check(position_ids.device == x.device,
                     lambda: f"position_ids is on {position_ids.device} but x is on {x.device}")
    for name, t in (("cos", cos), ("sin", sin)):
        torch._check(t.device == x.device, lambda: f"{name} is on {t.device} but x is on {x.device}")


def _apply(x: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           position_ids: torch.Tensor | None, backward: bool) -> None:
    if position_ids is not None:
        P = cos.shape[0]
        torch._assert_async(((position_ids >= 0) & (position_ids < P)).all(),
                            f"position_ids must be in [0, {P}) (the rows of the cos/sin table)")
        position_ids = position_ids.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    if _select_backend("rope", x.device, cuda=False) == "triton":
        from qpeft.triton_kernels.rope import rope_triton

        if out is not x and cos.shape[-1] < x.shape[-1]:
            out[..., cos.shape[-1]:] = x[..., cos.shape[-1]:]  # the pass-through features
        rope_triton(x, out, cos, sin, position_ids, backward)
        return
    out.copy_(rope_ref(x, cos, sin, position_ids, backward))


@custom_op("qpeft::rope", mutates_args=())
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None,
         backward: bool) -> torch.Tensor:
    _check(x, cos, sin, position_ids)
    out = torch.empty_like(x)
    _apply(x, out, cos, sin, position_ids, backward)
    return out


@register_fake("qpeft::rope")
def _(x, cos, sin, position_ids, backward):
    _check(x, cos, sin, position_ids)
    return torch.empty_like(x)


@custom_op("qpeft::rope_", mutates_args=("x",))
def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None,
          backward: bool) -> None:
    _check(x, cos, sin, position_ids)
    _apply(x, x, cos, sin, position_ids, backward)


@register_fake("qpeft::rope_")
def _(x, cos, sin, position_ids, backward):
    _check(x, cos, sin, position_ids)
    return None
