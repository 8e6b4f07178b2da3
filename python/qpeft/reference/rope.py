"""Pure-PyTorch rotary position embedding (RoPE): the CPU path, the fallback and the oracle of the Triton kernel.

transformers' `apply_rotary_pos_emb` (rotate_half layout) on one tensor x (B, S, H, D), with cos/sin the rotary
embedding module's output for every token (every rope scaling type, attention_scaling included, is already in
them), rotating the first Dr = cos.shape[-1] features (Dr even, <= D; the rest passes through, as the partial-
rotary families do), h = Dr / 2:
    forward:  out[:h] = x[:h] cos[:h] - x[h:Dr] sin[:h]         out[h:Dr] = x[h:Dr] cos[h:Dr] + x[:h] sin[h:Dr]
    backward: the transpose of that linear map (also right when cos^2 + sin^2 != 1, i.e. with attention_scaling):
              dx[:h] = g[:h] cos[:h] + g[h:Dr] sin[h:Dr]        dx[h:Dr] = g[h:Dr] cos[h:Dr] - g[:h] sin[:h]
cos/sin per token: (Bc, S, Dr) with Bc 1 or B (HF's (batch, seq, head_dim) output; packed sequences just carry
their restarted positions in it); or, with position_ids (Bp, S) integer (Bp 1 or B), a table (P, Dr) indexed by
position (a cos/sin cache). Math in fp32, rounded once to x's dtype (HF rounds after each of its four ops).
"""
from __future__ import annotations

import torch

__all__ = ["rope_ref", "rope_cos_sin"]


def rope_cos_sin(cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None, B: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cos/sin as (B or 1, S, 1, Dr) fp32 (at least; fp64 stays fp64), broadcastable over the heads."""
    acc = torch.promote_types(cos.dtype, torch.float32)
    if position_ids is not None:
        cos, sin = cos[position_ids.long()], sin[position_ids.long()]  # (Bp, S, Dr); IndexError when out of range
    return cos.to(acc).unsqueeze(2), sin.to(acc).unsqueeze(2)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None,
             backward: bool) -> torch.Tensor:
    """A new tensor of x's shape and dtype: x rotated (backward=False) or the transposed rotation applied."""
    Dr = cos.shape[-1]
    h = Dr // 2
    c, s = rope_cos_sin(cos, sin, position_ids, x.shape[0])
    acc = torch.promote_types(x.dtype, c.dtype)
    x1, x2 = x[..., :h].to(acc), x[..., h:Dr].to(acc)
    c1, c2, s1, s2 = c[..., :h], c[..., h:], s[..., :h], s[..., h:]
    if backward:
        o1, o2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    else:
        o1, o2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
    return torch.cat([o1.to(x.dtype), o2.to(x.dtype), x[..., Dr:]], dim=-1)
