"""Training checkpoints: a run saved and restored, the files written, read, pruned and checked.

A checkpoint is a folder `<output>/checkpoints/step-N` holding
  * `adapter.safetensors`, `optimizer.safetensors`, `rng.safetensors`: every tensor (the
    trainable parameters by their name in the model, the optimizer's per-parameter state, the
    RNG states as uint8 tensors), in safetensors only: loading a checkpoint never runs pickled
    code (no torch.load); `method.safetensors` where the method keeps state of its own;
  * `state.json`: everything else (step, data position, scheduler, counters, the metrics so far)
    with the fingerprint of what must not change between the run that wrote it and the run that
    resumes from it, and a sha256 of each tensor file, so a damaged file is named, not loaded.
It is written into a temporary folder beside the others and renamed into place once complete
and fsynced: a crash or a full disk leaves the previous checkpoints as they were.
The whole format is here: `save` and `restore` turn a run (its `TrainingState`, the adapter,
AdamW, the schedule, the RNGs) into these files and back; `write` and `read` are the files.
Errors name the checkpoint's files; how the user named the checkpoint (a command-line flag) is
the caller's to add (`read`'s `named_by`).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peftctl.core.errors import UserError
from peftctl.core.files import atomic_directory, check_path, writing
from peftctl.methods import Adapter
from peftctl.train.sharding import shard_like, whole

CHECKPOINTS = "checkpoints"  # the folder of an output dir that holds them
STATE_FILE = "state.json"
TENSOR_FILES = ("adapter", "optimizer", "rng")  # each stored as <name>.safetensors
# Written only when there is something to keep: a method's own loop state (Method.loop_state).
OPTIONAL_TENSOR_FILES = ("method",)
FORMAT = 1
_STEP_DIR = re.compile(r"step-(\d+)")
ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")  # AdamW's per-parameter state, by kind


@dataclass
class TrainingState:
    """How far a run has got: what a checkpoint keeps besides the tensors, and a resumed run
    goes on from (so its elapsed time, tokens/s and metrics count the run before the resume).

    The window is the steps since the last logged one (train.log_every). `train_s` is the wall
    time of the training steps alone (not validation or checkpoints), the one time tokens/s is
    measured against, in the progress line, metrics.jsonl and the summary.
    """

    step: int = 0  # the last optimizer step taken
    tokens: int = 0  # real (non-padding) tokens of the steps logged so far
    window_loss: float = 0.0  # the window's summed loss
    window_tokens: int = 0  # the window's labelled tokens, which the loss is averaged over
    window_real: int = 0  # the window's real tokens
    train_loss: float | None = None  # the mean loss of the last logged window
    elapsed_s: float = 0.0  # wall time of the run, as of the last checkpoint
    train_s: float = 0.0
    val_loss_before: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # the entries of metrics.jsonl


# The fields of TrainingState a checkpoint's state.json keeps under "counters".
_COUNTERS = tuple(f.name for f in fields(TrainingState) if f.name not in ("step", "val_loss_before", "history"))


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]  # by TENSOR_FILES name

    @property
    def step(self) -> int:
        return int(self.state["step"])


def save(root: Path, state: TrainingState, position: dict[str, int], adapter: Adapter, optimizer: Any,
         scheduler: Any, accelerator: Any, fingerprint: dict[str, Any], keep_last: int | None) -> Path:
    """Checkpoint step `state.step` of a run under `root`; returns its folder.

    `position`: where the stream of micro-batches is (data.stream_position). Every process of a
    launch calls this (under FSDP2 each whole tensor is gathered from all, and every process's
    RNG state is kept); the main process writes.
    """
    tensors = {"adapter": {name: whole(p.detach()) for name, p in adapter.params.items()},
               "optimizer": {key: whole(t) for key, t in _optimizer_tensors(optimizer, adapter.params).items()},
               "rng": _rng_tensors(accelerator),
               "method": adapter.loop_state()}
    body = {"step": state.step, **position, "scheduler": scheduler.state_dict(), "python_random": random.getstate(),
            "counters": {name: getattr(state, name) for name in _COUNTERS},
            "val_loss_before": state.val_loss_before, "metrics": state.history, "fingerprint": fingerprint}
    if accelerator.is_main_process:
        write(root, state.step, tensors, body, keep_last)
    return Path(root) / f"step-{state.step}"


def restore(saved: Checkpoint, adapter: Adapter, optimizer: Any, scheduler: Any, lr: float,
            schedule: Callable[[int], float]) -> TrainingState:
    """Load the adapter weights, AdamW's state, the schedule's position and the method's own
    state from `saved`; returns the run's progress. The RNGs are `restore_rng`'s, called last.

    The learning rate comes from the recipe (`lr`, `schedule`), at the saved step of its
    schedule: the same as the checkpoint's when the recipe is unchanged, and a lowered lr takes
    effect (after a NaN loss).
    """
    _restore_weights(saved, adapter)
    _restore_optimizer(saved, adapter, optimizer)
    scheduler.load_state_dict(saved.state["scheduler"])
    scheduler.base_lrs = [lr * group["lr_scale"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] * schedule(scheduler.last_epoch)
    if adapter.loop_state():
        adapter.restore_loop_state(saved.tensors["method"], str(saved.path / "method.safetensors"))
    counters = saved.state["counters"]
    return TrainingState(step=saved.step, **{name: counters[name] for name in _COUNTERS if name in counters},
                         val_loss_before=saved.state["val_loss_before"], history=list(saved.state["metrics"]))


def restore_rng(saved: Checkpoint, rank: int) -> None:
    """Set this process's torch RNGs (dropout draws from them) and Python's as `saved` had them."""
    states = saved.tensors["rng"]
    torch.set_rng_state(states["torch"][rank].clone())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"][rank].clone())
    version, internal, gauss = saved.state["python_random"]
    random.setstate((version, tuple(internal), gauss))


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


def read(path: Path, named_by: str | None = None) -> Checkpoint:
    """Load a checkpoint folder, checking that every file is there and unchanged since it was written.

    `named_by`: how the user gave `path` (e.g. a command-line flag), said by the errors about
    `path` itself; those about a file in it name that file.
    """
    check_path(path, named_by)
    path = Path(path)
    state_file = path / STATE_FILE
    if not path.is_dir():
        raise UserError("no checkpoint here: the folder does not exist" if not path.exists() else
                        "a checkpoint is a folder, not a file", file=path, where=named_by,
                        expected=f"a folder <output>/{CHECKPOINTS}/step-N written by peftctl train",
                        fix="pass --resume alone for the latest checkpoint of the output folder, or its path")
    if not state_file.is_file():
        raise UserError(f"not a complete checkpoint: it has no {STATE_FILE}", file=path, where=named_by,
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
    from peftctl.core.state_dicts import load_strict

    load_strict(targets, checkpoint.tensors[name], str(checkpoint.path / f"{name}.safetensors"),
                whose="checkpoint", headline="the checkpoint does not match this run",
                wanted="a checkpoint written by this recipe, on this model and method",
                fix="resume from a checkpoint of this run, or start a new run (--overwrite, or another --output)")


def _optimizer_tensors(optimizer: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state (step, exp_avg, exp_avg_sq) as `KIND/param name` tensors."""
    return {f"{kind}/{name}": value for name, p in named.items()
            for kind, value in optimizer.state.get(p, {}).items() if torch.is_tensor(value)}


def _restore_weights(saved: Checkpoint, adapter: Adapter) -> None:
    # Checkpoints hold whole tensors (`p.shape` is the whole shape of an FSDP2 shard too).
    weights = {name: torch.zeros(p.shape, dtype=p.dtype) for name, p in adapter.params.items()}
    load_into(weights, saved, "adapter")
    with torch.no_grad():
        for name, p in adapter.params.items():
            p.copy_(shard_like(weights[name], p))


def _restore_optimizer(saved: Checkpoint, adapter: Adapter, optimizer: Any) -> None:
    targets = {f"{kind}/{name}": torch.zeros(() if kind == "step" else p.shape,
                                             dtype=torch.float32 if kind == "step" else p.dtype)
               for name, p in adapter.params.items() for kind in ADAMW_STATE}
    load_into(targets, saved, "optimizer")
    # The optimizer indexes parameters by position, group after group, as its groups list them.
    in_order = [name for group in optimizer.param_groups for name in group["names"]]
    per_param = {i: {kind: targets[f"{kind}/{name}"] if kind == "step" else shard_like(targets[f"{kind}/{name}"], p)
                     for kind in ADAMW_STATE}
                 for i, (name, p) in enumerate((name, adapter.params[name]) for name in in_order)}
    optimizer.load_state_dict({"state": per_param, "param_groups": optimizer.state_dict()["param_groups"]})


def _rng_tensors(accelerator: Any) -> dict[str, torch.Tensor]:
    """Each process's torch RNG states, one row per process."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    if accelerator.num_processes > 1:
        return {k: accelerator.gather(v.to(accelerator.device)[None]).cpu() for k, v in states.items()}
    return {k: v[None] for k, v in states.items()}


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
