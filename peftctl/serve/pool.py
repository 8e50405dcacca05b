"""The models a server or a chat answers with: one base in memory, any number of adapters on it.

Each adapter is applied to a *view* of the base: a copy of its module tree whose weight tensors
are the base's own (copy.deepcopy with every parameter and buffer pre-seeded in the memo), so an
adapter costs its own weights only. The adapter is loaded onto its view exactly as `peftctl eval`
loads one onto a fresh base (export/adapter_files.load_adapter), so every method peftctl trains
loads. Adapters whose rows can share a batch (routing.batchable_refusal) are then routed into one
serving copy of the base (`router`), each in a slot of its own; the others answer on their view.

The pristine base is never changed: views are copied from it, never from the router, and an
adapter whose loading would rewrite base weights in place (an unconverted PiSSA/OLoRA, which
subtracts its principal part from W) is refused.
"""

from __future__ import annotations

import copy
import itertools
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from torch import nn

from peftctl.core.errors import UserError
from peftctl.export.adapter_base import base_identity, base_model_spec, saved_base
from peftctl.export.adapter_files import CONFIG_FILE, adapter_method, adapter_task, load_adapter
from peftctl.methods.lora_init import BASE_CHANGING
from peftctl.model.loading import base_facts, load_model, load_tokenizer, resolve_source
from peftctl.recipe.schema import ModelSpec
from peftctl.serve.routing import RowSlots, batchable_refusal, install, uninstall

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


@dataclass
class Served:
    """One name a request can ask for: the base, or an adapter on it."""

    name: str
    folder: Path | None
    model: nn.Module  # what its rows run through: the shared router, or its own view
    slot: int  # its rows' slot in the router (0: the base); -1 for an adapter answering on its view
    method: str  # "base", or the adapter's method
    unbatched_because: str | None = None

    @property
    def batched(self) -> bool:
        return self.slot >= 0


def shared_weights_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules holding the very same weight tensors (no memory but the modules)."""
    memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def spec_of(target: str, dtype: str = "auto", trust_remote_code: bool = False) -> tuple[ModelSpec, Path | None]:
    """The base a chat or server runs on, from a model name or an adapter folder (whose base is
    found as `peftctl eval` finds it), and that folder if it was one."""
    path = Path(target).expanduser()
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        return base_model_spec(path, None, trust_remote_code), path
    try:
        spec = ModelSpec(name_or_path=target, dtype=dtype, trust_remote_code=trust_remote_code)
    except ValidationError as err:
        problem = err.errors()[0]
        raise UserError(f"invalid {problem['loc'][0]}: {problem['msg']}", where=f"--{problem['loc'][0]}") from None
    resolve_source(spec)
    return spec, None


class ModelPool:
    """The base, its tokenizer and the adapters by name; `lock` is held while the router changes
    (the engine holds it around each forward)."""

    def __init__(self, spec: ModelSpec, base_name: str | None = None):
        self.spec = spec
        self.base_name = base_name or spec.name_or_path
        self.tokenizer = load_tokenizer(spec)
        self.base = load_model(spec)
        self.slots = RowSlots()
        self.router = shared_weights_copy(self.base)
        self.lock = threading.RLock()
        self.served: dict[str, Served] = {self.base_name: Served(self.base_name, None, self.router, 0, "base")}
        self._next_slot = itertools.count(1)

    def get(self, name: str) -> Served | None:
        return self.served.get(name)

    def add(self, name: str, folder: Path) -> Served:
        """Load the adapter in `folder` under `name`; a refusal is a UserError and changes nothing."""
        folder = Path(folder)
        if not NAME.fullmatch(name or ""):
            raise UserError(f"adapter name {name!r} is not allowed", where="name",
                            expected="1-128 characters: letters, digits and . _ : / - (starting with a letter or digit)")
        if name in self.served:
            raise UserError(f"the name '{name}' is already served", where="name",
                            fix="unload it first, or pick another name")
        if not folder.is_dir():
            raise UserError("no such adapter folder", file=folder)
        self.check_base(folder)
        task = adapter_task(folder)
        if task != "causal_lm":
            raise UserError(f"this adapter was trained for task '{task}'; chat and serve generate text with a "
                            "causal language model and its adapters", file=folder / CONFIG_FILE, where="task_type",
                            fix="score it with peftctl eval, or serve it merged (peftctl merge) with a server for its task")
        method, cfg = adapter_method(folder)
        if getattr(cfg, "init", None) in BASE_CHANGING:
            raise UserError(f"this adapter redoes its {cfg.init} initialisation on the base, which would change the "
                            "base weights every adapter shares", file=folder / CONFIG_FILE, where="init_lora_weights",
                            fix="convert it to a plain LoRA (peft's path_initial_model_for_weight_conversion; "
                                "peftctl train exports converted adapters)")
        view = shared_weights_copy(self.base)
        adapter = load_adapter(view, folder, base_facts(self.spec, self.tokenizer))
        view.eval()
        refusal = batchable_refusal(adapter)
        with self.lock:
            if name in self.served:
                raise UserError(f"the name '{name}' is already served", where="name")
            slot = -1 if refusal else next(self._next_slot)
            if slot > 0:
                install(self.router, self.slots, slot, adapter)
            served = Served(name, folder, view if refusal else self.router, slot, method.name, refusal)
            self.served[name] = served
        return served

    def remove(self, name: str) -> Served:
        """Stop serving `name` (the caller has let its sequences finish or cancelled them)."""
        with self.lock:
            served = self.served.get(name)
            if served is None or served.folder is None:
                raise KeyError(name)
            del self.served[name]
            if served.slot > 0:
                uninstall(self.router, served.slot)
        return served

    def check_base(self, folder: Path) -> None:
        """Refuse an adapter made on another base than the one served (another model, revision,
        GGUF file or quantization); one that names no base is checked by its shapes alone."""
        theirs = base_identity(saved_base(folder, named=False))
        ours = base_identity({"name_or_path": self.spec.name_or_path, "revision": self.spec.revision,
                              "gguf_file": self.spec.gguf_file, **self.spec.model_dump(include={
                                  "quantization", "quant_type", "double_quant"})})
        if theirs is not None and theirs != ours:
            differ = ", ".join(f"{key} {theirs.get(key)!r}" for key in sorted(theirs) if theirs.get(key) != ours.get(key))
            raise UserError(f"this adapter was made on another base model ({differ}) than the one served, "
                            f"{self.spec.name_or_path}", file=folder / CONFIG_FILE, where="base_model_name_or_path",
                            fix=f"serve it with its own base: peftctl serve {theirs['name_or_path']} --adapter NAME=PATH")
