"""Sequence classification and seq2seq: every listed architecture trains from a recipe, and its
adapter meets peft (AutoPeftModel classes' own loading, equal logits) and merges."""

from __future__ import annotations

import pytest
import torch

from peftctl.arch.tasks import TaskHead
from peftctl.export.adapter_files import load_adapter
from peftctl.model.loading import base_facts, load_model
from peftctl.recipe.load import load_recipe
from peftctl.recipe.schema import ModelSpec
from peftctl.run import pipeline
from task_models import DECODERS, ENCODERS, SEQ2SEQ, classification_rows, save_tiny, seq2seq_rows, write_rows

# LoRA's targets in each family's own names (peft's defaults per model type agree).
ATTENTION = {"bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
             "deberta-v2": ["query_proj", "value_proj"], "electra": ["query", "value"], "modernbert": ["Wqkv"],
             "gpt2": ["c_attn"], "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"]}
LABELS = ("negative", "neutral", "positive")


def task_recipe(tmp_path, model_type: str, task: str, method: str = "{name: lora, r: 4, alpha: 8, target_modules: %s}",
                steps: int = 20, extra: str = ""):
    folder = save_tiny(model_type, tmp_path / model_type)
    rows = classification_rows(36) if task == "sequence_classification" else seq2seq_rows(36)
    write_rows(tmp_path / "train.jsonl", rows[:30])
    write_rows(tmp_path / "val.jsonl", rows[30:])
    targets = ATTENTION.get(model_type, ["q_proj", "v_proj"])
    method_yaml = method % targets if "%s" in method else method
    (tmp_path / "recipe.yaml").write_text(
        f"task: {task}\nmodel: {{name_or_path: {folder}, dtype: float32}}\nmethod: {method_yaml}\n"
        f"data: {{train: train.jsonl, validation: val.jsonl, max_seq_len: 32}}\n"
        f"train: {{max_steps: {steps}, batch_size: 6, lr: 1.0e-2, save_every: null}}\n{extra}")
    return load_recipe(tmp_path / "recipe.yaml", output_dir=tmp_path / "run"), folder


def batch_for(folder, task: str) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = ["good great the film 3", "awful the plot was very bad but fine"]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    if task == "seq2seq":
        batch["decoder_input_ids"] = tokenizer(["0 3 7", "1 2"], padding=True, return_tensors="pt")["input_ids"]
    return batch


def ours(folder, adapter_dir, task: str, labels=LABELS) -> torch.nn.Module:
    spec = ModelSpec(name_or_path=str(folder), dtype="float32")
    model = load_model(spec, TaskHead(task, labels if task == "sequence_classification" else ()))
    return load_adapter(model, adapter_dir, base_facts(spec)).model.eval()


def peft_model(folder, adapter_dir, task: str) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    if task == "sequence_classification":
        base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(LABELS), pad_token_id=0)
    else:
        base = AutoModelForSeq2SeqLM.from_pretrained(folder)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def trained_as_peft_loads_it(tmp_path, model_type: str, task: str):
    """LoRA on `model_type` for `task` trained from a recipe (its validation loss falls), loaded by
    peftctl and by peft with the same logits (1e-5): the run, the base folder, a batch, our logits."""
    recipe, folder = task_recipe(tmp_path, model_type, task)
    summary = pipeline.run(recipe)
    assert summary.result.val_loss_after < summary.result.val_loss_before
    batch = batch_for(folder, task)
    mine = logits(ours(folder, summary.adapter_dir, task), batch)
    torch.testing.assert_close(logits(peft_model(folder, summary.adapter_dir, task), batch), mine, atol=1e-5, rtol=0)
    return summary, folder, batch, mine


@pytest.mark.parametrize("model_type", [*ENCODERS, *DECODERS])
def test_classifier_trains_and_peft_loads_it_with_equal_logits(tmp_path, model_type):
    summary, _, _, mine = trained_as_peft_loads_it(tmp_path, model_type, "sequence_classification")
    assert mine.shape == (2, 3)
    import json

    config = json.loads((summary.adapter_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"]


@pytest.mark.parametrize("model_type", list(SEQ2SEQ))
def test_seq2seq_trains_and_peft_loads_it_with_equal_logits(tmp_path, model_type):
    _, folder, batch, mine = trained_as_peft_loads_it(tmp_path, model_type, "seq2seq")
    base = logits(load_model(ModelSpec(name_or_path=str(folder), dtype="float32"), TaskHead("seq2seq")), batch)
    assert (mine - base).abs().max() > 1e-3  # the adapter changed something
