"""Experiment trackers (`train.report_to`): every entry of metrics.jsonl also goes to TensorBoard,
Weights & Biases or MLflow, through each library's own API, as the Hugging Face Trainer's
integration callbacks (transformers' integrations/integration_utils.py) send theirs.

The figures carry the Trainer's names (`train/loss`, `train/learning_rate`, `train/grad_norm`,
`eval/loss`; the rest of an entry as `train/<key>`) and the optimizer step as the global step.
Each tracker is one small class behind one interface: `start` a run with the recipe as its
configuration, `log` each entry, `finish` with how training ended. `tracking` holds them for a
run; `check_installed` runs before any weights load. Where each reports is the library's own
choice from its own variables (WANDB_MODE=offline, MLFLOW_TRACKING_URI), with peftctl's defaults
where the library has none that suits a run folder (TensorBoard's folder, wandb's project).

On `--resume` each tracker continues the same run: TensorBoard writes into the same folder and
hides what the interrupted run logged (TensorBoard's own restart rule, `purge_step`; its fast
loader drops a series' later steps when an earlier one comes again), then gets the checkpoint's
metrics again from step 0, so the folder shows exactly metrics.jsonl; wandb and MLflow
reattach to their run by the id kept in <output>/tracker_runs.json and log from the checkpoint
on (what a crashed run logged past its checkpoint stays there: neither deletes logged values).
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from peftctl.core import jsontext
from peftctl.core.errors import UserError, one_line
from peftctl.core.files import atomic_write_text, writing

TENSORBOARD_DIR = "tensorboard"  # under the output folder: `tensorboard --logdir runs` shows every run
RUN_IDS = "tracker_runs.json"  # the wandb and MLflow run ids a resumed run continues
# metrics.jsonl's keys as the Trainer names them (its rewrite_logs: eval_* under eval/, the rest under train/).
_NAMES = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm", "val_loss": "eval/loss"}


def tracked(entry: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """A metrics entry's step and its figures under the trackers' names; a null figure (grad_norm
    without clipping) is left out, as the Trainer leaves out what it did not measure."""
    figures = {}
    for key, value in entry.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = _NAMES.get(key) or (f"eval/{key[4:]}" if key.startswith("val_") else f"train/{key}")
        figures[name] = float(value)
    return int(entry["step"]), figures


def run_name(out_dir: Path) -> str:
    """A run's name in the trackers: its output folder's (the Trainer's default run name is its output folder too)."""
    return out_dir.resolve().name


@dataclass
class RunInfo:
    """What a tracker starts its run with."""

    out_dir: Path
    config: dict[str, Any]  # the recipe as the run resolved it
    resumed: bool = False
    ids: dict[str, str] = field(default_factory=dict)  # run ids kept by the run this one resumes

    @property
    def name(self) -> str:
        return run_name(self.out_dir)


class Tracker(Protocol):
    name: str
    run_id: str | None  # what --resume continues (kept in tracker_runs.json); None: nothing to keep
    fix: str  # what to do when the run cannot start

    def start(self, run: RunInfo) -> bool:
        """Open the run; True when it continues this training's own run, which already holds the
        metrics up to the checkpoint (otherwise they are logged to it again)."""

    def log(self, step: int, figures: dict[str, float]) -> None: ...
    def finish(self, status: str) -> None:
        """Close the run; `status`: finished, failed, or killed (Ctrl-C, SIGTERM)."""

    def errors(self) -> tuple[type[BaseException], ...]:
        """The library's exceptions for a run it cannot open (bad settings, no login, an unwritable store)."""


class TensorBoard:
    name, run_id = "tensorboard", None
    fix = "make the output folder writable, or drop tensorboard from train.report_to"

    @staticmethod
    def where(out_dir: Path) -> str:
        return str(out_dir / TENSORBOARD_DIR)

    def start(self, run: RunInfo) -> bool:
        from torch.utils.tensorboard import SummaryWriter  # as the Trainer's TensorBoardCallback

        # purge_step=0 writes a restart event that makes TensorBoard's readers drop every event
        # written before it; the checkpoint's metrics are then logged again (start returns False).
        self.writer = SummaryWriter(self.where(run.out_dir), purge_step=0 if run.resumed else None)
        self.writer.add_text("recipe", "```\n" + yaml.safe_dump(run.config, sort_keys=False) + "```")
        return False

    def log(self, step: int, figures: dict[str, float]) -> None:
        for name, value in figures.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # a running `tensorboard` shows each entry as it comes

    def finish(self, status: str) -> None:
        self.writer.close()

    def errors(self) -> tuple[type[BaseException], ...]:
        return (OSError,)


class Wandb:
    name, run_id = "wandb", None
    fix = "log in with `wandb login`, or train offline with WANDB_MODE=offline (and `wandb sync` the run later)"

    @staticmethod
    def settings(out_dir: Path) -> dict[str, str]:
        """wandb.init's project, name and folder: the WANDB_* variables where set (as wandb reads
        them), else project peftctl, the output folder's name, and the output folder."""
        env = os.environ
        return {"project": env.get("WANDB_PROJECT") or "peftctl", "name": env.get("WANDB_NAME") or run_name(out_dir),
                "dir": env.get("WANDB_DIR") or str(out_dir)}

    @classmethod
    def where(cls, out_dir: Path) -> str:
        chosen = cls.settings(out_dir)
        return f"project {chosen['project']}, {os.environ.get('WANDB_MODE') or 'online'}, files in {chosen['dir']}/wandb"

    def start(self, run: RunInfo) -> bool:
        import wandb

        stored = run.ids.get(self.name)
        # resume="allow" continues the run with this id, or starts it; WANDB_MODE (offline,
        # disabled) is wandb's own to read.
        self.run = wandb.init(**self.settings(run.out_dir), id=stored, resume="allow" if stored else None)
        self.run.config.update(run.config, allow_val_change=True)  # a resumed run may have changed lr, max_steps
        self.run_id = self.run.id
        self.run.define_metric("train/global_step")  # the x-axis, as the Trainer defines it
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)
        return stored is not None

    def log(self, step: int, figures: dict[str, float]) -> None:
        self.run.log({**figures, "train/global_step": step})

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)

    def errors(self) -> tuple[type[BaseException], ...]:
        import wandb

        return (wandb.errors.Error, OSError)


class MLflow:
    name, run_id = "mlflow", None
    fix = "check MLFLOW_TRACKING_URI (unset: MLflow's default, a SQLite file mlflow.db in the current folder)"
    _STATUS = {"finished": "FINISHED", "failed": "FAILED", "killed": "KILLED"}

    @staticmethod
    def where(out_dir: Path) -> str:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db in the current folder, MLflow's default"
        return f"store {uri}; experiment {os.environ.get('MLFLOW_EXPERIMENT_NAME') or 'Default'}"

    def start(self, run: RunInfo) -> bool:
        import mlflow
        from mlflow.exceptions import MlflowException

        # MLflow reads MLFLOW_TRACKING_URI and MLFLOW_RUN_ID itself; the experiment is set (and
        # created if new) as the Trainer does, else MLflow's Default.
        stored = run.ids.get(self.name)
        if stored:
            try:
                self.run_id = mlflow.start_run(run_id=stored).info.run_id
                return True
            except MlflowException:  # not in this store (MLFLOW_TRACKING_URI changed): a new run
                pass
        if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
            mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
        self.run_id = mlflow.start_run(run_name=run.name).info.run_id
        params = [(key, value[: mlflow.utils.validation.MAX_PARAM_VAL_LENGTH]) for key, value in _flat(run.config)]
        try:
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
                mlflow.log_params(dict(params[i:i + 100]))
        except BaseException:  # not left active: the process's next run could not start
            mlflow.end_run(status="FAILED")
            raise
        return False

    def log(self, step: int, figures: dict[str, float]) -> None:
        import mlflow

        mlflow.log_metrics(figures, step=step)

    def finish(self, status: str) -> None:
        import mlflow

        mlflow.end_run(status=self._STATUS[status])

    def errors(self) -> tuple[type[BaseException], ...]:
        from mlflow.exceptions import MlflowException

        return (MlflowException, OSError)


TRACKER_CLASSES: dict[str, type] = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": MLflow}


def _flat(config: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """The recipe as MLflow parameters: `train.lr` -> '0.0002', lists and null as JSON."""
    for key, value in config.items():
        if isinstance(value, dict) and value:
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value if isinstance(value, str) else jsontext.dumps(value)


def _needs(name: str) -> tuple[str, ...]:
    """The modules a tracker imports: MLflow's database stores (its default, a local SQLite file,
    among them) also need SQLAlchemy and Alembic, which mlflow-skinny leaves out."""
    if name != "mlflow":
        return (name,)
    scheme = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:").split(":", 1)[0].split("+")[0]
    return ("mlflow", "sqlalchemy", "alembic") if scheme in ("sqlite", "postgresql", "mysql", "mssql") else ("mlflow",)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules is one that may not be imported
        return False


def check_installed(names: Iterable[str]) -> None:
    """Every tracker `train.report_to` names can be imported: checked before any weights load."""
    missing = {name: [m for m in _needs(name) if not _installed(m)] for name in names}
    missing = {name: modules for name, modules in missing.items() if modules}
    if not missing:
        return
    what = "; ".join(f"{name} needs {', '.join(modules)}" for name, modules in missing.items())
    raise UserError(f"a tracker named here is not installed: {what}", where="train.report_to",
                    expected="trackers whose libraries are installed (each is an optional extra of peftctl)",
                    fix=f"pip install 'peftctl[{','.join(missing)}]', or drop {', '.join(missing)} from train.report_to")


def describe(names: Iterable[str], out_dir: Path) -> str | None:
    """Where each tracker reports to, for `peftctl validate`."""
    parts = [f"{name} ({TRACKER_CLASSES[name].where(out_dir)})" for name in names]
    return "; ".join(parts) or None


@contextmanager
def tracking(names: Iterable[str], out_dir: Path, config: dict[str, Any], history: list[dict[str, Any]] | None,
             note: Callable[[str], None] | None = None) -> Iterator[Callable[[dict[str, Any]], None] | None]:
    """Start the trackers `names` for a run writing `out_dir`; yield what sends a metrics entry to
    them all (None without trackers); finish them however the run ends.

    `history`: the metrics of the checkpoint a resumed run continues (None: a new run). `note`
    tells the user of a tracker that stopped working (the progress report's note; else a warning):
    a tracker never stops a training run once it is under way, metrics.jsonl stays the record.
    """
    from peftctl.train.loop import TrainingInterrupted

    names = list(names)
    if not names:
        yield None
        return
    group = _Group(names, out_dir, note or (lambda text: warnings.warn(text, stacklevel=3)))
    group.start(config, history)
    try:
        yield group.log
    except (KeyboardInterrupt, TrainingInterrupted):
        group.finish("killed")
        raise
    except BaseException:
        group.finish("failed")
        raise
    group.finish("finished")


class _Group:
    """The trackers of one run, started and finished together."""

    def __init__(self, names: list[str], out_dir: Path, note: Callable[[str], None]):
        self.out_dir, self.note = out_dir, note
        self.waiting = [TRACKER_CLASSES[name]() for name in names]
        self.running: list[Tracker] = []

    def start(self, config: dict[str, Any], history: list[dict[str, Any]] | None) -> None:
        run = RunInfo(self.out_dir, config, resumed=history is not None,
                      ids=self._kept_ids() if history is not None else {})
        for tracker in self.waiting:
            try:
                continued = tracker.start(run)
                self.running.append(tracker)
                if not continued:
                    for entry in history or ():
                        tracker.log(*tracked(entry))
            except ImportError as err:  # installed, but not importable (a broken or too old install)
                self._refuse(tracker, err, f"pip install -U 'peftctl[{tracker.name}]'")
            except BaseException as err:
                if not isinstance(err, tracker.errors()):
                    self.finish("failed")
                    raise
                self._refuse(tracker, err, tracker.fix)
        ids = {tracker.name: tracker.run_id for tracker in self.running if tracker.run_id}
        if ids:
            path = self.out_dir / RUN_IDS
            with writing(path, "the trackers' run ids"):
                atomic_write_text(path, json.dumps({**run.ids, **ids}, indent=1) + "\n")

    def _refuse(self, tracker: Tracker, err: BaseException, fix: str) -> None:
        self.finish("failed")
        raise UserError(f"{tracker.name} could not start its run: {one_line(err)}", where="train.report_to",
                        fix=fix) from None

    def _kept_ids(self) -> dict[str, str]:
        try:
            kept = json.loads((self.out_dir / RUN_IDS).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none kept (no tracker had a run): new runs
            return {}
        return {k: v for k, v in kept.items() if isinstance(v, str)} if isinstance(kept, dict) else {}

    def log(self, entry: dict[str, Any]) -> None:
        step, figures = tracked(entry)
        for tracker in list(self.running):
            try:
                tracker.log(step, figures)
            except Exception as err:  # a tracker's server or disk failing must not end hours of training
                self.running.remove(tracker)
                self.note(f"{tracker.name} stopped logging at step {step} ({one_line(err)}); training goes on, "
                          "metrics.jsonl holds every figure")
                self._close(tracker, "failed")

    def finish(self, status: str) -> None:
        while self.running:
            self._close(self.running.pop(), status)

    def _close(self, tracker: Tracker, status: str) -> None:
        try:
            tracker.finish(status)
        except Exception as err:  # the run is over either way; say so rather than hide the result
            self.note(f"{tracker.name} could not close its run ({one_line(err)})")
