"""PEFT's weight-reading LoRA inits on qpeft's 4-bit layers (PiSSA and its fast SVD, OLoRA, CorDA, LoftQ, EVA) against
PEFT + bitsandbytes on the same model: the same adapter, and where PEFT rewrites the base, the same re-quantized
bytes. Tiny random Llamas on the CPU, fp32.

PEFT + bitsandbytes runs OLoRA and EVA on Linear4bit itself. PiSSA and CorDA it refuses on a 4-bit weight ("Please
initialize PiSSA under float32 ... Subsequently, re-quantize the residual model"), and its LoftQ starts from the
full-precision model: the reference there is PEFT's documented recipe, the init on the full-precision weights (for
a 4-bit base: its dequantized weights) and bitsandbytes quantizing the residual. PEFT's LoftQ computes on CUDA
only; the reference runs its loftq_init with "cuda" redirected to the CPU (`cuda_runs_on_cpu`).
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn as nn

import qpeft
from qpeft.modules.qlinear_nf4 import QLinearNF4
from utils import assert_close_2x, tiny_llama

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")
from qpeft.integrations.peft import QPeftLoraLinear, attach_original_weights, preprocess_corda  # noqa: E402

PREFIX = "base_model.model."
TARGETS = ["q_proj", "v_proj", "down_proj"]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense")
    tiny_llama(0, intermediate_size=128).save_pretrained(path)
    return path


def bnb_model(path, double_quant, quant_type="nf4"):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu", dtype=torch.float32)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # bitsandbytes' CPU repack computes in bf16
    return model.eval()


def qpeft_model(path, double_quant, quant_type="nf4"):
    """qpeft's 4-bit model holding bitsandbytes' bytes of the checkpoint."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    qpeft.quantize_model(model, double_quant=double_quant, compute_dtype=torch.float32, quant_type=quant_type)
    model.load_state_dict(bnb_model(path, double_quant, quant_type).state_dict())
    return model.eval()


def dequantized_model(path, double_quant, quant_type="nf4"):
    """The dense fp32 model holding the 4-bit model's dequantized weights (PEFT's recipe starts from it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    q = qpeft_model(path, double_quant, quant_type)
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, QLinearNF4):
                model.get_submodule(name).weight.copy_(m.dequantize(torch.float32))
    return model.eval()


def lora_tensors(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix(PREFIX): p.detach() for n, p in model.named_parameters() if ".lora_" in n}


def bnb_bytes(weight: torch.Tensor, double_quant: bool, quant_type: str = "nf4") -> dict[str, torch.Tensor]:
    """bitsandbytes' 4-bit state dict of a dense weight (what bitsandbytes makes of PEFT's residual)."""
    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=torch.float32,
                              compress_statistics=double_quant, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(weight.detach().cpu().clone(), requires_grad=False,
                                     compress_statistics=double_quant, quant_type=quant_type).to("cpu")
    return {k: v for k, v in layer.state_dict().items() if "quant_state" not in k}


def qpeft_bytes(layer: QLinearNF4) -> dict[str, torch.Tensor]:
    return {k: v for k, v in layer.state_dict().items() if "quant_state" not in k and k != "bias"}


def base_layers(model) -> dict[str, nn.Module]:
    return {n.removeprefix(PREFIX).replace(".base_layer", ""): m.get_base_layer() for n, m in model.named_modules()
            if isinstance(m, QPeftLoraLinear) or type(m).__name__ in ("Linear4bit", "Linear") and hasattr(
                m, "lora_A")}


def assert_same_adapter(ours, theirs):
    a, b = lora_tensors(ours), lora_tensors(theirs)
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6, msg=n)


def assert_same_bytes(ours, expected: dict[str, dict[str, torch.Tensor]], double_quant: bool):
    """qpeft's re-quantized bases vs bitsandbytes' quantization of the reference residuals: the packed weights equal;
    the scales equal (double quant: bitsandbytes' CPU quantize_blockwise rounds about one 8-bit absmax code in a
    hundred to the neighbouring code, qpeft to the nearest, README "bitsandbytes compatibility")."""
    layers = base_layers(ours)
    assert layers.keys() == expected.keys() and layers
    for name, want in expected.items():
        got = qpeft_bytes(layers[name])
        assert got.keys() == want.keys(), name
        for k in got:
            if double_quant and k == "weight.absmax":
                assert (got[k].int() - want[k].int()).abs().max() <= 1 and (got[k] != want[k]).float().mean() < 0.05
            elif double_quant and k == "weight.nested_absmax":
                torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=0)
            else:
                assert torch.equal(got[k], want[k]), f"{name} {k}"


def residual_bytes(reference, double_quant, quant_type="nf4"):
    return {n: bnb_bytes(m.weight, double_quant, quant_type) for n, m in base_layers(reference).items()}


def get_peft(model, **cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **cfg))


# ------------------------------------------------------------------------------------------------ PiSSA
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
@pytest.mark.parametrize("double_quant, quant_type", [(False, "nf4"), (True, "nf4"), (True, "fp4")])
def test_pissa_as_peft_then_bitsandbytes(checkpoint, init, double_quant, quant_type):
    torch.manual_seed(0)  # pissa_niter_<n>: torch.svd_lowrank draws from torch's generator, in layer order
    ours = get_peft(qpeft_model(checkpoint, double_quant, quant_type), init_lora_weights=init)
    torch.manual_seed(0)
    reference = get_peft(dequantized_model(checkpoint, double_quant, quant_type), init_lora_weights=init)
    assert_same_adapter(ours, reference)
    assert_same_bytes(ours, residual_bytes(reference, double_quant, quant_type), double_quant)


def test_pissa_is_refused_by_peft_on_bitsandbytes_and_runs_here(checkpoint):
    """What PEFT + bitsandbytes does with PiSSA on Linear4bit (the reason the reference is PEFT's recipe)."""
    with pytest.raises(TypeError, match="Please initialize PiSSA under float32"):
        get_peft(bnb_model(checkpoint, False), init_lora_weights="pissa")
    model = get_peft(qpeft_model(checkpoint, False), init_lora_weights="pissa")
    x = torch.randint(3, 128, (2, 7))
    with torch.no_grad():  # PiSSA starts at the base model: residual + s B A == W (up to the residual's NF4 rounding)
        y0 = qpeft_model(checkpoint, False)(x).logits
        torch.testing.assert_close(model(x).logits, y0, rtol=0.1, atol=0.1)


def test_failed_init_leaves_the_base(checkpoint, monkeypatch):
    """An init that raises inside PEFT's code (here PiSSA's SVD) leaves the 4-bit base as it was."""
    model = qpeft_model(checkpoint, False)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(*args, **kwargs):
        raise RuntimeError("svd failed")

    monkeypatch.setattr(torch.linalg, "svd", broken)
    with pytest.raises(RuntimeError, match="svd failed"):
        get_peft(model, init_lora_weights="pissa")
    monkeypatch.undo()
    after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_pissa_adapter_reloads_through_peft_onto_the_original_base(checkpoint, tmp_path):
    """docs/lora.md: a PiSSA adapter (its config keeps init_lora_weights="pissa") loads with
    qpeft.peft_from_pretrained onto the original 4-bit base: PEFT re-runs PiSSA there (the same residual bytes) and
    then loads the trained A, B; the model is the one that was saved."""
    x = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(4))
    model = get_peft(qpeft_model(checkpoint, False), init_lora_weights="pissa")
    perturb(model)
    model.save_pretrained(tmp_path)
    loaded = qpeft.peft_from_pretrained(qpeft_model(checkpoint, False), tmp_path)
    assert_same_bytes(loaded, {n: qpeft_bytes(m) for n, m in base_layers(model).items()}, False)
    assert_same_adapter(loaded, model)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


# ------------------------------------------------------------------------------------------ PiSSA/OLoRA to LoRA
def perturb(model, seed=7):
    """A stand-in for training: the same change to the adapters of both models."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if ".lora_" in n):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_conversion_to_plain_lora_as_peft(checkpoint, tmp_path, init):
    """PEFT's documented conversion of a PiSSA / OLoRA adapter to a plain LoRA against the original base (save the
    initial adapter with init_lora_weights=True, train, save with path_initial_model_for_weight_conversion): on
    qpeft's 4-bit base it writes PEFT's files (rank 2r, the same tensors as PEFT's recipe on the dequantized
    weights), and that LoRA on the original 4-bit base gives the outputs of PEFT on the original dequantized
    weights with it."""
    from safetensors.torch import load_file

    x = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    saved = {}
    for side, model in (("ours", qpeft_model(checkpoint, False)), ("ref", dequantized_model(checkpoint, False))):
        pm = get_peft(model, init_lora_weights=init)
        pm.peft_config["default"].init_lora_weights = True  # PEFT's example: the initial adapter, as a plain LoRA
        pm.save_pretrained(tmp_path / side / "init")
        perturb(pm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.save_pretrained(tmp_path / side / "lora",
                               path_initial_model_for_weight_conversion=str(tmp_path / side / "init"))
        saved[side] = load_file(tmp_path / side / "lora" / "adapter_model.safetensors")
    cfg = peft.LoraConfig.from_pretrained(tmp_path / "ours" / "lora")
    assert cfg.r == 8 and cfg.lora_alpha == 16 and cfg.init_lora_weights is True
    assert saved["ours"].keys() == saved["ref"].keys() and saved["ours"]
    for k, v in saved["ours"].items():
        assert v.shape[0 if "lora_A" in k else 1] == 8
        torch.testing.assert_close(v, saved["ref"][k], rtol=1e-5, atol=1e-6, msg=k)
    ours = qpeft.peft_from_pretrained(qpeft_model(checkpoint, False), tmp_path / "ours" / "lora")
    assert any(isinstance(m, QPeftLoraLinear) for m in ours.modules())
    reference = peft.PeftModel.from_pretrained(dequantized_model(checkpoint, False).double(),
                                               tmp_path / "ours" / "lora")
    plain = peft.PeftModel.from_pretrained(dequantized_model(checkpoint, False), tmp_path / "ours" / "lora")
    with torch.no_grad():
        assert_close_2x(ours(x).logits, reference(x).logits, plain(x).logits, what=f"{init} as LoRA")


# ------------------------------------------------------------------------------------------------ OLoRA
@pytest.mark.parametrize("double_quant, quant_type", [(False, "nf4"), (True, "nf4"), (True, "fp4")])
def test_olora_equals_peft_on_bitsandbytes(checkpoint, double_quant, quant_type):
    ours = get_peft(qpeft_model(checkpoint, double_quant, quant_type), init_lora_weights="olora")
    theirs = get_peft(bnb_model(checkpoint, double_quant, quant_type), init_lora_weights="olora")  # PEFT's 4-bit
    assert_same_adapter(ours, theirs)
    expected = {n: {k: v for k, v in m.state_dict().items() if "quant_state" not in k and k != "bias"}
                for n, m in base_layers(theirs).items()}
    assert_same_bytes(ours, expected, double_quant)


# ------------------------------------------------------------------------------------------------ CorDA
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_as_peft_then_bitsandbytes(checkpoint, mode):
    from peft.tuners.lora.config import CordaConfig

    x = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(5))

    def run(model):  # PEFT's CorDA hooks take one sequence per call (batch 1)
        def fn():
            for row in x:
                model(row[None])
        return fn

    def corda(model, preprocess):
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                              corda_config=CordaConfig(corda_method=mode))
        preprocess(model, cfg, run_model=run(model))
        return get_peft(model, init_lora_weights="corda", corda_config=CordaConfig(corda_method=mode))

    from peft.tuners.lora.corda import preprocess_corda as peft_preprocess

    ours = corda(qpeft_model(checkpoint, False), preprocess_corda)
    reference = corda(dequantized_model(checkpoint, False), peft_preprocess)
    assert_same_adapter(ours, reference)
    assert_same_bytes(ours, residual_bytes(reference, False), False)
    assert not any("eigens" in m.__dict__ for m in ours.modules())  # used up, as PEFT deletes them


def test_corda_without_preprocessing_raises_peft_error(checkpoint):
    with pytest.raises(ValueError, match="preprocess_corda"):
        get_peft(qpeft_model(checkpoint, False), init_lora_weights="corda")


# ------------------------------------------------------------------------------------------------ LoftQ
@contextlib.contextmanager
def cuda_runs_on_cpu(monkeypatch):
    """PEFT's loftq_init computes on "cuda" (or "xpu"): send its .to("cuda") calls to the CPU."""
    def cpu(args, kwargs):
        args = tuple("cpu" if (isinstance(a, (str, torch.device)) and str(a).startswith("cuda")) else a for a in args)
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs = {**kwargs, "device": "cpu"}
        return args, kwargs

    tensor_to, params_to = torch.Tensor.to, bnb.nn.Params4bit.to

    def t_to(self, *args, **kwargs):
        args, kwargs = cpu(args, kwargs)
        return tensor_to(self, *args, **kwargs)

    def p_to(self, *args, **kwargs):
        args, kwargs = cpu(args, kwargs)
        return params_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", t_to)
    monkeypatch.setattr(bnb.nn.Params4bit, "to", p_to)
    try:
        yield
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("loftq_iter", [1, 3])
def test_loftq_equals_peft_loftq_init(checkpoint, monkeypatch, loftq_iter):
    from transformers import AutoModelForCausalLM
    from peft.utils.loftq_utils import loftq_init

    dense = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model = qpeft_model(checkpoint, False)
    attach_original_weights(model, checkpoint)
    loftq = peft.LoftQConfig(loftq_bits=4, loftq_iter=loftq_iter)
    ours = get_peft(model, init_lora_weights="loftq", loftq_config=loftq)
    layers = base_layers(ours)
    adapters = lora_tensors(ours)
    with cuda_runs_on_cpu(monkeypatch):
        for name in layers:
            weight = dense.get_submodule(name).weight.detach()
            q, A, B = loftq_init(weight, num_bits=4, reduced_rank=4, num_iter=loftq_iter)
            torch.testing.assert_close(adapters[f"{name}.lora_A.default.weight"], A, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(adapters[f"{name}.lora_B.default.weight"], B, rtol=1e-5, atol=1e-6)
            want = bnb_bytes(q, False)
            got = qpeft_bytes(layers[name])
            assert all(torch.equal(got[k], want[k]) for k in want), name
    assert not any(hasattr(m, "original_weight") for m in layers.values())  # used up


def test_loftq_refusals(checkpoint):
    with pytest.raises(ValueError, match="needs the full-precision weight"):
        get_peft(qpeft_model(checkpoint, False), init_lora_weights="loftq", loftq_config=peft.LoftQConfig())
    with pytest.raises(ValueError, match=r"loftq_bits must be one of \(4,\), got 8"):
        get_peft(qpeft_model(checkpoint, False), init_lora_weights="loftq",
                 loftq_config=peft.LoftQConfig(loftq_bits=8))
    from transformers import AutoModelForCausalLM

    for fmt in (dict(quant_type="fp4"), dict(blocksize=128)):  # not the NF4 / 64 that LoftQ fits A, B to
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
        qpeft.quantize_model(model, compute_dtype=torch.float32, **fmt)
        attach_original_weights(model, checkpoint)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match="needs an NF4 base with blocksize 64"):
            get_peft(model, init_lora_weights="loftq", loftq_config=peft.LoftQConfig())
        after = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    model = qpeft_model(checkpoint, False)
    prequantized = {k: v for k, v in model.state_dict().items()}  # a 4-bit checkpoint holds no weights to fit
    with pytest.raises(ValueError, match="not the full-precision weight"):
        attach_original_weights(model, prequantized)
        model.model.layers[0].self_attn.q_proj.original_weight()


@pytest.mark.parametrize("double_quant", [False, True])
def test_replace_lora_weights_loftq_equals_peft_on_bitsandbytes(checkpoint, monkeypatch, double_quant):
    """PEFT's LoftQ on an already quantized base (replace_lora_weights_loftq: one SVD of W - dequant(Q), the base
    kept) on qpeft's layers equals PEFT's on bitsandbytes' Linear4bit holding the same bytes."""
    from peft import replace_lora_weights_loftq as peft_replace

    from qpeft.integrations.peft import replace_lora_weights_loftq

    ours = get_peft(qpeft_model(checkpoint, double_quant))
    theirs = get_peft(bnb_model(checkpoint, double_quant))
    base_before = {k: v.clone() for k, v in ours.state_dict().items() if ".lora_" not in k}
    replace_lora_weights_loftq(ours, checkpoint / "model.safetensors")
    with cuda_runs_on_cpu(monkeypatch):
        peft_replace(theirs, str(checkpoint / "model.safetensors"))
    assert_same_adapter(ours, theirs)
    assert all(torch.equal(v, base_before[k]) for k, v in ours.state_dict().items() if ".lora_" not in k)
    assert any(lora_tensors(ours)[n].any() for n in lora_tensors(ours) if ".lora_B." in n)


def test_replace_lora_weights_loftq_callback_and_refusals(checkpoint):
    from qpeft.integrations.peft import replace_lora_weights_loftq

    model = get_peft(qpeft_model(checkpoint, False))
    start = {n: p.clone() for n, p in lora_tensors(model).items()}
    calls = []

    def keep_all_but_q(m, name):  # PEFT's callback: False rolls the layer back
        calls.append(name)
        return "q_proj" not in name

    replace_lora_weights_loftq(model, checkpoint, callback=keep_all_but_q)  # a directory works too
    assert len(calls) == 6 and all(n.startswith("model.layers.") for n in calls)
    now = lora_tensors(model)
    for n, p in now.items():
        assert torch.equal(p, start[n]) == ("q_proj" in n), n
    # model_path=None: the base's _name_or_path, here the local directory it was loaded from
    implicit, explicit = get_peft(qpeft_model(checkpoint, False)), get_peft(qpeft_model(checkpoint, False))
    replace_lora_weights_loftq(implicit)
    replace_lora_weights_loftq(explicit, checkpoint / "model.safetensors")
    assert_same_adapter(implicit, explicit)
    with pytest.raises(TypeError, match="peft_model must be a PeftModel"):
        replace_lora_weights_loftq(model.get_base_model(), checkpoint)
    model.get_base_model().config._name_or_path = "org/not-local"
    with pytest.raises(ValueError, match="model_path: pass the full-precision safetensors checkpoint"):
        replace_lora_weights_loftq(model)
    with pytest.raises(FileNotFoundError, match="no safetensors checkpoint"):
        replace_lora_weights_loftq(model, checkpoint / "missing.safetensors")
    with pytest.raises(ValueError, match="no qpeft 4-bit LoRA layer"):
        replace_lora_weights_loftq(get_peft(dequantized_model(checkpoint, False)), checkpoint)


# ------------------------------------------------------------------------------------------------ EVA
def test_eva_equals_peft_on_bitsandbytes(checkpoint):
    from peft import EvaConfig, initialize_lora_eva_weights

    batches = [{"input_ids": torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(i))}
               for i in range(4)]
    out = []
    for model in (qpeft_model(checkpoint, False), bnb_model(checkpoint, False)):
        pm = get_peft(model, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0))
        torch.manual_seed(0)
        initialize_lora_eva_weights(pm, batches)
        out.append(pm)
    ours, theirs = out
    assert any(isinstance(m, QPeftLoraLinear) for m in ours.modules())
    assert ours.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern
    a, b = lora_tensors(ours), lora_tensors(theirs)
    assert a.keys() == b.keys() and a
    for n in a:
        if ".lora_B." in n:
            assert not a[n].any() and not b[n].any()
        else:  # principal directions of the same layer inputs, up to the fp32 rounding of the two 4-bit GEMMs
            torch.testing.assert_close(a[n], b[n], rtol=1e-3, atol=1e-3, msg=n)
