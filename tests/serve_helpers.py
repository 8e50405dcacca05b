"""Adapters for the serve and chat tests: each example method on the builtin tiny GPT-2, its
weights moved by seeded noise so that every adapter answers differently from the base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from method_checks import example_config
from peftctl import methods
from peftctl.export.adapter_files import save_adapter
from peftctl.model.loading import load_model
from peftctl.recipe.schema import ModelSpec

TINY_GPT2 = ModelSpec(name_or_path="builtin:tiny-gpt2", dtype="float32")


def noisy_adapter(folder: Path, label: str, seed: int, scale: float = 0.5) -> Path:
    """Example `label`'s adapter on the tiny GPT-2, saved in `folder`, its weights plus seeded noise."""
    adapter = methods.apply(load_model(TINY_GPT2), example_config(label))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter.params.values():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return save_adapter(adapter, folder, TINY_GPT2.name_or_path)


def with_config(folder: Path, copy: Path, **changes) -> Path:
    """A copy of the adapter in `folder` whose adapter_config.json has `changes` (another base, task, ...)."""
    shutil.copytree(folder, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return copy
