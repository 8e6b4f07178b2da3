"""qpeft.apply_rotary_pos_emb (qpeft::rope / rope_) against transformers' apply_rotary_pos_emb with the (cos, sin)
of the rotary embedding module for every rope type the installed transformers knows, and an fp64 oracle: forward
and gradients within the 2x rule, every dtype, GQA head counts, in place on q/k views (autograd through it),
packed sequences (position_ids restarting per sequence), partial rotary dims; the Triton kernel under the
interpreter (fp16/fp32)."""
from __future__ import annotations

import importlib

import pytest
import torch

import qpeft
from qpeft.reference.rope import rope_ref
from utils import DTYPES, assert_close_2x, requires_triton_runtime, triton_device, triton_dtypes

D = 16
# rope_parameters per rope type (beyond rope_type / rope_theta); a type the installed transformers adds must be
# added here (test_every_rope_type fails naming it)
ROPE_PARAMS = {
    "default": {},
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 32},
    "longrope": {"short_factor": [1.0 + 0.1 * i for i in range(D // 2)],
                 "long_factor": [2.0 + 0.1 * i for i in range(D // 2)], "original_max_position_embeddings": 32},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "proportional": {"partial_rotary_factor": 0.5},
}
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]


def _cos_sin(rope_type, position_ids, dtype, device="cpu"):
    """(cos, sin) as LlamaRotaryEmbedding computes them for this rope type: (B, S, D) in `dtype`."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=4 * D, num_attention_heads=4, max_position_embeddings=128,
                      rope_parameters={"rope_type": rope_type, "rope_theta": 10000.0, **ROPE_PARAMS[rope_type]})
    emb = LlamaRotaryEmbedding(cfg).to(device)
    return emb(torch.zeros(1, dtype=dtype, device=device), position_ids.to(device))


def _hf_apply(family="llama"):
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}").apply_rotary_pos_emb


def _qk(B, S, Hq, Hk, dtype, device="cpu", seed=0):
    """q, k as (B, heads, S, D) transposed views of projection outputs (B, S, heads * D), like HF attention."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, Hq * D, generator=g).to(device, dtype).view(B, S, Hq, D).transpose(1, 2)
    k = torch.randn(B, S, Hk * D, generator=g).to(device, dtype).view(B, S, Hk, D).transpose(1, 2)
    return q, k


def _run(fn, q, k, gq, gk):
    q0 = q.detach().clone().requires_grad_(True)
    k0 = k.detach().clone().requires_grad_(True)
    # rotate non-leaf views, as attention does (in place on a leaf that requires grad is refused by autograd)
    qe, ke = fn(q0 * 1, k0 * 1)
    dq, dk = torch.autograd.grad((qe, ke), (q0, k0), (gq.to(qe.dtype), gk.to(ke.dtype)))
    return qe.detach(), ke.detach(), dq, dk


def _check(rope_type, dtype, device="cpu", family="llama", B=2, S=7, Hq=4, Hk=2, inplace=True):
    pos = torch.arange(S).repeat(B, 1) + torch.tensor([[0], [5]])[:B]
    cos, sin = _cos_sin(rope_type, pos, dtype, device)
    q, k = _qk(B, S, Hq, Hk, dtype, device)
    g = torch.Generator().manual_seed(1)
    gq, gk = torch.randn(q.shape, generator=g).to(device), torch.randn(k.shape, generator=g).to(device)
    hf = _hf_apply(family)
    ours = _run(lambda a, b: qpeft.apply_rotary_pos_emb(a, b, cos, sin, inplace=inplace), q, k, gq, gk)
    base = _run(lambda a, b: hf(a, b, cos, sin), q, k, gq, gk)
    oracle = _run(lambda a, b: hf(a, b, cos.double(), sin.double()), q.double(), k.double(), gq.double(),
                  gk.double())
    for name, o, b, e in zip(("q", "k", "dq", "dk"), ours, base, oracle):
        assert o.dtype == b.dtype and o.shape == b.shape
        assert_close_2x(o, e, b, 2.0, eps=1e-6, what=f"{name} {rope_type} {dtype}")


def test_every_rope_type_is_covered():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    missing = sorted(set(ROPE_INIT_FUNCTIONS) - set(ROPE_PARAMS))
    assert not missing, f"rope types of this transformers without a test configuration: {missing}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope_type", list(ROPE_PARAMS))
def test_matches_transformers_every_rope_type(rope_type, dtype):
    _check(rope_type, dtype)


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_each_family_function(family):
    _check("default", torch.bfloat16, family=family)
    _check("yarn", torch.float32, family=family, inplace=False)


def test_in_place_on_projection_views_with_autograd():
    # q, k are views of the projection outputs; rotating them in place must give the gradients of the eager path
    torch.manual_seed(0)
    B, S, H, Hq, Hk = 2, 5, 24, 4, 2
    x = torch.randn(B, S, H, requires_grad=True)
    wq, wk = torch.randn(Hq * D, H, requires_grad=True), torch.randn(Hk * D, H, requires_grad=True)
    cos, sin = _cos_sin("llama3", torch.arange(S).repeat(B, 1), torch.float32)

    def attn(rope):
        q = (x @ wq.t()).view(B, S, Hq, D).transpose(1, 2)
        k = (x @ wk.t()).view(B, S, Hk, D).transpose(1, 2)
        qe, ke = rope(q, k, cos, sin)
        if rope is qpeft.apply_rotary_pos_emb:
            assert qe.data_ptr() == q.data_ptr() and ke.data_ptr() == k.data_ptr()  # no new buffer
        return (qe[:, ::2] @ ke.transpose(-1, -2)).square().sum()

    got = torch.autograd.grad(attn(qpeft.apply_rotary_pos_emb), (x, wq, wk))
    want = torch.autograd.grad(attn(_hf_apply()), (x, wq, wk))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_in_place_after_a_save_raises_instead_of_a_wrong_gradient():
    cos, sin = _cos_sin("default", torch.arange(3)[None], torch.float32)
    x = torch.randn(1, 3, 2 * D, requires_grad=True)
    q = (x * 1).view(1, 3, 2, D).transpose(1, 2)
    saved = q.sin()  # sin's backward needs q as it was
    qpeft.apply_rotary_pos_emb(q, q.detach().clone(), cos, sin)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


def test_inplace_false_leaves_inputs_unchanged():
    cos, sin = _cos_sin("default", torch.arange(4)[None], torch.float16)
    q, k = _qk(1, 4, 2, 1, torch.float16)
    q0, k0 = q.clone(), k.clone()
    qe, ke = qpeft.apply_rotary_pos_emb(q, k, cos, sin, inplace=False)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    qi, ki = qpeft.apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(qi, qe) and torch.equal(ki, ke) and torch.equal(q, qe)


def test_wider_cos_sin_promote_like_transformers():
    # bf16 q/k with fp32 cos/sin (autocast): HF returns fp32; so do we, leaving q/k as they were
    cos, sin = _cos_sin("yarn", torch.arange(4)[None], torch.float32)
    q, k = _qk(1, 4, 2, 1, torch.bfloat16)
    q0 = q.clone()
    got = qpeft.apply_rotary_pos_emb(q, k, cos, sin)
    want = _hf_apply()(q, k, cos, sin)
    assert torch.equal(q, q0)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_unsqueeze_dim_2_layout():
    cos, sin = _cos_sin("linear", torch.arange(6).repeat(2, 1), torch.float32)
    q, k = _qk(2, 6, 3, 1, torch.float32)
    want = _hf_apply()(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2)
    got = qpeft.apply_rotary_pos_emb(q.transpose(1, 2).clone(), k.transpose(1, 2).clone(), cos, sin, 2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _packed_equals_separate(device, dtype):
    """One packed row (1, 5 + 3 + 4) with position_ids restarting per sequence = the three sequences alone, with
    per-token cos/sin from the rotary module and with a (positions, D) table + position_ids."""
    lens = [5, 3, 4]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    q, k = _qk(1, sum(lens), 4, 2, dtype, device, seed=3)
    cos, sin = _cos_sin("yarn", pos, dtype, device)
    table_cos, table_sin = _cos_sin("yarn", torch.arange(16)[None], dtype, device)
    packed = qpeft.apply_rotary_pos_emb(q, k, cos, sin, inplace=False)
    packed_table = qpeft.apply_rotary_pos_emb(q, k, table_cos[0], table_sin[0], position_ids=pos.to(device),
                                              inplace=False)
    start = 0
    for n in lens:
        c, s = _cos_sin("yarn", torch.arange(n)[None], dtype, device)
        sep = qpeft.apply_rotary_pos_emb(q[:, :, start:start + n], k[:, :, start:start + n], c, s, inplace=False)
        for a, b, t in zip(packed, sep, packed_table):
            assert torch.equal(a[:, :, start:start + n], b)
            assert torch.equal(t[:, :, start:start + n], b)
        start += n


def test_packed_sequences_equal_separate_sequences():
    _packed_equals_separate("cpu", torch.float32)


def test_position_ids_table_gradients():
    table_cos, table_sin = _cos_sin("dynamic", torch.arange(20)[None], torch.float32)
    pos = torch.tensor([[3, 4, 5, 0, 1], [7, 8, 9, 10, 11]])
    cos, sin = _cos_sin("dynamic", pos, torch.float32)
    q, k = _qk(2, 5, 2, 2, torch.float32)
    gq, gk = torch.randn(q.shape), torch.randn(k.shape)
    a = _run(lambda x, y: qpeft.apply_rotary_pos_emb(x, y, table_cos[0], table_sin[0], position_ids=pos), q, k,
             gq, gk)
    b = _run(lambda x, y: qpeft.apply_rotary_pos_emb(x, y, cos, sin), q, k, gq, gk)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    with pytest.raises(RuntimeError, match="position_ids must be in"):
        qpeft.apply_rotary_pos_emb(q, k, table_cos[0, :10], table_sin[0, :10], position_ids=pos)


def test_partial_rotary_dim_passes_the_rest_through():
    q, k = _qk(1, 4, 2, 2, torch.float32)
    full_cos, full_sin = _cos_sin("default", torch.arange(4)[None], torch.float32)
    cos, sin = full_cos[..., :8].contiguous(), full_sin[..., :8].contiguous()  # rotary dim 8 of head dim 16
    for inplace in (False, True):
        qe, _ = qpeft.apply_rotary_pos_emb(q.clone(), k.clone(), cos, sin, inplace=inplace)
        want = _hf_apply()(q[..., :8], k[..., :8], cos, sin)[0]
        torch.testing.assert_close(qe[..., :8], want, rtol=1e-6, atol=1e-6)
        assert torch.equal(qe[..., 8:], q[..., 8:])


def test_reference_backward_is_the_transpose():
    # <rope(x), g> == <x, rope^T(g)> for yarn's scaled cos/sin (cos^2 + sin^2 != 1)
    cos, sin = _cos_sin("yarn", torch.arange(6)[None], torch.float64)
    x, g = torch.randn(1, 6, 3, D, dtype=torch.float64), torch.randn(1, 6, 3, D, dtype=torch.float64)
    lhs = (rope_ref(x, cos, sin, None, False) * g).sum()
    rhs = (x * rope_ref(g, cos, sin, None, True)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_compile_fullgraph_in_place():
    torch._dynamo.reset()
    cos, sin = _cos_sin("llama3", torch.arange(5).repeat(2, 1), torch.float32)

    def fn(x, w):
        q = (x @ w.t()).view(2, 5, 2, D).transpose(1, 2)
        qe, ke = qpeft.apply_rotary_pos_emb(q, q * 2, cos, sin)
        return (qe * ke).sum()

    x, w = torch.randn(2, 5, 8), torch.randn(2 * D, 8)
    outs = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = f(xx, ww)
        outs.append((loss, *torch.autograd.grad(loss, (xx, ww))))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch._dynamo.reset()


def test_opcheck():
    cos, sin = _cos_sin("yarn", torch.arange(5).repeat(2, 1), torch.float32)
    x = torch.randn(2, 5, 3, D)
    pos = torch.tensor([[0, 1, 2, 0, 1], [4, 3, 2, 1, 0]])
    for args in ((x, cos, sin, None, False), (x, cos[0], sin[0], pos, True), (x.transpose(1, 2).contiguous()
                 .transpose(1, 2), cos[:1], sin[:1], None, False)):
        torch.library.opcheck(torch.ops.qpeft.rope.default, args)
        torch.library.opcheck(torch.ops.qpeft.rope_.default, (args[0].clone(), *args[1:]))


def test_bad_input_names_the_argument():
    cos, sin = _cos_sin("default", torch.arange(4)[None], torch.float32)
    q, k = _qk(1, 4, 2, 2, torch.float32)
    with pytest.raises(ValueError, match="unsqueeze_dim"):
        qpeft.apply_rotary_pos_emb(q, k, cos, sin, 3)
    with pytest.raises(ValueError, match="cos/sin must be"):
        qpeft.apply_rotary_pos_emb(q, k, cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match="rotary dim"):
        qpeft.apply_rotary_pos_emb(q, k, cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="k must be 4-D"):
        qpeft.apply_rotary_pos_emb(q, k[0], cos, sin)
    with pytest.raises(TypeError, match="q must be"):
        qpeft.apply_rotary_pos_emb(q.long(), k, cos, sin)
    with pytest.raises(ValueError, match="cos requires grad"):
        qpeft.apply_rotary_pos_emb(q, k, cos.clone().requires_grad_(), sin)
    with pytest.raises(TypeError, match="position_ids"):
        qpeft.apply_rotary_pos_emb(q, k, cos[0], sin[0], position_ids=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="expanded"):
        qpeft.rope(torch.randn(1, 1, 4, D).expand(1, 2, 4, D), cos, sin)


# ------------------------------------------------------------------------------------------ Triton kernel
@pytest.mark.triton
@requires_triton_runtime
@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("rope_type", ["default", "yarn", "longrope"])
def test_triton_matches_transformers(rope_type, dtype):
    from qpeft import _backend

    assert _backend.select("rope", torch.device(triton_device()), cuda=False) == "triton"
    _check(rope_type, dtype, device=triton_device(), Hq=5, Hk=3)
    _check(rope_type, dtype, device=triton_device(), B=1, S=3, Hq=2, Hk=1, inplace=False)


@pytest.mark.triton
@requires_triton_runtime
def test_triton_packed_partial_and_reference():
    dev = triton_device()
    _packed_equals_separate(dev, torch.float16)
    x = torch.randn(2, 3, 5, 2 * D, device=dev).transpose(1, 2)  # (2, 5, 3, 2D) strided, head dim 32
    cos, sin = _cos_sin("llama3", torch.arange(5).repeat(2, 1), torch.float32, dev)  # rotary dim 16 < 32
    pos = torch.tensor([[0, 1, 2, 0, 1], [4, 3, 2, 1, 0]], device=dev)
    for c, s, p in ((cos, sin, None), (cos[0], sin[0], pos)):
        for backward in (False, True):
            want = rope_ref(x, c, s, p, backward)
            torch.testing.assert_close(torch.ops.qpeft.rope(x, c, s, p, backward), want, rtol=1e-6, atol=1e-6)
            y = x.clone()
            torch.ops.qpeft.rope_(y, c, s, p, backward)
            torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)


@pytest.mark.triton
@requires_triton_runtime
def test_opcheck_triton():
    dev = triton_device()
    cos, sin = _cos_sin("yarn", torch.arange(5).repeat(2, 1), torch.float16, dev)
    x = torch.randn(2, 5, 3, D, device=dev).half()
    torch.library.opcheck(torch.ops.qpeft.rope.default, (x, cos, sin, None, False))
    torch.library.opcheck(torch.ops.qpeft.rope_.default, (x.clone(), cos, sin, None, True))
