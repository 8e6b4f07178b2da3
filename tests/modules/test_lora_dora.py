"""LoraLinear's DoRA (use_dora=True) and lora_bias=True against PEFT's own layers (peft.tuners.lora.Linear with
DoRA / lora_bias) on the same weights: forward, gradients, several adapters, merge / unmerge / merge_and_unload,
mixed-adapter batches, and the refusals. A 4-bit base is compared with PEFT on a dense layer holding its
dequantized weight (the same W). CPU, fp32."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from qpeft.modules.lora_linear import LoraLinear
from qpeft.modules.qlinear_nf4 import QLinearNF4
from qpeft.tuners.lora.model import add_lora, lora_layers, set_lora_adapter

peft = pytest.importorskip("peft")

PREFIX = "base_model.model."


def _mlp(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 72, bias=bias), nn.GELU(), nn.Linear(72, 40, bias=bias))


def _nf4(model, quant_type="nf4"):
    for i in (0, 2):
        model[i] = QLinearNF4.from_linear(model[i], compute_dtype=torch.float32, quant_type=quant_type)
    return model


def _dequantized(model):
    """The same model with each QLinearNF4 replaced by an nn.Linear holding its dequantized weight."""
    out = copy.deepcopy(model)
    for i, m in enumerate(out):
        if isinstance(m, QLinearNF4):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantize(torch.float32))
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            out[i] = lin
    return out


def _randomize(model, seed=5):
    """Random A, B, lora biases, and magnitudes away from the norm (g != 1), identical for both twins."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if ".lora_A." in n or ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif ".lora_magnitude_vector." in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))


def _adapter_params(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix(PREFIX): p for n, p in model.named_parameters() if ".lora_" in n}


def _twins(nf4=False, bias=True, adapters=(("default", dict(use_dora=True)),), quant_type="nf4"):
    """(qpeft model with add_lora, PEFT model on the dense (dequantized) twin), same adapter tensors."""
    ours = _mlp(bias=bias)
    if nf4:
        ours = _nf4(ours, quant_type)
    dense = _dequantized(ours)
    pm = None
    for name, opts in adapters:
        add_lora(ours, ["0", "2"], r=4, lora_alpha=8, adapter_name=name, init="random", **opts)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False, **opts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if pm is None:
                pm = peft.get_peft_model(dense, cfg, adapter_name=name)
            else:
                pm.add_adapter(name, cfg)
    _randomize(ours)
    theirs, mine = _adapter_params(pm), _adapter_params(ours)
    assert theirs.keys() == mine.keys() and mine
    with torch.no_grad():
        for n, p in mine.items():
            theirs[n].copy_(p)
    return ours, pm


def _grads(model, x, dy):
    x = x.clone().requires_grad_()
    y = model(x)
    params = {n.removeprefix("_orig_mod.").removeprefix(PREFIX): p for n, p in model.named_parameters()
              if p.requires_grad}
    grads = torch.autograd.grad(y, [x, *params.values()], dy)
    return y.detach(), dict(zip(["x", *params], grads))


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("opts", [dict(use_dora=True), dict(lora_bias=True)], ids=["dora", "lora_bias"])
def test_forward_and_gradients_equal_peft(nf4, opts):
    ours, pm = _twins(nf4, adapters=(("default", opts),))
    x, dy = torch.randn(5, 3, 48), torch.randn(5, 3, 40)
    pm.set_adapter("default")
    y1, g1 = _grads(ours, x, dy)
    y2, g2 = _grads(pm, x, dy)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g2.keys() and len(g1) == 1 + 2 * (3 if opts.get("use_dora") or opts.get("lora_bias") else 2)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_several_adapters_dora_and_plain_in_peft_order(nf4):
    """Active [plain, DoRA] and [DoRA, plain]: PEFT applies them in order and a DoRA step rescales the running
    result (the earlier adapter's term too); qpeft does the same."""
    ours, pm = _twins(nf4, adapters=(("a", dict(use_dora=True)), ("b", dict(lora_bias=True))))
    x = torch.randn(4, 48)
    for order in (["a", "b"], ["b", "a"]):
        set_lora_adapter(ours, order)
        pm.base_model.set_adapter(order)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), pm(x), rtol=1e-5, atol=1e-5, msg=str(order))


def test_dropout_training_follows_peft_with_the_same_mask():
    ours, pm = _twins(adapters=(("default", dict(use_dora=True, lora_dropout=0.3)),))
    ours.train()
    pm.train()
    x = torch.randn(6, 48)
    torch.manual_seed(11)
    y1 = ours(x)
    torch.manual_seed(11)
    y2 = pm(x)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
@pytest.mark.parametrize("opts", [dict(use_dora=True), dict(lora_bias=True)], ids=["dora", "lora_bias"])
def test_merge_unmerge_and_merge_and_unload(nf4, opts):
    ours, _ = _twins(nf4, adapters=(("default", opts),))
    layer = ours[2]
    x = torch.randn(7, 72)
    with torch.no_grad():
        y = layer(x)
        W = layer._dense_weight_fp32()
        A, B, s = (layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float(),
                   layer.scaling["default"])
        if opts.get("use_dora"):
            target = (layer.lora_magnitude_vector["default"].weight / torch.linalg.vector_norm(W + s * B @ A, dim=1)
                      )[:, None] * (W + s * B @ A)
        else:
            target = W + s * B @ A
        bias_before = layer.base_layer.bias.detach().clone()
        state = copy.deepcopy(layer.base_layer.state_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            errors = layer.merge()
        stored = layer._dense_weight_fp32()
        if nf4:  # the merged weight is the re-quantized target, bit for bit
            q = QLinearNF4.from_linear(nn.Linear(72, 40), compute_dtype=torch.float32)
            q._set_quantized(**QLinearNF4._quantize(target, "nf4", 64, True))
            assert torch.equal(stored, q.dequantize(torch.float32))
            assert errors["default"] > 0
        else:
            torch.testing.assert_close(stored, target, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)  # merged forward == unmerged forward
        if opts.get("lora_bias"):  # scaling * bias, as PEFT's forward adds it
            torch.testing.assert_close(layer.base_layer.bias, bias_before + s * layer.lora_B["default"].bias)
        layer.unmerge()  # the kept pre-merge weight and bias: bit for bit
        assert all(torch.equal(v, layer.base_layer.state_dict()[k]) for k, v in state.items())
        assert torch.equal(layer(x), y)
        # merge_and_unload: a dense layer with the merged weight (fp32 requested)
        plain = copy.deepcopy(layer).merge_and_unload(torch.float32)
        torch.testing.assert_close(plain.weight, target, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(plain(x), y, rtol=1e-4, atol=1e-4)


def test_merged_dora_on_top_of_a_merged_adapter_uses_the_unmerged_norm():
    """PEFT's rule: DoRA's norm is that of the weight without the adapters merged before it."""
    ours, pm = _twins(adapters=(("a", dict()), ("b", dict(use_dora=True))))
    layer, ref = ours[0], pm.base_model.model[0]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge(["a"])
        layer.merge(["b"])
        ref.merge(adapter_names=["a"])
        ref.merge(adapter_names=["b"])
    torch.testing.assert_close(layer.base_layer.weight, ref.base_layer.weight, rtol=1e-5, atol=1e-6)


def test_disable_adapters_with_a_merged_lora_bias_gives_the_base():
    ours, _ = _twins(adapters=(("default", dict(lora_bias=True)),))
    layer = ours[0]
    x = torch.randn(3, 48)
    with torch.no_grad():
        base = layer.base_layer(x)
        layer.merge()
        with layer.disable_adapters():
            torch.testing.assert_close(layer(x), base, rtol=0, atol=0)


def test_refusals():
    lin = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="lora_bias=True is not supported for DoRA"):
        LoraLinear(lin, r=2, use_dora=True, lora_bias=True)
    with pytest.raises(ValueError, match="lora_bias=True is not supported for DoRA"):
        add_lora(_mlp(), ["0"], use_dora=True, lora_bias=True)
    # a lora_bias adapter on a base without bias: trains, but cannot merge (PEFT's rule), nothing written
    layer = LoraLinear(nn.Linear(8, 4, bias=False), r=2, lora_bias=True, init="random")
    before = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="lora_bias=True needs a base layer with a bias"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged


class _Packed4bit(nn.Module):
    """A 4-bit layer type DoRA cannot read: a quant_state that is not a 2-D NF4/FP4 weight."""

    def __init__(self):
        super().__init__()
        import qpeft

        packed, state = qpeft.quantize_blockwise(torch.randn(4, 8))
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state
        self.bias = None


def test_use_dora_on_a_base_dora_cannot_serve_raises_naming_it():
    model = nn.Sequential(_Packed4bit())
    with pytest.raises(ValueError, match=r"use_dora=True: DoRA cannot serve module '0'.*quant_type"):
        add_lora(model, ["0"], use_dora=True)
    assert isinstance(model[0], _Packed4bit)  # nothing was changed


def test_mixed_batch_refuses_dora_rows_and_serves_lora_bias_rows():
    ours, pm = _twins(adapters=(("d", dict(use_dora=True)), ("b", dict(lora_bias=True))))
    ours.eval()
    pm.eval()
    x = torch.randn(4, 48)
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled."):
        ours[0](x, adapter_names=["d", "b", "__base__", "d"])
    names = ["b", "__base__", "b", "__base__"]
    with torch.no_grad():
        y = ours(x, adapter_names=names)
        set_lora_adapter(ours, "b")
        yb = ours(x)
        with lora_layers(ours)["0"].disable_adapters(), lora_layers(ours)["2"].disable_adapters():
            y0 = ours(x)
        pm.set_adapter("b")
        torch.testing.assert_close(yb, pm(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[0::2], yb[0::2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y[1::2], y0[1::2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled."):
        pm(x, adapter_names=["d", "b", "__base__", "d"])  # PEFT's own refusal, the same words


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_dora_compiles_fullgraph(nf4):
    torch._dynamo.reset()
    ours, _ = _twins(nf4, adapters=(("default", dict(use_dora=True)),))
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    x, dy = torch.randn(5, 48), torch.randn(5, 40)
    y1, g1 = _grads(ours, x, dy)
    y2, g2 = _grads(compiled, x, dy)
    torch.testing.assert_close(y2, y1, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-5, atol=1e-5, msg=n)
