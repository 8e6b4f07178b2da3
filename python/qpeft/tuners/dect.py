"""Decoder tuning, DecT (Cui et al., ACL 2023): train only an output-side decoder on cached model outputs.

The frozen model is queried once per example (`DecT.collect`) for its output hidden state h and its
label-word scores; training (`DecT.fit`) needs only those cached tensors, never the model, as for models
behind an API. Trained: a projection W (hidden -> proto_dim, no bias) and per-class radii r_k; the class
prototypes c_k are xavier-uniform and frozen. Score (DecT's `dect_verbalizer.py`):

    s_k = -|| normalize(W h) - c_k ||_2 + lambda * logit_k + r_k

r_k starts at the mean distance of class k's projected training examples from their centroid; training is
full-batch Adam on softmax cross-entropy (paper defaults: proto_dim 128, lr 0.01, 30 epochs, lambda 1).

Where the label-word logits come from (`collect`):
- masked LM (`*ForMaskedLM`): logits at the template's [MASK]; hidden = last hidden state there;
- causal LM (`generate`-capable): logits and hidden state at the last real token;
- encoder without an LM head (e.g. a sentence-transformers BertModel): no vocabulary logits exist, so the
  label-word score is the cosine similarity of the mean-pooled input with the mean-pooled label word (the
  zero-shot similarity such encoders are trained for); hidden = the mean-pooled input.
A label word of several tokens scores by its best token (max), as in DecT; with `calibrate=True` the scores
of a content-free input ("N/A" in the template) are subtracted, as in DecT's calibration.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._prompt_common import check_finite, check_positive_int, is_causal_lm

__all__ = ["DecT"]


class DecT(nn.Module):
    """hidden (N, hidden_size) and label_logits (N, num_labels) -> scores (N, num_labels)."""

    def __init__(self, hidden_size: int, num_labels: int, proto_dim: int = 128, logits_weight: float = 1.0):
        super().__init__()
        check_positive_int("hidden_size", hidden_size)
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"num_labels must be an int >= 2, got {num_labels!r}")
        check_positive_int("proto_dim", proto_dim)
        self.hidden_size, self.num_labels, self.logits_weight = hidden_size, num_labels, float(logits_weight)
        self.proj = nn.Linear(hidden_size, proto_dim, bias=False)
        self.register_buffer("prototypes", nn.init.xavier_uniform_(torch.empty(num_labels, proto_dim)))
        self.radius = nn.Parameter(torch.zeros(num_labels))

    def _check(self, hidden: torch.Tensor, label_logits: torch.Tensor) -> None:
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise ValueError(f"hidden must have shape (N, {self.hidden_size}), got {tuple(hidden.shape)}")
        if label_logits.shape != (hidden.shape[0], self.num_labels):
            raise ValueError(f"label_logits must have shape ({hidden.shape[0]}, {self.num_labels}), got "
                             f"{tuple(label_logits.shape)}")

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(hidden.to(self.proj.weight.dtype)), dim=-1)

    def forward(self, hidden: torch.Tensor, label_logits: torch.Tensor) -> torch.Tensor:
        self._check(hidden, label_logits)
        z = self.project(hidden)
        dist = (z.unsqueeze(1) - self.prototypes.unsqueeze(0)).norm(dim=-1)  # (N, K)
        return -dist + self.logits_weight * label_logits.to(dist.dtype) + self.radius

    @torch.no_grad()
    def init_radius(self, hidden: torch.Tensor, labels: torch.Tensor) -> None:
        """r_k = mean || z_i - mean_{j in k} z_j || over class-k examples (0 for a class with no example)."""
        z = self.project(hidden)
        onehot = F.one_hot(labels, self.num_labels).to(z.dtype)  # (N, K)
        counts = onehot.sum(0)
        centroids = onehot.t() @ z / counts.clamp_min(1).unsqueeze(1)
        dist = (z - centroids[labels]).norm(dim=-1)
        self.radius.copy_(onehot.t() @ dist / counts.clamp_min(1))

    def fit(self, hidden: torch.Tensor, label_logits: torch.Tensor, labels: torch.Tensor, epochs: int = 30,
            lr: float = 0.01) -> list[float]:
        """Full-batch Adam on cross-entropy (DecT's defaults); returns the loss per epoch."""
        self._check(hidden, label_logits)
        if labels.shape != (hidden.shape[0],) or labels.dtype != torch.long:
            raise ValueError(f"labels must be int64 of shape ({hidden.shape[0]},), got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        if bool(((labels < 0) | (labels >= self.num_labels)).any()):
            raise ValueError(f"labels must lie in [0, {self.num_labels})")
        check_finite("hidden", hidden)
        check_finite("label_logits", label_logits)
        check_positive_int("epochs", epochs)
        self.init_radius(hidden, labels)
        opt = torch.optim.Adam([self.proj.weight, self.radius], lr=lr)
        losses = []
        for _ in range(epochs):
            loss = F.cross_entropy(self(hidden, label_logits), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses

    @torch.no_grad()
    def predict(self, hidden: torch.Tensor, label_logits: torch.Tensor) -> torch.Tensor:
        return self(hidden, label_logits).argmax(-1)

    # ------------------------------------------------------------------------------------------- model queries
    @staticmethod
    @torch.no_grad()
    def collect(model: nn.Module, tokenizer, texts: list[str], label_words: list[str], template: str = "{}",
                batch_size: int = 32, max_length: int = 128, calibrate: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Query the frozen `model` once per text: returns (hidden (N, H) fp32, label_logits (N, K) fp32) on CPU.

        template: format string with one "{}" for the text; for a masked LM it must contain the tokenizer's
        mask token (the label words are scored there). label_words: one word per class.
        """
        if not texts:
            raise ValueError("texts must be a non-empty list of str")
        if len(label_words) < 2:
            raise ValueError(f"label_words needs one word per class (>= 2), got {label_words!r}")
        if "{}" not in template:
            raise ValueError(f"template must contain '{{}}' for the text, got {template!r}")
        kind = _model_kind(model)
        if kind == "mlm":
            mask_token = getattr(tokenizer, "mask_token", None)
            if mask_token is None or mask_token not in template:
                raise ValueError(f"template must contain the mask token {mask_token!r} for a masked LM, "
                                 f"got {template!r}")
        was_training = model.training
        model.eval()
        try:
            hidden, scores = _query(model, tokenizer, kind, texts, label_words, template, batch_size, max_length)
            if calibrate:
                _, free = _query(model, tokenizer, kind, ["N/A"], label_words, template, 1, max_length)
                scores = scores - free
        finally:
            model.train(was_training)
        return hidden, scores


def _model_kind(model: nn.Module) -> str:
    if type(model).__name__.endswith("ForMaskedLM"):
        return "mlm"
    if is_causal_lm(model):
        return "causal"
    return "encoder"


def _encode(tokenizer, texts, max_length, device):
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


def _word_ids(tokenizer, word: str) -> list[int]:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    if not ids:
        raise ValueError(f"label word {word!r} tokenizes to no tokens")
    return ids


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def _query(model, tokenizer, kind, texts, label_words, template, batch_size, max_length):
    device = next(model.parameters()).device
    hiddens, scores = [], []
    if kind == "encoder":
        words = _encode(tokenizer, list(label_words), max_length, device)
        out = model(**words)
        word_vecs = F.normalize(_mean_pool(out.last_hidden_state, words["attention_mask"]).float(), dim=-1)
    else:
        word_ids = [_word_ids(tokenizer, w) for w in label_words]
    for i in range(0, len(texts), batch_size):
        enc = _encode(tokenizer, [template.format(t) for t in texts[i:i + batch_size]], max_length, device)
        mask = enc["attention_mask"]
        if kind == "encoder":
            h = _mean_pool(model(**enc).last_hidden_state, mask).float()
            s = F.normalize(h, dim=-1) @ word_vecs.t()
        else:
            out = model(**enc, output_hidden_states=True)
            if kind == "mlm":
                pos = (enc["input_ids"] == tokenizer.mask_token_id).float().argmax(1)
            elif getattr(tokenizer, "padding_side", "right") == "left":
                pos = torch.full_like(mask[:, 0], mask.shape[1] - 1)
            else:
                pos = mask.long().sum(1) - 1
            rows = torch.arange(mask.shape[0], device=device)
            h = out.hidden_states[-1][rows, pos].float()
            logits = out.logits[rows, pos].float()
            s = torch.stack([logits[:, ids].max(-1).values for ids in word_ids], dim=-1)
        hiddens.append(h.cpu())
        scores.append(s.cpu())
    return torch.cat(hiddens), torch.cat(scores)
