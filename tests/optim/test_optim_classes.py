"""qpeft.optim classes as torch.optim.Optimizers: groups, schedulers, closures, dtypes, min_8bit_size, paging on CPU,
checkpoints (bnb layout, torch.load(weights_only=True), bit-identical resume) and bad arguments."""
from __future__ import annotations

import io
import warnings

import pytest
import torch

import qpeft.optim as qo
from qpeft.optim import _base
from qpeft.reference import optim_8bit as ref

# the paged classes' one-time "unpaged on CPU" notice (test_paged_on_cpu_... checks it explicitly)
pytestmark = pytest.mark.filterwarnings("ignore:.*unpaged.*:UserWarning")

ALL = [qo.AdamW8bit, qo.Adam8bit, qo.Lion8bit, qo.PagedAdamW, qo.PagedAdamW8bit, qo.PagedLion8bit]


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    # 64*80 = 5120 elements (8-bit states), 80 (fp32 states), 80*65 = 5200 (odd number of blocks)
    return torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Tanh(), torch.nn.Linear(80, 65)).to(dtype)


def _train(model, opt, steps, seed=1, scheduler=None):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 64, generator=gen).to(next(model.parameters()).dtype)
        opt.zero_grad()
        loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def _quiet(cls, params, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the paged classes' "unpaged on CPU" notice
        return cls(params, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_trains_and_state_layout(cls, dtype):
    model = _model(dtype)
    opt = _quiet(cls, model.parameters(), lr=1e-2 if "Lion" not in cls.__name__ else 1e-3)
    losses = _train(model, opt, 30)
    assert losses[-1] < 0.5 * losses[0]
    w, b = model[0].weight, model[0].bias
    st_w, st_b = opt.state[w], opt.state[b]
    assert st_w["step"] == 30 and isinstance(st_w["step"], int)
    eight = cls is not qo.PagedAdamW
    assert st_w["state1"].dtype == (torch.uint8 if eight else torch.float32)
    assert st_w["state1"].shape == w.shape and st_b["state1"].dtype == torch.float32  # 80 < min_8bit_size
    assert ("state2" in st_w) == ("Lion" not in cls.__name__)
    if eight:
        assert st_w["absmax1"].shape == (20,) and st_w["qmap1"].shape == (256,)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_min_8bit_size_is_strict_and_configurable():
    ps = [torch.nn.Parameter(torch.randn(n)) for n in (4095, 4096, 4097)]
    opt = qo.AdamW8bit(ps)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    assert [opt.state[p]["state1"].dtype for p in ps] == [torch.float32, torch.uint8, torch.uint8]
    assert opt.state[ps[2]]["absmax1"].shape == (17,)
    opt = qo.AdamW8bit(ps, min_8bit_size=4097)
    opt.step()
    assert [opt.state[p]["state1"].dtype for p in ps] == [torch.float32, torch.float32, torch.uint8]


def test_param_groups_schedulers_closure_zero_grad():
    model = _model()
    opt = qo.AdamW8bit([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.0}], lr=1e-2)
    frozen = [p.clone() for p in model[2].parameters()]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)
    _train(model, opt, 3, scheduler=sched)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model[2].parameters()))  # lr 0: no step, no decay
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.125)
    # the scheduler's lr reaches the kernel: a manual run with the same lrs gives the same parameters
    model2 = _model()
    opt2 = qo.AdamW8bit([{"params": model2[0].parameters()}, {"params": model2[2].parameters(), "lr": 0.0}], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for e in range(3):
        opt2.param_groups[0]["lr"] = 1e-2 * 0.5 ** e
        x = torch.randn(16, 64, generator=gen)
        opt2.zero_grad()
        model2(x).pow(2).mean().backward()
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    # closure
    x = torch.randn(4, 64)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0
    # zero_grad(set_to_none) and parameters without gradients are skipped
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    before = [p.clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_per_group_lr_reaches_each_tensor():
    """LoRA+-style groups: each tensor's update uses its own lr, within one op call per group."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(16, 512)), torch.nn.Parameter(torch.randn(512, 16))
    opt = qo.AdamW8bit([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 16e-3}], weight_decay=0.0)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt.step()
    # first Adam step: |update| = lr * |g| / (|g| + eps) ~ lr
    assert (a - a0).abs().mean().item() == pytest.approx(1e-3, rel=0.05)
    assert (b - b0).abs().mean().item() == pytest.approx(16e-3, rel=0.05)


def test_non_contiguous_parameter():
    torch.manual_seed(0)
    base = torch.randn(80, 64)
    p_nc = torch.nn.Parameter(base.clone().t())  # (64, 80), non-contiguous
    p_c = torch.nn.Parameter(base.clone().t().contiguous())
    assert not p_nc.is_contiguous()
    opts = [qo.AdamW8bit([p_nc]), qo.AdamW8bit([p_c])]
    for _ in range(3):
        g = torch.randn(64, 80)
        p_nc.grad, p_c.grad = g.clone(), g.clone()
        for o in opts:
            o.step()
    assert torch.equal(p_nc.detach(), p_c.detach())


def test_paged_on_cpu_is_the_unpaged_twin_and_says_so_once():
    _base._warned.clear()
    pairs = [(qo.PagedAdamW8bit, qo.AdamW8bit), (qo.PagedLion8bit, qo.Lion8bit)]
    for paged_cls, cls in pairs:
        m1, m2 = _model(), _model()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            o1 = paged_cls(m1.parameters(), lr=1e-3)
            _train(m1, o1, 3)
            _train(m1, paged_cls(m1.parameters(), lr=1e-3), 1)  # a second optimizer: no second warning
        notes = [w for w in rec if "unpaged" in str(w.message)]
        assert len(notes) == 1 and paged_cls.__name__ in str(notes[0].message)
        o2 = cls(m2.parameters(), lr=1e-3)
        _train(m2, o2, 3)
        _train(m2, cls(m2.parameters(), lr=1e-3), 1)
        assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
        o1.evict()  # nothing is paged on CPU: a no-op
    # PagedAdamW keeps fp32 states, like AdamW8bit below min_8bit_size
    m = _model()
    o = _quiet(qo.PagedAdamW, m.parameters())
    _train(m, o, 1)
    assert all(st["state1"].dtype == torch.float32 for st in o.state.values())


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _states_equal(o1, o2):
    params1 = (p for g in o1.param_groups for p in g["params"])
    for p1, p2 in zip(params1, (p for g in o2.param_groups for p in g["params"])):
        s1, s2 = o1.state[p1], o2.state[p2]
        assert s1.keys() == s2.keys()
        for k in s1:
            if isinstance(s1[k], torch.Tensor):
                assert torch.equal(s1[k], s2[k]), k
            else:
                assert s1[k] == s2[k], k


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_save_load_continue_is_bit_identical(cls):
    m_full, m_res = _model(), _model()
    o_full = _quiet(cls, m_full.parameters(), lr=1e-3)
    _train(m_full, o_full, 5)
    o_first = _quiet(cls, m_res.parameters(), lr=1e-3)
    _train(m_res, o_first, 3, seed=1)
    sd = o_first.state_dict()
    assert set(sd["state"][0]) == {"step", _base.WRAP_KEY}
    loaded = _roundtrip({"model": m_res.state_dict(), "optim": sd})
    m_new = _model(seed=5)
    m_new.load_state_dict(loaded["model"])
    o_new = _quiet(cls, m_new.parameters(), lr=1e-3)
    o_new.load_state_dict(loaded["optim"])
    _states_equal(o_first, o_new)
    # continue with the same batches 4 and 5 as the uninterrupted run
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 64, generator=gen) for _ in range(5)]
    for x in xs[3:]:
        o_new.zero_grad()
        m_new(x).pow(2).mean().backward()
        o_new.step()
    assert all(torch.equal(a, b) for a, b in zip(m_full.parameters(), m_new.parameters()))
    _states_equal(o_full, o_new)


def test_load_accepts_the_flat_legacy_layout_and_validates():
    m = _model()
    o = qo.AdamW8bit(m.parameters())
    _train(m, o, 2)
    sd = o.state_dict()
    flat = {"state": {k: {**{kk: vv for kk, vv in v.items() if kk != _base.WRAP_KEY}, **v[_base.WRAP_KEY]}
                      for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]}
    o2 = qo.AdamW8bit(_model().parameters())
    o2.load_state_dict(flat)
    _states_equal(o, o2)
    bad = {"state": {0: {"step": 2, _base.WRAP_KEY: {**sd["state"][0][_base.WRAP_KEY],
                                                     "absmax1": torch.zeros(3)}}},
           "param_groups": sd["param_groups"]}
    o3 = qo.AdamW8bit(_model().parameters())
    with pytest.raises(ValueError, match="absmax1"):
        o3.load_state_dict(bad)
    assert len(o3.state) == 0  # a failed load changes nothing
    with pytest.raises(ValueError, match="parameter groups"):
        o3.load_state_dict({"state": {}, "param_groups": sd["param_groups"] * 2})
    wrong_map = {"state": {0: {"step": 2, _base.WRAP_KEY: {**sd["state"][0][_base.WRAP_KEY],
                                                           "qmap1": torch.linspace(-1, 1, 256)}}},
                 "param_groups": sd["param_groups"]}
    with pytest.raises(ValueError, match="qmap1"):
        o3.load_state_dict(wrong_map)


def test_bad_arguments_raise():
    ps = _model().parameters
    with pytest.raises(ValueError, match="amsgrad"):
        qo.AdamW8bit(ps(), amsgrad=True)
    with pytest.raises(ValueError, match="optim_bits"):
        qo.Adam8bit(ps(), optim_bits=8)
    with pytest.raises(ValueError, match="args"):
        qo.Lion8bit(ps(), args=object())
    with pytest.raises(ValueError, match="lr must be >= 0"):
        qo.AdamW8bit(ps(), lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        qo.AdamW8bit(ps(), betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="min_8bit_size"):
        qo.AdamW8bit(ps(), min_8bit_size=0)
    with pytest.raises(ValueError, match="weight_decay"):
        qo.AdamW8bit([{"params": list(ps()), "weight_decay": -0.1}])
    with pytest.raises(TypeError, match="lr must be a Python float"):
        qo.AdamW8bit(ps(), lr=torch.tensor(1e-3))
    emb = torch.nn.Embedding(10, 4, sparse=True)
    o = qo.AdamW8bit(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        o.step()


def test_hyper_matches_the_float64_formula():
    h = ref.adam_hyper(2e-4, 7, 0.9, 0.999, 1e-8, 0.01)
    b1, b2 = float(torch.tensor(0.9)), float(torch.tensor(0.999))
    c1, c2 = 1 - b1 ** 7, (1 - b2 ** 7) ** 0.5
    assert h == [ref.f32(-2e-4 * c2 / c1), ref.f32(1e-8 * c2), ref.f32(1 - 2e-6), 0.0]
    assert ref.lion_hyper(1e-4, 0.1) == [ref.f32(1e-4), ref.f32(1 - 1e-5), 0.0, 0.0]


class _FakePager:
    """Stands in for paged.PagedStates on CPU: ordinary tensors, but every call recorded, and staging through a
    copy (as the pinned-host fallback does), so the optimizer's paging flow is exercised without a GPU."""

    def __init__(self):
        self.owned, self.calls = [], []

    def zeros(self, shape, dtype):
        t = torch.zeros(shape, dtype=dtype)
        self.owned.append(t)
        return t

    def owns(self, t):
        return any(t is o for o in self.owned)

    def stage(self, t):
        self.calls.append("stage")
        return t.clone()

    def unstage(self, home, staged):
        self.calls.append("unstage")
        home.copy_(staged)

    def evict(self, t):
        self.calls.append("evict")

    def synchronize(self):
        self.calls.append("sync")


def test_paging_flow_with_a_fake_pager(monkeypatch):
    fake = _FakePager()

    def pager(self, p):
        if not self.is_paged or p.numel() < self.page_min_size:
            return None
        self._pagers[p.device] = fake
        return fake

    monkeypatch.setattr(_base.Optimizer8bitBase, "_pager", pager)
    m_paged, m_plain = _model(), _model()
    o_paged = qo.PagedAdamW8bit(m_paged.parameters(), lr=1e-3, page_min_size=4096)
    o_plain = qo.AdamW8bit(m_plain.parameters(), lr=1e-3)
    _train(m_paged, o_paged, 3)
    _train(m_plain, o_plain, 3)
    assert all(torch.equal(a, b) for a, b in zip(m_paged.parameters(), m_plain.parameters()))
    big = [p for p in m_paged.parameters() if p.numel() >= 4096]
    assert len(big) == 2 and all(fake.owns(o_paged.state[p][k]) for p in big for k in ("state1", "state2"))
    assert not any(fake.owns(o_paged.state[p]["state1"]) for p in m_paged.parameters() if p.numel() < 4096)
    assert fake.calls.count("stage") == fake.calls.count("unstage") == 3 * 4  # 3 steps x 2 tensors x 2 states
    fake.calls.clear()
    o_paged.evict()
    assert fake.calls == ["evict"] * 4
    sd = o_paged.state_dict()
    assert fake.calls[-1] == "sync"  # pending copies to the host finish before the host reads the states
    o_new = qo.PagedAdamW8bit(_model().parameters(), lr=1e-3)
    n_owned = len(fake.owned)
    o_new.load_state_dict(sd)
    assert len(fake.owned) == n_owned + 4  # the loaded states are paged again
    assert all(fake.owns(o_new.state[p][k]) for p in o_new.param_groups[0]["params"] if p.numel() >= 4096
               for k in ("state1", "state2"))
