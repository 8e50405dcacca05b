"""LoRA+ (`loraplus_lr_ratio`) against peft's `create_loraplus_optimizer` (the oracle).

The same adapter weights in peft and here, a few AdamW steps on the same batch: peft's LoRA+
optimizer on the peft model, peftctl's parameter groups (train.param_groups, what the loop
builds) on ours. Groups must hold the same tensors at the same rates, and the weights after the
steps must agree (fp32, atol 1e-6). LoRA+ saves nothing: the export is a plain LoRA.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer

import peftctl.methods
from method_checks import assert_smoke_run
from peftctl.export.adapter_files import save_adapter
from peftctl.methods.lora import LoraConfig
from peftctl.train.optim import param_groups
from tiny_models import tiny_llama, token_batch
from test_lora_parity import peft_param_name

R, ALPHA, LR, RATIO, DECAY = 4, 8, 1e-3, 16.0, 0.01
TARGETS = ["q_proj", "v_proj", "down_proj"]


def adapters(use_dora: bool):
    """Ours and peft's, with the same non-trivial weights (B random, so A's gradients are not zero)."""
    ours = peftctl.methods.apply(tiny_llama(), LoraConfig(name="lora", r=R, alpha=ALPHA, target_modules=TARGETS,
                                                          use_dora=use_dora, loraplus_lr_ratio=RATIO))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                               use_dora=use_dora, task_type="CAUSAL_LM"))
    peft_params = dict(theirs.named_parameters())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in ours.params.items():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            peft_params[peft_param_name(name)].copy_(param)
    return ours, theirs


def steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch, count: int = 3) -> None:
    model.train()
    for _ in range(count):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_groups_and_steps_match_peft(use_dora):
    ours, theirs = adapters(use_dora)
    groups = param_groups(ours, LR)
    reference = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                          loraplus_weight_decay=DECAY)
    peft_names = {id(p): n for n, p in theirs.named_parameters()}
    expected = {(group["lr"], frozenset(peft_names[id(p)] for p in group["params"]))
                for group in reference.param_groups if group["params"]}
    assert {(group["lr"], frozenset(map(peft_param_name, group["names"]))) for group in groups} == expected
    fast = next(group["names"] for group in groups if group["lr_scale"] == RATIO)
    assert any(name.endswith("lora_magnitude_vector") for name in fast) == use_dora  # peft: every 1-D tensor

    batch = token_batch(128)
    steps(theirs, reference, batch)
    steps(ours.model, torch.optim.AdamW(groups, lr=LR, weight_decay=DECAY), batch)
    peft_params = dict(theirs.named_parameters())
    for name, param in ours.params.items():
        torch.testing.assert_close(param, peft_params[peft_param_name(name)], atol=1e-6, rtol=0)


def test_a_plain_lora_is_saved(tmp_path):
    """No peft key for LoRA+ (it is an optimizer): the config is plain LoRA's, and so the weights."""
    ours, _ = adapters(use_dora=False)
    save_adapter(ours, tmp_path, base_model="test")
    plain = peftctl.methods.apply(tiny_llama(), LoraConfig(name="lora", r=R, alpha=ALPHA, target_modules=TARGETS))
    save_adapter(plain, tmp_path / "plain", base_model="test")
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "plain" / "adapter_config.json").read_text())


def test_recipe_smoke_run(tmp_path):
    assert_smoke_run("recipes/loraplus-gpt2.yaml", tmp_path, peft_loads=True)


def test_bad_ratio_names_the_option(tmp_path):
    from cli_checks import assert_refused, invoke
    from method_checks import ROOT

    recipe = tmp_path / "r.yaml"
    recipe.write_text((ROOT / "recipes/loraplus-gpt2.yaml").read_text().replace("lr_ratio: 16", "lr_ratio: 0")
                      .replace("data/tiny", str(ROOT / "recipes/data/tiny")))
    assert_refused(invoke("validate", recipe), "method.loraplus_lr_ratio")
