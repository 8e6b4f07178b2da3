"""L3: `LoraMLPFunction`, the gated MLP block with LoRA on all three projections, and the public `lora_mlp`.

    y = down( act(gate(x)) * up(x) )        each projection: frozen dense or NF4 base + bias + LoRA (r, scale,
                                            dropout of its own), act = SiLU (SwiGLU) or GELU tanh / erf (GeGLU)

One autograd node for the whole block, composed of the qpeft:: ops (nf4_matmul / lora_linear with the LoRA
epilogue, lora_xa, lora_grad, glu, glu_backward, nf4_matmul_dx / lora_linear_dx).

Forward: xa_g, xa_u = drop(x) A^T for gate and up in one pass over x (both without dropout: A's stacked);
g = gate(x), u = up(x) with the adapter in the base GEMM's epilogue; h = act(g) * u (qpeft::glu);
xa_d = drop(h) A_d^T; y = down(h) + epilogue.
Saved for backward (per token, H = hidden, I = intermediate, r's the ranks, b the activation's bytes):
    x (H b), g and u (2 I b), xa_g / xa_u / xa_d (fp32, 4 (r_g + r_u + r_d)) and the int64 dropout seeds;
    recomputed: h = act(g) * u (one elementwise pass, needed for dA_d) and every dropout mask.
The unfused PEFT path (LoraLinear / peft LoRA on gate/up/down, act_fn, mul) saves x, g, act(g), u and h:
H + 4 I values, plus the dropout outputs (x twice, h once) and their masks when lora_dropout > 0. The saving is
2 I b per token per layer without dropout (Llama-3-8B, I = 14,336, bf16: 56 KiB per token per layer, 14.7 GiB
at 8k tokens x 32 layers), and with PEFT's dropout also its dropped copies of x (twice) and of h and their masks
(tests/ops/test_lora_mlp.py::test_saved_tensors_vs_unfused counts them).
Backward: h recomputed; dh = dy W_d + s_d drop'(dy B_d A_d); dg, du = qpeft::glu_backward(dh, g, u);
dx = dg W_g + du W_u + the adapters' terms (summed in fp32, rounded once); dA, dB of all three in fp32
(qpeft::lora_grad), cast to A/B's dtype.
"""
from __future__ import annotations

import torch

from ..ops import swiglu as _glu_ops  # noqa: F401  (registers qpeft::glu*)
from ..reference.swiglu import glu_activation_name
from . import _lora_projection as lp
from ._lora_projection import LoraProjection

__all__ = ["lora_mlp", "LoraMLPFunction", "LoraProjection"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _nf4_ops():
    from ..ops import nf4_matmul  # noqa: F401  (registers qpeft::nf4_matmul*)


class LoraMLPFunction(torch.autograd.Function):
    """forward(x2d (M, H) contiguous, activation (canonical), metas (3 lp.Resolved metadata with tensors=()),
    *tensors (3 x lp.N_TENSORS, in lp.TENSORS order for gate, up, down)) -> y (M, H)."""

    @staticmethod
    def forward(ctx, x2d, activation: str, metas, *tensors):
        n = lp.N_TENSORS
        t = [tensors[i * n:(i + 1) * n] for i in range(3)]
        (tg, tu, td), (mg, mu, md) = t, metas
        xa_g, xa_u = lp.shrink(x2d, [(tg, mg), (tu, mu)])
        g = lp.forward(x2d, tg, mg, xa_g)
        u = lp.forward(x2d, tu, mu, xa_u)
        h = torch.ops.qpeft.glu(g, u, activation)
        xa_d = lp.shrink(h, [(td, md)])[0]
        y = lp.forward(h, td, md, xa_d)
        ctx.save_for_backward(x2d, g, u, xa_g, xa_u, xa_d, *tensors)
        ctx.activation, ctx.metas = activation, metas
        return y

    @staticmethod
    def backward(ctx, dy):
        x2d, g, u, xa_g, xa_u, xa_d, *tensors = ctx.saved_tensors
        n = lp.N_TENSORS
        t = [tuple(tensors[i * n:(i + 1) * n]) for i in range(3)]
        need = ctx.needs_input_grad
        need_t = [need[3 + i * n:3 + (i + 1) * n] for i in range(3)]  # per projection, in lp.TENSORS order
        mg, mu, md = ctx.metas
        grads = [[None] * n for _ in range(3)]
        dy = dy.contiguous()

        def adapter(i, dout, inp, meta, xa):
            """dyb of projection i (None without adapter), storing its dA / dB / dbias."""
            if meta.has_lora:
                need_ab = need_t[i][lp.I_A] or need_t[i][lp.I_B]
                dyb, dA, dB = lp.lora_grads(dout, inp, t[i], meta, xa, need_ab)
                if need_t[i][lp.I_A]:
                    grads[i][lp.I_A] = dA.to(t[i][lp.I_A].dtype)
                if need_t[i][lp.I_B]:
                    grads[i][lp.I_B] = dB.to(t[i][lp.I_B].dtype)
            else:
                dyb = None
            if t[i][lp.I_BIAS] is not None and need_t[i][lp.I_BIAS]:
                grads[i][lp.I_BIAS] = dout.sum(0, dtype=torch.float32).to(t[i][lp.I_BIAS].dtype)
            return dyb

        h = torch.ops.qpeft.glu(g, u, ctx.activation)  # recomputed, never saved
        dyb_d = adapter(2, dy, h, md, xa_d)
        del h
        dh = lp.input_grad(dy, t[2], md, dyb_d)
        dg, du = torch.ops.qpeft.glu_backward(dh, g, u, ctx.activation)
        del dh
        dyb_g = adapter(0, dg, x2d, mg, xa_g)
        dyb_u = adapter(1, du, x2d, mu, xa_u)
        dx = None
        if need[0]:
            dx = lp.accumulate(lp.accumulate(None, lp.input_grad(dg, t[0], mg, dyb_g)),
                               lp.input_grad(du, t[1], mu, dyb_u)).to(x2d.dtype)
        return (dx, None, None, *grads[0], *grads[1], *grads[2])


def lora_mlp(x: torch.Tensor, gate, up, down, activation: str = "silu", *, training: bool = False) -> torch.Tensor:
    """The gated MLP with LoRA, fused into one autograd node: down(act(gate(x)) * up(x)).

    x: (..., H) float32/float16/bfloat16, any strides.
    gate, up: projections H -> I; down: I -> H. Each a `LoraProjection` (base dense / nn.Linear / QLinearNF4 /
        (packed, QuantState), optional A/B, scale, bias, dropout_p, seed) or a module taken as it computes:
        nn.Linear, QLinearNF4, or qpeft's LoraLinear (its active adapters; see LoraProjection.from_module).
    activation: an HF activation name: "silu" / "swish" (SwiGLU: Llama, Mistral, Qwen2, Qwen3),
        "gelu_pytorch_tanh" (GeGLU, Gemma 2/3), "gelu" (exact erf).
    training: apply each adapter's dropout (the modules' .training is not consulted).
    The block computes in the projections' dtype as their modules would (dense weight dtype; QLinearNF4's
    compute_dtype; the autocast dtype under autocast), which must agree for all three; the result is returned in
    x's dtype (the autocast dtype under autocast). Gradients: x, and every A, B (and bias) that requires grad.
    """
    name = glu_activation_name(activation)
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS:
        raise TypeError(f"x must be a float32/float16/bfloat16 tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the features)")
    projs = [lp.as_projection(n, p) for n, p in (("gate", gate), ("up", up), ("down", down))]
    dtypes = {n: lp.compute_dtype(n, p, x) for n, p in zip(("gate", "up", "down"), projs)}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"gate, up and down must compute in one dtype, got {dtypes}")
    dt = dtypes["gate"]
    out_dtype = dt if torch.is_autocast_enabled(x.device.type) else x.dtype
    H = x.shape[-1]
    x2d = x.reshape(-1, H).to(dt).contiguous()
    if any(not isinstance(p.base, (torch.Tensor, torch.nn.Linear)) for p in projs):
        _nf4_ops()
    mg = lp.resolve("gate", projs[0], x2d, training)
    mu = lp.resolve("up", projs[1], x2d, training)
    if mg.N != mu.N:
        raise ValueError(f"gate and up must have one output size, got {mg.N} and {mu.N}")
    h_probe = x2d.new_empty((0, mg.N))  # down's input: (M, I) in the compute dtype
    md = lp.resolve("down", projs[2], h_probe, training)
    if md.N != H:
        raise ValueError(f"down must project back to x's {H} features, got {md.N}")
    metas = tuple(m._replace(tensors=()) for m in (mg, mu, md))
    y = LoraMLPFunction.apply(x2d, name, metas, *mg.tensors, *mu.tensors, *md.tensors)
    return y.to(out_dtype).reshape(*x.shape[:-1], H)
