"""BitFit: parity with the paper's recipe in plain PyTorch (unfreeze the biases, nothing else),
trainable counts, only biases change, export / load round trip, merge, created biases on
bias-less models, precision, the recipe's smoke run and option errors.

peft has no BitFit, so the oracle is the plain-PyTorch reference. Tolerances: fp32, logits
within atol 1e-5 (the wrapper adds the bias after the matmul instead of inside it, which only
reorders rounding). Adapters compared are trained a few steps so their biases left their init.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from peftctl.core.errors import UserError
from peftctl.export.adapter_files import load_adapter, save_adapter
import peftctl.methods
from peftctl.methods import Adapter
from peftctl.methods.bitfit import METHOD, BitFitConfig, TrainedBias
from peftctl.train.loss import CausalLMLoss
from method_checks import assert_smoke_run, with_random_biases
from tiny_models import batch_logits, real_difference, tiny_gpt2, tiny_llama, token_batch, train_steps

ATOL = 1e-5
NON_TRIVIAL = 1e-3
H = 64  # tiny GPT-2 and tiny Llama hidden size; both have 2 layers


def gpt2():
    """The builtin tiny GPT-2 with non-zero biases, so that their handling is tested too."""
    return with_random_biases(tiny_gpt2())


# name → (factory, options, analytic trainable count)
CASES = {
    # Per layer: c_attn 3h + attn.c_proj h + c_fc 4h + mlp.c_proj h + ln_1 h + ln_2 h; then ln_f h.
    "gpt2-every-bias": (gpt2, {}, 2 * (3 * H + H + 4 * H + H + H + H) + H),
    "gpt2-c_attn": (gpt2, {"target_modules": ["c_attn"]}, 2 * 3 * H),
    # Per layer: q h + k 32 + v 32 + o h + gate 96 + up 96 + down h (2 kv heads × 16).
    "llama-created": (tiny_llama, {"create_missing_biases": True}, 2 * (H + 32 + 32 + H + 96 + 96 + H)),
    "llama-created-q_v": (tiny_llama, {"target_modules": ["q_proj", "v_proj"], "create_missing_biases": True},
                          2 * (H + 32)),
}


def base_name(name: str) -> str:
    """A parameter's name in the unwrapped model."""
    return name.replace(".base_layer.", ".")


def trained_adapter(case: str, steps: int = 3):
    factory, options, _ = CASES[case]
    model = factory()
    batch = token_batch(model.config.vocab_size)
    adapter = peftctl.methods.apply(model, BitFitConfig(name="bitfit", **options))
    initial = {n: p.detach().clone() for n, p in adapter.params.items()}
    train_steps(adapter, batch, steps=steps)
    for name, before in initial.items():
        assert (adapter.params[name] - before).abs().max() > 1e-4, name
    return adapter, batch


# --- 1. counts and what trains -------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_trainable_count_is_the_sum_of_bias_sizes(case):
    factory, options, analytic = CASES[case]
    adapter = peftctl.methods.apply(factory(), BitFitConfig(name="bitfit", **options))
    assert adapter.trainable_count() == analytic
    assert sum(p.numel() for p in adapter.model.parameters() if p.requires_grad) == analytic
    assert all(name.endswith(".bias") for name in adapter.params)


def test_every_bias_means_every_bias_of_the_base():
    fresh = gpt2()
    biases = {n for n, _ in fresh.named_parameters() if n.endswith(".bias")}
    adapter = peftctl.methods.apply(gpt2(), BitFitConfig(name="bitfit"))
    assert set(adapter.params) == biases


@pytest.mark.parametrize("case", ["gpt2-every-bias", "llama-created"])
def test_training_changes_only_biases(case):
    factory = CASES[case][0]
    before = {n: p.detach().clone() for n, p in factory().named_parameters()}
    adapter, _ = trained_adapter(case)
    after = {base_name(n): p.detach() for n, p in adapter.model.named_parameters()}
    frozen = [n for n in before if n not in adapter.params]
    assert frozen and set(frozen) <= set(after)
    for name in frozen:
        assert torch.equal(after[name], before[name]), name


def test_matches_plain_pytorch_bitfit():
    """The paper's BitFit in plain PyTorch: the base model with only its biases trainable."""
    model = gpt2()
    batch = token_batch(model.config.vocab_size)
    adapter = peftctl.methods.apply(model, BitFitConfig(name="bitfit"))
    reference = gpt2()
    for p in reference.parameters():
        p.requires_grad_(False)
    biases = {n: p.requires_grad_(True) for n, p in reference.named_parameters() if n.endswith(".bias")}
    assert biases.keys() == adapter.params.keys()

    # Same gradients from the same weights (AdamW's first steps are ~lr·sign(grad), so compare
    # the gradients themselves), then the same model after a few steps.
    for params, model_ in ((adapter.params, adapter.model), (biases, reference)):
        loss_sum, n = CausalLMLoss(model_)(**batch)
        (loss_sum / n).backward()
    for name, p in biases.items():
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(adapter.params[name].grad, p.grad, atol=1e-6, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")
        adapter.params[name].grad, p.grad = None, None
    train_steps(adapter, batch, steps=3)
    train_steps(Adapter(METHOD, adapter.cfg, reference, biases), batch, steps=3)

    ours = batch_logits(adapter.model, batch)
    assert real_difference(ours, batch_logits(gpt2(), batch), batch["attention_mask"]) > NON_TRIVIAL
    torch.testing.assert_close(ours, batch_logits(reference, batch), atol=ATOL, rtol=0)


# --- 2. export, load, merge -----------------------------------------------------------------------

@pytest.mark.parametrize("case", ["gpt2-every-bias", "gpt2-c_attn", "llama-created"])
def test_export_loads_onto_a_fresh_base_with_identical_logits(case, tmp_path):
    factory = CASES[case][0]
    adapter, batch = trained_adapter(case)
    save_adapter(adapter, tmp_path, base_model="test")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "BITFIT"
    assert config["create_missing_biases"] == adapter.cfg.create_missing_biases

    fresh = factory()
    base = batch_logits(fresh, batch)
    loaded = load_adapter(fresh, tmp_path)
    ours = batch_logits(adapter.model, batch)
    assert real_difference(ours, base, batch["attention_mask"]) > NON_TRIVIAL
    assert torch.equal(batch_logits(loaded.model, batch), ours)


def test_all_linear_is_exported_as_the_layers_it_chose(tmp_path):
    adapter = peftctl.methods.apply(gpt2(), BitFitConfig(name="bitfit", target_modules="all-linear"))
    save_adapter(adapter, tmp_path, base_model="test")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    assert set(load_adapter(gpt2(), tmp_path).params) == set(adapter.params)


def test_load_refuses_an_adapter_for_other_layers(tmp_path):
    adapter, _ = trained_adapter("gpt2-every-bias")
    save_adapter(adapter, tmp_path, base_model="test")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["c_attn"]}))
    with pytest.raises(UserError, match="is in the adapter but not in this model"):
        load_adapter(gpt2(), tmp_path)


@pytest.mark.parametrize("case", ["gpt2-every-bias", "llama-created"])
def test_merge_matches_unmerged(case):
    adapter, batch = trained_adapter(case)
    unmerged = batch_logits(adapter.model, batch)
    names = list(adapter.params)

    merged = METHOD.merge(adapter)

    assert not any(isinstance(m, TrainedBias) for m in merged.modules())
    params = dict(merged.named_parameters())
    assert all(name in params for name in names)  # plain `bias` tensors, created where missing
    assert not any(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(batch_logits(merged, batch), unmerged, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", ["llama-created", "llama-created-q_v"])
def test_merged_created_biases_survive_save_and_reload(case, tmp_path):
    """Llama builds biases from config flags: merging sets them, so from_pretrained keeps the biases."""
    adapter, batch = trained_adapter(case)
    unmerged = batch_logits(adapter.model, batch)
    METHOD.merge(adapter).save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.attention_bias and reloaded.config.mlp_bias == (case == "llama-created")
    torch.testing.assert_close(batch_logits(reloaded, batch), unmerged, atol=ATOL, rtol=0)


# --- 3. bias-less models, precision ------------------------------------------------------------------

def test_created_biases_start_equal_to_the_base():
    model = tiny_llama()
    batch = token_batch(model.config.vocab_size)
    base = batch_logits(model, batch)
    adapter = peftctl.methods.apply(model, BitFitConfig(name="bitfit", create_missing_biases=True))
    assert all(p.dtype == torch.float32 and not p.any() for p in adapter.params.values())
    assert torch.equal(batch_logits(model, batch), base)


@pytest.mark.parametrize("factory", [gpt2, tiny_llama])
def test_bf16_base_trains_fp32_biases(factory):
    model = factory().to(torch.bfloat16)
    adapter = peftctl.methods.apply(model, BitFitConfig(name="bitfit", create_missing_biases=True))
    assert all(p.dtype == torch.float32 for p in adapter.params.values())
    batch = token_batch(model.config.vocab_size)
    assert batch_logits(model, batch).dtype == torch.bfloat16
    with torch.no_grad():
        for p in adapter.params.values():
            p.fill_(1.0)
    train_steps(adapter, batch, steps=1, lr=1e-3)
    # AdamW's first step moves each bias by ~1e-3: lost to rounding in bf16 (spacing 2^-7 at 1),
    # kept in fp32.
    for name, p in adapter.params.items():
        assert (p - 1).abs().max() > 5e-4, name
        assert torch.equal(p.to(torch.bfloat16).float(), torch.ones_like(p)), name


def test_bias_less_model_is_an_error_that_suggests_creating_biases():
    with pytest.raises(UserError) as caught:
        peftctl.methods.apply(tiny_llama(), BitFitConfig(name="bitfit"))
    assert "no bias" in str(caught.value) and "create_missing_biases: true" in str(caught.value)


def test_targeted_layers_without_bias_are_an_error():
    with pytest.raises(UserError) as caught:
        peftctl.methods.apply(tiny_llama(), BitFitConfig(name="bitfit", target_modules=["q_proj"]))
    message = str(caught.value)
    assert "2 of the 2 targeted layers have no bias" in message and "create_missing_biases: true" in message


def test_skeleton_on_meta_device_counts_without_weights():
    """The pipeline applies the method to a weightless skeleton first; created biases stay on meta."""
    with torch.device("meta"):
        model = type(tiny_llama())(tiny_llama().config)
    adapter = peftctl.methods.apply(model, BitFitConfig(name="bitfit", create_missing_biases=True))
    assert adapter.trainable_count() == CASES["llama-created"][2]
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("options", [{"target_modules": []}, {"target_modules": ["qkv_proj"]}])
def test_bad_targets_are_errors(options):
    with pytest.raises(UserError):
        peftctl.methods.apply(gpt2(), BitFitConfig(name="bitfit", **options))


def test_bad_adapter_config_is_a_user_error():
    with pytest.raises(UserError, match="create_missing_biases"):
        METHOD.config_from_peft({"target_modules": None, "create_missing_biases": "maybe"}, "adapter_config.json")


# --- 4. the recipe --------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_recipe_starts(tmp_path):
    summary = assert_smoke_run("recipes/bitfit-smollm2.yaml", tmp_path, check_loss=False,
                               overrides=["train.max_steps=2", "data.validation=null"])
    # 30 layers × (q 576 + k 192 + v 192 + o 576 + gate 1,536 + up 1,536 + down 576)
    assert summary.trainable_params == 155_520
