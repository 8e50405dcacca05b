"""The command line end to end: `peftctl train` as a shell runs it, `validate`, `schema`, `--set`.

The smoke run trains the builtin tiny GPT-2 (recipes/smoke-gpt2.yaml) in a subprocess; its
adapter must load in `peft` and give the same logits as peftctl's own loader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from peftctl.cli.commands import app
from peftctl.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes" / "smoke-gpt2.yaml"
# One thread per subprocess, as conftest.py sets for this process: on a busy shared CPU, two
# OpenMP threads that spin-wait on each other make a tiny model's training 20-50x slower.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """`peftctl train recipes/smoke-gpt2.yaml --output DIR --json`, run once for this file."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    proc = subprocess.run([sys.executable, "-m", "peftctl", "train", str(SMOKE), "--output", str(out), "--json"],
                          capture_output=True, text=True, timeout=300, cwd=out.parent, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return out, proc.stdout


def test_train_writes_the_adapter_and_prints_one_json_object(smoke_run):
    out, stdout = smoke_run
    figures = json.loads(stdout)  # the whole of stdout is one JSON object: nothing else is printed
    assert isinstance(figures, dict)
    recipe = yaml.safe_load(SMOKE.read_text())
    assert figures["steps"] == recipe["train"]["max_steps"]
    assert figures["adapter_dir"] == str(out / "adapter")
    assert figures["train_rows"] == 16 and figures["validation_rows"] == 4  # recipes/data/tiny
    assert 0 < figures["trainable_params"] < figures["total_params"]
    assert figures["tokens"] > 0 and figures["tokens_per_s"] > 0
    # The smoke recipe is tuned so that this holds by a clear margin, not by noise.
    assert figures["val_loss_after"] < figures["val_loss_before"] - 0.05, figures

    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0] == {"step": 0, "val_loss": figures["val_loss_before"]}
    assert metrics[-1] == {"step": figures["steps"], "val_loss": figures["val_loss_after"]}
    assert [m["step"] for m in metrics if "loss" in m] == list(range(5, figures["steps"] + 1, 5))  # log_every: 5


def test_peft_loads_the_adapter_with_the_same_logits(smoke_run):
    import peft

    from peftctl.export.adapter_files import load_adapter
    from peftctl.model.loading import load_model
    from peftctl.recipe.schema import ModelSpec

    spec = ModelSpec(name_or_path="builtin:tiny-gpt2", dtype="float32")
    adapter_dir = smoke_run[0] / "adapter"
    tokens = torch.tensor([list(b"### User:\nWhich module provides loads?\n\n### Assistant:\n")])
    with torch.no_grad():
        base = load_model(spec)(tokens).logits
        theirs = peft.PeftModel.from_pretrained(load_model(spec), adapter_dir).eval()(tokens).logits
        ours = load_adapter(load_model(spec), adapter_dir).model.eval()(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # A trained adapter, not the identity of its init: the comparison above means something.
    assert (ours - base).abs().max() > 1e-3


def test_overrides_reach_the_run_and_the_table_is_printed(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "train", str(SMOKE), "--output", str(out),
        "--set", "train.max_steps=3", "--set", "method.use_rslora=true", "--set", "method.alpha=32",
    ])
    assert result.exit_code == 0, result.output
    for row in ("trainable / total params", "rows (train / validation)", "validation loss", "adapter", "metrics"):
        assert row in result.stdout
    assert "…" not in result.stdout  # long paths are wrapped, never cut short
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 3
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["lora_alpha"] == 32


def test_validate_prints_the_recipe_with_defaults_and_overrides():
    long_dir = "/tmp/" + "/".join(["a-folder-with-a-long-name"] * 8)
    result = CliRunner().invoke(app, ["validate", str(SMOKE), "--set", "method.r=4", "--set", "train.lr=5e-4",
                                      "--set", "data.train_on_inputs=yes", "--set", f"output.dir={long_dir}"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    written = yaml.safe_load(SMOKE.read_text())
    # Defaults the recipe does not write are filled in.
    assert "seed" not in written["train"] and resolved["train"]["seed"] == 42
    assert "scheduler" not in written["train"] and resolved["train"]["scheduler"] == "cosine"
    assert "dropout" not in written["method"] and resolved["method"]["dropout"] == 0.0
    # Overrides are parsed as YAML values: an int, a float and a boolean.
    assert resolved["method"]["r"] == 4 and resolved["train"]["lr"] == 5e-4
    assert resolved["data"]["train_on_inputs"] is True
    # Data paths come out resolved against the recipe's folder.
    assert resolved["data"]["train"] == str(ROOT / "recipes" / "data" / "tiny" / "train.jsonl")
    # Printed as-is, never wrapped at the terminal's width (that would break the YAML).
    assert resolved["output"]["dir"] == long_dir


def test_schema_documents_every_key():
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    sections = {"Recipe": schema, **schema["$defs"]}
    # Every method's options are in it, so the walk below covers them all.
    assert {method.Config.__name__ for method in METHODS.values()} <= set(sections)
    undocumented = [f"{name}.{key}" for name, section in sections.items()
                    for key, prop in section.get("properties", {}).items() if not prop.get("description", "").strip()]
    assert not undocumented, undocumented
    assert set(schema["properties"]) == {"task", "model", "method", "data", "train", "output"}
    assert schema["additionalProperties"] is False  # unknown keys are errors


def test_help_lists_the_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert all(command in result.stdout for command in ("train", "validate", "schema"))
