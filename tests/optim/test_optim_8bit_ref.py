"""qpeft::optim_8bit_step's reference against an independent float64 oracle (tests/optim/optim_oracle.py), bit for
bit: codes, absmax, fp32 states and parameters; the non-finite guard; opcheck, torch.compile and bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import qpeft
import qpeft.ops.optim_8bit  # noqa: F401  (registers qpeft::optim_8bit_step)
from qpeft.reference import optim_8bit as ref

import optim_oracle as oracle
from utils import DTYPES

SIZES = [4095, 4096, 4097, 256 * 7 + 1, 300]
BETAS = {"adam": (0.9, 0.999), "lion": (0.9, 0.99)}


def _qmaps():
    return qpeft.formats.codes.dynamic_map(signed=True), qpeft.formats.codes.dynamic_map(signed=False)


def _state(n, quant, lion, gen):
    """Random non-trivial states: codes over the whole map, absmax of m ~ 1e-2 and v ~ 1e-4 per block."""
    blocks = -(-n // 256)
    if quant:
        s1 = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
        a1 = torch.rand(blocks, generator=gen) * 1e-2
        s2 = None if lion else torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
        a2 = None if lion else torch.rand(blocks, generator=gen) * 1e-4
        return s1, s2, a1, a2
    s1 = torch.randn(n, generator=gen) * 1e-2
    s2 = None if lion else torch.rand(n, generator=gen) * 1e-4
    return s1, s2, None, None


def _inputs(kind, quant, sizes, dtype, seed=0, lr=1e-3, step=3, wd=0.01):
    gen = torch.Generator().manual_seed(seed)
    lion = kind == "lion"
    params = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    grads = [(torch.randn(n, generator=gen) * 1e-2).to(dtype) for n in sizes]
    states = [_state(n, quant, lion, gen) for n in sizes]
    s1 = [s[0] for s in states]
    s2 = [] if lion else [s[1] for s in states]
    a1 = [s[2] for s in states] if quant else []
    a2 = [s[3] for s in states] if (quant and not lion) else []
    b1, b2 = BETAS[kind]
    rows = [ref.lion_hyper(lr * (i + 1), wd) if lion else ref.adam_hyper(lr * (i + 1), step, b1, b2, 1e-8, wd)
            for i in range(len(sizes))]  # a different lr per tensor (LoRA+)
    hyper = torch.tensor(rows, dtype=torch.float32)
    return params, grads, s1, s2, a1, a2, hyper, ref.f32(b1), ref.f32(b2)


def _oracle(kind, quant, params, grads, s1, s2, a1, a2, hyper, b1, b2):
    """Expected (params, s1, s2, a1, a2) as numpy arrays."""
    q1, q2 = (q.double().numpy() for q in _qmaps())
    out = []
    for i, p in enumerate(params):
        h = hyper[i].double().numpy()
        g = grads[i].double().numpy()
        if quant:
            m = oracle.decode(s1[i].numpy(), a1[i].double().numpy(), q1)
            v = None if kind == "lion" else oracle.decode(s2[i].numpy(), a2[i].double().numpy(), q2)
        else:
            m = s1[i].double().numpy()
            v = None if kind == "lion" else s2[i].double().numpy()
        new_p, nm, nv = oracle.step(kind, p.double().numpy(), g, m, v, h, b1, b2)
        new_p = torch.from_numpy(new_p).float().to(p.dtype)
        if quant:
            c1, am1 = oracle.encode(nm, q1, signed=True)
            c2, am2 = (None, None) if nv is None else oracle.encode(nv, q2, signed=False)
            out.append((new_p, c1, c2, am1, am2))
        else:
            out.append((new_p, nm, nv, None, None))
    return out


def _run_ref(kind, quant, args):
    params, grads, s1, s2, a1, a2, hyper, b1, b2 = args
    q1, q2 = _qmaps()
    torch.ops.qpeft.optim_8bit_step(params, grads, s1, s2, a1, a2, q1, q2, hyper, b1, b2, kind)


def _assert_equal_np(actual: torch.Tensor, expected: np.ndarray, what: str):
    a = actual.double().numpy()
    e = np.asarray(expected, dtype=np.float64)
    bad = ~((a == e) | (np.isnan(a) & np.isnan(e)))
    assert not bad.any(), f"{what}: {bad.sum()} of {bad.size} differ, first at {np.flatnonzero(bad)[:5]}: " \
                          f"{a[bad][:5]} vs {e[bad][:5]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant", [True, False], ids=["8bit", "fp32"])
@pytest.mark.parametrize("kind", ["adam", "lion"])
def test_reference_equals_float64_oracle(kind, quant, dtype):
    args = _inputs(kind, quant, SIZES, dtype)
    params, grads, s1, s2, a1, a2, hyper, b1, b2 = args
    before = [p.clone() for p in params]
    expected = _oracle(kind, quant, *args)
    _run_ref(kind, quant, args)
    for i, (ep, e1, e2, ea1, ea2) in enumerate(expected):
        assert torch.equal(params[i], ep), f"params[{i}] (n={SIZES[i]}): {(params[i] != ep).sum()} differ"
        assert not torch.equal(params[i], before[i])  # updated
        _assert_equal_np(s1[i], e1, f"state1[{i}]")
        if kind == "adam":
            _assert_equal_np(s2[i], e2, f"state2[{i}]")
        if quant:
            _assert_equal_np(a1[i], ea1, f"absmax1[{i}]")
            if kind == "adam":
                _assert_equal_np(a2[i], ea2, f"absmax2[{i}]")
            assert len(torch.unique(s1[i])) > 100  # the codes really spread over the map


def test_oracle_codes_are_the_exact_nearest():
    """The fp32-midpoint rule (bnb's CUDA kernel's) picks the exactly nearest code except inside the window between
    the exact and the fp32-rounded midpoint; checked on 2e5 values per map."""
    gen = torch.Generator().manual_seed(1)
    for signed, q in zip((True, False), _qmaps()):
        qd = q.double().numpy()
        x = (torch.randn(200_000, generator=gen) * torch.logspace(-7, 0, 200_000).double()).float()
        x = (x.clamp(-1, 1) if signed else x.abs().clamp(0, 1)).double().numpy()
        c = oracle.nearest(x, qd)
        dist = np.abs(x[:, None] - qd[None, :])
        best = dist.argmin(axis=1)
        differ = c != best
        exact_mid = (qd[c] + qd[best]) / 2
        rounded_mid = oracle.r(exact_mid)
        inside = np.abs(x - exact_mid) <= np.abs(rounded_mid - exact_mid)
        assert (~differ | inside).all()
        assert differ.sum() < 20


# 1e20: finite, but g*g overflows fp32 in Adam's v (for Lion it is an ordinary finite gradient, so not a case)
BAD_GRADS = [(k, b) for k in ("adam", "lion") for b in (float("inf"), float("nan"), -float("inf"))] + [("adam", 1e20)]


@pytest.mark.parametrize("quant", [True, False], ids=["8bit", "fp32"])
@pytest.mark.parametrize("kind,bad", BAD_GRADS, ids=[f"{k}-{b}" for k, b in BAD_GRADS])
def test_nonfinite_gradient_zeroes_its_state_and_leaves_the_block_updated(kind, quant, bad):
    args = _inputs(kind, quant, [4097], torch.float32)
    params, grads, s1, s2, a1, a2, hyper, b1, b2 = args
    j = 256 * 3 + 17  # an element inside a full block
    clean = _inputs(kind, quant, [4097], torch.float32)  # the same inputs with a zero gradient at j
    clean[1][0][j] = 0
    _run_ref(kind, quant, clean)
    grads[0][j] = bad
    p0 = params[0].clone()
    _run_ref(kind, quant, args)
    blk = slice(256 * 3, 256 * 4)
    assert params[0][j] == p0[j]  # left untouched
    others = torch.ones(256, dtype=torch.bool)
    others[17] = False
    assert torch.isfinite(params[0][blk]).all()
    # every other parameter of the block is updated exactly as without the bad element (a parameter's update
    # does not depend on its neighbours: the old absmax decodes, the new one only requantizes)
    assert torch.equal(params[0][blk][others], clean[0][0][blk][others])
    assert (params[0][blk][others] != p0[blk][others]).sum() > 200
    if quant:
        q1 = _qmaps()[0]
        m = q1[s1[0][blk].long()] * a1[0][3]
        assert m[17] == 0 and torch.isfinite(a1[0]).all()
        assert torch.isfinite(m).all() and (m[others] != 0).sum() > 200
        if kind == "adam":
            assert s2[0][j] == 0 and torch.isfinite(a2[0]).all()
    else:
        assert s1[0][j] == 0 and torch.isfinite(s1[0]).all()
        if kind == "adam":
            assert s2[0][j] == 0 and torch.isfinite(s2[0]).all()
    # and the next step, with finite gradients, keeps the whole block finite
    grads[0][j] = 1e-3
    _run_ref(kind, quant, args)
    assert torch.isfinite(params[0]).all()


def test_all_zero_block_encodes_zero():
    args = _inputs("adam", True, [512], torch.float32)
    params, grads, s1, s2, a1, a2, hyper, b1, b2 = args
    s1[0].fill_(127)  # code of 0.0 in the signed map
    s2[0].zero_()
    grads[0][:256] = 0
    _run_ref("adam", True, args)
    assert a1[0][0] == 0 and a2[0][0] == 0 and (s1[0][:256] == 127).all() and (s2[0][:256] == 0).all()
    assert a1[0][1] > 0 and a2[0][1] > 0


def _opcheck_args(kind, quant, dtype):
    params, grads, s1, s2, a1, a2, hyper, b1, b2 = _inputs(kind, quant, [300, 4097], dtype)
    q1, q2 = _qmaps()
    return (params, grads, s1, s2, a1, a2, q1, q2, hyper, b1, b2, kind)


@pytest.mark.parametrize("case", [("adam", True, torch.float32), ("adam", False, torch.bfloat16),
                                  ("lion", True, torch.float16), ("lion", False, torch.float32)], ids=str)
def test_opcheck(case):
    torch.library.opcheck(torch.ops.qpeft.optim_8bit_step.default, _opcheck_args(*case),
                          test_utils=("test_schema", "test_faketensor"))


def test_compiles_fullgraph_and_lr_changes_do_not_recompile():
    torch._dynamo.reset()
    q1, q2 = _qmaps()

    def step(params, grads, s1, s2, a1, a2, hyper):
        torch.ops.qpeft.optim_8bit_step(params, grads, s1, s2, a1, a2, q1, q2, hyper, ref.f32(0.9), ref.f32(0.999),
                                        "adam")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_args = list(_inputs("adam", True, [4097, 300], torch.float32)[:7])
    comp_args = [[t.clone() for t in x] if isinstance(x, list) else x.clone() for x in eager_args]
    step(*eager_args)
    compiled(*comp_args)
    for x, y in zip(eager_args, comp_args):
        for a, b in zip(x if isinstance(x, list) else [x], y if isinstance(y, list) else [y]):
            assert torch.equal(a, b)
    comp_args[6] = torch.tensor([ref.adam_hyper(5e-4, 4, 0.9, 0.999, 1e-8, 0.0)] * 2)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(*comp_args)
    torch._dynamo.reset()


def test_bad_input_raises_naming_the_argument():
    params, grads, s1, s2, a1, a2, hyper, b1, b2 = _inputs("adam", True, [4097], torch.float32)
    q1, q2 = _qmaps()
    op = torch.ops.qpeft.optim_8bit_step
    with pytest.raises(RuntimeError, match="optimizer must be one of"):
        op(params, grads, s1, s2, a1, a2, q1, q2, hyper, b1, b2, "sgd")
    with pytest.raises(RuntimeError, match="absmax1"):
        op(params, grads, s1, s2, [a1[0][:3]], a2, q1, q2, hyper, b1, b2, "adam")
    with pytest.raises(RuntimeError, match="grads"):
        op(params, [grads[0].half()], s1, s2, a1, a2, q1, q2, hyper, b1, b2, "adam")
    with pytest.raises(RuntimeError, match="hyper"):
        op(params, grads, s1, s2, a1, a2, q1, q2, hyper[:, :3].contiguous(), b1, b2, "adam")
    with pytest.raises(RuntimeError, match="state2 must have 0 entries"):
        op(params, grads, s1, s2, a1, [], q1, q2, hyper, b1, b2, "lion")
    with pytest.raises(RuntimeError, match="beta1 and beta2"):
        op(params, grads, s1, s2, a1, a2, q1, q2, hyper, 1.0, b2, "adam")
