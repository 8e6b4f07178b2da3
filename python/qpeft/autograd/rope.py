"""L3: `RopeFunction` over `qpeft::rope` / `qpeft::rope_` and the public `apply_rotary_pos_emb` / `rope`.

`apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)` is a drop-in for transformers' function of that name
(Llama, Mistral, Qwen2, Qwen3, Gemma 2/3 all use the rotate_half form): give it the (cos, sin) that the model's
rotary embedding module returned, and every rope scaling transformers computes (default, linear, dynamic, yarn,
longrope, llama3, ... with attention_scaling) is covered, since it lives in those values.

In place, and how autograd stays right: by default q and k are rotated where they are (the projection's
output buffer, viewed as (B, heads, S, D)); no rotated copy is allocated. The mutation is the custom op
`qpeft::rope_` (its schema declares it, so torch.compile functionalizes it), called inside an autograd.Function
that marks its input dirty (ctx.mark_dirty): autograd then bumps the tensor's version counter and rebases the
history of the view onto the Function, so
  - the gradient is right: backward applies the transposed rotation to the incoming gradient (a new tensor,
    `qpeft::rope` out of place; the gradient buffer is not ours to overwrite), and nothing of q/k is saved;
  - a tensor that something else saved before the rotation (whose old values a backward would need) makes
    that backward raise "modified by an inplace operation" instead of silently using rotated values;
  - in-place on a leaf that requires grad raises, as for any torch in-place op.
One tensor per Function: autograd forbids a Function that modifies a view in place from returning more than one
tensor, so q and k are two calls (two launches). `inplace=False` returns new tensors instead.
"""
from __future__ import annotations

import torch

from ..ops import rope as _ops  # noqa: F401  (registers qpeft::rope, qpeft::rope_)

__all__ = ["apply_rotary_pos_emb", "rope", "RopeFunction"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class RopeFunction(torch.autograd.Function):
    """forward(x (B, S, H, D) unit last stride, cos, sin, position_ids or None, inplace) -> rotated x."""

    @staticmethod
    def forward(ctx, x, cos, sin, position_ids, inplace: bool):
        ctx.save_for_backward(cos, sin, position_ids)
        if inplace:
            torch.ops.qpeft.rope_(x, cos, sin, position_ids, False)
            ctx.mark_dirty(x)
            return x
        return torch.ops.qpeft.rope(x, cos, sin, position_ids, False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin, position_ids = ctx.saved_tensors
        if dy.stride(-1) != 1:  # e.g. the expanded gradient of a .sum()
            dy = dy.contiguous()
        return torch.ops.qpeft.rope(dy, cos, sin, position_ids, True), None, None, None, None


def _check(name: str, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids, unsqueeze_dim: int,
           inplace: bool) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D ((B, heads, S, D) with unsqueeze_dim=1, (B, S, heads, D) with "
                         f"unsqueeze_dim=2), got shape {tuple(x.shape)}")
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 (x is (B, heads, S, D)) or 2 (x is (B, S, heads, D)), got "
                         f"{unsqueeze_dim!r}")
    for n, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOATS:
            raise TypeError(f"{n} must be a float tensor, got {getattr(t, 'dtype', type(t))}")
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{n} requires grad: gradients for cos/sin are not supported (the rotary embedding "
                             f"module computes them from a buffer, without gradient)")
    D = x.shape[-1]
    S = x.shape[2] if unsqueeze_dim == 1 else x.shape[1]
    B = x.shape[0]
    if cos.shape != sin.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have the same shape")
    Dr = cos.shape[-1]
    if Dr % 2 or not 2 <= Dr <= D:
        raise ValueError(f"cos/sin last dimension (the rotary dim) must be even and in [2, {D}] for {name} with "
                         f"head dim {D}, got {Dr}")
    if position_ids is None:
        if cos.dim() != 3 or cos.shape[0] not in (1, B) or cos.shape[1] != S:
            raise ValueError(f"cos/sin must be (1 or {B}, {S}, {Dr}) per token for {name} of shape "
                             f"{tuple(x.shape)} (unsqueeze_dim={unsqueeze_dim}), got {tuple(cos.shape)}")
    else:
        if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"position_ids must be an int32/int64 tensor, got "
                            f"{getattr(position_ids, 'dtype', type(position_ids))}")
        if cos.dim() != 2:
            raise ValueError(f"with position_ids, cos/sin must be a (positions, {Dr}) table, got {tuple(cos.shape)}")
        if position_ids.dim() != 2 or position_ids.shape[0] not in (1, B) or position_ids.shape[1] != S:
            raise ValueError(f"position_ids must be (1 or {B}, {S}), got {tuple(position_ids.shape)}")
    for n, t in (("cos", cos), ("sin", sin), ("position_ids", position_ids)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{n} is on {t.device} but {name} is on {x.device}")
    if inplace:
        if x.stride(-1) != 1 and D > 1:
            raise ValueError(f"inplace=True needs {name} with a unit stride in its last dimension, got strides "
                             f"{x.stride()} (pass inplace=False)")
        if any(st == 0 and sz > 1 for st, sz in zip(x.stride(), x.shape)):
            raise ValueError(f"inplace=True cannot write {name}: it is expanded (a stride of 0), got strides "
                             f"{x.stride()}")


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1, *,
         position_ids: torch.Tensor | None = None, inplace: bool = True) -> torch.Tensor:
    """Rotary embedding of one tensor (arguments as in `apply_rotary_pos_emb`)."""
    return _rope("x", x, cos, sin, unsqueeze_dim, position_ids, inplace)


def _rope(name, x, cos, sin, unsqueeze_dim, position_ids, inplace):
    _check(name, x, cos, sin, position_ids, unsqueeze_dim, inplace)
    promoted = torch.promote_types(x.dtype, cos.dtype)
    if promoted != x.dtype:  # transformers' q * cos promotes (e.g. bf16 q, fp32 cos under autocast): so do we,
        x, inplace = x.to(promoted), True  # rotating the upcast copy in place; the original x is left unchanged
    x4 = x.transpose(1, 2) if unsqueeze_dim == 1 else x  # (B, S, heads, D): a view, no copy
    if not inplace and x4.stride(-1) != 1:
        x4 = x4.contiguous()
    y4 = RopeFunction.apply(x4, cos, sin, position_ids, bool(inplace))
    return y4.transpose(1, 2) if unsqueeze_dim == 1 else y4


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1, *, position_ids: torch.Tensor | None = None,
                         inplace: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' `apply_rotary_pos_emb`, fused, by default in place on q and k.

    q, k: (B, heads, S, D) with unsqueeze_dim=1 (HF's attention layout), or (B, S, heads, D) with
        unsqueeze_dim=2; any strides with a unit last one (q_proj(x).view(...).transpose(1, 2) as is); q and k
        may have different head counts (GQA). float32/float16/bfloat16.
    cos, sin: the rotary embedding module's output, (B or 1, S, Dr); Dr = D, or less for a partial rotary
        embedding (the first Dr features rotate, the rest pass through). With `position_ids` (B or 1, S),
        cos/sin are instead a (positions, Dr) table indexed per token (e.g. a cos/sin cache; packed sequences
        pass their restarted positions).
    inplace: rotate q and k where they are and return them (see the module docstring for autograd);
        False returns new tensors and leaves q and k unchanged. When cos/sin have a wider dtype than q/k (fp32
        cos with bf16 q), the result takes the promoted dtype as transformers' does, in a new tensor.
    Returns (q_embed, k_embed), differentiable in q and k (cos/sin get no gradient; passing ones that require
    grad raises).
    """
    return (_rope("q", q, cos, sin, unsqueeze_dim, position_ids, inplace),
            _rope("k", k, cos, sin, unsqueeze_dim, position_ids, inplace))
