"""QuantState: bitsandbytes' serialization keys, interop both ways, validation on load, devices."""
from __future__ import annotations

import json

import pytest
import torch

import qpeft
from qpeft.formats import codes
from qpeft.quant.state import QuantState, pack_json, unpack_json

F = pytest.importorskip("bitsandbytes.functional")


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core box: OpenMP spin-waiting only costs time
    try:
        with torch.compiler.set_stance("force_eager"):  # bnb's torch.compile-wrapped CPU fallbacks
            yield
    finally:
        torch.set_num_threads(threads)


def _quantized(double_quant=True, quant_type="nf4", shape=(40, 70), dtype=torch.bfloat16, blocksize=64):
    A = torch.randn(*shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    return A, *qpeft.quantize_4bit(A, blocksize, quant_type, double_quant)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_as_dict_uses_bitsandbytes_keys_and_blob(quant_type, double_quant):
    A, packed, st = _quantized(double_quant, quant_type)
    bpacked, bst = F.quantize_4bit(A, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    ours, theirs = st.as_dict(packed=True), bst.as_dict(packed=True)
    assert set(ours) == set(theirs)
    blob = f"quant_state.bitsandbytes__{quant_type}"
    assert ours[blob].dtype == torch.uint8
    assert unpack_json(ours[blob]) == json.loads(bytes(theirs[blob].tolist()).decode("utf-8"))
    for k in ours:
        if k != blob:
            assert torch.equal(ours[k], theirs[k]) or (k == "absmax" and double_quant), k
            assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
    if double_quant:
        assert ours["absmax"].dtype == torch.uint8
        assert ours["nested_quant_map"].data_ptr() != st.state2.code.data_ptr()  # unshared for safetensors
    unpacked = st.as_dict(packed=False)
    assert unpacked["dtype"] == "bfloat16" and unpacked["shape"] == (40, 70) and unpacked["blocksize"] == 64


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_interop_both_ways(double_quant):
    A, packed, st = _quantized(double_quant, "fp4", shape=(33, 31), dtype=torch.float16, blocksize=128)
    bpacked, bst = F.quantize_4bit(A, blocksize=128, quant_type="fp4", compress_statistics=double_quant)
    # bnb -> qpeft, with a state_dict-style prefix on every key
    prefixed = {f"model.layers.0.weight.{k}": v for k, v in bst.as_dict(packed=True).items()}
    ours = QuantState.from_dict(prefixed, "cpu", packed=bpacked)
    assert ours.nested == double_quant and ours.shape == A.shape and ours.dtype == torch.float16
    assert torch.equal(qpeft.dequantize_4bit(bpacked, ours), F.dequantize_4bit(bpacked, bst))
    # qpeft -> bnb
    theirs = F.QuantState.from_dict(st.as_dict(packed=True), device=torch.device("cpu"))
    assert torch.equal(F.dequantize_4bit(packed, theirs), qpeft.dequantize_4bit(packed, st))
    # decoded absmax equals bnb's decode of the same state
    if double_quant:
        bnb_absmax = F.dequantize_blockwise(st.absmax, theirs.state2) + theirs.offset
        assert torch.equal(st.decoded_absmax(), bnb_absmax)
    else:
        assert st.decoded_absmax() is st.absmax


def test_round_trips(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    A, packed, st = _quantized(True, "nf4", shape=(17, 19), dtype=torch.float32, blocksize=32)
    want = qpeft.dequantize_4bit(packed, st)
    for d in (st.as_dict(packed=True), st.as_dict(packed=False)):
        back = QuantState.from_dict(dict(d), "cpu")
        assert torch.equal(qpeft.dequantize_4bit(packed, back), want)
    # through a safetensors file, as Linear4bit checkpoints are written: weight + weight.<key>
    tensors = {"weight": packed, **{f"weight.{k}": v for k, v in st.as_dict(packed=True).items()}}
    safetensors.save_file(tensors, str(tmp_path / "w.safetensors"))
    loaded = safetensors.load_file(str(tmp_path / "w.safetensors"))
    w = loaded.pop("weight")
    back = QuantState.from_dict(loaded, "cpu", packed=w)
    assert torch.equal(qpeft.dequantize_4bit(w, back), want)
    # the loaded state does not alias the dict it came from
    loaded["weight.absmax"].zero_()
    assert torch.equal(qpeft.dequantize_4bit(w, back), want)


@pytest.mark.parametrize("blocksize", [64, 100, 16384])  # 8-bit blockwise: any length, as bitsandbytes' CPU
def test_blockwise8_state_round_trip(blocksize):
    A = torch.randn(300, generator=torch.Generator().manual_seed(4))
    q, st = qpeft.quantize_blockwise(A, blocksize=blocksize)
    d = st.as_dict(packed=True)
    assert "quant_state.qpeft__blockwise8" in d and d["quant_map"].numel() == 256
    back = QuantState.from_dict(d, "cpu", packed=q)
    assert back.quant_type == "blockwise8" and torch.equal(qpeft.dequantize_blockwise(q, back),
                                                           qpeft.dequantize_blockwise(q, st))
    for bad in (0, -1, True, 64.0):
        with pytest.raises(ValueError, match=f"blocksize must be a positive int for blockwise8, got {bad!r}"):
            QuantState(st.absmax, st.shape, st.dtype, bad, "blockwise8", st.code).validate(q)


def test_to_device_moves_every_tensor():
    _, packed, st = _quantized(True)
    assert st.to("cpu") is st and st.validate(packed) is st
    assert st.to("meta") is st
    tensors = [st.absmax, st.code, st.offset, st.state2.absmax, st.state2.code]
    assert all(t.device.type == "meta" for t in tensors)
    with pytest.raises(ValueError, match="absmax is on meta but the packed tensor is on cpu"):
        st.validate(packed)
    assert "nested(blocksize=256" in repr(st)


def _mutated(d: dict, **changes) -> dict:
    d = dict(d)
    for k, v in changes.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    return d


def test_from_dict_rejects_inconsistent_states():
    A, packed, st = _quantized(True, shape=(40, 70), blocksize=64)  # 2800 values: 44 blocks
    good = st.as_dict(packed=True)
    blob = "quant_state.bitsandbytes__nf4"
    meta = unpack_json(good[blob])
    cases = [
        (dict(absmax=good["absmax"][:-1]), r"absmax must be torch.uint8 with ceil\(2800/64\) = 44 entries"),
        (dict(absmax=good["absmax"].float()), "absmax must be torch.uint8"),
        (dict(quant_map=torch.zeros(8)), "code \\(quant_map\\) must be a float32 tensor of 16 entries"),
        (dict(nested_absmax=torch.zeros(3)), r"nested_absmax must be float32 with ceil\(44/256\) = 1 entries"),
        (dict(nested_quant_map=torch.zeros(255)), "nested_quant_map must be a float32 tensor of 256"),
        (dict(nested_absmax=None), "absmax must be torch.float32"),  # codes without their nested state
        ({blob: pack_json({**meta, "blocksize": 48})}, r"blocksize must be one of \(32"),
        ({blob: pack_json({**meta, "dtype": "float64"})}, "dtype must be one of"),
        ({blob: pack_json({**meta, "shape": [40, -70]})}, "shape must be a list of positive ints"),
        ({blob: pack_json({**meta, "shape": [41, 70]})}, "absmax must be torch.uint8 with ceil"),
        ({blob: pack_json({**meta, "quant_type": "fp4"})}, "says quant_type 'fp4', its key says 'nf4'"),
        ({blob: pack_json({**meta, "nested_offset": float("nan")})}, "nested_offset must be a finite float"),
        ({blob: torch.tensor([0xFF, 0xFE], dtype=torch.uint8)}, "is not UTF-8 JSON"),
        ({blob: None, "quant_state.bitsandbytes__int4": good[blob]}, "must end with one of"),
        ({"quant_state.bitsandbytes__fp4": good[blob]}, "exactly one"),
        ({blob: None}, "found neither"),
        ({"bias": torch.zeros(3)}, r"unexpected keys \['bias'\]"),
        ({blob: pack_json({k: v for k, v in meta.items() if k != "nested_dtype"})}, r"missing keys \['nested_dtype'\]"),
    ]
    for changes, message in cases:
        d = _mutated(good, **changes)
        before = {k: v.clone() for k, v in d.items()}
        with pytest.raises(ValueError, match=message):
            QuantState.from_dict(d, "cpu")
        assert d.keys() == before.keys() and all(torch.equal(d[k], before[k]) for k in d)  # input untouched
    # fields that agree with each other but not with the packed tensor
    with pytest.raises(ValueError, match=r"must hold \(n\+1\)//2 = 1400 bytes"):
        QuantState.from_dict(good, "cpu", packed=packed[:-1])
    assert QuantState.from_dict(good, "cpu", packed=packed).validate(packed).nested


def test_validate_catches_hand_built_states():
    A = torch.randn(100)
    packed, st = qpeft.quantize_4bit(A, 32, "fp4", double_quant=False)
    with pytest.raises(ValueError, match="quant_type must be one of"):
        QuantState(st.absmax, (100,), torch.float32, 32, "int4", st.code).validate()
    with pytest.raises(ValueError, match="offset is set but there is no nested state"):
        QuantState(st.absmax, (100,), torch.float32, 32, "fp4", st.code, offset=torch.tensor(0.0)).validate()
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16"):
        QuantState(st.absmax, (100,), torch.int8, 32, "fp4", st.code).validate()
    with pytest.raises(ValueError, match="state.quant_type must be 'nf4' or 'fp4' for dequantize_4bit"):
        q, s8 = qpeft.quantize_blockwise(A)
        qpeft.dequantize_4bit(packed, s8)
    with pytest.raises(ValueError, match="the 8-bit codes must be uint8 with 100 elements"):
        qpeft.dequantize_blockwise(torch.zeros(99, dtype=torch.uint8), qpeft.quantize_blockwise(A)[1])
    assert codes.fp4().numel() == st.code.numel()
