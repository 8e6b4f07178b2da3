"""qpeft.fuse / unfuse beyond the per-family checks (test_fused_families.py): 4-bit bases (qpeft's QLinearNF4 under
PEFT and under qpeft's own LoRA, bitsandbytes Linear4bit under PEFT) against a dense fp64 oracle holding the
dequantized weights; a few Trainer steps on a PEFT-wrapped NF4 model; what fuse refuses (TypeError naming what it
takes, the model unchanged) and what runs unfused with one FusedFallbackWarning (the result then equal to the
unfused model's); the checkpoint offload through the `qpeft._cuda.rt` seam (tests/fake_cuda.py)."""
from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
import torch.nn as nn

import qpeft
from fake_cuda import FakeCuda
from qpeft.models.fused import offload
from utils import assert_close_2x, tiny_causal_lm

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

V = 100
# intermediate 128: every in_features a multiple of the blocksize 64 (bitsandbytes 0.50.2's CPU dequantize
# misplaces blocks that straddle rows, see tests/ops/test_lora_mlp.py)
NF4_SIZES = dict(intermediate_size=128)


def ids(*shape, seed=1):
    return torch.randint(3, V, shape, generator=torch.Generator().manual_seed(seed))


def _bnb_quantize_(model: nn.Module) -> None:
    """Every decoder linear to bitsandbytes Linear4bit (NF4, blocksize 64, double quant), as transformers'
    BitsAndBytesConfig(load_in_4bit=True) does; lm_head stays dense."""
    bnb = pytest.importorskip("bitsandbytes")
    for name, lin in [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and "lm_head" not in n]:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, q.to("cpu"))


def _dequantize_into_(dense: nn.Module, quantized: nn.Module) -> None:
    """Give each nn.Linear of `dense` the dequantized weight of the 4-bit layer at the same name in `quantized`."""
    done = 0
    for name, q in quantized.named_modules():
        if isinstance(q, qpeft.QLinearNF4):
            w = q.dequantize(torch.float32)
        elif hasattr(getattr(q, "weight", None), "quant_state") and type(q).__module__.startswith("bitsandbytes"):
            import bitsandbytes.functional as bf

            w = bf.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
        else:
            continue
        dense.get_submodule(name).weight.data.copy_(w)
        done += 1
    assert done > 0


def _with_lora(model: nn.Module, method: str) -> nn.Module:
    if method == "peft":
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                           init_lora_weights=False))
    else:  # qpeft's own LoRA layers (LoraLinear), random B
        qpeft.add_lora(model, "all-linear", r=4, lora_alpha=8)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    for n, p in model.named_parameters():
        if "norm" in n:
            p.requires_grad_(True)
    return model


def nf4_triplet(family: str, base: str, method: str):
    """(unfused 4-bit, fused 4-bit, dense fp64 oracle with the dequantized weights and the same adapters)."""
    dense = tiny_causal_lm(family, **NF4_SIZES)
    quantized = copy.deepcopy(dense)
    if base == "qpeft":
        qpeft.quantize_model(quantized, compute_dtype=torch.float32)
    else:
        _bnb_quantize_(quantized)
    _dequantize_into_(dense, quantized)
    # the oracle's LoRA is PEFT's (qpeft's LoraLinear computes in fp32/fp16/bf16 only), same parameter names
    quantized, dense = _with_lora(quantized, method), _with_lora(dense, "peft")
    prefix = "" if method == "peft" else "base_model.model."
    trainable = {prefix + n: p.detach() for n, p in quantized.named_parameters() if p.requires_grad}
    missing = set(trainable) - set(dict(dense.named_parameters()))
    assert not missing, missing
    dense.load_state_dict(trainable, strict=False)
    fused = qpeft.fuse(copy.deepcopy(quantized))
    return quantized, fused, dense.double()


def named_loss_and_grads(model, batch):
    model.train()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = model(**batch, use_cache=False).loss
    return loss, dict(zip(named, torch.autograd.grad(loss, list(named.values()))))


def assert_fused_matches(unfused, fused, oracle, batch, what):
    with warnings.catch_warnings():
        warnings.simplefilter("error", qpeft.FusedFallbackWarning)  # every module ran fused
        lf, gf = named_loss_and_grads(fused, batch)
    lu, gu = named_loss_and_grads(unfused, batch)
    lo, go = named_loss_and_grads(oracle, batch)
    go = {n.removeprefix("base_model.model.") if n not in gf else n: g for n, g in go.items()}
    assert_close_2x(lf, lo, lu, what=f"{what} loss")
    assert set(gf) == set(gu) == set(go) and any("lora_A" in n for n in gf) and any("norm" in n for n in gf)
    for n in gf:
        assert gu[n].abs().max() > 0, f"{what} {n}: zero gradient"
        assert_close_2x(gf[n], go[n], gu[n], what=f"{what} {n}")


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("base,method", [("qpeft", "peft"), ("qpeft", "qpeft"), ("bnb", "peft")],
                         ids=["QLinearNF4+PEFT", "QLinearNF4+add_lora", "bnb-Linear4bit+PEFT"])
def test_nf4_bases(family, base, method):
    unfused, fused, oracle = nf4_triplet(family, base, method)
    x = ids(2, 11)
    labels = x.clone()
    labels[1, :3] = -100
    assert_fused_matches(unfused, fused, oracle, dict(input_ids=x, labels=labels), f"{family} {base}/{method}")


def test_fuse_before_get_peft_model():
    """fuse first, then PEFT's LoRA (its layers injected into the fused modules): the same as the other order."""
    dense = tiny_causal_lm("qwen3")
    unfused = _with_lora(copy.deepcopy(dense), "peft")
    fused = _with_lora(qpeft.fuse(copy.deepcopy(dense)), "peft")
    fused.load_state_dict(unfused.state_dict())
    x = ids(2, 9)
    assert_fused_matches(unfused, fused, copy.deepcopy(unfused).double(), dict(input_ids=x, labels=x), "qwen3")
    assert qpeft.models.fused.api.is_fused(fused)


def test_trainer_on_peft_nf4_model(tmp_path):
    """A few Trainer steps on a PEFT-wrapped QLinearNF4 model: the fused run's logged losses within the 2x rule of
    the dense fp64 run with the dequantized weights (the unfused 4-bit run as torch's error)."""
    from transformers import Trainer, TrainingArguments

    data = [{"input_ids": s, "labels": s} for s in ids(16, 10).tolist()]

    unfused, fused, oracle = nf4_triplet("llama", "qpeft", "peft")
    losses = {}
    for name, model in (("fused", fused), ("unfused", unfused), ("fp64", oracle)):
        args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-2, logging_steps=1,
                                 save_strategy="no", report_to=[], seed=0, data_seed=0, use_cpu=True,
                                 disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        with warnings.catch_warnings():
            warnings.simplefilter("error", qpeft.FusedFallbackWarning)
            trainer.train()
        losses[name] = torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h],
                                    dtype=torch.float64)
    assert len(losses["fused"]) == 4 and len(set(losses["fused"].tolist())) > 1
    assert_close_2x(losses["fused"], losses["fp64"], losses["unfused"], eps=1e-5, what="Trainer losses")


# ---- what fuse refuses, and what runs unfused with a warning


def test_unsupported_model_raises_naming_the_families():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=V))
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(TypeError, match=r"GPT2LMHeadModel \(model_type 'gpt2'\).*LlamaForCausalLM.*Gemma3ForCausalLM"):
        qpeft.fuse(model)
    assert {n: type(m) for n, m in model.named_modules()} == before
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        qpeft.fuse("llama")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        qpeft.unfuse(None)
    with pytest.raises(TypeError, match="offload_checkpoints must be True or False, got 'yes'"):
        qpeft.fuse(tiny_causal_lm("llama"), offload_checkpoints="yes")


def test_subclass_of_a_family_is_not_taken():
    """A user's subclass may have changed the forward fuse replaces: refused, not guessed."""
    from transformers import LlamaForCausalLM

    class MyLlama(LlamaForCausalLM):
        pass

    model = MyLlama(tiny_causal_lm("llama").config)
    with pytest.raises(TypeError, match="MyLlama"):
        qpeft.fuse(model)


@pytest.mark.parametrize("case", ["custom_loss", "logits_to_keep", "return_dict", "trainable_base", "dora",
                                  "lm_head_lora"])
def test_fallbacks_warn_once_and_equal_the_unfused_model(case):
    """An option the fused path cannot honour runs the module's own forward: one FusedFallbackWarning naming the
    reason (not repeated on the next call), and exactly the unfused model's result."""
    x = ids(2, 8)
    kwargs = dict(input_ids=x, labels=x)
    model = tiny_causal_lm("llama").requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)  # something to train (a frozen base: the fused blocks take it)
    reason = {"custom_loss": "custom loss", "logits_to_keep": "logits_to_keep=1",
              "return_dict": "return_dict=False", "trainable_base": "trainable base weight", "dora": "DoRA",
              "lm_head_lora": "output head"}[case]
    if case == "custom_loss":
        from transformers.loss.loss_utils import ForCausalLMLoss

        def loss_function(logits, labels, vocab_size, **kw):
            return 2.0 * ForCausalLMLoss(logits, labels, vocab_size, **kw)

        model.loss_function = loss_function
    elif case == "logits_to_keep":
        kwargs["logits_to_keep"] = 1
    elif case == "return_dict":
        kwargs["return_dict"] = False
    elif case == "trainable_base":
        model.requires_grad_(True)
    elif case in ("dora", "lm_head_lora"):
        target = ["q_proj", "v_proj"] if case == "dora" else ["lm_head", "q_proj", "k_proj", "v_proj", "gate_proj",
                                                                 "up_proj", "down_proj"]
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=target, use_dora=case == "dora",
                                                           init_lora_weights=False))
    fused = qpeft.fuse(copy.deepcopy(model))
    model.train()
    fused.train()

    def call(m):
        try:
            out = m(**kwargs)
        except ValueError as e:  # logits_to_keep with labels: transformers' own error, fused or not
            return (str(e),)
        return out if isinstance(out, tuple) else (out.loss, out.logits)

    with pytest.warns(qpeft.FusedFallbackWarning, match=reason) as record:
        got = call(fused)
    fallbacks = [str(w.message) for w in record if issubclass(w.category, qpeft.FusedFallbackWarning)]
    # one per reason: the trainable base is refused by the MLP and by the attention
    assert len(fallbacks) == (2 if case == "trainable_base" else 1), fallbacks
    with warnings.catch_warnings():
        warnings.simplefilter("error", qpeft.FusedFallbackWarning)
        call(fused)  # warned once per model and reason
    want = call(model)
    if case in ("trainable_base", "dora"):  # the loss itself is still fused: no logits
        assert got[1] is None
        got, want = got[:1], want[:1]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if isinstance(w, torch.Tensor):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        elif isinstance(w, str):
            assert g == w
        else:  # the KV cache of a return_dict=False tuple
            assert type(g) is type(w)


def test_output_attentions_and_hidden_states_with_labels():
    """The fused attention returns its attention weights: output_attentions / output_hidden_states with labels
    give the unfused model's (eager attention), and the loss without logits."""
    model = tiny_causal_lm("mistral")
    fused = qpeft.fuse(copy.deepcopy(model))
    x = ids(2, 8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", qpeft.FusedFallbackWarning)
        got = fused(input_ids=x, labels=x, output_attentions=True, output_hidden_states=True)
    want = model(input_ids=x, labels=x, output_attentions=True, output_hidden_states=True, use_cache=False)
    assert got.logits is None and len(got.attentions) == len(want.attentions) == 2
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    for g, w in zip((*got.attentions, *got.hidden_states), (*want.attentions, *want.hidden_states)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# ---- offload of checkpointed layer inputs, through the CUDA seam


@pytest.mark.parametrize("reentrant", [False, True])
def test_offload_puts_each_checkpointed_layer_input_in_pinned_memory(monkeypatch, reentrant):
    """With offload_checkpoints=True under gradient checkpointing, each decoder layer's input goes to a pinned host
    buffer (pinned_empty through qpeft._cuda.rt; the fake fills it with NaN, so a missed copy would show) and
    comes back for the backward: loss and gradients exactly those without offload. The offload module alone sees
    the fake device here (the kernels take their CPU paths)."""
    fake_cuda = FakeCuda()
    monkeypatch.setattr(offload, "_cuda", types.SimpleNamespace(rt=fake_cuda))
    model = _with_lora(tiny_causal_lm("gemma3"), "peft")
    plain = copy.deepcopy(model)
    results = []
    for m, off in ((model, True), (plain, False)):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:  # the reentrant checkpoint differentiates only inputs that require grad (PEFT's recipe)
            m.enable_input_require_grads()
        qpeft.fuse(m, offload_checkpoints=off)
        fake_cuda.log.clear()
        m.train()
        loss = m(input_ids=ids(2, 9), labels=ids(2, 9)).loss
        loss.backward()  # the reentrant checkpoint does not support autograd.grad
        results.append((loss, {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
        pinned = [e for e in fake_cuda.log if e[0] == "pinned_empty"]
        layers = m.config.num_hidden_layers
        assert pinned == ([("pinned_empty", (2, 9, 64), torch.float32)] * layers if off else [])
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2)
    assert g1.keys() == g2.keys() and any("lora_A" in n for n in g1)
    for n in g1:
        assert g1[n].abs().max() > 0 and torch.equal(g1[n], g2[n]), n


def test_offload_without_checkpointing_warns():
    model = tiny_causal_lm("llama").requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)
    qpeft.fuse(model, offload_checkpoints=True)
    model.train()
    with pytest.warns(qpeft.FusedFallbackWarning, match="offload_checkpoints=True has no effect"):
        model(input_ids=ids(1, 5), labels=ids(1, 5))


def test_fuse_again_updates_the_option_and_unfuse_is_idempotent():
    model = tiny_causal_lm("qwen2")
    layer = model.model.layers[0]
    qpeft.fuse(model, offload_checkpoints=True)
    assert type(layer).__name__ == "Qwen2DecoderLayer" and hasattr(type(layer), "_qpeft_original")
    qpeft.fuse(model)
    assert not hasattr(type(layer), "_qpeft_original")  # no offload: the decoder layer keeps its class
    assert hasattr(type(model.model.norm), "_qpeft_original")
    qpeft.unfuse(model)
    qpeft.unfuse(model)
    assert not qpeft.models.fused.api.is_fused(model)


# ---- the one argument: QPeftConfig(fuse=True)


def test_qpeft_config_fuse_on_load(tmp_path):
    """from_pretrained(..., quantization_config=QPeftConfig(fuse=True)) returns the fused 4-bit model: its loss
    (no logits) equals the unfused load's within the 2x rule of the dense fp64 model with the dequantized
    weights; fuse is not written to config.json; a bad value and a family fuse does not take raise."""
    import json

    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    tiny_causal_lm("llama", **NF4_SIZES).save_pretrained(tmp_path / "llama")
    load = dict(quantization_config=qpeft.QPeftConfig(compute_dtype=torch.float32), dtype=torch.float32)
    unfused = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", **load)
    fused = AutoModelForCausalLM.from_pretrained(
        tmp_path / "llama", dtype=torch.float32,
        quantization_config=qpeft.QPeftConfig(compute_dtype=torch.float32, fuse=True))
    assert qpeft.models.fused.api.is_fused(fused) and not qpeft.models.fused.api.is_fused(unfused)
    oracle = tiny_causal_lm("llama", **NF4_SIZES)
    _dequantize_into_(oracle, unfused)
    x = ids(2, 9)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", qpeft.FusedFallbackWarning)
        got = fused(input_ids=x, labels=x)
    with torch.no_grad():
        same = unfused(input_ids=x, labels=x).loss
        want = oracle.double()(input_ids=x, labels=x).loss
    assert got.logits is None
    assert_close_2x(got.loss, want, same, what="QPeftConfig(fuse=True) loss")
    fused.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "qpeft" and "fuse" not in saved
    with pytest.raises(ValueError, match="fuse must be True or False, got 'yes'"):
        qpeft.QPeftConfig(fuse="yes")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=V)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(TypeError, match=r"GPT2LMHeadModel.*LlamaForCausalLM"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2",
                                             quantization_config=qpeft.QPeftConfig(fuse=True))


def test_packed_flash_attention_kwargs_reach_the_attention_function():
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True): the fused attention hands cu_seq_lens_q/k and
    max_length_q/k to transformers' attention function as the unfused one does (flash attention reads them; here
    sdpa, wrapped to record its keywords), and with sdpa each packed sequence's loss is its own."""
    from transformers import DataCollatorWithFlattening
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seqs = [ids(n, seed=n) for n in (4, 6, 3)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": s.tolist(), "labels": s.tolist()} for s in seqs])
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 10, 13]
    model = _with_lora(tiny_causal_lm("qwen2", attn_implementation="sdpa"), "peft")
    fused = qpeft.fuse(copy.deepcopy(model))
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    seen = []

    def recording(module, q, k, v, mask, **kwargs):
        seen.append({key: kwargs[key] for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q") if key in kwargs})
        return sdpa(module, q, k, v, mask, **kwargs)

    had_local = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
    ALL_ATTENTION_FUNCTIONS["sdpa"] = recording
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error", qpeft.FusedFallbackWarning)
            got = fused(**batch).loss
        fused_seen, seen[:] = list(seen), []
        with torch.no_grad():
            same = model(**batch, use_cache=False).loss
    finally:
        if had_local:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa
        else:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert len(fused_seen) == len(seen) == 2
    for f, u in zip(fused_seen, seen):
        assert f.keys() == u.keys() == {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q"}
        assert f["cu_seq_lens_q"].tolist() == [0, 4, 10, 13] and f["max_length_q"] == u["max_length_q"]
    with torch.no_grad():
        oracle = copy.deepcopy(model).double()
        want = oracle(**{k: v for k, v in batch.items() if k in ("input_ids", "position_ids", "labels")},
                      use_cache=False).loss
        # the packed loss is the token-weighted mean of the sequences' own losses
        n = torch.tensor([len(s) - 1 for s in seqs], dtype=torch.float64)
        alone = torch.stack([oracle(input_ids=s[None], labels=s[None], use_cache=False).loss for s in seqs])
    assert_close_2x(got, want, same, what="packed sdpa loss")
    # (transformers' loss upcasts the logits with .float(): the fp64 model's losses are fp32)
    torch.testing.assert_close(want.double(), (alone.double() * n).sum() / n.sum(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["peft", "qpeft"])
@pytest.mark.parametrize("variant", ["use_dora", "lora_bias"])
def test_dora_and_lora_bias_on_4bit_layers_fall_back_to_the_layer(method, variant):
    """qpeft's own 4-bit LoRA layers (PEFT's QPeftLoraLinear and LoraLinear) with DoRA or lora_bias: a fused block
    cannot compute either, so the layer runs itself (one FusedFallbackWarning naming the variant) and the loss
    and gradients are the unfused model's -- never plain LoRA's silently."""
    model = tiny_causal_lm("llama", **NF4_SIZES).requires_grad_(False)
    qpeft.quantize_model(model, compute_dtype=torch.float32)
    target = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    if method == "peft":
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=target,
                                                           init_lora_weights=False, **{variant: True}))
    else:
        qpeft.add_lora(model, target, r=4, lora_alpha=8, **{variant: True})
    with torch.no_grad():  # non-zero B, bias and magnitude: each variant changes the output
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    fused = qpeft.fuse(copy.deepcopy(model))
    x = ids(2, 9)
    batch = dict(input_ids=x, labels=x)
    with pytest.warns(qpeft.FusedFallbackWarning, match="DoRA" if variant == "use_dora" else "lora_bias"):
        lf, gf = named_loss_and_grads(fused, batch)
    lu, gu = named_loss_and_grads(model, batch)
    torch.testing.assert_close(lf, lu, rtol=1e-5, atol=1e-6)
    assert set(gf) == set(gu)
    for n in gf:
        torch.testing.assert_close(gf[n], gu[n], rtol=1e-4, atol=1e-6, msg=n)
