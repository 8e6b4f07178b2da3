"""P-tuning v1 (Liu et al., 2021): virtual-token embeddings produced by a trainable prompt encoder
(MLP, or bidirectional LSTM + MLP), prepended at the input layer only.

Module layout and init follow PEFT's `PromptEncoder`: embedding (n, hidden) ->
  "mlp":  Linear(d, h) - ReLU - Linear(h, h) - ReLU - Linear(h, d)
  "lstm": biLSTM(d -> h, num_layers, dropout) - Linear(2h, 2h) - ReLU - Linear(2h, d).
PEFT saves only the encoder output (`prompt_embeddings`, (n, hidden)), so does `save_adapter`; the encoder
itself is dropped in the file (it reloads as a fixed prompt, exactly as in PEFT's inference mode).
Encoder-decoder models (T5, BART): as PEFT, the encoder runs over 2n virtual tokens and the first n outputs go
before the encoder input.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ._prompt_common import (
    EMBEDDINGS,
    PromptEncoder,
    PromptLearningModel,
    check_dropout,
    check_new_adapter,
    check_positive_int,
    hidden_size,
    base_of,
    num_transformer_submodules,
    register_prompt_method,
    wrap,
)

__all__ = ["add_p_tuning", "PTuningEncoder"]


class PTuningEncoder(PromptEncoder):
    kind = EMBEDDINGS
    peft_type = "P_TUNING"

    def __init__(self, num_virtual_tokens: int, hidden: int, encoder: str = "mlp",
                 encoder_hidden_size: int | None = None, encoder_num_layers: int = 2, encoder_dropout: float = 0.0,
                 num_transformer_submodules: int = 1):
        super().__init__(num_virtual_tokens)
        if encoder not in ("mlp", "lstm"):
            raise ValueError(f"encoder must be 'mlp' or 'lstm', got {encoder!r}")
        h = check_positive_int("encoder_hidden_size",
                               encoder_hidden_size if encoder_hidden_size is not None else hidden)
        self.encoder_type, self.encoder_hidden_size = encoder, h
        self.encoder_num_layers = check_positive_int("encoder_num_layers", encoder_num_layers)
        self.encoder_dropout = check_dropout("encoder_dropout", encoder_dropout)
        # Encoder-decoder models: PEFT's total_virtual_tokens = 2n rows go through the encoder (the LSTM sees all
        # 2n), and the first n outputs are used.
        self.embedding = nn.Embedding(num_virtual_tokens * num_transformer_submodules, hidden)
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(hidden, h, num_layers=encoder_num_layers, dropout=self.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, hidden))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(hidden, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                          nn.Linear(h, hidden))

    def prompt(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.encoder_type == "lstm":
            x = self.lstm_head(x.unsqueeze(0))[0][0]  # one sequence of n virtual tokens
        return self.mlp_head(x)

    def peft_config(self) -> dict:
        return {"encoder_reparameterization_type": self.encoder_type.upper(),
                "encoder_hidden_size": self.encoder_hidden_size,
                "encoder_num_layers": self.encoder_num_layers, "encoder_dropout": self.encoder_dropout}


def add_p_tuning(model: nn.Module, num_virtual_tokens: int, encoder: str = "mlp",
                 encoder_hidden_size: int | None = None, encoder_num_layers: int = 2, encoder_dropout: float = 0.0,
                 adapter_name: str = "default") -> PromptLearningModel:
    """Add P-tuning (v1) to a Hugging Face model; returns the wrapper (base frozen).

    encoder: "mlp" (PEFT's default) or "lstm"; encoder_hidden_size defaults to the model's hidden size
    (PEFT's default); encoder_num_layers / encoder_dropout apply to the LSTM only.
    """
    check_new_adapter(model, adapter_name)
    base = base_of(model, seq2seq=True)
    enc = PTuningEncoder(num_virtual_tokens, hidden_size(base), encoder, encoder_hidden_size,
                         encoder_num_layers, encoder_dropout, num_transformer_submodules(base))
    wrapped = wrap(model)
    wrapped.add_adapter(adapter_name, enc.to(wrapped.base_model.get_input_embeddings().weight.device))
    return wrapped


register_prompt_method("P_TUNING", EMBEDDINGS)
