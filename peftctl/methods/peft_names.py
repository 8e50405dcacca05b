"""The module-name lists written into adapter_config.json, as peft will read them back.

peft matches target_modules by whole name or dot-separated suffix, against every module of the
model; a list of last name components ('0', 'c_proj') can select modules that were not adapted
(CTRL's feed-forward `ffn.0` and its decoder layer `h.0`; GPT-2's attention and MLP `c_proj`), which
peft then wraps or refuses. These lists are the shortest suffixes that select exactly the adapted ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


def peft_target_rule(name: str, target: str) -> bool:
    """peft's target_modules match for a list: the whole name or a dot-separated suffix."""
    return name == target or name.endswith("." + target)


def peft_feedforward_rule(name: str, target: str) -> bool:
    """peft's feedforward_modules match: a plain string suffix (so 'proj' would match 'down_proj')."""
    return name.endswith(target)


def peft_names(chosen: set[str], module_names: list[str], targeted: list[str] | None = None) -> list[str]:
    """The shortest name suffixes that select exactly `chosen` when peft reads them.

    As target_modules they must select `chosen` among all modules; with `targeted` given, they
    are feedforward_modules too and must also select exactly `chosen` among the targeted layers
    under peft's plain-suffix rule. One name component is usually enough (down_proj); GPT-2 needs
    two where attention and MLP share a name (mlp.c_proj); the full name always is.
    """
    if not chosen:
        return []

    def selects_exactly(names: list[str], candidates: Iterable[str], rule: Callable[[str, str], bool]) -> bool:
        return {c for c in candidates if any(rule(c, t) for t in names)} == chosen

    for depth in range(1, max(n.count(".") for n in chosen) + 2):
        names = sorted({".".join(n.split(".")[-depth:]) for n in chosen})
        if selects_exactly(names, module_names, peft_target_rule) and (
            targeted is None or selects_exactly(names, targeted, peft_feedforward_rule)
        ):
            return names
    return sorted(chosen)
