"""AdamW over an adapter's trainable parameters and its learning-rate schedule, as the loop uses them."""

from __future__ import annotations

import math
from typing import Any

import torch

from peftctl.methods import Adapter
from peftctl.recipe.schema import TrainSpec


def setup_optimizer(adapter: Adapter, spec: TrainSpec, total_steps: int) -> tuple[torch.optim.AdamW, Any, Any]:
    """AdamW over the trainable parameters, one group per learning-rate multiplier, and its schedule."""
    schedule = lr_schedule(spec, total_steps)
    optimizer = torch.optim.AdamW(param_groups(adapter, spec.lr), lr=spec.lr, weight_decay=spec.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), schedule


def param_groups(adapter: Adapter, lr: float) -> list[dict[str, Any]]:
    """AdamW's parameter groups: one per learning-rate multiplier the method asks for (usually one)."""
    scales = adapter.lr_scales()
    by_scale: dict[float, list[str]] = {}
    for name in adapter.params:
        by_scale.setdefault(float(scales.get(name, 1.0)), []).append(name)
    return [{"params": [adapter.params[n] for n in names], "names": names, "lr": lr * scale, "lr_scale": scale}
            for scale, names in by_scale.items()]


def lr_schedule(spec: TrainSpec, total_steps: int):
    """Multiplier of the peak lr at each step: linear warmup, then the chosen decay to zero."""

    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / (spec.warmup_steps + 1)
        if spec.scheduler == "constant":
            return 1.0
        progress = (step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps)
        if spec.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor
