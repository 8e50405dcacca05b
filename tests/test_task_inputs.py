"""Classifier and seq2seq data and options a user gets wrong: exit 2, one message naming the file,
row or key, nothing written; and what eval and merge give for these tasks."""

from __future__ import annotations

import json

import pytest
import torch

from cli_checks import assert_refused, invoke
from task_models import save_tiny, seq2seq_rows, write_rows
from test_tasks import LABELS, batch_for, logits, ours, task_recipe


def _recipe(tmp_path, task: str, rows: list[dict], extra_data: str = "", top: str = "") -> object:
    folder = save_tiny("bert" if task == "sequence_classification" else "t5", tmp_path / "model")
    write_rows(tmp_path / "train.jsonl", rows)
    path = tmp_path / "recipe.yaml"
    path.write_text(f"{top}task: {task}\nmodel: {{name_or_path: {folder}, dtype: float32}}\n"
                    f"method: {{name: lora, r: 2, target_modules: all-linear}}\n"
                    f"data: {{train: train.jsonl{extra_data}}}\ntrain: {{max_steps: 1}}\noutput: {{dir: {tmp_path / 'run'}}}\n")
    return path


@pytest.mark.parametrize(("task", "rows", "extra", "phrases"), [
    ("sequence_classification", [{"body": "good", "label": "a"}, {"body": "bad", "label": "b"}], "",
     ["row 1", "missing field 'text'", "data.columns"]),
    ("sequence_classification", [{"text": "good", "label": "a"}, {"text": "bad", "label": ["a", "b"]}], "",
     ["row 2", "field 'label' is a list", "single label"]),
    ("sequence_classification", [{"text": "good", "label": "a"}, {"text": "bad", "label": "c"}],
     ", labels: [a, b]", ["row 2", "label 'c' is not one", "data.labels"]),
    ("seq2seq", [{"source": "the film", "target": "1"}, {"source": "the plot", "target": " "}], "",
     ["row 2", "field 'target' is empty"]),
    ("sequence_classification", [{"text": "good", "label": "a"}, {"text": "bad", "label": "b"}],
     ", train_on_inputs: true", ["data", "train_on_inputs", "remove it"]),
    ("sequence_classification", [{"text": "good", "label": "a"}, {"text": "bad", "label": "b"}],
     ", format: alpaca", ["data.format", "causal_lm format", "set data.format to classification"]),
])
def test_bad_task_input_is_refused_naming_the_row_or_key(tmp_path, task, rows, extra, phrases):
    recipe = _recipe(tmp_path, task, rows, extra)
    assert_refused(invoke("train", recipe), *phrases)
    assert not (tmp_path / "run").exists()


def test_a_validation_label_training_never_saw_names_the_validation_file_and_row(tmp_path):
    write_rows(tmp_path / "val.jsonl", [{"text": "good", "label": "a"}, {"text": "fine", "label": "neutral"}])
    recipe = _recipe(tmp_path, "sequence_classification", [{"text": "good", "label": "a"}, {"text": "bad", "label": "b"}],
                     ", validation: val.jsonl")
    assert_refused(invoke("train", recipe), "val.jsonl", "row 2", "label 'neutral' is not one")


def test_an_encoder_for_causal_lm_is_refused_naming_the_task_key(tmp_path):
    folder = save_tiny("bert", tmp_path / "model")
    write_rows(tmp_path / "train.jsonl", [{"instruction": "a", "output": "b"}])
    (tmp_path / "r.yaml").write_text(f"model: {{name_or_path: {folder}}}\nmethod: {{name: lora}}\n"
                                     "data: {train: train.jsonl}\n")
    assert_refused(invoke("validate", tmp_path / "r.yaml"), "task", "is an encoder", "sequence_classification")


def test_eval_of_a_classifier_scores_accuracy_f1_and_the_confusion_matrix_against_a_chance_base(tmp_path):
    from peftctl.run import pipeline

    recipe, folder = task_recipe(tmp_path, "bert", "sequence_classification")
    summary = pipeline.run(recipe)
    result = invoke("eval", summary.adapter_dir, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    adapter, base = report["adapter"], report["base"]
    assert report["rows"] == 6 and adapter["classes"]["labels"] == list(LABELS)
    assert sum(map(sum, adapter["classes"]["confusion"])) == 6
    correct = sum(adapter["classes"]["confusion"][i][i] for i in range(3))
    assert adapter["accuracy"] == pytest.approx(correct / 6)
    assert adapter["accuracy"] > base["accuracy"] and adapter["loss"] < base["loss"]
    printed = invoke("eval", summary.adapter_dir)
    assert "confusion matrix" in printed.output and "chance level" in " ".join(printed.output.split())


def test_merge_of_a_classifier_writes_a_plain_transformers_classifier_with_the_same_logits(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from peftctl.run import pipeline

    recipe, folder = task_recipe(tmp_path, "bert", "sequence_classification")
    summary = pipeline.run(recipe)
    result = invoke("merge", summary.adapter_dir, "--out", tmp_path / "merged", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert "AutoModelForSequenceClassification" in result.output
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label == dict(enumerate(LABELS))
    batch = batch_for(folder, "sequence_classification")
    torch.testing.assert_close(logits(merged, batch), logits(ours(folder, summary.adapter_dir,
                                                                  "sequence_classification"), batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["sequence_classification", "seq2seq"])
def test_a_peft_adapter_of_the_task_loads_in_peftctl_with_peft_logits(tmp_path, task):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    folder = save_tiny("bert" if task != "seq2seq" else "t5", tmp_path / "model")
    torch.manual_seed(0)
    if task == "seq2seq":
        base, kind, targets = AutoModelForSeq2SeqLM.from_pretrained(folder), TaskType.SEQ_2_SEQ_LM, ["q", "v"]
    else:
        base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
        kind, targets = TaskType.SEQ_CLS, ["query", "value"]
    reference = get_peft_model(base, LoraConfig(task_type=kind, r=4, target_modules=targets, init_lora_weights=False))
    reference.save_pretrained(tmp_path / "adapter")
    batch = batch_for(folder, task)
    theirs = logits(reference.eval(), batch)
    mine = logits(ours(folder, tmp_path / "adapter", task, labels=("LABEL_0", "LABEL_1", "LABEL_2")), batch)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)


def test_seq2seq_eval_scores_rouge_of_the_greedy_generations(tmp_path):
    from peftctl.run import pipeline

    recipe, folder = task_recipe(tmp_path, "t5", "seq2seq")
    summary = pipeline.run(recipe)
    report = json.loads(invoke("eval", summary.adapter_dir, "--json").stdout)
    for side in ("base", "adapter"):
        assert {"loss", "token_accuracy", "rouge1", "rouge2", "rouge_l", "exact_match"} <= set(report[side])
        assert 0 <= report[side]["rouge1"] <= 1
    assert report["adapter"]["loss"] < report["base"]["loss"]
    assert report["generations"] and {"prompt", "reference", "generated", "base"} <= set(report["generations"][0])
    assert report["generations"][0]["reference"] == seq2seq_rows(36)[30]["target"]


def test_a_classifier_run_reports_held_out_accuracy_and_draws_its_confusion_matrix(tmp_path):
    from peftctl.run import pipeline

    recipe, _ = task_recipe(tmp_path, "bert", "sequence_classification")
    summary = pipeline.run(recipe)
    figures = json.loads((summary.output_dir / "summary.json").read_text())
    confusion = figures["classes"]["confusion"]
    assert sum(map(sum, confusion)) == 6
    assert figures["val_accuracy"] == pytest.approx(sum(confusion[i][i] for i in range(3)) / 6)
    page = (summary.output_dir / "report.html").read_text()
    assert "Held-out classes" in page and page.count("<svg") == 3


@pytest.mark.slow  # a minute or two: a process per run
def test_a_classifier_bakeoff_scores_every_run_and_ranks_them_by_held_out_accuracy(tmp_path, monkeypatch):
    from peftctl.bakeoff.state import ordered

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    task_recipe(tmp_path, "bert", "sequence_classification")
    result = invoke("bakeoff", tmp_path / "recipe.yaml", "--methods", "lora,ia3", "--budget-steps", "3",
                    "--output", tmp_path / "bakeoff")
    assert result.exit_code == 0, result.output
    state = json.loads((tmp_path / "bakeoff" / "bakeoff.json").read_text())
    accuracies = [run["figures"]["accuracy"] for run in ordered(state["runs"])]
    assert all(a is not None for a in accuracies) and accuracies == sorted(accuracies, reverse=True)
    base = next(iter(state["base"].values()))
    assert base["accuracy"] is not None and "untrained head" in " ".join(result.output.split())


def test_a_bakeoff_of_classifiers_ranks_by_accuracy_and_of_causal_lms_by_validation_loss():
    from peftctl.bakeoff.state import ordered

    def run(label, status="done", **figures):
        return {"label": label, "status": status, "figures": figures}

    classifiers = [run("a", accuracy=0.5, val_loss_after=0.9), run("b", accuracy=0.8, val_loss_after=1.2),
                   run("c", "failed"), run("d", accuracy=None, val_loss_after=0.1)]
    assert [r["label"] for r in ordered(classifiers)] == ["b", "a", "d", "c"]
    causal = [run("a", val_loss_after=0.9, accuracy=None), run("b", val_loss_after=0.7, accuracy=None)]
    assert [r["label"] for r in ordered(causal)] == ["b", "a"]
