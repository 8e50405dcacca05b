"""Every method on a classifier (BERT, and Llama for the prompt methods' pooling) and on a seq2seq
model (T5): trained from a recipe, reloaded, and equal to peft where peft has the method; the
methods a task cannot take are refused before any weights load, with the reason."""

from __future__ import annotations

import json

import pytest
import torch

from cli_checks import assert_refused, invoke
from method_checks import EXAMPLES
from peftctl.arch.tasks import TaskHead
from peftctl.methods import METHODS
from peftctl.model.loading import load_model
from peftctl.recipe.schema import ModelSpec
from peftctl.run import pipeline
from test_tasks import batch_for, logits, ours, peft_model, task_recipe

# T5 and Llama have no biases: BitFit makes them (its documented answer).
NO_BIASES = {"bitfit": {"create_missing_biases": True}}
PROMPT_METHODS = {"prompt_tuning", "p_tuning", "prefix_tuning"}
REFUSED = {("seq2seq", name): "not implemented for seq2seq" for name in ("prompt_tuning", "p_tuning")} | {
    ("seq2seq", "prefix_tuning"): "supports decoder-only models",
    ("sequence_classification", "prefix_tuning"): "classifiers do not take"}


def _train(tmp_path, model_type: str, task: str, label: str):
    options = {**EXAMPLES[label], **(NO_BIASES.get(EXAMPLES[label]["name"], {}) if model_type != "bert" else {})}
    recipe, folder = task_recipe(tmp_path, model_type, task, method=json.dumps(options), steps=3)
    return pipeline.run(recipe), folder


def _check(tmp_path, model_type: str, task: str, label: str, rows: slice = slice(None)) -> None:
    name = EXAMPLES[label]["name"]
    summary, folder = _train(tmp_path, model_type, task, label)
    batch = batch_for(folder, task)
    mine = logits(ours(folder, summary.adapter_dir, task), batch)
    assert torch.isfinite(mine).all()
    if task == "seq2seq":  # a classifier's head alone differs from the base's; seq2seq has no head
        base = logits(load_model(ModelSpec(name_or_path=str(folder), dtype="float32"), TaskHead(task)), batch)
        assert (mine - base).abs().max() > 1e-4, f"{label} changed nothing"
    if METHODS[name].in_peft:
        theirs = logits(peft_model(folder, summary.adapter_dir, task), batch)
        torch.testing.assert_close(theirs[rows], mine[rows], atol=2e-5, rtol=0)


@pytest.mark.parametrize("label", [label for label, o in EXAMPLES.items()
                                   if ("sequence_classification", o["name"]) not in REFUSED])
def test_every_method_on_a_bert_classifier(tmp_path, label):
    _check(tmp_path, "bert", "sequence_classification", label)


@pytest.mark.parametrize("label", [label for label, o in EXAMPLES.items() if ("seq2seq", o["name"]) not in REFUSED])
def test_every_method_on_t5(tmp_path, label):
    _check(tmp_path, "t5", "seq2seq", label)


@pytest.mark.parametrize("label", ["prompt_tuning", "p_tuning"])
def test_prompt_methods_on_a_decoder_classifier_pool_the_last_real_token(tmp_path, label):
    """peft, given only embeddings, pools the last position of a right-padded row (a padding
    token); peftctl pools the last real token. Rows without padding agree exactly."""
    _check(tmp_path, "llama", "sequence_classification", label, rows=slice(1, 2))  # row 1 is unpadded


@pytest.mark.parametrize(("task", "name"), sorted(REFUSED))
def test_methods_a_task_cannot_take_are_refused_by_validate(tmp_path, task, name):
    recipe_path = tmp_path / "recipe.yaml"
    task_recipe(tmp_path, "t5" if task == "seq2seq" else "bert", task, method=json.dumps({"name": name}))
    assert_refused(invoke("validate", recipe_path), "method.name", REFUSED[(task, name)])


def test_bottleneck_adapters_sit_at_the_end_of_both_blocks_of_every_layer_of_both_t5_stacks(tmp_path):
    from peftctl.methods.bottleneck import BottleneckAdapter

    summary, folder = _train(tmp_path, "t5", "seq2seq", "houlsby")
    model = ours(folder, summary.adapter_dir, "seq2seq")
    sites = [name for name, module in model.named_modules() if isinstance(module, BottleneckAdapter)]
    expected = {f"{stack}.block.{i}.layer.0.SelfAttention.o" for stack in ("encoder", "decoder") for i in range(2)} | {
        f"encoder.block.{i}.layer.1.DenseReluDense.wo" for i in range(2)} | {
        f"decoder.block.{i}.layer.2.DenseReluDense.wo" for i in range(2)}
    assert set(sites) == expected, sites
