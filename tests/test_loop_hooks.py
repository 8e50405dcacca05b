"""The loop hooks of the method contract (methods/base.py), through `train` and its checkpoints.

A LoRA whose method asks for every hook: lora_B at 4× the learning rate (a second AdamW group),
an L2 term on lora_B as its extra loss, a running sum of lora_B's norm after each step as its
loop state. Nothing in peftctl uses these hooks yet; these tests keep them working.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftctl import methods
from peftctl.data.tokenize import load_data
from peftctl.methods.lora import LoraConfig
from peftctl.model.loading import load_tokenizer
from peftctl.recipe.schema import DataSpec, TrainSpec
from peftctl.train.loop import train
from peftctl.train.optim import param_groups
from tiny_models import TINY_GPT2, tiny_gpt2

ROOT = Path(__file__).resolve().parent.parent
LR, B_SCALE = 1e-2, 4.0
SPEC = dict(batch_size=4, lr=LR, scheduler="constant", warmup_steps=0, max_grad_norm=None, log_every=1, seed=3)


class HookedLora(type(methods.get("lora"))):
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.norm_sum = torch.zeros(())

    def lr_scales(self, adapter):
        return {name: B_SCALE for name in adapter.params if "lora_B" in name}

    def extra_loss(self, adapter):
        return 1e-3 * sum(p.square().sum() for name, p in adapter.params.items() if "lora_B" in name)

    def after_step(self, adapter, step, total_steps):
        self.calls.append((step, total_steps))
        self.norm_sum += sum(float(p.detach().norm()) for n, p in adapter.params.items() if "lora_B" in n)

    def loop_state(self, adapter):
        return {"norm_sum": self.norm_sum}

    def restore_loop_state(self, adapter, state, source):
        self.norm_sum = state["norm_sum"].clone()


@pytest.fixture(scope="module")
def tiny_data():
    tokenizer = load_tokenizer(TINY_GPT2)
    spec = DataSpec(train=ROOT / "recipes/data/tiny/train.jsonl", validation=ROOT / "recipes/data/tiny/validation.jsonl")
    return load_data(spec, tokenizer, seed=0), tokenizer.pad_token_id


def hooked_adapter():
    torch.manual_seed(0)
    return HookedLora().apply(tiny_gpt2(), LoraConfig(name="lora", r=4, target_modules=["c_attn"]))


def test_lr_scales_make_one_adamw_group_per_multiplier(tiny_data, tmp_path):
    data, pad_id = tiny_data
    adapter = hooked_adapter()
    groups = param_groups(adapter, LR)
    assert [(g["lr_scale"], g["lr"]) for g in groups] == [(1.0, LR), (B_SCALE, LR * B_SCALE)]
    assert all("lora_B" in name for name in groups[1]["names"]) and groups[0]["names"]
    before = {name: p.detach().clone() for name, p in adapter.params.items()}
    train(adapter, data, TrainSpec(**SPEC, max_steps=1), tmp_path, pad_id)
    # AdamW's first step moves each weight by its lr times ±1 (m / sqrt(v) = sign of the gradient).
    for name, p in adapter.params.items():
        moved = float((p.detach() - before[name]).abs().max())
        if "lora_B" in name:  # lora_A has no gradient yet: lora_B starts at zero
            assert moved == pytest.approx(LR * B_SCALE, rel=1e-3)
    assert adapter.method.calls == [(1, 1)]


def test_the_extra_loss_changes_the_training(tiny_data, tmp_path):
    data, pad_id = tiny_data
    hooked, plain = hooked_adapter(), hooked_adapter()
    plain.method.extra_loss = lambda adapter: None
    for adapter, out in ((hooked, tmp_path / "hooked"), (plain, tmp_path / "plain")):
        out.mkdir()
        result = train(adapter, data, TrainSpec(**SPEC, max_steps=3), out, pad_id)
    b = [name for name in hooked.params if "lora_B" in name]
    assert all(not torch.equal(hooked.params[n], plain.params[n]) for n in b)
    assert result.steps == 3


def test_a_resumed_run_restores_the_groups_and_the_method_state(tiny_data, tmp_path):
    data, pad_id = tiny_data
    (tmp_path / "whole").mkdir(), (tmp_path / "resumed").mkdir()
    whole = hooked_adapter()
    train(whole, data, TrainSpec(**SPEC, max_steps=6, save_every=3), tmp_path / "whole", pad_id)
    assert whole.method.calls == [(step, 6) for step in range(1, 7)]
    step3 = tmp_path / "whole" / "checkpoints" / "step-3"
    assert float(load_file(step3 / "method.safetensors")["norm_sum"]) > 0

    resumed = hooked_adapter()  # a fresh process: a new method instance, its state at zero
    result = train(resumed, data, TrainSpec(**SPEC, max_steps=6, save_every=3), tmp_path / "resumed", pad_id,
                   resume=step3)
    assert result.resumed_from == 3 and resumed.method.calls == [(step, 6) for step in range(4, 7)]
    torch.testing.assert_close(resumed.method.norm_sum, whole.method.norm_sum, atol=1e-5, rtol=0)
    for name, p in resumed.params.items():
        torch.testing.assert_close(p, whole.params[name], atol=1e-6, rtol=0)
