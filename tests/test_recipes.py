"""Every registered method ships its recipes, and they work: the contract a new method meets by
registering (no list here to keep up to date).

For each method `recipes/<name>-gpt2.yaml` (the builtin tiny GPT-2, seconds) is trained in the
default suite and its adapter loads back (in peft too where peft has the method);
`recipes/<name>-smollm2.yaml` (the bundled real model) is validated here, on its weightless
skeleton (its trainable count is the one the methods table gives, in the README and in
docs/methods.md), and trained for two
steps in the slow suite. Method-specific figures (trainable
counts, losses) are asserted in each method's own test file.
"""

from __future__ import annotations

import re

import pytest
import torch

from method_checks import PEFT_REFUSES_CONV1D, ROOT, assert_smoke_run
from peftctl.export.adapter_files import load_adapter
from peftctl.methods import METHODS
from peftctl.model.loading import load_model
from peftctl.plan.skeleton import describe_targets, method_on_skeleton
from peftctl.recipe.load import load_recipe
from peftctl.run.pipeline import run

RECIPES = ROOT / "recipes"
# The two copies of the methods table: the README's and the docs' methods page.
METHOD_TABLES = {page: (ROOT / page).read_text(encoding="utf-8") for page in ("README.md", "docs/methods.md")}
# LoRA's recipes predate the naming rule: the smoke run and the README's quickstart.
NAMED_OTHERWISE = {"lora": ("smoke-gpt2.yaml", "quickstart.yaml")}


# A two-step run leaves AdaLoRA's rank schedule no room: it would refuse (tested in test_adalora).
TWO_STEP_OVERRIDES = {"adalora": ["method.tinit=0", "method.tfinal=0", "method.deltaT=1"]}


def recipe_file(name: str, model: str) -> str:
    gpt2, smollm2 = NAMED_OTHERWISE.get(name, (f"{name}-gpt2.yaml", f"{name}-smollm2.yaml"))
    return f"recipes/{gpt2 if model == 'gpt2' else smollm2}"


@pytest.mark.parametrize("model", ["gpt2", "smollm2"])
@pytest.mark.parametrize("name", METHODS)
def test_every_method_has_its_recipes_and_they_validate(name, model):
    recipe = load_recipe(ROOT / recipe_file(name, model))
    assert recipe.method.name == name
    described = describe_targets(method_on_skeleton(recipe))  # the method on the model's weightless skeleton
    assert described.startswith(f"method {name}: ") and " 0 trainable" not in described, described
    if model == "smollm2":  # the methods tables quote this recipe's count
        count = re.match(rf"method {name}: ([\d,]+) trainable", described).group(1)
        for page, text in METHOD_TABLES.items():
            rows = [line for line in text.splitlines() if line.startswith(f"| `{name}` |")]
            assert rows and count in rows[0].split("|")[3], f"{page}'s row for {name} lacks {count}: {rows}"


@pytest.mark.parametrize("name", METHODS)
def test_gpt2_recipe_trains_and_its_adapter_loads_back(name, tmp_path):
    method = METHODS[name]
    peft_loads = method.in_peft and name not in PEFT_REFUSES_CONV1D  # the tiny GPT-2's layers are Conv1D
    summary = assert_smoke_run(recipe_file(name, "gpt2"), tmp_path, peft_loads=peft_loads)
    assert summary.result.val_loss_after < summary.result.val_loss_before
    recipe = load_recipe(ROOT / recipe_file(name, "gpt2"))
    reloaded = load_adapter(load_model(recipe.model), summary.adapter_dir)
    assert reloaded.method is method  # (P-tuning exports its encoder's output: fewer weights than it trained)
    assert all(torch.isfinite(p).all() for p in reloaded.params.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_smollm2_recipe_trains_two_steps(name, tmp_path):
    overrides = ["train.max_steps=2", "data.validation=null", *TWO_STEP_OVERRIDES.get(name, [])]
    recipe = load_recipe(ROOT / recipe_file(name, "smollm2"), overrides, output_dir=tmp_path / "run")
    summary = run(recipe)
    assert summary.result.steps == 2 and summary.result.train_loss is not None
    assert (summary.adapter_dir / "adapter_model.safetensors").is_file()
