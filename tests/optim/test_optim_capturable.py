"""capturable=True on the CPU: the device-resident steps and lr give updates bit-identical to capturable=False, the
step reads no device value on the host, checkpoints keep bitsandbytes' layout both ways, and bad lr arguments raise.
The CUDA-graph capture and replay itself is tests/optim/test_optim_8bit_cuda.py::test_capturable_step_replays_in_a_
cuda_graph (GPU)."""
from __future__ import annotations

import contextlib
import io
import random
import warnings

import pytest
import torch

import qpeft.optim as qo
from qpeft.reference import optim_8bit as ref

pytestmark = pytest.mark.filterwarnings("ignore:.*unpaged.*:UserWarning")

ALL = [qo.AdamW8bit, qo.Adam8bit, qo.Lion8bit, qo.PagedAdamW, qo.PagedAdamW8bit, qo.PagedLion8bit]


def _model(dtype, seed=0):
    torch.manual_seed(seed)
    # 5120 elements (8-bit states), 80 (fp32 states), 5200 (a partial last block)
    return torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Tanh(), torch.nn.Linear(80, 65)).to(dtype)


def _opt(cls, model, capturable):
    lr = 3e-3 if "Lion" not in cls.__name__ else 3e-4
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 4 * lr}]  # LoRA+-style
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return cls(groups, lr=lr, weight_decay=0.05, capturable=capturable)


def _run(model, opt, steps, seed=1):
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.8 ** e)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 64, generator=gen).to(next(model.parameters()).dtype)
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
        sched.step()


def _states_equal(a, b):
    for pa, pb in zip(a.state.values(), b.state.values()):
        for k in ("state1", "state2", "absmax1", "absmax2"):
            if k in pa:
                assert torch.equal(pa[k], pb[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_capturable_is_bit_identical_to_the_default(cls, dtype):
    m1, m2 = _model(dtype), _model(dtype)
    o1, o2 = _opt(cls, m1, False), _opt(cls, m2, True)
    _run(m1, o1, 12)
    _run(m2, o2, 12)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    _states_equal(o1, o2)
    st = o2.state[m2[0].weight]
    assert isinstance(st["step"], torch.Tensor) and st["step"].dtype == torch.int64 and st["step"].item() == 12
    lr = o2.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.dtype == torch.float64
    assert lr.item() == pytest.approx(o1.param_groups[0]["lr"], rel=1e-12)  # the scheduler filled it in place


@contextlib.contextmanager
def _no_device_reads():
    """Every way the host reads a tensor's value raises (on a GPU each would be a host sync)."""
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def f(self, *a, **k):
            raise AssertionError(f"Tensor.{name} called in step()")
        return f

    try:
        for n in names:
            setattr(torch.Tensor, n, refuse(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("cls", [qo.AdamW8bit, qo.Lion8bit, qo.PagedAdamW])
def test_capturable_step_reads_no_device_value(cls):
    model = _model(torch.float32)
    opt = _opt(cls, model, True)
    model(torch.randn(4, 64)).pow(2).mean().backward()
    opt.step()  # first step: state creation
    probe = torch.ones(())
    with _no_device_reads():
        with pytest.raises(AssertionError, match="item"):
            probe.item()  # the probe works
        opt.step()
        opt.step()
    assert opt.state[model[0].weight]["step"].item() == 3


@pytest.mark.parametrize("cls", [qo.AdamW8bit, qo.Lion8bit])
def test_capturable_checkpoints_are_bitsandbytes_layout_both_ways(cls):
    dtype = torch.float32
    ref_model, model = _model(dtype), _model(dtype)
    ref_opt, opt = _opt(cls, ref_model, True), _opt(cls, model, True)
    _run(ref_model, ref_opt, 6)
    _run(model, opt, 3)
    sd = opt.state_dict()
    assert all(isinstance(s["step"], int) and s["step"] == 3 for s in sd["state"].values())
    assert all(isinstance(g["lr"], float) for g in sd["param_groups"])
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    # into a capturable optimizer: its own lr tensors are kept and filled (a captured graph reads them)
    resumed_model = _model(dtype, seed=5)
    resumed_model.load_state_dict(model.state_dict())
    resumed = _opt(cls, resumed_model, True)
    lr_tensors = [g["lr"] for g in resumed.param_groups]
    resumed.load_state_dict(sd)
    assert all(g["lr"] is t for g, t in zip(resumed.param_groups, lr_tensors))
    assert all(isinstance(s["step"], torch.Tensor) for s in resumed.state.values())
    # and into a default one: plain ints and floats
    plain_model = _model(dtype, seed=6)
    plain_model.load_state_dict(model.state_dict())
    plain = _opt(cls, plain_model, False)
    plain.load_state_dict(sd)
    assert all(isinstance(s["step"], int) for s in plain.state.values())
    for m, o in ((resumed_model, resumed), (plain_model, plain)):
        sched = torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.8 ** (e + 3))
        gen = torch.Generator().manual_seed(1)
        for i in range(6):
            x = torch.randn(8, 64, generator=gen)
            if i < 3:
                continue  # the batches the first 3 steps saw
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
            sched.step()
        assert all(torch.equal(a, b) for a, b in zip(m.parameters(), ref_model.parameters()))
        _states_equal(o, ref_opt)


def test_tensor_lr_and_capturable_arguments():
    p = torch.nn.Parameter(torch.randn(4096))
    with pytest.raises(TypeError, match="lr must be a Python float.*capturable=True"):
        qo.AdamW8bit([p], lr=torch.tensor(1e-3))
    with pytest.raises(TypeError, match="capturable must be a bool"):
        qo.AdamW8bit([p], capturable=1)
    with pytest.raises(ValueError, match="lr must be a float Tensor with one element"):
        qo.AdamW8bit([p], lr=torch.tensor([1e-3, 2e-3]), capturable=True)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        qo.AdamW8bit([p], lr=torch.tensor(-1e-3), capturable=True)
    lr = torch.tensor(2e-3, dtype=torch.float64)
    opt = qo.AdamW8bit([p], lr=lr, capturable=True)
    assert opt.param_groups[0]["lr"] is lr  # a user's tensor is used as given
    with pytest.raises(ValueError, match="capturable=True needs every parameter of a group on one device"):
        qo.AdamW8bit([p, torch.nn.Parameter(torch.randn(3, device="meta"))], capturable=True)


@pytest.mark.parametrize("kind", ["adam", "lion"])
def test_hyper_table_equals_the_float64_formulas(kind):
    """The device table (both modes) equals adam_hyper / lion_hyper, the documented float64 formulas, bit for bit."""
    rng = random.Random(0)
    steps = list(range(1, 5001)) + [rng.randint(1, 10 ** 7) for _ in range(5000)]
    for b1, b2, lr, eps, wd in [(0.9, 0.999, 1e-3, 1e-8, 0.01), (0.9, 0.95, 2e-4, 1e-6, 0.1),
                                (0.85, 0.9999, 3.7e-5, 1e-8, 0.0)]:
        got = ref.hyper_table(kind, lr, torch.tensor(steps), b1, b2, eps, wd)
        want = torch.tensor([ref.adam_hyper(lr, s, b1, b2, eps, wd) if kind == "adam" else ref.lion_hyper(lr, wd)
                             for s in steps], dtype=torch.float32)
        assert torch.equal(got, want)
        as_tensor = ref.hyper_table(kind, torch.tensor(lr, dtype=torch.float64), torch.tensor(steps), b1, b2, eps,
                                    wd)
        assert torch.equal(as_tensor, want)
