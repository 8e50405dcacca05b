"""A bake-off's state, `<output>/bakeoff.json`: what was asked (and must match to continue), and
each run's status and figures. It is rewritten atomically after every change, so a bake-off
stopped anywhere (Ctrl-C, a crash, a reboot) continues from the file as it was last written:

    {"version": 1, "recipe": "recipes/quickstart.yaml", "budget": {"steps": 50},
     "fingerprint": {...what must match to continue...}, "command": "peftctl bakeoff ...",
     "samples": 5, "base": {...the base model's eval figures...},
     "runs": [{"label": "lora", "method": "lora", "settings": {}, "run_dir": "lora",
               "status": "pending | running | done | failed", "error": null, "figures": {...},
               "lr": 0.001, "lr_rule": "...", "recipe_file": "recipes/lora.yaml", ...}]}

`figures` stays empty until the run is done (then FIGURES, any of them possibly null); `run_dir`
and `recipe_file` are relative to the bake-off folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from peftctl.bakeoff.planning import BakeoffPlan
from peftctl.core import jsontext
from peftctl.core.errors import UserError
from peftctl.core.files import atomic_write_text, check_replaceable, writing
from peftctl.model.loading import model_files

STATE_FILE = "bakeoff.json"
VERSION = 1
# A done run's figures, in the order tables show them.
FIGURES = ("trainable_params", "trainable_percent", "planned_peak_bytes", "measured_peak_bytes", "tokens_per_s",
           "wall_s", "val_loss_before", "val_loss_after", "token_accuracy", "exact_match", "accuracy", "rouge_l",
           "adapter_bytes", "mergeable")
# A task's own held-out metric, higher is better: done runs that have one are ranked by it.
TASK_METRICS = ("accuracy", "rouge_l")


def fingerprint(plan: BakeoffPlan) -> dict[str, Any]:
    """What a bake-off in a folder must share with the command that continues it: the recipe's content
    (after --set; its output folder aside), the methods, grids and overrides asked, budget, samples,
    and each run's recipe as planned (so a peftctl whose rules changed in between does not continue it)."""
    request = plan.request

    def digest(recipe) -> str:
        content = json.dumps(recipe.model_dump(mode="json", exclude={"output"}), sort_keys=True, default=str)
        return hashlib.sha256(content.encode()).hexdigest()

    return {"recipe content (sha256)": digest(plan.recipe),
            "--methods": [name.strip() for name in request.methods.split(",")], "--grid": list(request.grid),
            "--set": list(request.sets), "budget": plan.budget, "--samples": request.samples,
            "runs' recipes (sha256)": {run.label: digest(run.recipe) for run in plan.runs}}


def open_state(plan: BakeoffPlan) -> tuple[dict[str, Any], bool]:
    """The state to run from, and whether the folder starts afresh (deleted first, if it exists).

    The same bake-off in the folder continues; another is refused unless --overwrite, which
    only ever deletes a bake-off's folder (one holding bakeoff.json)."""
    out, where, request = plan.out, plan.where, plan.request
    recipe = plan.recipe
    saved = read_state(out / STATE_FILE) if (out / STATE_FILE).is_file() else None
    validation = recipe.data.validation
    check_replaceable(out, request.overwrite or saved is not None, where, (STATE_FILE,), inputs={
        "the recipe": request.recipe,
        "the training data": recipe.data.train if isinstance(recipe.data.train, Path) else None,
        "the validation data": validation if isinstance(validation, Path) else None,
        "the base model": model_files(recipe.model)})
    wanted = fingerprint(plan)
    if saved is not None and not request.overwrite:
        if saved.get("fingerprint") == wanted:
            return saved, False
        key = next(key for key in wanted if (saved.get("fingerprint") or {}).get(key) != wanted[key])
        raise UserError(f"{out} holds another bake-off: its {key} is {_shown(saved.get('fingerprint', {}).get(key))}, "
                        f"this one's {_shown(wanted[key])}", where=where,
                        expected="the same command to continue a bake-off in its folder",
                        fix="pass --overwrite to start again there (its runs are deleted), or choose another --output")
    runs = [{"label": run.label, "method": run.method, "settings": run.settings, "run_dir": run.run_dir,
             "status": "pending", "error": None, "figures": {}, "lr": run.lr, "lr_rule": run.lr_rule,
             "recipe_file": run.recipe_file} for run in plan.runs]
    state = {"version": VERSION, "recipe": str(request.recipe), "budget": plan.budget, "fingerprint": wanted,
             "command": request.command(out), "samples": request.samples, "base": None, "runs": runs}
    return state, True


def _shown(value: Any) -> str:
    text = jsontext.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"the bake-off state cannot be read: {err}", file=path,
                        fix="pass --overwrite to start the bake-off again") from None
    if not isinstance(state, dict) or state.get("version") != VERSION or not isinstance(state.get("runs"), list):
        raise UserError(f"not a bake-off state of this peftctl (version {VERSION})", file=path,
                        fix="pass --overwrite to start the bake-off again, or choose another --output")
    return state


def start_folder(out: Path, fresh: bool) -> None:
    """A new bake-off's folder: emptied when it held an earlier bake-off (check_replaceable allowed it)."""
    with writing(out, "the bake-off folder"):
        if fresh and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)


def save_state(out: Path, state: dict[str, Any]) -> None:
    path = out / STATE_FILE
    with writing(path, "the bake-off state"):
        atomic_write_text(path, jsontext.dumps(state, indent=2) + "\n")


def ordered(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Done runs by their task's held-out metric (a classifier's accuracy, a seq2seq model's ROUGE-L;
    highest first), else by validation loss after training (lowest first), none last; then failed
    ones, then the rest."""
    done = [run["figures"] for run in runs if run["status"] == "done"]
    metric = next((m for m in TASK_METRICS if any(f.get(m) is not None for f in done)), None)

    def key(run: dict[str, Any]) -> tuple:
        figures = run["figures"] if run["status"] == "done" else {}
        value = -figures[metric] if metric and figures.get(metric) is not None else None
        if metric is None:
            value = figures.get("val_loss_after")
        rank = {"done": 0, "failed": 1}.get(run["status"], 2)
        return rank, value is None, value if value is not None else 0.0

    return sorted(runs, key=key)
