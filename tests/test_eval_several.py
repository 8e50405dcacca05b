"""`peftctl eval A B C`: several adapters of one base side by side with the base, in one table.

The adapters are LoRA on the builtin tiny GPT-2 with B drawn at random (so each changes the
loss), plus their cat combination; the held-out rows are recipes/data/tiny's validation file.
Every figure must equal what `peftctl eval` gives each adapter alone.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from peftctl import methods
from peftctl.export.adapter_files import RECIPE_FILE, save_adapter
from peftctl.methods.lora import LoraConfig
from peftctl.model.loading import load_model
from peftctl.recipe.schema import ModelSpec
from cli_checks import assert_refused, invoke
from hf_folders import save_tiny_llama
from test_eval import METRICS, ROOT, VALIDATION

TINY_GPT2 = ModelSpec(name_or_path="builtin:tiny-gpt2", dtype="float32")


def lora_adapter(folder, spec, targets, seed):
    adapter = methods.apply(load_model(spec), LoraConfig(name="lora", r=4, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter.params.items():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return save_adapter(adapter, folder, spec.name_or_path)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-several")
    first = lora_adapter(root / "run-a" / "adapter", TINY_GPT2, ["c_attn"], 1)
    second = lora_adapter(root / "run-b" / "adapter", TINY_GPT2, ["c_attn"], 2)
    result = invoke("merge", first, second, "--weights", 0.5, 0.5, "--out", root / "both", "--json")
    assert result.exit_code == 0, result.output
    return [first, second, root / "both"]


def evaluate(*args):
    return invoke("eval", *args, "--data", VALIDATION, "--format", "alpaca", "--samples", 1)


def test_one_json_object_whose_rows_equal_single_adapter_evals(adapters):
    result = evaluate(*adapters, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["data"] == str(VALIDATION) and report["rows"] == 4
    assert [row["adapter_dir"] for row in report["adapters"]] == [str(folder) for folder in adapters]
    losses = {row["loss"] for row in report["adapters"]} | {report["base"]["loss"]}
    assert len(losses) == 4  # each adapter moves the loss, and each its own way
    for folder, row in zip(adapters, report["adapters"]):
        single = evaluate(folder, "--json")
        assert single.exit_code == 0, single.output
        alone = json.loads(single.stdout)
        for metric in METRICS:
            assert row[metric] == pytest.approx(alone["adapter"][metric], abs=1e-6), (folder, metric)
            assert report["base"][metric] == pytest.approx(alone["base"][metric], abs=1e-6)
    generation, = report["generations"]
    assert set(generation) == {"prompt", "reference", "base", "base_stopped_at_eos", "adapters"}
    assert [g["adapter_dir"] for g in generation["adapters"]] == [str(folder) for folder in adapters]
    assert all(isinstance(g["generated"], str) for g in generation["adapters"])


def test_one_table_with_the_base_and_each_adapter(adapters):
    result = evaluate(*adapters)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    # Labels: the fewest trailing path parts that tell the adapters apart, with the paths above.
    for label, folder in zip(("run-a/adapter", "run-b/adapter", "both"), adapters):
        assert f"adapter {label}: {folder}" in lines
    title = next(i for i, line in enumerate(lines) if line.startswith("peftctl eval: 4 rows, base and 3 adapters"))
    header = lines[title + 2]
    assert header.index("model") < header.index("loss") < header.index("perplexity") < header.index("F1") \
        < header.index("Δ loss")
    report = json.loads(evaluate(*adapters, "--json").stdout)
    rows = {line.split("│")[1].strip(): line for line in lines[title + 3:] if line.count("│") > 3}
    assert f"{report['base']['loss']:.4f}" in rows["base"]
    for label, figures in zip(("run-a/adapter", "run-b/adapter", "both"), report["adapters"]):
        assert f"{figures['loss']:.4f}" in rows[label]
        assert f"{figures['loss'] - report['base']['loss']:+.4f}" in rows[label]
    assert sum("peftctl eval:" in line for line in lines) == 1  # one figures table
    assert "generations (greedy)" in result.stdout


def test_adapters_of_another_base_are_refused_by_name(adapters, tmp_path):
    llama = save_tiny_llama(tmp_path / "llama")
    other = lora_adapter(tmp_path / "llama-adapter", ModelSpec(name_or_path=str(llama), dtype="float32"),
                         ["q_proj"], 3)
    assert_refused(evaluate(adapters[0], other), str(other), "another base model", "builtin:tiny-gpt2")
    assert_refused(evaluate(adapters[0], other, "--json"), "another base model")


def test_recipes_holding_out_different_files_need_data(adapters, tmp_path):
    """Without --data each adapter's saved recipe names its rows: they must be the same rows."""
    folders = []
    for name, rows in (("one", VALIDATION), ("two", ROOT / "recipes" / "data" / "tiny" / "train.jsonl")):
        folder = lora_adapter(tmp_path / name, TINY_GPT2, ["c_attn"], 4)
        (folder / RECIPE_FILE).write_text(yaml.safe_dump({"data": {"validation": str(rows), "format": "alpaca"}}))
        folders.append(folder)
    result = invoke("eval", *folders, "--samples", 0)
    assert_refused(result, str(folders[1]), "--data", "train.jsonl", "pass --data FILE")
    result = invoke("eval", folders[0], folders[0], "--samples", 0, "--json")  # the same recipe twice is fine
    assert result.exit_code == 0, result.output
