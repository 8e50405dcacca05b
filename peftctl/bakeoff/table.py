"""What a bake-off shows: one table of its runs, sorted by validation loss after training, or by
the task's own held-out metric for classifiers (accuracy) and seq2seq models (ROUGE-L) (failed
runs below it with their error): its rows and notes (cli/console.py shows them as a rich table on
the terminal) and bakeoff.md."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from peftctl.bakeoff.state import ordered

HEADERS = ("run", "lr", "trainable", "peak plan / run", "tokens/s", "wall", "val loss", "token acc", "exact",
           "adapter", "merges")


def _size(value: float | None, unit: float | None = None) -> str:
    """Bytes in GB, MB or kB (`unit`: the one of another figure, so that two read side by side)."""
    if value is None:
        return "-"
    unit = unit or (1e9 if value >= 1e9 else 1e6 if value >= 1e5 else 1e3)
    return f"{value / unit:.{2 if unit == 1e9 else 1}f} {({1e9: 'GB', 1e6: 'MB', 1e3: 'kB'})[unit]}"


def _peaks(planned: float | None, measured: float | None) -> str:
    if planned is None or measured is None:
        return f"{_size(planned)} / {_size(measured)}"
    unit = 1e9 if max(planned, measured) >= 1e9 else 1e6
    return f"{_size(planned, unit).split()[0]} / {_size(measured, unit)}"


def _number(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def cells(run: dict[str, Any]) -> list[str]:
    """A done run's row: its label, learning rate and figures (state.FIGURES), formatted."""
    f = run["figures"]
    trainable = "-" if f.get("trainable_params") is None else f"{f['trainable_params']:,} ({f['trainable_percent']:.2g}%)"
    wall = f.get("wall_s")
    return [run["label"], f"{run['lr']:g}", trainable, _peaks(f.get("planned_peak_bytes"), f.get("measured_peak_bytes")),
            _number(f.get("tokens_per_s"), ",.0f"), "-" if wall is None else f"{int(wall) // 60}:{int(wall) % 60:02d}",
            f"{_number(f.get('val_loss_before'), '.4f')} → {_number(f.get('val_loss_after'), '.4f')}",
            _number(_accuracy(f), ".3f"), _number(f.get("exact_match"), ".2f"), _size(f.get("adapter_bytes")),
            {True: "yes", False: "no"}.get(f.get("mergeable"), "-")]


def _accuracy(figures: dict[str, Any]) -> float | None:
    """The accuracy column: token accuracy (causal LM, seq2seq) or a classifier's accuracy over rows."""
    return figures.get("token_accuracy") if figures.get("token_accuracy") is not None else figures.get("accuracy")


def notes(state: dict[str, Any]) -> list[str]:
    """The lines under the table: the budget, the base model's scores, what the columns mean, the
    runs not in it (failed with their error, or not run yet)."""
    budget = state["budget"]
    lines = [f"budget: {budget['steps']} optimizer steps per run" if "steps" in budget
             else f"budget: {budget['minutes']:g} minutes of training steps per run"]
    for base in (state.get("base") or {}).values():
        kind = "token accuracy" if base.get("token_accuracy") is not None else "accuracy (a new, untrained head)"
        lines.append(f"base model ({base['model']}) on {Path(base['data']).name}: loss {base['loss']:.4f}, {kind} "
                     f"{_number(_accuracy(base), '.3f')}" + ("" if base.get("exact_match") is None
                                                            else f", exact match {base['exact_match']:.2f}")
                     + ("" if base.get("rouge_l") is None else f", ROUGE-L {base['rouge_l']:.3f}"))
    lines += ["val loss: training's own, before → after; token acc, exact: peftctl eval on the held-out rows "
              f"(exact match of {state['samples']} greedy replies)",
              "peak: peftctl plan's total / the training process's peak (resident memory on CPU, CUDA memory "
              "allocated on a GPU); wall: the whole training process, loading included",
              "lr: the recipe's for its own method, the others' scaled by their suggested_lr (docs/bakeoff.md: Learning rate)"]
    for run in state["runs"]:
        if run["status"] == "failed":
            lines.append(f"failed: {run['label']}: {run['error']}")
        elif run["status"] != "done":
            lines.append(f"not run yet: {run['label']} ({run['status']})")
        elif run.get("eval_note"):
            lines.append(f"{run['label']}: {run['eval_note']}")
    return lines


def markdown(state: dict[str, Any], out: Path) -> str:
    """bakeoff.md: the table, the notes, and the commands that reproduce the bake-off and each run."""
    rows = [cells(run) for run in ordered(state["runs"]) if run["status"] == "done"]
    lines = [f"# Bake-off: {state['recipe']}", "", "| " + " | ".join(HEADERS) + " |",
             "|" + "|".join("---" if header == "run" else "--:" for header in HEADERS) + "|",
             *("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows), ""]
    lines += [f"- {line}" for line in notes(state)]
    # The report's chart (report/bakeoff_report.py writes it beside this file): every run's validation loss.
    lines += ["", "![Validation loss of every run](val_loss.png)", "", "The whole report: [report.html](report.html)."]
    lines += ["", "## Reproduce", "", "```bash", state["command"], "```", "",
              "Each run alone (its recipe, with the bake-off's method, learning rate and budget):", "", "```bash",
              *(f"peftctl train {shlex.quote(str(out / run['recipe_file']))}  # {run['label']}" for run in state["runs"]),
              "```", ""]
    return "\n".join(lines)
