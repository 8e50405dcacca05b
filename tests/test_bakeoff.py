"""`peftctl bakeoff`: several methods on one recipe, one run after another, in one table.

The runs train the builtin tiny GPT-2 (recipes/smoke-gpt2.yaml) for 2 steps, each `peftctl train`
in a process of its own, as the command runs them; the bake-off itself runs in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_checks import assert_refused, invoke, snapshot
from peftctl.bakeoff.planning import Request, learning_rate, variant_options, plan_bakeoff, split_values
from peftctl.bakeoff.state import FIGURES, ordered
from peftctl.methods import METHODS
from peftctl.recipe.load import load_recipe

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes" / "smoke-gpt2.yaml"
THREE = ("--methods", "lora,ia3,bitfit", "--budget-steps", "2")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    # One thread per training process, as conftest.py sets for this one: two OpenMP threads that
    # spin-wait on each other make a tiny model's training many times slower on a shared CPU.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished bake-off of three methods, run once for this file (read it, or copy it to change it)."""
    out = tmp_path_factory.mktemp("bakeoff") / "three"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        result = invoke("bakeoff", SMOKE, *THREE, "--output", out)
    assert result.exit_code == 0, result.output
    return out, result.output


def state_of(out: Path) -> dict:
    return json.loads((out / "bakeoff.json").read_text())


def test_three_methods_make_one_table_of_sane_figures_sorted_by_validation_loss(done):
    out, output = done
    state = state_of(out)
    runs = state["runs"]
    assert [run["label"] for run in runs] == ["lora", "ia3", "bitfit"]  # the order asked, in the state
    assert all(run["status"] == "done" and run["error"] is None for run in runs)
    for run in runs:
        f = run["figures"]
        assert list(f) == list(FIGURES)
        assert 0 < f["trainable_params"] and 0 < f["trainable_percent"] < 100
        assert f["val_loss_after"] < f["val_loss_before"], run  # 2 steps at the recipe's lr are enough here
        assert f["tokens_per_s"] > 0 and f["wall_s"] > 0 and f["planned_peak_bytes"] > 0
        # The training process's own peak resident size, no more than the kernel's figure for it at its exit.
        assert 0.5 * run["rusage_peak_bytes"] <= f["measured_peak_bytes"] <= run["rusage_peak_bytes"]
        assert 0 <= f["token_accuracy"] <= 1 and 0 <= f["exact_match"] <= 1
        adapter = out / run["run_dir"] / "adapter"
        assert f["adapter_bytes"] == sum(p.stat().st_size for p in adapter.iterdir())
        assert f["mergeable"] is True  # LoRA, IA3 and BitFit all fold into the base
        assert (out / run["recipe_file"]).is_file() and run["train"]["steps"] == 2
    # The recipe's lr for its own method (LoRA) and BitFit (no lr source of its own), IA3's 50x.
    assert [run["lr"] for run in runs] == [1e-2, 0.5, 1e-2]
    losses = [run["figures"]["val_loss_after"] for run in ordered(runs)]
    assert losses == sorted(losses)
    # The table and bakeoff.md list the runs in that order; the progress named each run and its place.
    table_order = [label for label in ("lora", "ia3", "bitfit") if f"│ {label} " in output]
    assert sorted(table_order, key=lambda label: output.index(f"│ {label} ")) == [r["label"] for r in ordered(runs)]
    report = (out / "bakeoff.md").read_text()
    assert [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ") and "→" in line] == \
        [r["label"] for r in ordered(runs)]
    assert "peftctl bakeoff" in report and f"peftctl train {out / 'recipes' / 'ia3.yaml'}" in report
    assert "2/3 ia3 step 2/2" in output
    assert state["base"] and next(iter(state["base"].values()))["loss"] == pytest.approx(
        runs[0]["figures"]["val_loss_before"], rel=1e-3)  # the same rows as training's own validation


def test_trainable_counts_are_those_of_peftctl_train_alone(done, tmp_path):
    out, _ = done
    for run in state_of(out)["runs"]:
        alone = invoke("train", SMOKE, "--set", f"method={{name: {run['method']}}}", "--set", "train.max_steps=1",
                       "--output", tmp_path / run["label"], "--json")
        assert alone.exit_code == 0, alone.output
        if run["method"] == "lora":  # the recipe's own LoRA (r=8 on c_attn), not LoRA's defaults
            alone = invoke("train", SMOKE, "--set", "train.max_steps=1", "--output", tmp_path / "own", "--json")
        assert json.loads(alone.stdout)["trainable_params"] == run["figures"]["trainable_params"]


def test_options_carry_over_where_they_mean_the_same_and_lr_scales_with_the_methods_sources():
    base = load_recipe(SMOKE)  # LoRA r=8, alpha=16 on c_attn, lr 1e-2
    assert variant_options(base, METHODS["lora"], {"use_dora": True})[0] == {
        "r": 8, "alpha": 16, "target_modules": ["c_attn"], "use_dora": True}
    assert variant_options(base, METHODS["loha"], {})[0] == {"r": 8, "alpha": 16, "target_modules": ["c_attn"]}
    assert variant_options(base, METHODS["vera"], {})[0] == {"target_modules": ["c_attn"]}  # VeRA's r is another rank
    assert variant_options(base, METHODS["ia3"], {})[0] == {}
    assert variant_options(base, METHODS["bitfit"], {})[0] == {"create_missing_biases": True}
    assert learning_rate(base, METHODS["lora"], False)[0] == 1e-2
    assert learning_rate(base, METHODS["prompt_tuning"], False)[0] == 0.1
    assert learning_rate(base, METHODS["houlsby"], False)[0] == 1e-2
    assert learning_rate(base, METHODS["ia3"], True)[0] == 1e-2  # --set train.lr: one lr for all


def test_a_grid_makes_a_run_per_value_for_the_methods_that_have_the_key(tmp_path):
    plan = plan_bakeoff(Request(SMOKE, "lora,ia3", ["method.r=2,4", "train.lr=1e-3,1e-2"], budget_steps=3,
                                output=tmp_path / "grid"))
    assert [run.label for run in plan.runs] == ["lora r=2 lr=1e-3", "lora r=2 lr=1e-2", "lora r=4 lr=1e-3",
                                                "lora r=4 lr=1e-2", "ia3 lr=1e-3", "ia3 lr=1e-2"]
    assert [(run.recipe.method.name, getattr(run.recipe.method, "r", None), run.lr) for run in plan.runs] == [
        ("lora", 2, 1e-3), ("lora", 2, 1e-2), ("lora", 4, 1e-3), ("lora", 4, 1e-2), ("ia3", None, 1e-3), ("ia3", None, 1e-2)]
    assert plan.runs[0].settings == {"method.r": 2, "train.lr": 1e-3}
    assert len({run.run_dir for run in plan.runs}) == 6 and plan.runs[0].run_dir == "lora_r=2_lr=1e-3"
    assert all(run.recipe.train.max_steps == 3 and run.recipe.output.dir == (tmp_path / "grid" / run.run_dir).absolute()
               for run in plan.runs)
    assert [run.trainable_params for run in plan.runs[:3:2]] == [1024, 2048]  # on the weightless model, planned
    assert not (tmp_path / "grid").exists()  # planning writes nothing
    assert split_values("[q_proj,v_proj], all-linear,'a,b'") == ["[q_proj,v_proj]", "all-linear", "'a,b'"]


def test_an_interrupted_run_is_trained_again_and_done_runs_are_kept(done, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(done[0], out)
    state = state_of(out)
    state["runs"][2].update(status="running", figures={}, train=None)  # stopped before its first checkpoint
    (out / "bakeoff.json").write_text(json.dumps(state))
    shutil.rmtree(out / "bitfit")
    kept = {name: snapshot(out / name) for name in ("lora", "ia3")}
    result = invoke("bakeoff", SMOKE, *THREE, "--output", out)
    assert result.exit_code == 0, result.output
    assert "1/3 lora: done before, kept" in result.output and "3/3 bitfit: training" in result.output
    assert {name: snapshot(out / name) for name in ("lora", "ia3")} == kept  # not trained again
    assert [run["status"] for run in state_of(out)["runs"]] == ["done"] * 3
    assert state_of(out)["runs"][2]["train"]["resumed_from_step"] is None
    assert (out / "bitfit" / "adapter" / "adapter_model.safetensors").is_file()


def test_ctrl_c_stops_the_run_in_training_with_a_checkpoint_and_the_same_command_continues_it(tmp_path):
    out = tmp_path / "stopped"
    options = ["--methods", "lora,ia3", "--budget-steps", "60", "--set", "train.log_every=1",
               "--set", "train.save_every=1000", "--samples", "0", "--output", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "peftctl", "bakeoff", str(SMOKE), *options], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics, deadline = out / "ia3" / "metrics.jsonl", time.monotonic() + 240
    while '"loss"' not in (metrics.read_text() if metrics.exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the bake-off and its run both get it
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and f"--output {out}" in stderr and "continue with" in stderr
    state = state_of(out)
    assert [run["status"] for run in state["runs"]] == ["done", "running"]
    assert list((out / "ia3" / "checkpoints").iterdir())  # the stopped run's checkpoint, from SIGTERM
    kept = snapshot(out / "lora")

    result = invoke("bakeoff", SMOKE, *options)
    assert result.exit_code == 0, result.output
    state = state_of(out)
    assert [run["status"] for run in state["runs"]] == ["done", "done"]
    assert snapshot(out / "lora") == kept
    assert 1 <= state["runs"][1]["train"]["resumed_from_step"] < 60 and state["runs"][1]["train"]["steps"] == 60


def test_another_bake_off_in_the_same_folder_is_refused_and_overwrite_starts_again(done, tmp_path):
    out = done[0]
    before = snapshot(out)
    assert_refused(invoke("bakeoff", SMOKE, "--methods", "lora,ia3", "--budget-steps", "2", "--output", out),
                   "--output", "holds another bake-off", "--methods", "--overwrite")
    assert_refused(invoke("bakeoff", SMOKE, *THREE[:2], "--budget-steps", "3", "--output", out), "budget")
    assert_refused(invoke("bakeoff", SMOKE, *THREE, "--set", "train.seed=1", "--output", out), "recipe content")
    assert snapshot(out) == before

    # --overwrite, here with a time budget: 1e-4 minutes are spent after the first of 100,000 steps.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    result = invoke("bakeoff", SMOKE, "--methods", "lora", "--budget-minutes", "0.0001", "--set",
                    "train.max_steps=100000", "--output", copy, "--overwrite", "--json")
    assert result.exit_code == 0, result.output
    state = json.loads(result.stdout)
    assert state == state_of(copy) and [run["label"] for run in state["runs"]] == ["lora"]
    assert state["budget"] == {"minutes": 0.0001} and state["runs"][0]["train"]["steps"] < 100000
    assert not (copy / "ia3").exists()  # the earlier bake-off's runs went


def test_a_failing_run_is_recorded_with_its_error_and_the_others_are_done(tmp_path):
    out = tmp_path / "failing"
    result = invoke("bakeoff", SMOKE, "--methods", "lora", "--grid", "train.lr=1e-2,1e30", "--budget-steps", "2",
                    "--set", "train.max_grad_norm=null", "--set", "train.warmup_steps=0", "--samples", "1",
                    "--output", out)
    assert result.exit_code == 0, result.output
    ok, failed = state_of(out)["runs"]
    assert ok["status"] == "done" and ok["figures"]["val_loss_after"] is not None
    assert failed["status"] == "failed" and "not finite" in failed["error"] and failed["figures"] == {}
    assert f"failed: lora lr=1e30: {failed['error']}" in " ".join(result.output.split())


@pytest.mark.parametrize("args, phrases", [
    (["--methods", "lora,lorra"], ["--methods", "unknown method 'lorra'", "did you mean 'lora'?"]),
    (["--methods", "lora,ia3", "--grid", "method.rr=4,8"], ["--grid method.rr=4,8", "no method of this bake-off",
                                                            "did you mean 'r'?"]),
    (["--methods", "lora", "--grid", "method.r=4,x"], ["bake-off run 'lora r=x'", "method.r (from --grid method.r=4,x)"]),
    (["--methods", "lora", "--grid", "method.r"], ["--grid method.r", "KEY=V1,V2"]),
    (["--methods", "lora", "--grid", "method.name=ia3"], ["method.name is what --methods sets"]),
    (["--methods", "lora", "--grid", "train.lrr=1,2"], ["train.lrr", "did you mean 'lr'?"]),
], ids=["unknown-method", "grid-key-no-method-has", "bad-grid-value", "grid-without-values", "grid-over-method",
        "grid-unknown-key"])
def test_bad_input_exits_2_before_anything_is_written(args, phrases, tmp_path):
    budget = [] if "--budget-steps" in args else ["--budget-steps", "2"]
    assert_refused(invoke("bakeoff", SMOKE, *args, *budget, "--output", tmp_path / "out"), *phrases)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("budget, phrases", [
    ([], ["needs one budget", "--budget-steps N"]),
    (["--budget-steps", "2", "--budget-minutes", "1"], ["two budgets"]),
    (["--budget-steps", "0"], ["--budget-steps", "at least one step"]),
    (["--budget-minutes", "-1"], ["--budget-minutes", "positive number of minutes"]),
])
def test_exactly_one_positive_budget(budget, phrases, tmp_path):
    assert_refused(invoke("bakeoff", SMOKE, "--methods", "lora", *budget, "--output", tmp_path / "out"), *phrases)
    assert not (tmp_path / "out").exists()


def test_runs_the_model_refuses_are_found_before_the_first_run_trains(tmp_path):
    # Known from the weightless model and the rows, for every run at once: prefix tuning's KV cache,
    # which gradient checkpointing drops, and 5,000 virtual tokens on a model with fewer positions.
    message = assert_refused(invoke("bakeoff", SMOKE, "--methods", "lora,ia3,prefix_tuning,prompt_tuning", "--grid",
                                    "method.num_virtual_tokens=4,5000", "--set", "train.gradient_checkpointing=true",
                                    "--budget-steps", "2", "--output", tmp_path / "out"),
                             "bake-off run 'prefix_tuning num_virtual_tokens=4'", "gradient checkpointing",
                             "bake-off run 'prompt_tuning num_virtual_tokens=5000'", "method.num_virtual_tokens")
    assert "also:" in message and "bake-off run 'prompt_tuning num_virtual_tokens=4'" not in message
    assert not (tmp_path / "out").exists()


def test_overwrite_only_replaces_a_bake_off_folder(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert_refused(invoke("bakeoff", SMOKE, *THREE, "--output", other), "already exists and is not empty")
    assert_refused(invoke("bakeoff", SMOKE, *THREE, "--output", other, "--overwrite"), "only replaces")
    assert (other / "notes.txt").read_text() == "mine"


def test_max_minutes_stops_the_loop_after_the_step_that_spends_them(tmp_path):
    from peftctl import methods
    from peftctl.data.tokenize import load_data
    from peftctl.methods.lora import LoraConfig
    from peftctl.model.loading import load_tokenizer
    from peftctl.recipe.schema import DataSpec, TrainSpec
    from peftctl.train.loop import train
    from tiny_models import TINY_GPT2, tiny_gpt2

    tokenizer = load_tokenizer(TINY_GPT2)
    data = load_data(DataSpec(train=ROOT / "recipes/data/tiny/train.jsonl",
                              validation=ROOT / "recipes/data/tiny/validation.jsonl"), tokenizer, seed=0)
    adapter = methods.apply(tiny_gpt2(), LoraConfig(name="lora", r=4, target_modules=["c_attn"]))
    result = train(adapter, data, TrainSpec(max_steps=100_000, max_minutes=1e-6, log_every=1000), tmp_path,
                   tokenizer.pad_token_id)
    assert result.steps == 1 and result.val_loss_after is not None
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 1]  # validation before, the last step logged, validation after
    assert (tmp_path / "checkpoints" / "step-1").is_dir()
    assert result.peak_memory_bytes > 0


@pytest.mark.slow
def test_quickstart_bakeoff_of_two_methods(tmp_path):
    out = tmp_path / "quickstart"
    result = subprocess.run([sys.executable, "-m", "peftctl", "bakeoff", "recipes/quickstart.yaml", "--methods",
                             "lora,ia3", "--budget-steps", "5", "--samples", "1", "--output", str(out), "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads(result.stdout)
    for run in state["runs"]:
        assert run["status"] == "done", run
        assert run["figures"]["val_loss_after"] < run["figures"]["val_loss_before"], run
    assert [run["lr"] for run in state["runs"]] == [1e-3, 5e-2]
