"""OFT against `peft` (the oracle): export / import both ways for each option peftctl implements
(block size or count, shared blocks, Cayley-Neumann or the exact Cayley transform, series
length), orthogonality, merge (also into a 4-bit base), GPT-2's Conv1D layers (which peft's OFT
refuses), the weightless skeleton `validate` uses, the recipe's smoke run and option errors.

Tolerances: fp32 throughout, logits within atol 1e-5 of peft's (bit-equal here); merges within
1e-4 of the unmerged model and 1e-6 of peft's merged weights. Every adapter compared is
non-trivial: trained a few steps (or, for peft-made ones, peft's `init_weights=False`: entries
drawn from N(0, 0.1²)) so its logits differ from the base model's by more than 1e-3.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import peftctl.methods
from cli_checks import assert_refused, invoke
from method_checks import assert_peft_save_loads, assert_smoke_run, with_random_biases
from peftctl.core.errors import UserError
from peftctl.export.adapter_files import load_adapter, save_adapter
from peftctl.export.merge import merge_to_folder
from peftctl.methods.oft import METHOD, OftConfig, OftLinear
from test_qlora import trained_gpt2_adapter
from tiny_models import batch_logits, real_difference, tiny_gpt2, tiny_llama, token_batch, train_steps

ATOL = 1e-5
NON_TRIVIAL = 1e-3
B16 = 16 * 15 // 2  # trained entries of one 16 × 16 block

# name → (options, peft's spelling of them, analytic trainable count) on the tiny Llama: 2 layers,
# q/k/v/o/gate/up take 64 inputs, down_proj 96.
CASES = {
    "block16-q+down": ({"oft_block_size": 16, "target_modules": ["q_proj", "down_proj"]},
                       {"oft_block_size": 16, "r": 0}, 2 * (4 + 6) * B16),
    "r4-exact-cayley": ({"r": 4, "target_modules": ["q_proj", "down_proj"], "use_cayley_neumann": False},
                        {"r": 4, "oft_block_size": 0}, 2 * (4 * B16 + 4 * (24 * 23 // 2))),
    "shared-3-terms": ({"oft_block_size": 8, "block_share": True, "num_cayley_neumann_terms": 3,
                        "target_modules": ["v_proj", "o_proj"]}, {"oft_block_size": 8, "r": 0}, 2 * 2 * 28),
    "default-all-linear": ({}, {"oft_block_size": 32, "r": 0, "target_modules": "all-linear"},
                           2 * (6 * 2 + 3) * (32 * 31 // 2)),
}


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trained_adapter(options: dict, factory=tiny_llama):
    model = factory()
    batch = token_batch(model.config.vocab_size)
    adapter = peftctl.methods.apply(model, OftConfig(name="oft", **options))
    train_steps(adapter, batch, steps=3)
    return adapter, batch


def peft_config(case: str, **extra) -> peft.OFTConfig:
    options, spelling, _ = CASES[case]
    options = {key: value for key, value in options.items() if key not in ("r", "oft_block_size")}
    return peft.OFTConfig(task_type="CAUSAL_LM", **{**options, **spelling, **extra})


# --- 1. ours → peft -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_export_loads_in_peft_with_equal_logits_and_peft_layout(case, tmp_path):
    options, _, analytic = CASES[case]
    adapter, batch = trained_adapter(options)
    ours = batch_logits(adapter.model, batch)
    save_adapter(adapter, tmp_path / "a", base_model="test")

    fresh = tiny_llama()
    base = batch_logits(fresh, batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "a").eval()
    # Every key matched, and no "retrain: the Cayley-Neumann maths changed" warning (peft_version).
    assert not [str(w.message) for w in caught if "keys" in str(w.message) or "retrain" in str(w.message)]
    assert real_difference(ours, base, batch["attention_mask"]) > NON_TRIVIAL
    torch.testing.assert_close(batch_logits(loaded, batch), ours, atol=ATOL, rtol=0)

    reference = peft.get_peft_model(tiny_llama(), peft_config(case))
    assert adapter.trainable_count() == trainable_count(reference) == trainable_count(adapter.model) == analytic
    reference.save_pretrained(tmp_path / "p")
    peft_shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "p" / "adapter_model.safetensors").items()}
    our_shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "a" / "adapter_model.safetensors").items()}
    assert our_shapes == peft_shapes
    assert all(k.endswith(".oft_R.weight") for k in our_shapes)


# --- 2. peft → ours -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_with_equal_logits(case, tmp_path):
    torch.manual_seed(0)
    reference = peft.get_peft_model(tiny_llama(), peft_config(case, init_weights=False)).eval()
    assert_peft_save_loads(reference, tiny_llama(), tmp_path, atol=ATOL, non_trivial=NON_TRIVIAL)


def test_module_dropout_from_peft_is_accepted_since_it_changes_nothing_at_inference(tmp_path):
    reference = peft.get_peft_model(tiny_llama(), peft_config("block16-q+down", init_weights=False,
                                                              module_dropout=0.1)).eval()
    reference.save_pretrained(tmp_path)
    batch = token_batch(128)
    torch.testing.assert_close(batch_logits(load_adapter(tiny_llama(), tmp_path).model, batch),
                               batch_logits(reference, batch), atol=ATOL, rtol=0)


# --- 3. the rotation, init, merge, precision -----------------------------------------------------

def test_exact_cayley_blocks_are_orthogonal_and_keep_the_input_norm():
    adapter, _ = trained_adapter(CASES["r4-exact-cayley"][0])
    layer = adapter.model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        rotation = layer.oft_R.matrices()
        eye = torch.eye(rotation.shape[-1]).expand_as(rotation)
        torch.testing.assert_close(rotation @ rotation.transpose(-1, -2), eye, atol=1e-6, rtol=0)
        x = torch.randn(3, 96)
        torch.testing.assert_close(layer.oft_R(x).norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=0)


def test_starts_equal_to_the_base():
    model = tiny_llama()
    batch = token_batch(model.config.vocab_size)
    base = batch_logits(model, batch)
    peftctl.methods.apply(model, OftConfig(name="oft"))
    torch.testing.assert_close(batch_logits(model, batch), base, atol=0, rtol=0)


@pytest.mark.parametrize("case", ["block16-q+down", "shared-3-terms"])
def test_merge_matches_unmerged_and_peft(case, tmp_path):
    adapter, batch = trained_adapter(CASES[case][0])
    unmerged = batch_logits(adapter.model, batch)
    save_adapter(adapter, tmp_path, base_model="test")

    merged = METHOD.merge(adapter)

    assert not any(isinstance(m, OftLinear) for m in merged.modules())
    torch.testing.assert_close(batch_logits(merged, batch), unmerged, atol=1e-4, rtol=0)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).merge_and_unload().state_dict()
    ours = merged.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0, msg=lambda m: f"{key}: {m}")


def test_gpt2_conv1d_layers_train_reload_and_merge_though_peft_refuses_them(tmp_path):
    model_factory = lambda: with_random_biases(tiny_gpt2())  # noqa: E731
    adapter, batch = trained_adapter({"oft_block_size": 16, "target_modules": ["c_attn", "mlp.c_proj"]},
                                     model_factory)
    ours = batch_logits(adapter.model, batch)
    assert real_difference(ours, batch_logits(model_factory(), batch), batch["attention_mask"]) > NON_TRIVIAL
    save_adapter(adapter, tmp_path, base_model="test")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    torch.testing.assert_close(batch_logits(load_adapter(model_factory(), tmp_path).model, batch), ours,
                               atol=0, rtol=0)
    merged = METHOD.merge(adapter)
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(batch_logits(merged, batch), ours, atol=1e-4, rtol=0)
    with pytest.raises(TypeError, match="Conv1D"):  # peft 0.21's OFT: nn.Linear, Conv2d, Embedding only
        peft.PeftModel.from_pretrained(model_factory(), tmp_path)


def test_merge_into_a_4bit_base_equals_the_4bit_base_with_the_adapter(tmp_path):
    adapter_dir = trained_gpt2_adapter(tmp_path / "adapter", "4bit", "oft", oft_block_size=16,
                                       target_modules="all-linear")
    figures = merge_to_folder(adapter_dir, tmp_path / "merged")
    assert figures["compared_with"].startswith("4bit")
    assert 0 < figures["max_abs_logit_diff"] < 1e-4, figures


def test_bf16_base_trains_fp32_entries():
    model = tiny_llama().to(torch.bfloat16)
    adapter = peftctl.methods.apply(model, OftConfig(name="oft", oft_block_size=16))
    assert all(p.dtype == torch.float32 for p in adapter.params.values())
    batch = token_batch(model.config.vocab_size)
    assert batch_logits(model, batch).dtype == torch.bfloat16
    train_steps(adapter, batch, steps=2)
    assert all(p.abs().max() > 0 for p in adapter.params.values())


# --- 4. the recipe and the skeleton -----------------------------------------------------------

def test_recipe_smoke_run_lowers_the_loss(tmp_path):
    assert_smoke_run("recipes/oft-gpt2.yaml", tmp_path)


def test_validate_applies_oft_to_the_weightless_skeleton():
    result = invoke("validate", "recipes/oft-gpt2.yaml")
    assert result.exit_code == 0, result.output
    # 2 layers × (c_attn: 64 inputs, 4 blocks; mlp.c_proj: 256 inputs, 16 blocks) × 120 entries
    assert "method oft: 4,800 trainable parameters in 4 tensors" in result.stderr


@pytest.mark.slow
def test_smollm2_recipe_starts(tmp_path):
    summary = assert_smoke_run("recipes/oft-smollm2.yaml", tmp_path, check_loss=False, peft_loads=True,
                               overrides=["train.max_steps=2", "data.validation=null"])
    assert summary.trainable_params == 30 * 2 * (576 // 32) * (32 * 31 // 2) == 535_680  # q, v: 18 blocks each


# --- 5. errors --------------------------------------------------------------------------------------

def test_bad_options_exit_2_naming_the_option():
    recipe = "recipes/oft-gpt2.yaml"
    # 24 divides c_attn's 64 inputs? No: the divisors nearest to it are named.
    assert_refused(invoke("validate", recipe, "--set", "method.oft_block_size=24"),
                   "method.oft_block_size", "does not divide the 64 input features", "nearest: 16, 32")
    assert_refused(invoke("validate", recipe, "--set", "method.r=4"), "method", "not both")
    assert_refused(invoke("validate", recipe, "--set", "method.oft_block_size=null", "--set", "method.r=3"),
                   "method.r", "does not divide")
    assert_refused(invoke("validate", recipe, "--set", "method.coft=true"), "method.coft")


@pytest.mark.parametrize("key, value", [("coft", True), ("bias", "oft_only"), ("layers_to_transform", [0]),
                                        ("modules_to_save", ["lm_head"]), ("target_modules", ".*q_proj")])
def test_peft_options_we_do_not_implement_are_refused(key, value):
    config = {"r": 0, "oft_block_size": 16, "target_modules": ["q_proj"], key: value}
    with pytest.raises(UserError, match=key):
        METHOD.config_from_peft(config, "adapter_config.json")


def test_an_old_peft_oft_adapter_is_refused_with_the_reason():
    with pytest.raises(UserError, match="before 0.14"):
        METHOD.config_from_peft({"r": 8, "target_modules": ["q_proj"]}, "adapter_config.json")
