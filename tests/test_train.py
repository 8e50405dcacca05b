"""The training loop: exact loss, token-weighted accumulation, schedule, metrics."""

import json
import math

import pytest
import torch

from peftctl import methods
from peftctl.data.tokenize import load_data
from peftctl.methods.lora import LoraConfig
from peftctl.model.loading import load_tokenizer
from peftctl.recipe.schema import DataSpec, TrainSpec
from peftctl.train.loop import train
from peftctl.train.loss import CausalLMLoss
from peftctl.train.optim import lr_schedule
from tiny_models import TINY_GPT2, tiny_gpt2, token_batch

TINY_DATA = "recipes/data/tiny"


def test_loss_on_labelled_positions_equals_full_logits_loss():
    model = tiny_gpt2()
    batch = token_batch(model.config.vocab_size)
    batch["labels"][:, :5] = -100  # a masked prompt
    loss_sum, count = CausalLMLoss(model)(**batch)
    reference = model(**batch).loss  # transformers: full logits, mean over labelled tokens
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    assert torch.allclose(loss_sum / count, reference, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_data():
    tokenizer = load_tokenizer(TINY_GPT2)
    spec = DataSpec(train=f"{TINY_DATA}/train.jsonl", validation=f"{TINY_DATA}/validation.jsonl")
    return load_data(spec, tokenizer, seed=0), tokenizer.pad_token_id


def trained_lora(data, pad_id, tmp_path, **train_options):
    torch.manual_seed(0)
    adapter = methods.apply(tiny_gpt2(), LoraConfig(name="lora", r=4, target_modules=["c_attn"]))
    spec = TrainSpec(scheduler="constant", lr=1e-2, seed=1, **train_options)
    result = train(adapter, data, spec, tmp_path, pad_id)
    return adapter, result


def test_gradient_accumulation_matches_one_big_batch(tiny_data, tmp_path):
    """4 rows at once, or 2 + 2 accumulated, average the same tokens: the same update."""
    data, pad_id = tiny_data
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    big, _ = trained_lora(data, pad_id, tmp_path / "a", batch_size=4, grad_accum=1, max_steps=3)
    small, _ = trained_lora(data, pad_id, tmp_path / "b", batch_size=2, grad_accum=2, max_steps=3)
    for name, param in big.params.items():
        assert param.abs().max() > 0
        torch.testing.assert_close(param, small.params[name], atol=1e-6, rtol=1e-5)


def test_metrics_and_validation_are_recorded(tiny_data, tmp_path):
    data, pad_id = tiny_data
    _, result = trained_lora(data, pad_id, tmp_path, batch_size=4, max_steps=6, log_every=2, eval_every=3)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_steps = [entry["step"] for entry in lines if "loss" in entry]
    val_steps = [entry["step"] for entry in lines if "val_loss" in entry]
    assert train_steps == [2, 4, 6] and val_steps == [0, 3, 6]
    assert all(math.isfinite(e["loss"]) and e["tokens_per_s"] > 0 for e in lines if "loss" in e)
    assert result.val_loss_before == lines[0]["val_loss"] and result.val_loss_after == lines[-1]["val_loss"]
    assert result.val_loss_after < result.val_loss_before
    assert result.steps == 6 and result.tokens > 0


def test_epochs_set_the_number_of_steps(tiny_data, tmp_path):
    data, pad_id = tiny_data
    _, result = trained_lora(data, pad_id, tmp_path, batch_size=3, grad_accum=2, epochs=2)
    assert result.steps == 2 * math.ceil(math.ceil(len(data.train) / 3) / 2)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays(kind):
    factor = lr_schedule(TrainSpec(scheduler=kind, warmup_steps=4), total_steps=20)
    warmup = [factor(step) for step in range(4)]
    assert warmup == sorted(warmup) and warmup[-1] < 1
    assert factor(4) == pytest.approx(1.0)
    end = factor(20)
    assert end == pytest.approx({"cosine": 0.0, "linear": 0.0, "constant": 1.0}[kind], abs=1e-9)
    if kind == "cosine":
        assert factor(12) == pytest.approx(0.5)
