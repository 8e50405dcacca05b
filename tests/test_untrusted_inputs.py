"""What a file from somewhere else must never be able to do: run its own code, destroy a model
the command reads, or pass off a diverged run as a result.

Each case goes through the CLI as a user types it and checks both the exit (2, one message, no
traceback) and the files: the marker a hostile model's code would write, the base model's bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from peftctl.export.adapter_files import RECIPE_FILE
from peftctl.recipe.load import load_recipe
from peftctl.run import pipeline
from cli_checks import assert_refused, invoke, snapshot
from hf_folders import save_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes" / "smoke-gpt2.yaml"
VALIDATION = ROOT / "recipes" / "data" / "tiny" / "validation.jsonl"

# A model folder whose architecture is Python it ships: importing it leaves a marker file.
HOSTILE_CODE = """\
from pathlib import Path
Path({marker!r}).write_text("the model folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM

class HostileConfig(LlamaConfig):
    model_type = "hostile"

class HostileModel(LlamaForCausalLM):
    config_class = HostileConfig
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A LoRA adapter on the builtin tiny GPT-2 (seconds)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    pipeline.run(load_recipe(SMOKE, ["train.max_steps=2"], output_dir=out))
    return out / "adapter"


def hostile_model(folder: Path, marker: Path) -> Path:
    """A tiny Llama saved with weights, whose config says its code is `hostile.py`."""
    save_tiny_llama(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="hostile", architectures=["HostileModel"],
                  auto_map={"AutoConfig": "hostile.HostileConfig", "AutoModelForCausalLM": "hostile.HostileModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "hostile.py").write_text(HOSTILE_CODE.format(marker=str(marker)))
    return folder


def adapter_that_asks_for_remote_code(trained: Path, folder: Path, base: Path) -> Path:
    """The trained adapter, with a saved recipe edited to name `base` and trust its code."""
    shutil.copytree(trained, folder)
    recipe = yaml.safe_load((folder / RECIPE_FILE).read_text())
    recipe["model"].update(name_or_path=str(base), trust_remote_code=True, dtype="float32")
    (folder / RECIPE_FILE).write_text(yaml.safe_dump(recipe))
    return folder


@pytest.mark.parametrize("command", ["eval", "merge", "merge --base"])
def test_an_adapter_folder_cannot_turn_on_remote_code(trained, tmp_path, command):
    marker = tmp_path / "code-ran"
    base = hostile_model(tmp_path / "base", marker)
    adapter = adapter_that_asks_for_remote_code(trained, tmp_path / "adapter", base)
    if command == "eval":
        result = invoke("eval", adapter, "--data", VALIDATION, "--samples", "0")
    else:
        result = invoke("merge", adapter, "--out", tmp_path / "merged", *(["--base", base] if "--base" in command else []))
    assert not marker.exists(), "the model folder's code ran without --trust-remote-code"
    assert_refused(result, "--trust-remote-code")
    assert not (tmp_path / "merged").exists()


def test_the_person_running_eval_can_trust_remote_code(trained, tmp_path):
    marker = tmp_path / "code-ran"
    base = hostile_model(tmp_path / "base", marker)
    adapter = adapter_that_asks_for_remote_code(trained, tmp_path / "adapter", base)
    invoke("eval", adapter, "--data", VALIDATION, "--samples", "0", "--trust-remote-code")
    assert marker.exists()  # asked for on the command line: the folder's code ran


# --- no output of a command replaces, deletes or writes into one of its inputs -------------------

LLAMA_RECIPE = """\
model:
  name_or_path: {base}
  dtype: float32
method:
  name: lora
  r: 4
  target_modules: [q_proj]
data:
  train: {data}/train.jsonl
  validation: {data}/validation.jsonl
train:
  max_steps: 1
  batch_size: 4
"""


def llama_recipe(tmp_path: Path, base: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(LLAMA_RECIPE.format(base=base, data=ROOT / "recipes" / "data" / "tiny"))
    return path


def test_train_overwrite_spares_a_base_model_inside_the_output_folder(tmp_path):
    run_dir = tmp_path / "runA"
    base = save_tiny_llama(run_dir / "basemodel")
    (run_dir / "metrics.jsonl").write_text("")  # it looks like a run folder --overwrite may replace
    before = snapshot(run_dir)
    result = invoke("train", llama_recipe(tmp_path, base), "--output", run_dir, "--overwrite")
    assert_refused(result, "the base model")
    assert snapshot(run_dir) == before


def test_train_never_writes_into_the_base_model_folder(tmp_path):
    base = save_tiny_llama(tmp_path / "basemodel")
    before = snapshot(base)
    result = invoke("train", llama_recipe(tmp_path, base), "--output", base / "run")
    assert_refused(result, "the base model")
    assert snapshot(base) == before


@pytest.mark.parametrize("out", ["base", "inside base", "inside adapter"])
def test_merge_spares_its_base_and_its_adapter(trained, tmp_path, out):
    base = tmp_path / "base"
    from peftctl.export.merge import merge_to_folder

    merge_to_folder(trained, base)  # a local model folder: the GPT-2 with the adapter folded in
    adapter = tmp_path / "adapter"
    shutil.copytree(trained, adapter)
    target = {"base": base, "inside base": base / "merged", "inside adapter": adapter / "merged"}[out]
    before = snapshot(base), snapshot(adapter)
    result = invoke("merge", adapter, "--base", base, "--out", target, "--overwrite")
    assert_refused(result, "the base model" if "adapter" not in out else "the adapter")
    assert (snapshot(base), snapshot(adapter)) == before


def test_an_output_folder_in_use_is_refused_naming_the_run(tmp_path):
    import os

    from peftctl.core.files import output_lock

    out = tmp_path / "run"
    with output_lock(out, "output.dir"):  # as a run in progress holds it
        result = invoke("train", SMOKE, "--output", out, "--overwrite")
    assert_refused(result, "in use", f"pid {os.getpid()}")
    assert not (out / "adapter").exists()
    result = invoke("train", SMOKE, "--output", out, "--set", "train.max_steps=1")  # free again
    assert result.exit_code == 0, result.output


# --- a diverged run exports nothing and offers no bad checkpoint --------------------------------

@pytest.mark.parametrize("checkpoints", [[], ["--set", "train.save_every=1"]])
def test_a_diverged_run_writes_no_adapter_and_no_checkpoint_of_its_bad_weights(tmp_path, checkpoints):
    out = tmp_path / "run"
    # One step at lr 1e30: its loss and gradients are finite, the weights it leaves are not usable.
    result = invoke("train", SMOKE, "--output", out, "--set", "train.lr=1e30", "--set", "train.max_steps=1",
                    *checkpoints)
    assert_refused(result, "not finite", "train.lr")
    assert not (out / "adapter").exists()
    assert not list((out / "checkpoints").glob("step-*"))
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or "NaN" not in metrics.read_text()  # and it stays valid JSON
