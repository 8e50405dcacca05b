"""scripts/gpu_proof.py on the CPU: its run matrix and recipes, its model builder, a tiny run of each
kind through peftctl's loop and through peft + TRL, failing soft, its table and verdict, and the
wheels that travel to the GPU machine (gpu_wheels.py). The measurements themselves need CUDA."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_proof  # noqa: E402
import gpu_wheels  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=256)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setitem(gpu_proof.SHAPES, "tiny", TINY)
    return {"tiny": gpu_proof.write_config(TINY, tmp_path / "tiny")}


def test_the_matrix_is_every_shape_method_length_and_checkpointing_then_the_peers():
    runs = gpu_proof.matrix()
    ours, peers = [r for r in runs if not r.peer], [r for r in runs if r.peer]
    assert len(ours) == 3 * 3 * 2 * 2 and len(peers) == 3 * 2 * 2
    assert runs.index(peers[0]) == len(ours)  # peftctl's runs come first: the time limit skips peers first
    assert len({r.name for r in runs}) == len(runs)
    assert {r.method for r in peers} == {"lora-qv"}
    only = gpu_proof.matrix(only=["llama-2-7b", "qlora", "512"])
    assert [r.name for r in only] == ["llama-2-7b qlora 512", "llama-2-7b qlora 512 ckpt"]
    assert not any(r.peer for r in gpu_proof.matrix(peers=False))


def test_every_recipe_plans_on_its_real_shape(tmp_path):
    """The recipes validate and `plan` sizes them from the config alone; the 7B's LoRA on q/v is the
    mission's 4,194,304 trainable parameters, and the 4-bit base is counted quantized."""
    folder = gpu_proof.write_config(gpu_proof.SHAPES["llama-2-7b"], tmp_path / "7b")
    from peftctl.plan.memory_plan import plan

    planned = {}
    for run in gpu_proof.matrix(shapes=("llama-2-7b",), lengths=(512,), peers=False):
        recipe = gpu_proof.recipe_for(run, folder, tmp_path / "out", 8, 1)
        assert recipe.train.gradient_checkpointing == run.checkpointed and recipe.data.max_seq_len == 512
        planned[run.name] = plan(recipe, cuda=True)
    assert planned["llama-2-7b lora-qv 512"].trainable_params == 4_194_304
    assert planned["llama-2-7b qlora 512 ckpt"].quantization == "4bit nf4, double quant"
    assert planned["llama-2-7b qlora 512 ckpt"].peft.total < gpu_proof.QLORA_7B_BAR < planned[
        "llama-2-7b lora-all 512 ckpt"].peft.total


def test_the_builder_makes_random_bf16_weights_and_a_4bit_base(tiny, tmp_path):
    from peftctl.arch.layers import quantized_kind

    recipes = {m: gpu_proof.recipe_for(gpu_proof.Run("tiny", m, 32, False), tiny["tiny"], tmp_path / m, 4, 1)
               for m in ("lora-qv", "qlora")}
    model = gpu_proof.build_model(recipes["lora-qv"].model, "cpu")
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.bfloat16 and weight.float().std() > 0
    assert model.config.num_hidden_layers == 2 and model.config.name_or_path == recipes["lora-qv"].model.name_or_path
    quantized = gpu_proof.build_model(recipes["qlora"].model, "cpu")
    assert quantized_kind(quantized.model.layers[0].mlp.down_proj) == "4bit"


def test_rows_are_full_and_labelled():
    data = gpu_proof.synthetic_rows(100, 3, 16)
    assert [len(e.input_ids) for e in data.train] == [16] * 3
    assert all(e.labels == e.input_ids for e in data.train) and data.max_seq_len == 16


def test_a_tiny_run_of_each_kind_trains_and_one_failure_does_not_stop_the_rest(tiny, tmp_path, monkeypatch):
    args = argparse.Namespace(warmup=1, steps=2, batch_size=2)
    runs = [gpu_proof.Run("tiny", "lora-qv", 32, False), gpu_proof.Run("tiny", "qlora", 32, True),
            gpu_proof.Run("tiny", "lora-qv", 32, False, peer=True)]
    rows = [gpu_proof.measure(run, tiny, tmp_path, args, "cpu") for run in runs]
    assert [r.status for r in rows] == ["ok"] * 3, [r.error for r in rows]
    assert all(r.tokens_per_s > 0 for r in rows)
    assert rows[0].plan_total > 0 and rows[0].peak_allocated is None  # memory is read on CUDA only

    def out_of_memory(spec, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(gpu_proof, "build_model", out_of_memory)
    failed = gpu_proof.measure(runs[0], tiny, tmp_path, args, "cpu")
    assert failed.status == "failed" and failed.error == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"


def test_table_verdict_and_ratios():
    from rich.console import Console

    def row(method, ckpt, peer=False, **figures):
        shape, length = "llama-2-7b", 512
        run = gpu_proof.Run(shape, method, length, ckpt, peer)
        return gpu_proof.Measured(run.name, shape, method, length, ckpt, peer, **figures)

    rows = [row("qlora", True, tokens_per_s=900.0, peak_allocated=5e9, plan_total=5.2e9, plan_error=0.04),
            row("lora-qv", False, tokens_per_s=2000.0, peak_allocated=14e9, plan_total=13e9, plan_error=-0.071),
            row("lora-qv", False, peer=True, tokens_per_s=1000.0, peak_allocated=20e9),
            row("lora-all", False, status="failed", error="OutOfMemoryError: CUDA out of memory")]
    verdict = gpu_proof.verdict(rows)
    assert verdict["qlora_7b_below_6_gb"] and not verdict["every_run_trained"]
    assert verdict["worst_plan_error"] == pytest.approx(0.071) and not verdict["plan_within_10_percent"]
    assert gpu_proof.ratios(rows) == [{"run": "llama-2-7b lora-qv 512", "speed": 2.0, "memory": 0.7}]
    console = Console(width=200, record=True)
    console.print(gpu_proof.table(rows, "t"))
    text = console.export_text()
    assert "+4.0%" in text and "-7.1%" in text and "failed: OutOfMemoryError" in text and "5.00 GB" in text


def test_tokens_per_second_start_after_the_warmup():
    assert gpu_proof.timed_rate([1.0, 2.0, 2.5, 3.0], warmup=1, tokens_per_step=100) == pytest.approx(150)
    assert gpu_proof.timed_rate([1.0], warmup=1, tokens_per_step=100) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script's behaviour without CUDA")
def test_without_cuda_the_proof_says_so_and_exits_0():
    proc = subprocess.run([sys.executable, "scripts/gpu_proof.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout and "--wheels" in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_smollm2_lora_trains_and_plan_is_within_10_percent(tmp_path):
    out = tmp_path / "proof.json"
    proc = subprocess.run([sys.executable, "scripts/gpu_proof.py", "--only", "smollm2-135m,lora-qv,512",
                           "--no-peers", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 2 and all(r["status"] == "ok" for r in runs), runs
    assert all(abs(r["plan_error"]) < gpu_proof.PLAN_TOLERANCE for r in runs), runs


# --- the wheels that travel -------------------------------------------------------------------------


def test_every_wheel_is_the_locked_version():
    versions = gpu_wheels.locked_versions(gpu_wheels.PACKAGES)
    assert versions["bitsandbytes"] == "0.50.2" and versions["pydantic_core"] == "2.50.5"
    with pytest.raises(SystemExit, match="locks no version of nonesuch"):
        gpu_wheels.locked_versions(["nonesuch"])


def test_bitsandbytes_keeps_its_code_and_only_the_libraries_the_gpu_machine_loads(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    files = {name: b"x" * 1000 for name in ("bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so",
                                            "bitsandbytes/libbitsandbytes_cuda121.so",
                                            "bitsandbytes/libbitsandbytes_cuda130.so",
                                            "bitsandbytes/libbitsandbytes_rocm64.so")}
    record = "".join(f"{name},sha256=abc,1000\n" for name in files) + "bitsandbytes-0.50.2.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("bitsandbytes-0.50.2.dist-info/RECORD", record)
    before, after = gpu_wheels.slim_bitsandbytes(wheel)
    assert after < before
    with zipfile.ZipFile(wheel) as zf:
        kept = set(zf.namelist())
        record = zf.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert kept == {"bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so",
                    "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes-0.50.2.dist-info/RECORD"}
    assert "cuda121" not in record and "rocm64" not in record and "cuda130" in record


def test_the_device_command_installs_the_carried_wheels_and_fits():
    command = gpu_wheels.device_command(".whl")
    assert len(command) <= gpu_wheels.COMMAND_LIMIT
    assert "--no-index" in command and ".whl/*.whl" in command and "scripts/gpu_proof.py" in command
