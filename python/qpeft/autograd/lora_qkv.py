"""L3: `LoraQKVFunction`, the attention input projections with LoRA as one autograd node, and `lora_qkv`.

    q, k, v = q_proj(x), k_proj(x), v_proj(x)       three frozen bases (dense or NF4; q/k/v may have different
                                                    out features: GQA), each with an optional LoRA adapter

Forward: the three LoRA shrinks xa = drop(x) A^T share one pass over x (the adapters without dropout, their
A's stacked along the rank; an adapter with dropout keeps its own mask and pass, as PEFT's separate dropout
modules do); then each base GEMM adds its adapter in the epilogue (qpeft::nf4_matmul / qpeft::lora_linear,
one weight per op, so each GEMM streams x itself).
Saved for backward: x once and the fp32 xa's (4 (r_q + r_k + r_v) bytes per token), the int64 seeds; q, k, v
are not saved (so RoPE may rotate them in place afterwards). The unfused PEFT path keeps the same x (and, with
lora_dropout > 0, three dropped copies of x plus masks).
Backward: for each of dq, dk, dv that is not None: dA, dB in fp32 (qpeft::lora_grad), and its share of
dx = dq W_q + dk W_k + dv W_v + the adapters' terms, summed in fp32 and rounded once (a transient fp32 (M, K)
buffer for 16-bit activations; autograd's sum of three separate layers rounds after each addition).
"""
from __future__ import annotations

import torch

from . import _lora_projection as lp
from ._lora_projection import LoraProjection

__all__ = ["lora_qkv", "LoraQKVFunction", "LoraProjection"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class LoraQKVFunction(torch.autograd.Function):
    """forward(x2d (M, K) contiguous, metas (3 lp.Resolved with tensors=()), *tensors (3 x lp.N_TENSORS))
    -> (q (M, N_q), k (M, N_k), v (M, N_v))."""

    @staticmethod
    def forward(ctx, x2d, metas, *tensors):
        n = lp.N_TENSORS
        t = [tensors[i * n:(i + 1) * n] for i in range(3)]
        xas = lp.shrink(x2d, list(zip(t, metas)))
        outs = tuple(lp.forward(x2d, ti, m, xa) for ti, m, xa in zip(t, metas, xas))
        ctx.save_for_backward(x2d, *xas, *tensors)
        ctx.metas = metas
        ctx.set_materialize_grads(False)  # an unused output (e.g. v) gets no gradient pass at all
        return outs

    @staticmethod
    def backward(ctx, *douts):
        x2d, *rest = ctx.saved_tensors
        xas, tensors = rest[:3], rest[3:]
        n = lp.N_TENSORS
        need = ctx.needs_input_grad
        grads = [[None] * n for _ in range(3)]
        dx = None
        for i, (dout, meta, xa) in enumerate(zip(douts, ctx.metas, xas)):
            if dout is None:
                continue
            dout = dout.contiguous()
            t = tuple(tensors[i * n:(i + 1) * n])
            need_t = need[2 + i * n:2 + (i + 1) * n]
            dyb = None
            if meta.has_lora:
                need_ab = need_t[lp.I_A] or need_t[lp.I_B]
                dyb, dA, dB = lp.lora_grads(dout, x2d, t, meta, xa, need_ab)
                if need_t[lp.I_A]:
                    grads[i][lp.I_A] = dA.to(t[lp.I_A].dtype)
                if need_t[lp.I_B]:
                    grads[i][lp.I_B] = dB.to(t[lp.I_B].dtype)
            if t[lp.I_BIAS] is not None and need_t[lp.I_BIAS]:
                grads[i][lp.I_BIAS] = dout.sum(0, dtype=torch.float32).to(t[lp.I_BIAS].dtype)
            if need[0]:
                dx = lp.accumulate(dx, lp.input_grad(dout, t, meta, dyb))
        if dx is not None:
            dx = dx.to(x2d.dtype)
        return (dx, None, *grads[0], *grads[1], *grads[2])


def lora_qkv(x: torch.Tensor, q, k, v, *, training: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q_proj(x), k_proj(x), v_proj(x) with their LoRA adapters, as one autograd node.

    x: (..., K) float32/float16/bfloat16, any strides.
    q, k, v: each a `LoraProjection` or a module (nn.Linear, QLinearNF4, qpeft LoraLinear; see
        LoraProjection.from_module); out features may differ (GQA); any of them may lack an adapter.
    training: apply each adapter's dropout.
    Computes in the projections' dtype as their modules would (must agree for all three); returns three tensors
    (..., N_q), (..., N_k), (..., N_v) in x's dtype (the autocast dtype under autocast). Gradients: x, and every
    A, B (and bias) that requires grad.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS:
        raise TypeError(f"x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the features)")
    names = ("q", "k", "v")
    projs = [lp.as_projection(n, p) for n, p in zip(names, (q, k, v))]
    dtypes = {n: lp.compute_dtype(n, p, x) for n, p in zip(names, projs)}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"q, k and v must compute in one dtype, got {dtypes}")
    dt = dtypes["q"]
    out_dtype = dt if torch.is_autocast_enabled(x.device.type) else x.dtype
    K = x.shape[-1]
    x2d = x.reshape(-1, K).to(dt).contiguous()
    if any(not isinstance(p.base, (torch.Tensor, torch.nn.Linear)) for p in projs):
        from ..ops import nf4_matmul  # noqa: F401  (registers qpeft::nf4_matmul*)
    resolved = [lp.resolve(n, p, x2d, training) for n, p in zip(names, projs)]
    metas = tuple(m._replace(tensors=()) for m in resolved)
    outs = LoraQKVFunction.apply(x2d, metas, *(t for m in resolved for t in m.tensors))
    lead = x.shape[:-1]
    return tuple(o.to(out_dtype).reshape(*lead, m.N) for o, m in zip(outs, resolved))
