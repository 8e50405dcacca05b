"""Loading a saved state dict into live tensors, all or nothing.

Shared by adapters (peft's files, ours) and checkpoints; a leaf module, so both can use it.
"""

from __future__ import annotations

import torch

from peftctl.core.errors import UserError


def load_strict(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str, *,
                whose: str = "adapter", headline: str = "adapter weights do not match the model",
                wanted: str = "an adapter trained on this base model with the same method options",
                fix: str = "check the adapter's base model and its adapter_config.json") -> None:
    """Copy `state` into `expected` only if keys and shapes match exactly; else name the first mismatch.

    `whose` names where `state` comes from (an adapter, a checkpoint) in the messages.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        key = missing[0] if missing else unexpected[0]
        kind = f"is missing from the {whose}" if missing else f"is in the {whose} but not in this model"
        raise UserError(f"{headline}: key '{key}' {kind} ({len(missing)} missing, {len(unexpected)} unexpected)",
                        file=source, expected=wanted, fix=fix)
    for key, target in expected.items():
        value = state[key]
        if tuple(value.shape) != tuple(target.shape):
            raise UserError(f"{whose} weight '{key}' has shape {tuple(value.shape)}, "
                            f"the model needs {tuple(target.shape)}", file=source, expected=wanted, fix=fix)
        if target.is_floating_point():
            # Integers would be cast to whole-number weights, NaN would poison every output: both
            # load "fine" and give a useless model, so they are refused here.
            if not value.is_floating_point():
                raise UserError(f"{whose} weight '{key}' is {str(value.dtype).removeprefix('torch.')}, not floating "
                                "point", file=source, expected=wanted, fix=fix)
            if not torch.isfinite(value).all():
                raise UserError(f"{whose} weight '{key}' holds NaN or infinite values", file=source,
                                expected="finite weights", fix="use an adapter saved from a run that did not diverge")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key].to(target.dtype))
