"""Adapters on disk in `peft`'s format: adapter_config.json + adapter_model.safetensors.

What we write loads with `peft.PeftModel.from_pretrained` (for the methods peft has), and what
peft writes loads here. The config holds only keys peft knows, so older and newer peft versions
read it; the resolved recipe is saved beside it for people and for `peftctl eval`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from peftctl import methods
from peftctl.errors import UserError
from peftctl.files import atomic_directory
from peftctl.methods import Adapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
RECIPE_FILE = "peftctl_recipe.yaml"


def adapter_config(adapter: Adapter, base_model: str) -> dict[str, Any]:
    return {
        "peft_type": adapter.method.peft_type,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        **adapter.method.peft_config(adapter),
    }


def save_adapter(adapter: Adapter, folder: Path, base_model: str, recipe_yaml: str | None = None) -> Path:
    """Write the adapter to `folder` atomically: it appears complete or not at all."""
    state = {key: tensor.detach().to("cpu").contiguous() for key, tensor in adapter.state_dict().items()}
    with atomic_directory(folder) as staging:
        save_file(state, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(adapter_config(adapter, base_model), indent=2) + "\n")
        if recipe_yaml is not None:
            (staging / RECIPE_FILE).write_text(recipe_yaml)
    return folder


def read_adapter_config(folder: Path) -> dict[str, Any]:
    config_path = Path(folder) / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"no {CONFIG_FILE} in the adapter folder", file=folder,
                        expected="a folder written by peftctl train or peft's save_pretrained")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"invalid JSON: {err}", file=config_path) from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise UserError("the adapter config has no 'peft_type'", file=config_path)
    return config


def load_adapter(model: nn.Module, folder: Path) -> Adapter:
    """Apply the adapter saved in `folder` to `model` and load its weights, all or nothing."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    source = str(folder / CONFIG_FILE)
    method = methods.by_peft_type(config["peft_type"], source)
    cfg = method.config_from_peft(config, source)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"no {WEIGHTS_FILE} in the adapter folder", file=folder,
                        fix="peftctl reads safetensors only; re-save the adapter with safe_serialization=True")
    adapter = method.apply(model, cfg)
    adapter.load_state_dict(load_file(weights), str(weights))
    return adapter


# --- an adapter's base model, and merging into it ----------------------------------------------


def base_model_spec(folder: Path, base: str | None = None):
    """The ModelSpec an adapter was trained on: `base` if given, else its recipe, else its config."""
    from peftctl.recipe import ModelSpec

    folder = Path(folder)
    config = read_adapter_config(folder)
    recipe_file = folder / RECIPE_FILE
    options: dict[str, Any] = {}
    if recipe_file.is_file():
        import yaml

        options = (yaml.safe_load(recipe_file.read_text()) or {}).get("model", {})
    name = base or options.get("name_or_path") or config.get("base_model_name_or_path")
    if not name:
        raise UserError("the adapter does not say which base model it belongs to", file=folder / CONFIG_FILE,
                        where="base_model_name_or_path", fix="pass --base MODEL")
    return ModelSpec(name_or_path=name, dtype=options.get("dtype", "auto"),
                     trust_remote_code=options.get("trust_remote_code", False))


def merge_to_folder(folder: Path, out: Path, base: str | None = None, dtype: str = "float32") -> dict[str, float]:
    """Fold the adapter into its base and save a plain transformers model folder at `out`.

    The merge runs in fp32. Returns the largest and mean absolute logit difference between the
    merged model and base + adapter on a probe batch, so rounding is shown, not discovered.
    """
    import torch

    from peftctl.model import load_model, load_tokenizer

    folder = Path(folder)
    config = read_adapter_config(folder)
    method = methods.by_peft_type(config["peft_type"], str(folder / CONFIG_FILE))
    method.check_mergeable()  # before any weights load
    spec = base_model_spec(folder, base).model_copy(update={"dtype": "float32"})
    tokenizer = load_tokenizer(spec)
    adapter = load_adapter(load_model(spec), folder)
    probe = torch.randint(0, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = adapter.model(probe).logits
        merged = method.merge(adapter).eval()
        actual = merged(probe).logits
    difference = (actual - expected).abs()
    merged.to(getattr(torch, dtype))
    with atomic_directory(out) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return {"max_abs_logit_diff": float(difference.max()), "mean_abs_logit_diff": float(difference.mean())}
