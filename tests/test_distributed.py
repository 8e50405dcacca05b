"""`accelerate launch` with 2 processes (CPU, gloo): the same training as one process.

The README's command for several GPUs, run here on the CPU: accelerate starts 2 processes
through torchrun and, without a GPU, they form a gloo group. batch_size is per process, so 2
processes with grad_accum 1 take the same global batch (2 micro-batches of 2 rows per step) as
1 process with grad_accum 2, from the same data stream: the losses must agree to float
rounding. Tolerance: 1e-5 relative for losses, and for adapter weights 1e-5 of each tensor's
largest value (fp32 sums taken in another order); measured: identical under DDP; under FSDP2
(gradients reduce-scattered, not all-reduced) losses within 1e-7 relative, weights within 3e-6.
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
from safetensors.torch import load_file

from peftctl.recipe.load import load_recipe
from peftctl.run import pipeline
from peftctl.train import sharding
from test_trackers import tensorboard_curves

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


# accelerate's FSDP2 (`accelerate launch --use_fsdp --fsdp_version 2`) on the same 2 CPU processes,
# through a harness that lets accelerate treat the CPU group as it treats GPUs (see fsdp_on_cpu.py).
FSDP2 = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]


def launch(out: Path, *extra: str, fsdp: bool = False, recipe: Path = SMOKE,
           sets: list[str] = SETS) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).parent / "accelerate"
    program = [*FSDP2, str(Path(__file__).parent / "fsdp_on_cpu.py")] if fsdp else ["--multi_gpu", "-m", "peftctl"]
    command = [str(accelerate), "launch", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               *program, "train", str(recipe), *(a for s in sets for a in ("--set", s)),
               "--set", "train.grad_accum=1", "--output", str(out), "--json", *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=ONE_THREAD, cwd=out.parent)


def losses(out: Path) -> list[tuple[int, float]]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"] if "loss" in e else e["val_loss"]) for e in lines]


def assert_same_losses(ours: list[tuple[int, float]], theirs: list[tuple[int, float]]) -> None:
    assert [s for s, _ in ours] == [s for s, _ in theirs]  # one line per step: nobody else appended
    for (step, a), (_, b) in zip(ours, theirs):
        assert a == pytest.approx(b, rel=RTOL), f"step {step}"


def assert_same_adapter(a: Path, b: Path, rtol: float = RTOL) -> None:
    ours, theirs = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        # Relative to the tensor's scale: AdamW divides by sqrt(v), so weights whose gradients are
        # ~0 move by rounding-sized amounts whose relative error alone means nothing.
        assert (ours[key] - theirs[key]).float().abs().max() <= rtol * theirs[key].float().abs().max(), key


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same global batch in one process: grad_accum 2 instead of 2 processes."""
    out = tmp_path_factory.mktemp("one") / "run"
    summary = pipeline.run(load_recipe(SMOKE, [*SETS, "train.grad_accum=2"], out))
    return out, summary.total_params


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_processes_train_like_one_and_only_the_main_one_writes(tmp_path, one_process, fsdp):
    one_process, total_params = one_process
    out = tmp_path / "two"
    proc = launch(out, "--set", "train.report_to=tensorboard", "--set", "output.samples=2", fsdp=fsdp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The main process answers the sample rows alone; under FSDP no process holds the whole model.
    assert (out / "report.html").is_file()
    samples = (out / "generations.jsonl").read_text().splitlines() if not fsdp else []
    assert len(samples) == (0 if fsdp else 2) and (out / "generations.jsonl").exists() != fsdp
    figures = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(figures) == 1 and figures[0]["steps"] == 20  # printed by the main process only
    assert figures[0]["processes"] == 2
    assert figures[0]["distributed"] == ("FSDP" if fsdp else "MULTI_CPU")  # what accelerate really ran
    assert figures[0]["packed"]  # the packing check ran on the prepared model, as in one process
    assert figures[0]["total_params"] == total_params  # the tied output head is still tied
    state = json.loads((out / "checkpoints" / "step-20" / "state.json").read_text())
    assert state["fingerprint"]["processes (accelerate launch)"] == 2
    assert load_file(out / "checkpoints" / "step-20" / "rng.safetensors")["torch"].shape[0] == 2

    ours = losses(out)
    assert_same_losses(ours, losses(one_process))
    assert_same_adapter(out / "adapter", one_process / "adapter")
    # The tracker reported from the main process only: one event file, each step once.
    assert len(list((out / "tensorboard").iterdir())) == 1
    assert [step for step, _ in tensorboard_curves(out)["train/loss"]] == list(range(1, 21))

    # Checkpoints hold whole tensors: resumed from step 10 under the other launch (DDP <-> FSDP2),
    # the same run again.
    shutil.copytree(out / "adapter", tmp_path / "first-adapter")
    resumed = launch(out, "--resume", str(out / "checkpoints" / "step-10"), fsdp=not fsdp)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["resumed_from_step"] == 10
    assert_same_losses(losses(out), ours)
    assert_same_adapter(out / "adapter", tmp_path / "first-adapter")


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "dtype", "weights_rtol"), [
    ("bitfit-gpt2", "float32", 1e-3), ("ia3-gpt2", "float32", 1e-5), ("houlsby-gpt2", "float32", 1e-4),
    ("pfeiffer-gpt2", "float32", 1e-5), ("prompt_tuning-gpt2", "float32", 1e-5),
    ("p_tuning-gpt2", "float32", 1e-5), ("prefix_tuning-gpt2", "float32", 1e-5),
    ("smoke-gpt2", "bfloat16", 1e-5),
])
def test_every_method_trains_under_fsdp2_as_in_one_process(tmp_path, recipe, dtype, weights_rtol):
    """Every method's trainable weights sharded, gathered for checkpoints and the export.

    Losses within 1e-5 relative (measured <= 8.1e-8). Weights, of each tensor's largest value:
    1e-5 (measured <= 2.0e-6, bf16 base identical), wider where AdamW amplifies the rounding of
    FSDP2's gradient reduce-scatter on ~0 gradients: Houlsby 1e-4 (measured 1.5e-5), BitFit's biases
    1e-3 (measured 2.1e-4; DDP differs from one process as much there, 1.9e-4).
    """
    path = ROOT / "recipes" / f"{recipe}.yaml"
    sets = ["train.batch_size=2", "train.max_steps=12", "train.log_every=1", f"model.dtype={dtype}"]
    pipeline_packed = pipeline.run(load_recipe(path, [*sets, "train.grad_accum=2"], tmp_path / "one")).result.packed
    proc = launch(tmp_path / "fsdp", fsdp=True, recipe=path, sets=sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["distributed"] == "FSDP"
    assert figures["packed"] == pipeline_packed  # the packing check gives what it gives in one process
    ours, theirs = losses(tmp_path / "fsdp"), losses(tmp_path / "one")
    assert [s for s, _ in ours] == [s for s, _ in theirs]
    assert [a for _, a in ours] == pytest.approx([b for _, b in theirs], rel=1e-5)
    assert_same_adapter(tmp_path / "fsdp" / "adapter", tmp_path / "one" / "adapter", weights_rtol)


def test_fsdp_where_accelerate_would_run_ddp_is_refused_before_anything_loads(tmp_path, monkeypatch):
    """On CPUs (or in one unlaunched process) accelerate keeps DDP under an FSDP config: refused."""
    from typer.testing import CliRunner

    from peftctl.cli.commands import app

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(SMOKE), "--output", str(out)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "accelerate runs FSDP only on GPUs" in text and "accelerate launch --multi_gpu" in text
    assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize(("version", "sets", "expected"), [
    ("1", [], "FSDP version 1 is not supported"),
    ("2", ["model.quantization=4bit"], "FSDP with a quantized base"),
])
def test_fsdp_launches_peftctl_cannot_serve_are_refused(monkeypatch, version, sets, expected):
    from accelerate.utils import DistributedType

    from peftctl.core.errors import UserError

    monkeypatch.setenv("FSDP_VERSION", version)
    with pytest.raises(UserError, match=expected):
        sharding.check_fsdp(load_recipe(SMOKE, sets), DistributedType.MULTI_GPU)
    monkeypatch.setenv("FSDP_VERSION", "2")
    sharding.check_fsdp(load_recipe(SMOKE), DistributedType.MULTI_GPU)  # what GPUs with FSDP2 run
