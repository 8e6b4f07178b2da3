"""qpeft.lora_mlp (LoraMLPFunction): the gated MLP with LoRA on gate/up/down as one autograd node, against the
unfused composition of qpeft's LoRA layers (qpeft.lora_linear / LoraLinear + the activation) and an fp64 oracle:
output and the gradients of x and of every A, B within the 2x rule, dense and NF4 bases, dropout per projection
(the masks of the unfused path, seed for seed), SwiGLU and both GeGLUs; what it saves for backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qpeft
from qpeft.autograd.lora_mlp import LoraProjection, lora_mlp
from qpeft.modules.lora_linear import LoraLinear
from qpeft.modules.qlinear_nf4 import QLinearNF4
from qpeft.reference.lora import lora_dropout_keep_ref
from qpeft.reference.swiglu import act_ref
from utils import DTYPES, assert_close_2x, requires_triton_runtime, triton_device, triton_dtypes

H, I = 48, 80
RANKS, SCALES = (4, 8, 6), (2.0, 0.5, 1.5)
ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def _projections(dtype, nf4, dropout=(0.0, 0.0, 0.0), device="cpu", bias=False, seed=0):
    """[(base, A, B, scale, bias, p, seed_tensor)] for gate, up, down; bases dense (dtype) or QLinearNF4."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (k, n) in enumerate(((H, I), (H, I), (I, H))):
        lin = torch.nn.Linear(k, n, bias=bias)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(n, k, generator=g) / k ** 0.5)
            if bias:
                lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
        base = (QLinearNF4.from_linear(lin, compute_dtype=dtype) if nf4 else lin.to(dtype)).to(device)
        base.requires_grad_(False)
        r = RANKS[i]
        A = (torch.randn(r, k, generator=g) / k ** 0.5).to(device)
        B = (torch.randn(n, r, generator=g) / r ** 0.5).to(device)  # nonzero: the adapter contributes
        out.append((base, A, B, SCALES[i], dropout[i], torch.tensor([100 + i], dtype=torch.int64, device=device)))
    return out


def _dense_w(base) -> torch.Tensor:
    return base.dequantize(torch.float32) if isinstance(base, QLinearNF4) else base.weight.float()


def _fused(projs, act, training=True):
    def fn(x, As, Bs):
        ps = [LoraProjection(b, A, B, s, dropout_p=p, seed=sd) for (b, _, _, s, p, sd), A, B in zip(projs, As, Bs)]
        return lora_mlp(x, *ps, activation=act, training=training)
    return fn


def _unfused(projs, act, training=True):
    """qpeft.lora_linear per projection + ACT2FN, in the activation dtype (the 2x rule's baseline)."""
    from transformers.activations import ACT2FN

    def fn(x, As, Bs):
        def proj(i, inp):
            base, _, _, s, p, sd = projs[i]
            return qpeft.lora_linear(inp, base, As[i], Bs[i], s, dropout_p=p, training=training, seed=sd)
        return proj(2, ACT2FN[act](proj(0, x)) * proj(1, x))
    return fn


def _oracle(projs, act, training=True):
    """fp64 plain PyTorch with the same dropout masks (regenerated from the seeds)."""
    def fn(x, As, Bs):
        def proj(i, inp):
            base, _, _, s, p, sd = projs[i]
            W = _dense_w(base).double()
            bias = getattr(base, "bias", None)
            y = inp @ W.t() + (bias.double() if bias is not None else 0.0)
            xin = inp.reshape(-1, inp.shape[-1])
            if training and p > 0:
                keep = lora_dropout_keep_ref(sd, xin.shape[0], xin.shape[1], p)
                xin = torch.where(keep, xin / (1 - p), torch.zeros((), dtype=xin.dtype))
            return y + s * (xin @ As[i].double().t() @ Bs[i].double().t()).reshape(y.shape)
        h = act_ref(proj(0, x), ACTS[act]) * proj(1, x)
        return proj(2, h)
    return fn


def _run(fn, x, As, Bs, dy):
    x = x.detach().clone().requires_grad_(True)
    As = [a.detach().clone().requires_grad_(True) for a in As]
    Bs = [b.detach().clone().requires_grad_(True) for b in Bs]
    y = fn(x, As, Bs)
    grads = torch.autograd.grad(y, [x, *As, *Bs], dy.to(y.dtype))
    return (y.detach(), *grads)


NAMES = ["y", "dx", "dA_gate", "dA_up", "dA_down", "dB_gate", "dB_up", "dB_down"]


def _check(dtype, nf4, act="silu", dropout=(0.0, 0.0, 0.0), device="cpu", lead=(2, 7), bias=False):
    projs = _projections(dtype, nf4, dropout, device, bias)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*lead, H, generator=g).to(device, dtype)
    dy = torch.randn(*lead, H, generator=g).to(device)
    As, Bs = [p[1] for p in projs], [p[2] for p in projs]
    ours = _run(_fused(projs, act), x, As, Bs, dy)
    base = _run(_unfused(projs, act), x, As, Bs, dy)
    oracle = _run(_oracle(projs, act), x.double(), [a.double() for a in As], [b.double() for b in Bs], dy.double())
    for name, o, b, e in zip(NAMES, ours, base, oracle):
        assert o.dtype == b.dtype and o.shape == b.shape, name
        assert_close_2x(o, e, b, 2.0, eps=1e-6 * max(1.0, e.abs().max().item()),
                        what=f"{name} ({dtype}, nf4={nf4}, {act}, p={dropout})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nf4", [False, True])
def test_matches_unfused_lora_layers(dtype, nf4):
    _check(dtype, nf4)


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu"])
def test_geglu(act):
    _check(torch.bfloat16, True, act)
    _check(torch.float32, False, act, lead=(5,))


@pytest.mark.parametrize("nf4", [False, True])
def test_dropout_per_projection(nf4):
    # different p per projection (one without): each mask equals the unfused layer's, seed for seed
    _check(torch.float32, nf4, dropout=(0.1, 0.0, 0.3))
    _check(torch.float16, nf4, dropout=(0.2, 0.25, 0.0))


def test_bias_and_projection_without_adapter():
    projs = _projections(torch.float32, False, bias=True)
    x, dy = torch.randn(6, H), torch.randn(6, H)
    gate = LoraProjection(projs[0][0])  # no adapter on gate
    up = LoraProjection(projs[1][0], projs[1][1], projs[1][2], 0.5)
    down = LoraProjection(projs[2][0].weight, projs[2][1], projs[2][2], 2.0, bias=projs[2][0].bias)
    xr = x.clone().requires_grad_()
    y = lora_mlp(xr, gate, up, down)
    want = projs[2][0](F.silu(projs[0][0](x)) * (projs[1][0](x) + 0.5 * (x @ projs[1][1].t()) @ projs[1][2].t()))
    h = F.silu(projs[0][0](x)) * (projs[1][0](x) + 0.5 * (x @ projs[1][1].t()) @ projs[1][2].t())
    want = want + 2.0 * (h @ projs[2][1].t()) @ projs[2][2].t()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    (dx,) = torch.autograd.grad(y, xr, dy)
    xr2 = x.clone().requires_grad_()
    h2 = F.silu(projs[0][0](xr2)) * (projs[1][0](xr2) + 0.5 * (xr2 @ projs[1][1].t()) @ projs[1][2].t())
    y2 = projs[2][0](h2) + 2.0 * (h2 @ projs[2][1].t()) @ projs[2][2].t()
    torch.testing.assert_close(dx, torch.autograd.grad(y2, xr2, dy)[0], rtol=1e-5, atol=1e-5)


def test_from_lora_linear_modules_equals_the_modules():
    # LoraLinear modules as given (what a model holds), training with dropout: same RNG draws, same masks
    from transformers.activations import ACT2FN

    torch.manual_seed(0)
    mods = [LoraLinear(QLinearNF4.from_linear(torch.nn.Linear(k, n), compute_dtype=torch.float32), r=r,
                       lora_alpha=2 * r, lora_dropout=p, init=False).train()
            for (k, n), r, p in zip(((H, I), (H, I), (I, H)), RANKS, (0.1, 0.1, 0.2))]
    x = torch.randn(3, 5, H)
    torch.manual_seed(7)
    y = lora_mlp(x, *mods, training=True)
    torch.manual_seed(7)
    want = mods[2](ACT2FN["silu"](mods[0](x)) * mods[1](x))
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    params = [p for m in mods for p in m.parameters() if p.requires_grad]
    torch.manual_seed(7)
    g1 = torch.autograd.grad(lora_mlp(x, *mods, training=True).square().sum(), params)
    torch.manual_seed(7)
    g2 = torch.autograd.grad(mods[2](ACT2FN["silu"](mods[0](x)) * mods[1](x)).square().sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_saved_tensors_vs_unfused():
    """Saved per token: x + g + u (+ fp32 xa's) instead of x + g + act(g) + u + h (qpeft's LoraLinear) and, under
    PEFT's dropout, also its dropped copies of x (gate, up) and of h (down) with their masks."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    from transformers.activations import ACT2FN
    from transformers.models.llama.modeling_llama import LlamaMLP

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        # per-token tensors only (weights and adapters are per layer, not per token)
        return sum(v for (_, _, shape), v in seen.items() if len(shape) == 2 and shape[0] == M)

    M = 64
    projs = _projections(torch.bfloat16, False, dropout=(0.1, 0.1, 0.1))
    x = torch.randn(M, H, dtype=torch.bfloat16, requires_grad=True)
    mods = []
    for base, A, B, s, p, _ in projs:
        m = LoraLinear(base, r=A.shape[0], lora_alpha=s * A.shape[0], lora_dropout=p).train()
        with torch.no_grad():
            m.lora_A["default"].weight.copy_(A)
            m.lora_B["default"].weight.copy_(B)
        mods.append(m)
    fused = saved_bytes(lambda: lora_mlp(x, *mods, training=True))
    assert fused == M * (H + 2 * I) * 2 + M * sum(RANKS) * 4  # x, g, u in bf16; the three xa's in fp32
    unfused = saved_bytes(lambda: mods[2](ACT2FN["silu"](mods[0](x)) * mods[1](x)))
    assert unfused - fused >= M * 2 * I * 2  # act(g) and h
    mlp = LlamaMLP(LlamaConfig(hidden_size=H, intermediate_size=I, num_attention_heads=4, hidden_act="silu"))
    mlp = mlp.to(torch.bfloat16)
    peft = get_peft_model(mlp, LoraConfig(target_modules=["gate_proj", "up_proj", "down_proj"], r=8,
                                          lora_dropout=0.1)).train()
    peft_bytes = saved_bytes(lambda: peft(x))
    assert peft_bytes - fused >= M * (2 * I + 2 * H + I) * 2  # act(g), h, dropped x twice, dropped h


def test_frozen_adapters_give_dx_only():
    projs = _projections(torch.float32, True)
    ps = [LoraProjection(b, A, B, s) for b, A, B, s, _, _ in projs]
    x = torch.randn(4, H, requires_grad=True)
    y = lora_mlp(x, *ps)
    (dx,) = torch.autograd.grad(y.sum(), x)
    oracle = _oracle(projs, "silu", training=False)
    x64 = x.detach().double().requires_grad_()
    (dx64,) = torch.autograd.grad(oracle(x64, [p[1] for p in projs], [p[2] for p in projs]).sum(), x64)
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-4, atol=1e-5)


def test_compile_fullgraph():
    torch._dynamo.reset()
    projs = _projections(torch.float32, True, dropout=(0.1, 0.0, 0.2))
    fn = _fused(projs, "silu")
    x, dy = torch.randn(5, H), torch.randn(5, H)
    As, Bs = [p[1] for p in projs], [p[2] for p in projs]
    eager = _run(fn, x, As, Bs, dy)
    comp = _run(torch.compile(fn, fullgraph=True, backend="aot_eager"), x, As, Bs, dy)
    for a, b in zip(eager, comp):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch._dynamo.reset()


def test_bad_input_names_the_argument():
    projs = _projections(torch.float32, False)
    ps = [LoraProjection(b, A, B, s) for b, A, B, s, _, _ in projs]
    x = torch.randn(3, H)
    with pytest.raises(ValueError, match="activation"):
        lora_mlp(x, *ps, activation="relu")
    with pytest.raises(ValueError, match=r"down.A must have shape \(r, 80\)"):
        lora_mlp(x, ps[0], ps[1], ps[2]._replace(A=torch.randn(6, H)))
    with pytest.raises(ValueError, match=r"up.B must have shape"):
        lora_mlp(x, ps[0], ps[1]._replace(B=torch.randn(I, 3)), ps[2])
    with pytest.raises(ValueError, match="gate: x has 47 features"):
        lora_mlp(torch.randn(3, 47), *ps)
    with pytest.raises(ValueError, match="compute in one dtype"):
        lora_mlp(x, ps[0]._replace(base=ps[0].base.weight.half()), ps[1], ps[2])
    with pytest.raises(ValueError, match="gate.dropout_p"):
        lora_mlp(x, ps[0]._replace(dropout_p=1.0), ps[1], ps[2])
    with pytest.raises(ValueError, match="gate: A and B must be given together"):
        lora_mlp(x, ps[0]._replace(B=None), ps[1], ps[2])
    with pytest.raises(ValueError, match="must be frozen"):
        lora_mlp(x, ps[0]._replace(base=ps[0].base.weight.clone().requires_grad_()), ps[1], ps[2])
    with pytest.raises(TypeError, match="down must be a LoraProjection or a module"):
        lora_mlp(x, ps[0], ps[1], "down_proj")
    with pytest.raises(ValueError, match="gate.seed"):
        lora_mlp(x, ps[0]._replace(dropout_p=0.1, seed=torch.tensor([1.0])), ps[1], ps[2], training=True)


# ------------------------------------------------------------------------------------------ Triton kernels
@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("nf4", [False, True])
def test_triton_matches_unfused(dtype, nf4):
    _check(dtype, nf4, "silu", dropout=(0.1, 0.0, 0.2), device=triton_device(), lead=(9,))


def test_peft_lora_on_bitsandbytes_4bit():
    """After get_peft_model on a bitsandbytes Linear4bit MLP: the PEFT layers' tensors as LoraProjections give
    PEFT's output and adapter gradients (K a multiple of the blocksize: bitsandbytes 0.50.2's CPU dequantize
    misplaces blocks that straddle rows, which qpeft's kernels do not)."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    Hh, Ii = 64, 128
    mlp = LlamaMLP(LlamaConfig(hidden_size=Hh, intermediate_size=Ii, num_attention_heads=4, hidden_act="silu"))
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(mlp, name)
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                              compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
        setattr(mlp, name, q.to("cpu"))
    model = get_peft_model(mlp, LoraConfig(target_modules=["gate_proj", "up_proj", "down_proj"], r=4,
                                           lora_alpha=8, init_lora_weights=False))
    inner = model.base_model.model

    def proj(layer):
        base = layer.base_layer
        return LoraProjection((base.weight, base.weight.quant_state), layer.lora_A["default"].weight,
                              layer.lora_B["default"].weight, layer.scaling["default"], bias=base.bias)

    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(2, 5, Hh)
    y = lora_mlp(x, proj(inner.gate_proj), proj(inner.up_proj), proj(inner.down_proj))
    want = model(x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(y.square().sum(), params), torch.autograd.grad(want.square().sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
