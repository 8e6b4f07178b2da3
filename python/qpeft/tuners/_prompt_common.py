"""Shared machinery of the prompt-side methods (prompt tuning, P-tuning, prefix tuning, P-tuning v2).

`PromptLearningModel` wraps a frozen Hugging Face model the way PEFT's `PeftModelFor*` does for
prompt-learning methods, so outputs match PEFT exactly:
- "embeddings" adapters (prompt tuning, P-tuning v1) prepend `num_virtual_tokens` vectors to the input
  embeddings, extend the attention mask with ones, pad causal-LM labels with -100 and token_type_ids with 0;
- "prefix" adapters (prefix tuning, P-tuning v2) inject per-layer key/value prefixes through the model's KV
  cache (`transformers.DynamicCache`), so they compose with generation and grouped-query attention, and
  extend the attention mask with ones. Positions start after the prefix, as in PEFT.

Encoder-decoder models (T5, BART: PEFT's SEQ_2_SEQ_LM, `num_transformer_submodules=2`) follow
`PeftModelForSeq2SeqLM`: prefixes go to the decoder's self-attention through an `EncoderDecoderCache` (the
encoder stacks of transformers drop `past_key_values`, and PEFT's cross-attention half is discarded, so the
encoder gets no prefix; prefix tuning's opt-in, non-PEFT `encoder_prefix=True` adds one through attention
pre-hooks, see `_prefix_hooks`); "embeddings" adapters hold 2n virtual tokens of which the first n go before the encoder
input (the decoder is untouched), exactly as PEFT does.

Adapters are `PromptEncoder`s in `model.prompt_encoders[adapter_name]`; the active one is `active_adapter`.
Only adapter parameters (and a P-tuning v2 head) are trainable; the base model is frozen on wrap.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
import torch.nn as nn

from .. import _versions
from .._hf_compat import CACHE_ARGUMENTS, cache_argument, cache_from, cache_given
from ._prefix_hooks import encoder_prefix_hooks
from .adapter_io import AdapterMethod, register_method

EMBEDDINGS = "embeddings"
PREFIX = "prefix"


# ----------------------------------------------------------------------------------------------- validation
def check_num_virtual_tokens(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"num_virtual_tokens must be a positive int, got {n!r}")
    return n


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_dropout(name: str, p) -> float:
    if not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {p!r}")
    return float(p)


def check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")


# ----------------------------------------------------------------------------------------------- model facts
def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def is_causal_lm(model: nn.Module) -> bool:
    """Decoder LM with `generate` (LlamaForCausalLM, ...): labels are token ids to pad with -100."""
    return (not is_encoder_decoder(model) and hasattr(model, "generate")
            and callable(getattr(model, "can_generate", None)) and model.can_generate())


def task_type(model: nn.Module) -> str:
    """PEFT task_type of a wrapped model (decides which PeftModelFor* class PEFT builds on load)."""
    if is_encoder_decoder(model):
        return "SEQ_2_SEQ_LM"
    if is_causal_lm(model):
        return "CAUSAL_LM"
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return "FEATURE_EXTRACTION"


def hidden_size(model: nn.Module) -> int:
    cfg = _text_config(model.config)
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, key, None) is not None:
            return int(getattr(cfg, key))
    raise ValueError(f"cannot find the hidden size of model type {model_type(model)!r}")


def kv_dims(model: nn.Module) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) of the attention KV cache, as PEFT computes them for prefixes
    (grouped-query attention: KV heads, not query heads; `head_dim` from the config when it has one)."""
    cfg = _text_config(model.config)
    layers = (getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "num_layers", None)
              or getattr(cfg, "n_layer", None))
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    if layers is None or heads is None:
        raise ValueError(f"model type {model_type(model)!r}: config has no num_hidden_layers / num_attention_heads")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden_size(model) // heads
    return int(layers), int(kv_heads), int(head_dim)


def num_transformer_submodules(model: nn.Module) -> int:
    """PEFT's count of transformer stacks that get virtual tokens: 2 for encoder-decoder models, else 1."""
    return 2 if is_encoder_decoder(model) else 1


def _check_seq2seq_decoder_dims(model: nn.Module) -> None:
    """PEFT sizes a seq2seq prefix from the *encoder* config fields (num_hidden_layers, num_attention_heads) and
    uses it in the *decoder*; refuse configs where the two stacks differ (PEFT itself fails there with an
    IndexError in the cache) or where the real head width (T5's d_kv) is not hidden / heads."""
    cfg = _text_config(model.config)
    layers, heads, head_dim = kv_dims(model)
    dec_layers = getattr(cfg, "num_decoder_layers", None) or getattr(cfg, "decoder_layers", None) or layers
    dec_heads = getattr(cfg, "decoder_attention_heads", None) or heads
    peft_head_dim = hidden_size(model) // heads  # PEFT: token_dim (d_model) // num_attention_heads
    if (dec_layers, dec_heads, head_dim, heads * head_dim) != (layers, heads, peft_head_dim, hidden_size(model)):
        # Not a bad argument: PEFT's seq2seq prefix layout cannot describe such a model at all.
        raise NotImplementedError(
            f"prefix tuning for encoder-decoder model type {model_type(model)!r} needs the decoder to match the "
            f"prefix size PEFT derives from the config (num_layers={layers}, num_attention_heads={heads}, "
            f"head_dim=hidden/heads={peft_head_dim}); got decoder layers={dec_layers}, decoder heads={dec_heads}, "
            f"attention head_dim={head_dim}")


def check_prefix_support(model: nn.Module) -> None:
    """Prefixes go through the KV cache: the model's forward must take one (`cache` from transformers 5.24,
    `past_key_values` before) and accept a transformers `Cache` there."""
    if is_encoder_decoder(model):
        _check_seq2seq_decoder_dims(model)
    if cache_argument(model.forward) is None:
        raise ValueError(f"model type {model_type(model)!r} cannot take a prefix: its forward takes no KV cache "
                         f"(no argument named {' or '.join(CACHE_ARGUMENTS)}; prefix tuning injects the prefix "
                         "through the KV cache)")
    if getattr(model, "_supports_cache_class", True) is False:
        raise ValueError(f"model type {model_type(model)!r} cannot take a prefix: it does not accept a "
                         "transformers Cache as its KV cache")


def with_cache(model: nn.Module, cache) -> dict:
    """{name: cache} under the name the model's forward (and generate) takes the KV cache by."""
    return {cache_argument(model.forward) or CACHE_ARGUMENTS[-1]: cache}


# ----------------------------------------------------------------------------------------------- adapters
class PromptEncoder(nn.Module):
    """Base of every prompt-side adapter.

    kind: EMBEDDINGS -> `prompt()` returns (num_virtual_tokens, hidden) input embeddings (encoder-decoder
                        models: PEFT's (2 * num_virtual_tokens, hidden), of which the first n are used);
          PREFIX     -> `prompt()` returns (num_virtual_tokens, num_layers * 2 * kv_heads * head_dim), PEFT's
                        flat prefix layout (layer-major, then K/V, then head, then head_dim).
    peft_type: the PEFT method name written to adapter_config.json ("" when PEFT has no such method).
    """

    kind: str = EMBEDDINGS
    peft_type: str = ""

    def __init__(self, num_virtual_tokens: int):
        super().__init__()
        self.num_virtual_tokens = check_num_virtual_tokens(num_virtual_tokens)

    def prompt(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def peft_config(self) -> dict:
        """Method-specific adapter_config.json fields (the wrapper adds the model-derived ones)."""
        return {}

    # Layers whose prefix is real (PREFIX kind only); None = all layers.
    layers: tuple[int, ...] | None = None


class FixedPrompt(PromptEncoder):
    """A prompt loaded from a PEFT file: the saved `prompt_embeddings` (after reparameterization), kept as a
    parameter (trainable, so training can continue), plus the saved config to write back unchanged."""

    def __init__(self, kind: str, peft_type: str, weight: torch.Tensor, config: dict,
                 num_virtual_tokens: int | None = None):
        super().__init__(int(weight.shape[0]) if num_virtual_tokens is None else num_virtual_tokens)
        self.kind, self.peft_type = kind, peft_type
        self.weight = nn.Parameter(weight.clone())
        self._config = {k: v for k, v in config.items()
                        if k not in ("peft_type", "inference_mode", "task_type", "base_model_name_or_path")}

    def prompt(self) -> torch.Tensor:
        return self.weight

    def peft_config(self) -> dict:
        return dict(self._config)

    def extra_repr(self) -> str:
        return f"{self.peft_type}, kind={self.kind}, shape={tuple(self.weight.shape)}"


# ----------------------------------------------------------------------------------------------- wrapper
class PromptLearningModel(nn.Module):
    """A frozen Hugging Face model plus prompt-side adapters (see module docstring).

    forward(...) takes the base model's arguments and returns its output; `generate(...)` prepends the
    prompt/prefix and returns what the base model's generate on input_ids returns (decoders: input_ids + new
    tokens; encoder-decoder models: decoder start token + new tokens).
    """

    def __init__(self, base_model: nn.Module):
        super().__init__()
        _versions.require("transformers")  # caches, generation and outputs follow transformers >= 5.17
        if isinstance(base_model, PromptLearningModel):
            raise ValueError("base_model is already a PromptLearningModel")
        if not hasattr(base_model, "config"):
            raise ValueError(f"base_model must be a Hugging Face PreTrainedModel (with .config), got "
                             f"{type(base_model).__name__}")
        self.base_model = base_model
        for p in base_model.parameters():
            p.requires_grad_(False)
        self.prompt_encoders = nn.ModuleDict()
        self.heads = nn.ModuleDict()  # P-tuning v2 classification heads, per adapter
        self.active_adapter: str | None = None
        self._adapters_disabled = False

    # ---- bookkeeping
    @property
    def config(self):
        return self.base_model.config

    def add_adapter(self, adapter_name: str, encoder: PromptEncoder, head: nn.Module | None = None) -> None:
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name must be a non-empty str, got {adapter_name!r}")
        if adapter_name in self.prompt_encoders:
            raise ValueError(f"adapter_name {adapter_name!r} already exists in this model")
        if "." in adapter_name:
            raise ValueError(f"adapter_name must not contain '.', got {adapter_name!r}")
        self.prompt_encoders[adapter_name] = encoder
        if head is not None:
            self.heads[adapter_name] = head
        self.active_adapter = adapter_name

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.prompt_encoders:
            raise ValueError(f"adapter_name {adapter_name!r} not found; have {list(self.prompt_encoders)}")
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        self.set_adapter(adapter_name)  # validates
        del self.prompt_encoders[adapter_name]
        if adapter_name in self.heads:
            del self.heads[adapter_name]
        self.active_adapter = next(iter(self.prompt_encoders), None)

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Inside the context, forward/generate are exactly the base model's (PEFT's `disable_adapter()`)."""
        prev = self._adapters_disabled
        self._adapters_disabled = True
        try:
            yield
        finally:
            self._adapters_disabled = prev

    disable_adapter = disable_adapters  # PEFT's spelling

    def _active(self) -> PromptEncoder | None:
        if self._adapters_disabled or self.active_adapter is None:
            return None
        return self.prompt_encoders[self.active_adapter]

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def _dtype(self) -> torch.dtype:
        return self.base_model.get_input_embeddings().weight.dtype

    # ---- prompts
    def get_prompt(self, batch_size: int, adapter_name: str | None = None):
        """EMBEDDINGS: (B, n, hidden) in the model dtype; PREFIX: a DynamicCache holding the per-layer prefix."""
        enc = self.prompt_encoders[adapter_name or self.active_adapter]
        prompt = enc.prompt().to(self._dtype())
        if enc.kind == EMBEDDINGS:
            # Seq2seq: PEFT's 2n rows, of which only the first n are used (before the encoder input).
            return prompt[:enc.num_virtual_tokens].unsqueeze(0).expand(batch_size, -1, -1)
        return prefix_cache(self.base_model, prompt, batch_size)

    # ---- forward
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, token_type_ids=None,
                **kwargs):
        enc = self._active()
        if enc is None:
            if labels is not None:
                kwargs["labels"] = labels
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                   **_with_token_types(kwargs, token_type_ids))
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if cache_given(kwargs) is not None:
            raise ValueError(f"{cache_given(kwargs)}: prompt-side adapters build their own cache; pass None "
                             "(use generate() for incremental decoding)")
        ref = input_ids if input_ids is not None else inputs_embeds
        batch = ref.shape[0]
        n = enc.num_virtual_tokens
        if is_encoder_decoder(self.base_model):
            return self._forward_seq2seq(enc, batch, input_ids, attention_mask, inputs_embeds, labels,
                                         _with_token_types(kwargs, token_type_ids))
        input_mask = attention_mask
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
        head = self.heads[self.active_adapter] if self.active_adapter in self.heads else None
        base_labels = None if head is not None else labels
        if enc.kind == EMBEDDINGS:
            if inputs_embeds is None:
                inputs_embeds = self.base_model.get_input_embeddings()(input_ids)
            prompts = self.get_prompt(batch).to(inputs_embeds.dtype)
            inputs_embeds = torch.cat([prompts, inputs_embeds], dim=1)
            if base_labels is not None and is_causal_lm(self.base_model):
                base_labels = torch.cat([base_labels.new_full((batch, n), -100), base_labels], dim=1)
            if token_type_ids is not None:
                token_type_ids = torch.cat([token_type_ids.new_zeros(batch, n), token_type_ids], dim=1)
            call = dict(inputs_embeds=inputs_embeds)
        else:
            call = dict(input_ids=input_ids, inputs_embeds=inputs_embeds,
                        **with_cache(self.base_model, self.get_prompt(batch)))
        if base_labels is not None:
            call["labels"] = base_labels
        if head is not None:
            kwargs["output_hidden_states"] = True
        with _masked_prefix_layers(self.base_model, enc):
            out = self.base_model(attention_mask=attention_mask, **call, **_with_token_types(kwargs, token_type_ids))
        if head is not None:
            return head(out, input_mask, labels, n if enc.kind == EMBEDDINGS else 0)
        return out

    def _forward_seq2seq(self, enc, batch, input_ids, attention_mask, inputs_embeds, labels, kwargs):
        """PeftModelForSeq2SeqLM.forward: prefix -> decoder self-attention cache (decoder_attention_mask gets n
        ones in front; encoder mask and labels unchanged); embeddings -> first n virtual tokens before the
        encoder input (encoder mask extended; decoder, its mask and labels unchanged)."""
        n = enc.num_virtual_tokens
        if labels is not None:
            kwargs["labels"] = labels
        if enc.kind == PREFIX:
            dmask = kwargs.get("decoder_attention_mask")
            if dmask is not None:
                kwargs["decoder_attention_mask"] = torch.cat([dmask.new_ones(dmask.shape[0], n), dmask], dim=1)
            if _encoder_stack(enc) is not None and kwargs.get("encoder_outputs") is not None:
                raise ValueError("encoder_outputs: an adapter with encoder_prefix=True prefixes the encoder's "
                                 "self-attention; pass input_ids or inputs_embeds instead of encoder_outputs")
            with self._encoder_prefix(enc):
                return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                       attention_mask=attention_mask,
                                       **with_cache(self.base_model, self.get_prompt(batch)), **kwargs)
        if kwargs.get("encoder_outputs") is not None:
            raise ValueError("encoder_outputs: a prompt-tuning / P-tuning adapter feeds the encoder; pass input_ids "
                             "or inputs_embeds instead of precomputed encoder_outputs")
        inputs_embeds, attention_mask = self._prepend_prompt(batch, input_ids, inputs_embeds, attention_mask)
        return self.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    @contextlib.contextmanager
    def _encoder_prefix(self, enc: PromptEncoder) -> Iterator[None]:
        """Prefix tuning with encoder_prefix=True: the encoder's self-attention layers get their own prefix
        (computed once here, so one dropout mask per forward) for the duration of the call."""
        stack = _encoder_stack(enc)
        if stack is None:
            yield
            return

        with encoder_prefix_hooks(self.base_model, stack.prompt().to(self._dtype())):
            yield

    def _prepend_prompt(self, batch, input_ids, inputs_embeds, attention_mask):
        if inputs_embeds is None:
            inputs_embeds = self.base_model.get_input_embeddings()(input_ids)
        prompts = self.get_prompt(batch).to(inputs_embeds.dtype)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, prompts.shape[1]), attention_mask], dim=1)
        return torch.cat([prompts, inputs_embeds], dim=1), attention_mask

    def _generate_seq2seq(self, enc, input_ids, attention_mask, kwargs):
        """PeftModelForSeq2SeqLM.generate. Prefix: the decoder starts from the prefix cache (the same cache PEFT
        swaps in at the prefill step); embeddings: the encoder input gets the first n virtual tokens. Returns the
        decoder sequences (decoder start token + new tokens), as the base model's generate does."""
        if input_ids is None:
            raise ValueError("generate: input_ids is required with a prompt adapter")
        if cache_given(kwargs) is not None or any(kwargs.get(k) is not None
                                                  for k in ("inputs_embeds", "encoder_outputs")):
            raise ValueError("generate: a KV cache (cache / past_key_values), inputs_embeds or encoder_outputs "
                             "cannot be combined with a prompt adapter")
        batch = input_ids.shape[0]
        if enc.kind == PREFIX:
            with self._encoder_prefix(enc):
                return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                                **with_cache(self.base_model, self.get_prompt(batch)), **kwargs)
        embeds, mask = self._prepend_prompt(batch, input_ids, None, attention_mask)
        return self.base_model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)

    # ---- generation
    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        enc = self._active()
        if is_encoder_decoder(self.base_model):
            if enc is None:
                return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            return self._generate_seq2seq(enc, input_ids, attention_mask, kwargs)
        if not is_causal_lm(self.base_model):
            raise ValueError(f"generate: model type {model_type(self.base_model)!r} ({type(self.base_model).__name__}) "
                             "is not a generative decoder")
        enc = self._active()
        if enc is None:
            return self.base_model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if input_ids is None:
            raise ValueError("generate: input_ids is required with a prompt adapter")
        if cache_given(kwargs) is not None or kwargs.get("inputs_embeds") is not None:
            raise ValueError("generate: a KV cache (cache / past_key_values) or inputs_embeds cannot be combined "
                             "with a prompt adapter")
        batch, n = input_ids.shape[0], enc.num_virtual_tokens
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
        with _masked_prefix_layers(self.base_model, enc):
            if enc.kind == PREFIX:
                # The attention mask is longer than input_ids by the prefix, so generate treats input_ids as the
                # uncached tokens (transformers' _prefill) and appends to our prefix cache.
                return self.base_model.generate(input_ids=input_ids, attention_mask=mask,
                                                **with_cache(self.base_model, self.get_prompt(batch)), **kwargs)
            embeds = self.base_model.get_input_embeddings()(input_ids)
            embeds = torch.cat([self.get_prompt(batch).to(embeds.dtype), embeds], dim=1)
            new_tokens = self.base_model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        # generate() on inputs_embeds returns only the new tokens; return the prompt ids too, like on input_ids.
        return torch.cat([input_ids, new_tokens], dim=1)

    def extra_repr(self) -> str:
        return f"active_adapter={self.active_adapter!r}, disabled={self._adapters_disabled}"


def _encoder_stack(enc: PromptEncoder):
    """The encoder-stack prefix of a prefix-tuning adapter made with encoder_prefix=True, else None."""
    return getattr(enc, "encoder_stack", None)


def _with_token_types(kwargs: dict, token_type_ids) -> dict:
    if token_type_ids is not None:
        kwargs = {**kwargs, "token_type_ids": token_type_ids}
    return kwargs


# ----------------------------------------------------------------------------------------------- prefix cache
def prefix_cache(model: nn.Module, flat: torch.Tensor, batch_size: int):
    """PEFT's prefix layout -> DynamicCache. flat: (n, L * 2 * kv_heads * head_dim) -> per layer
    K, V of shape (B, kv_heads, n, head_dim) (view [B, n, 2L, kvh, hd] -> permute [2L, B, kvh, n, hd]).

    Encoder-decoder models: an EncoderDecoderCache built as PEFT's get_prompt builds it, so a PEFT file gives the
    same outputs: PEFT doubles the 2L entries (cat along the layer axis, 4L entries), splits them in groups of 4
    read as (self K, self V, cross K, cross V) per decoder layer and then replaces the cross-attention half by an
    empty cache (it is recomputed from the encoder output). Decoder layer j therefore gets entries
    (4j mod 2L, 4j+1 mod 2L): with L=2, both decoder layers get the layer-0 K/V slice of the prompt."""
    from transformers import DynamicCache

    layers, kv_heads, head_dim = kv_dims(model)
    n = flat.shape[0]
    kv = flat.unsqueeze(0).expand(batch_size, -1, -1).reshape(batch_size, n, 2 * layers, kv_heads, head_dim)
    kv = kv.permute(2, 0, 3, 1, 4)
    if not is_encoder_decoder(model):
        return DynamicCache([(kv[2 * i], kv[2 * i + 1]) for i in range(layers)])
    from transformers import EncoderDecoderCache

    entries = 2 * layers
    self_attention = DynamicCache([(kv[(4 * j) % entries], kv[(4 * j + 1) % entries]) for j in range(layers)])
    cache = EncoderDecoderCache(self_attention, DynamicCache())
    for j in range(layers):  # cross-attention K/V not computed yet: the decoder must fill them from the encoder
        cache.is_updated[j] = False
    return cache


def _attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """layer index -> innermost module with a `layer_idx` attribute (the one that calls cache.update)."""
    found: dict[int, nn.Module] = {}
    for m in model.modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int) and "attention" in type(m).__name__.lower():
            found[idx] = m  # modules() is pre-order: a nested attention module overwrites its parent
    return found


@contextlib.contextmanager
def _masked_prefix_layers(model: nn.Module, enc: PromptEncoder) -> Iterator[None]:
    """P-tuning v2 with a subset of layers: the cache keeps a prefix slot in every layer (so all layers see
    the same past length and mask), and in the layers without a prompt the prefix columns of the attention
    mask are switched off (bool False / dtype min), so those layers attend exactly as without a prefix."""
    if enc.kind != PREFIX or enc.layers is None:
        yield
        return
    n = enc.num_virtual_tokens
    modules = _attention_modules(model)
    unselected = [i for i in range(kv_dims(model)[0]) if i not in set(enc.layers)]
    missing = [i for i in unselected if i not in modules]
    if missing:
        raise ValueError(f"model type {model_type(model)!r}: cannot find the attention modules of layers {missing} "
                         "to restrict P-tuning v2 prompts to `layers`")
    handles = [modules[i].register_forward_pre_hook(_mask_prefix_hook(n, modules[i]), with_kwargs=True)
               for i in unselected]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _mask_prefix_hook(n: int, module: nn.Module):
    names = list(inspect.signature(module.forward).parameters)
    pos = names.index("attention_mask") if "attention_mask" in names else None

    def hook(mod, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if "attention_mask" in kwargs or pos is None or pos >= len(args):
            mask = kwargs.get("attention_mask")
            set_mask = lambda m: kwargs.__setitem__("attention_mask", m)  # noqa: E731
        else:
            mask = args[pos]
            set_mask = None
        q = hidden.shape[1]
        cache = cache_from(kwargs)
        if cache is not None and hasattr(cache, "self_attention_cache"):
            cache = cache.self_attention_cache
        past = cache.get_seq_length(mod.layer_idx) if cache is not None else n
        if mask is None:  # "attend to everything": only q == 1 decode steps or bidirectional masks get here
            mask = torch.ones(hidden.shape[0], 1, q, past + q, dtype=torch.bool, device=hidden.device)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            raise ValueError("P-tuning v2 `layers`: needs a 4-D attention mask tensor (eager/sdpa attention); "
                             f"got {type(mask).__name__}")
        mask = mask.clone()
        if mask.dtype == torch.bool:
            mask[..., :n] = False
        else:
            mask[..., :n] = torch.finfo(mask.dtype).min
        if set_mask is not None:
            set_mask(mask)
            return args, kwargs
        args = (*args[:pos], mask, *args[pos + 1:])
        return args, kwargs

    return hook


# ----------------------------------------------------------------------------------------------- entry helpers
def base_of(model: nn.Module, seq2seq: bool = False) -> nn.Module:
    """The Hugging Face model under a wrapper (or the model itself), checked to be one. seq2seq: whether the
    calling method supports encoder-decoder models (prefix tuning, prompt tuning, P-tuning do; P-tuning v2 not)."""
    base = model.base_model if isinstance(model, PromptLearningModel) else model
    if not hasattr(base, "config") or not hasattr(base, "get_input_embeddings"):
        raise ValueError(f"model must be a Hugging Face PreTrainedModel, got {type(base).__name__}")
    if is_encoder_decoder(base) and not seq2seq:
        raise NotImplementedError(
            f"this prompt-side method (P-tuning v2 / layer subsets) does not support encoder-decoder model type "
            f"{model_type(base)!r}; prefix tuning, prompt tuning and P-tuning do")
    return base


def wrap(model: nn.Module) -> PromptLearningModel:
    """The model itself when already wrapped, else a new PromptLearningModel around it (freezing it)."""
    return model if isinstance(model, PromptLearningModel) else PromptLearningModel(model)


def check_new_adapter(model: nn.Module, adapter_name: str) -> None:
    if isinstance(model, PromptLearningModel) and adapter_name in model.prompt_encoders:
        raise ValueError(f"adapter_name {adapter_name!r} already exists in this model")


def peft_config(model: PromptLearningModel, adapter_name: str) -> dict:
    """adapter_config.json for a PEFT prompt-learning adapter (PromptLearningConfig fields)."""
    enc = model.prompt_encoders[adapter_name]
    base = model.base_model
    if enc.kind == PREFIX:
        layers, kv_heads, head_dim = kv_dims(base)
        token_dim, heads = kv_heads * head_dim, kv_heads
    else:
        layers = kv_dims(base)[0]
        token_dim, heads = hidden_size(base), getattr(_text_config(base.config), "num_attention_heads", None)
    cfg = {
        "peft_type": enc.peft_type,
        "task_type": task_type(base),
        "base_model_name_or_path": getattr(base.config, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": enc.num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": num_transformer_submodules(base),
        "num_attention_heads": heads,
        "num_layers": layers,
        "modules_to_save": None,
        "auto_mapping": None,
    }
    cfg.update(enc.peft_config())
    return cfg


def register_prompt_method(peft_type: str, kind: str) -> None:
    """Register `peft_type` with qpeft.tuners.adapter_io: saves `prompt_embeddings` = the adapter's prompt after
    reparameterization ((n, hidden) or (n, L*2*kv_dim)), loads it into a `FixedPrompt`."""
    def names(model):
        if not isinstance(model, PromptLearningModel):
            return []
        return [k for k, e in model.prompt_encoders.items() if e.peft_type == peft_type]

    def state_dict(model, adapter_name):
        enc = model.prompt_encoders[adapter_name]
        with torch.no_grad():
            was_training = enc.training
            enc.eval()  # no prefix dropout in the saved values
            emb = enc.prompt().detach().float().cpu()
            enc.train(was_training)
        return {"prompt_embeddings": emb}

    def load(model, config, tensors, adapter_name):
        load_prompt_state(model, config, tensors, adapter_name, peft_type, kind)

    register_method(AdapterMethod(peft_type=peft_type, adapter_names=names,
                                  config=peft_config, state_dict=state_dict, load=load))


def load_prompt_state(model, config: dict, tensors: dict, adapter_name: str, peft_type: str, kind: str) -> None:
    """Validate a PEFT prompt-learning file against `model`, then (only then) add it as `adapter_name`."""
    if not isinstance(model, PromptLearningModel):
        raise ValueError(f"load_adapter: {peft_type} adapters need a prompt-learning wrapper; pass "
                         "qpeft.PromptLearningModel(model) or use qpeft.load_prompt_adapter(model, path)")
    if adapter_name in model.prompt_encoders:
        raise ValueError(f"load_adapter: adapter_name {adapter_name!r} already exists in this model")
    if set(tensors) != {"prompt_embeddings"}:
        raise ValueError(f"load_adapter: a {peft_type} file must hold exactly 'prompt_embeddings', "
                         f"got keys {sorted(tensors)}")
    emb = tensors["prompt_embeddings"]
    n = config.get("num_virtual_tokens")
    check_num_virtual_tokens(n)
    base = model.base_model
    subs = config.get("num_transformer_submodules") or 1
    if subs != num_transformer_submodules(base):
        raise ValueError(f"load_adapter: config num_transformer_submodules={subs}, but the model needs "
                         f"{num_transformer_submodules(base)} (2 for encoder-decoder models, else 1)")
    if kind == PREFIX:
        check_prefix_support(base)
        layers, kv_heads, head_dim = kv_dims(base)
        expected = (n, layers * 2 * kv_heads * head_dim)
        if config.get("num_layers") not in (None, layers) or config.get("token_dim") not in (None, kv_heads * head_dim):
            raise ValueError(f"load_adapter: config num_layers={config.get('num_layers')}, token_dim="
                             f"{config.get('token_dim')} do not match the model (num_layers={layers}, "
                             f"kv token_dim={kv_heads * head_dim})")
    else:
        expected = (n * subs, hidden_size(base))  # seq2seq: PEFT keeps 2n virtual tokens (first n used)
        if config.get("token_dim") not in (None, hidden_size(base)):
            raise ValueError(f"load_adapter: config token_dim={config.get('token_dim')} != model hidden size "
                             f"{hidden_size(base)}")
    if tuple(emb.shape) != expected:
        raise ValueError(f"load_adapter: prompt_embeddings has shape {tuple(emb.shape)}, expected {expected} "
                         f"for this model")
    check_finite("load_adapter: prompt_embeddings", emb)
    device = base.get_input_embeddings().weight.device
    enc = FixedPrompt(kind, peft_type, emb.to(device=device, dtype=torch.float32), config, n)
    model.add_adapter(adapter_name, enc)
