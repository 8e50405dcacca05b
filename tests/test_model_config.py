"""A model folder that lies (issue 41): config values that are impossible, or that disagree with the
weights, the tokenizer or each other, are one exit-2 message keyed `model.name_or_path` naming the
file and the field, never a traceback; `plan` checks sizes before it builds anything.

The folder is the builtin tiny GPT-2 as `peftctl export-base` writes it, with one file edited.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_checks import assert_refused, invoke
from test_bad_input import recipe_text
from test_cli import ONE_THREAD

WHERE = "model.name_or_path (line 2)"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "tiny-gpt2"
    assert invoke("export-base", "builtin:tiny-gpt2", "--out", folder).exit_code == 0
    return folder


def edited(exported: Path, tmp_path: Path, file: str = "config.json", **changes) -> tuple[Path, Path]:
    """A copy of the exported folder with `changes` written into `file` (None deletes a key), and a
    recipe training it; (recipe, model folder)."""
    model = tmp_path / "model"
    shutil.copytree(exported, model)
    data = json.loads((model / file).read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    (model / file).write_text(json.dumps(data))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text().replace("builtin:tiny-gpt2", str(model)))
    return recipe, model


def refused(command: str, recipe: Path, tmp_path: Path, *phrases: str) -> str:
    args = [command, recipe] + (["--output", tmp_path / "run"] if command == "train" else [])
    message = assert_refused(invoke(*args), str(recipe), WHERE, *phrases)
    assert not (tmp_path / "run").exists()
    return message


# --- the four examples of the issue ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["plan", "train"])
def test_a_negative_hidden_size(exported, tmp_path, command):
    recipe, model = edited(exported, tmp_path, n_embd=-64)
    refused(command, recipe, tmp_path, f"{model / 'config.json'}: 'n_embd' is -64, not a size",
            "expected: a whole number of at least 1", "fix: restore the model's original config.json")


def test_a_vocabulary_that_disagrees_with_the_embeddings(exported, tmp_path):
    recipe, model = edited(exported, tmp_path, vocab_size=300)
    assert invoke("plan", recipe).exit_code == 0  # plan needs no weights: 300 embeddings are a valid config
    refused("train", recipe, tmp_path, f"{model / 'config.json'} disagrees with the weights",
            "'transformer.wte.weight' in model.safetensors is [257, 64], the config makes it [300, 64]")


@pytest.mark.parametrize("command", ["plan", "train"])
def test_a_size_given_as_a_string(exported, tmp_path, command):
    recipe, model = edited(exported, tmp_path, n_embd="64")
    refused(command, recipe, tmp_path, f"{model / 'config.json'}: 'n_embd' has the wrong type",
            "expected int, got str")


@pytest.mark.parametrize("command", ["plan", "train"])
def test_sizes_whose_product_overflows(exported, tmp_path, command):
    recipe, model = edited(exported, tmp_path, n_embd=2**62)
    refused(command, recipe, tmp_path, f"{model / 'config.json'}: 'n_embd' is {2**62}", "too large to count")


def test_a_model_too_large_to_count_as_a_whole_subprocess(exported, tmp_path):
    """Each size allowed alone, their product not: `plan` says so, as a shell sees it."""
    recipe, _ = edited(exported, tmp_path, n_embd=2**20, n_layer=8, vocab_size=2**30)
    proc = subprocess.run([sys.executable, "-m", "peftctl", "plan", str(recipe)], capture_output=True, text=True,
                          timeout=120, env=ONE_THREAD)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "describe a model too large to count" in proc.stderr and WHERE in proc.stderr


# --- the other shapes of the same fault -----------------------------------------------------------


@pytest.mark.parametrize("changes, phrase", [
    # GPT-2 cannot build heads that do not divide its width (families deriving head_dim by floor can):
    # transformers' own refusal, while the skeleton is built, as the one error.
    ({"n_head": 5}, "transformers cannot build a model from it: `embed_dim` must be divisible by num_heads"),
    ({"n_layer": 0}, "'n_layer' is 0, not a size"),
    ({"n_layer": None, "n_embd": None}, None),  # defaults: 12 layers of 768; weights disagree (train only)
    ({"pad_token_id": 900}, "'pad_token_id' names token 900, outside the vocabulary of 257"),
    ({"attn_pdrop": 2}, "'attn_pdrop' is 2, not a probability"),
    ({"vocab_size": None}, None),
])
def test_impossible_config_values_are_named_by_plan(exported, tmp_path, changes, phrase):
    recipe, model = edited(exported, tmp_path, **changes)
    if phrase is None:
        assert invoke("plan", recipe).exit_code in (0, 2)
        refused("train", recipe, tmp_path, str(model / "config.json"))
    else:
        refused("plan", recipe, tmp_path, f"{model / 'config.json'}: {phrase}")


def test_a_config_with_more_layers_than_saved_is_refused_before_the_weights_load(exported, tmp_path, monkeypatch):
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the headers were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    recipe, model = edited(exported, tmp_path, n_layer=3)
    refused("train", recipe, tmp_path, f"{model / 'config.json'} describes 232,064 parameters",
            "the weights files hold 182,080 values")


def test_an_index_naming_a_shard_that_is_not_there(exported, tmp_path):
    recipe, model = edited(exported, tmp_path)
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    names = ["transformer.wte.weight", "transformer.h.0.ln_1.weight"]
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        names[0]: "model-00001-of-00002.safetensors", names[1]: "model-00002-of-00002.safetensors"}}))
    refused("train", recipe, tmp_path, f"{model / 'model.safetensors.index.json'}: names shard "
            "'model-00002-of-00002.safetensors'", "which is not in")


def test_a_tokenizer_larger_than_the_vocabulary(exported, tmp_path):
    recipe, model = edited(exported, tmp_path, vocab_size=200, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    (model / "generation_config.json").unlink()  # its token ids (256) would be refused first
    refused("train", recipe, tmp_path, "the tokenizer has 257 tokens", "'vocab_size' 200 embeddings")


@pytest.mark.parametrize("changes, phrase", [
    ({"max_new_tokens": -5}, "'max_new_tokens' is -5"),
    ({"temperature": "hot"}, "'temperature' is 'hot'"),
    ({"top_p": 7}, "'top_p' is 7"),
    ({"eos_token_id": 999999}, "'eos_token_id' names token 999999"),
])
def test_impossible_generation_config_values(exported, tmp_path, changes, phrase):
    recipe, model = edited(exported, tmp_path, "generation_config.json", **changes)
    refused("train", recipe, tmp_path, f"{model / 'generation_config.json'}: {phrase}")


def test_a_generation_config_that_is_not_json(exported, tmp_path):
    recipe, model = edited(exported, tmp_path)
    (model / "generation_config.json").write_text("{oops")
    refused("validate", recipe, tmp_path, f"{model / 'generation_config.json'}", "is not readable JSON")


def test_the_exported_folder_itself_trains(exported, tmp_path):
    recipe, _ = edited(exported, tmp_path)
    result = invoke("train", recipe, "--output", tmp_path / "run")
    assert result.exit_code == 0, result.output


def test_a_config_with_fewer_layers_than_saved_is_refused_before_training(exported, tmp_path):
    recipe, model = edited(exported, tmp_path, n_layer=1)
    refused("train", recipe, tmp_path, f"{model / 'config.json'} disagrees with the weights",
            "the config has no layer for them", "transformer.h.1.")


@pytest.mark.parametrize("family", ["qwen2_moe", "gemma3n_text", "gemma4", "gemma3", "glm4_moe", "xlnet"])
def test_configs_transformers_writes_for_real_families_pass_the_checks(family):
    """Shapes of a valid config that a too-strict check refused: Qwen2-MoE's sliding_window 0 (none),
    Gemma 3n's per-layer list of sizes, Gemma 4's per-layer fields that transformers will not read
    globally, a multimodal config whose own level has no vocabulary (Gemma 3), GLM-4-MoE's heads
    that do not divide the width (its head_dim is hidden // heads), XLNet's max_position_embeddings
    of -1."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from peftctl.model.config_checks import check_config

    check_config(CONFIG_MAPPING[family](), "config.json")
