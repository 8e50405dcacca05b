"""LoHa and LoKr against `peft` (the oracle): export / import both ways, training-mode dropouts,
trainable counts, saved keys and config fields, merge (also on a 4-bit base), the recipes' smoke
runs and option errors.

Tolerances: fp32 throughout, logits within atol 1e-5 of peft's; merged logits within 1e-4 of
base + adapter. Every adapter compared is non-trivial: trained a few steps, or for peft-made ones
randomised (init_weights=False), so its logits differ from the base model's by more than 1e-3.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

import peftctl.methods
from method_checks import ROOT, assert_smoke_run, with_random_biases
from peftctl.core.errors import UserError
from peftctl.export.adapter_files import load_adapter, save_adapter
from peftctl.export.merge import merge_to_folder
from peftctl.methods import METHODS
from peftctl.methods.lycoris import LycorisLinear
from peftctl.recipe.load import load_recipe
from test_qlora import trained_gpt2_adapter
from tiny_models import batch_logits, real_difference, tiny_gpt2, tiny_llama, token_batch, train_steps

ATOL = 1e-5
NON_TRIVIAL = 1e-3
PEFT_CONFIGS = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}

# label → (method, options) on the tiny Llama (hidden 64 = 8·8; k/v out 32 = 4·8; MLP 96 = 8·12).
# Between them the LoKr cases make every factor form: W1 full or W1a·W1b, W2 full or W2a·W2b.
CASES = {
    "loha-q_v": ("loha", {"r": 4, "target_modules": ["q_proj", "v_proj"]}),
    "loha-all-linear": ("loha", {"r": 2, "alpha": 5}),
    "lokr-full": ("lokr", {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]}),
    "lokr-decompose-both": ("lokr", {"r": 1, "decompose_both": True, "target_modules": ["k_proj", "down_proj"]}),
    "lokr-factor-4": ("lokr", {"r": 2, "decompose_factor": 4, "target_modules": ["q_proj", "up_proj"]}),
    "lokr-lycoris-init": ("lokr", {"r": 2, "init_weights": "lycoris", "target_modules": "all-linear"}),
}


def config(method: str, **options):
    return METHODS[method].Config(name=method, **options)


def peft_config(method: str, options: dict, **overrides):
    """peft's config for the same options (its names: LoHa and LoKr call alpha `alpha` too)."""
    targets = options.get("target_modules", "all-linear")
    return PEFT_CONFIGS[method](**{**options, "target_modules": targets, **overrides})


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trained_adapter(case: str, model=None, steps: int = 3):
    method, options = CASES[case]
    model = model if model is not None else tiny_llama()
    torch.manual_seed(0)
    adapter = peftctl.methods.apply(model, config(method, **options))
    batch = token_batch(model.config.vocab_size)
    train_steps(adapter, batch, steps=steps)
    return adapter, batch


# --- 1. ours → peft -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_export_loads_in_peft_with_equal_logits_and_peft_keys(case, tmp_path):
    method, options = CASES[case]
    adapter, batch = trained_adapter(case)
    ours = batch_logits(adapter.model, batch)
    assert real_difference(ours, batch_logits(tiny_llama(), batch), batch["attention_mask"]) > NON_TRIVIAL
    save_adapter(adapter, tmp_path / "ours", base_model="test")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
    assert not [str(w.message) for w in caught if "keys" in str(w.message)]  # every key matched
    torch.testing.assert_close(batch_logits(theirs, batch), ours, atol=ATOL, rtol=0)

    # peft's own adapter for these options: the same count, keys and shapes.
    reference = peft.get_peft_model(tiny_llama(), peft_config(method, options))
    assert adapter.trainable_count() == trainable_count(reference) == trainable_count(adapter.model)
    reference.save_pretrained(tmp_path / "peft")
    shapes = {folder: {k: tuple(v.shape) for k, v in load_file(tmp_path / folder / "adapter_model.safetensors").items()}
              for folder in ("ours", "peft")}
    assert shapes["ours"] == shapes["peft"]

    # Only keys peft's config class knows, with the values peft wrote for the same options.
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(written) <= {field.name for field in dataclasses.fields(PEFT_CONFIGS[method])}
    for key in set(written) - {"base_model_name_or_path", "task_type", "target_modules"}:
        assert written[key] == peft_written[key], key
    # peft writes 'all-linear' out as full module names; peftctl as their suffixes.
    assert set(written["target_modules"]) == {name.rsplit(".", 1)[-1] for name in peft_written["target_modules"]}


# --- 2. peft → ours -------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_with_equal_logits(case, tmp_path):
    method, options = CASES[case]
    torch.manual_seed(1)
    # Random factors (a non-trivial adapter) and non-default dropouts, which only act in training.
    reference = peft.get_peft_model(tiny_llama(), peft_config(method, options, init_weights=False,
                                                              rank_dropout=0.2, module_dropout=0.1)).eval()
    batch = token_batch(128)
    theirs = batch_logits(reference, batch)
    reference.save_pretrained(tmp_path)
    assert real_difference(theirs, batch_logits(tiny_llama(), batch), batch["attention_mask"]) > NON_TRIVIAL

    adapter = load_adapter(tiny_llama(), tmp_path)
    assert adapter.cfg.rank_dropout == 0.2 and adapter.cfg.module_dropout == 0.1
    torch.testing.assert_close(batch_logits(adapter.model.eval(), batch), theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_training_step_with_dropouts_equals_peft_under_the_same_seed(method):
    """peft draws module dropout, then rank dropout, per layer and step: the same draws here give
    the same training-mode logits and the same gradients."""
    options = {"r": 2, "rank_dropout": 0.5, "module_dropout": 0.3, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    if method == "lokr":
        options["rank_dropout_scale"] = True
    torch.manual_seed(1)
    reference = peft.get_peft_model(tiny_llama(), peft_config(method, options, init_weights=False))
    ours = peftctl.methods.apply(tiny_llama(), config(method, **options))
    ours_params = dict(ours.model.named_parameters())
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if param.requires_grad:
                ours_params[name.removeprefix("base_model.model.").replace(".default", "")].copy_(param)
    batch = token_batch(128)
    for _ in range(3):  # a few steps: the skipped layers differ from step to step
        results = []
        for model in (reference.train(), ours.model.train()):
            torch.manual_seed(7)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits[batch["attention_mask"].bool()].square().mean().backward()
            results.append(logits.detach())
        torch.testing.assert_close(results[1], results[0], atol=ATOL, rtol=0)
    grads = {name.removeprefix("base_model.model.").replace(".default", ""): p.grad
             for name, p in reference.named_parameters() if p.requires_grad}
    for name, param in ours.params.items():
        torch.testing.assert_close(param.grad, grads[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_rank_dropout_keeps_rows_and_module_dropout_skips_the_update():
    model = tiny_llama()
    adapter = peftctl.methods.apply(model, config("loha", r=2, rank_dropout=0.5, init_weights=False,
                                                  target_modules=["q_proj"]))
    layer = next(m for m in model.modules() if isinstance(m, LycorisLinear))
    x = torch.randn(3, 64)
    full = layer.eval()(x) - layer.base_layer(x)
    dropped = layer.train()(x) - layer.base_layer(x)
    kept = dropped.abs().sum(0) > 0
    assert 0 < int(kept.sum()) < 64  # some output rows dropped, some kept, rescaled to mean 1
    torch.testing.assert_close(dropped[:, kept], full[:, kept] * 64 / int(kept.sum()), atol=1e-6, rtol=1e-5)
    layer.module_dropout, layer.rank_dropout = 0.999999, 0.0
    assert torch.equal(layer(x), layer.base_layer(x))
    assert adapter.trainable_count() == 2 * 4 * 2 * 64  # 2 layers × 4 factors of 2 × 64


# --- 3. init, merge, precision, shapes on the meta device -----------------------------------------

@pytest.mark.parametrize("method, init", [("loha", True), ("lokr", True), ("lokr", "lycoris")])
def test_starts_equal_to_the_base(method, init):
    model = with_random_biases(tiny_gpt2())
    batch = token_batch(model.config.vocab_size)
    base = batch_logits(model, batch)
    peftctl.methods.apply(model, config(method, r=2, init_weights=init))
    torch.testing.assert_close(batch_logits(model, batch), base, atol=0, rtol=0)


@pytest.mark.parametrize("case", ["loha-all-linear", "lokr-decompose-both", "lokr-lycoris-init"])
def test_merge_equals_the_adapter_and_peft_s_merge(case, tmp_path):
    adapter, batch = trained_adapter(case)
    unmerged = batch_logits(adapter.model, batch)
    save_adapter(adapter, tmp_path, base_model="test")
    merged = adapter.method.merge(adapter)
    assert not any(isinstance(m, LycorisLinear) for m in merged.modules())
    torch.testing.assert_close(batch_logits(merged, batch), unmerged, atol=1e-4, rtol=0)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).merge_and_unload().state_dict()
    ours = merged.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-6, rtol=0, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_gpt2_conv1d_trains_reloads_and_merges(method, tmp_path):
    """GPT-2 stores its weights [in, out]: the update is the same, merged into the transposed weight."""
    model = with_random_biases(tiny_gpt2())
    torch.manual_seed(0)
    adapter = peftctl.methods.apply(model, config(method, r=2, target_modules="all-linear"))
    assert adapter.applied.fan_in_fan_out
    batch = token_batch(model.config.vocab_size)
    train_steps(adapter, batch, steps=3)
    ours = batch_logits(adapter.model, batch)
    save_adapter(adapter, tmp_path, base_model="test")
    reloaded = load_adapter(with_random_biases(tiny_gpt2()), tmp_path)
    torch.testing.assert_close(batch_logits(reloaded.model, batch), ours, atol=ATOL, rtol=0)
    merged = reloaded.method.merge(reloaded)
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(batch_logits(merged, batch), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_4bit_base_trains_and_merges(method, tmp_path):
    """On a 4-bit GPT-2 (peft's LyCORIS layers cannot run there): the merge into the dequantized
    base equals the 4-bit base + adapter within 1e-4."""
    adapter_dir = trained_gpt2_adapter(tmp_path / "adapter", "4bit", method, r=2, alpha=4, target_modules="all-linear")
    figures = merge_to_folder(adapter_dir, tmp_path / "merged")
    assert figures["compared_with"].startswith("4bit")
    assert 0 <= figures["mean_abs_logit_diff"] <= figures["max_abs_logit_diff"] < 1e-4, figures
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain GPT-2 again
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_bf16_base_trains_fp32_factors(method):
    model = tiny_llama().to(torch.bfloat16)
    adapter = peftctl.methods.apply(model, config(method, r=2))
    assert all(p.dtype == torch.float32 for p in adapter.params.values())
    before = {name: p.detach().clone() for name, p in adapter.params.items()}
    batch = token_batch(model.config.vocab_size)
    assert batch_logits(model, batch).dtype == torch.bfloat16
    train_steps(adapter, batch, steps=2)
    assert all(not torch.equal(p, before[name]) for name, p in adapter.params.items())


@pytest.mark.parametrize("method, expected", [
    ("loha", 32 * 2 * 2 * 8 * (4096 + 4096)),  # q and v: two [4096, 8]·[8, 4096] products each
    ("lokr", 32 * 2 * (64 * 64 + 64 * 8 + 8 * 64)),  # 4096 = 64·64: W1 [64, 64], W2 = [64, 8]·[8, 64]
])
def test_llama2_7b_counts_on_the_meta_device(method, expected):
    llama = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                        intermediate_size=11008, vocab_size=32000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llama)
    adapter = peftctl.methods.apply(model, config(method, r=8, target_modules=["q_proj", "v_proj"]))
    assert adapter.trainable_count() == expected
    assert all(p.is_meta for p in adapter.params.values())


# --- 4. the recipes -------------------------------------------------------------------------------

@pytest.mark.parametrize("method, expected", [("loha", 2 * 2 * 4 * (192 + 64)), ("lokr", 2 * (12 * 8 + 16 * 4 + 4 * 8))])
def test_recipe_smoke_run_lowers_the_loss(method, expected, tmp_path):
    summary = assert_smoke_run(f"recipes/{method}-gpt2.yaml", tmp_path)
    assert summary.trainable_params == expected


@pytest.mark.slow
@pytest.mark.parametrize("method, expected", [("loha", 1_843_200), ("lokr", 94_080)])
def test_smollm2_recipe_starts_and_loads_in_peft(method, expected, tmp_path):
    summary = assert_smoke_run(f"recipes/{method}-smollm2.yaml", tmp_path, check_loss=False, peft_loads=True,
                               overrides=["train.max_steps=2", "data.validation=null"])
    assert summary.trainable_params == expected


# --- 5. errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, options, where, words", [
    ("loha", {"use_effective_conv2d": True}, "method.use_effective_conv2d", "linear layers only"),
    ("lokr", {"use_effective_conv2d": True}, "method.use_effective_conv2d", "linear layers only"),
    ("loha", {"r": 65}, "method.r", "r ≤ 32"),  # k_proj and v_proj are [32 × 64]
    ("lokr", {"target_modules": ["qkv"]}, "method.target_modules", "matches no linear layer"),
])
def test_bad_options_name_the_option(method, options, where, words):
    with pytest.raises(UserError) as caught:
        peftctl.methods.apply(tiny_llama(), config(method, **options))
    assert caught.value.where == where and words in str(caught.value)


@pytest.mark.parametrize("override, where", [
    ("method.decompose_factor=-2", "method.decompose_factor"), ("method.rank_dropout=1.5", "method.rank_dropout"),
    ("method.init_weights=gaussian", "method.init_weights"), ("method.r=0", "method.r"),
])
def test_bad_recipe_values_are_user_errors(override, where):
    with pytest.raises(UserError) as caught:
        load_recipe(ROOT / "recipes/lokr-gpt2.yaml", [override])
    assert where in str(caught.value)


@pytest.mark.parametrize("method", ["loha", "lokr"])
@pytest.mark.parametrize("key, value", [("rank_pattern", {"q_proj": 16}), ("alpha_pattern", {"q_proj": 2}),
                                        ("layers_to_transform", [0]), ("target_modules", ".*proj")])
def test_peft_options_we_do_not_implement_are_refused(method, key, value):
    foreign = {"peft_type": method.upper(), "r": 4, "target_modules": ["q_proj"], key: value}
    with pytest.raises(UserError) as caught:
        METHODS[method].config_from_peft(foreign, "adapter_config.json")
    assert caught.value.where == key and caught.value.fix


def test_effective_conv2d_from_peft_is_read_as_what_it_means_on_linear_layers():
    """peft computes the same update on linear layers whether or not use_effective_conv2d is set."""
    cfg = METHODS["loha"].config_from_peft({"r": 4, "target_modules": ["q_proj"], "use_effective_conv2d": True},
                                           "adapter_config.json")
    assert cfg.use_effective_conv2d is False


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_a_model_without_linear_layers_is_refused(method):
    model = torch.nn.Sequential(torch.nn.Embedding(4, 4))
    with pytest.raises(UserError, match="no linear layers"):
        peftctl.methods.apply(model, config(method))
