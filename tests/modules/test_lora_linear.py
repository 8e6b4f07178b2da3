"""LoraLinear: PEFT defaults and scaling, several adapters, disable / merge / unmerge, NF4 base."""
from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn as nn

import qpeft
from qpeft.modules.lora_linear import LoraLinear, LoraRankWarning
from qpeft.modules.qlinear_nf4 import QLinearNF4
from qpeft.reference.lora import lora_dropout_ref as ref_dropout
from qpeft.reference.lora import lora_linear_ref
from utils import DTYPES, TOL, assert_close_2x, requires_triton_runtime, triton_device, triton_dtypes


def _layer(K=24, N=20, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(K, N, bias=bias).to(dtype)


def test_defaults_scaling_and_names_match_peft():
    from peft import LoraConfig, get_peft_model

    base = _layer()
    layer = LoraLinear(base)
    assert layer.r == {"default": 8} and layer.scaling == {"default": 1.0}  # PEFT: r=8, alpha=8, alpha/r
    assert set(dict(layer.named_parameters())) == {"base_layer.weight", "base_layer.bias",
                                                   "lora_A.default.weight", "lora_B.default.weight"}
    assert not layer.base_layer.weight.requires_grad and layer.lora_A["default"].weight.requires_grad
    assert layer.lora_A["default"].weight.dtype == torch.float32
    # PEFT's own in-memory keys for the same wrapped layer
    peft_model = get_peft_model(nn.Sequential(_layer()), LoraConfig(target_modules=["0"]))
    peft_keys = {k.split("0.", 1)[1] for k in peft_model.state_dict()}
    assert set(layer.state_dict()) == peft_keys
    assert LoraLinear(_layer(), r=4, lora_alpha=16).scaling["default"] == 4.0
    assert LoraLinear(_layer(), r=4, lora_alpha=16, use_rslora=True).scaling["default"] == 8.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_identity_at_init(dtype):
    base = _layer(dtype=dtype)
    x = torch.randn(3, 5, 24, dtype=dtype)
    for init in ("kaiming", "gaussian"):
        layer = LoraLinear(base, r=4, init=init)
        assert torch.equal(layer.lora_B["default"].weight, torch.zeros(20, 4))
        assert layer.lora_A["default"].weight.abs().sum() > 0
        torch.testing.assert_close(layer(x), base(x), rtol=TOL[dtype][1], atol=TOL[dtype][0])


def test_init_distributions():
    base = _layer(K=512, N=512)
    A = LoraLinear(base, r=64).lora_A["default"].weight
    bound = 1 / math.sqrt(512)  # kaiming_uniform(a=sqrt(5)) on fan_in 512
    assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.02 * bound  # uniform, not normal
    G = LoraLinear(base, r=64, init="gaussian").lora_A["default"].weight
    assert abs(G.std().item() - 1 / 64) < 0.02 / 64 * 5 and G.abs().max() > 3 / 64  # N(0, 1/r): tails


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_backward_vs_reference(dtype):
    base = _layer(dtype=dtype)
    layer = LoraLinear(base, r=6, lora_alpha=12, init="random")
    x = torch.randn(2, 7, 24, dtype=dtype, requires_grad=True)
    y = layer(x)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    xr = x.detach().float().requires_grad_()
    Ar, Br = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    yr = lora_linear_ref(xr, base.weight.float(), Ar, Br, 2.0, base.bias.float())
    # plain PyTorch in the layer's dtype
    xs = x.detach().clone().requires_grad_()
    As, Bs = A.detach().to(dtype).requires_grad_(), B.detach().to(dtype).requires_grad_()
    ys = base(xs) + 2.0 * (xs @ As.t()) @ Bs.t()
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, (x, A, B), dy)
    gr = torch.autograd.grad(yr, (xr, Ar, Br), dy.float())
    gs = torch.autograd.grad(ys, (xs, As, Bs), dy)
    assert y.dtype == dtype
    assert_close_2x(y, yr, ys, eps=1e-5)
    for name, a, b, c in zip(("dx", "dA", "dB"), g, gr, gs):
        if dtype == torch.float32:
            assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-6, name
        else:
            assert_close_2x(a, b, c, factor=3.0, eps=1e-5, what=name)


def test_several_adapters_summed_and_switching():
    base = _layer()
    layer = LoraLinear(base, r=4, init="random", adapter_name="a")
    layer.add_adapter("b", r=2, lora_alpha=6, init="random")
    assert layer.active_adapters == ["a"]  # add_adapter does not activate
    x = torch.randn(9, 24)

    def single(n):
        A, B = layer.lora_A[n].weight, layer.lora_B[n].weight
        return layer.scaling[n] * (x @ A.t()) @ B.t()

    torch.testing.assert_close(layer(x), base(x) + single("a"), rtol=1.3e-6, atol=1e-5)
    layer.set_adapter("b")
    assert not layer.lora_A["a"].weight.requires_grad and layer.lora_A["b"].weight.requires_grad
    torch.testing.assert_close(layer(x), base(x) + single("b"), rtol=1.3e-6, atol=1e-5)
    layer.set_adapter(["a", "b"])
    y = layer(x)
    torch.testing.assert_close(y, base(x) + single("a") + single("b"), rtol=1.3e-6, atol=1e-5)
    grads = torch.autograd.grad(y.sum(), [layer.lora_A["a"].weight, layer.lora_B["b"].weight])
    assert all(g.abs().sum() > 0 for g in grads)
    # training with dropout on both: still the sum of two LoRA branches (independent masks)
    layer.lora_dropout.update(a=0.2, b=0.2)
    layer.train()
    torch.manual_seed(0)
    y_train = layer(x)
    assert y_train.shape == y.shape and not torch.allclose(y_train, y)
    layer.eval()
    layer.delete_adapter("a")
    assert layer.active_adapters == ["b"] and "a" not in layer.lora_A
    with pytest.raises(ValueError, match="unknown adapter"):
        layer.set_adapter("a")
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("b")


def test_disable_adapters_context():
    base = _layer()
    layer = LoraLinear(base, r=4, init="random")
    x = torch.randn(6, 24)
    y = layer(x)
    assert not torch.allclose(y, base(x))
    with layer.disable_adapters():
        torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    layer.merge()
    with layer.disable_adapters():  # merged: the pre-merge weight for the duration
        torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    assert layer.merged_adapters == ["default"]
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_merge_unmerge_dense_exact():
    base = _layer()
    w0 = base.weight.detach().clone()
    layer = LoraLinear(base, r=4, init="random")
    x = torch.randn(6, 24)
    y = layer(x)
    err = layer.merge()
    assert err["default"] == 0.0  # fp32 base: the merged weight is stored exactly
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(base.weight, w0)  # the kept pre-merge weight: bit for bit
    assert torch.equal(layer(x), y)
    merged = layer.merge_and_unload()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unmerge"):
        layer.delete_adapter("default")


def _merge_case(kind: str, K=256, N=64, r=16, seed=0):
    """A LoraLinear whose adapter visibly changes the output, on an fp32 / bf16 dense or an NF4 base."""
    torch.manual_seed(seed)
    lin = nn.Linear(K, N)
    if kind == "nf4":
        base = QLinearNF4.from_linear(lin, compute_dtype=torch.float32)
    else:
        base = lin.to(torch.float32 if kind == "fp32" else torch.bfloat16)
    layer = LoraLinear(base, r=r, lora_alpha=r, init="random")
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(0.05)
    x = torch.randn(8, K, dtype=torch.float32 if kind != "bf16" else torch.bfloat16)
    return layer, x


def _base_tensors(layer):
    b = layer.base_layer
    names = ("weight", "absmax_bytes", "quant_map", "nested_absmax", "nested_quant_map", "offset") if layer.is_nf4 \
        else ("weight", "bias")
    return {n: getattr(b, n).detach().clone() for n in names if getattr(b, n) is not None}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["nf4", "fp32", "bf16"])
def test_disable_adapters_on_a_merged_layer_restores_it_bit_for_bit(kind):
    """Issue 21: each use unmerged and re-merged (re-quantizing an NF4 base twice), so the error against the
    unmerged layer grew with every use (1024 -> 256: 0.04 -> 1.2 after 50). Now: 50 uses, the output inside is
    the original base's and the output after leaving the merged layer's, bit for bit, every time."""
    layer, x = _merge_case(kind)
    with torch.no_grad():
        y_base = layer.base_layer(x)
        y_unmerged = layer(x)
        original = _base_tensors(layer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NF4: "re-quantizes"
            layer.merge()
        merged = _base_tensors(layer)
        y_merged = layer(x)
        err0 = (y_merged.float() - y_unmerged.float()).abs().mean().item()
        assert not torch.equal(y_merged, y_base)
        for _ in range(50):
            with layer.disable_adapters():
                assert torch.equal(layer(x), y_base)
                assert _same(_base_tensors(layer), original)
            assert torch.equal(layer(x), y_merged)
        assert _same(_base_tensors(layer), merged) and layer.merged_adapters == ["default"]
        assert (layer(x).float() - y_unmerged.float()).abs().mean().item() == err0  # no growth
        assert layer.unmerge() == {"default": 0.0}
        assert _same(_base_tensors(layer), original) and torch.equal(layer(x), y_unmerged)


@pytest.mark.parametrize("kind", ["nf4", "fp32", "bf16"])
def test_merge_unmerge_round_trips_are_exact(kind):
    """README: merge() / unmerge() restore the base bit for bit (subtracting the delta again changed ~10% of an
    fp32 weight, and re-quantized an NF4 one)."""
    layer, x = _merge_case(kind, seed=1)
    layer.add_adapter("other", r=4, init="random")
    original = _base_tensors(layer)
    with torch.no_grad():
        y = layer(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(10):
                layer.merge(["default"])
                layer.merge(["other"])  # merged later, one more adapter: unmerge still restores the original
                assert layer.merged_adapters == ["default", "other"]
                assert layer.unmerge() == {"other": 0.0, "default": 0.0}
                assert _same(_base_tensors(layer), original)
        assert torch.equal(layer(x), y)


def test_a_stale_kept_weight_falls_back_to_peft_arithmetic():
    """A base written since the merge (here load_state_dict into the merged layer) cannot take the kept
    weight back: unmerge subtracts the delta (PEFT), disable_adapters unmerges once and stays unmerged."""
    layer, x = _merge_case("fp32", seed=2)
    layer.merge()
    loaded = torch.randn_like(layer.base_layer.weight)
    layer.base_layer.load_state_dict({"weight": loaded, "bias": layer.base_layer.bias.detach()})
    delta = layer.get_delta_weight("default")
    with layer.disable_adapters():
        assert not layer.merged
        torch.testing.assert_close(layer.base_layer.weight, loaded - delta, rtol=0, atol=1e-6)
    assert not layer.merged and layer.active_adapters == ["default"]  # PEFT: not re-merged on exit
    layer.merge()
    with torch.no_grad():
        layer.base_layer.weight.add_(1.0)  # an in-place write since the merge: stale too
    w = layer.base_layer.weight.detach().clone()
    err = layer.unmerge()
    assert err["default"] < 1e-6
    torch.testing.assert_close(layer.base_layer.weight, w - delta, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["nf4", "fp32"])
def test_kept_weight_follows_the_layer_when_it_is_moved_or_cast(kind):
    layer, x = _merge_case(kind, seed=3)
    original = _base_tensors(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge()
    layer.half()  # dense: the weight and the kept original become fp16; NF4: nothing is cast
    expected = {k: (v.half() if kind == "fp32" else v) for k, v in original.items()}
    with layer.disable_adapters():
        assert _same(_base_tensors(layer), expected)
    layer.unmerge()
    assert _same(_base_tensors(layer), expected)
    if kind == "fp32":  # the base layer cast on its own, past LoraLinear: stale, PEFT's arithmetic
        layer.merge()
        layer.base_layer.double()
        merged = layer.base_layer.weight.detach().clone()
        layer.unmerge()
        w = layer.base_layer.weight
        assert w.dtype == torch.float64
        assert torch.equal(w, (merged.float() - layer.get_delta_weight("default")).double())


def test_merge_and_unmerge_inside_disable_adapters():
    layer, x = _merge_case("nf4", seed=4)
    with torch.no_grad():
        y_base = layer.base_layer(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer.merge()
            with layer.disable_adapters():
                with pytest.raises(ValueError, match=r"merge\(\) inside disable_adapters"):
                    layer.merge()
                with layer.disable_adapters():  # nested: nothing more to swap
                    assert torch.equal(layer(x), y_base)
                assert torch.equal(layer(x), y_base)
                assert layer.unmerge() == {"default": 0.0}
            assert not layer.merged and torch.equal(layer.base_layer(x), y_base)  # stays unmerged


def test_safe_merge_rejects_non_finite():
    layer = LoraLinear(_layer(), r=2, init="random")
    w0 = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_rank(bad):
    with pytest.raises(ValueError, match=r"r must be an int >= 1, got " + re.escape(repr(bad))):
        LoraLinear(_layer(), r=bad)


def test_rank_above_layer_rank_is_accepted_with_a_warning():
    # PEFT accepts any r >= 1; the (out=20, in=24) layer has rank <= 20, so r=21 is not low-rank any more
    base = _layer()
    with pytest.warns(LoraRankWarning, match=r"r=21 is not below the rank of a layer of shape \(out=20, in=24\)"):
        layer = LoraLinear(base, r=21, lora_alpha=7, init="random")
    x = torch.randn(3, 24)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape == (21, 24) and B.shape == (20, 21)
    torch.testing.assert_close(layer(x), lora_linear_ref(x, base.weight, A, B, 7 / 21, base.bias),
                               rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraRankWarning)
        LoraLinear(base, r=20)  # r = min(in, out): still allowed without a warning


def test_bad_base_and_dropout():
    with pytest.raises(TypeError, match="nn.Linear or QLinearNF4"):
        LoraLinear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraLinear(_layer(), lora_dropout=1.5)
    with pytest.raises(ValueError, match="init must be one of"):
        LoraLinear(_layer(), init="pissa")


def test_dropout_train_vs_eval():
    layer = LoraLinear(_layer(), r=4, lora_dropout=0.5, init="random")
    x = torch.randn(8, 24)
    layer.eval()
    y_eval = layer(x)
    layer.train()
    torch.manual_seed(1)
    y1 = layer(x)
    torch.manual_seed(1)
    y2 = layer(x)
    assert torch.equal(y1, y2) and not torch.allclose(y1, y_eval)


# ------------------------------------------------------------------------------------------ NF4 base
def _nf4(K=70, N=45, compute_dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return QLinearNF4.from_linear(nn.Linear(K, N), compute_dtype=compute_dtype)


def test_nf4_base_forward_backward_vs_reference():
    q = _nf4()
    layer = LoraLinear(q, r=4, lora_alpha=8, init="random")
    x = torch.randn(3, 70, requires_grad=True)
    y = layer(x)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W = q.dequantize(torch.float32)
    xr, Ar, Br = (t.detach().clone().requires_grad_() for t in (x, A, B))
    yr = lora_linear_ref(xr, W, Ar, Br, 2.0, q.bias)
    dy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, A, B), dy), torch.autograd.grad(yr, (xr, Ar, Br), dy)):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-6
    torch.testing.assert_close(y, yr, rtol=1.3e-6, atol=1e-5)
    assert q.weight.dtype == torch.uint8 and not any(p.requires_grad for p in q.parameters())


def test_nf4_base_bf16_compute():
    q = _nf4(compute_dtype=torch.bfloat16)
    layer = LoraLinear(q, r=4, init="random")
    x = torch.randn(5, 70)
    y = layer(x)
    assert y.dtype == torch.float32  # QLinearNF4 casts back to x's dtype; so does the LoRA layer
    W = q.dequantize(torch.float32)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    s = layer.scaling["default"]
    yr = lora_linear_ref(x, W, A, B, s, q.bias)
    xb = x.bfloat16()
    ys = (q(x).bfloat16() + s * (xb @ A.bfloat16().t()) @ B.bfloat16().t()).float()
    assert_close_2x(y, yr, ys, eps=1e-5)


def test_nf4_merge_reports_requantization_error_and_merge_and_unload():
    q = _nf4()
    layer = LoraLinear(q, r=4, init="random")
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(0.05)
    x = torch.randn(4, 70)
    y = layer(x)
    target = q.dequantize(torch.float32) + layer.get_delta_weight("default")
    dense = layer.merge_and_unload(torch.float32)  # does not touch the NF4 layer
    assert isinstance(dense, nn.Linear) and dense.weight.dtype == torch.float32
    torch.testing.assert_close(dense.weight, target, rtol=0, atol=0)
    torch.testing.assert_close(dense(x), y, rtol=1e-5, atol=1e-5)
    assert layer.merge_and_unload().weight.dtype == torch.bfloat16  # the default dtype
    with pytest.warns(UserWarning, match="re-quantizes"):
        err = layer.merge()
    stored = q.dequantize(torch.float32)
    assert err["default"] == pytest.approx((stored - target).abs().max().item())
    assert 0 < err["default"]
    # the re-quantization error is NF4's own: at most half a code step times the block absmax
    step = torch.diff(q.quant_map.sort().values).max().item()
    assert err["default"] <= 0.5 * step * target.abs().max().item() + 1e-6
    assert q.weight.dtype == torch.uint8
    y_merged = layer(x)
    assert (y_merged - y).abs().max() <= x.abs().sum(1).max() * err["default"] + 1e-5


def test_public_names():
    assert qpeft.LoraLinear is LoraLinear


@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_triton_nf4_base_matches_reference(dtype, dropout):
    # Triton path end to end on an NF4 base: lora_xa kernel, NF4 matmul with the LoRA epilogue, lora_grad,
    # NF4 dx with the LoRA epilogue (no dropout) or NF4 dx + masked LoRA dx (dropout)
    dev = triton_device()
    q = _nf4(K=80, N=48, compute_dtype=dtype).to(dev)
    layer = LoraLinear(q, r=5, lora_alpha=10, lora_dropout=dropout, init="random").to(dev).train()
    x = torch.randn(3, 11, 80, device=dev, dtype=dtype, requires_grad=True)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=dev)  # what the layer drew
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W = q.dequantize(torch.float32)
    xr = x.detach().float().requires_grad_()
    Ar, Br = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    yr = lora_linear_ref(xr, W, Ar, Br, 2.0, q.bias, seed, dropout)
    xs = x.detach().clone().requires_grad_()
    As, Bs = A.detach().to(dtype).requires_grad_(), B.detach().to(dtype).requires_grad_()
    xd = ref_dropout(xs.reshape(-1, 80), seed, dropout).to(dtype).reshape(xs.shape) if dropout else xs
    ys = xs @ W.to(dtype).t() + q.bias.to(dtype) + 2.0 * (xd @ As.t()) @ Bs.t()
    dy = torch.randn_like(y)
    g = torch.autograd.grad(y, (x, A, B), dy)
    gr = torch.autograd.grad(yr, (xr, Ar, Br), dy.float())
    gs = torch.autograd.grad(ys, (xs, As, Bs), dy)
    if dtype == torch.float32:
        torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
        for a, b in zip(g, gr):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-6
    else:
        assert_close_2x(y, yr, ys, eps=1e-5)
        for name, a, b, c in zip(("dx", "dA", "dB"), g, gr, gs):
            assert_close_2x(a, b, c, factor=3.0, eps=1e-5, what=name)
