"""qpeft's own LoRA API with PEFT's `autocast_adapter_dtype` (issue 26, point 4): True (the default) keeps adapters in
fp32, False creates them in the base's compute dtype (QLinearNF4.compute_dtype, a dense base's weight dtype), as PEFT
+ bitsandbytes does. Everything downstream runs on such adapters: the fused forward/backward (within 2x of plain
PyTorch in the same dtype vs an fp64 oracle), DoRA, lora_bias, several adapters, mixed-adapter batches, merge /
unmerge (bit-exact restore), files, .to()/.half() and the fused blocks (LoraProjection). Parity with PEFT +
bitsandbytes on the same bytes is in tests/integrations/test_peft_bnb_parity.py."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn

import qpeft
from qpeft.autograd.lora_mlp import lora_mlp
from qpeft.modules.lora_linear import LoraLinear
from qpeft.models.fused.api import is_fused
from qpeft.modules.qlinear_nf4 import QLinearNF4
from utils import assert_close_2x, requires_triton_runtime, tiny_llama, triton_device, triton_dtypes

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
K, N, R = 72, 40, 4


def nf4_base(compute_dtype=torch.bfloat16, bias=True, seed=0, k=K, n=N):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        if bias:
            lin.bias.normal_(0, 0.1)
    return QLinearNF4.from_linear(lin, compute_dtype=compute_dtype)


def dense_base(dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.bias.normal_(0, 0.1)
    return lin.to(dtype)


def randomize(layer, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(layer.named_parameters()):
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g).to(p.dtype))
            elif "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return layer


def base_weight(layer, dtype):
    base = layer.base_layer
    w = base.dequantize(torch.float32) if isinstance(base, QLinearNF4) else base.weight.detach().float()
    b = None if base.bias is None else base.bias.detach().float()
    return w.to(dtype), None if b is None else b.to(dtype)


def plain(layer, x, names, dtype):
    """PEFT's LoRA forward in plain PyTorch, every tensor in `dtype` (the base dequantized to it as bitsandbytes
    does): y = x W^T + b + sum s (x A^T) B^T (+ s lora bias); DoRA: m / ||W + s B A||_row rescales."""
    w, b = base_weight(layer, dtype)
    x = x.to(dtype)
    y = nn.functional.linear(x, w, b)
    for n in names:
        A = layer.lora_A[n].weight.to(dtype)
        B = layer.lora_B[n].weight.to(dtype)
        s = layer.scaling[n]
        lora = nn.functional.linear(nn.functional.linear(x, A), B) * s
        if layer.use_dora[n]:
            g = layer.lora_magnitude_vector[n].weight.to(dtype) / torch.linalg.vector_norm(
                (w + s * B @ A).detach(), dim=1)
            y = y + (g - 1) * nn.functional.linear(x, w) + g * lora
        else:
            if layer.lora_bias[n]:
                lora = lora + layer.lora_B[n].bias.to(dtype) * s
            y = y + lora
    return y


def out_and_grads(fn, x, params, seed=7):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad((y.double() * g).sum(), [x, *params])
    return y.detach(), grads


def assert_layer_2x(layer, x, names, what):
    """layer(x) and its gradients (x, every trainable adapter tensor) within 2x of plain PyTorch in the adapters'
    dtype against the fp64 oracle."""
    params = [p for p in layer.parameters() if p.requires_grad]
    dt = layer.lora_A[names[0]].weight.dtype
    y, g = out_and_grads(layer, x, params)
    y0, g0 = out_and_grads(lambda t: plain(layer, t, names, torch.float64), x, params)
    y2, g2 = out_and_grads(lambda t: plain(layer, t, names, dt), x, params)
    assert y.dtype == x.dtype
    assert_close_2x(y, y0, y2, what=f"{what} output")
    for i, (a, b, c) in enumerate(zip(g, g0, g2)):
        assert a.dtype == ([x] + params)[i].dtype
        assert b.abs().max() > 0
        assert_close_2x(a, b, c, eps=1e-6, what=f"{what} grad {i}")


# ------------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("make,expected", [
    (lambda: nf4_base(torch.bfloat16), torch.bfloat16), (lambda: nf4_base(torch.float16), torch.float16),
    (lambda: nf4_base(None), torch.float32),  # compute_dtype None (x's): PEFT + bitsandbytes leaves fp32
    (lambda: dense_base(torch.bfloat16), torch.bfloat16), (lambda: dense_base(torch.float16), torch.float16),
    (lambda: dense_base(torch.float32), torch.float32),
], ids=["nf4-bf16", "nf4-fp16", "nf4-none", "dense-bf16", "dense-fp16", "dense-fp32"])
@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"lora_bias": True}], ids=["lora", "dora", "bias"])
def test_autocast_adapter_dtype_picks_fp32_or_the_compute_dtype(make, expected, variant):
    """True (the default): fp32, as before; False: the base's compute dtype, for A, B, DoRA's magnitude and
    lora_B's bias. Both are initialised alike (fp32 draws, then rounded once)."""
    torch.manual_seed(11)
    default = LoraLinear(make(), r=R, init="gaussian", **variant)
    torch.manual_seed(11)
    cast = LoraLinear(make(), r=R, init="gaussian", autocast_adapter_dtype=False, **variant)
    torch.manual_seed(11)
    explicit = LoraLinear(make(), r=R, init="gaussian", autocast_adapter_dtype=True, **variant)
    d, c, e = (dict(m.named_parameters()) for m in (default, cast, explicit))
    lora = [n for n in d if "lora_" in n]
    assert len(lora) == 2 + bool(variant)
    for n in lora:
        assert d[n].dtype == e[n].dtype == torch.float32
        assert c[n].dtype == expected, n
        assert torch.equal(c[n], d[n].to(expected)) and torch.equal(d[n], e[n])
    cast.add_adapter("second", r=2)  # a later adapter takes its own option
    assert cast.lora_A["second"].weight.dtype == torch.float32
    cast.add_adapter("third", r=2, autocast_adapter_dtype=False)
    assert cast.lora_B["third"].weight.dtype == expected


@pytest.mark.parametrize("bad", ["False", None, 0, 1, torch.float32, "bf16"])
def test_bad_autocast_adapter_dtype_raises_naming_it_and_changes_nothing(bad, tmp_path):
    base = nf4_base()
    with pytest.raises(ValueError, match="autocast_adapter_dtype must be True or False"):
        LoraLinear(base, autocast_adapter_dtype=bad)
    layer = LoraLinear(base)
    with pytest.raises(ValueError, match="autocast_adapter_dtype"):
        layer.add_adapter("other", autocast_adapter_dtype=bad)
    assert list(layer.lora_A) == ["default"]
    model = tiny_llama(0, layers=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="add_lora: autocast_adapter_dtype must be True or False"):
        qpeft.add_lora(model, r=R, autocast_adapter_dtype=bad)
    with pytest.raises(ValueError, match="prepare_for_qlora: autocast_adapter_dtype must be True or False"):
        qpeft.prepare_for_qlora(model, r=R, autocast_adapter_dtype=bad)
    after = model.state_dict()  # nothing wrapped, nothing quantized
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    src = qpeft.add_lora(tiny_llama(0, layers=1), r=R)
    qpeft.save_adapter(src, tmp_path)
    with pytest.raises(ValueError, match="load_adapter: autocast_adapter_dtype must be True or False"):
        qpeft.load_adapter(model, tmp_path, autocast_adapter_dtype=bad)
    assert not qpeft.lora_layers(model)


# ------------------------------------------------------------------------------------ forward / backward
@pytest.mark.parametrize("base", ["nf4", "dense"])
@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"lora_bias": True}], ids=["lora", "dora", "bias"])
def test_bf16_adapters_forward_backward_within_2x(base, variant):
    layer = LoraLinear(nf4_base() if base == "nf4" else dense_base(), r=R, lora_alpha=8,
                       autocast_adapter_dtype=False, **variant)
    randomize(layer)
    x = torch.randn(3, 5, K, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    assert_layer_2x(layer, x, ["default"], f"{base} {variant}")


@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("dtype", [d for d in triton_dtypes() if d != torch.float32])
@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"lora_bias": True}], ids=["lora", "dora", "bias"])
def test_triton_half_adapters_within_2x(dtype, variant):
    """The Triton kernels (lora_xa, the NF4 matmul with the LoRA epilogue, lora_grad, NF4 dx, DoRA's norm) on
    adapters in the compute dtype (autocast_adapter_dtype=False): within 2x of plain PyTorch in that dtype."""
    dev = triton_device()
    layer = LoraLinear(nf4_base(dtype), r=R, lora_alpha=8, autocast_adapter_dtype=False, **variant)
    layer = randomize(layer).to(dev)
    assert layer.lora_A["default"].weight.dtype == dtype
    x = torch.randn(3, 5, K, generator=torch.Generator().manual_seed(1)).to(dtype).to(dev)
    assert_layer_2x(layer, x, ["default"], f"triton {dtype} {variant}")


def test_several_bf16_adapters_with_dropout_train():
    """Several active adapters with dropout (independent masks, the unfused path) on bf16 adapters: x is cast to
    each adapter's dtype (it was cast to fp32); the same result as an fp32 copy of the adapters up to bf16."""
    layer = LoraLinear(nf4_base(), r=R, lora_dropout=0.1, autocast_adapter_dtype=False)
    layer.add_adapter("b", r=2, lora_dropout=0.2, autocast_adapter_dtype=False)
    layer.set_adapter(["default", "b"])
    randomize(layer).train()
    x = torch.randn(4, K, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    torch.manual_seed(5)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and all(p.grad.dtype == torch.bfloat16 for p in layer.parameters()
                                             if p.requires_grad)
    ref = copy.deepcopy(layer)
    for n in ("default", "b"):
        ref.lora_A[n].float()
        ref.lora_B[n].float()
    torch.manual_seed(5)
    y32 = ref(x)
    torch.testing.assert_close(y.float(), y32.float(), rtol=0.02, atol=0.02)  # bf16 rounding of the adapter terms


def test_mixed_adapter_batch_with_bf16_adapters():
    layer = LoraLinear(nf4_base(), r=R, autocast_adapter_dtype=False, lora_bias=True)
    layer.add_adapter("b", r=2, lora_alpha=4, autocast_adapter_dtype=False)
    randomize(layer).eval()
    x = torch.randn(3, 4, K, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    names = ["b", "__base__", "default"]
    with torch.no_grad():
        y = layer(x, adapter_names=names)
        for i, n in enumerate(names):
            active = [] if n == "__base__" else [n]
            y0, y2 = (plain(layer, x[i], active, dt) for dt in (torch.float64, torch.bfloat16))
            assert_close_2x(y[i], y0, y2, what=f"row {i} ({n})")


# ----------------------------------------------------------------------------------------------- merging
@pytest.mark.parametrize("base", ["nf4", "dense"])
@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"lora_bias": True}], ids=["lora", "dora", "bias"])
def test_merge_unmerge_with_bf16_adapters(base, variant):
    layer = LoraLinear(nf4_base() if base == "nf4" else dense_base(), r=R, autocast_adapter_dtype=False, **variant)
    randomize(layer).eval()
    before = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    x = torch.randn(6, K, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        ym = layer(x)
        merged_w, _ = base_weight(layer, torch.float64)
        layer.unmerge()
        after = layer.base_layer.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before)  # bit for bit, as with fp32 adapters
        assert torch.equal(layer(x), y)
    w0, _ = base_weight(layer, torch.float64)
    A, B = (t.double() for t in (layer.lora_A["default"].weight, layer.lora_B["default"].weight))
    target = w0 + layer.scaling["default"] * B @ A
    if variant.get("use_dora"):
        target = target * (layer.lora_magnitude_vector["default"].weight.double()
                           / torch.linalg.vector_norm(target, dim=1))[:, None]
    if base == "dense":  # the merge rounds W + delta to bf16 once: within 2x of plain bf16 arithmetic
        plain_bf16 = (w0.bfloat16() + (layer.scaling["default"] * B.bfloat16() @ A.bfloat16()))
        if variant.get("use_dora"):
            plain_bf16 = plain_bf16 * (layer.lora_magnitude_vector["default"].weight.bfloat16()
                                       / torch.linalg.vector_norm(plain_bf16, dim=1))[:, None]
        assert_close_2x(merged_w, target, plain_bf16, eps=1e-6, what="merged weight")
    else:  # re-quantized: one NF4 step of the largest block at most
        assert (merged_w - target).abs().max() < 0.25 * target.abs().max()
    torch.testing.assert_close(ym.float(), y.float(), rtol=0.1, atol=0.15 if base == "nf4" else 0.03)


# ---------------------------------------------------------------------------------------- moves and files
def test_to_and_half_move_bf16_adapters_and_keep_them_working():
    layer = randomize(LoraLinear(nf4_base(), r=R, autocast_adapter_dtype=False, use_dora=True)).eval()
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        layer.half()
        assert {p.dtype for n, p in layer.named_parameters() if "lora_" in n} == {torch.float16}
        y16 = layer(x)
        layer.to(torch.float32)
        assert {p.dtype for n, p in layer.named_parameters() if "lora_" in n} == {torch.float32}
        y32 = layer(x)
    assert y16.dtype == y32.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y.float(), rtol=0.02, atol=0.02)
    torch.testing.assert_close(y32.float(), y.float(), rtol=0.02, atol=0.02)


def _qlora_model(autocast):
    model = tiny_llama(0, layers=1).to(torch.bfloat16)
    return qpeft.prepare_for_qlora(model, r=R, lora_alpha=8, init=False, autocast_adapter_dtype=autocast)


def test_files_keep_the_adapter_dtype_and_load_follows_the_option(tmp_path):
    """save_adapter writes the adapters' dtype (as PEFT saves); load_adapter creates new adapters in fp32 or, with
    autocast_adapter_dtype=False, in the compute dtype; an adapter the model has already keeps its dtype."""
    from safetensors.torch import load_file

    src = _qlora_model(False)
    assert {p.dtype for n, p in src.named_parameters() if "lora_" in n} == {torch.bfloat16}
    qpeft.save_adapter(src, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert saved and {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert "autocast_adapter_dtype" not in json.loads((tmp_path / "adapter_config.json").read_text())
    x = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = src(x).logits
    for autocast, dtype in ((True, torch.float32), (False, torch.bfloat16)):
        model = qpeft.prepare_for_qlora(tiny_llama(0, layers=1).to(torch.bfloat16), r=R)
        qpeft.delete_lora_adapter(model, "default")
        # a new adapter name in existing LoRA layers, then into the existing adapter again
        qpeft.load_adapter(model, tmp_path, adapter_name="loaded", autocast_adapter_dtype=autocast)
        loaded = {n: p for n, p in model.named_parameters() if ".loaded." in n}
        assert loaded and {p.dtype for p in loaded.values()} == {dtype}
        qpeft.set_lora_adapter(model, "loaded")
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, ref, rtol=0, atol=0.02 if autocast else 0)
        qpeft.load_adapter(model, tmp_path, adapter_name="loaded", autocast_adapter_dtype=not autocast)
        assert {p.dtype for n, p in model.named_parameters() if ".loaded." in n} == {dtype}
    fp32 = _qlora_model(True)  # fp32 adapters saved as fp32, loaded bf16 where asked
    qpeft.save_adapter(fp32, tmp_path / "fp32")
    assert {t.dtype for t in load_file(str(tmp_path / "fp32" / "adapter_model.safetensors")).values()} == {
        torch.float32}
    fresh = tiny_llama(0, layers=1).to(torch.bfloat16)
    qpeft.quantize_model(fresh, compute_dtype=torch.bfloat16)
    qpeft.load_adapter(fresh, tmp_path / "fp32", autocast_adapter_dtype=False)
    assert {p.dtype for n, p in fresh.named_parameters() if "lora_" in n} == {torch.bfloat16}


def test_load_adapter_refuses_false_for_a_method_without_it(tmp_path):
    from qpeft.tuners import adapter_io

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "FAKE"}))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    calls = []
    adapter_io.register_method(adapter_io.AdapterMethod("FAKE", lambda m: [], lambda m, a: {}, lambda m, a: {},
                                                        lambda *a, **k: calls.append(k)))
    try:
        with pytest.raises(ValueError, match="autocast_adapter_dtype=False is supported for LoRA adapters, not for "
                                             "peft_type 'FAKE'"):
            qpeft.load_adapter(nn.Linear(2, 2), tmp_path, autocast_adapter_dtype=False)
        assert calls == []
        qpeft.load_adapter(nn.Linear(2, 2), tmp_path)
        assert calls == [{}]
    finally:
        adapter_io._METHODS.pop("FAKE")


# ------------------------------------------------------------------------------------------ fused blocks
def test_fused_mlp_block_takes_bf16_adapters():
    """qpeft.lora_mlp over three LoraLinear layers with bf16 adapters (LoraProjection.from_module): the output and
    the adapters' gradients (bf16) within 2x of the unfused layers against an fp64 oracle."""
    H, inter = 64, 96
    layers = [LoraLinear(nf4_base(seed=s, k=k, n=n), r=R, autocast_adapter_dtype=False)
              for s, (k, n) in enumerate(((H, inter), (H, inter), (inter, H)))]
    for i, layer in enumerate(layers):
        randomize(layer, seed=10 + i)
    params = [p for layer in layers for p in layer.parameters() if p.requires_grad]
    assert {p.dtype for p in params} == {torch.bfloat16}
    x = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)

    def unfused(t, dt=None):
        if dt is None:
            g, u, d = layers
            return d(nn.functional.silu(g(t)) * u(t))
        g, u, d = (lambda v, m=m: plain(m, v, ["default"], dt) for m in layers)
        return d(nn.functional.silu(g(t)) * u(t))

    y, g = out_and_grads(lambda t: lora_mlp(t, *layers, training=True), x, params)
    y0, g0 = out_and_grads(lambda t: unfused(t, torch.float64), x, params)
    y2, g2 = out_and_grads(unfused, x, params)
    assert y.dtype == torch.bfloat16
    assert_close_2x(y, y0, y2, what="lora_mlp output")
    for i, (a, b, c) in enumerate(zip(g, g0, g2)):
        assert a.dtype == ([x] + params)[i].dtype
        assert_close_2x(a, b, c, eps=1e-6, what=f"lora_mlp grad {i}")


def test_fuse_on_a_model_with_bf16_adapters():
    """qpeft.fuse on a QLoRA model with bf16 adapters runs every block fused (no fallback) and gives the unfused
    model's loss and bf16 gradients up to bf16 rounding (the 2x rule per block: test_fused_mlp_block_...)."""
    model = _qlora_model(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = qpeft.fuse(copy.deepcopy(model))
    assert is_fused(fused) and not is_fused(model)
    x = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    model.train()
    fused.train()
    named = [n for n, p in model.named_parameters() if p.requires_grad]
    out = []
    for m in (model, fused):
        with warnings.catch_warnings():
            warnings.simplefilter("error", qpeft.FusedFallbackWarning)  # every fused module ran fused
            loss = m(input_ids=x, labels=x, use_cache=False).loss
        ps = dict(m.named_parameters())
        out.append((loss, torch.autograd.grad(loss, [ps[n] for n in named])))
    (l1, g1), (l2, g2) = out
    assert {g.dtype for g in g2} == {torch.bfloat16}
    torch.testing.assert_close(l2, l1, rtol=0.02, atol=0.02)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b.float(), a.float(), rtol=0.1, atol=0.1 * a.abs().max().item())
