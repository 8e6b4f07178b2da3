"""Module-side PEFT methods for the real-task comparison (examples/compare_methods.py merges `RUNNERS`).

Same task, encoder, pooling, head and training budget as the prompt-side runners (examples/_compare_common.py):
all-MiniLM-L6-v2 (BertModel, hidden 384) -> method -> mean pool over real tokens -> linear head, AdamW at the
shared lr for the shared number of epochs, accuracy on held-out words.

    python examples/compare_methods_module_side.py            # these runners alone
    python examples/compare_methods_module_side.py --quick    # smoke run (small split, 1 epoch)

Runners: bottleneck adapters (Houlsby: attention + FFN, swish; Pfeiffer: FFN only, relu; reduction factor 16),
BitFit (all biases), AdaLoRA (query/value, init_r 12 -> target_r 8 over the run, PEFT's schedule with 10%
warm-up and 20% final phases; the orthogonality term is added to the loss and update_and_allocate runs every
step), UniPELT (LoRA r 8 on query/value + 10-token prefix + adapter, all gated).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _compare_common import (LinearHead, Result, Task, count_trainable, evaluate, load_vader_task,  # noqa: E402
                             mean_pool, train_classifier)

from qpeft.tuners.adalora import add_adalora, adalora_layers, orthogonal_regularization, update_and_allocate  # noqa: E402
from qpeft.tuners.bitfit import apply_bitfit  # noqa: E402
from qpeft.tuners.bottleneck import add_bottleneck_adapters  # noqa: E402
from qpeft.tuners.unipelt import add_unipelt  # noqa: E402

__all__ = ["RUNNERS"]


def _setup(task: Task, add: Callable[[nn.Module], nn.Module]):
    torch.manual_seed(task.seed)
    model = add(task.load_encoder())
    model.eval()  # dropout off, as for every runner
    head = LinearHead(model.config.hidden_size, task.num_labels).to(task.device)

    def logits(batch):
        return head(mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]))

    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    return model, head, logits, params


def _runner(name: str, add: Callable[[nn.Module], nn.Module], notes: str, lr: float | None = None) -> Callable:
    def run(task: Task) -> Result:
        model, head, logits, params = _setup(task, add)
        seconds = train_classifier(task, logits, params, lr=lr)
        return Result(name, evaluate(task, logits), count_trainable(model, head), seconds,
                      notes + (f"; lr {lr:g}" if lr else ""))

    return run


def run_adalora(task: Task) -> Result:
    steps = task.epochs * math.ceil(len(task.train.texts) / task.batch_size)
    tinit, tfinal = max(1, steps // 10), steps // 5
    model, head, logits, params = _setup(task, lambda m: add_adalora(
        m, ["query", "value"], init_r=12, target_r=8, tinit=tinit, tfinal=tfinal, total_step=steps,
        lora_alpha=32))
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=task.lr, weight_decay=0.0)
    step = 0
    t0 = time.perf_counter()
    for _ in range(task.epochs):  # train_classifier has no per-step hook: AdaLoRA needs one after backward
        for batch, labels in task.batches("train", shuffle=True):
            loss = nn.functional.cross_entropy(logits(batch), labels) + orthogonal_regularization(model)
            loss.backward()
            opt.step()
            update_and_allocate(model, step)
            opt.zero_grad(set_to_none=True)
            step += 1
    seconds = time.perf_counter() - t0
    kept = sum(int((m.lora_E != 0).sum()) for m in adalora_layers(model).values())
    return Result("AdaLoRA", evaluate(task, logits), count_trainable(model, head), seconds,
                  f"query/value, r 12->8 (kept {kept} of {12 * len(adalora_layers(model))} triplets), "
                  f"alpha 32, {steps} steps")


RUNNERS: dict[str, Callable[[Task], Result]] = {
    "Houlsby adapter": _runner("Houlsby adapter", lambda m: add_bottleneck_adapters(m, "houlsby"),
                               "attn+FFN, rf 16 (R=24), swish, fused op"),
    "Pfeiffer adapter": _runner("Pfeiffer adapter", lambda m: add_bottleneck_adapters(m, "pfeiffer"),
                                "FFN only, rf 16 (R=24), relu, fused op"),
    "BitFit": _runner("BitFit", lambda m: apply_bitfit(m), "all biases (incl. LayerNorm)"),
    "AdaLoRA": run_adalora,
    "UniPELT": _runner("UniPELT", lambda m: add_unipelt(m),
                       "gated LoRA r8 q/v + prefix 10 + FFN adapter rf 16"),
}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small split, 1 epoch")
    ap.add_argument("--methods", default="", help="comma-separated subset of " + ", ".join(RUNNERS))
    args = ap.parse_args(argv)
    kw = dict(n_train=200, n_test=200, epochs=1) if args.quick else dict(n_train=800, n_test=800, epochs=3)
    task = load_vader_task(device="cuda" if torch.cuda.is_available() else "cpu", **kw)
    names = [m.strip() for m in args.methods.split(",") if m.strip()] or list(RUNNERS)
    rows = []
    for name in names:
        res = RUNNERS[name](task)
        rows.append(res.row())
        print(res.row(), flush=True)
    print("\n| method | accuracy | trainable params | train s | notes |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['accuracy']:.3f} | {r['trainable_params']:,} | {r['train_s']} | {r['notes']} |")
    return rows


if __name__ == "__main__":
    main()
