"""Which keyword a decoder takes its KV cache under.

transformers up to 5.23 passes the cache as `past_key_values`; from 5.24 on decoders take `cache`,
and the old name only goes through a deprecation shim that drops it whenever `cache` is passed
too, as every `*ForCausalLM.forward` does (with `cache=None` on a plain forward). Code that feeds
or reads a decoder's cache in a forward hook must therefore ask the decoder's signature, and
accept the cache under either name from whoever called it.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

OLD_NAME = "past_key_values"
NEW_NAME = "cache"


def cache_keyword(module: nn.Module) -> str:
    """The name `module.forward` declares for its KV cache (the old one where it declares neither)."""
    # inspect follows functools.wraps, so this sees through transformers' decorators.
    parameters = inspect.signature(module.forward).parameters
    return NEW_NAME if NEW_NAME in parameters else OLD_NAME


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the cache from a call's keyword arguments, whichever name it came under."""
    new, old = kwargs.pop(NEW_NAME, None), kwargs.pop(OLD_NAME, None)
    return new if new is not None else old


def passed_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a call passes, under either name, without removing it."""
    new = kwargs.get(NEW_NAME)
    return new if new is not None else kwargs.get(OLD_NAME)


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module that runs the decoder layers, as the model's own forward calls it: the base
    model (LlamaModel, GPT2Model), or the `decoder` inside it where the head's forward skips the
    base model's (OPTForCausalLM calls `self.model.decoder`): a hook on the base model would miss
    every `model(...)` and `generate` there."""
    base = model.base_model
    inner = getattr(base, "decoder", None)
    if isinstance(inner, nn.Module) and not getattr(model.config, "is_encoder_decoder", False):
        return inner
    return base
