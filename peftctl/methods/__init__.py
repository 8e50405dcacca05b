"""The registry of PEFT methods: recipe `method.name` → the `Method` that implements it.

Adding a method means adding its file to this folder and its line below; nothing else changes.
"""

from __future__ import annotations

from peftctl.errors import UserError, did_you_mean
from peftctl.methods import bitfit, bottleneck, compacter, ia3, lora, prompt
from peftctl.methods.base import Adapter, Method, MethodConfig

METHODS: dict[str, Method] = {}


def register(method: Method) -> None:
    if method.name in METHODS:
        raise ValueError(f"two PEFT methods are registered as '{method.name}'")
    METHODS[method.name] = method


# A module registers its `METHOD`, or each of its `METHODS_IN_MODULE` when it holds variants of
# one method under separate names (bottleneck: houlsby, pfeiffer; prompt: its three methods).
for _module in (lora, bottleneck, compacter, ia3, bitfit, prompt):
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


def apply(model, cfg: MethodConfig) -> Adapter:
    """Apply the recipe's method to `model` in place; the rest of peftctl only sees the Adapter.

    A method names its own options in its errors (`r`); here they become recipe keys (`method.r`).
    """
    try:
        return get(cfg.name).apply(model, cfg)
    except UserError as err:
        option = (err.where or "").split(".")[0].split(" ")[0]
        if option in type(cfg).model_fields:
            err.where = f"method.{err.where}"
            err._changed()
        raise


__all__ = ["Adapter", "METHODS", "Method", "MethodConfig", "apply", "by_peft_type", "get"]
