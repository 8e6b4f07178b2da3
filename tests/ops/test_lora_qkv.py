"""qpeft.lora_qkv (LoraQKVFunction): q/k/v projections with LoRA as one autograd node, against qpeft.lora_linear per
projection and an fp64 oracle: outputs and the gradients of x and every A, B within the 2x rule, dense and NF4
bases, GQA out features, dropout per projection, a projection without adapter, unused outputs, and RoPE rotating
the outputs in place afterwards."""
from __future__ import annotations

import pytest
import torch

import qpeft
from qpeft.autograd.lora_qkv import LoraProjection, lora_qkv
from qpeft.modules.lora_linear import LoraLinear
from qpeft.modules.qlinear_nf4 import QLinearNF4
from qpeft.reference.lora import lora_dropout_keep_ref
from utils import DTYPES, assert_close_2x, requires_triton_runtime, triton_device, triton_dtypes

K, HEAD = 64, 16
OUT = (4 * HEAD, 2 * HEAD, 2 * HEAD)  # GQA: 4 query heads, 2 key/value heads
RANKS, SCALES = (8, 4, 6), (2.0, 1.0, 0.5)


def _projections(dtype, nf4, dropout=(0.0, 0.0, 0.0), device="cpu", lora=(True, True, True), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(OUT):
        lin = torch.nn.Linear(K, n, bias=i == 2)  # a bias on v (Qwen2 has them on q, k, v)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, K, generator=g) / K ** 0.5)
            if lin.bias is not None:
                lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
        base = (QLinearNF4.from_linear(lin, compute_dtype=dtype) if nf4 else lin.to(dtype)).to(device)
        base.requires_grad_(False)
        r = RANKS[i]
        A = (torch.randn(r, K, generator=g) / K ** 0.5).to(device) if lora[i] else None
        B = (torch.randn(n, r, generator=g) / r ** 0.5).to(device) if lora[i] else None
        out.append((base, A, B, SCALES[i], dropout[i], torch.tensor([200 + i], dtype=torch.int64, device=device)))
    return out


def _fused(projs):
    def fn(x, As, Bs):
        ps = [LoraProjection(b, A, B, s, dropout_p=p, seed=sd) for (b, _, _, s, p, sd), A, B in zip(projs, As, Bs)]
        return lora_qkv(x, *ps, training=True)
    return fn


def _unfused(projs):
    def fn(x, As, Bs):
        return tuple(qpeft.lora_linear(x, b, A, B, s, dropout_p=p, training=True, seed=sd) if A is not None else b(x)
                     for (b, _, _, s, p, sd), A, B in zip(projs, As, Bs))
    return fn


def _oracle(projs):
    def fn(x, As, Bs):
        outs = []
        for (base, _, _, s, p, sd), A, B in zip(projs, As, Bs):
            W = (base.dequantize(torch.float32) if isinstance(base, QLinearNF4) else base.weight.float()).double()
            y = x @ W.t() + (base.bias.double() if base.bias is not None else 0.0)
            if A is not None:
                xin = x.reshape(-1, K)
                if p > 0:
                    keep = lora_dropout_keep_ref(sd, xin.shape[0], K, p)
                    xin = torch.where(keep, xin / (1 - p), torch.zeros((), dtype=xin.dtype))
                y = y + s * (xin @ A.double().t() @ B.double().t()).reshape(y.shape)
            outs.append(y)
        return tuple(outs)
    return fn


def _run(fn, x, As, Bs, dys):
    x = x.detach().clone().requires_grad_(True)
    As = [a.detach().clone().requires_grad_(True) if a is not None else None for a in As]
    Bs = [b.detach().clone().requires_grad_(True) if b is not None else None for b in Bs]
    outs = fn(x, As, Bs)
    leaves = [x, *(a for a in As if a is not None), *(b for b in Bs if b is not None)]
    grads = torch.autograd.grad(outs, leaves, [d.to(o.dtype) for d, o in zip(dys, outs)])
    return (*(o.detach() for o in outs), *grads)


def _check(dtype, nf4, dropout=(0.0, 0.0, 0.0), device="cpu", lora=(True, True, True), lead=(2, 5)):
    projs = _projections(dtype, nf4, dropout, device, lora)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(*lead, K, generator=g).to(device, dtype)
    dys = [torch.randn(*lead, n, generator=g).to(device) for n in OUT]
    As, Bs = [p[1] for p in projs], [p[2] for p in projs]
    ours = _run(_fused(projs), x, As, Bs, dys)
    base = _run(_unfused(projs), x, As, Bs, dys)
    d64 = lambda ts: [t.double() if t is not None else None for t in ts]  # noqa: E731
    oracle = _run(_oracle(projs), x.double(), d64(As), d64(Bs), d64(dys))
    names = ["q", "k", "v", "dx"] + [f"dA{i}" for i in range(sum(lora))] + [f"dB{i}" for i in range(sum(lora))]
    assert len(ours) == len(names)
    for name, o, b, e in zip(names, ours, base, oracle):
        assert o.dtype == b.dtype and o.shape == b.shape, name
        assert_close_2x(o, e, b, 2.0, eps=1e-6 * max(1.0, e.abs().max().item()),
                        what=f"{name} ({dtype}, nf4={nf4}, p={dropout}, lora={lora})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nf4", [False, True])
def test_matches_unfused_lora_layers(dtype, nf4):
    _check(dtype, nf4)


@pytest.mark.parametrize("nf4", [False, True])
def test_dropout_per_projection_and_missing_adapter(nf4):
    _check(torch.float32, nf4, dropout=(0.1, 0.0, 0.2))
    _check(torch.float16, nf4, dropout=(0.0, 0.0, 0.3), lora=(True, False, True))  # PEFT's default: q, v only


def test_unused_output_and_frozen_adapters():
    projs = _projections(torch.float32, True)
    ps = [LoraProjection(b, A, B, s) for b, A, B, s, _, _ in projs]
    x = torch.randn(7, K, requires_grad=True)
    q, k, v = lora_qkv(x, *ps)
    (dx,) = torch.autograd.grad(q.sum() + 2 * k.sum(), x)  # v unused: no gradient pass for it
    x64 = x.detach().double().requires_grad_()
    q64, k64, _ = _oracle(projs)(x64, [p[1] for p in projs], [p[2] for p in projs])
    (dx64,) = torch.autograd.grad(q64.sum() + 2 * k64.sum(), x64)
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-5, atol=1e-5)


def test_rope_in_place_on_the_outputs():
    # the attention pattern: view q/k as (B, heads, S, D) and rotate them in place; gradients stay right
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    projs = _projections(torch.float32, False)
    ps = [LoraProjection(b, A.clone().requires_grad_(), B.clone().requires_grad_(), s) for b, A, B, s, _, _ in projs]
    B_, S = 2, 5
    x = torch.randn(B_, S, K)
    ang = torch.randn(B_, S, HEAD // 2)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def attn(rope):
        q, k, v = lora_qkv(x, *ps)
        q = q.view(B_, S, 4, HEAD).transpose(1, 2)
        k = k.view(B_, S, 2, HEAD).transpose(1, 2)
        q, k = rope(q, k, cos, sin)
        return (q[:, ::2] @ k.transpose(-1, -2)).square().sum() + v.square().sum()

    params = [t for p in ps for t in (p.A, p.B)]
    got = torch.autograd.grad(attn(qpeft.apply_rotary_pos_emb), params)
    want = torch.autograd.grad(attn(apply_rotary_pos_emb), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_from_lora_linear_modules_equals_the_modules():
    torch.manual_seed(0)
    mods = [LoraLinear(QLinearNF4.from_linear(torch.nn.Linear(K, n), compute_dtype=torch.float32), r=r,
                       lora_alpha=r, lora_dropout=0.1, init=False).train() for n, r in zip(OUT, RANKS)]
    x = torch.randn(3, K)
    torch.manual_seed(4)
    got = lora_qkv(x, *mods, training=True)
    torch.manual_seed(4)
    want = [m(x) for m in mods]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compile_fullgraph():
    torch._dynamo.reset()
    projs = _projections(torch.float32, True, dropout=(0.1, 0.0, 0.0))
    fn = _fused(projs)
    x = torch.randn(6, K)
    dys = [torch.randn(6, n) for n in OUT]
    As, Bs = [p[1] for p in projs], [p[2] for p in projs]
    eager = _run(fn, x, As, Bs, dys)
    comp = _run(torch.compile(fn, fullgraph=True, backend="aot_eager"), x, As, Bs, dys)
    for a, b in zip(eager, comp):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch._dynamo.reset()


def test_bad_input_names_the_argument():
    projs = _projections(torch.float32, False)
    ps = [LoraProjection(b, A, B, s) for b, A, B, s, _, _ in projs]
    x = torch.randn(3, K)
    with pytest.raises(ValueError, match=r"k.B must have shape \(32, 4\)"):
        lora_qkv(x, ps[0], ps[1]._replace(B=torch.randn(32, 5)), ps[2])
    with pytest.raises(ValueError, match="v: x has 64 features but the base weight has shape"):
        lora_qkv(x, ps[0], ps[1], ps[2]._replace(base=torch.randn(32, 63)))
    with pytest.raises(ValueError, match=r"v.bias must have shape \(32,\)"):
        lora_qkv(x, ps[0], ps[1], ps[2]._replace(bias=torch.randn(31)))
    with pytest.raises(TypeError, match="x must be"):
        lora_qkv(x.long(), *ps)
    with pytest.raises(ValueError, match="q, k and v must compute in one dtype"):
        lora_qkv(x, ps[0]._replace(base=ps[0].base.weight.bfloat16()), ps[1], ps[2])


@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("nf4", [False, True])
def test_triton_matches_unfused(dtype, nf4):
    _check(dtype, nf4, dropout=(0.1, 0.0, 0.0), device=triton_device(), lora=(True, False, True), lead=(7,))
