"""Tokenize the task, train the adapters (progress bar with loss and tokens/s), and evaluate by generation."""
from __future__ import annotations

import math
import random
import sys
import time

import torch
import torch.nn.functional as F

from .task import Example, exact_match

__all__ = ["chat_prompt_ids", "build_batch", "answer_loss", "train", "generate_answers", "evaluate"]

IGNORE = -100


# A short system turn: SmolLM2's template otherwise inserts a 15-token default one, and on a 2-core CPU every
# token of the ~45 per example costs training time.
SYSTEM = "Follow the format exactly."


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of `prompt` as a user turn in the model's chat template, ending where the reply starts."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(f"Question: {prompt}\nAnswer: ").input_ids  # base models without a chat template


def build_batch(tokenizer, examples: list[Example], device="cpu") -> dict:
    """Right-padded input_ids / attention_mask / labels; labels are IGNORE except on the answer and the
    end-of-turn token, so the loss teaches the reply (and where it stops), not the prompt."""
    eos = tokenizer.eos_token or ""
    seqs, labels = [], []
    for ex in examples:
        p = chat_prompt_ids(tokenizer, ex.prompt)
        a = tokenizer(ex.answer + eos, add_special_tokens=False).input_ids
        seqs.append(p + a)
        labels.append([IGNORE] * len(p) + a)
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    lab = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)] = torch.tensor(s)
        lab[i, :len(l)] = torch.tensor(l)
        mask[i, :len(s)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": lab.to(device)}


def answer_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross entropy over the labelled (answer) positions only.

    The output head runs only on those positions: with ~10 answer tokens out of ~45 per example this skips
    ~3/4 of the 49152 x 576 lm_head GEMM, a fifth of the 135M model's FLOPs."""
    decoder = getattr(model, "base_model", None) if hasattr(model, "get_output_embeddings") else None
    head = model.get_output_embeddings() if decoder is not None else None
    labels = batch["labels"][:, 1:]
    if decoder is None or head is None or decoder is model:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=IGNORE)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    keep = labels != IGNORE
    logits = head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), labels[keep])


class _Progress:
    """tqdm when installed, else a line every 10% (so the demo never needs it)."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n = total, desc, 0
        try:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, file=sys.stdout)
        except ImportError:
            self.bar = None

    def update(self, **stats) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix(stats, refresh=False)
            self.bar.update(1)
        elif self.n == self.total or self.n % max(1, self.total // 10) == 0:
            print(f"{self.desc} {self.n}/{self.total} " + " ".join(f"{k}={v}" for k, v in stats.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(model, tokenizer, examples: list[Example], steps: int, batch_size: int = 8, lr: float = 1e-3,
          seed: int = 0, device="cpu") -> dict:
    """AdamW on the trainable (adapter) parameters for `steps` steps of `batch_size` examples, linear
    warm-up over the first 10% then cosine decay. Returns {"losses", "seconds", "tokens", "tokens_per_s"}."""
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters (inject adapters first)")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    rng = random.Random(seed)
    order: list[int] = []
    model.train()
    losses, tokens, t0 = [], 0, time.perf_counter()
    bar = _Progress(steps, "QLoRA fine-tune")
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[:batch_size], order[batch_size:]
        batch = build_batch(tokenizer, [examples[i] for i in idx], device)
        loss = answer_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        tokens += int(batch["attention_mask"].sum())
        elapsed = time.perf_counter() - t0
        bar.update(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / elapsed:.0f}")
    bar.close()
    model.eval()
    seconds = time.perf_counter() - t0
    return {"losses": losses, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 16,
                     device="cpu") -> list[str]:
    """Greedy replies to `prompts` (left-padded batches), special tokens removed."""
    pad = tokenizer.pad_token_id
    out: list[str] = []
    for i in range(0, len(prompts), batch_size):
        seqs = [chat_prompt_ids(tokenizer, p) for p in prompts[i:i + batch_size]]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(seqs):
            ids[j, width - len(s):] = torch.tensor(s)
            mask[j, width - len(s):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return out


def evaluate(model, tokenizer, examples: list[Example], device="cpu", batch_size: int = 32) -> tuple[float, list[str]]:
    """(exact-match accuracy, predictions) on `examples`. Replies are cut 2 tokens past the longest expected
    answer (longer ones cannot match anyway): on the CPU path every generated token re-reads all 4-bit
    weights, so generation time is set by the number of tokens, hardly by the batch."""
    longest = max(len(tokenizer(e.answer, add_special_tokens=False).input_ids) for e in examples)
    preds = generate_answers(model, tokenizer, [e.prompt for e in examples], max_new_tokens=longest + 2,
                             device=device, batch_size=batch_size)
    return exact_match(preds, examples), preds
