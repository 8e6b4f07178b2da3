"""qpeft.optim against bitsandbytes 0.50.2 on CPU: bnb's own accuracy thresholds against fp32 torch optimizers, a
100-step trajectory as close to fp32 AdamW as bnb's, and state dicts that load both ways.

bnb's CPU path is not its CUDA kernel (65536-bin rounding table, decay before the step), so the comparison is by
accuracy, never bit for bit (bnb's own tests never compare devices bit for bit either)."""
from __future__ import annotations

import io

import pytest
import torch

import qpeft
import qpeft.optim as qo
from qpeft.optim import _base

bnb = pytest.importorskip("bitsandbytes")

# bitsandbytes tests/test_optim.py::test_optimizer8bit: fewer than 20 state elements outside isclose(atol=3e-3,
# rtol=1e-3) of the fp32 optimizer's; mean parameter error / relative error below these (fp32/fp16, bf16).
STATE_ATOL, STATE_RTOL, MAX_NOT_CLOSE = 3e-3, 1e-3, 20
PARAM_ERR = {torch.float32: (6e-5, 6e-4), torch.bfloat16: (1.7e-4, 1.6e-3)}


def _dequant(opt, p, k):
    st = opt.state[p]
    q = st[f"state{k}"]
    qmap = qpeft.formats.codes.dynamic_map(signed=(k == 1))
    return (qmap[q.reshape(-1).long()] * st[f"absmax{k}"].repeat_interleave(256)[: q.numel()]).view(q.shape)


def _thresholds_run(make_8bit, make_fp32, names, dtype, steps=50, shape=(256, 1024)):
    """bnb's procedure: the same gradients to both optimizers, the dequantized 8-bit states compared with the fp32
    optimizer's, the parameter errors bounded; then (they would drift apart otherwise) both parameters are reset
    to the fp32 one rounded to `dtype` and the fp32 optimizer's states to the dequantized 8-bit ones, so each
    step measures one step's error. Returns the largest count of state elements not close."""
    torch.manual_seed(0)
    p8 = torch.nn.Parameter((torch.randn(shape) * 0.1).to(dtype))
    p32 = torch.nn.Parameter(p8.detach().float().clone())
    o8, o32 = make_8bit([p8]), make_fp32([p32])
    worst = 0
    max_err, max_rel = PARAM_ERR[dtype]
    for _ in range(steps):
        g = (torch.randn(shape) * 0.01).to(dtype)
        p8.grad, p32.grad = g.clone(), g.float()
        o8.step()
        o32.step()
        dequant = []
        for k, name in enumerate(names, start=1):
            s = _dequant(o8, p8, k)
            not_close = ~torch.isclose(o32.state[p32][name], s, atol=STATE_ATOL, rtol=STATE_RTOL)
            worst = max(worst, int(not_close.sum()))
            dequant.append(s)
        err = (p32.detach() - p8.detach().float()).abs()
        rel = err / (p32.detach().abs() + 1e-9)
        assert err.mean() < max_err and rel.mean() < max_rel, (err.mean().item(), rel.mean().item())
        with torch.no_grad():
            p32.copy_(p32.to(dtype).float())
            p8.copy_(p32)
            for name, s in zip(names, dequant):
                o32.state[p32][name].copy_(s)
    return worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("impl", ["qpeft", "bitsandbytes"])
def test_adam8bit_within_bnb_thresholds(impl, dtype):
    mod = qo if impl == "qpeft" else bnb.optim
    worst = _thresholds_run(lambda ps: mod.Adam8bit(ps, lr=1e-3), lambda ps: torch.optim.Adam(ps, lr=1e-3),
                            ("exp_avg", "exp_avg_sq"), dtype)
    assert worst < MAX_NOT_CLOSE


def test_lion8bit_within_bnb_thresholds():
    from bitsandbytes.optim import Lion as BnbLion32  # bnb's fp32 Lion is the oracle of its Lion8bit test

    worst = _thresholds_run(lambda ps: qo.Lion8bit(ps, lr=1e-4),
                            lambda ps: BnbLion32(ps, lr=1e-4, optim_bits=32), ("state1",), torch.float32)
    assert worst < MAX_NOT_CLOSE


def test_trajectory_as_close_to_fp32_adamw_as_bnb():
    """100 steps without re-syncing, rows of very different gradient scales (where blockwise 8-bit states hurt):
    ||p - p_fp32|| / ||p_fp32 - p0|| of qpeft's AdamW8bit is at most bnb's (+5%)."""
    torch.manual_seed(0)
    shape = (128, 1024)
    p0 = torch.randn(shape) * 0.1
    row_scale = torch.logspace(-3, 0, shape[0]).view(-1, 1)
    ps = {k: torch.nn.Parameter(p0.clone()) for k in ("fp32", "qpeft", "bnb")}
    opts = {"fp32": torch.optim.AdamW([ps["fp32"]], lr=1e-3, weight_decay=1e-2),
            "qpeft": qo.AdamW8bit([ps["qpeft"]], lr=1e-3, weight_decay=1e-2),
            "bnb": bnb.optim.AdamW8bit([ps["bnb"]], lr=1e-3, weight_decay=1e-2)}
    gen = torch.Generator().manual_seed(3)
    for _ in range(100):
        g = torch.randn(shape, generator=gen) * row_scale
        for k in ps:
            ps[k].grad = g.clone()
            opts[k].step()
    ref = ps["fp32"].detach()
    drift = {k: ((ps[k].detach() - ref).norm() / (ref - p0).norm()).item() for k in ("qpeft", "bnb")}
    assert drift["qpeft"] <= 1.05 * drift["bnb"], drift
    assert drift["qpeft"] < 0.05, drift


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(80, 64) * 0.1), torch.nn.Parameter(torch.randn(64) * 0.1)]


def _steps(params, opt, n, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 0.01
        opt.step()


def _assert_within_bnb_param_error(p_bnb, p_ours):
    err = (p_bnb.detach() - p_ours.detach()).abs()
    rel = err / (p_bnb.detach().abs() + 1e-9)
    max_err, max_rel = PARAM_ERR[torch.float32]
    assert err.mean() < max_err and rel.mean() < max_rel, (err.mean().item(), rel.mean().item())
    assert err.max() < 1e-3  # at most one lr: no element jumped


def _assert_same_states(opt, ps, other, other_ps):
    """Every state entry of opt's parameters equals other's for the matching parameter (tensors exactly)."""
    for p, q in zip(ps, other_ps):
        for k, v in opt.state[p].items():
            assert torch.equal(v, other.state[q][k]) if torch.is_tensor(v) else v == other.state[q][k], k


@pytest.mark.filterwarnings("ignore::UserWarning")  # both libraries' "paged optimizers on CPU" notices
@pytest.mark.parametrize("pair", [("AdamW8bit", "AdamW8bit"), ("Lion8bit", "Lion8bit"),
                                  ("PagedAdamW8bit", "PagedAdamW8bit"), ("PagedAdamW", "PagedAdamW")], ids=str)
def test_state_dicts_load_both_ways(pair):
    ours_cls, bnb_cls = getattr(qo, pair[0]), getattr(bnb.optim, pair[1])
    # ours -> bnb: bnb holds exactly our states and continues training from them
    ps = _params()
    ours = ours_cls(ps, lr=1e-3)
    _steps(ps, ours, 3, seed=1)
    sd = _roundtrip(ours.state_dict())
    ps_b = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    theirs = bnb_cls(ps_b, lr=1e-3)
    theirs.load_state_dict(sd)
    _assert_same_states(ours, ps, theirs, ps_b)
    _steps(ps_b, theirs, 1, seed=2)
    _steps(ps, ours, 1, seed=2)
    for p, pb in zip(ps, ps_b):  # different rounding and decay order: within bnb's parameter thresholds
        _assert_within_bnb_param_error(pb, p)
        assert theirs.state[pb]["step"] == ours.state[p]["step"] == 4
    # bnb -> ours: ours holds exactly bnb's states (wrapped layout, bnb 0.50.2's state_dict) and continues
    sd_b = _roundtrip(theirs.state_dict())
    assert _base.WRAP_KEY in sd_b["state"][0]
    ps_o = [torch.nn.Parameter(p.detach().clone()) for p in ps_b]
    ours2 = ours_cls(ps_o, lr=1e-3)
    ours2.load_state_dict(sd_b)
    _assert_same_states(ours2, ps_o, theirs, ps_b)
    _steps(ps_o, ours2, 2, seed=4)
    _steps(ps_b, theirs, 2, seed=4)
    for p, po in zip(ps_b, ps_o):
        _assert_within_bnb_param_error(p, po)
