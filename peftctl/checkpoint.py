"""Training checkpoints on disk: write, read, find the latest, prune, check they fit the run.

A checkpoint is a folder `<output>/checkpoints/step-N` holding
  * `adapter.safetensors`, `optimizer.safetensors`, `rng.safetensors`: every tensor (the
    trainable parameters by their name in the model, the optimizer's per-parameter state, the
    RNG states as uint8 tensors), in safetensors only: loading a checkpoint never runs pickled
    code (no torch.load); `method.safetensors` where the method keeps state of its own;
  * `state.json`: everything else (step, data position, scheduler, counters, the metrics so far)
    with the fingerprint of what must not change between the run that wrote it and the run that
    resumes from it, and a sha256 of each tensor file, so a damaged file is named, not loaded.
It is written into a temporary folder beside the others and renamed into place once complete
and fsynced: a crash or a full disk leaves the previous checkpoints as they were. This module
knows nothing of the loop or the CLI: train.py decides what goes into the tensors and state.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peftctl.errors import UserError
from peftctl.files import atomic_directory, check_path, writing

CHECKPOINTS = "checkpoints"  # the folder of an output dir that holds them
STATE_FILE = "state.json"
TENSOR_FILES = ("adapter", "optimizer", "rng")  # each stored as <name>.safetensors
# Written only when there is something to keep: a method's own loop state (Method.loop_state).
OPTIONAL_TENSOR_FILES = ("method",)
FORMAT = 1
_STEP_DIR = re.compile(r"step-(\d+)")


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]  # by TENSOR_FILES name

    @property
    def step(self) -> int:
        return int(self.state["step"])


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints under `root`, oldest first (a temporary folder is never one)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest(root: Path) -> Path | None:
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None


def write(root: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
          keep_last: int | None) -> Path:
    """Write checkpoint `step` under `root` atomically, then prune to the newest `keep_last`."""
    target = Path(root) / f"step-{step}"
    with writing(target, f"checkpoint step-{step}", keep=latest(root)), atomic_directory(target) as staging:
        checksums = {}
        for name in (*TENSOR_FILES, *(n for n in OPTIONAL_TENSOR_FILES if tensors.get(n))):
            path = staging / f"{name}.safetensors"
            save_file({key: t.detach().to("cpu").contiguous() for key, t in tensors[name].items()}, path,
                      metadata={"format": "pt"})
            checksums[path.name] = _sha256(path)
        body = {"format": FORMAT, **state, "checksums": checksums}
        text = json.dumps({**body, "state_sha256": _state_sha256(body)}, indent=1)
        (staging / STATE_FILE).write_text(text + "\n", encoding="utf-8")
    prune(root, keep_last, step)
    return target


def prune(root: Path, keep_last: int | None, step: int) -> None:
    """Keep the newest `keep_last` checkpoints up to `step`, which was just written.

    Checkpoints after `step` are from a run that was resumed from an earlier one: the resumed
    run replaces them (as its metrics replace theirs), and left in place they would pass for the
    latest. Temporary folders a crash left behind go too.
    """
    root = Path(root)
    for path in root.glob(".step-*"):
        shutil.rmtree(path, ignore_errors=True)
    dirs = step_dirs(root)
    kept = [path for n, path in dirs if n <= step]
    if keep_last is not None:
        kept = kept[-keep_last:]
    for _, path in dirs:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


def read(path: Path) -> Checkpoint:
    """Load a checkpoint folder, checking that every file is there and unchanged since it was written."""
    check_path(path, "--resume")
    path = Path(path)
    state_file = path / STATE_FILE
    if not path.is_dir():
        raise UserError("no checkpoint here: the folder does not exist" if not path.exists() else
                        "a checkpoint is a folder, not a file", file=path, where="--resume",
                        expected=f"a folder <output>/{CHECKPOINTS}/step-N written by peftctl train",
                        fix="pass --resume alone for the latest checkpoint of the output folder, or its path")
    if not state_file.is_file():
        raise UserError(f"not a complete checkpoint: it has no {STATE_FILE}", file=path, where="--resume",
                        expected=f"a folder <output>/{CHECKPOINTS}/step-N written by peftctl train",
                        fix="resume from another checkpoint (or pass --resume alone for the latest)")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _corrupt(state_file, f"its {STATE_FILE} is not valid JSON ({err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("checksums"), dict):
        raise _corrupt(state_file, f"its {STATE_FILE} is not one peftctl checkpoint format {FORMAT} writes")
    # The state is checked like the tensor files (checkpoints written before this check have no sum).
    saved_sum = state.pop("state_sha256", None)
    if saved_sum is not None and saved_sum != _state_sha256(state):
        raise _corrupt(state_file, "the file's contents differ from what was written (checksum mismatch)")
    if not isinstance(state.get("step"), int) or isinstance(state.get("step"), bool) or state["step"] < 0:
        raise _corrupt(state_file, f"its step is {state.get('step')!r}, not a step number")
    optional = [n for n in OPTIONAL_TENSOR_FILES if f"{n}.safetensors" in state["checksums"]]
    tensors = {name: {} for name in OPTIONAL_TENSOR_FILES}
    for name in (*TENSOR_FILES, *optional):
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise _corrupt(file, "the file is missing")
        if _sha256(file) != state["checksums"].get(file.name):
            raise _corrupt(file, "the file's contents differ from what was written (checksum mismatch)")
        try:
            tensors[name] = load_file(file)
        except SafetensorError as err:
            raise _corrupt(file, f"not a readable safetensors file ({err})") from None
    return Checkpoint(path, state, tensors)


def check_compatible(checkpoint: Checkpoint, fingerprint: dict[str, Any]) -> None:
    """Refuse a checkpoint made by a different recipe: the first key whose value differs is named."""
    saved = checkpoint.state.get("fingerprint", {})
    for key in [*saved, *(k for k in fingerprint if k not in saved)]:
        ours, theirs = fingerprint.get(key), saved.get(key)
        if _json(ours) != _json(theirs):
            raise UserError(
                f"the checkpoint was written by a run with {key} = {theirs!r}, but this run has {ours!r}",
                file=checkpoint.path, where=key,
                expected=f"a checkpoint of this recipe ({key}: {ours!r})",
                fix="resume with the recipe and --set options the checkpoint was made with, "
                    "or start a new run (--overwrite, or another --output)")


def load_into(targets: dict[str, torch.Tensor], checkpoint: Checkpoint, name: str) -> None:
    """Copy the checkpoint's `name` tensors into `targets`: all keys and shapes must match exactly."""
    from peftctl.state_dicts import load_strict

    load_strict(targets, checkpoint.tensors[name], str(checkpoint.path / f"{name}.safetensors"),
                whose="checkpoint", headline="the checkpoint does not match this run",
                wanted="a checkpoint written by this recipe, on this model and method",
                fix="resume from a checkpoint of this run, or start a new run (--overwrite, or another --output)")


def _state_sha256(state: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _corrupt(file: Path, problem: str) -> UserError:
    return UserError(f"the checkpoint is damaged: {problem}", file=file,
                     fix="resume from an older checkpoint (--resume PATH), or start a new run")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json(value: Any) -> str:
    """A value as JSON: a tuple from the run and the list it was saved as compare equal."""
    return json.dumps(value, sort_keys=True, default=str)
