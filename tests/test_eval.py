"""`peftctl eval`: base model vs base + adapter on held-out rows, and generations that stop at EOS.

The adapter is recipes/smoke-gpt2.yaml trained longer on every linear layer (300 steps on the 16
tiny rows, seconds): long enough that the random tiny GPT-2 learns the answers' shape, "The `x`
module." and its EOS, so greedy replies stop by themselves. Its loss figures are checked against
the training loop's own validation loss on the same rows, which is computed by other code.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from peftctl.cli.commands import app
from peftctl.eval.scores import token_f1
from peftctl.export.adapter_files import RECIPE_FILE
from peftctl.recipe.load import load_recipe
from peftctl.run import pipeline

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes" / "smoke-gpt2.yaml"
VALIDATION = ROOT / "recipes" / "data" / "tiny" / "validation.jsonl"
OVERFIT = ["train.max_steps=300", "method.target_modules=all-linear"]
METRICS = ("loss", "perplexity", "token_accuracy", "exact_match", "token_f1")


def evaluate(*args: str):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    summary = pipeline.run(load_recipe(SMOKE, OVERFIT, output_dir=out))
    return out, summary


@pytest.fixture(scope="module")
def report(run):
    result = evaluate(run[0] / "adapter", "--samples", "4", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_has_both_models_figures(run, report):
    out, summary = run
    assert report["adapter_dir"] == str(out / "adapter")
    assert report["data"] == str(VALIDATION)  # the recipe saved beside the adapter names it
    assert report["rows"] == 4
    for side in ("base", "adapter"):
        figures = report[side]
        assert set(figures) == set(METRICS)
        assert figures["perplexity"] == pytest.approx(math.exp(figures["loss"]), rel=1e-9)
        for metric in ("token_accuracy", "exact_match", "token_f1"):
            assert 0 <= figures[metric] <= 1
    # The same response tokens as the training loop's validation, before and after training.
    assert report["base"]["loss"] == pytest.approx(summary.result.val_loss_before, abs=1e-5)
    assert report["adapter"]["loss"] == pytest.approx(summary.result.val_loss_after, abs=1e-5)
    assert report["adapter"]["loss"] < report["base"]["loss"] - 0.3
    assert report["adapter"]["token_accuracy"] > report["base"]["token_accuracy"] + 0.2


def test_generations_stop_at_eos_and_score_better_than_the_base(report):
    generations = report["generations"]
    assert len(generations) == 4
    rows = [json.loads(line) for line in VALIDATION.read_text().splitlines()]
    for generation, row in zip(generations, rows):
        assert generation["prompt"].startswith(row["instruction"]) and row["input"] in generation["prompt"]
        assert generation["reference"] == row["output"]
        # Stopped by EOS well before the 128-token limit, and EOS is not part of the text.
        assert generation["stopped_at_eos"] is True, generation
        assert len(generation["generated"]) < 100 and "<|endoftext|>" not in generation["generated"]
        # The random base never emits EOS: it runs to the limit.
        assert generation["base_stopped_at_eos"] is False
    assert report["adapter"]["token_f1"] > report["base"]["token_f1"]
    assert report["adapter"]["token_f1"] == pytest.approx(
        sum(token_f1(g["generated"], g["reference"]) for g in generations) / 4)


def test_eval_of_a_recipe_finds_its_adapter_and_validation_data_and_prints_a_table(run, report, tmp_path):
    # A path far wider than the 80 columns rich assumes off a terminal (a clone's path can be
    # anything): it must come out whole, on one line, wherever the repository is.
    validation = tmp_path / ("held-out-rows-" * 8) / "validation.jsonl"
    validation.parent.mkdir()
    shutil.copy(VALIDATION, validation)
    recipe = yaml.safe_load(SMOKE.read_text())
    recipe["data"] = {**recipe["data"], "train": str(ROOT / "recipes" / "data" / "tiny" / "train.jsonl"),
                      "validation": str(validation)}
    recipe["output"] = {"dir": str(run[0])}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = evaluate(path, "--samples", "1")
    assert result.exit_code == 0, result.output
    table = result.stdout
    assert f"data: {validation}\n" in table and f"adapter: {run[0] / 'adapter'}\n" in table
    assert "peftctl eval: 4 rows" in table
    header = next(line for line in table.splitlines() if "metric" in line)
    assert header.index("base") < header.index("adapter") < header.index("change")
    for metric in METRICS:
        row = next(line for line in table.splitlines() if f" {metric} " in line)
        base, adapter = report["base"][metric], report["adapter"][metric]
        if metric in ("loss", "perplexity", "token_accuracy"):
            assert f"{base:.4f}" in row and f"{adapter:.4f}" in row and f"{adapter - base:+.4f}" in row, row
    assert "generations (greedy)" in table


def test_missing_data_is_a_clear_error(run, tmp_path):
    # An adapter folder without the recipe saved beside it (e.g. one made by peft) needs --data.
    bare = tmp_path / "bare"
    shutil.copytree(run[0] / "adapter", bare)
    (bare / RECIPE_FILE).unlink()
    result = evaluate(bare, "--base", "builtin:tiny-gpt2")
    assert result.exit_code == 2, result.output
    assert "no evaluation data" in result.output and "--data" in result.output
    assert "Traceback" not in result.output

    result = evaluate(run[0] / "adapter", "--data", tmp_path / "missing.jsonl")
    assert result.exit_code == 2 and "missing.jsonl" in result.output, result.output

    result = evaluate(tmp_path / "nowhere")
    assert result.exit_code == 2 and "no such adapter folder or recipe" in result.output


def test_recipe_not_trained_yet(tmp_path):
    recipe = yaml.safe_load(SMOKE.read_text())
    recipe["data"]["train"] = str(ROOT / "recipes" / "data" / "tiny" / "train.jsonl")
    recipe["data"]["validation"] = 0.25
    recipe["output"] = {"dir": str(tmp_path / "never-run")}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = evaluate(path)
    assert result.exit_code == 2 and "has not been trained yet" in result.output
    assert "fix: run peftctl train" in " ".join(result.output.split())


def test_token_f1_compares_words_under_squad_normalisation():
    assert token_f1("The `json` module.", "The `json` module.") == 1.0
    assert token_f1("the `JSON` Module", "The `json` module.") == 1.0  # case and punctuation do not count
    assert token_f1("Paris.", "paris") == 1.0 and token_f1("an answer", "the answer") == 1.0  # nor articles
    assert token_f1("The `os` module.", "The `json` module.") == pytest.approx(0.5)  # {os, module} vs {json, module}
    assert token_f1("json", "The `json` module.") == pytest.approx(2 / 3)  # p = 1, r = 1/2
    assert token_f1("don't", "dont") == 1.0  # punctuation is deleted, not a word break (as SQuAD)
    assert token_f1("b b b", "b") == pytest.approx(0.5)  # repeats count once per occurrence: p = 1/3, r = 1
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0 and token_f1("x", "") == 0.0
    assert token_f1("the", "") == 1.0  # nothing left of either after normalisation