"""The fused CausalLM forward: with labels, the loss through qpeft.linear_cross_entropy from the last hidden states,
and no logits (the [tokens, vocab] logits are never made: Llama-3-8B at 8k tokens, 4.2 GB in fp32 plus as much
again for their gradient); without labels, the class's own forward, unchanged (generation, evaluation, a loss the
caller computes from the logits: the Trainer's label smoothing or compute_loss_func call the model without labels).

The loss is transformers' ForCausalLMLoss exactly: labels shifted left by one (padded with ignore_index) unless
`shift_labels` is given, ignore_index (default -100), the mean over the non-ignored tokens, or the sum divided by
`num_items_in_batch` when the Trainer passes it (gradient accumulation), in fp32; the family's final-logit softcap
(Gemma 2) applied inside the kernel. The base model is called with every other argument exactly as the family's
forward calls it, except that with labels `use_cache` defaults to False: a KV cache has no use in a loss, costs
memory, and turns off transformers' detection of packed sequences (position_ids restarting at 0 without an
attention mask), which then attend across sequence boundaries.

Runs the class's own forward instead, with one FusedFallbackWarning naming the reason: a custom loss (the model's
loss_function set, or a loss_type other than ForCausalLM), logits_to_keep != 0, return_dict=False, or an output
head the kernel does not take (PEFT LoRA on lm_head, forward hooks on it, another module type).
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn as nn

from ...autograd.linear_cross_entropy import linear_cross_entropy
from ...modules.qlinear_nf4 import QLinearNF4
from .layers import STATE_ATTR
from .projections import hook_refusal

__all__ = ["fused_causal_lm_forward", "causal_lm_loss", "output_head"]


def _active_modules_to_save(wrapper: nn.Module) -> nn.Module:
    """The module PEFT's ModulesToSaveWrapper runs (peft/utils/other.py, AuxiliaryTrainingWrapper.forward)."""
    active = list(wrapper.active_adapters)
    if wrapper.disable_adapters or not active or any(a not in wrapper._adapters for a in active):
        return wrapper.original_module
    return wrapper.modules_to_save[active[0]]


def output_head(lm_head: nn.Module):
    """(linear_weight, linear_bias) for linear_cross_entropy from the model's output head, or the reason it cannot
    be given to the kernel."""
    refusal = hook_refusal(lm_head)
    if refusal:
        return refusal
    if hasattr(lm_head, "original_module") and hasattr(lm_head, "modules_to_save"):  # PEFT modules_to_save
        lm_head = _active_modules_to_save(lm_head)
        refusal = hook_refusal(lm_head)
        if refusal:
            return refusal
    if isinstance(lm_head, QLinearNF4):
        return lm_head, None  # its own bias and compute dtype
    if type(lm_head).__module__.startswith("bitsandbytes") and getattr(lm_head.weight, "quant_state", None):
        return (lm_head.weight, lm_head.weight.quant_state), lm_head.bias
    if type(lm_head) is nn.Linear:
        return lm_head.weight, lm_head.bias
    return f"the output head is a {type(lm_head).__module__}.{type(lm_head).__name__} (linear_cross_entropy takes " \
           f"nn.Linear, QLinearNF4 or bitsandbytes Linear4bit heads)"


def causal_lm_loss(hidden_states: torch.Tensor, weight, bias, labels: torch.Tensor | None, *,
                   shift_labels: torch.Tensor | None = None, ignore_index: int = -100,
                   num_items_in_batch=None, softcap: float | None = None) -> torch.Tensor:
    """transformers' ForCausalLMLoss of `lm_head(hidden_states)` (softcapped), without the logits."""
    if shift_labels is None:
        labels = labels.to(hidden_states.device)
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden_states.device)
    lead = hidden_states.shape[:-1]
    if shift_labels.shape != lead:
        if shift_labels.numel() != hidden_states[..., 0].numel():
            raise ValueError(f"labels of shape {tuple(shift_labels.shape)} do not match the hidden states "
                             f"{tuple(hidden_states.shape)}")
        shift_labels = shift_labels.reshape(lead)
    return linear_cross_entropy(hidden_states, weight, shift_labels, bias, ignore_index=ignore_index,
                                softcap=softcap, num_items_in_batch=num_items_in_batch)


def _loss_refusal(model: nn.Module, arguments: dict, extra: dict):
    """(weight, bias) of the head when the fused loss computes what the class's forward would, else the reason."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    if model.loss_function is not LOSS_MAPPING["ForCausalLM"]:
        return "a custom loss (loss_function / loss_type is not ForCausalLM)"
    keep = arguments.get("logits_to_keep", 0)
    if not (keep is None or (isinstance(keep, int) and keep == 0)):
        return f"logits_to_keep={keep!r} (logits of some positions only)"
    return_dict = extra.get("return_dict")
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    if return_dict is False:
        return "return_dict=False (callers of the tuple expect logits at index 1)"
    return output_head(model.get_output_embeddings())


def fused_causal_lm_forward(original):
    """The forward of a fused CausalLM class whose own forward is `original` (same signature, for the Trainer's
    column and loss-kwargs checks)."""
    signature = inspect.signature(original)
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        extra = dict(arguments.pop(var_kw, {})) if var_kw else {}
        labels = arguments.pop("labels", None)
        if labels is None:  # the family's forward computes no loss then, whatever else is passed
            return original(self, *args, **kwargs)
        state = self.__dict__[STATE_ATTR]
        head = _loss_refusal(self, arguments, extra)
        if isinstance(head, str):
            state.fallback(f"{type(self).__name__}'s loss", head)
            return original(self, *args, **kwargs)
        weight, bias = head
        arguments.pop(next(iter(signature.parameters)))  # self
        arguments.pop("logits_to_keep", None)
        extra.pop("return_dict", None)
        if arguments.get("use_cache") is None:
            arguments["use_cache"] = False
        outputs = getattr(self, self.base_model_prefix)(**arguments, **extra)
        loss = causal_lm_loss(outputs[0], weight, bias, labels, shift_labels=extra.get("shift_labels"),
                              ignore_index=extra.get("ignore_index", -100),
                              num_items_in_batch=extra.get("num_items_in_batch"),
                              softcap=state.family.final_softcap(self.config))
        return _output(loss, outputs)

    forward._qpeft_fused = True
    return forward


def _output(loss: torch.Tensor, outputs):
    """CausalLMOutputWithPast(loss, logits=None, and the base model's cache / hidden_states / attentions, under this
    transformers release's field names)."""
    import dataclasses

    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = [f.name for f in dataclasses.fields(CausalLMOutputWithPast) if f.name not in ("loss", "logits")]
    return CausalLMOutputWithPast(loss=loss, logits=None, **{f: getattr(outputs, f, None) for f in fields})
