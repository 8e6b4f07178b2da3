"""QLinearNF4: forward/backward vs the dequantized weight, bitsandbytes Linear4bit state-dict interop both ways
(identical outputs, bitsandbytes runs on CPU), safetensors round trip, .to() without re-quantization,
chunked quantization, autocast, parameter accounting and bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import qpeft
from qpeft.modules import qlinear_nf4
from qpeft.modules.qlinear_nf4 import QLinearNF4
from utils import assert_close_2x, requires_triton_runtime, triton_device

BNB_KEYS = {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map"}
# (quant_type, double_quant); bnb shapes keep K % 64 == 0: bitsandbytes 0.50.2's CPU dequantize kernel
# mis-places blocks that span rows (checked in tests/ops/test_nf4_matmul.py against its own quantizer)
BNB_CASES = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def _linear(in_f=96, out_f=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def _bnb_from_state_dict(sd, in_f, out_f, quant_type, compute_dtype=torch.float32):
    """A bitsandbytes Linear4bit built from a Linear4bit-format state dict (as transformers does)."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(in_f, out_f, bias="bias" in sd, compute_dtype=compute_dtype, quant_type=quant_type)
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, requires_grad=False, device="cpu",
                                                       module=layer)
    if "bias" in sd:
        layer.bias = nn.Parameter(sd["bias"].clone())
    return layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_f,out_f", [(96, 40), (70, 33)])
def test_forward_backward_match_dequantized_linear(in_f, out_f, bias):
    lin = _linear(in_f, out_f, bias)
    q = QLinearNF4.from_linear(lin, compute_dtype=torch.float32)
    W = q.dequantize(torch.float32)
    assert (W - lin.weight).abs().max() <= lin.weight.abs().max() * 0.2  # 4-bit: coarse but close
    x = torch.randn(2, 5, in_f, requires_grad=True)
    y = q(x)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = F.linear(x2, W, None if lin.bias is None else lin.bias.detach())
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(q.bias.grad, dy.sum((0, 1)), rtol=1e-5, atol=1e-5)
    assert all(not b.requires_grad for b in q.buffers())


def test_compute_dtype_and_output_dtype():
    q = QLinearNF4.from_linear(_linear(), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 96)
    y = q(x)
    assert y.dtype == torch.float32
    want = (x.bfloat16().float() @ q.dequantize(torch.float32).t() + q.bias.bfloat16().float()).bfloat16().float()
    torch.testing.assert_close(y, want, rtol=0, atol=0)


def test_autocast_uses_autocast_dtype():
    q = QLinearNF4.from_linear(_linear(), compute_dtype=torch.float32)
    x = torch.randn(3, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), (x @ q.dequantize(torch.float32).t() + q.bias).detach(),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("quant_type,double_quant", BNB_CASES)
def test_state_dict_matches_bitsandbytes_linear4bit(quant_type, double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    lin = _linear(128, 48)
    q = QLinearNF4.from_linear(lin, compute_dtype=torch.float32, quant_type=quant_type, double_quant=double_quant)
    ref = bnb.nn.Linear4bit(128, 48, compute_dtype=torch.float32, quant_type=quant_type,
                            compress_statistics=double_quant)
    ref.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type=quant_type,
                                   compress_statistics=double_quant, blocksize=64, module=ref)
    ref.bias = nn.Parameter(lin.bias.detach().clone())
    ref = ref.to("cpu")  # bitsandbytes quantizes on .to()
    ours, theirs = q.state_dict(), ref.state_dict()
    assert list(ours) == list(theirs)  # same keys, same order
    blob = f"weight.quant_state.bitsandbytes__{quant_type}"
    assert blob in ours and set(ours) - {blob} == (BNB_KEYS if double_quant else BNB_KEYS - {
        "weight.nested_absmax", "weight.nested_quant_map"})
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k


@pytest.mark.parametrize("quant_type,double_quant", BNB_CASES)
def test_bitsandbytes_to_qpeft_identical_outputs(quant_type, double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(1)
    ref = bnb.nn.Linear4bit(128, 24, compute_dtype=torch.float32, quant_type=quant_type,
                            compress_statistics=double_quant).to("cpu")
    q = QLinearNF4(128, 24, compute_dtype=torch.float32, quant_type="nf4", double_quant=not double_quant)
    q.load_state_dict(ref.state_dict())
    assert q.quant_type == quant_type and q.double_quant == double_quant
    x = torch.randn(5, 128)
    with torch.no_grad():
        torch.testing.assert_close(q(x), ref(x), rtol=0, atol=0)
    assert torch.equal(q.dequantize(torch.float32),
                       bnb.functional.dequantize_4bit(ref.weight.data, ref.weight.quant_state))


@pytest.mark.parametrize("quant_type,double_quant", BNB_CASES)
def test_qpeft_to_bitsandbytes_identical_outputs(quant_type, double_quant):
    q = QLinearNF4.from_linear(_linear(192, 40, seed=3), compute_dtype=torch.float32, quant_type=quant_type,
                               double_quant=double_quant)
    ref = _bnb_from_state_dict(q.state_dict(), 192, 40, quant_type)
    x = torch.randn(4, 192)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), q(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quant_type,double_quant", BNB_CASES)
def test_bitsandbytes_state_dict_half_precision_outputs(quant_type, double_quant, dtype):
    """docs/quantization.md: in fp16/bf16 a bitsandbytes state dict gives QLinearNF4 bit-identical dequantized
    weights, but not identical outputs on the CPU (the matmuls round differently); both are within 2x of PyTorch's
    own error in that dtype against an fp64 oracle."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(2)
    ref = bnb.nn.Linear4bit(256, 64, compute_dtype=dtype, quant_type=quant_type,
                            compress_statistics=double_quant).to("cpu")
    ref.bias = nn.Parameter(torch.randn(64, dtype=dtype) * 0.1)
    q = QLinearNF4(256, 64, compute_dtype=dtype)
    q.load_state_dict(ref.state_dict())
    W = bnb.functional.dequantize_4bit(ref.weight.data, ref.weight.quant_state).to(dtype)
    assert torch.equal(q.dequantize(dtype), W)
    x = torch.randn(16, 256).to(dtype)
    with torch.no_grad():
        ours, theirs = q(x), ref(x)
        oracle = F.linear(x.double(), W.double(), ref.bias.double())
        plain = F.linear(x, W, ref.bias)
    assert ours.dtype == theirs.dtype == dtype
    assert_close_2x(ours, oracle, plain, what="qpeft")
    assert_close_2x(theirs, oracle, plain, what="bitsandbytes")


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    q = QLinearNF4.from_linear(_linear(70, 33), compute_dtype=torch.float32, quant_type="fp4")
    save_file(q.state_dict(), str(tmp_path / "q.safetensors"))
    q2 = QLinearNF4(70, 33, compute_dtype=torch.float32, device="meta")
    q2.load_state_dict(load_file(str(tmp_path / "q.safetensors")))
    x = torch.randn(3, 70)
    torch.testing.assert_close(q2(x), q(x), rtol=0, atol=0)
    assert q2.quant_type == "fp4" and q2.weight.device.type == "cpu"


def test_failed_load_leaves_module_unchanged():
    q = QLinearNF4.from_linear(_linear(), compute_dtype=torch.float32)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    other = QLinearNF4.from_linear(_linear(96, 41, seed=5)).state_dict()  # wrong out_features
    with pytest.raises(RuntimeError, match=r"quantized shape \(41, 96\) does not match .* \(40, 96\)"):
        q.load_state_dict(other)
    bad = dict(before)
    bad["weight.absmax"] = before["weight.absmax"][:-1]
    with pytest.raises(RuntimeError, match="absmax"):
        q.load_state_dict(bad)
    with pytest.raises(RuntimeError, match="Missing key"):
        q.load_state_dict({k: v for k, v in before.items() if k != "bias"})
    after = q.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_load_without_the_bias_loads_the_weight_and_reports_the_bias_missing_as_nn_linear():
    src = QLinearNF4.from_linear(_linear(seed=1), compute_dtype=torch.float32)
    sd = {k: v for k, v in src.state_dict().items() if k != "bias"}
    q = QLinearNF4.from_linear(_linear(seed=2), compute_dtype=torch.float32)
    bias0 = q.bias.detach().clone()
    lin, lin_src = _linear(seed=2), _linear(seed=1)
    expected = lin.load_state_dict({"weight": lin_src.weight.detach()}, strict=False)
    result = q.load_state_dict(sd, strict=False)
    assert result.missing_keys == expected.missing_keys == ["bias"] and not result.unexpected_keys
    assert torch.equal(q.weight, src.weight) and torch.equal(q.absmax_bytes, src.absmax_bytes)
    assert torch.equal(q.bias, bias0)  # the layer's own bias stays, as nn.Linear's does
    torch.testing.assert_close(q.dequantize(torch.float32), src.dequantize(torch.float32), rtol=0, atol=0)
    q2 = QLinearNF4.from_linear(_linear(seed=2), compute_dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"bias\""):
        q2.load_state_dict(sd)  # strict: raises, like nn.Linear, after loading the weight
    assert torch.equal(q2.weight, src.weight)


def test_a_load_without_the_packed_weight_leaves_the_layer_alone():
    """DeepSpeed's exclude_frozen_parameters checkpoint (the Trainer's under ZeRO-3 with PEFT) drops the frozen
    Parameters by name (`weight`, `absmax_bytes`) and keeps the statistics' bitsandbytes keys; resuming loads it
    with strict=False. The layer is then missing, not an error, and unchanged; a strict load still raises."""
    q = QLinearNF4.from_linear(_linear(), compute_dtype=torch.float32)
    before = {k: v.clone() for k, v in q.state_dict().items()}
    partial = {k: v for k, v in before.items() if k != "weight"}
    assert any(k.startswith("weight.") for k in partial)
    result = q.load_state_dict(partial, strict=False)
    assert "weight" in result.missing_keys
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"weight\""):
        q.load_state_dict(partial)


@pytest.mark.parametrize("double_quant", [True, False])
def test_storage_is_frozen_uint8_parameters_read_through_free_views(double_quant):
    """The packed weight and the absmax bytes are the only tensors that grow with the layer: frozen uint8
    Parameters (what FSDP2 / ZeRO-3 shard; never cast by a mixed-precision policy). The kernels' absmax is a
    view of the same bytes, and the state dict keeps bitsandbytes' keys and dtypes."""
    q = QLinearNF4.from_linear(_linear(), compute_dtype=torch.float32, double_quant=double_quant)
    params = dict(q.named_parameters())
    assert set(params) == {"weight", "absmax_bytes", "bias"}
    blocks = 96 * 40 // 64
    assert params["weight"].dtype == torch.uint8 and params["weight"].shape == (96 * 40 // 2, 1)
    assert params["absmax_bytes"].dtype == torch.uint8
    assert params["absmax_bytes"].shape == ((blocks, 1) if double_quant else (blocks, 4))
    assert not params["weight"].requires_grad and not params["absmax_bytes"].requires_grad
    assert q.absmax.data_ptr() == q.absmax_bytes.data_ptr()  # a view, no copy
    assert q.absmax.dtype == (torch.uint8 if double_quant else torch.float32) and q.absmax.shape == (blocks,)
    sd = q.state_dict()
    assert "absmax_bytes" not in sd and "weight.absmax" in sd and sd["weight.absmax"].shape == (blocks,)
    # the fp32 absmax's own bytes, reassembled: equal to what a fresh quantization computes
    _, state = qpeft.quantize_4bit(_linear().weight.detach(), blocksize=64, quant_type="nf4",
                                   double_quant=double_quant)
    assert torch.equal(sd["weight.absmax"], state.absmax)
    assert {n for n, _ in q.named_buffers()} == ({"quant_map", "nested_absmax", "nested_quant_map", "offset"}
                                                  if double_quant else {"quant_map"})


def test_to_never_requantizes_or_casts_quant_buffers():
    q = QLinearNF4.from_linear(_linear(), compute_dtype=torch.float32)
    bufs = {n: b.clone() for n, b in [*q.named_buffers(), ("weight", q.weight), ("absmax_bytes", q.absmax_bytes)]}
    x = torch.randn(2, 96)
    y = q(x)
    q.to(torch.bfloat16)
    q.half().float()
    q.to("cpu")
    for n, b in [*q.named_buffers(), ("weight", q.weight), ("absmax_bytes", q.absmax_bytes)]:
        assert b.dtype == bufs[n].dtype and torch.equal(b, bufs[n]), n
    assert q.bias.dtype == torch.float32
    torch.testing.assert_close(q(x), y, rtol=1e-2, atol=1e-2)  # only the bias went through fp16/bf16


def test_chunked_quantization_is_identical(monkeypatch):
    lin = _linear(100, 30)  # 3000 weights: chunks of 256 end mid-row
    whole = QLinearNF4.from_linear(lin).state_dict()
    monkeypatch.setattr(qlinear_nf4, "QUANT_CHUNK", 256)
    chunked = QLinearNF4.from_linear(lin).state_dict()
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


def test_non_finite_weight_raises():
    lin = _linear()
    with torch.no_grad():
        lin.weight[3, 7] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        QLinearNF4.from_linear(lin)


def test_repr_numel_and_parameter_count():
    q = QLinearNF4(96, 40, quant_type="fp4", blocksize=128)
    text = repr(q)
    assert "quant_type=fp4" in text and "blocksize=128" in text and "MiB" in text
    assert q.quantized_numel() == 96 * 40
    report = qpeft.trainable_parameters(q)
    assert report.total == 96 * 40 + 40 and report.trainable == 40
    blocks = 96 * 40 // 128  # packed bytes + uint8 absmax + code book + nested absmax, code and offset
    assert q.memory_bytes() == 96 * 40 // 2 + blocks + 16 * 4 + 1 * 4 + 256 * 4 + 4


def test_bad_arguments():
    with pytest.raises(ValueError, match="quant_type must be one of"):
        QLinearNF4(8, 8, quant_type="int4")
    with pytest.raises(ValueError, match=r"blocksize must be one of .*got 48"):
        QLinearNF4(8, 8, blocksize=48)
    q = QLinearNF4(64, 8)
    with pytest.raises(ValueError, match=r"\(\.\.\., 64\).*\(3, 65\)"):
        q(torch.randn(3, 65))
    with pytest.raises(TypeError, match="torch.int64"):
        QLinearNF4(64, 8, compute_dtype=None)(torch.ones(3, 64, dtype=torch.long))


@pytest.mark.triton
@requires_triton_runtime
def test_module_on_triton_kernels(monkeypatch):
    monkeypatch.setenv("QPEFT_BACKEND", "triton")
    dev = triton_device()
    q = QLinearNF4.from_linear(_linear(128, 40).to(dev), compute_dtype=torch.float16)
    W = q.dequantize(torch.float32)
    x = torch.randn(3, 5, 128, device=dev, requires_grad=True)
    y = q(x)
    xh = x.detach().half()
    assert_close_2x(y, x.detach() @ W.t() + q.bias.detach(),
                    (xh @ W.half().t() + q.bias.detach().half()).float(), what="forward")
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_close_2x(x.grad, dy @ W, (dy.half() @ W.half()).float(), what="dx")
