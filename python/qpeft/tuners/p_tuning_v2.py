"""P-tuning v2 (Liu et al., ACL 2022): deep prompts, i.e. a trainable key/value prefix in a selectable set of
layers (all by default, as in the paper), optional MLP reparameterization and prefix dropout, and for
classification a randomly initialized linear head on the first token ([CLS]) instead of a verbalizer
(decoders: the last real token, since a causal first token sees only itself).

Built on prefix tuning's cache injection; layers outside `layers` keep a zero prefix slot that is masked out
of their attention, so they compute exactly what the base model computes. PEFT has no P-tuning v2 type, so
`save_adapter` does not write it (a v2 adapter on all layers without a head *is* PEFT prefix tuning: use
`add_prefix_tuning` when the PEFT file matters).
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from ._prompt_common import (
    PromptLearningModel,
    base_of,
    check_dropout,
    check_new_adapter,
    check_positive_int,
    hidden_size,
    is_causal_lm,
    wrap,
)
from .prefix_tuning import PrefixEncoder, make_prefix_encoder

__all__ = ["add_p_tuning_v2", "PTuningV2Encoder", "PTuningV2Head"]


class PTuningV2Encoder(PrefixEncoder):
    peft_type = ""  # not a PEFT method: never claimed by save_adapter's PREFIX_TUNING entry


class PTuningV2Head(nn.Module):
    """Linear classifier on one token of the last hidden state: "first" ([CLS]) or "last" (last real token,
    from the attention mask, assuming right padding). Returns transformers' SequenceClassifierOutput."""

    def __init__(self, hidden: int, num_labels: int, pool: str = "first", dropout: float = 0.0):
        super().__init__()
        if pool not in ("first", "last"):
            raise ValueError(f"pool must be 'first' or 'last', got {pool!r}")
        self.pool, self.num_labels = pool, num_labels
        self.dropout = nn.Dropout(check_dropout("head_dropout", dropout))
        self.classifier = nn.Linear(hidden, num_labels)

    def forward(self, out, attention_mask, labels, offset: int):
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out.hidden_states[-1]
        if self.pool == "first":
            pooled = hidden[:, offset]
        elif attention_mask is None:
            pooled = hidden[:, -1]
        else:  # index of the last real token, per row (right padding); no host sync
            last = offset + attention_mask.long().sum(1) - 1
            pooled = hidden.gather(1, last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1)
        logits = self.classifier(self.dropout(pooled.to(self.classifier.weight.dtype)))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=getattr(out, "hidden_states", None))


def add_p_tuning_v2(model: nn.Module, num_virtual_tokens: int, layers: Sequence[int] | None = None,
                    projection: bool = False, encoder_hidden_size: int = 512, prefix_dropout: float = 0.0,
                    num_labels: int | None = None, pool: str | None = None, head_dropout: float = 0.0,
                    adapter_name: str = "default") -> PromptLearningModel:
    """Add P-tuning v2 deep prompts; returns the wrapper (base frozen).

    layers: layer indices that get a prompt (None = all). projection / encoder_hidden_size (paper's
    prefix_hidden_size, 512) / prefix_dropout (paper: hidden_dropout_prob, 0.1): as in prefix tuning.
    num_labels: add a trainable linear head; forward then returns SequenceClassifierOutput with logits
    (B, num_labels) and, given `labels` (B,), the cross-entropy loss. pool: "first" (encoders' default) or
    "last" (decoders' default).
    """
    check_new_adapter(model, adapter_name)
    base = base_of(model)
    head = None
    if num_labels is not None:
        check_positive_int("num_labels", num_labels)
        pool = pool or ("last" if is_causal_lm(base) else "first")
        head = PTuningV2Head(hidden_size(base), num_labels, pool, head_dropout)
        head = head.to(base.get_input_embeddings().weight.device)
    elif pool is not None:
        raise ValueError("pool is only used with num_labels (the classification head)")
    enc = make_prefix_encoder(model, num_virtual_tokens, projection, encoder_hidden_size, prefix_dropout, layers,
                              cls=PTuningV2Encoder)
    wrapped = wrap(model)
    wrapped.add_adapter(adapter_name, enc, head)
    return wrapped
