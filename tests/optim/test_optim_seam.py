"""The CUDA-only Python of qpeft.optim, run on the CPU through the fake CUDA runtime (tests/fake_cuda.py): the real
PagedStates (managed pool, prefetch, evict, pinned fallback, events), the step's pinned staging of the step table,
the capture-in-progress branches, and the Triton launcher's pointer tables kept alive during a capture.

Each paged optimizer is checked against itself with nothing paged (page_min_size above every parameter), stepped
through the same fake device: paging must change where states live, never what the update computes."""
from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch

import qpeft.optim as qo
from qpeft.formats import codes
from qpeft.optim.paged import PagedStates

PAGED = [qo.PagedAdamW8bit, qo.PagedAdamW, qo.PagedLion8bit]
NEVER = 10 ** 9  # page_min_size that pages nothing: the unpaged twin


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    # 5120 elements (paged, 8-bit states), 4100 (paged, a partial last block), 100 (unpaged, fp32 states)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in ((64, 80), (4100,), (100,))]


def _opt(cls, params, **kw):
    lr = 3e-4 if "Lion" in cls.__name__ else 3e-3
    return cls(params, lr=lr, weight_decay=0.05, **kw)


def _steps(opts_params, n, seed=1):
    """n steps of each (optimizer, params) with the same gradients."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        grads = [torch.randn(p.shape, generator=g) * 1e-2 for p in opts_params[0][1]]
        for opt, params in opts_params:
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            opt.step()


def _assert_same(o1, p1, o2, p2):
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)
    for a, b in zip(p1, p2):
        s1, s2 = o1.state[a], o2.state[b]
        assert s1.keys() == s2.keys()
        for k in ("state1", "state2", "absmax1", "absmax2"):
            if k in s1:
                assert torch.equal(s1[k], s2[k]), k


def _names(kind):
    return ("state1", "state2") if kind == "adam" else ("state1",)


def _pair(cls, **kw):
    p1, p2 = _params(), _params()
    return _opt(cls, p1, **kw), p1, _opt(cls, p2, page_min_size=NEVER, **kw), p2


@pytest.mark.parametrize("cls", PAGED, ids=lambda c: c.__name__)
def test_paged_steps_on_a_cuda_device(fake_cuda, cls):
    """The first step (which raised on every GPU: WeakSet ownership) and more: states of the two large
    parameters live in the managed pool and are prefetched to the device before each launch."""
    opt, ps, twin, ps2 = _pair(cls)
    _steps([(opt, ps), (twin, ps2)], 1)
    _assert_same(opt, ps, twin, ps2)
    pager = opt._pagers[ps[0].device]
    assert pager.mode == "managed" and fake_cuda.count("managed_pool") == 1
    assert fake_cuda.pools[0].library.endswith("qpeft_C.so")
    assert (fake_cuda.pools[0].alloc_fn, fake_cuda.pools[0].free_fn) == ("qpeft_managed_alloc", "qpeft_managed_free")
    names = _names(opt.kind)
    paged = [opt.state[p][k] for p in ps[:2] for k in names]
    assert all(pager.owns(t) and fake_cuda.in_pool(t) for t in paged)
    small = [opt.state[ps[2]][k] for k in names]
    assert not any(pager.owns(t) or fake_cuda.in_pool(t) for t in small)
    assert not any(pager.owns(t.clone()) for t in paged)  # identity, not equal values
    assert not twin._pagers

    fake_cuda.log.clear()
    _steps([(opt, ps)], 2, seed=2)
    _steps([(twin, ps2)], 2, seed=2)
    _assert_same(opt, ps, twin, ps2)
    mine = [e for e in fake_cuda.log if e[0] in ("managed_prefetch", "optim_8bit_step_out")]
    # per step: the fp32-state bucket (unpaged), and the bucket of the large parameters after their prefetches
    buckets = {}
    for e in mine:
        buckets.setdefault(e[0], []).append(e)
    assert len(buckets["managed_prefetch"]) == 2 * len(paged)
    assert {e[1:3] for e in buckets["managed_prefetch"]} == {(t.data_ptr(), 0) for t in paged}
    last_prefetch = max(i for i, e in enumerate(mine) if e[0] == "managed_prefetch")
    assert mine[last_prefetch + 1][0] == "optim_8bit_step_out"  # the launch that reads them comes next


@pytest.mark.parametrize("cls", PAGED, ids=lambda c: c.__name__)
def test_evict_pushes_paged_states_to_the_host(fake_cuda, cls):
    opt, ps, twin, ps2 = _pair(cls)
    _steps([(opt, ps), (twin, ps2)], 2)
    paged = [opt.state[p][k] for p in ps[:2] for k in _names(opt.kind)]
    fake_cuda.log.clear()
    opt.evict()
    assert fake_cuda.log == [("managed_prefetch", t.data_ptr(), -1, False) for t in paged]
    twin.evict()  # nothing paged: a no-op
    assert len(fake_cuda.log) == len(paged)
    _steps([(opt, ps), (twin, ps2)], 1, seed=3)  # brought back by the next step
    assert fake_cuda.count("managed_prefetch") == 2 * len(paged)
    _assert_same(opt, ps, twin, ps2)


@pytest.mark.parametrize("cls", PAGED, ids=lambda c: c.__name__)
def test_checkpoint_of_paged_states_loads_paged(fake_cuda, cls):
    opt, ps, twin, ps2 = _pair(cls)
    _steps([(opt, ps), (twin, ps2)], 2)
    sd, sd_twin = copy.deepcopy(opt.state_dict()), copy.deepcopy(twin.state_dict())
    for a, b in zip(sd["state"].values(), sd_twin["state"].values()):
        assert a["step"] == b["step"]
        for k, v in a["__bnb_optimizer_quant_state__"].items():
            assert torch.equal(v, b["__bnb_optimizer_quant_state__"][k]), k
    # a fresh paged optimizer loads either checkpoint with its states paged again
    for source in (sd, sd_twin):
        p3 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        o3 = _opt(cls, p3)
        o3.load_state_dict(source)
        pager = o3._pagers[p3[0].device]
        assert all(pager.owns(o3.state[p][k]) and fake_cuda.in_pool(o3.state[p][k])
                   for p in p3[:2] for k in _names(o3.kind))
        assert not pager.owns(o3.state[p3[2]]["state1"])
        _steps([(o3, p3)], 2, seed=4)
    _steps([(twin, ps2)], 2, seed=4)
    _assert_same(o3, p3, twin, ps2)


def test_paged_states_die_with_the_optimizer_and_ownership_entries_with_them(fake_cuda):
    p = torch.nn.Parameter(torch.randn(5000))
    p.grad = torch.randn(5000)
    opt = qo.PagedAdamW8bit([p])
    opt.step()
    pager = opt._pagers[p.device]
    assert len(pager._owned) == 2
    opt.load_state_dict(opt.state_dict())  # new state tensors; the old ones are freed
    gc.collect()
    assert len(pager._owned) == 2 and all(pager.owns(opt.state[p][k]) for k in ("state1", "state2"))
    pool = fake_cuda.pools[0]
    del opt
    gc.collect()
    assert len(pool.tensors) == 0  # nothing else keeps the states alive


def test_pager_ownership_is_by_identity(fake_cuda):
    pager = PagedStates(torch.device("cpu"))
    a = pager.zeros((300,), torch.float32)
    b = torch.zeros(300)  # equal values, another tensor
    assert pager.owns(a) and not pager.owns(b) and not pager.owns(a.view(-1))
    del a
    gc.collect()
    assert len(pager._owned) == 0


@pytest.mark.parametrize("cls", PAGED, ids=lambda c: c.__name__)
def test_pinned_fallback_without_concurrent_managed_access(fake_cuda, cls):
    """WSL / virtualised GPUs: states in pinned host memory, each update on a device copy copied back."""
    fake_cuda.pretend(concurrent_managed_access=False)
    opt, ps, twin, ps2 = _pair(cls)
    with pytest.warns(UserWarning, match="NVIDIA H100 80GB HBM3 reports no concurrent managed memory access") as rec:
        _steps([(opt, ps), (twin, ps2)], 3)
    assert sum("concurrent managed" in str(w.message) for w in rec) == 1  # once, for the device's pager
    _assert_same(opt, ps, twin, ps2)
    names = _names(opt.kind)
    paged = [opt.state[p][k] for p in ps[:2] for k in names]
    pager = opt._pagers[ps[0].device]
    assert pager.mode == "pinned" and pager.pool is None and not fake_cuda.pools
    assert all(fake_cuda.is_pinned(t) and pager.owns(t) for t in paged)
    assert fake_cuda.count("managed_prefetch") == 0
    # the kernel got device copies (the fake rejects a pinned host tensor); each copy back records an event
    assert fake_cuda.count("event_record") == 3 * len(paged)
    fake_cuda.log.clear()
    opt.evict()  # host memory already: nothing to do
    assert fake_cuda.log == []
    sd = opt.state_dict()
    assert fake_cuda.names() == ["event_sync"]  # the copies back finish before the host reads the states
    p3 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    with pytest.warns(UserWarning, match="no concurrent managed"):
        o3 = _opt(cls, p3)
        o3.load_state_dict(sd)
    assert all(fake_cuda.is_pinned(o3.state[p][k]) for p in p3[:2] for k in names)
    _steps([(o3, p3)], 1, seed=5)
    _steps([(twin, ps2)], 1, seed=5)
    _assert_same(o3, p3, twin, ps2)


@pytest.mark.parametrize("concurrent", [True, False], ids=["managed", "pinned"])
@pytest.mark.parametrize("cls", PAGED, ids=lambda c: c.__name__)
def test_step_during_a_capture(fake_cuda, cls, concurrent):
    """capturable=True under a CUDA-graph capture: no prefetch (a hint the graph would not replay), no event
    (it cannot be waited on), no pinned host table, no sync; state_dict synchronizes the device instead."""
    fake_cuda.pretend(concurrent_managed_access=concurrent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        opt, ps, twin, ps2 = _pair(cls, capturable=True)
        _steps([(opt, ps), (twin, ps2)], 1)  # warm-up outside the capture: states exist
        fake_cuda.log.clear()
        with fake_cuda.capture():
            _steps([(opt, ps), (twin, ps2)], 1, seed=6)
    assert set(fake_cuda.names()) == {"optim_8bit_step_out"}
    assert all(e[1] is True for e in fake_cuda.log)  # launched inside the capture
    fake_cuda.log.clear()
    opt.state_dict()
    assert fake_cuda.log[0] == ("synchronize", ps[0].device)  # graph replays record no event
    _assert_same(opt, ps, twin, ps2)


def test_step_table_is_staged_through_pinned_memory(fake_cuda):
    """capturable=False on a GPU: the int step counts go host -> pinned -> device without a sync, one table per
    bucket; capturable=True keeps them on the device and pins nothing."""
    ps = _params()
    opt = qo.AdamW8bit(ps)
    _steps([(opt, ps)], 2)
    pins = [e for e in fake_cuda.log if e[0] == "pin"]
    assert pins == [("pin", (2,), False), ("pin", (1,), False)] * 2  # 8-bit bucket (2 tensors), fp32 bucket (1)
    fake_cuda.log.clear()
    ps2 = _params()
    cap = qo.AdamW8bit(ps2, capturable=True)
    _steps([(cap, ps2)], 2)
    assert fake_cuda.count("pin") == 0
    _assert_same(opt, ps, cap, ps2)


def test_paged_optimizer_raises_the_build_error(fake_cuda):
    fake_cuda.build_error = "nvcc fatal: Unsupported gpu architecture 'compute_90'"
    p = torch.nn.Parameter(torch.randn(5000))
    p.grad = torch.randn(5000)
    opt = qo.PagedAdamW8bit([p])
    with pytest.raises(RuntimeError, match="Unsupported gpu architecture"):
        opt.step()
    assert not opt.state[p]  # nothing half-initialised


def test_triton_launcher_keeps_its_pointer_tables_alive_during_a_capture(fake_cuda):
    """optim_8bit_step_triton on a GPU: the per-launch pointer table is pinned and copied asynchronously; inside
    a capture the pinned buffers are kept for good, since every replay copies from the same host addresses."""
    pytest.importorskip("triton")
    from qpeft.triton_kernels import optim_8bit as tk

    from utils import recorded_triton_launches

    ps = _params()
    args = [ps, [torch.randn_like(p) for p in ps[:2]]]
    q1, q2 = codes.dynamic_map(True), codes.dynamic_map(False)
    s1 = [torch.zeros(p.shape, dtype=torch.uint8) for p in ps[:2]]
    s2 = [torch.zeros(p.shape, dtype=torch.uint8) for p in ps[:2]]
    a1 = [torch.zeros(-(-p.numel() // 256)) for p in ps[:2]]
    a2 = [torch.zeros(-(-p.numel() // 256)) for p in ps[:2]]
    hyper = torch.zeros(2, 4)
    kept = len(tk._CAPTURED_TABLES)
    with recorded_triton_launches() as launches:
        tk.optim_8bit_step_triton(ps[:2], args[1], s1, s2, a1, a2, q1, q2, hyper, 0.9, 0.999, "adam")
        assert len(tk._CAPTURED_TABLES) == kept and len(launches) == 1
        with fake_cuda.capture():
            tk.optim_8bit_step_triton(ps[:2], args[1], s1, s2, a1, a2, q1, q2, hyper, 0.9, 0.999, "adam")
    assert [e[2] for e in fake_cuda.log if e[0] == "pin"] == [False, False, True, True]  # meta + starts, twice
    assert len(tk._CAPTURED_TABLES) == kept + 1
    meta, starts = tk._CAPTURED_TABLES[-1]
    assert fake_cuda.is_pinned(meta) and fake_cuda.is_pinned(starts)
    assert meta[:, 0].tolist() == [p.data_ptr() for p in ps[:2]]  # the rows point at the parameters
    assert starts.tolist() == [0, 20, 37]  # 5120 / 256 blocks, then 4100 -> 17
    del tk._CAPTURED_TABLES[kept:]
