"""The registry of PEFT methods: recipe `method.name` → the `Method` that implements it.

Adding a method means adding its file to this folder and its name to MODULES; nothing else changes.
A method knows the model only through what `Method.apply` is given (base.py): the model, its
options and `BaseFacts` (quantized or not, the tokenizer).

May import: peftctl.arch, peftctl.core.
"""

from __future__ import annotations

import importlib

from peftctl.arch.tasks import head_modules
from peftctl.core.errors import UserError, did_you_mean
from peftctl.methods.base import Adapter, BaseFacts, Method, MethodConfig, options_named

METHODS: dict[str, Method] = {}


def register(method: Method) -> None:
    if method.name in METHODS:
        raise ValueError(f"two PEFT methods are registered as '{method.name}'")
    METHODS[method.name] = method


# The method modules of this folder, in the order recipes' docs and error messages list them. A
# module registers its `METHOD`, or each of its `METHODS_IN_MODULE` when it holds variants of one
# method under separate names (bottleneck: houlsby, pfeiffer; prompt: its three methods).
MODULES = ("lora", "bottleneck", "compacter", "ia3", "bitfit", "prompt", "adalora", "vera", "oft", "loha", "lokr")
for _module in map(lambda name: importlib.import_module(f"peftctl.methods.{name}"), MODULES):
    for _method in getattr(_module, "METHODS_IN_MODULE", None) or (_module.METHOD,):
        register(_method)


def get(name: str) -> Method:
    if name not in METHODS:
        hint = did_you_mean(name, METHODS)
        raise UserError(
            f"unknown method '{name}'" + (f" ({hint})" if hint else ""),
            where="method.name",
            expected=f"one of: {', '.join(METHODS)}",
        )
    return METHODS[name]


def by_peft_type(peft_type: str, source: str) -> Method:
    """The method that reads an adapter_config.json with this `peft_type`."""
    for method in METHODS.values():
        if method.peft_type == peft_type:
            return method
    raise UserError(
        f"adapter type '{peft_type}' is not supported by peftctl",
        file=source,
        where="peft_type",
        expected=f"one of: {', '.join(m.peft_type for m in METHODS.values())}",
    )


def apply(model, cfg: MethodConfig, base: BaseFacts = BaseFacts()) -> Adapter:
    """Apply the recipe's method to `model` in place; the rest of peftctl only sees the Adapter.
    `base`: what the method may know of the model beyond its modules (model.loading.base_facts).
    The task's head (a classifier's) trains whole beside the method, whichever it is."""
    head = list(base.head) if base.head is not None else head_modules(model, base.task)  # before a method adds modules
    with options_named(cfg):
        adapter = get(cfg.name).apply(model, cfg, base)
    adapter.task = base.task
    adapter.train_whole(head)
    return adapter


__all__ = ["Adapter", "BaseFacts", "METHODS", "Method", "MethodConfig", "apply", "by_peft_type", "get"]
