"""Every mistake a user can make in a recipe, a data file or on the command line.

Each must end with exit code 2 and one message (starting `error:`) that names the file and the key
path (or the data file and row), says what was expected, shows no traceback, and leaves the
output folder untouched. A few cases run the real CLI as a subprocess (imports, stderr, exit
code exactly as a shell sees them); the rest call the typer app in-process, which is faster.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from peftctl.cli.commands import app
from peftctl.methods import METHODS
from test_cli import ONE_THREAD

ROOT = Path(__file__).resolve().parent.parent
TINY_DATA = ROOT / "recipes" / "data" / "tiny"
TRAIN_KEYS = "epochs, max_steps, max_minutes, batch_size, grad_accum, lr"

# A valid recipe; each case breaks one thing. Written out key by key so line numbers are known.
BASE = """\
model:
  name_or_path: builtin:tiny-gpt2
  dtype: float32
method:
  name: lora
  r: 4
  target_modules: [c_attn]
data:
  train: {train}
  validation: {validation}
train:
  max_steps: 1
  batch_size: 4
"""
LINE = {"method.name": 5, "method.r": 6, "method.target_modules": 7, "data.train": 9,
        "data.validation": 10, "train.max_steps": 12, "train.batch_size": 13}


def recipe_text(train: Path | str = TINY_DATA / "train.jsonl",
                validation: Path | str = TINY_DATA / "validation.jsonl") -> str:
    return BASE.format(train=train, validation=validation)


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def replace(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


def snapshot(folder: Path) -> dict[str, bytes] | None:
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in folder.rglob("*")}


def check_error(exit_code: int, stderr: str, *fragments: str) -> str:
    """Exit 2, one `error:` message holding every fragment, no traceback; returns the message."""
    assert exit_code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.startswith("error: "), stderr
    assert [line.startswith("error:") for line in stderr.splitlines()].count(True) == 1, stderr
    for fragment in fragments:
        assert fragment in stderr, f"{fragment!r} not in:\n{stderr}"
    return stderr


def cli(args: list[str], output: Path | None = None, *fragments: str) -> str:
    """Run the app in-process; the error is checked and the output folder must be untouched."""
    before = snapshot(output) if output is not None else None
    result = CliRunner().invoke(app, [str(a) for a in args])
    # A crash inside the app is caught by the runner as the exception itself, not SystemExit.
    assert isinstance(result.exception, SystemExit), result.exception
    message = check_error(result.exit_code, result.stderr, *fragments)
    assert result.stdout == ""
    if output is not None:
        assert snapshot(output) == before
    return message


def run_cli(args: list[str], output: Path, *fragments: str) -> str:
    """Run `python -m peftctl` as a shell would; the output folder must not be created."""
    proc = subprocess.run([sys.executable, "-m", "peftctl", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=output.parent, env=ONE_THREAD)
    message = check_error(proc.returncode, proc.stderr, *fragments)
    assert proc.stdout == ""
    assert not output.exists()
    return message


# --- the recipe ---------------------------------------------------------------------------------


def test_unknown_key_suggests_the_right_one_subprocess(tmp_path):
    recipe = write(tmp_path, replace(recipe_text(), "  batch_size: 4\n", "  batch_size: 4\n  lrr: 1e-3\n"))
    run_cli(["train", recipe, "--output", tmp_path / "out"], tmp_path / "out",
            f"{recipe}: train.lrr (line 14): unknown key 'lrr' (did you mean 'lr'?)",
            f"expected: one of: {TRAIN_KEYS}")


@pytest.mark.parametrize("old, new, where, hint", [
    ("train:\n", "trian:\n", "trian (line 11)", "did you mean 'train'?"),
    ("  r: 4\n", "  rank: 4\n", "method.rank (line 6)", "did you mean 'r'?"),  # peft's word for it
    ("  r: 4\n", "  lora_alpha: 4\n", "method.lora_alpha (line 6)", "did you mean 'alpha'?"),
])
def test_unknown_section_and_method_option_get_a_hint(tmp_path, old, new, where, hint):
    recipe = write(tmp_path, replace(recipe_text(), old, new))
    cli(["validate", recipe], None, f"{recipe}: {where}: unknown key", hint, "expected: one of: ")


def test_an_unknown_key_with_nothing_close_lists_the_keys(tmp_path):
    recipe = write(tmp_path, replace(recipe_text(), "  dtype: float32\n", "  dtype: float32\n  colour: red\n"))
    message = cli(["validate", recipe], None, "model.colour (line 4): unknown key 'colour'",
                  "expected: one of: name_or_path, revision, gguf_file, dtype, trust_remote_code")
    assert "did you mean" not in message


def test_wrong_type(tmp_path):
    recipe = write(tmp_path, replace(recipe_text(), "batch_size: 4", "batch_size: eight"))
    cli(["train", recipe, "--output", tmp_path / "out"], tmp_path / "out",
        f"{recipe}: train.batch_size (line {LINE['train.batch_size']}): invalid value 'eight'",
        "expected: an integer")


def test_yaml_syntax_error_has_line_and_column_subprocess(tmp_path):
    recipe = write(tmp_path, replace(recipe_text(), "  dtype: float32\n", "  dtype: float32: x\n"))
    run_cli(["train", recipe, "--output", tmp_path / "out"], tmp_path / "out",
            f"{recipe}: line 3, column 17: YAML syntax error: mapping values are not allowed here")


def test_a_key_given_twice(tmp_path):
    """Plain YAML keeps the last of two equal keys without a word; a recipe refuses."""
    recipe = write(tmp_path, replace(recipe_text(), "  r: 4\n", "  r: 4\n  r: 8\n"))
    cli(["validate", recipe], None, f"{recipe}: line 7, column 3: key 'r' is given twice (first on line 6)")


def test_unknown_method_lists_the_known_ones(tmp_path):
    recipe = write(tmp_path, replace(recipe_text(), "name: lora", "name: lorra"))
    message = cli(["validate", recipe], None,
                  f"{recipe}: method.name (line {LINE['method.name']}): unknown method 'lorra' (did you mean 'lora'?)")
    expected_line = next(line for line in message.splitlines() if "expected:" in line)
    assert set(METHODS) and all(name in expected_line for name in METHODS)


@pytest.mark.parametrize("r", [0, -1])
def test_rank_must_be_positive(tmp_path, r):
    recipe = write(tmp_path, replace(recipe_text(), "r: 4", f"r: {r}"))
    cli(["train", recipe, "--output", tmp_path / "out"], tmp_path / "out",
        f"{recipe}: method.r (line {LINE['method.r']}): invalid value {r}", "expected: an integer greater than 0")


def test_missing_required_key_says_what_it_is(tmp_path):
    recipe = write(tmp_path, replace(recipe_text(), "  name_or_path: builtin:tiny-gpt2\n", ""))
    cli(["validate", recipe], None, f"{recipe}: model.name_or_path: required key is missing",
        "expected: The base model")


def test_a_section_that_is_not_a_mapping(tmp_path):
    recipe = write(tmp_path, recipe_text().replace("train:\n  max_steps: 1\n  batch_size: 4\n", "train: 5\n"))
    cli(["validate", recipe], None, f"{recipe}: train (line 11): expected a section of keys, got 5",
        "expected: a mapping with keys: epochs")


def test_every_problem_is_listed_not_only_the_first(tmp_path):
    text = replace(replace(recipe_text(), "r: 4", "r: 0"), "batch_size: 4", "batch_size: many")
    cli(["validate", write(tmp_path, text)], None, "method.r (line 6): invalid value 0",
        "also: train.batch_size (line 13): invalid value 'many' (expected an integer)")


def test_recipe_file_missing_or_empty(tmp_path):
    cli(["validate", tmp_path / "nope.yaml"], None, f"{tmp_path / 'nope.yaml'}: recipe file not found")
    cli(["validate", write(tmp_path, "")], None, f"{tmp_path / 'recipe.yaml'}: the recipe is empty",
        "expected: a YAML mapping with sections model, method, data, train, output")


# --- --set overrides ----------------------------------------------------------------------------


@pytest.mark.parametrize("override, fragments", [
    ("train.lrr=1", ["train.lrr (from --set train.lrr=1): unknown key 'lrr' (did you mean 'lr'?)"]),
    ("trian.lr=1", ["trian (from --set trian.lr=1): unknown key 'trian' (did you mean 'train'?)"]),
    ("train.batch_size.x=1", ["train.batch_size.x (from --set train.batch_size.x=1): 'train.batch_size' is a "
                              "value, not a section", "expected: a key path that ends at a value"]),
    ("train.lr", ["--set train.lr: an override must look like key.path=value", "e.g. --set train.lr=1e-4"]),
    ("method.r=zero", ["method.r (from --set method.r=zero): invalid value 'zero'", "expected: an integer"]),
])
def test_bad_override(tmp_path, override, fragments):
    recipe = write(tmp_path, recipe_text())
    cli(["train", recipe, "--set", override, "--output", tmp_path / "out"], tmp_path / "out",
        f"{recipe}: ", *fragments)


# --- data files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["data.train", "data.validation"])
def test_missing_data_file(tmp_path, key):
    missing = tmp_path / "nope.jsonl"
    recipe = write(tmp_path, recipe_text(**{key.split(".")[1]: "nope.jsonl"}))  # relative to the recipe
    cli(["train", recipe, "--output", tmp_path / "out"], tmp_path / "out",
        f"{recipe}: {key} (line {LINE[key]}): data file not found: {missing}",
        "relative paths are resolved from the recipe's folder")


def good_rows(n: int) -> list[str]:
    return (TINY_DATA / "train.jsonl").read_text().splitlines()[:n]


def test_row_without_the_fields_its_format_needs_subprocess(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(good_rows(3) + [json.dumps({"instruction": "Name a colour.", "input": ""})]) + "\n")
    run_cli(["train", write(tmp_path, recipe_text(train=data)), "--output", tmp_path / "out"], tmp_path / "out",
            f"{data}: row 4: missing field 'output'", 'expected: {"instruction": "...", ',
            "set data.format to the layout the data uses (now 'alpaca')")


@pytest.mark.parametrize("fmt, row, problem", [
    ("completion", {"txt": "hello"}, "missing field 'text'"),
    ("alpaca", {"instruction": "Say hi.", "output": ""}, "field 'output' is empty"),
    ("alpaca", {"instruction": ["Say hi."], "output": "hi"}, "field 'instruction' is a list, not text"),
    ("chat", {"messages": [{"role": "bot", "content": "hi"}]}, "message 1 has role 'bot'"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
])
def test_row_problems_name_the_row(tmp_path, fmt, row, problem):
    first = {"completion": {"text": "fine"}, "alpaca": {"instruction": "q", "output": "a"},
             "chat": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}}[fmt]
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(first) + "\n" + json.dumps(row) + "\n")
    text = replace(recipe_text(train=data), "  validation:", f"  format: {fmt}\n  validation:")
    cli(["train", write(tmp_path, text), "--output", tmp_path / "out"], tmp_path / "out",
        f"{data}: row 2: {problem}")


def test_broken_json_line_is_named_by_line(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(good_rows(2) + ['{"instruction": "q", "output": }']) + "\n")
    cli(["train", write(tmp_path, recipe_text(train=data)), "--output", tmp_path / "out"], tmp_path / "out",
        f"{data}: line 3, column 32: invalid JSON", "expected: one JSON object per line")


# --- model and method (checked before any weights load) -----------------------------------------


def test_target_that_matches_nothing_is_found_before_weights_load_subprocess(tmp_path):
    recipe = write(tmp_path, replace(recipe_text(), "[c_attn]", "[q_proj]"))
    run_cli(["train", recipe, "--output", tmp_path / "out"], tmp_path / "out",
            f"{recipe}: method.target_modules (line {LINE['method.target_modules']}): target module 'q_proj' "
            "matches no linear layer", "c_attn, c_fc, c_proj")


def test_target_check_runs_on_the_skeleton(tmp_path, monkeypatch):
    """The same error, with loading weights made impossible: it must come from the meta skeleton."""
    import peftctl.run.pipeline

    def no_weights(spec):
        raise AssertionError("weights were loaded before the target modules were checked")

    monkeypatch.setattr(peftctl.run.pipeline, "load_model", no_weights)
    recipe = write(tmp_path, replace(recipe_text(), "[c_attn]", "[c_attn, mlp.c_fcc]"))
    cli(["train", recipe, "--output", tmp_path / "out"], tmp_path / "out",
        "method.target_modules (line 7): target module 'mlp.c_fcc' matches no linear layer",
        "c_attn, c_fc, c_proj")


def test_prefix_tuning_with_gradient_checkpointing_is_refused_before_weights_load(tmp_path, monkeypatch):
    """The model would refuse it at the first step (tests/test_qlora.py); the recipe says it first."""
    import peftctl.run.pipeline

    def no_weights(spec):
        raise AssertionError("weights were loaded before the method and checkpointing were checked")

    monkeypatch.setattr(peftctl.run.pipeline, "load_model", no_weights)
    recipe = Path(__file__).parent.parent / "recipes" / "prefix_tuning-gpt2.yaml"
    cli(["train", recipe, "--set", "train.gradient_checkpointing=true", "--output", tmp_path / "out"],
        tmp_path / "out", f"{recipe}: train.gradient_checkpointing (from --set train.gradient_checkpointing=true): "
        "this method feeds the model a prefilled KV cache", "fix: set train.gradient_checkpointing: false")


def test_unreadable_model_folder(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gpt2"}')
    recipe = write(tmp_path, replace(recipe_text(), "builtin:tiny-gpt2", str(model)))
    # The tokenizer or the weights fail first, depending on which tokenizer libraries are installed.
    cli(["train", recipe, "--output", tmp_path / "out"], tmp_path / "out",
        f"{recipe}: model.name_or_path (line 2): could not load the ", f" from '{model}': ",
        "expected: a Hugging Face model folder")


# --- the output folder --------------------------------------------------------------------------


def test_non_empty_output_dir_needs_overwrite_which_then_replaces_it(tmp_path):
    recipe = write(tmp_path, recipe_text())
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0, "val_loss": 1.0}\n')  # a previous run's
    (out / "stale.txt").write_text("from the previous run")
    cli(["train", recipe, "--output", out], out,
        f"{recipe}: output.dir (from --output): the output folder already exists and is not empty: {out}",
        "fix: pass --overwrite")

    result = CliRunner().invoke(app, ["train", str(recipe), "--output", str(out), "--overwrite", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 1
    assert not (out / "stale.txt").exists()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["val_loss"] != 1.0


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path, monkeypatch):
    recipe = write(tmp_path, recipe_text())
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("precious")
    cli(["train", recipe, "--output", notes, "--overwrite"], notes,
        f"--overwrite only replaces a folder peftctl wrote, and {notes} has no metrics.jsonl or adapter")
    # Even a folder that looks like a run is kept when it holds the recipe (here: the current one).
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    cli(["train", recipe, "--output", ".", "--overwrite"], tmp_path,
        f"the output . would replace the current directory ({tmp_path})")


def test_output_path_that_is_a_file(tmp_path):
    recipe = write(tmp_path, recipe_text())
    other = write(tmp_path, "keep me", "notes.txt")
    cli(["train", recipe, "--output", other], None, "output.dir (from --output): the output path is a file")
    cli(["train", recipe, "--output", recipe], None, f"output.dir (from --output): the output {recipe} would "
        "replace the recipe")
    assert recipe.read_text() == recipe_text() and other.read_text() == "keep me"


def test_the_base_recipe_is_valid_and_an_emptied_section_means_defaults(tmp_path):
    """The base recipe of this file is valid, so each case above fails for its one change only."""
    result = CliRunner().invoke(app, ["validate", str(write(tmp_path, recipe_text()))])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["method"]["r"] == 4
    # Every key of a section commented out leaves `train:` (null): the defaults, not an error.
    text = recipe_text().replace("  max_steps: 1\n  batch_size: 4\n", "  # max_steps: 1\n") + "output:\n"
    result = CliRunner().invoke(app, ["validate", str(write(tmp_path, text))])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["train"]["batch_size"] == 8
