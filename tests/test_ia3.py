"""(IA)³ against `peft` (the oracle): export / import both ways, trainable counts, saved keys,
merge, the recipe's smoke run and option errors.

Tolerances: fp32 throughout, logits within atol 1e-5. Every adapter compared is non-trivial:
trained a few steps (or, for peft-made ones, randomised) so its vectors are no longer 1 and its
logits differ from the base model's by more than 1e-3.
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from peftctl.core.errors import UserError
from peftctl.export.adapter_files import load_adapter, save_adapter
import peftctl.methods
from peftctl.methods.ia3 import METHOD, IA3Config, IA3Linear
from method_checks import assert_peft_save_loads, assert_smoke_run, with_random_biases
from tiny_models import batch_logits, real_difference, tiny_gpt2, tiny_llama, token_batch, train_steps

ATOL = 1e-5
NON_TRIVIAL = 1e-3


def gpt2():
    """The builtin tiny GPT-2 with non-zero biases, so that their handling is tested too."""
    return with_random_biases(tiny_gpt2())


# name → (model factory, target_modules, feedforward_modules, analytic trainable count).
# Tiny GPT-2: hidden h = 64, 2 layers; c_attn outputs 3h, c_fc takes h, mlp.c_proj takes 4h.
# Tiny Llama: 2 layers; k/v output 2 kv heads × 16 = 32, down_proj takes intermediate 96.
H = 64
CASES = {
    "gpt2-c_attn+c_fc": (gpt2, ["c_attn", "c_fc"], ["c_fc"], 2 * (3 * H + H)),
    "gpt2-default": (gpt2, None, None, 2 * (3 * H + 4 * H)),  # c_attn, mlp.c_proj (input)
    "gpt2-all-linear": (gpt2, "all-linear", ["mlp.c_proj"], 2 * (3 * H + H + 4 * H + 4 * H)),
    "llama-k_v_down": (tiny_llama, ["k_proj", "v_proj", "down_proj"], ["down_proj"], 2 * (32 + 32 + 96)),
    # feedforward_modules: [] (issue 42): every layer scales its output; q, o, down output 64, k, v 32, gate, up 96.
    "llama-all-linear-no-ff": (tiny_llama, "all-linear", [], 2 * (64 + 32 + 32 + 64 + 96 + 96 + 64)),
}


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trained_adapter(case: str):
    factory, targets, feedforward, _ = CASES[case]
    model = factory()
    batch = token_batch(model.config.vocab_size)
    adapter = peftctl.methods.apply(model, IA3Config(name="ia3", target_modules=targets,
                                                     feedforward_modules=feedforward))
    assert all(torch.equal(p, torch.ones_like(p)) for p in adapter.params.values())
    train_steps(adapter, batch, steps=3)
    assert all((p - 1).abs().max() > 1e-3 for p in adapter.params.values())
    return adapter, batch


def peft_reference(case: str):
    """The same adapter made by peft (None options: peft's own per-architecture defaults)."""
    factory, targets, feedforward, _ = CASES[case]
    config = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM",
                            fan_in_fan_out=case.startswith("gpt2"))
    return peft.get_peft_model(factory(), config)


# --- 1. ours → peft -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_export_loads_in_peft_with_equal_logits(case, tmp_path):
    factory, _, _, analytic = CASES[case]
    adapter, batch = trained_adapter(case)
    ours = batch_logits(adapter.model, batch)
    save_adapter(adapter, tmp_path / "a", base_model="test")

    fresh = factory()
    base = batch_logits(fresh, batch)
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "a").eval()
    assert real_difference(ours, base, batch["attention_mask"]) > NON_TRIVIAL
    torch.testing.assert_close(batch_logits(loaded, batch), ours, atol=ATOL, rtol=0)

    # peft's own adapter for these options: same count (= the analytic one), same keys and shapes.
    reference = peft_reference(case)
    assert adapter.trainable_count() == trainable_count(reference) == trainable_count(adapter.model) == analytic
    reference.save_pretrained(tmp_path / "p")
    peft_shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "p" / "adapter_model.safetensors").items()}
    our_shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "a" / "adapter_model.safetensors").items()}
    assert our_shapes == peft_shapes
    assert all(k.endswith(".ia3_l") and k.startswith("base_model.model.") for k in our_shapes)


def test_exported_lists_name_exactly_the_adapted_layers(tmp_path):
    """GPT-2 names attention and MLP output layers both c_proj: the export must tell them apart."""
    adapter, _ = trained_adapter("gpt2-all-linear")
    save_adapter(adapter, tmp_path, base_model="test")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["feedforward_modules"] == ["mlp.c_proj"]
    assert set(config["feedforward_modules"]) <= set(config["target_modules"])  # peft's own check
    assert config["fan_in_fan_out"] is True


# --- 2. peft → ours -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["gpt2-default", "gpt2-c_attn+c_fc", "llama-k_v_down", "llama-all-linear-no-ff"])
def test_peft_adapter_loads_with_equal_logits(case, tmp_path):
    factory = CASES[case][0]
    reference = peft_reference(case).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator))
    assert_peft_save_loads(reference, factory(), tmp_path, atol=ATOL, non_trivial=NON_TRIVIAL)


def test_own_export_round_trip_is_exact(tmp_path):
    adapter, batch = trained_adapter("llama-k_v_down")
    save_adapter(adapter, tmp_path, base_model="test")
    loaded = load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(batch_logits(loaded.model, batch), batch_logits(adapter.model, batch))


# --- 3. init, merge, precision ------------------------------------------------------------------

def test_starts_equal_to_the_base():
    model = gpt2()
    batch = token_batch(model.config.vocab_size)
    base = batch_logits(model, batch)
    peftctl.methods.apply(model, IA3Config(name="ia3", target_modules="all-linear"))
    torch.testing.assert_close(batch_logits(model, batch), base, atol=0, rtol=0)


@pytest.mark.parametrize("case", ["gpt2-all-linear", "llama-k_v_down", "llama-all-linear-no-ff"])
def test_merge_matches_unmerged_and_peft(case, tmp_path):
    factory = CASES[case][0]
    adapter, batch = trained_adapter(case)
    unmerged = batch_logits(adapter.model, batch)
    save_adapter(adapter, tmp_path, base_model="test")
    layer_types = {type(m.base_layer) for m in adapter.model.modules() if isinstance(m, IA3Linear)}

    merged = METHOD.merge(adapter)

    assert not any(isinstance(m, IA3Linear) for m in merged.modules())
    assert {type(merged.get_submodule(n)) for n in adapter.applied.targets} == layer_types
    torch.testing.assert_close(batch_logits(merged, batch), unmerged, atol=ATOL, rtol=0)
    # peft's merge of the same adapter: the same weights, biases included (GPT-2's Conv1D has them).
    theirs = peft.PeftModel.from_pretrained(factory(), tmp_path).merge_and_unload().state_dict()
    ours = merged.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0, msg=lambda m: f"{key}: {m}")


def test_bf16_base_trains_fp32_vectors():
    model = tiny_llama().to(torch.bfloat16)
    adapter = peftctl.methods.apply(model, IA3Config(name="ia3"))  # Llama's default: k, v, down (input)
    assert adapter.applied.feedforward == [n for n in adapter.applied.targets if n.endswith("down_proj")]
    assert all(p.dtype == torch.float32 for p in adapter.params.values())
    batch = token_batch(model.config.vocab_size)
    assert batch_logits(model, batch).dtype == torch.bfloat16
    train_steps(adapter, batch, steps=2)
    assert all((p - 1).abs().max() > 1e-3 for p in adapter.params.values())


def test_llama2_7b_default_count_on_meta_device():
    config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         intermediate_size=11008, vocab_size=32000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adapter = peftctl.methods.apply(model, IA3Config(name="ia3"))
    # 32 layers × (k out 4096 + v out 4096 + down_proj in 11008)
    assert adapter.trainable_count() == 32 * (4096 + 4096 + 11008) == 614_400


# --- 4. the recipe --------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_recipe_starts(tmp_path):
    summary = assert_smoke_run("recipes/ia3-smollm2.yaml", tmp_path, check_loss=False,
                               overrides=["train.max_steps=2", "data.validation=null"])
    assert summary.trainable_params == 57_600  # 30 layers × (k 192 + v 192 + down_proj input 1,536)


# --- 5. errors --------------------------------------------------------------------------------------

def test_feedforward_outside_targets_is_an_error():
    # c_proj also names the attention output layer, which is not targeted.
    with pytest.raises(UserError) as caught:
        peftctl.methods.apply(gpt2(), IA3Config(name="ia3", target_modules=["c_attn", "mlp.c_proj"],
                                                     feedforward_modules=["c_proj"]))
    assert "attn.c_proj" in str(caught.value) and "feedforward_modules" in str(caught.value)


def test_feedforward_matching_nothing_is_an_error():
    with pytest.raises(UserError, match="fc2"):
        peftctl.methods.apply(tiny_llama(), IA3Config(name="ia3", target_modules=["down_proj"],
                                                      feedforward_modules=["fc2"]))


def test_unknown_architecture_needs_targets():
    model = tiny_llama()
    model.config.model_type = "my-arch"
    with pytest.raises(UserError, match="my-arch"):
        peftctl.methods.apply(model, IA3Config(name="ia3"))


def test_empty_targets_is_an_error():
    with pytest.raises(UserError, match="empty"):
        peftctl.methods.apply(tiny_llama(), IA3Config(name="ia3", target_modules=[]))


@pytest.mark.parametrize("key", ["target_modules", "feedforward_modules"])
def test_peft_regex_lists_are_refused(key):
    config = {"target_modules": ["down_proj"], "feedforward_modules": ["down_proj"], key: ".*proj"}
    with pytest.raises(UserError, match=key):
        METHOD.config_from_peft(config, "adapter_config.json")
