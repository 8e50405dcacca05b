"""Experiment trackers (`train.report_to`): what each one holds is read back with the library's
own reader and compared with metrics.jsonl step for step.

TensorBoard's event files through its EventAccumulator, MLflow's store (a SQLite file in a tmp
folder) through MlflowClient, wandb's offline run file through wandb's own record format. Nothing
reaches a network: WANDB_MODE=offline, MLflow on a local file, every folder under tmp.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli_checks import assert_refused
from peftctl.cli.commands import app
from peftctl.core.errors import UserError
from peftctl.recipe.load import load_recipe
from peftctl.recipe.schema import TRACKERS
from peftctl.run import pipeline
from peftctl.train import trackers
from peftctl.train.loop import TrainingInterrupted
from test_checkpoint import StopAt  # SIGINT during a given step, as a Ctrl-C would

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes" / "smoke-gpt2.yaml"
EXPERIMENT = "peftctl-tests"
# Every figure each step, validation every 2 steps: a few points of each curve.
SETS = ["train.max_steps=6", "train.log_every=1", "train.eval_every=2"]
HAS_WANDB = trackers._installed("wandb")
ALL = ["tensorboard", "mlflow", *(["wandb"] if HAS_WANDB else [])]


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """The libraries' stores and caches in a tmp folder, and no network."""
    home = tmp_path_factory.mktemp("trackers-home")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        env.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            env.setenv(name, str(home / name.lower()))
        for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_NAME", "WANDB_RUN_ID", "MLFLOW_RUN_ID"):
            env.delenv(name, raising=False)
        yield home


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def curve(entries: list[dict], key: str) -> list[tuple[int, float]]:
    return [(e["step"], e[key]) for e in entries if e.get(key) is not None]


def assert_same_curve(got: list[tuple[int, float]], expected: list[tuple[int, float]], rel: float = 0.0) -> None:
    assert [step for step, _ in got] == [step for step, _ in expected] and expected
    assert [value for _, value in got] == pytest.approx([value for _, value in expected], rel=rel)


def tensorboard_curves(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_run(out: Path):
    from mlflow.tracking import MlflowClient

    run_id = json.loads((out / trackers.RUN_IDS).read_text())["mlflow"]
    return MlflowClient(), MlflowClient().get_run(run_id)


def wandb_records(out: Path) -> list:
    """Every record of the offline runs under out/wandb, oldest run first. The .wandb file is
    wandb's record log (LevelDB's log format: 32 KiB blocks of chunks with a 7-byte header) of
    wandb's own protobuf Records, after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        assert data.startswith(b":W&B")
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind == 0:  # zero padding up to the block's end
                pos += (32768 - pos % 32768) % 32768
                continue
            pending = chunk if kind in (1, 2) else pending + chunk  # full / first; middle / last
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
    return records


def wandb_history(out: Path) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in wandb_records(out) if r.WhichOneof("record_type") == "history"]


def run_recipe(out: Path, *sets: str, reporter=None, resume=None, report_to=ALL):
    recipe = load_recipe(SMOKE, [*SETS, f"train.report_to=[{', '.join(report_to)}]", *sets], out)
    return pipeline.run(recipe, reporter, resume=resume)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One smoke run reporting to every tracker, through the CLI as a user types it."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    args = [a for s in [*SETS, f"train.report_to=[{', '.join(ALL)}]"] for a in ("--set", s)]
    result = CliRunner().invoke(app, ["train", str(SMOKE), *args, "--output", str(out), "--json"])
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)  # the trackers printed nothing into --json's one object
    return out, lines(out)


def test_tensorboard_event_file_holds_the_same_losses_as_metrics_jsonl(tracked):
    out, entries = tracked
    curves = tensorboard_curves(out)
    for tag, key in (("train/loss", "loss"), ("train/learning_rate", "lr"), ("eval/loss", "val_loss"),
                     ("train/grad_norm", "grad_norm")):
        assert_same_curve(curves[tag], curve(entries, key), rel=1e-6)  # TensorBoard keeps float32
    assert [step for step, _ in curves["eval/loss"]] == [0, 2, 4, 6]


def test_mlflow_store_holds_the_same_losses_and_the_recipe(tracked):
    out, entries = tracked
    client, run = mlflow_run(out)
    for name, key in (("train/loss", "loss"), ("train/learning_rate", "lr"), ("eval/loss", "val_loss")):
        history = client.get_metric_history(run.info.run_id, name)
        assert_same_curve([(m.step, m.value) for m in history], curve(entries, key))
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT  # MLFLOW_EXPERIMENT_NAME
    assert run.data.params["train.max_steps"] == "6" and run.data.params["method.target_modules"] == '["c_attn"]'


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install 'peftctl[wandb]')")
def test_wandb_offline_run_holds_the_same_losses(tracked):
    out, entries = tracked
    history = wandb_history(out)
    for name, key in (("train/loss", "loss"), ("train/learning_rate", "lr"), ("eval/loss", "val_loss")):
        assert_same_curve([(row["train/global_step"], row[name]) for row in history if name in row],
                          curve(entries, key))
    config = {item.key: json.loads(item.value_json) for r in wandb_records(out)
              if r.WhichOneof("record_type") == "config" for item in r.config.update}
    assert config["train"]["max_steps"] == 6 and config["method"]["name"] == "lora"


def test_metric_names_are_the_hugging_face_trainers():
    from transformers.integrations.integration_utils import rewrite_logs

    step, figures = trackers.tracked({"step": 4, "loss": 1.5, "lr": 1e-3, "grad_norm": None, "tokens_per_s": 9.0})
    trainer = rewrite_logs({"loss": 1.5, "learning_rate": 1e-3, "grad_norm": None, "eval_loss": 2.0})
    assert step == 4 and {"train/loss", "train/learning_rate"} <= set(trainer)
    assert figures == {"train/loss": 1.5, "train/learning_rate": 1e-3, "train/tokens_per_s": 9.0}  # null left out
    assert trackers.tracked({"step": 6, "val_loss": 2.0}) == (6, {"eval/loss": 2.0}) and "eval/loss" in trainer
    assert set(trackers.TRACKER_CLASSES) == set(TRACKERS)




def test_ctrl_c_closes_the_trackers_and_resume_continues_their_runs(tmp_path):
    out = tmp_path / "run"
    sets = ("train.max_steps=8", "train.save_every=2", "train.keep_last=null")
    with pytest.raises(TrainingInterrupted):
        run_recipe(out, *sets, reporter=StopAt(6))
    ids = json.loads((out / trackers.RUN_IDS).read_text())
    client, run = mlflow_run(out)
    assert run.info.status == "KILLED"
    # As after a crash past a checkpoint: resume from step 4, so steps 5 and 6 are logged twice.
    run_recipe(out, *sets, resume=out / "checkpoints" / "step-4")
    entries = lines(out)
    assert json.loads((out / trackers.RUN_IDS).read_text()) == ids  # the same runs continued

    curves = tensorboard_curves(out)  # the interrupted run's events hidden: exactly metrics.jsonl
    assert_same_curve(curves["train/loss"], curve(entries, "loss"), rel=1e-6)
    assert_same_curve(curves["eval/loss"], curve(entries, "val_loss"), rel=1e-6)
    assert len(list((out / "tensorboard").iterdir())) == 2  # one event file per run, in one folder

    client, run = mlflow_run(out)
    assert run.info.status == "FINISHED"
    logged = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in logged) == [1, 2, 3, 4, 5, 5, 6, 6, 7, 8]  # MLflow cannot unlog 5 and 6
    last = {m.step: m.value for m in sorted(logged, key=lambda m: m.timestamp)}
    assert [(step, pytest.approx(value, abs=1e-6)) for step, value in sorted(last.items())] == curve(entries, "loss")
    if HAS_WANDB:
        # offline-run-<time>-<run id>, and -<n> after it when a second run starts in the same second
        assert len({p.name.split("-")[3] for p in (out / "wandb").glob("offline-run-*")}) == 1  # one run id


def test_a_failed_run_marks_the_tracker_runs_failed(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="not finite"):
        run_recipe(out, "train.lr=1e30", "train.max_grad_norm=null", "train.warmup_steps=0", report_to=["mlflow"])
    assert mlflow_run(out)[1].info.status == "FAILED"


def test_a_tracker_failing_mid_run_is_dropped_and_training_goes_on(tmp_path, monkeypatch):
    def full_disk(self, step, figures):
        if step >= 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(trackers.TensorBoard, "log", full_disk)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="tensorboard stopped logging at step 2 .*No space left on device"):
        summary = run_recipe(out, report_to=["tensorboard", "mlflow"])
    assert summary.result.steps == 6 and (out / "adapter" / "adapter_model.safetensors").is_file()
    client, run = mlflow_run(out)
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 6  # the other tracker logged on


def test_a_tracker_that_cannot_start_is_exit_2_and_closes_the_others(tmp_path, monkeypatch):
    def unwritable(self, run):
        raise PermissionError(13, "Permission denied", str(run.out_dir / "tensorboard"))

    monkeypatch.setattr(trackers.TensorBoard, "start", unwritable)
    out = tmp_path / "run"
    args = ["--set", "train.report_to=[mlflow, tensorboard]", "--output", str(out)]
    assert_refused(CliRunner().invoke(app, ["train", str(SMOKE), *args]), "train.report_to",
                   "tensorboard could not start its run", "Permission denied", "fix: make the output folder writable")
    assert not (out / "adapter").exists() and not (out / "checkpoints").exists()
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient().get_experiment_by_name(EXPERIMENT)
    runs = MlflowClient().search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    assert runs[0].info.status == "FAILED"  # mlflow had started: it was closed, not left running


@pytest.mark.parametrize("tracker, extra", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_tracker_not_installed_is_exit_2_before_the_weights_load(tmp_path, monkeypatch, tracker, extra):
    monkeypatch.setitem(sys.modules, tracker, None)  # what `import tensorboard` fails on when absent

    def load_model(spec):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(pipeline, "load_model", load_model)
    out = tmp_path / "run"
    for command in (["train", str(SMOKE), "--output", str(out)], ["validate", str(SMOKE)]):
        result = CliRunner().invoke(app, [*command, "--set", f"train.report_to=[{tracker}]"])
        assert_refused(result, "train.report_to", f"{tracker} needs {tracker}", f"pip install 'peftctl[{extra}]'")
    assert not out.exists()


def test_mlflow_needs_sqlalchemy_only_for_a_database_store(monkeypatch):
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    with pytest.raises(UserError, match="mlflow needs sqlalchemy"):
        trackers.check_installed(["mlflow"])  # sqlite:/// in a tmp folder (the module's setting)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(UserError, match="mlflow needs sqlalchemy"):
        trackers.check_installed(["mlflow"])  # unset: MLflow's default, sqlite:///mlflow.db
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    trackers.check_installed(["mlflow"])  # a tracking server: the client alone


@pytest.mark.parametrize("value, phrase", [
    ("[tensorbord]", "unknown tracker 'tensorbord' (did you mean 'tensorboard'?)"),
    ("[mlflow, wandb, mlflow]", "'mlflow' is named twice"),
    ("[none, wandb]", "'none' stands alone"),
    ("all", "'all' is not taken"),
    ("{wandb: true}", "expected: a list"),
])
def test_bad_report_to_values_are_exit_2_naming_the_key(value, phrase):
    result = CliRunner().invoke(app, ["validate", str(SMOKE), "--set", f"train.report_to={value}"])
    assert_refused(result, "train.report_to (from --set", phrase)


@pytest.mark.parametrize("value, names", [("tensorboard", ["tensorboard"]), ("none", []), ("[]", []),
                                          ("[wandb, mlflow]", ["wandb", "mlflow"])])
def test_report_to_takes_one_name_a_list_or_none(value, names):
    assert load_recipe(SMOKE, [f"train.report_to={value}"]).train.report_to == names
