"""The run report: `<run>/report.html` and `<run>/loss.png`, from what a run folder holds.

A run folder (what `peftctl train` writes) has metrics.jsonl from its first step on; a finished
run adds summary.json (train's figures), generations.jsonl (base vs adapter replies, when
output.samples asked for them) and adapter/peftctl_recipe.yaml (the resolved recipe); an
interrupted one has checkpoints instead, whose state.json keeps the recipe keys a resume must
match. metrics.jsonl alone is enough: the page says what else is missing and why. The page is
one self-contained file (html.py), the charts are matplotlib's (plots.py,
imported only here, when a report is written). A bake-off folder's report is
bakeoff_report.py's. Reports are written atomically, and never over the files they read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftctl.core.errors import UserError, one_line
from peftctl.core.files import atomic_file, atomic_write_text, writing
from peftctl.export.adapter_files import RECIPE_FILE
from peftctl.report.html import cell, esc, figures_table, notes, page, raw_cell, section, table, text_cell
from peftctl.train import checkpoint

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
GENERATIONS_FILE = "generations.jsonl"
RUN_REPORT = "report.html"
LOSS_PNG = "loss.png"
# What an entry of metrics.jsonl may hold besides its step (train/loop.py's `log` and `evaluate`).
METRIC_KEYS = ("loss", "val_loss", "lr", "tokens_per_s", "grad_norm", "elapsed_s")
ENTRY_EXAMPLE = ('one JSON object per line, as peftctl train writes them: {"step": 10, "loss": 1.23, "lr": 0.001, '
                 '"tokens_per_s": 350.0, "grad_norm": 0.8, "elapsed_s": 12.5} or {"step": 10, "val_loss": 1.4}')

Curve = tuple[list[int], list[float]]


@dataclass
class Metrics:
    path: Path
    entries: list[dict[str, Any]]
    cut_line: int | None = None  # a last line that a killed run left cut short, left out

    def curve(self, key: str) -> Curve:
        """(steps, values) of the entries that hold a number under `key`, in the file's order."""
        points = [(entry["step"], entry[key]) for entry in self.entries if _number(entry.get(key))]
        return [step for step, _ in points], [value for _, value in points]


def read_metrics(path: Path) -> Metrics:
    """Every entry of a metrics.jsonl; a malformed line is an error naming it, except a last line
    without its newline: a run killed while appending it leaves that, and the rest is whole."""
    path = Path(path)
    text = _read_text(path, "the metrics")
    lines = text.split("\n")
    complete = text.endswith("\n") or not text
    if complete:
        lines.pop()
    entries, cut = [], None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            if number == len(lines) and not complete:
                cut = number
                break
            raise _bad_line(path, number, f"not JSON ({one_line(err, 120)})") from None
        problem = _entry_problem(entry)
        if problem:
            raise _bad_line(path, number, problem)
        entries.append(entry)
    return Metrics(path, entries, cut)


def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"a JSON {type(entry).__name__}, not an object"
    step = entry.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"its step is {step!r}, not a step number"
    for key in METRIC_KEYS:
        if key in entry and entry[key] is not None and not _number(entry[key]):
            return f"its {key} is {entry[key]!r}, not a number"
    return None


def _bad_line(path: Path, number: int, problem: str) -> UserError:
    return UserError(f"line {number} is not a metrics entry: {problem}", file=path, where=f"line {number}",
                     expected=ENTRY_EXAMPLE,
                     fix=f"repair or delete line {number}, then run peftctl report again (the report shows "
                         "the lines that remain)")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{what} file is not UTF-8 text ({one_line(err, 120)})", file=path,
                        fix="restore the file peftctl wrote, or delete it") from None
    except OSError as err:
        raise UserError(f"could not read {what}: {err.strerror or one_line(err)}", file=path,
                        fix="make the file readable") from None


@dataclass
class RunFolder:
    """What a run folder holds for its report; `missing` says, escaped, what it lacks and why."""

    path: Path
    metrics: Metrics
    summary: dict[str, Any] | None = None
    generations: list[dict[str, Any]] | None = None
    recipe: str | None = None  # the resolved recipe's YAML, from the adapter folder
    fingerprint: dict[str, Any] | None = None  # else the latest checkpoint's recipe keys
    checkpoint: Path | None = None  # the latest checkpoint
    missing: list[str] = field(default_factory=list)


def read_run(run_dir: Path) -> RunFolder:
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise UserError(f"not a peftctl run folder: it has no {METRICS_FILE}", file=run_dir,
                        expected=f"the output folder of peftctl train (it writes {METRICS_FILE} from the first step "
                                 "on), or of peftctl bakeoff (bakeoff.json)",
                        fix="pass the folder that peftctl train's --output or the recipe's output.dir named")
    run = RunFolder(run_dir, read_metrics(metrics_path))
    if run.metrics.cut_line is not None:
        run.missing.append(f"line {run.metrics.cut_line} of {METRICS_FILE} was cut short (the run was stopped while "
                           "writing it): left out")
    if not run.metrics.entries:
        run.missing.append(f"{METRICS_FILE} has no entry yet: the run stopped before its first logged step")
    run.summary = _read_json_file(run_dir / SUMMARY_FILE, run.missing,
                                  "the run did not finish (or a peftctl older than the report wrote it)")
    run.generations = _read_generations(run_dir / GENERATIONS_FILE, run.missing)
    recipe_path = run_dir / "adapter" / RECIPE_FILE
    run.checkpoint = checkpoint.latest(run_dir / checkpoint.CHECKPOINTS)
    if recipe_path.is_file():
        run.recipe = _read_optional(recipe_path, run.missing)
    elif run.checkpoint is not None:
        state = _read_json_file(run.checkpoint / checkpoint.STATE_FILE, run.missing, "")
        fingerprint = (state or {}).get("fingerprint")
        run.fingerprint = fingerprint if isinstance(fingerprint, dict) else None
    if run.recipe is None and run.fingerprint is None:
        run.missing.append(f"no recipe: neither adapter/{RECIPE_FILE} (written when a run finishes) nor a readable "
                           f"checkpoint in {checkpoint.CHECKPOINTS}/")
    return run


def _read_optional(path: Path, missing: list[str]) -> str | None:
    """The text of a file the report can do without, or None with a note in `missing`."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        missing.append(f"{esc(path)} could not be read ({esc(one_line(err, 160))}): left out")
        return None


def _read_json_file(path: Path, missing: list[str], why_absent: str) -> dict[str, Any] | None:
    """A JSON object file of the run, or None with a note in `missing` (absent: `why_absent`)."""
    if not path.is_file():
        if why_absent:
            missing.append(f"no {esc(path.name)}: {esc(why_absent)}")
        return None
    text = _read_optional(path, missing)
    try:
        value = json.loads(text) if text is not None else None
    except (json.JSONDecodeError, RecursionError) as err:
        missing.append(f"{esc(path)} is not JSON ({esc(one_line(err, 160))}): left out")
        return None
    if text is not None and not isinstance(value, dict):
        missing.append(f"{esc(path)} is not a JSON object: left out")
        return None
    return value


def _read_generations(path: Path, missing: list[str]) -> list[dict[str, Any]] | None:
    if not path.is_file():
        missing.append(f"no {GENERATIONS_FILE}: the recipe's output.samples is 0, its data has no replies "
                       "(completion format) or no validation rows, or the run did not finish")
        return None
    rows = []
    for number, line in enumerate((_read_optional(path, missing) or "").splitlines(), 1):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            row = None
        if not isinstance(row, dict):
            missing.append(f"line {number} of {GENERATIONS_FILE} is not a JSON object: left out")
            continue
        rows.append(row)
    return rows


def write_run_report(run_dir: Path) -> Path:
    """Write `<run_dir>/report.html` and `<run_dir>/loss.png` from the run folder; the html's path."""
    from peftctl.report import plots

    run_dir = Path(run_dir)
    run = read_run(run_dir)
    curve = run.metrics.curve
    loss = plots.loss_figure(curve("loss"), curve("val_loss"))
    panels = plots.panels_figure(curve("lr"), curve("tokens_per_s"), curve("grad_norm"))
    classes = (run.summary or {}).get("classes")
    confusion = plots.svg(plots.confusion_figure(classes["confusion"], classes["labels"]), "confusion") \
        if _is_confusion(classes) else None
    text = run_page(run, plots.svg(loss, "loss"), plots.svg(panels, "steps"), confusion)
    write_chart(plots, loss, run_dir / LOSS_PNG)
    return write_page(run_dir / RUN_REPORT, text)


def write_chart(plots: Any, figure: Any, path: Path) -> None:
    with writing(path, "the report's chart"), atomic_file(path) as staging:
        plots.write_png(figure, staging)


def write_page(path: Path, text: str) -> Path:
    with writing(path, "the report"):
        atomic_write_text(path, text)
    return path


def _is_confusion(classes: Any) -> bool:
    """Whether a summary's `classes` holds a square confusion matrix with a name per row (a summary
    is a file: the report draws only what it can read)."""
    if not isinstance(classes, dict) or not isinstance(classes.get("labels"), list):
        return False
    labels, rows = classes["labels"], classes.get("confusion")
    return isinstance(rows, list) and len(rows) == len(labels) and all(
        isinstance(row, list) and len(row) == len(labels) and all(isinstance(n, int) for n in row) for row in rows)


def classes_section(summary: dict[str, Any] | None, confusion_svg: str | None) -> str:
    """A classifier's held-out confusion matrix and per-class figures after training; nothing for other tasks."""
    if confusion_svg is None:
        return ""
    per_class = summary["classes"].get("per_class") or []
    rows = ([text_cell(c.get("label")), cell("precision", c.get("precision")), cell("recall", c.get("recall")),
             cell("f1", c.get("f1")), cell("support", c.get("support"))] for c in per_class if isinstance(c, dict))
    return section("classes", "Held-out classes (base + adapter, after training)",
                   f"<figure>{confusion_svg}</figure>",
                   table("classes-table", ["label", "precision", "recall", "F1", "support"], rows))


def run_page(run: RunFolder, loss_svg: str, panels_svg: str, confusion_svg: str | None = None) -> str:
    entries = run.metrics.entries
    return page(f"peftctl run report: {run.path.name}", [
        "<h1>peftctl run report</h1>",
        f"<p class=\"where\">{esc(run.path)} · {esc(run_status(run))}</p>",
        notes(run.missing),
        section("result", "Result" if run.summary else "Figures so far (from metrics.jsonl)",
                figures_table("summary", {k: v for k, v in run.summary.items() if k != "classes"}
                              if run.summary is not None else figures_so_far(entries))),
        section("loss", "Loss", f"<figure class=\"wide\">{loss_svg}</figure>",
                "<p>Training loss: the mean over each logging window's response tokens (train.log_every); "
                "validation loss: before training (step 0), every train.eval_every steps and at the end.</p>"),
        section("steps", "Learning rate, tokens/s and gradient norm", f"<figure class=\"wide\">{panels_svg}</figure>"),
        classes_section(run.summary, confusion_svg),
        generations_section(run.generations),
        recipe_section(run),
        section("metrics", "Metrics", f"<details><summary>{len(entries)} entries of {METRICS_FILE}</summary>\n"
                + table("metrics-table", ["step", *METRIC_KEYS],
                        ([cell("step", e["step"]), *(cell(key, e.get(key)) for key in METRIC_KEYS)] for e in entries))
                + "\n</details>"),
    ])


def run_status(run: RunFolder) -> str:
    if run.summary is not None:
        resumed = run.summary.get("resumed_from_step")
        return f"finished: {run.summary.get('steps')} steps" + (f" (resumed from step {resumed})" if resumed else "")
    steps = run.metrics.curve("loss")[0]
    last = f"last logged step {steps[-1]}" if steps else "no step logged"
    if run.checkpoint is None:
        return f"did not finish: {last}, no checkpoint"
    return (f"did not finish: {last}; latest checkpoint {run.checkpoint.name} "
            "(peftctl train RECIPE --resume continues it)")


def figures_so_far(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """What an unfinished run's metrics say: the last logged step and its figures, the
    validation loss before training and the latest one."""
    logged = [e for e in entries if _number(e.get("loss"))]
    validated = [e for e in entries if _number(e.get("val_loss"))]
    last = logged[-1] if logged else {}
    before = validated[0]["val_loss"] if validated and validated[0]["step"] == 0 else None
    return {"last_logged_step": last.get("step"), "train_loss": last.get("loss"), "val_loss_before": before,
            "latest_val_loss": validated[-1]["val_loss"] if validated else None,
            "latest_val_loss_step": validated[-1]["step"] if validated else None,
            "tokens_per_s": last.get("tokens_per_s"), "elapsed_s": last.get("elapsed_s")}


def generations_section(rows: list[dict[str, Any]] | None) -> str:
    if not rows:
        return section("generations", "Generations", "<p>None in this run folder (see the notes above).</p>")
    return section("generations", "Generations: base vs base + adapter (greedy)", table(
        "generations-table", ["prompt", "reference", "base", "adapter"],
        ([text_cell(row.get("prompt")), text_cell(row.get("reference")),
          raw_cell(_reply(row.get("base"), row.get("base_stopped_at_eos"))),
          raw_cell(_reply(row.get("generated"), row.get("stopped_at_eos")))] for row in rows), css="generations"))


def _reply(text: Any, stopped: Any) -> str:
    """A reply, scrollable when long, and marked when it ran on to the token limit."""
    cut = "" if stopped is not False else "<div class=\"cut\">no EOS: cut at the token limit</div>"
    return f"<div class=\"reply\">{esc('' if text is None else text)}</div>{cut}"


def recipe_section(run: RunFolder) -> str:
    if run.recipe is not None:
        return section("recipe", "Recipe", f"<p>From adapter/{RECIPE_FILE}, with every default filled in.</p>",
                       f"<pre id=\"recipe-text\">{esc(run.recipe)}</pre>")
    if run.fingerprint is not None:
        return section("recipe", "Recipe (the keys a resume must match)",
                       f"<p>The run did not finish, so there is no adapter/{RECIPE_FILE}: these are the recipe keys "
                       f"its latest checkpoint ({esc(run.checkpoint.name)}) records.</p>",
                       table("recipe-keys", ["key", "value"],
                             ([text_cell(key), text_cell(json.dumps(value))] for key, value in run.fingerprint.items())))
    return section("recipe", "Recipe", "<p>Not in this run folder (see the notes above).</p>")
