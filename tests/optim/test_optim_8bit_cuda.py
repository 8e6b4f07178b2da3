"""GPU checks of qpeft.optim (skipped without a CUDA device; owed: no GPU was lent when they were written):
the CUDA C++ and Triton multi-tensor kernels equal the reference bit for bit on the device, one launch per group
and dtype without a host sync, and paged states are real CUDA tensors in a memory pool (counted, prefetched,
evicted, recreated by load_state_dict, freed with the optimizer)."""
from __future__ import annotations

import copy
import gc

import pytest
import torch

import qpeft
import qpeft.optim as qo
from qpeft.reference import optim_8bit as ref

from test_optim_8bit_ref import SIZES, _inputs
from utils import DTYPES, requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]


def _to(args, dev):
    return [[t.to(dev) for t in x] if isinstance(x, list) else (x.to(dev) if torch.is_tensor(x) else x) for x in args]


def _flat(args):
    return [t for x in args[:7] for t in (x if isinstance(x, list) else [x])]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant", [True, False], ids=["8bit", "fp32"])
@pytest.mark.parametrize("kind", ["adam", "lion"])
def test_kernel_equals_reference_on_gpu(kind, quant, dtype, backend, monkeypatch):
    args = _inputs(kind, quant, SIZES, dtype)
    args[1][2][5] = float("inf")
    args = _to(args, "cuda")
    expected = copy.deepcopy(args)
    q1, q2 = qpeft.formats.codes.dynamic_map(True, device="cuda"), qpeft.formats.codes.dynamic_map(False, device="cuda")
    ref.optim_8bit_step_ref(*expected[:6], q1, q2, expected[6], args[7], args[8], kind)
    monkeypatch.setenv("QPEFT_BACKEND", backend)
    torch.ops.qpeft.optim_8bit_step(*args[:6], q1, q2, args[6], args[7], args[8], kind)
    for got, want in zip(_flat(args), _flat(expected)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("capturable", [False, True], ids=["default", "capturable"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_step_does_not_sync_and_captures_no_host_state(backend, capturable, monkeypatch):
    monkeypatch.setenv("QPEFT_BACKEND", backend)
    ps = [torch.nn.Parameter(torch.randn(16, 4096, device="cuda")) for _ in range(8)]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = qo.AdamW8bit(ps, capturable=capturable)
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_paged_states_are_pooled_cuda_tensors():
    ps = [torch.nn.Parameter(torch.randn(1024, 1024, device="cuda")) for _ in range(2)]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-3
    before = torch.cuda.memory_allocated()
    opt = qo.PagedAdamW8bit(ps, lr=1e-3)
    opt.step()
    st = opt.state[ps[0]]
    assert st["state1"].is_cuda and opt._pagers[ps[0].device].owns(st["state1"])
    assert torch.cuda.memory_allocated() - before >= 2 * 2 * 1024 * 1024  # counted by the allocator
    opt.evict()
    opt.step()  # prefetched back
    sd = copy.deepcopy(opt.state_dict())
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = qo.PagedAdamW8bit(ps2, lr=1e-3)
    opt2.load_state_dict(sd)
    assert opt2._pagers[ps2[0].device].owns(opt2.state[ps2[0]]["state1"])  # still paged after a resume
    for p, p2 in zip(ps, ps2):
        p2.grad = p.grad.clone()
    opt.step()
    opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(ps, ps2))
    unpaged = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    del opt, opt2
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() <= before + sum(p.numel() * 4 for p in unpaged) + (1 << 20)


def test_paging_lets_a_capped_step_complete():
    """The issue's paging proof, scaled: with the process capped to a memory fraction, fp32 states that do not fit
    next to a large activation buffer fail with AdamW8bit's ordinary states and complete when paged."""
    total = torch.cuda.get_device_properties(0).total_memory
    n = 256 * 1024 * 1024  # 1 GiB of fp32 parameters
    torch.cuda.set_per_process_memory_fraction(min(1.0, 6 * n * 4 / total))
    try:
        p = torch.nn.Parameter(torch.zeros(n, device="cuda"))
        p.grad = torch.full_like(p, 1e-3)
        hog = torch.empty(3 * n, device="cuda")  # the "activation spike"
        with pytest.raises(torch.OutOfMemoryError):
            qo.PagedAdamW([p], page_min_size=1 << 62).step()  # page nothing: ordinary fp32 states
        opt = qo.PagedAdamW([p])
        opt.step()
        torch.cuda.synchronize()
        assert torch.isfinite(p).all()
        del hog
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("cls", [qo.AdamW8bit, qo.Lion8bit, qo.PagedAdamW8bit, qo.PagedAdamW],
                         ids=lambda c: c.__name__)
def test_capturable_step_replays_in_a_cuda_graph(cls, backend, monkeypatch):
    """capturable=True: one step() captured in a CUDA graph and replayed with new gradients, while a scheduler
    changes the lr in place, equals an eager capturable=False run bit for bit at every step (the replay reads the
    incremented device steps and the new lr)."""
    monkeypatch.setenv("QPEFT_BACKEND", backend)
    torch.manual_seed(0)
    shapes = [(16, 4096), (4096, 16), (80,), (257, 33)]  # 8-bit, 8-bit, fp32 states, a partial block
    init = [torch.randn(s, device="cuda") for s in shapes]
    grads = [[torch.randn(s, device="cuda") for s in shapes] for _ in range(10)]
    lr = 1e-3 if "Lion" not in cls.__name__ else 1e-4

    def make(capturable):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        groups = [{"params": ps[:2]}, {"params": ps[2:], "lr": 4 * lr}]
        opt = cls(groups, lr=lr, weight_decay=0.01, capturable=capturable)
        return ps, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.9 ** e)

    eager_ps, eager_opt, eager_sched = make(False)
    ps, opt, sched = make(True)
    for p in ps:
        p.grad = torch.zeros_like(p)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up steps outside the graph (state creation, Triton compilation)
        for i in range(3):
            for p, g in zip(ps, grads[i]):
                p.grad.copy_(g)
            opt.step()
            sched.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for i in range(10):
        for p, g in zip(eager_ps, grads[i]):
            p.grad = g.clone()
        eager_opt.step()
        eager_sched.step()
        if i < 3:
            continue
        for p, g in zip(ps, grads[i]):
            p.grad.copy_(g)
        graph.replay()
        sched.step()
        torch.cuda.synchronize()
        for a, b in zip(ps, eager_ps):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert opt.state[ps[0]]["step"].item() == 10
    for a, b in zip(opt.state.values(), eager_opt.state.values()):
        for k in ("state1", "state2", "absmax1", "absmax2"):
            if k in a:
                assert torch.equal(a[k], b[k]), k
