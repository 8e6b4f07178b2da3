"""Blockwise quantizers on CPU: bit-exact with bitsandbytes, the bnb error fingerprint, opcheck, bad input.

bitsandbytes on CPU runs its PyTorch backend for 4-bit quantize (the format's reference semantics) and its
native library (libbitsandbytes_cpu) for 8-bit quantize and for dequantize. The native 8-bit quantizer rounds
through a 65536-entry table of scaled values, so it is exact only to within 2/65535 (its CUDA kernel and its
PyTorch backend round exactly); 8-bit codes are therefore compared bit-exactly with bnb's PyTorch backend
(reached with `redispatch` to CompositeExplicitAutograd) and within that table resolution with the native one.
"""
from __future__ import annotations

import pytest
import torch

import qpeft
from qpeft.formats import codes
from qpeft.quant.state import QuantState
from qpeft.reference import quantize as ref
from utils import DTYPES

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
QUANT_TYPES = ["nf4", "fp4"]
_CEA = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
LUT_RESOLUTION = 2.0 / 65535  # bnb's native CPU 8-bit quantizer: bins of its 65536-entry lookup table


@pytest.fixture(autouse=True)
def _bnb_eager_single_thread():
    # bnb wraps its CPU fallbacks in torch.compile(dynamic=False): one compile per shape would take minutes.
    # One intra-op thread: these tensors are tiny, and on the shared 2-core box OpenMP spin-waiting made each
    # test 14x slower (0.90 s vs 0.065 s per sweep case).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        torch.set_num_threads(threads)


def _inputs(bs: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Odd sizes for blocksize bs: numel not a multiple of bs, odd numel, an exact multiple, a non-contiguous
    view, and an all-zero block (absmax 0). Values ~ N(0, 3) with a few outliers."""
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) * 3).to(dtype)  # noqa: E731
    odd = mk(3, bs + 5)                      # 3bs + 15 elements: 3 full blocks + a partial tail
    odd.view(-1)[0] = 40.0                   # an outlier sets one block's scale
    tiny = mk(1, 7)                          # fewer elements than one block, odd
    exact = mk(2, bs)                        # two whole blocks
    exact[1].zero_()                         # an all-zero block
    strided = mk(bs + 3, 6).t()              # non-contiguous (transposed), 6bs + 18 elements
    return [odd, tiny, exact, strided]


def _bnb_default_quantize_blockwise(A: torch.Tensor, code: torch.Tensor, bs: int):
    """bnb's PyTorch backend for 8-bit blockwise (what its CUDA kernel computes)."""
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(_CEA, A, code, bs)


def _native_absmax_as_ours(absmax: torch.Tensor, n: int, bs: int) -> torch.Tensor:
    """bnb's native 8-bit kernel stores an all-zero partial tail block's absmax as 0; its PyTorch backend (and
    qpeft) store the floor 1e-38 there. Either way the block decodes to 0 * scale (+ offset)."""
    if n % bs == 0:
        return absmax
    return torch.cat([absmax[:-1], absmax[-1:].clamp(min=ref.ABSMAX_FLOOR)])


def _assert_within_lut_resolution(A, bs, code, q_ours, q_native):
    """Our codes are the exact nearest entries; bnb's native ones within its table resolution of that.
    Blocks with absmax 0 decode to 0 whatever the code (bnb's native kernel emits code 0 there: 0 * 1/0)."""
    scaled, absmax = ref._scale_blocks(A, bs)
    live = torch.repeat_interleave(absmax > ref.ABSMAX_FLOOR, bs)[:scaled.numel()]
    d_ours = (code[q_ours.long().reshape(-1)] - scaled).abs()[live]
    d_native = (code[q_native.long().reshape(-1)] - scaled).abs()[live]
    assert bool((d_ours <= d_native + 1e-7).all()), "qpeft's 8-bit code is not the nearest entry"
    assert bool((d_native <= d_ours + LUT_RESOLUTION).all()), "codes differ by more than bnb's table resolution"


# --- code books ---------------------------------------------------------------------------------------------
def test_codebooks_match_bitsandbytes():
    assert torch.equal(codes.nf4(), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(codes.fp4(), F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(codes.dynamic_map(), F.create_dynamic_map(signed=True))
    assert torch.equal(codes.dynamic_map(signed=False), F.create_dynamic_map(signed=False))
    dm = codes.dynamic_map()
    assert dm.numel() == 256 and dm[127] == 0 and dm[255] == 1.0 and abs(dm[0].item() + 0.99297) < 1e-5
    # FP4: code 1 is 1/192 (bnb issue #2025: a truncated constant broke this once)
    assert codes.fp4()[1].item() == pytest.approx(1 / 192, rel=1e-7)
    # the sorted-position -> code map is bnb's argsort of its table
    _, order = torch.sort(F.get_4bit_type("fp4", device="cpu"), stable=True)
    assert order.tolist() == list(codes.FP4_SORTED_CODES)


def test_normal_map_is_the_nf4_construction():
    nm = codes.normal_map()
    assert nm.numel() == 256 and nm.max() == 1.0 and nm.min() == -1.0
    assert torch.equal(torch.cat([nm[:8], nm[-8:]]), codes.nf4())
    pytest.importorskip("scipy")
    assert torch.equal(nm, F.create_normal_map())
    assert torch.equal(codes.normal_map(0.99, use_extra_value=False),
                       F.create_normal_map(0.99, use_extra_value=False))


def test_quantile_code_equal_mass():
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(1)) * 2 + 0.3
    for bits in (2, 4, 8):
        c = codes.quantile_code(x, bits)
        assert c.numel() == 2 ** bits and c.dtype == torch.float32
        assert bool((c[1:] >= c[:-1]).all()) and c.abs().max() == 1.0 and bool((c == 0).any())
        # the non-zero entries are x's quantiles at the centres of 2^bits - 1 equal-mass bins (scaled)
        k = 2 ** bits - 1
        probs = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        want = torch.quantile(x.double(), probs)
        want = torch.cat([want, want.new_zeros(1)]).sort().values
        torch.testing.assert_close(c.double(), want / want.abs().max(), atol=1e-6, rtol=0)
    # a data-fitted 4-bit code beats the uniform one on skewed data through quantize_blockwise
    skew = torch.randn(4096, generator=torch.Generator().manual_seed(2)).exp()
    fitted = codes.quantile_code(skew, 4)
    uniform = torch.linspace(-1, 1, 16)
    errs = [(qpeft.dequantize_blockwise(*qpeft.quantize_blockwise(skew, c, 4096)) - skew).abs().mean().item()
            for c in (fitted, uniform)]
    assert errs[0] < errs[1]


# --- 4-bit vs bitsandbytes: the sweep -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_4bit_matches_bitsandbytes(quant_type, double_quant, blocksize, dtype):
    for i, A in enumerate(_inputs(blocksize, dtype, seed=blocksize + i_dtype(dtype))):
        what = f"input {i} {tuple(A.shape)} contiguous={A.is_contiguous()}"
        packed, st = qpeft.quantize_4bit(A, blocksize, quant_type, double_quant)
        bpacked, bst = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type,
                                       compress_statistics=double_quant)
        assert packed.shape == bpacked.shape == ((A.numel() + 1) // 2, 1), what
        assert torch.equal(packed, bpacked), f"packed bytes differ: {what}"
        assert torch.equal(st.code, bst.code) and st.shape == bst.shape and st.dtype == bst.dtype
        if not double_quant:
            assert torch.equal(st.absmax, bst.absmax), f"absmax differs: {what}"
        else:
            assert torch.equal(st.offset, bst.offset), f"offset differs: {what}"
            absmax32 = torch.ops.bitsandbytes.quantize_4bit(A, blocksize, quant_type, torch.uint8)[1]
            q_default, absmax2_default = _bnb_default_quantize_blockwise(absmax32 - bst.offset, codes.dynamic_map(),
                                                                         256)
            assert torch.equal(st.absmax, q_default), f"absmax codes differ from bnb's PyTorch backend: {what}"
            assert torch.equal(st.state2.absmax, absmax2_default), f"nested absmax differs: {what}"
            assert torch.equal(st.state2.absmax, _native_absmax_as_ours(bst.state2.absmax, absmax32.numel(), 256))
            assert torch.equal(st.state2.code, bst.state2.code)
            _assert_within_lut_resolution(absmax32 - bst.offset, 256, codes.dynamic_map(), st.absmax, bst.absmax)
        out = qpeft.dequantize_4bit(packed, st)
        assert out.dtype == dtype and out.shape == A.shape, what
        # bnb dequantizing our state (through its own from_dict), and we dequantizing bnb's: identical values
        bst_from_ours = F.QuantState.from_dict(st.as_dict(packed=True), device=torch.device("cpu"))
        assert torch.equal(F.dequantize_4bit(packed, bst_from_ours).reshape(A.shape), out), what
        ours_from_bnb = QuantState.from_dict(bst.as_dict(packed=True), "cpu", packed=bpacked)
        assert torch.equal(qpeft.dequantize_4bit(bpacked, ours_from_bnb),
                           F.dequantize_4bit(bpacked, bst).reshape(A.shape)), what


def i_dtype(dtype) -> int:
    return DTYPES.index(dtype) * 7919


def test_non_contiguous_equals_contiguous():
    base = torch.randn(96, 70)
    view = base[::2, 1::3]
    assert not view.is_contiguous()
    for qt in QUANT_TYPES:
        p1, s1 = qpeft.quantize_4bit(view, 64, qt)
        p2, s2 = qpeft.quantize_4bit(view.contiguous(), 64, qt)
        assert torch.equal(p1, p2) and torch.equal(s1.absmax, s2.absmax)
        assert torch.equal(qpeft.dequantize_4bit(p1, s1), qpeft.dequantize_4bit(p2, s2))
    q1, t1 = qpeft.quantize_blockwise(view)
    q2, t2 = qpeft.quantize_blockwise(view.contiguous())
    assert torch.equal(q1, q2) and torch.equal(t1.absmax, t2.absmax)
    # a non-contiguous packed tensor (a strided view of the right bytes) dequantizes the same
    p, s = qpeft.quantize_4bit(view, 64, "nf4")
    strided = torch.stack([p, torch.zeros_like(p)], dim=1).reshape(-1, 2)[:, 0:1]
    assert not strided.is_contiguous() and torch.equal(qpeft.dequantize_4bit(strided, s), qpeft.dequantize_4bit(p, s))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16, torch.float32, torch.int32], ids=str)
def test_quant_storage_reinterprets_the_bytes(storage):
    A = torch.randn(48, 40)
    p8, s8 = qpeft.quantize_4bit(A, 64, "nf4")
    p, s = qpeft.quantize_4bit(A, 64, "nf4", quant_storage=storage)
    bp, _ = F.quantize_4bit(A, blocksize=64, quant_type="nf4", quant_storage=storage)
    assert p.dtype == storage and p.shape == bp.shape == (960 // p.element_size(), 1)
    assert torch.equal(p.view(torch.uint8).reshape(-1), bp.view(torch.uint8).reshape(-1))
    assert torch.equal(p.view(torch.uint8).reshape(-1, 1), p8)
    assert torch.equal(qpeft.dequantize_4bit(p, s), qpeft.dequantize_4bit(p8, s8))


def test_quantizing_a_parameter_builds_no_autograd_graph():
    w = torch.nn.Linear(40, 24).weight
    p, s = qpeft.quantize_4bit(w)
    tensors = [p, s.absmax, s.offset, s.state2.absmax, qpeft.dequantize_4bit(p, s),
               qpeft.quantize_blockwise(w)[1].absmax, qpeft.quantize_linear(w)[1].scale]
    assert not any(t.requires_grad for t in tensors)


def test_dequantize_4bit_output_dtype_override():
    A = torch.randn(33, 17, dtype=torch.bfloat16)
    p, s = qpeft.quantize_4bit(A, 32, "fp4", double_quant=False)
    out32 = qpeft.dequantize_4bit(p, s, dtype=torch.float32)
    assert out32.dtype == torch.float32
    assert torch.equal(out32.to(torch.bfloat16), qpeft.dequantize_4bit(p, s))  # fp32 product, rounded once


# --- 8-bit blockwise vs bitsandbytes -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", BLOCKSIZES + [16384, 8192, 100, 5000, 7])  # bnb's CPU takes any length
def test_quantize_blockwise_matches_bitsandbytes(blocksize, dtype):
    code = codes.dynamic_map()
    for i, A in enumerate(_inputs(blocksize, dtype, seed=3 * blocksize + i_dtype(dtype))):
        what = f"input {i} {tuple(A.shape)}"
        q, st = qpeft.quantize_blockwise(A, blocksize=blocksize)
        assert q.shape == A.shape and q.dtype == torch.uint8 and st.quant_type == "blockwise8"
        q_default, absmax_default = _bnb_default_quantize_blockwise(A, code, blocksize)
        assert torch.equal(q, q_default.reshape(A.shape)), f"codes differ from bnb's PyTorch backend: {what}"
        assert torch.equal(st.absmax, absmax_default), what
        q_native, bst = F.quantize_blockwise(A, blocksize=blocksize)
        assert torch.equal(st.absmax, _native_absmax_as_ours(bst.absmax, A.numel(), blocksize)), what
        _assert_within_lut_resolution(A, blocksize, code, q, q_native)
        out = qpeft.dequantize_blockwise(q, st)
        assert out.dtype == dtype and out.shape == A.shape
        bout_dtype = torch.ops.bitsandbytes.dequantize_blockwise(q.contiguous(), st.absmax, code, blocksize, dtype)
        assert torch.equal(out, bout_dtype), f"dequantized values differ from bnb: {what}"


def test_blockwise_lengths_beyond_the_kernels_run_the_reference(monkeypatch):
    """Block lengths the kernels do not tile (not 32..4096 powers of two) never reach a backend's kernel: the
    PyTorch reference runs, on any device; the kernel sizes still ask the backend."""
    from qpeft.ops import quantize as ops_quantize

    def no_kernel(op, device):
        raise AssertionError(f"{op} asked for a kernel")

    monkeypatch.setattr(ops_quantize._backend, "select", no_kernel)
    A = torch.randn(3, 20001, generator=torch.Generator().manual_seed(2))
    code = codes.dynamic_map()
    for bs in (16384, 100):
        q, st = qpeft.quantize_blockwise(A, blocksize=bs)
        q_ref, absmax_ref = ref.quantize_blockwise_ref(A, code, bs)
        assert torch.equal(q.reshape(-1), q_ref) and torch.equal(st.absmax, absmax_ref)
        assert torch.equal(qpeft.dequantize_blockwise(q, st).reshape(-1),
                           ref.dequantize_blockwise_ref(q_ref, absmax_ref, code, bs, torch.float32))
    with pytest.raises(AssertionError, match="asked for a kernel"):
        qpeft.quantize_blockwise(A, blocksize=4096)


def test_native_cpu_quantizer_difference_as_documented():
    """docs/quantization.md: where bitsandbytes' native CPU 8-bit quantizer picks another code than qpeft (the
    nearest), the two values are neighbours in the code book and the scaled input is within 2/65535 of their
    midpoint (near zero, where the book is finer than 2/65535, they may be a few entries apart but within
    2 x 2/65535); the decoded values then differ by at most one gap of the code book: 921.6/65535 of the block's
    absmax for the dynamic map (its widest gap, between -0.9789 and -0.9648), which is reached."""
    code = codes.dynamic_map()
    values = code.unique()
    widest = (values[1:] - values[:-1]).max().item()
    assert abs(widest * 65535 - 921.6) < 0.05
    worst = 0.0
    for bs in (64, 256, 4096, 16384):
        A = torch.randn(1 << 19, generator=torch.Generator().manual_seed(bs))
        q, st = qpeft.quantize_blockwise(A, blocksize=bs)
        q_native, _ = F.quantize_blockwise(A, blocksize=bs)
        v, v_native = code[q.long()], code[q_native.long().reshape(-1)]
        differ = v != v_native
        assert 0 < differ.float().mean() < 0.01  # 0.15% of the codes on randn when measured
        lo, hi = torch.minimum(v, v_native)[differ], torch.maximum(v, v_native)[differ]
        between = ((values[None, :] > lo[:, None]) & (values[None, :] < hi[:, None])).any(dim=1)
        assert bool((hi - lo)[between].le(2 * LUT_RESOLUTION).all()), "not neighbours outside the finest entries"
        scaled, absmax = ref._scale_blocks(A, bs)
        assert bool(((scaled[differ] - (lo + hi) / 2)[~between].abs() <= LUT_RESOLUTION).all())
        block_absmax = absmax.repeat_interleave(bs)[: A.numel()][differ]
        decoded = (hi - lo) * block_absmax
        assert bool((decoded <= widest * block_absmax * (1 + 1e-6)).all())
        worst = max(worst, ((hi - lo).max().item()))
    assert worst == widest


def test_quantize_blockwise_custom_code_books():
    A = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    for code in (codes.quantile_code(A, 8), torch.linspace(-1, 1, 256), codes.quantile_code(A, 3)):
        q, st = qpeft.quantize_blockwise(A, code, 128)
        q_ref, absmax_ref = ref.quantize_blockwise_ref(A, code, 128)
        assert torch.equal(q, q_ref) and int(q.max()) < code.numel()
        if code.numel() == 256:
            q_bnb, _ = _bnb_default_quantize_blockwise(A, code, 128)
            assert torch.equal(q, q_bnb)
        # nearest entry: no other code is closer to the scaled value
        scaled, _ = ref._scale_blocks(A, 128)
        dist = (code[q.long()] - scaled).abs()
        assert bool((dist <= (code[None, :] - scaled[:, None]).abs().min(dim=1).values + 1e-7).all())


# --- the error fingerprint (bitsandbytes-format.md section 8) ------------------------------------------------
# blocksize: (mean abs err, limit), (mean rel err, limit) for NF4 and FP4 on randn(1024, 1024); limits are
# bnb's mean + 7 sigma. Both bounds apply: an error below mean - 7 sigma means a different code book.
_FINGERPRINT = {
    "nf4": {32: (.0677, .0682, .1897, .1919), 64: (.0728, .0733, .2033, .2057), 128: (.0768, .0775, .2152, .2180),
            256: (.0803, .0811, .2261, .2289), 512: (.0835, .0845, .2361, .2399), 1024: (.0866, .0879, .2454, .2496),
            2048: (.0896, .0913, .2542, .2594), 4096: (.0925, .0951, .2625, .2695)},
    "fp4": {32: (.0889, .0896, .2424, .2448), 64: (.0965, .0973, .2601, .2628), 128: (.1030, .1039, .2758, .2788),
            256: (.1087, .1100, .2898, .2933), 512: (.1141, .1158, .3029, .3070), 1024: (.1193, .1216, .3150, .3203),
            2048: (.1246, .1277, .3266, .3333), 4096: (.1295, .1338, .3372, .3458)},
}


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_error_fingerprint(blocksize):
    A = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(blocksize))
    for qt in QUANT_TYPES:
        err_mean, err_lim, rel_mean, rel_lim = _FINGERPRINT[qt][blocksize]
        p, s = qpeft.quantize_4bit(A, blocksize, qt, double_quant=False)
        diff = (A - qpeft.dequantize_4bit(p, s)).abs()
        err = diff.mean().item()
        rel = (diff / (A.abs() + 1e-8)).mean().item()
        assert 2 * err_mean - err_lim < err < err_lim, f"{qt} bs={blocksize}: mean abs error {err:.5f}"
        assert 2 * rel_mean - rel_lim < rel < rel_lim, f"{qt} bs={blocksize}: mean rel error {rel:.5f}"


# --- torch.library ------------------------------------------------------------------------------------------
def _opcheck_cases():
    g = torch.Generator().manual_seed(7)
    A = torch.randn(5, 37, generator=g)
    Ah = A.half()
    n = A.numel()
    packed, absmax = ref.quantize_4bit_ref(A, 64, "nf4")
    q8, absmax8 = ref.quantize_blockwise_ref(A, codes.dynamic_map(), 32)
    cases = [
        ("quantize_4bit", (A, 64, "nf4")), ("quantize_4bit", (Ah, 32, "fp4")),
        ("dequantize_4bit", (packed, absmax, codes.nf4(), 64, [5, 37], torch.bfloat16)),
        ("quantize_blockwise", (A, codes.dynamic_map(), 32)),
        ("quantize_blockwise", (Ah, torch.linspace(-1, 1, 16), 64)),
        ("dequantize_blockwise", (q8, absmax8, codes.dynamic_map(), 32, torch.float16)),
    ]
    for bits in (4, 8):
        for sym in (True, False):
            q, scale, zero = ref.quantize_linear_ref(A, bits, 64, sym)
            cases.append(("quantize_linear", (A, bits, 64, sym)))
            cases.append(("dequantize_linear", (q, scale, zero, bits, 64, sym, [n], torch.float32)))
    return cases


@pytest.mark.parametrize("case", range(len(_opcheck_cases())))
def test_opcheck(case):
    name, args = _opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.qpeft, name).default, args)


def test_fake_shapes_match_real():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name, args in _opcheck_cases():
        op = getattr(torch.ops.qpeft, name).default
        real = op(*args)
        with FakeTensorMode() as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        real = real if isinstance(real, tuple) else (real,)
        fake = fake if isinstance(fake, tuple) else (fake,)
        for r, f in zip(real, fake):
            assert r.shape == f.shape and r.dtype == f.dtype, name


def test_compile_fullgraph_quantize_dequantize():
    A = torch.randn(8, 40)
    absmax_code = codes.nf4()

    def roundtrip(x):
        p, a = torch.ops.qpeft.quantize_4bit(x, 64, "nf4")
        return torch.ops.qpeft.dequantize_4bit(p, a, absmax_code, 64, [8, 40], torch.float32)

    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    with torch.compiler.set_stance("default"):
        assert torch.equal(compiled(A), roundtrip(A))


# --- bad input -------------------------------------------------------------------------------------------------
def test_bad_input_raises_clear_errors():
    A = torch.randn(8, 8)
    with pytest.raises(TypeError, match="A must be float32, float16 or bfloat16, got torch.int32"):
        qpeft.quantize_4bit(torch.ones(8, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        qpeft.quantize_4bit([1.0, 2.0])
    for bs in (16, 48, 8192, 0, True, 64.0):
        with pytest.raises(ValueError, match=r"blocksize must be one of \(32, 64"):
            qpeft.quantize_4bit(A, bs)
    for bs in (0, -64, True, 64.0):  # 8-bit blockwise: any length >= 1, as bitsandbytes' CPU quantizer
        with pytest.raises(ValueError, match=f"blocksize must be a positive int, got {bs!r}"):
            qpeft.quantize_blockwise(A, blocksize=bs)
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4', got 'int4'"):
        qpeft.quantize_4bit(A, quant_type="int4")
    with pytest.raises(ValueError, match="A is empty"):
        qpeft.quantize_4bit(torch.empty(0, 4))
    with pytest.raises(ValueError, match="A is empty"):
        qpeft.quantize_blockwise(torch.empty(0))
    for bad in (float("nan"), float("inf"), float("-inf")):
        B = A.clone()
        B[3, 4] = bad
        with pytest.raises(ValueError, match="1 non-finite values"):
            qpeft.quantize_4bit(B)
        with pytest.raises(ValueError, match="non-finite"):
            qpeft.quantize_blockwise(B.half())
        with pytest.raises(ValueError, match="non-finite"):
            qpeft.quantize_linear(B)
    with pytest.raises(ValueError, match="quant_storage"):
        qpeft.quantize_4bit(torch.randn(3, 3), quant_storage=torch.float32)  # 5 bytes: not whole fp32 elements
    with pytest.raises(ValueError, match="quant_storage must be one of"):
        qpeft.quantize_4bit(A, quant_storage=torch.float64)
    with pytest.raises(ValueError, match="sorted ascending"):
        qpeft.quantize_blockwise(A, code=torch.linspace(1, -1, 256))
    with pytest.raises(ValueError, match="code must be a 1-D float tensor of 2..256"):
        qpeft.quantize_blockwise(A, code=torch.zeros(300))
    with pytest.raises(ValueError, match="bits must be 4 or 8, got 3"):
        qpeft.quantize_linear(A, bits=3)
    p, s = qpeft.quantize_4bit(A)
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16, got torch.float64"):
        qpeft.dequantize_4bit(p, s, dtype=torch.float64)
    with pytest.raises(TypeError, match="state must be a qpeft QuantState"):
        qpeft.dequantize_4bit(p, F.quantize_4bit(A)[1])


def test_ops_reject_bad_arguments():
    A = torch.randn(4, 64)
    with pytest.raises(RuntimeError, match="A must be contiguous"):
        torch.ops.qpeft.quantize_4bit(A.t(), 64, "nf4")
    with pytest.raises(RuntimeError, match="blocksize must be one of"):
        torch.ops.qpeft.quantize_4bit(A, 100, "nf4")
    with pytest.raises(RuntimeError, match="blocksize must be a positive int, got 0"):
        torch.ops.qpeft.quantize_blockwise(A, codes.dynamic_map(), 0)
    with pytest.raises(RuntimeError, match="blocksize must be a positive int, got 0"):
        torch.ops.qpeft.dequantize_blockwise(torch.zeros(8, dtype=torch.uint8), torch.ones(1), codes.dynamic_map(),
                                             0, torch.float32)
    p, a = torch.ops.qpeft.quantize_4bit(A, 64, "nf4")
    with pytest.raises(RuntimeError, match=r"absmax must have ceil\(n/blocksize\) = 4 entries"):
        torch.ops.qpeft.dequantize_4bit(p, a[:3], codes.nf4(), 64, [4, 64], torch.float32)
    with pytest.raises(RuntimeError, match="packed must hold"):
        torch.ops.qpeft.dequantize_4bit(p[:-1], a, codes.nf4(), 64, [4, 64], torch.float32)
    with pytest.raises(RuntimeError, match="code must have 16 entries"):
        torch.ops.qpeft.dequantize_4bit(p, a, codes.dynamic_map(), 64, [4, 64], torch.float32)
    with pytest.raises(RuntimeError, match="absmax must be float32"):
        torch.ops.qpeft.dequantize_4bit(p, a.half(), codes.nf4(), 64, [4, 64], torch.float32)


def test_state_that_disagrees_with_packed_is_rejected():
    A = torch.randn(10, 30)
    p, s = qpeft.quantize_4bit(A, 64, "nf4")
    other_p, other_s = qpeft.quantize_4bit(torch.randn(10, 40), 64, "nf4")
    with pytest.raises(ValueError, match=r"packed tensor must hold \(n\+1\)//2 = 150 bytes"):
        qpeft.dequantize_4bit(other_p, s)
    with pytest.raises(ValueError, match="absmax must be torch.uint8 with ceil"):
        qpeft.dequantize_4bit(other_p, QuantState(other_s.absmax[:-1], other_s.shape, other_s.dtype, 64, "nf4",
                                                  other_s.code, other_s.offset, other_s.state2))
    d = s.as_dict(packed=True)
    with pytest.raises(ValueError, match="packed tensor must hold"):
        QuantState.from_dict(d, "cpu", packed=other_p)


# --- linear quantization ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_linear_quantization(symmetric, bits, dtype):
    g = torch.Generator().manual_seed(bits)
    A = (torch.randn(7, 45, generator=g) * 2 + (0 if symmetric else 1.5)).to(dtype)
    A[0, :5] = 0
    q, st = qpeft.quantize_linear(A, bits=bits, blocksize=64, symmetric=symmetric)
    n = A.numel()
    want_dtype = torch.int8 if (bits == 8 and symmetric) else torch.uint8
    assert q.dtype == want_dtype and q.numel() == (n if bits == 8 else (n + 1) // 2)
    out = qpeft.dequantize_linear(q, st, dtype=torch.float32)
    assert out.shape == A.shape
    x = A.float().reshape(-1)
    step = torch.repeat_interleave(st.scale, 64)[:n]
    # round to nearest: within half a step of the input (fp32 slack), zeros exact
    assert bool(((out.reshape(-1) - x).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all())
    assert bool((out.reshape(-1)[:5] == 0).all())
    # codes in range; 4-bit packed high nibble first
    ints = q.reshape(-1).to(torch.int32) if bits == 8 else ref.unpack_4bit_ref(q, n).to(torch.int32)
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if (symmetric and bits == 8) else \
        ((1, 15) if symmetric else (0, 2 ** bits - 1))
    assert int(ints.min()) >= lo and int(ints.max()) <= hi
    # every non-zero block's largest magnitude maps to the end of the range (the scale is spent exactly)
    if symmetric:
        blocks = torch.nn.functional.pad(x, (0, -n % 64)).view(-1, 64)
        idx = (blocks.abs().argmax(dim=1) + torch.arange(blocks.shape[0]) * 64).clamp(max=n - 1)
        extreme = ints[idx] - (8 if bits == 4 else 0)
        nonzero = blocks.abs().amax(dim=1) > 0
        assert bool((extreme.abs()[nonzero] == 2 ** (bits - 1) - 1).all())
    # idempotent: re-quantizing the dequantized fp32 values gives the same codes
    if dtype == torch.float32:
        q2, _ = qpeft.quantize_linear(out, bits=bits, blocksize=64, symmetric=symmetric)
        assert torch.equal(q2, q)
    assert qpeft.dequantize_linear(q, st).dtype == dtype


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_linear_quantization_matches_torch_affine_quantizer():
    """Asymmetric 8-bit per block = torch.quantize_per_tensor(quint8) with our scale and zero point (an
    independent implementation; it multiplies by 1/scale where we divide, which could only differ at an exact
    tie, and this data has none)."""
    A = torch.randn(5, 64, generator=torch.Generator().manual_seed(9)) + 0.5
    q, st = qpeft.quantize_linear(A, bits=8, blocksize=64, symmetric=False)
    out = qpeft.dequantize_linear(q, st)
    for b in range(5):
        tq = torch.quantize_per_tensor(A[b], float(st.scale[b]), int(st.zero[b]), torch.quint8)
        assert torch.equal(tq.int_repr(), q[b * 64:(b + 1) * 64])
        assert torch.equal(out[b], tq.dequantize())


def test_nan_check_falls_back_when_a_backend_drops_nan(monkeypatch):
    """A backend whose absmax drops NaN (fmaxf) is caught by the probe; A itself is then checked for NaN."""
    import qpeft.quant.functional as api

    assert api._absmax_flags_nan(torch.device("cpu"), "torch")  # the reference propagates NaN
    A = torch.randn(128)
    A[70] = float("nan")
    finite_scales = torch.ones(2)  # what a NaN-dropping kernel would return
    monkeypatch.setattr(api, "_absmax_flags_nan", lambda device, backend: False)
    with pytest.raises(ValueError, match="1 non-finite values"):
        api._check_finite(A, finite_scales)
    api._check_finite(torch.randn(128), finite_scales)  # finite input passes
