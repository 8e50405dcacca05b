"""`accelerate launch` with 2 processes (CPU, gloo): the same training as one process.

The README's command for several GPUs, run here on the CPU: accelerate starts 2 processes
through torchrun and, without a GPU, they form a gloo group. batch_size is per process, so 2
processes with grad_accum 1 take the same global batch (2 micro-batches of 2 rows per step) as
1 process with grad_accum 2, from the same data stream: the losses must agree to float
rounding. Tolerance: 1e-5 relative (fp32 sums taken in another order); measured: identical.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftctl import pipeline
from peftctl.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes" / "smoke-gpt2.yaml"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
SETS = ["train.batch_size=2", "train.log_every=1", "train.save_every=10"]
RTOL = 1e-5



def free_port() -> int:
    """A port for the processes' rendezvous that no concurrent test run is using."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, *extra: str) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "peftctl", "train", str(SMOKE), *(a for s in SETS for a in ("--set", s)),
               "--set", "train.grad_accum=1", "--output", str(out), "--json", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=ONE_THREAD, cwd=out.parent)


def losses(out: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"] if "loss" in e else e["val_loss"]) for e in lines]


def assert_same_adapter(a: Path, b: Path) -> None:
    ours, theirs = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=RTOL, atol=1e-7)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same global batch in one process: grad_accum 2 instead of 2 processes."""
    out = tmp_path_factory.mktemp("one") / "run"
    pipeline.run(load_recipe(SMOKE, [*SETS, "train.grad_accum=2"], out))
    return out


def test_two_processes_train_like_one_and_only_the_main_one_writes(tmp_path, one_process):
    out = tmp_path / "two"
    proc = launch(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(figures) == 1 and figures[0]["steps"] == 20  # printed by the main process only
    state = json.loads((out / "checkpoints" / "step-20" / "state.json").read_text())
    assert state["fingerprint"]["processes (accelerate launch)"] == 2  # really two processes
    assert load_file(out / "checkpoints" / "step-20" / "rng.safetensors")["torch"].shape[0] == 2

    ours, theirs = losses(out), losses(one_process)
    assert [s for s, _ in ours] == [s for s, _ in theirs]  # one line per step: nobody else appended
    for (step, a), (_, b) in zip(ours, theirs):
        assert a == pytest.approx(b, rel=RTOL), f"step {step}"
    assert_same_adapter(out / "adapter", one_process / "adapter")

    # Resumed with 2 processes from the step-10 checkpoint: the same run again.
    shutil.copytree(out / "adapter", tmp_path / "first-adapter")
    resumed = launch(out, "--resume", str(out / "checkpoints" / "step-10"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["resumed_from_step"] == 10
    assert losses(out) == ours
    assert_same_adapter(out / "adapter", tmp_path / "first-adapter")


def test_fsdp_is_refused_before_anything_loads_or_is_written(tmp_path, monkeypatch):
    """An FSDP launch (accelerate sets ACCELERATE_USE_FSDP) is refused with the DDP command instead:
    checkpoints and the export would read sharded weights, and on CPUs accelerate silently runs
    DDP under an FSDP config."""
    from typer.testing import CliRunner

    from peftctl.cli import app

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(Path(__file__).parent.parent / "recipes/smoke-gpt2.yaml"), "--output", str(out)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "FSDP is not supported yet" in text and "accelerate launch --multi_gpu" in text
    assert "Traceback" not in result.output
    assert not out.exists()
