"""Shared test helpers: dtypes, tolerances, devices, tiny random Hugging Face models, the 2x error rule."""
from __future__ import annotations

import os

import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (atol, rtol): PyTorch's own test defaults (vLLM allclose_default.py)
TOL = {torch.float32: (1e-5, 1.3e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-3, 1.6e-2)}

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def has_triton() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:
        return False


requires_triton = pytest.mark.skipif(not has_triton(), reason="needs triton")


def compile_for_sm90(fn, signature: dict, constexprs: dict, options: dict | None = None, aligned=()):
    """A Triton kernel compiled for an H100 (sm_90) on a machine without a GPU (catches lowering errors that the
    interpreter cannot, and shows the instructions chosen). `signature` maps runtime argument names to Triton
    types, `constexprs` maps names to values, `aligned` names pointers known to be 16-byte aligned. Returns the
    compiled kernel: .asm["ptx"], .asm["cubin"], .metadata.shared."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}},
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs={(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    return triton_compile(src, target=GPUTarget("cuda", 90, 32), options=options or {"num_warps": 4})
# Triton kernels run either on a GPU or on CPU tensors under the interpreter.
requires_triton_runtime = pytest.mark.skipif(
    not has_triton() or not (HAS_CUDA or TRITON_INTERPRET),
    reason="Triton kernels need a CUDA device or TRITON_INTERPRET=1")


def triton_device() -> str:
    """Where Triton kernels run in this session: cuda, else cpu under the interpreter."""
    return "cuda" if HAS_CUDA else "cpu"


def triton_dtypes() -> list:
    """The interpreter cannot do bf16 arithmetic: test fp16/fp32 there, bf16 on GPU only."""
    return DTYPES if HAS_CUDA else [torch.float32, torch.float16]


def devices() -> list[str]:
    env = os.environ.get("QPEFT_TEST_DEVICE")
    if env:
        return [env]
    return ["cpu", "cuda"] if HAS_CUDA else ["cpu"]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    # in fp64: an fp64 oracle must not be rounded to fp32 before the difference is taken
    return (a.double() - b.double()).abs().max().item()


def assert_close_2x(out: torch.Tensor, ref32: torch.Tensor, same_dtype: torch.Tensor, factor: float = 2.0,
                    eps: float = 1e-6, what: str = "output") -> None:
    """FA's rule: max|out - ref32| <= factor * max|same_dtype - ref32| + eps.

    `ref32` is the fp32 reference, `same_dtype` plain PyTorch computed in the output's dtype.
    """
    err = max_err(out, ref32)
    base = max_err(same_dtype, ref32)
    assert err <= factor * base + eps, (
        f"{what}: max error {err:.3e} > {factor} x torch's {base:.3e} (+{eps:g})")


def tiny_llama(seed: int = 0, vocab_size: int = 128, hidden_size: int = 64, layers: int = 2,
               heads: int = 4, kv_heads: int = 2, intermediate_size: int = 96):
    """A small random LlamaForCausalLM (grouped-query attention) in fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0, vocab_size: int = 128, hidden_size: int = 64, layers: int = 2, heads: int = 4,
              num_labels: int | None = None):
    """A small random BertModel (or BertForSequenceClassification with num_labels) in fp32, eval mode."""
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=4 * hidden_size, max_position_embeddings=128)
    if num_labels is not None:
        cfg.num_labels = num_labels
        return BertForSequenceClassification(cfg).eval()
    return BertModel(cfg).eval()


def train_prompt_steps(model, steps: int, lr: float = 1e-2, **batch) -> list[float]:
    """Adam steps on a fixed batch of a PromptLearningModel (`model(**batch).loss`), asserting at every step that
    the frozen base got no gradient and every trainable parameter did; returns the losses."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.base_model.parameters())
        assert all(p.grad is not None for p in trainable)
        opt.step()
        losses.append(loss.item())
    return losses


def assert_generate_is_greedy(model, ids, steps: int) -> None:
    """`model.generate` (greedy, `steps` new tokens) of a causal LM equals appending the argmax of a full
    recompute, one token at a time."""
    out = model.generate(input_ids=ids, max_new_tokens=steps, do_sample=False)
    seq = ids
    for _ in range(steps):
        with torch.no_grad():
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def assert_seq2seq_disabled_equals_base(base, model, ids, mask, labels) -> None:
    """Under `model.disable_adapters()` an encoder-decoder PromptLearningModel gives the base model's logits and
    greedy generation exactly; with adapters on, its logits differ."""
    with torch.no_grad():
        ref = base(input_ids=ids, attention_mask=mask, labels=labels).logits
        ref_gen = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        with model.disable_adapters():
            out = model(input_ids=ids, attention_mask=mask, labels=labels).logits
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
        on = model(input_ids=ids, attention_mask=mask, labels=labels).logits
    assert torch.equal(out, ref) and torch.equal(gen, ref_gen)
    assert not torch.allclose(on, ref)


def assert_seq2seq_generate_is_greedy(model, ids, mask, steps: int) -> None:
    """`model.generate` (greedy, exactly `steps` new tokens) of an encoder-decoder PromptLearningModel equals a
    full recompute at every step: per-step logits and the final decoder sequence."""
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, output_logits=True, return_dict_in_generate=True)
    eos = model.base_model.generation_config.eos_token_id
    dec = torch.full((ids.shape[0], 1), model.base_model.config.decoder_start_token_id)
    with torch.no_grad():
        for t in range(steps):  # full recompute (encoder and decoder, no cache beyond the prefix) at every step
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits[:, -1]
            torch.testing.assert_close(gen.logits[t], logits)
            logits[:, eos] = -float("inf")  # min_new_tokens: generate suppresses EOS for these steps
            dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(gen.sequences, dec)
