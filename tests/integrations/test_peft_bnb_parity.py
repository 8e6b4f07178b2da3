"""qpeft's 4-bit layers under PEFT vs PEFT + bitsandbytes on the same bitsandbytes-quantized base (tiny random Llama
and OPT, NF4 and FP4, CPU, fp32): each LoRA option PEFT supports on Linear4bit gives the same outputs, gradients and
merged weights within the 2x rule against an fp64 oracle (PEFT on a float64 copy of the model holding the
dequantized weights), and adapter files load both ways.

qpeft's base holds bitsandbytes' bytes: the dense checkpoint is quantized by transformers' bitsandbytes loader and
its state dict loaded into qpeft's QLinearNF4 layers. bitsandbytes' CPU inference path (eval, no grad, a CPU with
AVX512-BF16) repacks the weight and computes in bf16 whatever compute_dtype says; `no_cpu_repack` turns it off per
layer (`Linear4bit.support_avx512bf16_for_cpu = False`, the switch bitsandbytes 0.50 reads in forward), so both
sides compute in fp32.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn as nn

import qpeft
from qpeft.modules.qlinear_nf4 import QLinearNF4
from utils import assert_close_2x, tiny_llama

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
from qpeft.integrations.peft import QPeftLoraLinear  # noqa: E402

PREFIX = "base_model.model."
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def tiny_opt(seed: int = 0):
    """A small random OPTForCausalLM (biases in every linear layer), fp32, eval mode."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    model = OPTForCausalLM(cfg).eval()
    with torch.no_grad():  # random biases (OPT initialises them to zero): lora_bias / DoRA must handle them
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.1)
    return model


ARCHS = {"llama": lambda: tiny_llama(0, intermediate_size=128), "opt": tiny_opt}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for arch, make in ARCHS.items():
        path = tmp_path_factory.mktemp(arch)
        make().save_pretrained(path)
        out[arch] = path
    return out


def no_cpu_repack(model):
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def bnb_base(path, quant_type, double_quant=True):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu", dtype=torch.float32)
    return no_cpu_repack(model).eval()


def qpeft_base(path, bnb_model, quant_type, double_quant=True):
    """qpeft's QLinearNF4 layers holding bitsandbytes' bytes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    qpeft.quantize_model(model, quant_type=quant_type, double_quant=double_quant, compute_dtype=torch.float32)
    model.load_state_dict(bnb_model.state_dict())
    return model.eval()


def oracle_base(path, bnb_model, dtype=torch.float64):
    """The dense model in `dtype` holding the dequantized 4-bit weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    linears = dict(model.named_modules())
    with torch.no_grad():
        for name, m in bnb_model.named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                linears[name].weight.copy_(w)
    return model.to(dtype).eval()


def adapters(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix(PREFIX): p for n, p in model.named_parameters() if ".lora_" in n}


def randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(adapters(model).items()):
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def copy_adapters(src, *dsts):
    mine = adapters(src)
    for dst in dsts:
        theirs = adapters(dst)
        assert theirs.keys() == mine.keys() and mine
        with torch.no_grad():
            for n, p in mine.items():
                theirs[n].copy_(p.to(theirs[n].dtype))


def ids(seed=1):
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(seed))


def logits_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x).logits
    out.double().square().mean().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in adapters(model).items()}


def trio(checkpoints, arch, quant_type, double_quant=True, **cfg):
    """(qpeft PeftModel, PEFT + bitsandbytes PeftModel, fp64 oracle PeftModel) with the same adapters."""
    path = checkpoints[arch]
    bnb_model = bnb_base(path, quant_type, double_quant)
    ours_base = qpeft_base(path, bnb_model, quant_type, double_quant)
    oracle = oracle_base(path, bnb_model)
    config = {**dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False), **cfg}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = peft.get_peft_model(ours_base, peft.LoraConfig(**config))
        theirs = peft.get_peft_model(bnb_model, peft.LoraConfig(**config))
        ref = peft.get_peft_model(oracle, peft.LoraConfig(**config))
    assert any(isinstance(m, QPeftLoraLinear) for m in ours.modules())
    assert type(theirs.base_model.model.model.decoder.layers[0].self_attn.q_proj if arch == "opt" else
                theirs.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    randomize(ours)
    copy_adapters(ours, theirs, ref)
    return ours, theirs, ref


def assert_parity(ours, theirs, ref, x, what):
    y1, g1 = logits_and_grads(ours, x)
    y2, g2 = logits_and_grads(theirs, x)
    y0, g0 = logits_and_grads(ref, x)
    assert_close_2x(y1, y0, y2, what=f"{what} logits")
    assert g1.keys() == g2.keys() == g0.keys()
    for n in g1:
        assert_close_2x(g1[n], g0[n], g2[n], eps=1e-8, what=f"{what} grad {n}")


def merged_weights(model) -> dict[str, torch.Tensor]:
    """fp32 dequantized weight and bias of each 4-bit layer (qpeft's or bitsandbytes'), or the dense weight."""
    out = {}
    for name, m in model.named_modules():
        name = name.removeprefix(PREFIX)
        if isinstance(m, QLinearNF4):
            out[name] = m.dequantize(torch.float32)
        elif isinstance(m, bnb.nn.Linear4bit):
            out[name] = bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
        elif isinstance(m, nn.Linear) and "lm_head" not in name and "lora_" not in name:
            out[name] = m.weight.detach()
        else:
            continue
        if m.bias is not None:
            out[name + ".bias"] = m.bias.detach()
    return out


# ------------------------------------------------------------------------------------------------------- DoRA
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_dora_matches_peft_on_bitsandbytes(checkpoints, arch, quant_type):
    x = ids()
    # the magnitude PEFT initialises (||W||_row with B = 0) from bitsandbytes' dequantized weight; qpeft's kernel
    path = checkpoints[arch]
    bnb_model = bnb_base(path, quant_type)
    inits = []
    for model in (qpeft_base(path, bnb_model, quant_type), bnb_model, oracle_base(path, bnb_model)):
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", use_dora=True))
        inits.append({n: p.detach() for n, p in adapters(pm).items() if "magnitude" in n})
    assert inits[0].keys() == inits[1].keys() and len(inits[0]) == {"llama": 14, "opt": 12}[arch]
    for n in inits[0]:
        assert_close_2x(inits[0][n], inits[2][n], inits[1][n], eps=1e-7, what=f"magnitude init {n}")

    ours, theirs, ref = trio(checkpoints, arch, quant_type, use_dora=True)
    assert_parity(ours, theirs, ref, x, "dora")
    # merged: PEFT's rule on both (m / ||W + dW|| (W + dW), re-quantized); the oracle is not re-quantized
    for model in (ours, theirs, ref):
        model.merge_adapter()
    w1, w2, w0 = merged_weights(ours), merged_weights(theirs), merged_weights(ref)
    assert w1.keys() == w2.keys() == w0.keys() and w1
    for n in w1:
        assert_close_2x(w1[n], w0[n], w2[n], what=f"merged {n}")
    with torch.no_grad():
        assert_close_2x(ours(x).logits, ref(x).logits, theirs(x).logits, what="merged logits")


def test_dora_adapter_files_both_ways(checkpoints, tmp_path):
    """A DoRA adapter trained on qpeft's 4-bit base loads into stock PEFT on bitsandbytes' base and on a dense bf16
    base; one saved by PEFT on bitsandbytes loads into qpeft (PEFT's entry point and qpeft.load_adapter)."""
    x = ids()
    ours, theirs, ref = trio(checkpoints, "llama", "nf4", use_dora=True)
    with torch.no_grad():
        y_ours, y_ref = ours(x).logits, ref(x).logits
    ours.save_pretrained(tmp_path / "ours")
    saved = peft.get_peft_model_state_dict(ours)
    assert sum("lora_magnitude_vector" in k for k in saved) == 14
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    path = checkpoints["llama"]
    bnb_model = bnb_base(path, "nf4")
    loaded = peft.PeftModel.from_pretrained(bnb_model, tmp_path / "ours")
    with torch.no_grad():
        assert_close_2x(y_ours, y_ref, loaded(x).logits, what="stock PEFT + bitsandbytes")
    # a dense bf16 base (the dequantized weights in bf16): the same tensors, bf16-close outputs
    dense16 = peft.PeftModel.from_pretrained(oracle_base(path, bnb_base(path, "nf4"), torch.bfloat16),
                                             tmp_path / "ours")
    theirs16 = peft.get_peft_model_state_dict(dense16)
    assert theirs16.keys() == saved.keys() and all(torch.equal(theirs16[k], saved[k]) for k in saved)
    with torch.no_grad():
        torch.testing.assert_close(dense16(x).logits.double(), y_ref, rtol=0.05, atol=0.05)
    # and back: PEFT + bitsandbytes saves, qpeft loads
    theirs.save_pretrained(tmp_path / "theirs")
    for load in (qpeft.peft_from_pretrained, qpeft.load_adapter):
        model = load(qpeft_base(path, bnb_base(path, "nf4"), "nf4"), tmp_path / "theirs")
        with torch.no_grad():
            out = model(x).logits
        assert_close_2x(out, y_ref, y_ours, what=f"{load.__module__}.{load.__name__}")


# --------------------------------------------------------------------------------------------------- lora_bias
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_lora_bias_matches_peft_on_bitsandbytes(checkpoints, quant_type, tmp_path):
    x = ids()
    ours, theirs, ref = trio(checkpoints, "opt", quant_type, lora_bias=True, lora_alpha=4)  # scaling 1, see below
    assert sum(n.endswith("lora_B.default.bias") for n in adapters(ours)) == 12
    assert_parity(ours, theirs, ref, x, "lora_bias")
    for model in (ours, theirs, ref):
        model.merge_adapter()
    w1, w2, w0 = merged_weights(ours), merged_weights(theirs), merged_weights(ref)
    for n in w1:
        assert_close_2x(w1[n], w0[n], w2[n], what=f"merged {n}")


def test_lora_bias_merge_is_scaled_as_the_forward():
    """scaling != 1: qpeft merges scaling * lora_B.bias, which keeps the merged model equal to the unmerged one (as
    PEFT's dense layers do; PEFT 0.21.2's Linear4bit adds the bias unscaled)."""
    ours = peft.get_peft_model(tiny_opt_nf4(),
                               peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"], lora_bias=True,
                                               init_lora_weights=False))
    randomize(ours)
    layer = ours.base_model.model.model.decoder.layers[0].self_attn.q_proj
    before = layer.base_layer.bias.detach().clone()
    x = ids()
    with torch.no_grad():
        y = ours(x).logits
        ours.merge_adapter()
        expected = before + layer.scaling["default"] * layer.lora_B["default"].bias
        torch.testing.assert_close(layer.base_layer.bias, expected)
        torch.testing.assert_close(ours(x).logits, y, rtol=0.05, atol=0.05)  # NF4 re-quantization of W + dW
        ours.unmerge_adapter()
        torch.testing.assert_close(layer.base_layer.bias, before)


@pytest.mark.parametrize("cfg", [dict(use_dora=True), dict(lora_bias=True)], ids=["dora", "lora_bias"])
def test_unmerge_restores_the_4bit_base_bit_for_bit(cfg):
    """merge() then unmerge() on qpeft's PEFT layer gives back the 4-bit bytes (and the bias a lora_bias merge
    changed) exactly, DoRA's kept norms dropped; a base written while merged is unmerged PEFT's way (DoRA: divided
    by the kept norm factor, the delta subtracted, re-quantized): near the original, not the stale bytes."""
    def lora(model):
        config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "fc1"], init_lora_weights=False,
                                 **cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(model, config)
        randomize(pm)
        return pm

    ours = lora(tiny_opt_nf4())
    layers = [m for m in ours.modules() if isinstance(m, QPeftLoraLinear)]
    assert len(layers) == 4
    before = [{k: v.clone() for k, v in m.base_layer.state_dict().items()} for m in layers]
    x = ids()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        y = ours(x).logits
        ours.merge_adapter()
        changed = [m.base_layer.state_dict() for m in layers]
        assert all(not torch.equal(c["weight"], b["weight"]) for c, b in zip(changed, before))
        if "lora_bias" in cfg:
            assert all(not torch.equal(c["bias"], b["bias"]) for c, b in zip(changed, before))
        ours.unmerge_adapter()
        for m, b in zip(layers, before):
            state = m.base_layer.state_dict()
            assert state.keys() == b.keys() and all(torch.equal(state[k], b[k]) for k in b)
            assert not m.merged and not m._caches
        assert torch.equal(ours(x).logits, y)
        # the base written while merged: the kept bytes are stale, PEFT's subtracting unmerge
        layer = layers[0]
        layer.merge()
        merged = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
        layer.base_layer.load_state_dict(merged)
        layer.unmerge()
        assert not layer.merged and not layer._caches
        now = layer.base_layer.dequantize(torch.float32)
        layer.base_layer.load_state_dict(before[0])
        w0 = layer.base_layer.dequantize(torch.float32)
        layer.base_layer.load_state_dict(merged)
        w1 = layer.base_layer.dequantize(torch.float32)
        assert (now - w0).abs().mean() < 0.5 * (w1 - w0).abs().mean()


def test_lora_bias_merge_into_a_base_without_bias_raises_before_anything_changes():
    """PEFT's RuntimeError for a lora_bias merge into a layer without bias (Llama's projections); with a plain
    adapter merged in the same call, neither is merged."""
    model = tiny_llama(0)
    qpeft.quantize_model(model, compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
        pm.add_adapter("biased", peft.LoraConfig(r=4, target_modules=["q_proj"], lora_bias=True,
                                                 init_lora_weights=False))
    randomize(pm)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QPeftLoraLinear) and layer.base_layer.bias is None
    before = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    with pytest.raises(RuntimeError, match="lora_bias=True.*no bias"):
        layer.merge(adapter_names=["default", "biased"])
    assert not layer.merged
    state = layer.base_layer.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)


def tiny_opt_nf4():
    model = tiny_opt()
    qpeft.quantize_model(model, compute_dtype=torch.float32)
    return model


def test_lora_bias_adapter_files_both_ways(checkpoints, tmp_path):
    x = ids()
    ours, theirs, ref = trio(checkpoints, "opt", "nf4", lora_bias=True)
    with torch.no_grad():
        y_ours, y_ref = ours(x).logits, ref(x).logits
    ours.save_pretrained(tmp_path / "ours")
    saved = peft.get_peft_model_state_dict(ours)
    assert sum(k.endswith("lora_B.bias") for k in saved) == 12
    path = checkpoints["opt"]
    loaded = peft.PeftModel.from_pretrained(bnb_base(path, "nf4"), tmp_path / "ours")
    with torch.no_grad():
        assert_close_2x(y_ours, y_ref, loaded(x).logits, what="stock PEFT + bitsandbytes")
    theirs.save_pretrained(tmp_path / "theirs")
    for load in (qpeft.peft_from_pretrained, qpeft.load_adapter):
        model = load(qpeft_base(path, bnb_base(path, "nf4"), "nf4"), tmp_path / "theirs")
        with torch.no_grad():
            assert_close_2x(model(x).logits, y_ref, y_ours, what=f"{load.__name__}")


# ------------------------------------------------------------------------------------------ several adapters
def test_dora_with_other_adapters_and_mixed_batches_as_peft(checkpoints):
    """A plain adapter "b" beside the DoRA adapter "default": both active (PEFT's order), and mixed-adapter batches,
    which PEFT serves for "b" and "__base__" rows and refuses when a row names a DoRA adapter."""
    ours, theirs, ref = trio(checkpoints, "llama", "nf4", use_dora=True)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    for model in (ours, theirs, ref):
        model.add_adapter("b", copy.deepcopy(cfg))
    randomize(ours, seed=9)
    copy_adapters(ours, theirs, ref)
    x = torch.randint(3, 128, (4, 9), generator=torch.Generator().manual_seed(2))
    for model in (ours, theirs, ref):
        model.base_model.set_adapter(["default", "b"])
        model.eval()
    with torch.no_grad():
        assert_close_2x(ours(x).logits, ref(x).logits, theirs(x).logits, what="two active adapters")
    names = ["b", "__base__", "b", "__base__"]
    with torch.no_grad():
        assert_close_2x(ours(x, adapter_names=names).logits, ref(x, adapter_names=names).logits,
                        theirs(x, adapter_names=names).logits, what="mixed batch")
    for model in (ours, theirs):
        with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled."):
            model(x, adapter_names=["default", "b", "__base__", "b"])


# ------------------------------------------------------------------------------------------ parameter counts
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_parameter_counts_are_the_dense_models(checkpoints, arch, capsys):
    """PEFT's get_nb_trainable_parameters / print_trainable_parameters and qpeft.trainable_parameters report a 4-bit
    model's logical parameter count (the dense model's), on qpeft's base as PEFT does on bitsandbytes'."""
    from transformers import AutoModelForCausalLM

    path = checkpoints[arch]
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    n_dense = sum(p.numel() for p in dense.parameters())
    bnb_model = bnb_base(path, "nf4")
    ours_base = qpeft_base(path, bnb_model, "nf4")
    assert qpeft.trainable_parameters(ours_base).total == qpeft.trainable_parameters(bnb_model).total == n_dense
    cfg = dict(r=4, target_modules=["q_proj", "v_proj"])
    ours = peft.get_peft_model(ours_base, peft.LoraConfig(**cfg))
    theirs = peft.get_peft_model(bnb_model, peft.LoraConfig(**cfg))
    n_lora = sum(p.numel() for n, p in ours.named_parameters() if ".lora_" in n)
    assert n_lora == sum(p.numel() for n, p in theirs.named_parameters() if ".lora_" in n) > 0
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters() == (n_lora, n_dense + n_lora)
    report = qpeft.trainable_parameters(ours)
    assert (report.trainable, report.total) == (n_lora, n_dense + n_lora)
    ours.print_trainable_parameters()
    assert f"all params: {n_dense + n_lora:,}" in capsys.readouterr().out
    # DoRA: the magnitudes are trainable parameters too, counted as PEFT counts them
    dora = peft.get_peft_model(qpeft_base(path, bnb_base(path, "nf4"), "nf4"), peft.LoraConfig(use_dora=True, **cfg))
    n_mag = sum(p.numel() for n, p in dora.named_parameters() if "lora_magnitude_vector" in n)
    assert n_mag > 0 and dora.get_nb_trainable_parameters() == (n_lora + n_mag, n_dense + n_lora + n_mag)


def test_parameter_count_fix_is_version_checked():
    from qpeft.integrations.peft import install_parameter_count_fix

    class Fake:
        def get_nb_trainable_parameters(self):
            return 1, 2

    with pytest.warns(RuntimeWarning, match="not tested with"):
        assert install_parameter_count_fix([Fake], peft_version="99.0") == ["Fake"]
    assert Fake.get_nb_trainable_parameters._qpeft

    class Gone:
        pass

    with pytest.warns(RuntimeWarning, match="has no get_nb_trainable_parameters"):
        assert install_parameter_count_fix([Gone], peft_version="0.21.2") == []


# ------------------------------------------------------------------------------------------ adapter dtypes
def bf16_bases(path):
    """bitsandbytes' and qpeft's bases of a bf16 model with bf16 compute (the QLoRA setting), same bytes."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    bnb_model = no_cpu_repack(AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu",
                                                                   dtype=torch.bfloat16)).eval()
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    qpeft.quantize_model(ours, compute_dtype=torch.bfloat16)
    ours.load_state_dict(bnb_model.state_dict())
    return ours.eval(), bnb_model


def adapter_dtypes(model) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in adapters(model).items()}


@pytest.mark.parametrize("autocast", [True, False])
@pytest.mark.parametrize("use_dora", [False, True])
def test_adapter_dtype_follows_autocast_adapter_dtype_as_peft(checkpoints, tmp_path, autocast, use_dora):
    """get_peft_model / PeftModel.from_pretrained(autocast_adapter_dtype=...) on a bf16 model with bf16 compute:
    the adapters (and DoRA's magnitudes) get the dtype PEFT + bitsandbytes gives them (fp32 with the default
    autocast_adapter_dtype=True, bf16 with False), and the two models compute the same."""
    path = checkpoints["llama"]
    ours_base, bnb_model = bf16_bases(path)
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=use_dora)
    ours = peft.get_peft_model(ours_base, peft.LoraConfig(**cfg), autocast_adapter_dtype=autocast)
    theirs = peft.get_peft_model(bnb_model, peft.LoraConfig(**cfg), autocast_adapter_dtype=autocast)
    expected = torch.float32 if autocast else torch.bfloat16
    assert adapter_dtypes(ours) == adapter_dtypes(theirs) and set(adapter_dtypes(ours).values()) == {expected}
    randomize(ours)
    copy_adapters(ours, theirs)
    x = ids()
    with torch.no_grad():
        y1, y2 = ours(x).logits, theirs(x).logits
    assert y1.dtype == y2.dtype == torch.bfloat16
    torch.testing.assert_close(y1.float(), y2.float(), rtol=0.05, atol=0.05)  # bf16 models: bf16's tolerance
    ours.save_pretrained(tmp_path)
    for base in (bf16_bases(path)[0], bf16_bases(path)[1]):
        loaded = peft.PeftModel.from_pretrained(base, tmp_path, autocast_adapter_dtype=autocast)
        assert set(adapter_dtypes(loaded).values()) == {expected}


def test_transformers_add_adapter_keeps_qpeft_fp32_default(checkpoints):
    """transformers' model.add_adapter never casts (PEFT + bitsandbytes trains bf16 adapters there); qpeft's layer
    keeps its default, fp32 adapters (TRL casts quantized models' adapters itself)."""
    from packaging.version import Version
    from transformers.integrations import peft as hf_peft

    if Version(peft.__version__) < Version(hf_peft.MIN_PEFT_VERSION):
        pytest.skip(f"transformers {transformers.__version__}'s PEFT integration needs PEFT >= "
                    f"{hf_peft.MIN_PEFT_VERSION}")
    ours, bnb_model = bf16_bases(checkpoints["llama"])
    cfg = dict(r=4, target_modules=["q_proj"])
    ours.add_adapter(peft.LoraConfig(**cfg))
    bnb_model.add_adapter(peft.LoraConfig(**cfg))
    assert set(adapter_dtypes(ours).values()) == {torch.float32}
    assert set(adapter_dtypes(bnb_model).values()) == {torch.bfloat16}



def layer_out_and_grads(layer, x, dy, dtype):
    """A LoRA layer's output on x (in `dtype`) and the gradients of sum(y * dy) for x and its adapter tensors."""
    x = x.to(dtype).requires_grad_(True)
    params = {n: p for n, p in layer.named_parameters() if ".lora_" in "." + n}
    y = layer(x)
    grads = torch.autograd.grad((y.double() * dy).sum(), [x, *params.values()])
    return y.detach(), dict(zip(["x", *params], grads))


@pytest.mark.parametrize("arch,variant", [("llama", {}), ("llama", {"use_dora": True}), ("opt", {"lora_bias": True})],
                         ids=["llama-lora", "llama-dora", "opt-lora_bias"])
def test_add_lora_autocast_adapter_dtype_false_matches_peft_on_bitsandbytes(checkpoints, tmp_path, arch, variant):
    """qpeft.add_lora(..., autocast_adapter_dtype=False) on a bf16 model with bf16 compute: the adapters get PEFT
    + bitsandbytes' dtypes (get_peft_model(..., autocast_adapter_dtype=False): bf16); the logits, and every LoRA
    layer's output and gradients (x, A, B, magnitude, bias) on the same bf16 input and upstream gradient, are within
    2x of PEFT + bitsandbytes on the same bytes against an fp64 oracle (PEFT on a float64 copy of the model holding
    the dequantized weights). Gradients are compared per layer: through a whole bf16 model they carry the rounding
    of every layer above (attention, ReLU sign flips), where qpeft's and PEFT's errors already differ by 2-5x either
    way with fp32 adapters. Files: the adapter's dtype, as PEFT saves, loadable both ways."""
    path = checkpoints[arch]
    ours, bnb_model = bf16_bases(path)
    oracle = oracle_base(path, bnb_model)
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **variant)
    qpeft.add_lora(ours, "all-linear", r=4, lora_alpha=8, init=False, autocast_adapter_dtype=False, **variant)
    theirs = peft.get_peft_model(bnb_model, peft.LoraConfig(**cfg), autocast_adapter_dtype=False)
    ref = peft.get_peft_model(oracle, peft.LoraConfig(**cfg))
    assert adapter_dtypes(ours) == adapter_dtypes(theirs)
    assert set(adapter_dtypes(ours).values()) == {torch.bfloat16} and len(adapter_dtypes(ours)) == \
        {"llama": 28, "opt": 24}[arch] * (1 + 0.5 * bool(variant))
    randomize(ours)
    copy_adapters(ours, theirs, ref)
    x = ids()
    with torch.no_grad():
        y1, y2, y0 = ours(x).logits, theirs(x).logits, ref(x).logits
    assert y1.dtype == y2.dtype == torch.bfloat16
    assert_close_2x(y1, y0, y2, what=f"{arch} {variant} logits")
    layers = qpeft.lora_layers(ours)
    assert len(layers) == {"llama": 14, "opt": 12}[arch]
    g = torch.Generator().manual_seed(5)
    for name, layer in layers.items():
        xl = torch.randn(2, 7, layer.in_features, generator=g)
        dy = torch.randn(2, 7, layer.out_features, generator=g, dtype=torch.float64)
        o1, g1 = layer_out_and_grads(layer, xl, dy, torch.bfloat16)
        o2, g2 = layer_out_and_grads(theirs.get_submodule(PREFIX + name), xl, dy, torch.bfloat16)
        o0, g0 = layer_out_and_grads(ref.get_submodule(PREFIX + name), xl, dy, torch.float64)
        assert_close_2x(o1, o0, o2, what=f"{name} output")
        assert g1.keys() == g2.keys() == g0.keys() and len(g1) == 3 + bool(variant)
        for k in g1:
            assert g1[k].dtype == g2[k].dtype == torch.bfloat16
            assert_close_2x(g1[k], g0[k], g2[k], eps=1e-8, what=f"{name} grad {k}")
    qpeft.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file

    files = [load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "theirs")]
    assert files[0].keys() == files[1].keys()
    assert all(files[0][k].dtype == files[1][k].dtype == torch.bfloat16 for k in files[0])
    x = ids(2)
    with torch.no_grad():
        y = ours(x).logits
        peft_loaded = peft.PeftModel.from_pretrained(bf16_bases(path)[1], tmp_path / "ours",
                                                     autocast_adapter_dtype=False)
        assert set(adapter_dtypes(peft_loaded).values()) == {torch.bfloat16}
        torch.testing.assert_close(peft_loaded(x).logits, theirs(x).logits, rtol=0, atol=0)
        ours_loaded = qpeft.load_adapter(bf16_bases(path)[0], tmp_path / "theirs", autocast_adapter_dtype=False)
        assert adapter_dtypes(ours_loaded) == adapter_dtypes(ours)
        torch.testing.assert_close(ours_loaded(x).logits, y, rtol=0, atol=0)
