"""Bottleneck adapters: reference, fused op (reference path + Triton under the interpreter), modules, insertion."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qpeft.tuners.bottleneck import (
    AdapterMergeError,
    BottleneckAdapter,
    add_bottleneck_adapters,
    bottleneck_adapter,
    bottleneck_state_dict,
    load_bottleneck_adapters,
    merge_bottleneck_adapters,
    remove_bottleneck_adapters,
    save_bottleneck_adapters,
)
from qpeft.reference.bottleneck import (activation_ref, bottleneck_adapter_backward_ref, bottleneck_adapter_ref)
from utils import (DTYPES, assert_close_2x, requires_triton_runtime, tiny_bert, tiny_llama, triton_device,
                   triton_dtypes)

ACTS = ["relu", "swish", "gelu", "gelu_new", "tanh", "identity"]
SHAPES = [(1, 16, 4), (37, 72, 20), (6, 130, 33)]  # (M, H, R): odd rows, H not a multiple of 64, odd R


def _params(M, H, R, dtype, device="cpu", bias=True):
    g = torch.Generator().manual_seed(M * 1000 + H * 10 + R)
    mk = lambda *s, std=1.0: (torch.randn(*s, generator=g) * std).to(device=device, dtype=dtype)  # noqa: E731
    return (mk(M, H), mk(R, H, std=H ** -0.5), mk(R, std=0.1) if bias else None, mk(H, R, std=R ** -0.5),
            mk(H, std=0.1) if bias else None)


def _unfused(x, wd, bd, wu, bu, act, scale):
    """Plain PyTorch modules in the inputs' dtype: the baseline of the 2x rule."""
    return x + scale * torch.nn.functional.linear(
        activation_ref(torch.nn.functional.linear(x, wd, bd), act), wu, bu)


def _grads(fn, x, wd, bd, wu, bu, dy):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, wd, bd, wu, bu)]
    y = fn(*leaves)
    y.backward(dy)
    return y.detach(), [t.grad for t in leaves if t is not None]


def _check_op(device, dtype, M, H, R, act, scale=0.7, bias=True, factor_y=2.0, factor_g=3.0):
    x, wd, bd, wu, bu = _params(M, H, R, dtype, device, bias)
    dy = torch.randn(M, H, device=device).to(dtype)
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    y64, g64 = _grads(lambda *a: _unfused(*a, act, scale), f64(x), f64(wd), f64(bd), f64(wu), f64(bu), dy.double())
    yt, gt = _grads(lambda *a: _unfused(*a, act, scale), x, wd, bd, wu, bu, dy)
    yk, gk = _grads(lambda *a: bottleneck_adapter(*a, activation=act, scale=scale), x, wd, bd, wu, bu, dy)
    assert yk.dtype == dtype
    assert_close_2x(yk, y64, yt, factor_y, what=f"y {act}")
    for name, a, b, c in zip(("dx", "dw_down", "db_down", "dw_up", "db_up"), gk, g64, gt):
        assert a.dtype == dtype and a.shape == b.shape
        assert_close_2x(a, b, c, factor_g, eps=1e-5, what=f"{name} {act}")


def test_reference_backward_matches_autograd():
    # the hand-written backward formulas (shared with the kernel) against autograd on the forward, in fp64
    for act in ACTS:
        x, wd, bd, wu, bu = (t.double() for t in _params(13, 24, 5, torch.float32))
        dy = torch.randn(13, 24, dtype=torch.float64)
        _, g = _grads(lambda *a: bottleneck_adapter_ref(*a, act, 0.5)[0], x, wd, bd, wu, bu, dy)
        _, h = bottleneck_adapter_ref(x, wd, bd, wu, bu, act, 0.5)
        mine = bottleneck_adapter_backward_ref(dy, x, h, wd, wu, act, 0.5)
        for a, b in zip(mine, g):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_op_reference_path(dtype, shape):
    for act in ("relu", "swish", "gelu"):
        _check_op("cpu", dtype, *shape, act)
    _check_op("cpu", dtype, *shape, "tanh", bias=False)


# every activation on the odd middle shape, every shape with two activations (the interpreter is slow)
TRITON_CASES = [(SHAPES[1], a) for a in ACTS] + [(s, a) for s in (SHAPES[0], SHAPES[2]) for a in ("relu", "gelu")]


@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("shape,act", TRITON_CASES)
def test_op_triton(dtype, shape, act):
    from qpeft import _backend

    assert _backend.select("bottleneck_adapter", torch.device(triton_device()), cuda=False) == "triton"
    _check_op(triton_device(), dtype, *shape, act, bias=act != "identity")


@pytest.mark.triton
@requires_triton_runtime
def test_triton_matches_reference_closely():
    # same fp32 math: the kernel and the reference agree to fp32 rounding (not only within the 2x rule)
    from qpeft.reference.bottleneck import activation_id
    from qpeft.triton_kernels.bottleneck import bottleneck_adapter_backward_triton, bottleneck_adapter_triton

    x, wd, bd, wu, bu = _params(37, 72, 20, torch.float32, triton_device())
    y, h = bottleneck_adapter_triton(x, wd, bd, wu, bu, activation_id("swish"), 0.7)
    yr, hr = bottleneck_adapter_ref(x, wd, bd, wu, bu, "swish", 0.7)
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, hr, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(x)
    for a, b in zip(bottleneck_adapter_backward_triton(dy, x, h, wd, wu, activation_id("swish"), 0.7),
                    bottleneck_adapter_backward_ref(dy, x, hr, wd, wu, "swish", 0.7)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_opcheck():
    x, wd, bd, wu, bu = _params(7, 24, 5, torch.float32)
    torch.library.opcheck(torch.ops.qpeft.bottleneck_adapter.default, (x, wd, bd, wu, bu, "relu", 1.0))
    torch.library.opcheck(torch.ops.qpeft.bottleneck_adapter.default, (x, wd, None, wu, None, "gelu", 0.5))
    _, h = bottleneck_adapter_ref(x, wd, bd, wu, bu, "relu", 1.0)
    torch.library.opcheck(torch.ops.qpeft.bottleneck_adapter_backward.default,
                          (torch.randn_like(x), x, h, wd, wu, "relu", 1.0))


@pytest.mark.triton
@requires_triton_runtime
def test_opcheck_triton():
    x, wd, bd, wu, bu = _params(19, 40, 6, torch.float16, triton_device())
    torch.library.opcheck(torch.ops.qpeft.bottleneck_adapter.default, (x, wd, bd, wu, bu, "swish", 0.5))
    _, h = bottleneck_adapter_ref(x, wd, bd, wu, bu, "swish", 0.5)
    torch.library.opcheck(torch.ops.qpeft.bottleneck_adapter_backward.default,
                          (torch.randn_like(x), x, h, wd, wu, "swish", 0.5))


def test_functional_non_contiguous_and_3d():
    x, wd, bd, wu, bu = _params(12, 24, 5, torch.float32)
    x3 = x.reshape(3, 4, 24).transpose(0, 1)  # non-contiguous (4, 3, 24)
    y = bottleneck_adapter(x3, wd, bd, wu, bu, "relu")
    ref = _unfused(x3.contiguous(), wd, bd, wu, bu, "relu", 1.0)
    torch.testing.assert_close(y, ref)


def test_functional_bad_input():
    x, wd, bd, wu, bu = _params(4, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="activation"):
        bottleneck_adapter(x, wd, bd, wu, bu, "softplusx")
    with pytest.raises(ValueError, match="w_up"):
        bottleneck_adapter(x, wd, bd, wu.t(), bu)
    with pytest.raises(ValueError, match="w_down"):
        bottleneck_adapter(x, wd[:, :8], bd, wu, bu)
    with pytest.raises(TypeError, match="w_down dtype"):
        bottleneck_adapter(x, wd.half(), bd, wu, bu)
    with pytest.raises(ValueError, match="b_down"):
        bottleneck_adapter(x, wd, bd[:2], wu, bu)


def test_compile_fullgraph():
    torch._dynamo.reset()
    ad = BottleneckAdapter(24, 6, "swish", init="bert")
    x = torch.randn(2, 5, 24, requires_grad=True)
    eager = ad(x)
    eager.sum().backward()
    g_eager = ad.down.weight.grad.clone()
    ad.zero_grad()
    compiled = torch.compile(ad, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(ad.down.weight.grad, g_eager)


# ----------------------------------------------------------------------------------------- modules


def _ids():
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("config", ["houlsby", "pfeiffer"])
def test_identity_at_init_and_placement(family, config):
    model = tiny_llama() if family == "llama" else tiny_bert()
    ids = _ids()
    out = lambda m: m(ids).logits if family == "llama" else m(ids).last_hidden_state  # noqa: E731
    with torch.no_grad():
        base = out(model)
        add_bottleneck_adapters(model, config, init="mam_adapter")
        torch.testing.assert_close(out(model), base, atol=0, rtol=0)  # zero up-projection: exactly unchanged
    adapters = [n for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)]
    assert len(adapters) == (4 if config == "houlsby" else 2)  # 2 layers x (attn + ffn | ffn)
    assert all(a.bottleneck_size == 64 // 16 for a in model.modules() if isinstance(a, BottleneckAdapter))
    remove_bottleneck_adapters(model)
    assert not any(isinstance(m, BottleneckAdapter) for m in model.modules())


@pytest.mark.parametrize("init", ["bert", "houlsby"])
def test_near_identity_inits(init):
    model = tiny_llama()
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
        add_bottleneck_adapters(model, "houlsby", init=init)
        out = model(ids).logits
    rel = ((out - base).norm() / base.norm()).item()
    assert 0 < rel < 0.05, rel  # tiny random up-projection: changed, but barely


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_only_adapters_train_and_loss_falls(family):
    model = tiny_llama() if family == "llama" else tiny_bert(num_labels=3)
    head = None if family == "llama" else ["classifier"]
    add_bottleneck_adapters(model, "houlsby", reduction_factor=8, init="bert", modules_to_save=head)
    model.train()
    ids = _ids()
    labels = ids if family == "llama" else torch.tensor([0, 2])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        if not losses:
            for n, p in model.named_parameters():
                assert (p.grad is not None) == ("bottleneck_adapter" in n or "classifier" in n), n
        opt.step()
        losses.append(loss.item())
    # a random tiny model on random tokens: the adapters can only shave a few tenths of a nat off ln(128)
    assert losses[-1] < losses[0] - 0.2 and losses[-1] == min(losses), losses


def test_fused_equals_unfused_module():
    torch.manual_seed(3)
    a = BottleneckAdapter(40, 7, "gelu", init="bert")
    b = BottleneckAdapter(40, 7, "gelu", init="bert", fused=False)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 5, 40)
    torch.testing.assert_close(a(x), b(x))


def test_bad_input():
    with pytest.raises(ValueError, match="reduction_factor=128 leaves no hidden units"):
        add_bottleneck_adapters(tiny_llama(), reduction_factor=128)
    with pytest.raises(ValueError, match="bottleneck_size=0"):
        add_bottleneck_adapters(tiny_llama(), bottleneck_size=0)
    with pytest.raises(ValueError, match="config"):
        add_bottleneck_adapters(tiny_llama(), config="parallel")
    with pytest.raises(ValueError, match="init"):
        add_bottleneck_adapters(tiny_llama(), init="xavier")
    with pytest.raises(TypeError, match="no layer type it can wrap"):
        add_bottleneck_adapters(nn.Sequential(nn.Linear(8, 8), nn.ReLU()))
    with pytest.raises(AdapterMergeError, match="cannot be merged"):
        merge_bottleneck_adapters(tiny_llama())


def test_save_load_roundtrip_and_failed_load(tmp_path):
    src = add_bottleneck_adapters(tiny_llama(), "pfeiffer", init="bert")
    with torch.no_grad():
        for p in bottleneck_state_dict(src).values():
            p.add_(torch.randn_like(p) * 0.05)
    save_bottleneck_adapters(src, tmp_path / "a")
    dst = tiny_llama()
    load_bottleneck_adapters(dst, tmp_path / "a")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(dst(ids).logits, src(ids).logits)
    # a checkpoint for another hidden size: error, and the target model keeps no adapters
    other = add_bottleneck_adapters(tiny_llama(hidden_size=32, heads=2, kv_heads=1), "pfeiffer")
    save_bottleneck_adapters(other, tmp_path / "b")
    fresh = tiny_llama()
    with torch.no_grad():
        before = fresh(ids).logits
    with pytest.raises(ValueError, match="shape"):
        load_bottleneck_adapters(fresh, tmp_path / "b")
    assert not bottleneck_state_dict(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, before, atol=0, rtol=0)


def test_on_4bit_model():
    """QLoRA-style base: adapters sit on QLinearNF4 outputs, fp32 adapters, only they get gradients."""
    import qpeft

    model = tiny_llama()
    qpeft.quantize_model(model, compute_dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        base = model(ids).logits
    add_bottleneck_adapters(model, "houlsby", init="mam_adapter")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base, atol=0, rtol=0)
    assert all(a.down.weight.dtype == torch.float32 for a in model.modules() if isinstance(a, BottleneckAdapter))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("bottleneck_adapter" in n for n in grads)
    assert any(n.endswith("down.weight") for n in grads) and any(n.endswith("up.weight") for n in grads)
