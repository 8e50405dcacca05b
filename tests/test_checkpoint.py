"""Checkpoints: exact resume, Ctrl-C, a NaN loss, damaged or foreign checkpoints, a full disk.

The in-process runs train LoRA (with dropout, so the RNG state matters) on the builtin tiny
GPT-2 and recipes/data/tiny; the Ctrl-C test runs `python -m peftctl train` in a subprocess.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from peftctl import methods
from peftctl.cli.commands import app
from peftctl.core.errors import UserError
from peftctl.data.tokenize import load_data
from peftctl.methods.lora import LoraConfig
from peftctl.model.loading import load_tokenizer
from peftctl.recipe.schema import DataSpec, TrainSpec
from peftctl.train import checkpoint
from peftctl.train import loop as train_module
from peftctl.train.interrupts import StopRequests as _StopRequests
from peftctl.train.loop import SilentReporter, TrainingDiverged, TrainingInterrupted, train
from tiny_models import TINY_GPT2, tiny_gpt2

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes" / "smoke-gpt2.yaml"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
# 16 rows in batches of 3 with grad_accum 2: 3 steps per epoch, so 8 steps cross two epoch ends.
SPEC = dict(batch_size=3, grad_accum=2, max_steps=8, lr=1e-2, warmup_steps=2, log_every=1, eval_every=3, seed=5)
TIMING = ("tokens_per_s", "elapsed_s")


@pytest.fixture(scope="module")
def tiny_data():
    tokenizer = load_tokenizer(TINY_GPT2)
    spec = DataSpec(train=ROOT / "recipes/data/tiny/train.jsonl", validation=ROOT / "recipes/data/tiny/validation.jsonl")
    return load_data(spec, tokenizer, seed=0), tokenizer.pad_token_id


def new_adapter():
    torch.manual_seed(0)
    return methods.apply(tiny_gpt2(), LoraConfig(name="lora", r=4, dropout=0.2, target_modules=["c_attn", "c_fc"]))


class StopAt(SilentReporter):
    """Sends this process SIGINT during step `step`, as a Ctrl-C would."""

    def __init__(self, step: int):
        self.at = step

    def step(self, step, metrics):
        if step == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl without its timings, which differ between any two runs."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in entry.items() if k not in TIMING} for entry in lines]


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    data, pad_id = tiny_data
    out = tmp_path_factory.mktemp("whole")
    adapter = new_adapter()
    result = train(adapter, data, TrainSpec(**SPEC, save_every=3, keep_last=2), out, pad_id)
    return out, {name: p.detach().clone() for name, p in adapter.params.items()}, result


def test_an_interrupted_run_resumed_equals_an_uninterrupted_one(tiny_data, tmp_path, uninterrupted):
    data, pad_id = tiny_data
    whole_out, whole_params, _ = uninterrupted
    spec = TrainSpec(**SPEC, save_every=3, keep_last=2)
    before = signal.getsignal(signal.SIGINT)  # pytest's own, or SIG_IGN where pytest runs in the background
    with pytest.raises(TrainingInterrupted) as stopped:
        train(new_adapter(), data, spec, tmp_path, pad_id, StopAt(4))
    assert stopped.value.step == 4 and stopped.value.checkpoint == tmp_path / "checkpoints" / "step-4"
    # The handler in place before training is back.
    assert signal.getsignal(signal.SIGINT) is before
    assert [entry["step"] for entry in metrics(tmp_path)][-1] == 4

    adapter = new_adapter()  # a fresh process would build it the same way, then load the checkpoint
    result = train(adapter, data, spec, tmp_path, pad_id, resume=stopped.value.checkpoint)
    assert result.resumed_from == 4 and result.steps == 8
    assert metrics(tmp_path) == metrics(whole_out)  # per-step losses, lr, grad norms, validation losses
    init = new_adapter().params
    for name, param in adapter.params.items():
        assert not torch.equal(whole_params[name], init[name])  # trained: far from its init
        torch.testing.assert_close(param, whole_params[name], atol=1e-6, rtol=0)


def test_without_the_saved_rng_the_resumed_run_would_differ(tiny_data, tmp_path, uninterrupted, monkeypatch):
    """The check above is not vacuous: dropout draws from the RNG the checkpoint restores."""
    data, pad_id = tiny_data
    whole_out, whole_params, _ = uninterrupted
    monkeypatch.setattr(train_module, "_restore_rng", lambda saved, rank: None)
    adapter = new_adapter()
    train(adapter, data, TrainSpec(**SPEC, save_every=3), tmp_path, pad_id,
          resume=whole_out / "checkpoints" / "step-6")
    assert max(float((p.detach() - whole_params[n]).abs().max()) for n, p in adapter.params.items()) > 1e-5


def test_checkpoints_hold_safetensors_and_json_and_keep_last_prunes(uninterrupted):
    out, params, result = uninterrupted
    assert [n for n, _ in checkpoint.step_dirs(out / "checkpoints")] == [6, 8]  # 3 and the temp dirs are gone
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-6", "step-8"]
    final = out / "checkpoints" / "step-8"
    assert sorted(p.name for p in final.iterdir()) == [
        "adapter.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    state = json.loads((final / "state.json").read_text())
    assert state["step"] == 8 and state["micro_batches"] == 16
    assert (state["epoch"], state["epoch_micro_batch"]) == (2, 4)  # 6 micro-batches per epoch
    assert state["fingerprint"]["train.grad_accum"] == 2 and result.checkpoint == final
    saved = load_file(final / "adapter.safetensors")
    assert saved.keys() == params.keys() and all(torch.equal(saved[k], params[k]) for k in params)
    optimizer = load_file(final / "optimizer.safetensors")
    assert {k.split("/")[0] for k in optimizer} == {"step", "exp_avg", "exp_avg_sq"}
    assert all(float(optimizer[f"step/{name}"]) == 8 for name in params)


def test_a_nan_loss_stops_before_the_update_and_names_the_last_checkpoint(tiny_data, tmp_path):
    data, pad_id = tiny_data
    adapter = new_adapter()
    poisoned = {"on": False}

    class PoisonAfter(SilentReporter):
        def step(self, step, metrics):
            poisoned["on"] = step == 4  # from step 5 on, the final hidden states are NaN

    # Training forwards only: the check of step 4's weights before its checkpoint (eval mode) is clean.
    adapter.model.transformer.ln_f.register_forward_hook(
        lambda module, args, out: out * float("nan") if poisoned["on"] and module.training else out)
    with pytest.raises(TrainingDiverged) as diverged:
        train(adapter, data, TrainSpec(**SPEC, save_every=2), tmp_path, pad_id, PoisonAfter())
    message = str(diverged.value)
    assert "not finite (nan) at step 5" in message and str(tmp_path / "checkpoints" / "step-4") in message
    assert [n for n, _ in checkpoint.step_dirs(tmp_path / "checkpoints")] == [2, 4]
    assert max(entry["step"] for entry in metrics(tmp_path)) == 4
    saved = load_file(tmp_path / "checkpoints" / "step-4" / "adapter.safetensors")
    for name, param in adapter.params.items():  # step 5's NaN gradients were never applied
        assert torch.equal(param.detach(), saved[name])


def test_a_full_disk_keeps_the_previous_checkpoint(tiny_data, tmp_path, monkeypatch):
    data, pad_id = tiny_data
    real_save = checkpoint.save_file

    def save_file(tensors, path, metadata=None):
        if ".step-4.tmp-" in str(path):  # the staging folder of checkpoint step-4
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    with pytest.raises(UserError) as failed:
        train(new_adapter(), data, TrainSpec(**SPEC, save_every=2), tmp_path, pad_id)
    message = str(failed.value)
    assert "could not write checkpoint step-4: No space left on device" in message
    assert f"the previous checkpoint {tmp_path / 'checkpoints' / 'step-2'} is intact" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]  # no half-written folder
    assert checkpoint.read(tmp_path / "checkpoints" / "step-2").step == 2


def test_a_second_identical_signal_aborts_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with _StopRequests() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        os.kill(os.getpid(), signal.SIGINT)  # another kind (a launcher forwarding the stop): no abort
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


# --- the command line --------------------------------------------------------------------------


def cli(*args: str):
    return CliRunner().invoke(app, ["train", str(SMOKE), *args])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke recipe trained to the end with a checkpoint every 5 steps."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    result = cli("--output", str(out), "--set", "train.save_every=5", "--json")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("override, key", [
    ("method.r=4", "method.r"),
    ("model.dtype=bfloat16", "model.dtype"),
    ("data.max_seq_len=128", "data.max_seq_len"),
    ("train.grad_accum=2", "train.grad_accum"),
])
def test_a_checkpoint_of_another_recipe_is_refused_with_the_first_difference(smoke_run, override, key):
    result = cli("--output", str(smoke_run), "--set", "train.save_every=5", "--set", override, "--resume")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert f"{smoke_run / 'checkpoints' / 'step-20'}: {key}: the checkpoint was written by a run with {key} =" in result.output


def test_a_damaged_checkpoint_is_named_never_half_loaded(smoke_run, tmp_path):
    for damage, problem in [
        (lambda c: (c / "adapter.safetensors").write_bytes((c / "adapter.safetensors").read_bytes()[:-8] + b"\0" * 8),
         "adapter.safetensors: the checkpoint is damaged: the file's contents differ from what was written"),
        (lambda c: (c / "optimizer.safetensors").unlink(), "optimizer.safetensors: the checkpoint is damaged: the file is missing"),
        (lambda c: (c / "state.json").write_text('{"step": 1'), "state.json: the checkpoint is damaged: its state.json is not valid JSON"),
    ]:
        copy = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}" / "step-20"
        shutil.copytree(smoke_run / "checkpoints" / "step-20", copy)
        damage(copy)
        result = cli("--output", str(tmp_path / "out"), "--set", "train.save_every=5", "--resume", str(copy))
        assert result.exit_code == 2 and problem in result.output, result.output
        assert not (tmp_path / "out" / "adapter").exists()


def test_a_mismatched_tensor_is_named(smoke_run):
    saved = checkpoint.read(smoke_run / "checkpoints" / "step-20")
    targets = {name: torch.zeros(3) for name in saved.tensors["adapter"]}
    with pytest.raises(UserError, match=r"the checkpoint does not match this run|has shape"):
        checkpoint.load_into(targets, saved, "adapter")
    assert all(float(t.abs().sum()) == 0 for t in targets.values())  # nothing copied


def test_a_validation_loss_that_is_not_finite_before_training_stops_the_run(tiny_data, tmp_path):
    data, pad_id = tiny_data
    adapter = new_adapter()
    adapter.model.transformer.ln_f.register_forward_hook(lambda module, args, out: out * float("nan"))
    with pytest.raises(TrainingDiverged, match="validation loss is not finite .* at step 0.*no checkpoint was written"):
        train(adapter, data, TrainSpec(**SPEC, save_every=2), tmp_path, pad_id, SilentReporter())
    assert not (tmp_path / "checkpoints").exists()


def test_resume_needs_a_checkpoint_and_refuses_overwrite(smoke_run, tmp_path):
    result = cli("--output", str(tmp_path / "empty"), "--resume")
    assert result.exit_code == 2 and "nothing to resume" in result.output
    result = cli("--output", str(smoke_run), "--resume", "--overwrite")
    assert result.exit_code == 2 and "--overwrite would delete" in result.output
    assert (smoke_run / "checkpoints" / "step-20").is_dir()


def test_an_unwritable_output_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = cli("--output", str(blocker / "run"))
    assert result.exit_code == 2 and "could not write the output folder: Not a directory" in result.output


def test_a_nan_loss_in_the_cli_exits_without_traceback(tmp_path):
    result = cli("--output", str(tmp_path / "run"), "--set", "train.lr=1e30", "--set", "train.max_grad_norm=null",
                 "--set", "train.warmup_steps=0", "--set", "train.save_every=1")
    assert result.exit_code == 2 and "Traceback" not in result.output
    # Step 1's loss was finite, but the weights its update left are not: that checkpoint is not written.
    assert "not finite (nan) at step 1" in result.output and "no checkpoint was written" in result.output
    assert not (tmp_path / "run" / "checkpoints" / "step-1").exists()
    assert not (tmp_path / "run" / "adapter").exists()


def test_ctrl_c_checkpoints_exits_130_and_resume_finishes_like_an_uninterrupted_run(tmp_path):
    from peftctl.recipe.load import load_recipe
    from peftctl.run import pipeline

    sets = ["--set", "train.max_steps=150", "--set", "train.log_every=1", "--set", "train.save_every=100"]
    out = tmp_path / "run"
    command = [sys.executable, "-m", "peftctl", "train", str(SMOKE), *sets, "--output", str(out), "--json"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
    deadline = time.monotonic() + 120
    while '"loss"' not in ((out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stdout == ""
    step = max(json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines())
    assert 1 <= step < 150 and (out / "checkpoints" / f"step-{step}" / "state.json").is_file()
    assert f"--output {out} --json --resume" in stderr and not (out / "adapter").exists()

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_from_step"] == step

    # The same recipe uninterrupted, in this process (one thread, as the subprocesses).
    reference = load_recipe(SMOKE, [s for s in sets if s != "--set"], tmp_path / "reference")
    pipeline.run(reference)
    ours = load_file(out / "adapter" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "reference" / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0)
    assert metrics(out) == metrics(tmp_path / "reference")
