"""LoRA's initialisations (`init`: gaussian, PiSSA, OLoRA) against `peft` (the oracle).

PiSSA and OLoRA move the principal part of each weight into A₀, B₀ and leave W_res = W - s·B₀A₀
frozen; the export is peft's converted form, a plain LoRA of rank 2r for the unmodified base.
Tolerances: fp32 throughout; the same init as peft's bit for bit (same decomposition calls);
logits within atol 1e-5 (the model right after init and the base differ only by fp32 rounding
of W_res + s·B₀A₀); merged logits within 1e-4. Adapters compared are trained or perturbed, so
their logits differ from the base model's by more than 1e-3.
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import peftctl.methods
from method_checks import assert_smoke_run
from peftctl.core.errors import UserError
from peftctl.export.adapter_files import load_adapter, save_adapter
from peftctl.methods.base import BaseFacts
from peftctl.methods.lora import METHOD, LoraConfig
from tiny_models import (batch_logits, real_difference, tiny_gpt2, tiny_llama, tiny_llama_config, token_batch,
                         train_steps)

ATOL = 1e-5
NON_TRIVIAL = 1e-3
R, ALPHA = 4, 8
MODELS = {"llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]), "gpt2": (tiny_gpt2, ["c_attn", "c_fc"])}
BASE_CHANGING = ["pissa", "olora"]


def ours(model_key: str, init: str, **options):
    factory, targets = MODELS[model_key]
    torch.manual_seed(0)
    return peftctl.methods.apply(factory(), LoraConfig(name="lora", r=R, alpha=ALPHA, target_modules=targets,
                                                       init=init, **options))


def peft_model(model_key: str, init, **options):
    factory, targets = MODELS[model_key]
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=init,
                             fan_in_fan_out=model_key == "gpt2", task_type="CAUSAL_LM", **options)
    return peft.get_peft_model(factory(), config)


def peft_loads(folder, model_key: str) -> torch.nn.Module:
    """peft's PeftModel on the unmodified base, asserting that every saved key was matched."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(MODELS[model_key][0](), folder).eval()
    assert not [str(w.message) for w in caught if "keys" in str(w.message)]
    return model


def in_peft_names(name: str) -> str:
    return "base_model.model." + name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")


@pytest.mark.parametrize("init", ["gaussian", *BASE_CHANGING])
@pytest.mark.parametrize("model_key", ["llama", "gpt2"])
def test_init_computes_what_the_base_did_with_peft_weights(model_key, init):
    """Right after init the model equals the base; A, B and W_res are peft's (gaussian: drawn, so
    only B = 0 and A's spread). peft's OLoRA cannot run on GPT-2's Conv1D (it decomposes the
    stored [in, out] weight): there ours is checked against the maths alone."""
    adapter = ours(model_key, init)
    batch = token_batch(adapter.model.config.vocab_size)
    torch.testing.assert_close(batch_logits(adapter.model, batch), batch_logits(MODELS[model_key][0](), batch),
                               atol=ATOL, rtol=0)
    mine = dict(adapter.model.named_parameters())
    if init == "gaussian":
        a = [p for n, p in mine.items() if n.endswith("lora_A.weight")]
        assert all(abs(float(p.detach().std()) - 1 / R) < 0.2 / R for p in a)
        assert all(not p.any() for n, p in mine.items() if n.endswith("lora_B.weight"))
        return
    if model_key == "gpt2" and init == "olora":
        layer = adapter.model.get_submodule("transformer.h.0.attn.c_attn")
        assert torch.allclose(layer.lora_B.weight.T @ layer.lora_B.weight, torch.eye(R), atol=1e-5)  # Q_r
        return
    theirs = dict(peft_model(model_key, init).named_parameters())
    compared = [n for n in mine if "lora_" in n or "base_layer.weight" in n]
    for name in compared:
        torch.testing.assert_close(mine[name], theirs[in_peft_names(name)], atol=0, rtol=0)
    assert len(compared) == 3 * 2 * len(MODELS[model_key][1])


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("init", BASE_CHANGING)
@pytest.mark.parametrize("model_key", ["llama", "gpt2"])
def test_export_is_peft_converted_lora_for_the_unmodified_base(model_key, init, rslora, tmp_path):
    """Trained, exported: peft and peftctl load it on the original base with the trained model's
    logits; the config and keys are those of peft's own converted save (rank 2r, alpha kept in
    proportion, init_lora_weights true); merging gives the same logits."""
    adapter = ours(model_key, init, use_rslora=rslora)
    batch = token_batch(adapter.model.config.vocab_size)
    base = batch_logits(MODELS[model_key][0](), batch)
    train_steps(adapter, batch, steps=3, lr=1e-3)
    trained = batch_logits(adapter.model, batch)
    assert real_difference(trained, base, batch["attention_mask"]) > NON_TRIVIAL
    save_adapter(adapter, tmp_path / "ours", base_model="test")

    theirs = peft_loads(tmp_path / "ours", model_key)
    torch.testing.assert_close(batch_logits(theirs, batch), trained, atol=ATOL, rtol=0)
    reloaded = load_adapter(MODELS[model_key][0](), tmp_path / "ours")
    torch.testing.assert_close(batch_logits(reloaded.model, batch), trained, atol=ATOL, rtol=0)
    merged = METHOD.merge(adapter).eval()  # W_res + s·BA, in place
    torch.testing.assert_close(batch_logits(merged, batch), trained, atol=1e-4, rtol=0)

    if not (model_key == "gpt2" and init == "olora"):  # peft cannot make that one (see above)
        reference = peft_model(model_key, init, use_rslora=rslora)
        reference.save_pretrained(tmp_path / "initial")
        reference.save_pretrained(tmp_path / "converted",
                                  path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
        config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        expected = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
        for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora", "target_modules"):
            canonical = sorted if key == "target_modules" else (lambda value: value)
            assert canonical(config[key]) == canonical(expected[key]), key
        assert config["r"] == 2 * R
        saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
        assert {k: v.shape for k, v in saved.items()} == \
            {k: v.shape for k, v in load_file(tmp_path / "converted" / "adapter_model.safetensors").items()}


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """peft's adapter moved off its init (as training would), so that loading it is not vacuous."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.mark.parametrize("init", BASE_CHANGING)
def test_peft_saves_load_here_with_peft_logits(init, tmp_path):
    """peft's converted save (a rank-2r LoRA) and its unconverted one (rank r, for W_res, whose
    init is redone here from the base as peft redoes it) both give peft's logits on the base."""
    reference = peft_model("llama", init)
    reference.save_pretrained(tmp_path / "initial")
    perturbed(reference)
    batch = token_batch(128)
    expected = batch_logits(reference, batch)
    assert real_difference(expected, batch_logits(tiny_llama(), batch), batch["attention_mask"]) > NON_TRIVIAL
    reference.save_pretrained(tmp_path / "plain")
    reference.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    for folder, rank, loaded_init in (("converted", 2 * R, "default"), ("plain", R, init)):
        adapter = load_adapter(tiny_llama(), tmp_path / folder)
        assert (adapter.cfg.r, adapter.cfg.init) == (rank, loaded_init)
        torch.testing.assert_close(batch_logits(adapter.model, batch), expected, atol=ATOL, rtol=0)


def test_skeleton_gets_shapes_without_decomposing():
    """On the meta device (validate, and train before the weights load) nothing is decomposed,
    yet the export has its rank-2r shapes."""
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(tiny_llama_config())
    adapter = peftctl.methods.apply(skeleton, LoraConfig(name="lora", r=R, target_modules=["q_proj"], init="pissa"))
    state = adapter.state_dict()
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (2 * R, 64)
    assert state["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (64, 2 * R)
    assert adapter.trainable_count() == 2 * R * (64 + 64)


def refusal(model: torch.nn.Module, base: BaseFacts = BaseFacts(), **options) -> UserError:
    with pytest.raises(UserError) as caught:
        peftctl.methods.apply(model, LoraConfig(name="lora", r=R, **options), base)
    return caught.value


def test_base_changing_inits_refuse_what_cannot_be_exact():
    """A quantized base (peft refuses PiSSA there), DoRA (peft's conversion drops its
    magnitudes) and expert weights (peft has no PiSSA for them): refused, keyed method.init."""
    # A skeleton's layers are not quantized yet: the facts given to the method say the base will be.
    err = refusal(tiny_llama(), BaseFacts(quantized=True), init="pissa", target_modules=["q_proj"])
    assert err.where == "method.init" and "quantized" in err.problem and "model.quantization: none" in err.fix
    err = refusal(tiny_llama(), init="olora", use_dora=True, target_modules=["q_proj"])
    assert err.where == "method.init" and "DoRA" in err.problem
    from transformers import MixtralConfig, MixtralForCausalLM
    with torch.device("meta"):
        mixtral = MixtralForCausalLM(MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                                   num_hidden_layers=1, num_attention_heads=4,
                                                   num_key_value_heads=2, num_local_experts=2))
    err = refusal(mixtral, init="pissa", target_modules=[], target_parameters=["experts.down_proj"])
    assert err.where == "method.init" and "target_parameters" in err.problem


def test_gaussian_init_reaches_expert_weights():
    """target_parameters' A stacks r rows per expert; peft's std is still 1/r there."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    mixtral = MixtralForCausalLM(MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4))
    adapter = peftctl.methods.apply(mixtral, LoraConfig(name="lora", r=R, init="gaussian", target_modules=[],
                                                        target_parameters=["experts.down_proj"]))
    a = next(p for n, p in adapter.params.items() if n.endswith("lora_A.weight"))
    assert a.shape[0] == 4 * R and abs(float(a.detach().std()) - 1 / R) < 0.1 / R
    assert all(not p.any() for n, p in adapter.params.items() if n.endswith("lora_B.weight"))


@pytest.mark.parametrize(("value", "fan_in_fan_out", "phrase"), [
    ("corda", False, "cannot redo"), ("pissa_niter_4", False, "cannot redo"), ("loftq", False, "cannot redo"),
    ("olora", True, "Conv1D")])
def test_foreign_inits_that_changed_the_base_are_refused_on_import(value, fan_in_fan_out, phrase):
    config = {"r": R, "target_modules": ["q_proj"], "init_lora_weights": value, "fan_in_fan_out": fan_in_fan_out}
    with pytest.raises(UserError, match=phrase) as caught:
        METHOD.config_from_peft(config, "adapter_config.json")
    assert caught.value.where == "init_lora_weights" and "path_initial_model_for_weight_conversion" in caught.value.fix
    for harmless in (True, False, "eva", "orthogonal"):
        assert METHOD.config_from_peft({**config, "init_lora_weights": harmless}, "x").init == "default"


def test_bad_init_names_the_option(tmp_path):
    from cli_checks import assert_refused, invoke
    from method_checks import ROOT

    recipe = tmp_path / "r.yaml"
    recipe.write_text((ROOT / "recipes/pissa-gpt2.yaml").read_text().replace("init: pissa", "init: svd")
                      .replace("data/tiny", str(ROOT / "recipes/data/tiny")))
    assert_refused(invoke("validate", recipe), "method.init", "pissa")


def test_pissa_recipe_smoke_run(tmp_path):
    summary = assert_smoke_run("recipes/pissa-gpt2.yaml", tmp_path, peft_loads=True)
    config = json.loads((summary.adapter_dir / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (16, 16, True)


@pytest.mark.slow
def test_pissa_smollm2_recipe_trains(tmp_path):
    assert_smoke_run("recipes/pissa-smollm2.yaml", tmp_path, ["train.max_steps=10"], peft_loads=True)


def test_pissa_with_loraplus_resumes_exactly(tmp_path):
    """A resumed run redoes the decomposition on the fresh base (W_res, A₀, B₀ are not in the
    checkpoint) and rebuilds LoRA+'s two groups: it ends where the uninterrupted run ends."""
    from peftctl.data.tokenize import load_data
    from peftctl.model.loading import load_tokenizer
    from peftctl.recipe.schema import DataSpec, TrainSpec
    from peftctl.train.loop import TrainingInterrupted, train
    from test_checkpoint import ROOT, SPEC, TINY_GPT2, StopAt

    tokenizer = load_tokenizer(TINY_GPT2)
    data = load_data(DataSpec(train=ROOT / "recipes/data/tiny/train.jsonl"), tokenizer, seed=0)
    spec = TrainSpec(**{**SPEC, "lr": 1e-3, "eval_every": None}, save_every=3)

    def fresh():
        torch.manual_seed(0)
        return peftctl.methods.apply(tiny_gpt2(), LoraConfig(name="lora", r=R, target_modules=["c_attn"],
                                                             init="pissa", loraplus_lr_ratio=16))

    for run in ("whole", "cut"):
        (tmp_path / run).mkdir()
    whole = fresh()
    train(whole, data, spec, tmp_path / "whole", tokenizer.pad_token_id)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(fresh(), data, spec, tmp_path / "cut", tokenizer.pad_token_id, StopAt(4))
    resumed = fresh()
    train(resumed, data, spec, tmp_path / "cut", tokenizer.pad_token_id, resume=stopped.value.checkpoint)
    expected = whole.state_dict()
    for key, tensor in resumed.state_dict().items():
        torch.testing.assert_close(tensor, expected[key], atol=1e-6, rtol=0)
