"""VeRA against `peft` (the oracle): export / import both ways, the shared projections (drawn from
the seed as peft draws them, saved or not), trainable counts, merge (also into a 4-bit base), the
weightless skeleton `validate` uses, the recipe's smoke run and option errors.

Tolerances: fp32 throughout, logits within atol 1e-5 of peft's (they come out bit-equal here);
merges within 1e-4. Every adapter compared is non-trivial: trained a few steps (or, for
peft-made ones, peft's `init_weights=False`: λ_b = 1, λ_d random) so its logits differ from the
base model's by more than 1e-3.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

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
from peftctl.methods.vera import METHOD, PROJECTIONS, VeraConfig, VeraLinear
from test_qlora import trained_gpt2_adapter
from tiny_models import batch_logits, real_difference, tiny_gpt2, tiny_llama, token_batch, train_steps

ATOL = 1e-5
NON_TRIVIAL = 1e-3


def gpt2():
    return with_random_biases(tiny_gpt2())


# name → (model factory, options, shared A shape, B shape, analytic trainable count).
# Tiny Llama: hidden 64, q_proj 64 → 64, down_proj 96 → 64. Tiny GPT-2: c_attn 64 → 192, mlp.c_proj 256 → 64.
CASES = {
    "llama-q+down": (tiny_llama, {"r": 8, "target_modules": ["q_proj", "down_proj"]}, (8, 96), (64, 8),
                     2 * ((8 + 64) + (8 + 64))),
    "gpt2-c_attn+mlp.c_proj": (gpt2, {"r": 16, "target_modules": ["c_attn", "mlp.c_proj"], "projection_prng_key": 7},
                               (16, 256), (192, 16), 2 * ((16 + 192) + (16 + 64))),
    "llama-no-saved-projection": (tiny_llama, {"r": 4, "target_modules": ["v_proj"], "save_projection": False},
                                  (4, 64), (32, 4), 2 * (4 + 32)),
}


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trained_adapter(case: str):
    factory, options, _, _, _ = CASES[case]
    model = factory()
    batch = token_batch(model.config.vocab_size)
    adapter = peftctl.methods.apply(model, VeraConfig(name="vera", **options))
    train_steps(adapter, batch, steps=3)
    return adapter, batch


def peft_config(case: str, **extra) -> peft.VeraConfig:
    _, options, _, _, _ = CASES[case]
    with seed_warning_ignored():
        return peft.VeraConfig(task_type="CAUSAL_LM", fan_in_fan_out=case.startswith("gpt2"), **options, **extra)


@contextmanager
def seed_warning_ignored():
    """peft warns that save_projection=False relies on the seed: expected here, not a failure."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(not|to not) (save|load) vera_A")
        yield


# --- 1. ours → peft -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_export_loads_in_peft_with_equal_logits_and_peft_layout(case, tmp_path):
    factory, options, a_shape, b_shape, analytic = CASES[case]
    adapter, batch = trained_adapter(case)
    ours = batch_logits(adapter.model, batch)
    save_adapter(adapter, tmp_path / "a", base_model="test")

    fresh = factory()
    base = batch_logits(fresh, batch)
    with warnings.catch_warnings(record=True) as caught:  # (peft's seed warning is recorded, not shown)
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "a").eval()
    assert not [str(w.message) for w in caught if "keys" in str(w.message)]  # every key matched
    assert real_difference(ours, base, batch["attention_mask"]) > NON_TRIVIAL
    torch.testing.assert_close(batch_logits(loaded, batch), ours, atol=ATOL, rtol=0)

    # peft's own adapter for these options: the same projections, count, keys and shapes.
    reference = peft.get_peft_model(factory(), peft_config(case))
    projections = getattr(adapter.model, PROJECTIONS)
    assert projections.vera_A.shape == a_shape and projections.vera_B.shape == b_shape
    assert torch.equal(projections.vera_A, reference.base_model.vera_A["default"])
    assert torch.equal(projections.vera_B, reference.base_model.vera_B["default"])
    assert adapter.trainable_count() == trainable_count(reference) == trainable_count(adapter.model) == analytic
    reference.save_pretrained(tmp_path / "p")
    peft_shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "p" / "adapter_model.safetensors").items()}
    our_shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "a" / "adapter_model.safetensors").items()}
    assert our_shapes == peft_shapes
    assert ("base_model.vera_A" in our_shapes) == options.get("save_projection", True)


# --- 2. peft → ours -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_with_equal_logits(case, tmp_path):
    factory = CASES[case][0]
    reference = peft.get_peft_model(factory(), peft_config(case, init_weights=False)).eval()
    assert_peft_save_loads(reference, factory(), tmp_path, atol=ATOL, non_trivial=NON_TRIVIAL)


def test_saved_projections_are_used_not_redrawn(tmp_path):
    """An adapter's saved A and B win over what its seed would draw (as in peft)."""
    adapter, batch = trained_adapter("llama-q+down")
    with torch.no_grad():
        getattr(adapter.model, PROJECTIONS).vera_A.mul_(-1)
    save_adapter(adapter, tmp_path, base_model="test")
    loaded = load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(batch_logits(loaded.model, batch), batch_logits(adapter.model, batch))


# --- 3. init, merge, precision ------------------------------------------------------------------

def test_starts_equal_to_the_base():
    model = gpt2()
    batch = token_batch(model.config.vocab_size)
    base = batch_logits(model, batch)
    peftctl.methods.apply(model, VeraConfig(name="vera", r=8))
    torch.testing.assert_close(batch_logits(model, batch), base, atol=0, rtol=0)


@pytest.mark.parametrize("case", ["gpt2-c_attn+mlp.c_proj", "llama-q+down"])
def test_merge_matches_unmerged_and_peft(case, tmp_path):
    factory = CASES[case][0]
    adapter, batch = trained_adapter(case)
    unmerged = batch_logits(adapter.model, batch)
    save_adapter(adapter, tmp_path, base_model="test")

    merged = METHOD.merge(adapter)

    assert not any(isinstance(m, VeraLinear) for m in merged.modules()) and not hasattr(merged, PROJECTIONS)
    torch.testing.assert_close(batch_logits(merged, batch), unmerged, atol=1e-4, rtol=0)
    theirs = peft.PeftModel.from_pretrained(factory(), tmp_path).merge_and_unload().state_dict()
    ours = merged.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0, msg=lambda m: f"{key}: {m}")


def test_merge_into_a_4bit_base_equals_the_4bit_base_with_the_adapter(tmp_path):
    adapter_dir = trained_gpt2_adapter(tmp_path / "adapter", "4bit", "vera", r=16, target_modules="all-linear")
    figures = merge_to_folder(adapter_dir, tmp_path / "merged")
    assert figures["compared_with"].startswith("4bit")
    assert 0 < figures["max_abs_logit_diff"] < 1e-4, figures


def test_bf16_base_trains_fp32_vectors():
    model = tiny_llama().to(torch.bfloat16)
    adapter = peftctl.methods.apply(model, VeraConfig(name="vera", r=8))
    assert all(p.dtype == torch.float32 for p in adapter.params.values())
    batch = token_batch(model.config.vocab_size)
    assert batch_logits(model, batch).dtype == torch.bfloat16
    train_steps(adapter, batch, steps=2)
    assert all(p.abs().max() > 0 for n, p in adapter.params.items() if n.endswith("lambda_b"))


def test_projections_are_one_copy_on_the_model_root_and_follow_the_model():
    model = tiny_llama()
    peftctl.methods.apply(model, VeraConfig(name="vera", r=8))
    projections = getattr(model, PROJECTIONS)
    wrappers = [m for m in model.modules() if isinstance(m, VeraLinear)]
    assert len(wrappers) == 14 and all(w._projections[0] is projections for w in wrappers)
    assert not any("vera_A" in key or "vera_B" in key for key in model.state_dict())  # export writes them
    model.to(torch.float64)
    assert all(w.sliced()[0].dtype == torch.float64 for w in wrappers)


# --- 4. the recipe and the skeleton -----------------------------------------------------------

def test_recipe_smoke_run_lowers_the_loss(tmp_path):
    assert_smoke_run("recipes/vera-gpt2.yaml", tmp_path, peft_loads=True)


def test_validate_applies_vera_to_the_weightless_skeleton():
    result = invoke("validate", "recipes/vera-gpt2.yaml")
    assert result.exit_code == 0, result.output
    assert "method vera: 640 trainable parameters in 8 tensors" in result.stderr  # 2 × (192 + 32 + 64 + 32)


@pytest.mark.slow
def test_smollm2_recipe_starts(tmp_path):
    summary = assert_smoke_run("recipes/vera-smollm2.yaml", tmp_path, check_loss=False,
                               overrides=["train.max_steps=2", "data.validation=null"])
    # 30 layers × (7 λ_d of 256 + λ_b of q 576, k 192, v 192, o 576, gate 1,536, up 1,536, down 576)
    assert summary.trainable_params == 30 * (7 * 256 + 576 + 192 + 192 + 576 + 1536 + 1536 + 576) == 209_280


# --- 5. errors --------------------------------------------------------------------------------------

def test_bad_options_exit_2_naming_the_option():
    assert_refused(invoke("validate", "recipes/vera-gpt2.yaml", "--set", "method.r=0"), "method.r")
    assert_refused(invoke("validate", "recipes/vera-gpt2.yaml", "--set", "method.vera_dropout=1.5"),
                   "method.vera_dropout")
    assert_refused(invoke("validate", "recipes/vera-gpt2.yaml", "--set", "method.target_modules=[q_proj]"),
                   "method.target_modules", "c_attn")


@pytest.mark.parametrize("key, value", [("bias", "vera_only"), ("layers_to_transform", [0]),
                                        ("modules_to_save", ["lm_head"]), ("target_modules", ".*q_proj")])
def test_peft_options_we_do_not_implement_are_refused(key, value):
    config = {"r": 8, "target_modules": ["q_proj"], key: value}
    with pytest.raises(UserError, match=key):
        METHOD.config_from_peft(config, "adapter_config.json")
