"""A bake-off's report: `<bakeoff>/report.html` and `<bakeoff>/val_loss.png`.

`peftctl bakeoff` trains one recipe with several methods, each run in a folder of its own, and
keeps their state in `<bakeoff>/bakeoff.json` (version 1):

    {"version": 1, "recipe": "...", "budget": {"steps": 50} | {"minutes": 5}, "fingerprint": {...},
     "runs": [{"label", "method", "settings", "run_dir" (relative to the bake-off folder),
               "status": "pending" | "running" | "done" | "failed", "error", "figures": {...}}]}

The page has the table of done runs (their `figures`, in the order table.py sorts them), the runs that failed (with their error) or have not finished, and one chart of every
done run's validation loss curve overlaid (saved beside it as val_loss.png), and one of their
training loss, from each run's metrics.jsonl. bakeoff.json that does not have that shape is an
error naming the key; a run folder without metrics is a note on the page.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from peftctl.core.errors import UserError, one_line
from peftctl.report.html import cell, esc, notes, page, raw_cell, section, table, text_cell
from peftctl.report.run_report import METRICS_FILE, RUN_REPORT, Metrics, read_metrics, write_chart, write_page

BAKEOFF_FILE = "bakeoff.json"
BAKEOFF_PNG = "val_loss.png"
STATUSES = ("pending", "running", "done", "failed")
# The figures of a done run, in the table's order (bakeoff/planning.py writes them; any may be null).
FIGURE_KEYS = ("trainable_params", "trainable_percent", "planned_peak_bytes", "measured_peak_bytes", "tokens_per_s",
               "wall_s", "val_loss_before", "val_loss_after", "token_accuracy", "exact_match", "adapter_bytes",
               "mergeable")


@dataclass
class BakeoffRun:
    label: str
    method: str
    settings: dict[str, Any]
    run_dir: Path  # resolved against the bake-off folder
    status: str
    error: str | None
    figures: dict[str, Any]
    metrics: Metrics | None = None  # None: the run folder has no metrics.jsonl yet


def read_bakeoff(bakeoff_dir: Path) -> tuple[dict[str, Any], list[BakeoffRun]]:
    """bakeoff.json (checked) and its runs, each with its metrics when its folder has them."""
    path = Path(bakeoff_dir) / BAKEOFF_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise _bad(path, None, f"not readable JSON ({one_line(err, 160)})") from None
    if not isinstance(state, dict):
        raise _bad(path, None, f"it holds a JSON {type(state).__name__}, not an object")
    if state.get("version") != 1:
        raise _bad(path, "version", f"version {state.get('version')!r}, and this peftctl reads version 1")
    if not isinstance(state.get("runs"), list):
        raise _bad(path, "runs", "it holds no list of runs")
    runs = [_run(path, i, entry) for i, entry in enumerate(state["runs"])]
    for run in runs:
        if (run.run_dir / METRICS_FILE).is_file():
            run.metrics = read_metrics(run.run_dir / METRICS_FILE)
    return state, runs


def _run(path: Path, i: int, entry: Any) -> BakeoffRun:
    where = f"runs[{i}]"
    if not isinstance(entry, dict):
        raise _bad(path, where, f"a run is a JSON object, not a {type(entry).__name__}")
    wanted = {"label": str, "method": str, "run_dir": str, "status": str, "settings": dict, "figures": dict}
    for key, kind in wanted.items():
        if not isinstance(entry.get(key), kind):
            raise _bad(path, f"{where}.{key}", f"{entry.get(key)!r} is not a JSON {'string' if kind is str else 'object'}")
    if entry["status"] not in STATUSES:
        raise _bad(path, f"{where}.status", f"{entry['status']!r} is not one of {', '.join(STATUSES)}")
    error = entry.get("error")
    return BakeoffRun(entry["label"], entry["method"], entry["settings"], path.parent / entry["run_dir"],
                      entry["status"], None if error is None else str(error), entry["figures"])


def _bad(path: Path, key: str | None, problem: str) -> UserError:
    return UserError(f"not a bake-off state file: {problem}", file=path, where=key,
                     expected="the bakeoff.json that peftctl bakeoff writes (version 1: a list of runs, each with "
                              "label, method, settings, run_dir, status, error and figures)",
                     fix="restore the file peftctl bakeoff wrote, or run the bake-off again into a new folder")


def by_validation_loss(runs: list[BakeoffRun]) -> list[BakeoffRun]:
    """The done runs, lowest validation loss after training first; those without one last."""
    def key(run: BakeoffRun) -> float:
        value = run.figures.get("val_loss_after")
        return value if isinstance(value, (int, float)) and math.isfinite(value) else math.inf

    return sorted((run for run in runs if run.status == "done"), key=key)


def write_bakeoff_report(bakeoff_dir: Path) -> Path:
    """Write `<bakeoff_dir>/report.html` and `<bakeoff_dir>/val_loss.png`; the html's path."""
    from peftctl.report import plots

    bakeoff_dir = Path(bakeoff_dir)
    state, runs = read_bakeoff(bakeoff_dir)
    done = by_validation_loss(runs)
    charted = [run for run in done if run.metrics is not None]
    validation = plots.overlay_figure({run.label: run.metrics.curve("val_loss") for run in charted},
                                      "validation loss", "validation loss", markers=True)
    train = plots.overlay_figure({run.label: run.metrics.curve("loss") for run in charted},
                                 "training loss", "training loss (mean over each logging window)", markers=False)
    text = bakeoff_page(bakeoff_dir, state, runs, done, plots.svg(validation, "val"), plots.svg(train, "train"),
                        plots.COLOURS)
    write_chart(plots, validation, bakeoff_dir / BAKEOFF_PNG)
    return write_page(bakeoff_dir / RUN_REPORT, text)


def bakeoff_page(folder: Path, state: dict[str, Any], runs: list[BakeoffRun], done: list[BakeoffRun],
                 validation_svg: str, train_svg: str, colours: tuple[str, ...]) -> str:
    charted = [run for run in done if run.metrics is not None]
    colour = {run.label: colours[i % len(colours)] for i, run in enumerate(charted)}
    missing = [f"{esc(run.label)}: its folder {esc(run.run_dir)} has no {METRICS_FILE}: left out of the charts"
               for run in done if run.metrics is None]
    budget = state.get("budget")
    budget_text = (", ".join(f"{key} {value}" for key, value in budget.items()) if isinstance(budget, dict)
                   else "not recorded")
    unfinished = [run for run in runs if run.status != "done"]
    return page(f"peftctl bake-off report: {folder.name}", [
        "<h1>peftctl bake-off report</h1>",
        f"<p class=\"where\">{esc(folder)} · recipe {esc(state.get('recipe', 'not recorded'))} · budget per run: "
        f"{esc(budget_text)} · {len(done)} of {len(runs)} runs done</p>",
        notes(missing),
        section("runs", "Runs, best validation loss first", table(
            "runs-table", ["run", "method", "settings", *FIGURE_KEYS],
            ([raw_cell(_run_label(run, folder, colour.get(run.label))), text_cell(run.method),
              text_cell(", ".join(f"{k}={json.dumps(v)}" for k, v in run.settings.items())),
              *(cell(key, run.figures.get(key)) for key in FIGURE_KEYS)] for run in done))
            if done else "<p>No run has finished yet.</p>"),
        section("unfinished", "Runs not done", table(
            "unfinished-table", ["run", "method", "status", "error"],
            ([text_cell(run.label), text_cell(run.method), text_cell(run.status), text_cell(run.error)]
             for run in unfinished))) if unfinished else "",
        section("validation", "Validation loss of every done run", f"<figure class=\"wide\">{validation_svg}</figure>"),
        section("train", "Training loss of every done run", f"<figure class=\"wide\">{train_svg}</figure>"),
    ])


def _run_label(run: BakeoffRun, folder: Path, colour: str | None) -> str:
    """The run's label with its colour in the charts, linked to its own report where it has one."""
    swatch = f"<span class=\"swatch\" style=\"background:{colour}\"></span>" if colour else ""
    if (run.run_dir / RUN_REPORT).is_file():
        try:
            target = (run.run_dir / RUN_REPORT).relative_to(folder)
        except ValueError:  # a run folder outside the bake-off's: no relative link reaches it
            return swatch + esc(run.label)
        return f"{swatch}<a href=\"{esc(quote(target.as_posix()))}\">{esc(run.label)}</a>"
    return swatch + esc(run.label)
