"""Running a bake-off: each run trained by `peftctl train` in a process of its own, one after another
(a run that fails, diverges or runs out of memory takes nothing else down, and the process's peak
memory is the run's own), then scored on the held-out rows as `peftctl eval` scores it; the state
saved after every change (state.py).

Continuing: a done run is kept; an interrupted one resumes from its latest checkpoint (`peftctl
train --resume`), or starts again if it wrote none; a failed one is tried again; a run trained but
not yet scored is only scored. Ctrl-C (or SIGTERM) stops the run in training after its current step,
checkpointed (SIGTERM is passed on to it), saves the state and raises BakeoffInterrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any

from peftctl.bakeoff.planning import BakeoffPlan, Request, Run, plan_bakeoff
from peftctl.bakeoff.state import open_state, save_state, start_folder
from peftctl.core.errors import UserError, one_line
from peftctl.core.files import atomic_write_text, output_lock, writing
from peftctl.methods import METHODS
from peftctl.train import checkpoint

Progress = Callable[[str], None]
# What the progress of a run names (its place in the bake-off, "3/7 ia3"): each training process
# started here reads it from its environment (cli/console.py).
PROGRESS_LABEL = "PEFTCTL_PROGRESS_LABEL"
LOGS = "logs"  # each run's `peftctl train` output, beside the runs


class BakeoffInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the bake-off; running the same command continues it."""

    def __init__(self, run: str | None, command: str | None, state_file: Path | None):
        self.run, self.command, self.state_file = run, command, state_file
        super().__init__(f"interrupted during {run}" if run else "interrupted")


def run_bakeoff(request: Request, progress: Progress | None = None) -> tuple[dict[str, Any], Path]:
    """Plan the bake-off (every check first), then train and score each run not done yet: the final
    state, and the bake-off's folder."""
    say = progress or (lambda text: None)
    current, plan = None, None
    try:
        plan = plan_bakeoff(request)
        state, fresh = open_state(plan)
        with output_lock(plan.out, plan.where):
            start_folder(plan.out, fresh)
            write_recipes(plan)
            save_state(plan.out, state)
            left, runs = sum(entry["status"] != "done" for entry in state["runs"]), len(plan.runs)
            say(f"bake-off: {runs} run{'s' if runs != 1 else ''} in {plan.out} ({left} to do); "
                f"their recipes in {plan.out / 'recipes'}")
            for i, (run, entry) in enumerate(zip(plan.runs, state["runs"])):
                current = f"run {i + 1}/{len(plan.runs)} {run.label}"
                if entry["status"] == "done":
                    say(f"{i + 1}/{len(plan.runs)} {run.label}: done before, kept")
                    continue
                try:
                    _run_one(plan, state, run, entry, f"{i + 1}/{len(plan.runs)} {run.label}", say)
                finally:
                    save_state(plan.out, state)
                write_reports(plan.out, state)
            write_reports(plan.out, state)
    except KeyboardInterrupt:
        raise BakeoffInterrupted(current, request.command(plan.out) if plan else None,
                                 plan.out / "bakeoff.json" if plan and current else None) from None
    return state, plan.out


def write_recipes(plan: BakeoffPlan) -> None:
    """Each run's recipe, a file `peftctl train` runs as it is (data paths absolute), beside the runs."""
    for run in plan.runs:
        path = plan.out / run.recipe_file
        header = (f"# Run '{run.label}' of the bake-off {plan.out} ({plan.request.recipe}), written by peftctl bakeoff.\n"
                  f"# Learning rate {run.lr:g}: {run.lr_rule}.\n#   peftctl train {path}\n")
        with writing(path, "a run's recipe"):
            atomic_write_text(path, header + run.recipe.to_yaml())


def write_reports(out: Path, state: dict[str, Any]) -> None:
    """bakeoff.md (the table and the commands that reproduce it) and report.html with every run's
    validation curve in one chart (val_loss.png beside it), as `peftctl report` writes them."""
    from peftctl.bakeoff.table import markdown
    from peftctl.report.bakeoff_report import write_bakeoff_report

    with writing(out / "bakeoff.md", "the bake-off report"):
        atomic_write_text(out / "bakeoff.md", markdown(state, out))
    write_bakeoff_report(out)


def _run_one(plan: BakeoffPlan, state: dict[str, Any], run: Run, entry: dict[str, Any], position: str, say: Progress) -> None:
    entry.update(status="running", error=None, figures={})
    save_state(plan.out, state)
    if entry.get("train") is None:  # the child's figures: it trained (an interrupted scoring is only done again)
        resuming = checkpoint.latest(plan.out / run.run_dir / checkpoint.CHECKPOINTS) is not None
        if not resuming:  # a start from scratch: an earlier attempt's time and memory are not this run's
            entry.update(wall_s=0.0, rusage_peak_bytes=None)
        say(f"{position}: {'continuing from its last checkpoint' if resuming else 'training'} "
            f"(lr {run.lr:g}: {run.lr_rule})")
        trained, error = _train(plan, run, entry, position, resuming, say)
        if error is not None:
            entry.update(status="failed", error=error)
            say(f"{position}: failed: {error}")
            return
        entry["train"] = trained
        save_state(plan.out, state)
    scores, note = _evaluate(plan, state, run, position, say)
    entry["figures"] = _figures(plan, run, entry, scores)
    entry.update(status="done", eval_note=note)
    figures = entry["figures"]
    say(f"{position}: done in {figures['wall_s']:.0f} s of training, validation loss "
        f"{_loss(figures['val_loss_before'])} -> {_loss(figures['val_loss_after'])}")


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _train(plan: BakeoffPlan, run: Run, entry: dict[str, Any], position: str, resuming: bool,
           say: Progress) -> tuple[dict[str, Any] | None, str | None]:
    """`peftctl train` on the run's recipe in a process of its own: its --json figures, or why it failed."""
    command = [sys.executable, "-m", "peftctl", "train", str(plan.out / run.recipe_file), "--json",
               "--resume" if resuming else "--overwrite"]
    log = plan.out / LOGS / f"{run.run_dir}.log"
    with writing(log, "a run's log"):
        log.parent.mkdir(parents=True, exist_ok=True)
        log_file = log.open("a", encoding="utf-8")
    tail: deque[str] = deque(maxlen=30)
    started = time.monotonic()
    with log_file:
        log_file.write(f"$ {' '.join(command)}\n")
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                errors="replace", env={**os.environ, PROGRESS_LABEL: position})
        lines = threading.Thread(target=_pass_on, args=(proc.stderr, log_file, tail, say), daemon=True)
        lines.start()
        with _stops_passed_on(proc.pid) as stops:
            stdout = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage: its peak resident size
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        lines.join()
    entry["wall_s"] = entry.get("wall_s", 0.0) + time.monotonic() - started  # over every attempt of the run
    entry["rusage_peak_bytes"] = max(entry.get("rusage_peak_bytes") or 0, usage.ru_maxrss * 1024)  # KiB on Linux
    if stops.requested or proc.returncode == 130:
        raise KeyboardInterrupt
    if proc.returncode != 0:
        return None, _failure(proc.returncode, stdout, tail, log)
    return json.loads(stdout), None


def _pass_on(stream: IO[str], log: IO[str], tail: deque[str], say: Progress) -> None:
    """The child's progress lines and messages: into its log, and on to ours."""
    for line in stream:
        log.write(line)
        log.flush()
        tail.append(line.rstrip("\n"))
        say(line.rstrip("\n"))
    stream.close()


@contextmanager
def _stops_passed_on(pid: int) -> Iterator[SimpleNamespace]:
    """SIGINT / SIGTERM while a run trains: noted, and passed on to it as SIGTERM, which stops it after
    the current step with a checkpoint. (A terminal's Ctrl-C reaches it too, as SIGINT: two different
    signals, so it still finishes that checkpoint; a second Ctrl-C aborts it, as in `peftctl train`.)"""
    stops = SimpleNamespace(requested=False)

    def stop(signum: int, frame: Any) -> None:
        stops.requested = True
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    if threading.current_thread() is not threading.main_thread():  # Python signals the main thread only
        yield stops
        return
    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stops
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _failure(returncode: int, stdout: str, tail: deque[str], log: Path) -> str:
    """Why a run failed, in one line: its UserError (train's --json error object), else its last words."""
    try:
        error = json.loads(stdout)
    except json.JSONDecodeError:
        error = None
    if isinstance(error, dict) and error.get("error"):
        parts = [f"{error['key']}:" if error.get("key") else None, error["error"],
                 f"(fix: {error['fix']})" if error.get("fix") else None]
        return " ".join(part for part in parts if part)
    how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited with {returncode}"
    last = next((line.strip() for line in reversed(tail) if line.strip()), "")
    return f"peftctl train {how}" + (f": {one_line(last)}" if last else "") + f" (its output: {log})"


def _evaluate(plan: BakeoffPlan, state: dict[str, Any], run: Run, position: str, say: Progress):
    """The run's adapter scored on the recipe's held-out file as `peftctl eval` scores it (token
    accuracy; exact match over `--samples` greedy replies), and the base model once per held-out
    set; (None, why) where there is nothing to score on or scoring fails."""
    from peftctl.eval.scores import held_out_rows
    from peftctl.export.adapter_files import load_adapter
    from peftctl.model.loading import load_model

    recipe, samples = run.recipe, plan.request.samples
    validation = recipe.data.validation
    if not (isinstance(validation, Path) and validation.is_file()):
        return None, "not scored: data.validation is not a local file (peftctl eval reads one)"
    adapter_dir = plan.out / run.run_dir / "adapter"
    try:
        held = held_out_rows([adapter_dir], validation, recipe.data.format, recipe.data.max_seq_len)
        say(f"{position}: scoring on {len(held.examples)} held-out rows ({samples} generated replies)")
        bases = state["base"] = state.get("base") or {}
        key = hashlib.sha256(json.dumps([held.spec.model_dump(mode="json"), str(validation), recipe.data.format,
                                         recipe.data.max_seq_len, samples]).encode()).hexdigest()[:12]
        if key not in bases:
            say(f"{position}: scoring the base model once on them")
            bases[key] = {"model": recipe.model.name_or_path, "data": str(validation),
                          **held.score(load_model(held.spec, held.head), samples).figures()}
            save_state(plan.out, state)
        model = load_model(held.spec, held.head)
        load_adapter(model, adapter_dir)
        scores = held.score(model, samples)
    except UserError as err:
        return None, f"not scored: {one_line(err)}"
    return scores, None


def _figures(plan: BakeoffPlan, run: Run, entry: dict[str, Any], scores) -> dict[str, Any]:
    """The table's figures for a done run (state.FIGURES)."""
    trained = entry["train"]
    adapter = plan.out / run.run_dir / "adapter"
    return {
        "trainable_params": trained["trainable_params"],
        "trainable_percent": trained["trainable_percent"],
        "planned_peak_bytes": run.planned_peak_bytes,
        # The training process's own figure (CUDA memory allocated on a GPU); its rusage on CPU without one.
        "measured_peak_bytes": trained.get("peak_memory_bytes") or entry.get("rusage_peak_bytes"),
        "tokens_per_s": trained["tokens_per_s"],
        "wall_s": round(entry["wall_s"], 1),
        "val_loss_before": trained["val_loss_before"],
        "val_loss_after": trained["val_loss_after"],
        "token_accuracy": scores.token_accuracy if scores else None,
        "exact_match": scores.exact_match if scores else None,
        # The task's own held-out metric, by which the table ranks classifiers and seq2seq models.
        "accuracy": scores.accuracy if scores else None,
        "rouge_l": scores.rouge_l if scores else None,
        "adapter_bytes": sum(f.stat().st_size for f in adapter.rglob("*") if f.is_file()) if adapter.is_dir() else None,
        "mergeable": METHODS[run.recipe.method.name].merge_refusal is None,
    }
