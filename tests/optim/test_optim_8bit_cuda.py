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
    q1, q2 = qpeft.codes.dynamic_map(True, device="cuda"), qpeft.codes.dynamic_map(False, device="cuda")
    ref.optim_8bit_step_ref(*expected[:6], q1, q2, expected[6], args[7], args[8], kind)
    monkeypatch.setenv("QPEFT_BACKEND", backend)
    torch.ops.qpeft.optim_8bit_step(*args[:6], q1, q2, args[6], args[7], args[8], kind)
    for got, want in zip(_flat(args), _flat(expected)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_step_does_not_sync_and_captures_no_host_state(backend, monkeypatch):
    monkeypatch.setenv("QPEFT_BACKEND", backend)
    ps = [torch.nn.Parameter(torch.randn(16, 4096, device="cuda")) for _ in range(8)]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = qo.AdamW8bit(ps)
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
