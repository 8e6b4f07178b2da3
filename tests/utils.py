"""Shared test helpers: dtypes, tolerances, devices, tiny random Hugging Face models, the 2x error rule."""
from __future__ import annotations

import contextlib
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


# ---------------------------------------------------------- Triton launches recorded on the CPU, compiled for sm_90
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
                  torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")


class TritonLaunch:
    """One kernel launch as a launcher issued it: the JITFunction, its arguments and launch options."""

    def __init__(self, fn, args: tuple, kwargs: dict, grid=None):
        self.fn, self.args, self.kwargs, self.grid = fn, args, kwargs, grid

    @property
    def name(self) -> str:
        return self.fn.__name__

    def source(self) -> tuple[dict, dict, dict, list]:
        """(signature, constexprs, options, aligned) as Triton's runtime would specialize this launch: tensors
        are pointers (16-byte aligned ones marked so), an int equal to 1 becomes the constant 1 and ints that
        are multiples of 16 are marked divisible, None arguments are constants."""
        import inspect

        bound = dict(zip(self.fn.arg_names, self.args))
        bound.update({k: v for k, v in self.kwargs.items() if k in self.fn.arg_names})
        options = {k: v for k, v in self.kwargs.items() if k in _LAUNCH_OPTIONS and v is not None}
        unknown = set(self.kwargs) - set(self.fn.arg_names) - set(_LAUNCH_OPTIONS)
        assert not unknown, f"{self.name}: unknown launch arguments {sorted(unknown)}"
        signature, constexprs, aligned = {}, {}, []
        for param, name in zip(self.fn.params, self.fn.arg_names):
            if name in bound:
                value = bound[name]
            else:
                default = param.default
                assert default is not inspect.Parameter.empty, f"{self.name}: argument {name} not passed"
                value = default
            if param.is_constexpr or value is None:
                constexprs[name] = value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + _TRITON_DTYPES[value.dtype]
                if value.data_ptr() % 16 == 0:
                    aligned.append(name)
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int):
                if value == 1 and not getattr(param, "do_not_specialize", False):
                    constexprs[name] = 1
                    continue
                signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
                if value % 16 == 0:
                    aligned.append(name)
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise AssertionError(f"{self.name}: cannot type argument {name}={value!r}")
        return signature, constexprs, options, aligned

    def compile_for_sm90(self):
        signature, constexprs, options, aligned = self.source()
        return compile_for_sm90(self.fn, signature, constexprs, options=options or None, aligned=aligned)

    def __repr__(self) -> str:
        consts = {k: v for k, v in self.kwargs.items() if not isinstance(v, torch.Tensor)}
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in consts.items())})"


@contextlib.contextmanager
def recorded_triton_launches():
    """Inside the context, Triton kernels are not run: each launch (`kernel[grid](...)`) is appended to the
    yielded list as a TritonLaunch, and an autotuned kernel's launch once per config (the configs it would
    try on a GPU). Launchers can then be driven with CPU tensors on a machine without a GPU; their outputs
    are left uninitialized."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    launches: list[TritonLaunch] = []

    def run_jit(self, *args, grid, warmup, **kwargs):
        launches.append(TritonLaunch(self, args, kwargs, grid))

    def run_autotuned(self, *args, **kwargs):
        kwargs.pop("grid", None)
        kwargs.pop("warmup", None)
        for cfg in self.configs:
            options = {k: getattr(cfg, k, None) for k in _LAUNCH_OPTIONS}
            launches.append(TritonLaunch(self.fn, args, {**kwargs, **cfg.kwargs, **options}))

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = run_jit, run_autotuned
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = saved


def sm90_resource_usage(compiled) -> tuple[str, str]:
    """(cuobjdump --dump-resource-usage, cuobjdump -sass) of a kernel compiled for sm_90, read with the
    cuobjdump that ships with Triton (or the one on PATH)."""
    import shutil
    import subprocess
    import tempfile

    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        cuobjdump = shutil.which("cuobjdump")
    if cuobjdump is None:
        pytest.skip("no cuobjdump (neither shipped with Triton nor on PATH)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return usage, sass


def narrow_global_loads(sass: str) -> int:
    """Global loads of 32 bits or less (LDG / LDGSTS without a .64 / .128 width) in a SASS listing."""
    import re

    return len(re.findall(r"\b(?:LDG|LDGSTS)\.E(?:\.U8|\.U16|\.S8|\.S16)?(?:\.\w+)?\s", sass)) - \
        len(re.findall(r"\b(?:LDG|LDGSTS)\.E(?:\.\w+)*\.(?:64|128)\s", sass))


def spill_instructions(sass: str) -> list[str]:
    """The local-memory loads/stores (LDL / STL) in a kernel's SASS: register spills. A stack frame alone is
    not one: Triton 3.6 calls the IEEE-division slow path as a subroutine, which reserves 16 B of stack
    (STACK:16 in the resource usage) without any local-memory traffic."""
    import re

    return [line.strip() for line in sass.splitlines() if re.search(r"\b(LDL|STL)(\.[\w]+)*\b", line)]
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


# PEFT 0.21.2's prompt-learning `generate` looks up its KV cache as model_kwargs["past_key_values"]; transformers
# 5.24 renamed that argument to `cache`, so from 5.24 on PEFT's generate no longer follows PEFT's own forward
# (a prefix is dropped after the first step, prompt tuning re-inserts its virtual tokens at every step). What
# PEFT's generate computes where it works (5.17 .. 5.23) is PEFT's forward, one greedy token at a time: that
# is the oracle in every lane, and on releases before 5.24 PEFT's generate must equal it as well.
def _transformers_version():
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__)


def peft_generate_reads_its_cache() -> bool:
    from packaging.version import Version

    return _transformers_version() < Version("5.24")


def greedy_by_forward(model, ids, steps: int):
    """Causal LM: append the argmax of a full recompute of `model`'s forward, `steps` times."""
    seq = ids
    for _ in range(steps):
        with torch.no_grad():
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


def seq2seq_greedy_by_forward(model, generation_config, ids, mask, steps: int):
    """Encoder-decoder: greedy decoding by full recomputes of `model`'s forward, stopping rows at EOS (padded
    afterwards) and the whole batch when every row has stopped, as `generate(do_sample=False)` does."""
    eos = generation_config.eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos))
    dec = torch.full((ids.shape[0], 1), generation_config.decoder_start_token_id)
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, generation_config.pad_token_id), nxt)
        dec = torch.cat([dec, nxt[:, None]], 1)
        done |= torch.isin(nxt, eos)
        if bool(done.all()):
            break
    return dec


def assert_generate_matches_peft(ours, peft_model, ids, steps: int, mask=None) -> None:
    """`ours` (qpeft's generate output) equals PEFT's forward decoded greedily token by token, and PEFT's own
    generate where it still reads its cache (see peft_generate_reads_its_cache)."""
    base = peft_model.get_base_model()
    if base.config.is_encoder_decoder:
        expected = seq2seq_greedy_by_forward(peft_model, base.generation_config, ids, mask, steps)
    else:
        expected = greedy_by_forward(peft_model, ids, steps)
    assert torch.equal(ours, expected)
    if peft_generate_reads_its_cache():
        kw = {} if mask is None else {"attention_mask": mask}
        assert torch.equal(peft_model.generate(input_ids=ids, max_new_tokens=steps, do_sample=False, **kw), ours)


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


# the six families of qpeft.fuse as tiny random CausalLMs: {family: (config class, model class, extra config)}
_SLIDING = dict(sliding_window=5, layer_types=["sliding_attention", "full_attention"])
TINY_CAUSAL_LMS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, **_SLIDING)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, use_sliding_window=True, **_SLIDING)),
    # softcaps small enough to matter at this init (logits of magnitude ~1)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, query_pre_attn_scalar=16,
                                                         attn_logit_softcapping=1.0, final_logit_softcapping=0.5,
                                                         **_SLIDING)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, query_pre_attn_scalar=16,
                                                             final_logit_softcapping=0.5, **_SLIDING)),
}


def tiny_causal_lm(family: str = "llama", seed: int = 0, attn_implementation: str = "eager", vocab_size: int = 100,
                   **overrides):
    """A tiny random CausalLM of one of qpeft.fuse's families (hidden 64, 2 layers, 4 heads / 2 KV heads, vocab
    100, a sliding window of 5 where the family has one), fp32, eval mode. The RMSNorm weights are perturbed
    (not all ones / zeros) so that their gradients and the norm form matter."""
    import transformers

    cfg_name, model_name, extra = TINY_CAUSAL_LMS[family]
    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.1,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation=attn_implementation)
    cfg = getattr(transformers, cfg_name)(**{**kw, **extra, **overrides})
    model = getattr(transformers, model_name)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()
