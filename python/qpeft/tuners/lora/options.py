"""Which LoRA options qpeft's LoRA layers implement: one rule for every path that builds or loads a LoRA adapter.

Used by `qpeft.load_adapter` (an adapter_config.json dict) and by PEFT's entry points on qpeft's 4-bit layers
(`get_peft_model`, `add_adapter`, `PeftModel.from_pretrained` / `load_adapter`, `qpeft.peft_from_pretrained`,
`qpeft.lora_config`: a `peft.LoraConfig`, checked in integrations/peft.py). Both ask `unsupported_option`, so an
adapter refused on one path is refused on every path, with the same message.

Imports nothing: qpeft's own load path works without PEFT. PEFT marks its LoRA variants with the dataclass metadata
`is_lora_variant` (DoRA, VeLoRA, aLoRA, MonteCLoRA, BD-LoRA, Arrow, KaSA in PEFT 0.21.2) and treats a variant as on
when its field is truthy (peft/tuners/lora/layer.py, resolve_lora_variant). Without PEFT qpeft knows them from
`LORA_VARIANTS` below (tests/tuners/test_lora_options.py checks it against the installed PEFT); with PEFT loaded, the
variant fields of its LoraConfig are refused too, so a variant added by a newer PEFT is never silently ignored.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

__all__ = ["SUPPORTED_INITS", "UNSUPPORTED", "LORA_VARIANTS", "SUPPORTED_VARIANTS", "LOFTQ_BITS", "init_supported",
           "init_rewrites_base",
           "lora_variant_fields", "unsupported_option", "check_lora_options"]

# init_lora_weights values qpeft's layers implement: the adapter-only inits and PEFT's weight-reading ones on a 4-bit
# base (the base dequantized, PEFT's maths, the rewritten base re-quantized in the layer's own format): PiSSA (and
# its fast SVD "pissa_niter_<n>"), OLoRA, CorDA, LoftQ (NF4: loftq_bits 4), EVA (B = 0 here; A comes from PEFT's
# initialize_lora_eva_weights). Not implemented: "orthogonal", "mica", "lora_ga". A loaded adapter keeps the init
# in its config (PEFT re-runs a base-rewriting init on load).
SUPPORTED_INITS = (True, False, "gaussian", "pissa", "pissa_niter_<n>", "olora", "corda", "loftq", "eva")
LOFTQ_BITS = (4,)  # qpeft's 4-bit formats; PEFT's 8-bit LoftQ (bitsandbytes' int8) has no qpeft layer

# LoraConfig fields that change the layer's maths and that qpeft's LoRA layers do not implement, with their off value.
UNSUPPORTED = {
    "fan_in_fan_out": False,   # qpeft's layers hold W as (out_features, in_features); there is no Conv1D layout
    "use_qalora": False,       # QA-LoRA's pooled input is defined for GPTQ layers only
    "megatron_config": None,
}

# PEFT 0.21.2's LoraConfig fields with metadata is_lora_variant=True, with their default (off) value.
LORA_VARIANTS = {
    "use_dora": False,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "monteclora_config": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
}


# The LoRA variants qpeft's layers implement (DoRA: qpeft.autograd.dora, in LoraLinear and QPeftLoraLinear).
SUPPORTED_VARIANTS = ("use_dora",)


def init_supported(init: Any) -> bool:
    """Whether init_lora_weights=`init` is one of SUPPORTED_INITS ("pissa_niter_<n>": any int n >= 1, as PEFT
    parses it)."""
    if isinstance(init, bool):
        return True
    if not isinstance(init, str):
        return False
    if init.startswith("pissa_niter_"):
        n = init[len("pissa_niter_"):]
        return n.isdigit() and int(n) >= 1
    return init in SUPPORTED_INITS and init != "pissa_niter_<n>"


def init_rewrites_base(init: Any) -> bool:
    """Whether init_lora_weights=`init` rewrites the base weight (PiSSA, OLoRA, CorDA, LoftQ): PEFT re-runs such an
    init on the base when it loads an adapter saved with it, so the adapter's A, B are meant for that rewritten
    base."""
    return isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "corda", "loftq"))


def _peft_lora_config_class():
    """PEFT's LoraConfig class if PEFT is already imported (never imports it)."""
    module = sys.modules.get("peft.tuners.lora.config")
    return getattr(module, "LoraConfig", None)


def lora_variant_fields(config: Any = None) -> list[str]:
    """The LoRA-variant field names: qpeft's list, then any other field the config's dataclass (or, for a dict,
    the loaded PEFT's LoraConfig) marks is_lora_variant."""
    names = list(LORA_VARIANTS)
    cls = type(config) if dataclasses.is_dataclass(config) and not isinstance(config, type) else \
        _peft_lora_config_class()
    if cls is not None and dataclasses.is_dataclass(cls):
        names += [f.name for f in dataclasses.fields(cls) if f.metadata.get("is_lora_variant") and f.name not in names]
    return names


def _get(config: Any, name: str, default: Any) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(value[k]) for k in sorted(value, key=str)}
    return value


def _shown(value: Any) -> str:
    """A value as the message shows it: a sub-config as its dict with sorted keys, so a LoraConfig object and the
    adapter_config.json it was saved to (json.dumps(sort_keys=True)) give the same text."""
    return repr(_plain(value))


def unsupported_option(config: Any) -> str | None:
    """Why qpeft cannot build or load this LoRA adapter (a peft.LoraConfig or an adapter_config.json dict), naming
    the first unsupported option; None when every option is supported."""
    for name, off in UNSUPPORTED.items():
        value = _get(config, name, off)
        if value != off:
            return (f"qpeft: LoraConfig({name}={_shown(value)}) is not supported by qpeft's LoRA layers "
                    f"(supported: {name}={off!r})")
    for name in lora_variant_fields(config):
        if name in SUPPORTED_VARIANTS:
            continue
        value = _get(config, name, None)
        if value:  # PEFT's rule: a variant is on when its field is truthy
            return (f"qpeft: LoraConfig({name}={_shown(value)}) is a LoRA variant that qpeft's LoRA layers do not "
                    f"implement (leave it unset)")
    init = _get(config, "init_lora_weights", True)
    if not init_supported(init):
        return (f"qpeft: LoraConfig(init_lora_weights={_shown(init)}) is not supported by qpeft's LoRA layers; use one "
                f"of {SUPPORTED_INITS}")
    if init == "loftq":
        loftq = _plain(_get(config, "loftq_config", None) or {})
        bits = loftq.get("loftq_bits", 4) if isinstance(loftq, dict) else None
        if bits not in LOFTQ_BITS:
            return (f"qpeft: LoraConfig(loftq_config={_shown(loftq)}) is not supported by qpeft's LoRA layers: LoftQ "
                    f"quantizes to qpeft's NF4, loftq_bits must be one of {LOFTQ_BITS}, got {bits!r}")
    return None


def check_lora_options(config: Any) -> None:
    """Raise ValueError(unsupported_option(config)) when qpeft cannot build or load this LoRA adapter."""
    reason = unsupported_option(config)
    if reason is not None:
        raise ValueError(reason)
