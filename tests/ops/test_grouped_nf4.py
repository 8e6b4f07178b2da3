"""Grouped NF4 experts (qpeft.quant.experts / ops qpeft::grouped_*): routing, the 4-bit expert stack, the whole
experts block against fp64 oracles (our dense loop, transformers' own experts modules, PEFT's ParamWrapper for
LoRA on experts), gradients, torch.compile, bad input; the Triton kernels under the interpreter (-m triton)."""
from __future__ import annotations

import functools
import math

import pytest
import torch

import qpeft
from qpeft.quant.experts import ExpertsLoRA, GroupedNF4Weight, grouped_nf4_experts, peft_expert_lora, quantize_experts
from qpeft.ops import grouped_nf4 as gops
from qpeft.reference import grouped_nf4 as ref
from utils import (HAS_CUDA, TRITON_INTERPRET, assert_close_2x, has_triton, max_err, narrow_global_loads,
                   recorded_triton_launches, requires_cuda, sm90_resource_usage, spill_instructions)

ops = torch.ops.qpeft


# ------------------------------------------------------------------------------------------------ helpers
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _weights(E, H, I, transposed=False, nested=True, blocksize=64, seed=0, quant_type="nf4"):
    """(gate_up, down) GroupedNF4Weight of a random experts block (H hidden, I intermediate)."""
    g = _gen(seed)
    gu = torch.randn(E, 2 * I, H, generator=g) / math.sqrt(H)
    dn = torch.randn(E, H, I, generator=g) / math.sqrt(I)
    if transposed:  # gpt-oss storage: (E, in, out)
        gu, dn = gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous()
    q = functools.partial(quantize_experts, blocksize=blocksize, double_quant=nested, transposed=transposed,
                          quant_type=quant_type)
    return q(gu), q(dn)


def _routing(T, k, E, mode="random", seed=0):
    """(top_k_index int64, top_k_weights fp32) as a top-k router makes them (distinct experts per token).
    mode "empty": experts 0 and E-1 get nothing; "one": expert 1 is every token's first choice."""
    g = _gen(seed)
    scores = torch.rand(T, E, generator=g)
    if mode == "empty":
        scores[:, 0] = scores[:, -1] = -1.0
    elif mode == "one":
        scores[:, 1] = 2.0
    idx = scores.topk(k, dim=1).indices
    w = torch.softmax(torch.randn(T, k, generator=g), dim=1)
    return idx, w


def _lora(E, r, in_f, out_f, seed=0, scale=0.75):
    g = _gen(seed)
    return ExpertsLoRA(torch.randn(E, r, in_f, generator=g) / math.sqrt(in_f),
                       torch.randn(E, out_f, r, generator=g) / 2, scale)


def _biases(E, H, I, seed=0):
    g = _gen(seed)
    return torch.randn(E, 2 * I, generator=g) / 4, torch.randn(E, H, generator=g) / 4


def _cast_lora(lora, dtype):
    return None if lora is None else ExpertsLoRA(lora.A.to(dtype), lora.B.to(dtype), lora.scale)


def _assert_rms_2x(out, r64, same, what):
    """The 2x rule on the root-mean-square error instead of the maximum, for fp32 gradients: there both paths
    sit at fp32's rounding noise after a chain of ~8 GEMMs with different summation orders, and the ratio of
    their *maximum* errors spreads from 0.65 to 2.15 over seeds (one element's luck); the RMS ratio stays in
    0.9 .. 1.4 (measured over 6 seeds x 7 gradients)."""
    rms = lambda a: ((a.double() - r64) ** 2).mean().sqrt().item()  # noqa: E731
    assert rms(out) <= 2 * rms(same) + 1e-12, f"{what}: RMS error {rms(out):.3e} > 2 x torch's {rms(same):.3e}"


def _oracle(x, idx, w, gu, dn, dtype, biases=None, gate=ref.swiglu, gu_lora=None, dn_lora=None):
    """The dense loop (reference.grouped_experts_ref) on the dequantized experts, everything in `dtype`."""
    bgu, bdn = biases if biases is not None else (None, None)
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    lo = lambda lora: None if lora is None else (lora.A.to(dtype), lora.B.to(dtype), lora.scale)  # noqa: E731
    return ref.grouped_experts_ref(x.to(dtype), idx, w.to(dtype), gu.dequantize(dtype), dn.dequantize(dtype),
                                   gu.transposed, c(bgu), c(bdn), gate, lo(gu_lora), lo(dn_lora))


# ------------------------------------------------------------------------------------------------ routing
@pytest.mark.parametrize("mode", ["random", "empty", "one"])
def test_route_sorts_pairs_by_expert(mode):
    T, k, E = 13, 3, 6
    idx, _ = _routing(T, k, E, mode)
    perm, token, seg = ops.grouped_nf4_route(idx, E)
    assert perm.dtype == token.dtype == seg.dtype == torch.int32
    flat = idx.reshape(-1)
    assert sorted(perm.tolist()) == list(range(T * k))
    assert torch.equal(token, perm // k)
    assert seg[0] == 0 and seg[-1] == T * k
    for e in range(E):
        members = perm[seg[e]:seg[e + 1]].long()
        assert torch.all(flat[members] == e) and members.numel() == int((flat == e).sum())
        assert torch.all(members[1:] > members[:-1])  # stable: pairs keep their order within an expert
    if mode == "empty":
        assert seg[1] == seg[0] and seg[-1] == seg[-2]
    if mode == "one":
        assert seg[2] - seg[1] == T


def test_route_one_expert_per_token():
    idx = torch.tensor([3, 0, 3, 1])
    perm, token, seg = ops.grouped_nf4_route(idx, 4)
    assert perm.tolist() == [1, 3, 0, 2] and torch.equal(token, perm) and seg.tolist() == [0, 1, 2, 2, 4]


@pytest.mark.parametrize("bad", [-1, 6, 100])
def test_route_rejects_out_of_range_expert_ids(bad):
    idx, _ = _routing(5, 2, 6)
    idx[3, 1] = bad
    with pytest.raises(ValueError, match=r"top_k_index .* must be in \[0, 6\).*1 out-of-range ids, e.g. \[" + str(bad)):
        ops.grouped_nf4_route(idx, 6)
    with pytest.raises(ValueError, match="top_k_index"):  # through the functional, before any kernel runs
        gu, dn = _weights(6, 32, 16)
        grouped_nf4_experts(torch.randn(5, 32), idx, torch.rand(5, 2), gu, dn)


def test_device_branch_of_the_data_checks_asserts_on_the_device(monkeypatch):
    """The CUDA branch (torch._assert_async, no host sync) run on CPU tensors through the seam: the same
    message, raised by the assert op (on a GPU it is a device-side assert reported at the next sync)."""
    monkeypatch.setattr(gops, "_host_checks", lambda device: False)
    idx, _ = _routing(5, 2, 6)
    perm, token, seg = ops.grouped_nf4_route(idx, 6)  # valid ids: the asserts pass
    assert seg[-1] == 10
    idx[0, 0] = 7
    with pytest.raises(RuntimeError, match=r"top_k_index \(the router's expert ids\) must be in \[0, 6\)"):
        ops.grouped_nf4_route(idx, 6)
    gu, _ = _weights(6, 32, 16)
    bad_seg = seg.clone()
    bad_seg[-1] = 9
    with pytest.raises(RuntimeError, match="seg_start must rise from 0 to the slot count 10"):
        ops.grouped_nf4_matmul(torch.randn(5, 32), token, *gu.op_args()[:3], gu.blocksize, gu.out_features, False,
                               *gu.op_args()[5:], bad_seg, None, None, None, None, 0.0)


# ------------------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("shape,blocksize,nested,quant_type", [((3, 64, 48), 64, True, "nf4"),
                                                               ((2, 45, 19), 32, False, "fp4"),
                                                               ((4, 19, 45), 128, True, "nf4")])
def test_quantize_experts_is_one_linear4bit_per_expert(shape, blocksize, nested, quant_type):
    W = torch.randn(*shape, dtype=torch.bfloat16)
    stack = quantize_experts(W, blocksize=blocksize, quant_type=quant_type, double_quant=nested)
    assert stack.shape == shape and stack.dtype == torch.bfloat16 and stack.double_quant == nested
    for e in range(shape[0]):
        packed, state = qpeft.quantize_4bit(W[e], blocksize=blocksize, quant_type=quant_type, double_quant=nested)
        p_e, s_e = stack.expert_state(e)
        assert torch.equal(p_e, packed) and torch.equal(s_e.absmax, state.absmax)
        assert s_e.shape == state.shape and s_e.dtype == state.dtype and s_e.blocksize == blocksize
        if nested:
            assert torch.equal(s_e.state2.absmax, state.state2.absmax) and torch.equal(s_e.offset, state.offset)
        # bitsandbytes' serialized form of that expert, byte for byte
        d_stack, d_alone = s_e.as_dict(packed=True), state.as_dict(packed=True)
        assert d_stack.keys() == d_alone.keys() and all(torch.equal(d_stack[k], d_alone[k]) for k in d_alone)
        assert torch.equal(stack.dequantize()[e], qpeft.dequantize_4bit(packed, state))
    again = GroupedNF4Weight.from_expert_states([stack.expert_state(e) for e in range(shape[0])])
    for name in ("packed", "absmax", "nested_absmax", "offset"):
        a, b = getattr(again, name), getattr(stack, name)
        assert (a is None and b is None) or torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ the block
CASES = {  # name: (E, H, I, T, k, transposed, nested, blocksize, mode, gate, bias, lora)
    "qwen": (6, 64, 32, 11, 3, False, True, 64, "random", "swiglu", False, True),
    "empty_experts": (6, 64, 32, 9, 2, False, False, 32, "empty", "swiglu", False, True),
    "one_expert_all_tokens": (4, 64, 32, 12, 1, False, True, 64, "one", "swiglu", False, True),
    "odd_sizes": (5, 45, 19, 7, 2, False, True, 64, "random", "swiglu", False, True),
    "gpt_oss": (4, 48, 32, 9, 2, True, True, 64, "random", "gpt_oss", True, True),
    "gpt_oss_odd": (3, 45, 19, 6, 2, True, False, 32, "one", "gpt_oss", True, False),  # FP4 experts
}


def _case(name, seed=0):
    E, H, I, T, k, transposed, nested, bs, mode, gate, bias, lora = CASES[name]
    gu, dn = _weights(E, H, I, transposed, nested, bs, seed, quant_type="fp4" if name == "gpt_oss_odd" else "nf4")
    idx, w = _routing(T, k, E, mode, seed)
    x = torch.randn(T, H, generator=_gen(seed + 1)) * 2
    if gate == "gpt_oss":
        x = x * 4  # reach the clamp at +-7 in some gate / up values
    biases = _biases(E, H, I, seed) if bias else None
    loras = (_lora(E, 4, H, 2 * I, seed), _lora(E, 3, I, H, seed + 1, scale=2.0)) if lora else (None, None)
    return dict(x=x, idx=idx, w=w, gu=gu, dn=dn, biases=biases, gate=gate, loras=loras)


def _ours(c, dtype, x=None, w=None, loras=None, biases=None):
    b = c["biases"] if biases is None else biases
    gu_l, dn_l = c["loras"] if loras is None else loras
    return grouped_nf4_experts((c["x"] if x is None else x).to(dtype), c["idx"], c["w"] if w is None else w,
                               c["gu"], c["dn"], gate_up_bias=None if b is None else b[0].to(dtype),
                               down_bias=None if b is None else b[1].to(dtype), apply_gate=c["gate"],
                               gate_up_lora=_cast_lora(gu_l, dtype), down_lora=_cast_lora(dn_l, dtype))


def _gate_fn(name):
    return ref.gpt_oss_swiglu if name == "gpt_oss" else ref.swiglu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CASES))
def test_experts_block_matches_fp64_oracle(name, dtype):
    c = _case(name)
    args = (c["x"], c["idx"], c["w"], c["gu"], c["dn"])
    kw = dict(biases=c["biases"], gate=_gate_fn(c["gate"]), gu_lora=c["loras"][0], dn_lora=c["loras"][1])
    out = _ours(c, dtype)
    assert out.dtype == dtype and out.shape == c["x"].shape
    assert_close_2x(out, _oracle(*args, torch.float64, **kw), _oracle(*args, dtype, **kw), what=f"{name} {dtype}")
    if name == "gpt_oss":  # the clamp is exercised
        h = c["x"] @ c["gu"].dequantize(torch.float32)[0]
        assert h.abs().max() > 7


# ------------------------------------------------------------------------------------------------ transformers
def _hf_experts(family, E, H, I, k):
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

        return Qwen3MoeExperts(Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                              num_experts_per_tok=k))
    if family == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        return MixtralExperts(MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                            num_experts_per_tok=k))
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    return GptOssExperts(GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E,
                                      num_experts_per_tok=k))


def _loaded_hf(family, gu, dn, biases, dtype, impl):
    E, H, I = gu.num_experts, dn.out_features, dn.in_features
    m = _hf_experts(family, E, H, I, 2)
    m.config._experts_implementation = impl
    with torch.no_grad():
        m.gate_up_proj.copy_(gu.dequantize(torch.float64))
        m.down_proj.copy_(dn.dequantize(torch.float64))
        if biases is not None:
            m.gate_up_proj_bias.copy_(biases[0])
            m.down_proj_bias.copy_(biases[1])
    return m.to(dtype)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_matches_transformers_experts_forward(family):
    """Our 4-bit block == transformers' experts module holding the dequantized weights (fp32, 2x rule vs the
    module's own eager forward in fp64), with its own `_apply_gate` passed as the activation."""
    pytest.importorskip("transformers")
    gpt = family == "gpt_oss"
    E, H, I, T = 5, 48, 24, 10
    gu, dn = _weights(E, H, I, transposed=gpt, seed=3)
    biases = _biases(E, H, I, seed=3) if gpt else None
    idx, w = _routing(T, 2, E, "random", seed=3)
    x = torch.randn(T, H, generator=_gen(4)) * (6 if gpt else 1)
    oracle = _loaded_hf(family, gu, dn, biases, torch.float64, "eager")(x.double(), idx, w.double())
    hf32 = _loaded_hf(family, gu, dn, biases, torch.float32, "grouped_mm")
    same = hf32(x, idx, w)
    ours = grouped_nf4_experts(x, idx, w, gu, dn, gate_up_bias=None if biases is None else biases[0],
                               down_bias=None if biases is None else biases[1], apply_gate=hf32._apply_gate)
    assert_close_2x(ours, oracle, same, what=family)
    named = grouped_nf4_experts(x, idx, w, gu, dn, gate_up_bias=None if biases is None else biases[0],
                                down_bias=None if biases is None else biases[1],
                                apply_gate="gpt_oss" if gpt else "swiglu")
    assert torch.equal(named, ours)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_lora_on_experts_matches_peft_param_wrapper(family):
    """PEFT's `target_parameters` LoRA (ParamWrapper) on transformers' experts holding the dequantized weights
    against our grouped path reading the same lora_A / lora_B (views, `peft_expert_lora`): outputs and the
    gradients of x, lora_A, lora_B (fp32, 2x rule vs PEFT in fp64)."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    gpt = family == "gpt_oss"
    E, H, I, T, r = 4, 48, 24, 9, 4
    gu, dn = _weights(E, H, I, transposed=gpt, seed=5)
    biases = _biases(E, H, I, seed=5) if gpt else None
    idx, w = _routing(T, 2, E, "random", seed=5)
    x = torch.randn(T, H, generator=_gen(6)) * (6 if gpt else 1)
    dy = torch.randn(T, H, generator=_gen(7))

    def peft_run(dtype):
        torch.manual_seed(11)  # the same random (non-zero) LoRA init in every run

        class Holder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.experts = _loaded_hf(family, gu, dn, biases, torch.float32, "eager")

        model = get_peft_model(Holder(), LoraConfig(target_modules=[], target_parameters=["gate_up_proj",
                                                    "down_proj"], r=r, lora_alpha=8, init_lora_weights=False))
        model = model.to(dtype)
        wrappers = {m.parameter_name: m for m in model.modules() if type(m).__name__ == "ParamWrapper"}
        assert sorted(wrappers) == ["down_proj", "gate_up_proj"]
        return model, wrappers

    def grads(model, wrappers, fn, dtype):
        xx = x.to(dtype).requires_grad_(True)
        out = fn(model, wrappers, xx)
        out.backward(dy.to(dtype))
        ps = [wrappers[n].lora_A["default"].weight.grad for n in ("gate_up_proj", "down_proj")] + \
             [wrappers[n].lora_B["default"].weight.grad for n in ("gate_up_proj", "down_proj")]
        return [out.detach(), xx.grad] + ps

    def run_peft(model, wrappers, xx):
        return model.base_model.model.experts(xx, idx, w.to(xx.dtype))

    def run_ours(model, wrappers, xx):
        def lo(n):
            m = wrappers[n]
            return peft_expert_lora(m.lora_A["default"].weight, m.lora_B["default"].weight, E, m.scaling["default"])

        return grouped_nf4_experts(xx, idx, w, gu, dn, gate_up_bias=None if biases is None else biases[0],
                                   down_bias=None if biases is None else biases[1],
                                   apply_gate="gpt_oss" if gpt else "swiglu", gate_up_lora=lo("gate_up_proj"),
                                   down_lora=lo("down_proj"))

    oracle = grads(*peft_run(torch.float64), run_peft, torch.float64)
    same = grads(*peft_run(torch.float32), run_peft, torch.float32)
    ours = grads(*peft_run(torch.float32), run_ours, torch.float32)
    for what, o, r64, s in zip(["out", "dx", "dA_gate_up", "dA_down", "dB_gate_up", "dB_down"], ours, oracle, same):
        assert o.shape == r64.shape and o.abs().max() > 0, what
        assert_close_2x(o, r64, s, what=f"{family} {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["qwen", "gpt_oss", "empty_experts", "one_expert_all_tokens", "odd_sizes"])
def test_gradients_match_dense_per_expert_autograd(name, dtype):
    """dX, d top_k_weights, dA / dB of both LoRAs and d biases against autograd through the dense per-expert
    loop (fp64 oracle; 2x rule against the same loop in `dtype`)."""
    c = _case(name)
    gu_l, dn_l = c["loras"]
    if gu_l is None:
        gu_l, dn_l = _lora(c["gu"].num_experts, 2, c["x"].shape[1], c["gu"].out_features), \
            _lora(c["gu"].num_experts, 5, c["dn"].in_features, c["x"].shape[1], seed=9)
    dy = torch.randn(c["x"].shape, generator=_gen(12))

    def run(fn, dt):
        leaves = [c["x"].to(dt), c["w"].to(dt), gu_l.A.to(dt), gu_l.B.to(dt), dn_l.A.to(dt), dn_l.B.to(dt)]
        if c["biases"] is not None:
            leaves += [c["biases"][0].to(dt), c["biases"][1].to(dt)]
        leaves = [t.clone().requires_grad_(True) for t in leaves]
        out = fn(dt, *leaves)
        out.backward(dy.to(dt))
        return [t.grad for t in leaves]

    def ours(dt, x, w, a1, b1, a2, b2, *bias):
        return grouped_nf4_experts(x, c["idx"], w, c["gu"], c["dn"], gate_up_bias=bias[0] if bias else None,
                                   down_bias=bias[1] if bias else None, apply_gate=c["gate"],
                                   gate_up_lora=ExpertsLoRA(a1, b1, gu_l.scale),
                                   down_lora=ExpertsLoRA(a2, b2, dn_l.scale))

    def dense(dt, x, w, a1, b1, a2, b2, *bias):
        return ref.grouped_experts_ref(x, c["idx"], w, c["gu"].dequantize(dt), c["dn"].dequantize(dt),
                                       c["gu"].transposed, bias[0] if bias else None, bias[1] if bias else None,
                                       _gate_fn(c["gate"]), (a1, b1, gu_l.scale), (a2, b2, dn_l.scale))

    names = ["dx", "dweights", "dA_gate_up", "dB_gate_up", "dA_down", "dB_down", "dbias_gate_up", "dbias_down"]
    for what, o, r64, s in zip(names, run(ours, dtype), run(dense, torch.float64), run(dense, dtype)):
        assert o.dtype == dtype, what
        if dtype == torch.float32:
            _assert_rms_2x(o, r64, s, what=f"{name} {what}")
        else:
            assert_close_2x(o, r64, s, what=f"{name} {what}")
        if name == "empty_experts" and what.startswith(("dA", "dB", "dbias")):
            assert torch.all(o[0] == 0) and torch.all(o[-1] == 0), f"{what} of an expert without tokens"


def test_grouped_nf4_linear_one_projection():
    """The single-projection functional, gather (tokens -> sorted slots) and scatter (sorted -> (token, k) rows),
    against the per-slot math in fp64, with gradients of x, bias and LoRA through the Function."""
    from qpeft.quant.experts import grouped_nf4_linear, route_experts

    c = _case("gpt_oss")
    gu, x, idx = c["gu"], c["x"], c["idx"]
    routing = route_experts(idx, gu.num_experts)
    lora = _lora(gu.num_experts, 3, gu.in_features, gu.out_features)
    bias = c["biases"][0]
    W = gu.dequantize(torch.float64).transpose(1, 2)  # (E, out, in)
    e_of = idx.reshape(-1)[routing.perm.long()]
    xs = x.double()[routing.token.long()]

    def per_slot(xs_, A, B, b):
        We = W[e_of]
        return (torch.einsum("si,soi->so", xs_, We) + b[e_of] +
                lora.scale * torch.einsum("sr,sor->so", torch.einsum("si,sri->sr", xs_, A[e_of]), B[e_of]))

    leaves = [t.clone().requires_grad_(True) for t in (x, lora.A, lora.B, bias)]
    y = grouped_nf4_linear(leaves[0], gu, routing, bias=leaves[3], lora=ExpertsLoRA(leaves[1], leaves[2], lora.scale))
    leaves64 = [t.double().clone().requires_grad_(True) for t in (x, lora.A, lora.B, bias)]
    y64 = per_slot(leaves64[0][routing.token.long()], leaves64[1], leaves64[2], leaves64[3])
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    g = torch.randn(y.shape, generator=_gen(2))
    y.backward(g)
    y64.backward(g.double())
    for a, b in zip(leaves, leaves64):  # fp32 sums of up to 48 products: within 1e-5 of the largest value
        assert max_err(a.grad, b.grad) <= 1e-5 * b.grad.abs().max().item()
    # scatter: sorted input rows, output in (token, k) order
    ys = grouped_nf4_linear(xs.float(), gu, routing, gather=False, scatter=True)
    want = torch.einsum("si,soi->so", xs, W[e_of])
    torch.testing.assert_close(ys[routing.perm.long()].double(), want, rtol=1e-5, atol=1e-5)


def test_non_gated_experts_and_post_expert_norm():
    """transformers' has_gate=False families (an up_proj (E, I, H) and act_fn) and has_post_expert_norm: any
    callable activation and a per-row norm on the down output, against the dense loop (fp32, 2x rule)."""
    E, H, I, T = 4, 48, 40, 9
    g = _gen(8)
    up = quantize_experts(torch.randn(E, I, H, generator=g) / H ** 0.5)
    dn = quantize_experts(torch.randn(E, H, I, generator=g) / I ** 0.5)
    idx, w = _routing(T, 2, E, seed=8)
    x = torch.randn(T, H, generator=g)
    norm_w = torch.rand(H, generator=g) + 0.5

    def norm(y):
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_w.to(y.dtype)

    def oracle(dt):
        out = torch.zeros(T, H, dtype=dt)
        for e in range(E):
            t, j = torch.where(idx == e)
            h = torch.nn.functional.gelu(x[t].to(dt) @ up.dequantize(dt)[e].t())
            out.index_add_(0, t, norm(h @ dn.dequantize(dt)[e].t()) * w[t, j, None].to(dt))
        return out

    ours = grouped_nf4_experts(x, idx, w, up, dn, apply_gate=torch.nn.functional.gelu, post_expert_norm=norm)
    assert_close_2x(ours, oracle(torch.float64), oracle(torch.float32), what="non-gated + post norm")


def test_frozen_weights_and_no_lora_path():
    """Without LoRA / biases only x and the routing weights get gradients; the 4-bit stack is untouched."""
    c = _case("qwen")
    before = c["gu"].packed.clone()
    x = c["x"].clone().requires_grad_(True)
    w = c["w"].clone().requires_grad_(True)
    out = grouped_nf4_experts(x, c["idx"], w, c["gu"], c["dn"])
    out.sum().backward()
    assert x.grad is not None and w.grad is not None and torch.equal(c["gu"].packed, before)
    r64 = _oracle(c["x"], c["idx"], c["w"], c["gu"], c["dn"], torch.float64)
    assert_close_2x(out, r64, _oracle(c["x"], c["idx"], c["w"], c["gu"], c["dn"], torch.float32))


def test_empty_batch():
    c = _case("qwen")
    x = torch.zeros(0, 64, requires_grad=True)
    out = grouped_nf4_experts(x, torch.zeros(0, 3, dtype=torch.int64), torch.zeros(0, 3), c["gu"], c["dn"],
                              gate_up_lora=c["loras"][0])
    assert out.shape == (0, 64)
    out.sum().backward()
    assert x.grad.shape == (0, 64)


# ------------------------------------------------------------------------------------------------ compile
@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["qwen", "gpt_oss"])
def test_compiles_fullgraph(name, _fresh_dynamo):
    """The whole experts forward and backward trace into one graph (aot_eager: Dynamo + AOTAutograd + the fakes)
    and equal eager; a second call with new values does not recompile."""
    c = _case(name)
    gu_l, dn_l = c["loras"]
    A1 = gu_l.A.clone().requires_grad_(True)

    def fn(x, idx, w):
        return grouped_nf4_experts(x, idx, w, c["gu"], c["dn"], gate_up_bias=c["biases"][0] if c["biases"] else None,
                                   down_bias=c["biases"][1] if c["biases"] else None, apply_gate=c["gate"],
                                   gate_up_lora=ExpertsLoRA(A1, gu_l.B, gu_l.scale), down_lora=dn_l)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")

    def fwd_bwd(f, x, idx, w):
        x = x.clone().requires_grad_(True)
        y = f(x, idx, w)
        return (y, *torch.autograd.grad(y, [x, A1], torch.ones_like(y)))

    for a, b in zip(fwd_bwd(compiled, c["x"], c["idx"], c["w"]), fwd_bwd(fn, c["x"], c["idx"], c["w"])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    idx2, w2 = _routing(c["x"].shape[0], c["idx"].shape[1], c["gu"].num_experts, "one", seed=7)
    with torch._dynamo.config.patch(error_on_recompile=True):
        y2 = fwd_bwd(compiled, c["x"] + 1, idx2, w2)
    for a, b in zip(y2, fwd_bwd(fn, c["x"] + 1, idx2, w2)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compiles_with_weights_built_from_buffers(_fresh_dynamo):
    """What an experts module does: its 4-bit tensors are buffers (in bitsandbytes' bf16 quant_storage here, as
    under FSDP), the GroupedNF4Weight is built inside the compiled forward; one graph, equal to eager."""
    c = _case("qwen")
    gu, dn = c["gu"], c["dn"]

    class Experts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for n, w in (("gu", gu), ("dn", dn)):
                self.register_buffer(f"{n}_packed", w.packed.view(torch.bfloat16))
                for f in ("absmax", "code", "nested_absmax", "nested_code", "offset"):
                    self.register_buffer(f"{n}_{f}", getattr(w, f))

        def weight(self, n, like):
            return GroupedNF4Weight(getattr(self, f"{n}_packed"), getattr(self, f"{n}_absmax"),
                                    getattr(self, f"{n}_code"), like.blocksize, like.shape,
                                    nested_absmax=getattr(self, f"{n}_nested_absmax"),
                                    nested_code=getattr(self, f"{n}_nested_code"), offset=getattr(self, f"{n}_offset"),
                                    dtype=like.dtype)

        def forward(self, x, idx, w):
            return grouped_nf4_experts(x, idx, w, self.weight("gu", gu), self.weight("dn", dn))

    m = Experts()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = c["x"].clone().requires_grad_(True)
    y = compiled(x, c["idx"], c["w"])
    (gx,) = torch.autograd.grad(y, [x], torch.ones_like(y))
    x2 = c["x"].clone().requires_grad_(True)
    y2 = grouped_nf4_experts(x2, c["idx"], c["w"], gu, dn)
    (gx2,) = torch.autograd.grad(y2, [x2], torch.ones_like(y2))
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx2, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_errors():
    c = _case("qwen")
    x, idx, w, gu, dn = c["x"], c["idx"], c["w"], c["gu"], c["dn"]
    with pytest.raises(ValueError, match=r"hidden_states must be \(tokens, 64\)"):
        grouped_nf4_experts(torch.randn(11, 60), idx, w, gu, dn)
    with pytest.raises(TypeError, match="gate_up and down must be GroupedNF4Weight"):
        grouped_nf4_experts(x, idx, w, gu.dequantize(), dn)
    with pytest.raises(ValueError, match="down must have 6 experts and out_features 64"):
        grouped_nf4_experts(x, idx, w, gu, _weights(5, 64, 32)[1])
    with pytest.raises(ValueError, match=r"top_k_index must be int32/int64 \(11, top_k\)"):
        grouped_nf4_experts(x, idx.float(), w, gu, dn)
    with pytest.raises(ValueError, match="top_k_weights must be a float tensor of top_k_index's shape"):
        grouped_nf4_experts(x, idx, w[:, :2], gu, dn)
    with pytest.raises(ValueError, match=r"gate_up_bias must have shape \(6, 64\)"):
        grouped_nf4_experts(x, idx, w, gu, dn, gate_up_bias=torch.zeros(6, 32))
    with pytest.raises(ValueError, match=r"down_lora: A must be \(6, r, 32\) and B \(6, 64, r\)"):
        grouped_nf4_experts(x, idx, w, gu, dn, down_lora=_lora(6, 2, 64, 64))
    with pytest.raises(ValueError, match="apply_gate must be one of"):
        grouped_nf4_experts(x, idx, w, gu, dn, apply_gate="gelu")
    with pytest.raises(ValueError, match=r"apply_gate must return \(slots, 32\)"):
        grouped_nf4_experts(x, idx, w, gu, dn, apply_gate=torch.nn.functional.silu)
    with pytest.raises(ValueError, match="expert 1: A has 1 non-finite"):
        W = torch.randn(3, 8, 64)
        W[1, 2, 3] = float("nan")
        quantize_experts(W)
    with pytest.raises(ValueError, match=r"weight must be a non-empty \(num_experts, d1, d2\)"):
        quantize_experts(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"absmax must be torch.float32 \(6, 64\), got torch.float32 \(6, 32\)"):
        GroupedNF4Weight(gu.packed, gu.absmax[:, :32].float(), gu.code, 64, gu.shape)
    with pytest.raises(ValueError, match="nested_absmax, nested_code and offset must be given together"):
        GroupedNF4Weight(gu.packed, gu.absmax, gu.code, 64, gu.shape, nested_absmax=gu.nested_absmax)
    packed, state = qpeft.quantize_4bit(torch.randn(64, 48))
    with pytest.raises(ValueError, match=r"state.shape must be \(64, 64\)"):
        gu.set_expert(0, packed, state)
    packed, state = qpeft.quantize_4bit(torch.randn(64, 64), blocksize=128)
    before = gu.packed.clone()
    with pytest.raises(ValueError, match="state blocksize must be 64"):
        gu.set_expert(0, packed, state)
    assert torch.equal(gu.packed, before)  # nothing written
    with pytest.raises(ValueError, match=r"share r\*E with E = num_experts = 6"):
        peft_expert_lora(torch.randn(10, 64), torch.randn(64, 10), 6, 1.0)


def test_op_shape_checks():
    c = _case("qwen")
    gu = c["gu"]
    perm, token, seg = ops.grouped_nf4_route(c["idx"], 6)
    p, a, code, bs, _, na, nc, off = gu.op_args()
    with pytest.raises(RuntimeError, match=r"seg_start must be \(7,\)"):
        ops.grouped_nf4_matmul(c["x"], token, p, a, code, bs, 64, False, na, nc, off, seg[:-1], None, None, None,
                               None, 0.0)
    with pytest.raises(RuntimeError, match=r"packed must be \(num_experts, 1536\) .* got \(6, 2048\)"):
        ops.grouped_nf4_matmul(c["x"][:, :48], token, p, a, code, bs, 64, False, na, nc, off, seg, None, None,
                               None, None, 0.0)
    with pytest.raises(ValueError, match=r"a_index values must be in \[0, 11\)"):
        ops.grouped_nf4_matmul(c["x"], token + 5, p, a, code, bs, 64, False, na, nc, off, seg, None, None, None,
                               None, 0.0)
    dup = perm.clone()
    dup[1] = dup[0]
    with pytest.raises(ValueError, match=r"out_index must be a permutation of range\(33\)"):
        ops.grouped_nf4_matmul(c["x"], token, p, a, code, bs, 64, False, na, nc, off, seg, dup, None, None, None, 0.0)
    with pytest.raises(RuntimeError, match=r"lora_B must have shape \(6, 64, 4\)"):
        ops.grouped_nf4_matmul(c["x"], token, p, a, code, bs, 64, False, na, nc, off, seg, None, None,
                               torch.zeros(33, 4), torch.zeros(6, 4, 64), 1.0)


# ------------------------------------------------------------------------------------------------ Triton
def _tdev():
    from utils import triton_device

    return triton_device()


def _op_inputs(name, dtype, dev, seed=0):
    c = _case(name, seed)
    gu = c["gu"].to(dev)
    perm, token, seg = (t.to(dev) for t in ops.grouped_nf4_route(c["idx"], gu.num_experts))
    x = c["x"].to(dev, dtype)
    return c, gu, perm, token, seg, x


def _plain_gemm(a, a_index, W, seg, out_index=None, bias=None, p=None, Q=None, scale=0.0):
    """Plain PyTorch in a's dtype, a loop over experts: row out_index[s] = a[a_index[s]] @ W[e]^T + bias[e] +
    scale p[s] @ Q[e]^T with W (E, out, in), Q (E, out, r) dense (the ops' math, no 4-bit, no fusion)."""
    dt = a.dtype
    S = a_index.shape[0] if a_index is not None else a.shape[0]
    out = torch.zeros((S, W.shape[1]), dtype=dt, device=a.device)
    st = seg.tolist()
    for e in range(len(st) - 1):
        lo, hi = st[e], st[e + 1]
        if hi > lo:
            rows = a[a_index[lo:hi].long()] if a_index is not None else a[lo:hi]
            y = rows @ W[e].to(dt).t()
            if bias is not None:
                y = y + bias[e].to(dt)
            if p is not None:
                y = y + scale * (p[lo:hi].to(dt) @ Q[e].to(dt).t())
            out[lo:hi] = y
    if out_index is not None:
        placed = torch.empty_like(out)
        placed[out_index.long()] = out
        out = placed
    return out


@pytest.mark.triton
@pytest.mark.parametrize("name,dtype", [("qwen", torch.float32), ("qwen", torch.float16),
                                        ("empty_experts", torch.float16), ("one_expert_all_tokens", torch.float32),
                                        ("odd_sizes", torch.float16), ("gpt_oss", torch.float32),
                                        ("gpt_oss_odd", torch.float16)])
def test_triton_kernels_match_reference(name, dtype):
    """Each kernel (forward GEMM with bias / LoRA epilogue / gather / scatter, dX GEMM with LoRA and scatter,
    shrink with plain and strided weights, the segment reduction with 1 and 3 splits) against the reference op
    in fp32 (to ~1e-5), and by the 2x rule (vs the fp64 loop, against plain PyTorch in fp16) in fp16."""
    from qpeft.triton_kernels import grouped_nf4 as tk

    dev = _tdev()
    c, gu, perm, token, seg, x = _op_inputs(name, dtype, dev)
    E, N, K = gu.num_experts, gu.out_features, gu.in_features
    S = perm.shape[0]
    lora = c["loras"][0] or _lora(E, 4, K, N)
    A, B = lora.A.to(dev, dtype), lora.B.to(dev, dtype)
    bias = (c["biases"][0] if c["biases"] else torch.randn(E, N) / 4).to(dev, dtype)
    p, a, code, bs, tr, na, nc, off = gu.op_args()
    xa = ref.grouped_lora_shrink_ref(x, token, A, seg)
    dy = torch.randn(S, N, device=dev).to(dtype)
    dyb = ref.grouped_lora_shrink_ref(dy, perm, B.transpose(1, 2), seg)
    W = gu.dequantize(torch.float64).to(dev)
    W = W.transpose(1, 2) if tr else W  # (E, out, in)
    xs = x[token.long()].contiguous()
    checks = {  # what: (kernel call, reference call, plain PyTorch call on dense operands in dtype (or fp64))
        "fwd": (lambda: tk.grouped_nf4_matmul_triton(x, token, p, a, code, bs, N, tr, na, nc, off, seg, None, bias,
                                                     xa, B, 0.5),
                lambda: ref.grouped_nf4_matmul_ref(x.float(), token, p, a, code, bs, N, tr, na, nc, off, seg, None,
                                                   bias, xa, B.float(), 0.5),
                lambda d: _plain_gemm(x.to(d), token, W, seg, None, bias, xa, B, 0.5)),
        "fwd_scatter": (lambda: tk.grouped_nf4_matmul_triton(xs, None, p, a, code, bs, N, tr, na, nc, off, seg, perm,
                                                             None, None, None, 0.0),
                        lambda: ref.grouped_nf4_matmul_ref(xs.float(), None, p, a, code, bs, N, tr, na, nc, off, seg,
                                                           perm, None, None, None, 0.0),
                        lambda d: _plain_gemm(xs.to(d), None, W, seg, perm)),
        "dx": (lambda: tk.grouped_nf4_matmul_dx_triton(dy, perm, p, a, code, bs, K, tr, na, nc, off, seg, perm, dyb,
                                                       A, 0.5),
               lambda: ref.grouped_nf4_matmul_dx_ref(dy.float(), perm, p, a, code, bs, K, tr, na, nc, off, seg, perm,
                                                     dyb, A.float(), 0.5),
               lambda d: _plain_gemm(dy.to(d), perm, W.transpose(1, 2), seg, perm, None, dyb, A.transpose(1, 2),
                                     0.5)),
        "shrink": (lambda: tk.grouped_lora_shrink_triton(x, token, A, seg),
                   lambda: ref.grouped_lora_shrink_ref(x.float(), token, A.float(), seg),
                   lambda d: _plain_gemm(x.to(d), token, A, seg)),
        "shrink_strided": (lambda: tk.grouped_lora_shrink_triton(dy, perm, B.transpose(1, 2), seg),
                           lambda: ref.grouped_lora_shrink_ref(dy.float(), perm, B.float().transpose(1, 2), seg),
                           lambda d: _plain_gemm(dy.to(d), perm, B.transpose(1, 2), seg)),
    }
    for what, (kern, refn, plain) in checks.items():
        out = kern()
        if dtype == torch.float32:
            torch.testing.assert_close(out, refn(), rtol=1e-5, atol=1e-5, msg=f"{name} {what}")
        else:
            assert out.dtype == (torch.float32 if what.startswith("shrink") else dtype)
            assert_close_2x(out, plain(torch.float64), plain(dtype), what=f"{name} {what}")
    for split in (1, 3):  # the weight-gradient reduction, one chunk per expert and three (partial sums added)
        cfg = dict(BLOCK_M=16, BLOCK_P=16, BLOCK_Q=32, num_warps=4, SPLIT=split)
        for u, ui, v, vi in ((dyb, None, x, token), (dy, perm, xa, None)):
            out = tk.grouped_lora_grad_triton(u, ui, v, vi, seg, 0.5, config=cfg)
            r64 = ref.grouped_lora_grad_ref(u.double(), ui, v.double(), vi, seg, 0.5).double()
            if dtype == torch.float32:
                torch.testing.assert_close(out, ref.grouped_lora_grad_ref(u, ui, v, vi, seg, 0.5), rtol=1e-5,
                                           atol=1e-5)
            else:  # plain PyTorch in fp16: the per-expert u^T v with fp16 operands and output
                same = torch.stack([0.5 * (_rows_of(u, ui, seg, e).to(dtype).t() @ _rows_of(v, vi, seg, e).to(dtype))
                                    for e in range(E)])
                assert_close_2x(out, r64, same, what=f"{name} grad split {split}")
    if name == "empty_experts":
        g = tk.grouped_lora_grad_triton(dyb, None, x, token, seg, 0.5)
        assert torch.all(g[0] == 0) and torch.all(g[-1] == 0)


def _rows_of(t, index, seg, e):
    lo, hi = int(seg[e]), int(seg[e + 1])
    return t[index[lo:hi].long()] if index is not None else t[lo:hi]


@pytest.mark.triton
def test_triton_generic_loader_on_aligned_shapes():
    """ALIGNED=False forces the per-element 4-bit loader where the byte-pair loader would run: same result."""
    from qpeft.triton_kernels import grouped_nf4 as tk

    dev = _tdev()
    c, gu, perm, token, seg, x = _op_inputs("qwen", torch.float32, dev)
    p, a, code, bs, tr, na, nc, off = gu.op_args()
    args = (x, token, p, a, code, bs, gu.out_features, tr, na, nc, off, seg, None, None, None, None, 0.0)
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4)
    fast = tk.grouped_nf4_matmul_triton(*args, config=cfg)
    slow = tk.grouped_nf4_matmul_triton(*args, config=dict(cfg, ALIGNED=False))
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)
    big = tk.grouped_nf4_matmul_triton(*args, config=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, num_warps=4))
    torch.testing.assert_close(big, fast, rtol=1e-5, atol=1e-5)  # BLOCK_K > blocksize: two absmax per row


def _recorded_gemm(gu, dtype, T, dx=False, config=None, packed=None, seed=1):
    """The one launch of the grouped forward (or dX) GEMM of `gu` for T tokens (top-2), recorded, not run."""
    from qpeft.triton_kernels import grouped_nf4 as tk

    p, a, code, bs, tr, na, nc, off = gu.op_args()
    p = p if packed is None else packed
    E, N, K = gu.num_experts, gu.out_features, gu.in_features
    idx = torch.rand(T, E, generator=_gen(seed)).topk(2, dim=1).indices
    perm, token, seg = ops.grouped_nf4_route(idx, E)
    with recorded_triton_launches() as launches:
        if dx:
            dy = torch.randn(perm.shape[0], N, generator=_gen(seed)).to(dtype)
            tk.grouped_nf4_matmul_dx_triton(dy, perm, p, a, code, bs, K, tr, na, nc, off, seg, perm, None, None, 0.0,
                                            config=config)
        else:
            x = torch.randn(T, K, generator=_gen(seed)).to(dtype)
            tk.grouped_nf4_matmul_triton(x, token, p, a, code, bs, N, tr, na, nc, off, seg, None, None, None, None,
                                         0.0, config=config)
    (launch,) = launches
    return launch


@pytest.mark.skipif(not has_triton(), reason="needs triton")
def test_register_book_where_it_fits():
    """16-bit activations on slices whose rows start on an absmax block take the register code book of nf4_matmul
    (REG_BOOK, with its reads of the double-quantized absmax: NESTED_TABLE, ABSMAX_WORDS), and 64-wide K steps at
    training-batch sizes; fp32, other slice widths, a slice stack off 4 bytes, config REG_BOOK=False and the
    interpreter (inline PTX) keep the gather loader."""
    on = not TRITON_INTERPRET
    gu = quantize_experts(torch.randn(4, 192, 256, generator=_gen(0)))           # (out, in): rows of 256 = 4 blocks
    gt = quantize_experts(torch.randn(4, 256, 192, generator=_gen(0)), transposed=True)  # (in, out): rows of 192
    odd = quantize_experts(torch.randn(4, 192, 96, generator=_gen(0)))          # rows of 96: 1.5 blocks
    for w in (gu, gt):
        for dx in (False, True):
            big = _recorded_gemm(w, torch.bfloat16, 512, dx).kwargs
            assert big["REG_BOOK"] is on and (big["BLOCK_M"], big["BLOCK_K"]) == ((64, 64) if on else (16, 32))
            # and reads the double-quantized absmax as nf4_matmul's launches do: the nested code book as a register
            # table, the codes as words where a slice row holds whole words of them (256 / 64 = 4 blocks; not 3)
            assert big["NESTED_TABLE"] is on and big["ABSMAX_WORDS"] is (on and w is gu), big
            assert _recorded_gemm(w, torch.float16, 4, dx).kwargs["REG_BOOK"] is on
            f32 = _recorded_gemm(w, torch.float32, 512, dx).kwargs
            assert f32["REG_BOOK"] is False and f32["NESTED_TABLE"] is False and f32["ABSMAX_WORDS"] is False
    assert _recorded_gemm(odd, torch.bfloat16, 512).kwargs["REG_BOOK"] is False
    p = gu.op_args()[0]
    off_by_one = torch.empty(p.numel() + 4, dtype=torch.uint8)[1:p.numel() + 1].view(p.shape)
    off_by_one.copy_(p)
    assert _recorded_gemm(gu, torch.bfloat16, 512, packed=off_by_one).kwargs["REG_BOOK"] is False
    tile = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4)
    assert _recorded_gemm(gu, torch.bfloat16, 64, config=tile).kwargs["REG_BOOK"] is on
    assert _recorded_gemm(gu, torch.bfloat16, 64, config=dict(tile, REG_BOOK=False)).kwargs["REG_BOOK"] is False


@pytest.mark.skipif(TRITON_INTERPRET or not has_triton(), reason="compiles for sm_90 (not under the interpreter)")
@pytest.mark.parametrize("transposed", [False, True])
def test_register_book_kernel_has_no_code_book_gathers_on_sm90(transposed):
    """Compiled for sm_90 (bf16, double quant, the 16- and 64-row tiles, forward and dX): the lookup is PRMTs, the
    per-nibble code-book loads of the gather loader are gone, and nothing spills."""
    w = quantize_experts(torch.randn(4, 256, 512, generator=_gen(0)), transposed=transposed)
    for T in (8, 512):
        for dx in (False, True):
            launch = _recorded_gemm(w, torch.bfloat16, T, dx)
            cfg = {k: launch.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps")}
            gather = _recorded_gemm(w, torch.bfloat16, T, dx, config=dict(cfg, REG_BOOK=False))
            usage, sass = sm90_resource_usage(launch.compile_for_sm90())
            _, gather_sass = sm90_resource_usage(gather.compile_for_sm90())
            what = f"{cfg}, T={T}, dx={dx}"
            assert launch.kwargs["REG_BOOK"] and not gather.kwargs["REG_BOOK"], what
            assert " LOCAL:0 " in usage and not spill_instructions(sass), f"{what}: {usage.strip()}"
            assert "PRMT" in sass and narrow_global_loads(sass) < narrow_global_loads(gather_sass), what


@requires_cuda
@pytest.mark.skipif(not has_triton(), reason="needs triton")
@pytest.mark.parametrize("transposed,nested,blocksize,dtype", [(False, True, 64, torch.bfloat16),
                                                              (True, False, 128, torch.float16),
                                                              (False, False, 32, torch.float16)])
def test_register_book_matches_the_gather_loader_bit_for_bit(transposed, nested, blocksize, dtype):
    """On a GPU: the register code book's tiles are the gather loader's rounded to the activations' dtype, so with
    the same tile both kernels (forward and dX, with bias and the LoRA epilogue) give the same bits."""
    from qpeft.triton_kernels import grouped_nf4 as tk

    E, H, I, T, r = 8, 256, 192, 300, 8
    W = torch.randn(E, *((H, 2 * I) if transposed else (2 * I, H)), generator=_gen(0)) / 16
    w = quantize_experts(W, blocksize=blocksize, double_quant=nested, transposed=transposed).to("cuda")
    p, a, code, bs, tr, na, nc, off = w.op_args()
    N, K = w.out_features, w.in_features
    idx = torch.rand(T, E, generator=_gen(1)).topk(2, dim=1).indices.cuda()
    perm, token, seg = ops.grouped_nf4_route(idx, E)
    S = perm.shape[0]
    g = _gen(2)
    x, dy = torch.randn(T, K, generator=g).cuda().to(dtype), torch.randn(S, N, generator=g).cuda().to(dtype)
    bias = (torch.randn(E, N, generator=g) / 4).cuda().to(dtype)
    xa, dyb = torch.randn(S, r, generator=g).cuda(), torch.randn(S, r, generator=g).cuda()
    A, B = torch.randn(E, r, K, generator=g).cuda().to(dtype), torch.randn(E, N, r, generator=g).cuda().to(dtype)
    for tile in (dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4),
                 dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8)):
        for reg_book in (True, False):
            cfg = dict(tile, REG_BOOK=reg_book)
            y = tk.grouped_nf4_matmul_triton(x, token, p, a, code, bs, N, tr, na, nc, off, seg, None, bias, xa, B,
                                             0.5, config=cfg)
            dx = tk.grouped_nf4_matmul_dx_triton(dy, perm, p, a, code, bs, K, tr, na, nc, off, seg, perm, dyb, A,
                                                 0.5, config=cfg)
            if reg_book:
                y_book, dx_book = y, dx
        assert torch.equal(y_book, y) and torch.equal(dx_book, dx), f"{tile}"
        assert y.abs().sum() > 0 and dx.abs().sum() > 0


@pytest.mark.triton
@pytest.mark.parametrize("name,dtype", [("qwen", torch.float32), ("gpt_oss", torch.float16),
                                        ("one_expert_all_tokens", torch.float16)])
def test_triton_experts_block_forward_backward(name, dtype, monkeypatch):
    """The whole block through the ops with QPEFT_BACKEND=triton (kernels) against the same block on the
    reference (QPEFT_BACKEND=torch): output and every gradient."""
    import os

    # the kernels, not the reference on both sides: compiled on a GPU (tests/run_gpu.sh), else the interpreter
    assert os.environ.get("QPEFT_BACKEND") == "triton" and (HAS_CUDA or TRITON_INTERPRET)
    dev = _tdev()
    c = _case(name)
    gu, dn = c["gu"].to(dev), c["dn"].to(dev)
    gu_l, dn_l = c["loras"]
    dy = torch.randn(c["x"].shape, generator=_gen(3)).to(dev, dtype)

    def run():
        leaves = [t.to(dev, dtype).clone().requires_grad_(True)
                  for t in (c["x"], c["w"], gu_l.A, gu_l.B, dn_l.A, dn_l.B)]
        x, w, a1, b1, a2, b2 = leaves
        b = c["biases"]
        out = grouped_nf4_experts(x, c["idx"].to(dev), w, gu, dn,
                                  gate_up_bias=None if b is None else b[0].to(dev, dtype),
                                  down_bias=None if b is None else b[1].to(dev, dtype), apply_gate=c["gate"],
                                  gate_up_lora=ExpertsLoRA(a1, b1, gu_l.scale),
                                  down_lora=ExpertsLoRA(a2, b2, dn_l.scale))
        out.backward(dy)
        return [out.detach()] + [t.grad for t in leaves]

    kern = run()
    monkeypatch.setenv("QPEFT_BACKEND", "torch")
    on_ref = run()  # the same block on the reference ops (fp32 math from the dtype inputs)

    def dense(dt):
        leaves = [t.to(dt).clone().requires_grad_(True) for t in (c["x"], c["w"], gu_l.A, gu_l.B, dn_l.A, dn_l.B)]
        x, w, a1, b1, a2, b2 = leaves
        b = c["biases"]
        out = ref.grouped_experts_ref(x, c["idx"], w, c["gu"].dequantize(dt), c["dn"].dequantize(dt),
                                      c["gu"].transposed, None if b is None else b[0].to(dt),
                                      None if b is None else b[1].to(dt), _gate_fn(c["gate"]),
                                      (a1, b1, gu_l.scale), (a2, b2, dn_l.scale))
        out.backward(dy.cpu().to(dt))
        return [out.detach()] + [t.grad for t in leaves]

    # the 2x rule against the dense loop in the same dtype, vs the fp64 loop: on the maximum error in fp16, on the
    # RMS error in fp32 (`_assert_rms_2x`: fp32 gradients differ from any other summation order by rounding noise
    # alone; with torch 2.15 / Triton 3.9 one element of 1536 in dA1 sat 1.6e-5 from the reference ops' result)
    for what, a, b, r64, same in zip(["out", "dx", "dw", "dA1", "dB1", "dA2", "dB2"], kern, on_ref,
                                     dense(torch.float64), dense(dtype)):
        if dtype == torch.float32:
            _assert_rms_2x(a.cpu(), r64, same, what=f"{name} {what}")
            _assert_rms_2x(b.cpu(), r64, same, what=f"{name} {what} on the reference ops")
        else:
            assert_close_2x(a.cpu(), r64, same, what=f"{name} {what}")
