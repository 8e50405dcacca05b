"""Adapters on disk in `peft`'s format: adapter_config.json + adapter_model.safetensors.

What we write loads with `peft.PeftModel.from_pretrained` (for the methods peft has), and what
peft writes loads here. The config holds only keys peft knows, so older and newer peft versions
read it; the resolved recipe is saved beside it for people and for `peftctl eval`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftctl import methods
from peftctl.arch.tasks import PEFT_TASK_TYPES, TaskHead, task_of_peft_type
from peftctl.core.errors import UserError, one_line
from peftctl.core.files import atomic_directory
from peftctl.methods import Adapter, BaseFacts, Method, MethodConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
RECIPE_FILE = "peftctl_recipe.yaml"


def adapter_config(adapter: Adapter, base_model: str, revision: str | None = None) -> dict[str, Any]:
    """peft's config: the base named as the recipe named it (a Hub id, as peft writes it, so that
    peft and `peftctl eval` find the base by name), with its revision."""
    return {
        "peft_type": adapter.method.peft_type,
        "task_type": PEFT_TASK_TYPES[adapter.task],
        "base_model_name_or_path": base_model,
        "revision": revision,
        "inference_mode": True,
        **adapter.method.peft_config(adapter),
        **({"modules_to_save": adapter.head} if adapter.head else {}),
    }


def save_adapter(adapter: Adapter, folder: Path, base_model: str, recipe_yaml: str | None = None,
                 revision: str | None = None, state: dict | None = None) -> Path:
    """Write the adapter to `folder` atomically: it appears complete or not at all.

    `state` replaces the adapter's own weights where they live elsewhere (an adapter built on a
    meta-device skeleton, such as a combination of adapters, has none of its own).
    """
    state = {key: tensor.detach().to("cpu").contiguous()
             for key, tensor in (adapter.state_dict() if state is None else state).items()}
    with atomic_directory(folder) as staging:
        save_file(state, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        config = adapter_config(adapter, base_model, revision)
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if recipe_yaml is not None:
            (staging / RECIPE_FILE).write_text(recipe_yaml)
    return folder


def read_adapter_config(folder: Path) -> dict[str, Any]:
    config_path = Path(folder) / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"no {CONFIG_FILE} in the adapter folder", file=folder,
                        expected="a folder written by peftctl train or peft's save_pretrained")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise UserError(f"not valid UTF-8 JSON: {one_line(err, 200)}", file=config_path,
                        expected="the adapter_config.json that peftctl train or peft's save_pretrained writes") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise UserError("the adapter config has no 'peft_type'", file=config_path)
    return config


def adapter_method(folder: Path) -> tuple[Method, MethodConfig]:
    """The method and the options that the adapter saved in `folder` was made with.

    A config from elsewhere (peft, another peft version, a hand edit) may lack a key or hold a
    value peftctl does not accept: both are the adapter's problem, named by its key.
    """
    return _method_of(folder, read_adapter_config(folder))


def _method_of(folder: Path, config: dict[str, Any]) -> tuple[Method, MethodConfig]:
    """adapter_method for the adapter_config.json `config` of `folder`, already read."""
    config = dict(config)
    source = str(Path(folder) / CONFIG_FILE)
    method = methods.by_peft_type(config["peft_type"], source)
    if config.get("task_type") == PEFT_TASK_TYPES["sequence_classification"]:
        config.pop("modules_to_save", None)  # the classifier's head: the task's, not the method's (saved_head)
    try:
        return method, method.config_from_peft(config, source)
    except KeyError as err:
        key = str(err.args[0])
        raise UserError(f"the {method.peft_type} adapter config has no '{key}'", file=source, where=key,
                        expected=f"an adapter_config.json written by peft or peftctl for {method.peft_type}") from None
    except ValidationError as err:
        first = err.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else None
        raise UserError(f"invalid {method.peft_type} adapter option: {first['msg']}", file=source, where=key,
                        expected=f"an adapter_config.json written by peft or peftctl for {method.peft_type}") from None


def load_adapter(model: nn.Module, folder: Path, base: BaseFacts = BaseFacts()) -> Adapter:
    """Apply the adapter saved in `folder` to `model` and load its weights, all or nothing."""
    adapter = prepare_adapter(model, folder, base)
    weights = Path(folder) / WEIGHTS_FILE
    adapter.load_state_dict(read_weights(weights), str(weights))
    return adapter


def prepare_adapter(model: nn.Module, folder: Path, base: BaseFacts = BaseFacts()) -> Adapter:
    """Apply the adapter saved in `folder` to `model` with its options, not yet its weights: what
    it adapts and the shapes, checked against the model before any weights are read."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    method, cfg = _method_of(folder, config)
    if not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"no {WEIGHTS_FILE} in the adapter folder", file=folder,
                        fix="peftctl reads safetensors only; re-save the adapter with safe_serialization=True")
    task = task_of_peft_type(config.get("task_type"))
    base = replace(base, task=task, head=saved_head(config, model) if task == "sequence_classification" else None)
    try:
        return methods.apply(model, cfg, base)
    except UserError as err:
        # The options come from the adapter's config, not from a recipe: say so, and that the
        # likely cause is a base model other than the one the adapter was made for.
        if err.file is None:
            err.file = str(folder / CONFIG_FILE)
            err.fix = "use the base model the adapter was trained on (see its base_model_name_or_path)"
            err._changed()
        raise


def adapter_task(folder: Path) -> str:
    """The task the adapter in `folder` was trained for, from its task_type."""
    return task_of_peft_type(read_adapter_config(folder).get("task_type"))


def saved_head(config: dict[str, Any], model: nn.Module) -> tuple[str, ...]:
    """The modules a classifier adapter saved whole (its config's modules_to_save), as `model` names them.

    peft matches each listed name as a suffix of a module's name and lists names a model may lack
    (its default is both 'classifier' and 'score'); a module inside another listed one is part of it.
    """
    listed = config.get("modules_to_save") or []
    names = [name for name, _ in model.named_modules()
             if name and any(name == item or name.endswith("." + item) for item in listed)]
    return tuple(name for name in names if not any(name.startswith(other + ".") for other in names))


def adapter_head(folder: Path) -> TaskHead:
    """The task the adapter in `folder` was trained for and a classifier's label names: those its
    saved recipe records, else (an adapter made by peft) LABEL_0... as many as its head has outputs."""
    task = adapter_task(folder)
    if task != "sequence_classification":
        return TaskHead(task)
    saved = (saved_recipe(folder).get("data") or {}).get("labels")
    if isinstance(saved, list) and all(isinstance(name, str) for name in saved) and len(saved) > 1:
        return TaskHead(task, tuple(saved))
    from safetensors import safe_open

    listed = read_adapter_config(folder).get("modules_to_save") or []
    with safe_open(str(Path(folder) / WEIGHTS_FILE), "pt") as weights:  # the head's output layer: its narrowest
        shapes = [weights.get_slice(key).get_shape() for key in weights.keys()
                  if any(f".{name}." in f".{key}" for name in listed)]
    outputs = min((shape[0] for shape in shapes if len(shape) == 2), default=2)
    return TaskHead(task, tuple(f"LABEL_{i}" for i in range(outputs)))


def read_weights(path: Path) -> dict:
    """A safetensors file's tensors; a truncated, foreign or hostile file is the user's input, named."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise UserError(f"not a readable safetensors file: {one_line(err, 200)}", file=path,
                        fix="copy the file again; peftctl reads only complete safetensors files") from None


def saved_recipe(folder: Path) -> dict[str, Any]:
    """The recipe saved beside an adapter, as a mapping of sections (empty if none is saved).

    It only supplies defaults (which base model, which data); a file that is not a recipe is named.
    """
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        return {}
    import yaml

    fix = f"delete {RECIPE_FILE} and pass --base (and --data) yourself"
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as err:
        raise UserError(f"not a readable recipe: {one_line(err, 200)}", file=path, fix=fix) from None
    if not isinstance(recipe, dict):
        raise UserError("not a recipe: the file is not a mapping of sections", file=path, fix=fix)
    for section in ("model", "data"):
        if not isinstance(recipe.get(section) or {}, dict):
            raise UserError(f"not a recipe: its {section} section is not a mapping", file=path, fix=fix)
    return recipe
