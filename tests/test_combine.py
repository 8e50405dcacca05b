"""`peftctl merge A B C --combine ...`: LoRA adapters combined into one, against peft's
`add_weighted_adapter` as the oracle, and what the command refuses.

The adapters are LoRA and rsLoRA on a tiny Llama saved as a local folder, with B drawn at random
(not zero), different alphas so each has its own scale. For every combination, with equal and
unequal (one negative) weights: the written tensors equal peft's combined adapter's within 1e-5,
and the written folder, loaded by peft and by peftctl, gives the logits of peft's own combination
within 1e-5. DARE's random masks match peft's because both draw them in the same order from the
same seed (peft from torch's global generator, which the oracle seeds right before the draws).
"""

from __future__ import annotations

import dataclasses
import json
import math

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peftctl import methods
from peftctl.export.adapter_files import CONFIG_FILE, WEIGHTS_FILE, load_adapter, save_adapter
from peftctl.methods.ia3 import IA3Config
from peftctl.methods.lora import LoraConfig
import peftctl.model.loading
from peftctl.model.loading import load_model
from peftctl.recipe.schema import ModelSpec
from cli_checks import assert_refused, invoke, snapshot
from hf_folders import BYTE_VOCAB, save_tiny_llama

ATOL = 1e-5
NON_TRIVIAL = 1e-3
PROBE = torch.randint(3, BYTE_VOCAB - 1, (2, 12), generator=torch.Generator().manual_seed(5))
TARGETS = ["q_proj", "v_proj", "down_proj"]
COMBINATIONS = ["cat", "linear", "ties", "dare_linear", "dare_ties"]
PRUNED = {"ties", "dare_linear", "dare_ties"}
WEIGHTS = {"equal": [1.0, 1.0, 1.0], "unequal": [0.5, 0.3, -0.2]}
# Every key of peft's own LoraConfig: a written config must use no other.
PEFT_KEYS = {field.name for field in dataclasses.fields(peft.LoraConfig)}
# label: LoRA options. Equal ranks for the entry-by-entry combinations; rslora is never first here
# (see test_rslora_first_...), and "wide" has another rank, for cat.
ADAPTERS = {"first": {"r": 4, "alpha": 8}, "second": {"r": 4, "alpha": 16}, "rs": {"r": 4, "alpha": 4, "use_rslora": True},
            "wide": {"r": 2, "alpha": 2}, "dora": {"r": 4, "alpha": 8, "use_dora": True}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("combine")
    llama = save_tiny_llama(root / "llama")
    spec = ModelSpec(name_or_path=str(llama), dtype="float32")
    found = {"root": root, "llama": llama, "spec": spec}
    for i, (label, options) in enumerate(ADAPTERS.items()):
        adapter = methods.apply(load_model(spec), LoraConfig(name="lora", target_modules=TARGETS, **options))
        generator = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for name, param in adapter.params.items():
                if "lora_B" in name:  # B starts at zero: a combination of such adapters would be trivial
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        found[label] = save_adapter(adapter, root / label, str(llama))
    ia3 = methods.apply(load_model(spec), IA3Config(name="ia3", target_modules=["q_proj"]))
    found["ia3"] = save_adapter(ia3, root / "ia3", str(llama))
    gpt2 = methods.apply(load_model(ModelSpec(name_or_path="builtin:tiny-gpt2", dtype="float32")),
                         LoraConfig(name="lora", r=4, target_modules=["c_attn"]))
    found["gpt2"] = save_adapter(gpt2, root / "gpt2", "builtin:tiny-gpt2")
    return found


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(PROBE).logits


def peft_combination(folders, labels, weights, how, density=None, seed=0, monkeypatch=None):
    """peft's add_weighted_adapter on the adapters `labels`: its combined tensors (as it saves
    them) and its model with the combination active."""
    base = AutoModelForCausalLM.from_pretrained(folders["llama"])
    model = peft.PeftModel.from_pretrained(base, folders[labels[0]], adapter_name=labels[0])
    for label in labels[1:]:
        model.load_adapter(folders[label], adapter_name=label)
    lora = model.base_model
    inject = lora.inject_adapter

    def inject_then_seed(*args, **kwargs):
        # peft initialises the new adapter's A at random (inject_adapter) before drawing DARE's masks.
        result = inject(*args, **kwargs)
        torch.manual_seed(seed)
        return result

    monkeypatch.setattr(lora, "inject_adapter", inject_then_seed)
    model.add_weighted_adapter(labels, weights, "combined", combination_type=how, density=density)
    model.set_adapter("combined")
    return get_peft_model_state_dict(model, adapter_name="combined"), model


def combine(folders, labels, out, *options):
    result = invoke("merge", *(folders[label] for label in labels), "--out", out, *options, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def max_difference(ours: dict, theirs: dict) -> float:
    assert set(ours) == set(theirs)
    return max(float((ours[key] - theirs[key]).abs().max()) for key in ours)


@pytest.mark.parametrize("weighting", WEIGHTS)
@pytest.mark.parametrize("how", COMBINATIONS)
def test_combination_equals_peft_add_weighted_adapter(folders, how, weighting, tmp_path, monkeypatch):
    labels, weights = ["first", "second", "rs"], WEIGHTS[weighting]
    density = 0.5 if how in PRUNED else None
    figures = combine(folders, labels, tmp_path / "out", "--combine", how, "--weights", *weights,
                      *(["--density", density] if density else []), *(["--seed", 3] if how.startswith("dare") else []))
    theirs, peft_model = peft_combination(folders, labels, weights, how, density, seed=3, monkeypatch=monkeypatch)
    ours = load_file(tmp_path / "out" / WEIGHTS_FILE)
    assert max_difference(ours, theirs) <= ATOL
    rank = 12 if how == "cat" else 4
    config = json.loads((tmp_path / "out" / CONFIG_FILE).read_text())
    assert set(config) <= PEFT_KEYS, set(config) - PEFT_KEYS
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (rank, rank, False)
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    assert figures["r"] == rank and figures["density"] == density and figures["weights"] == weights

    # The folder, loaded by peft and by peftctl, gives peft's own combination's logits.
    expected = logits(peft_model)
    base = logits(AutoModelForCausalLM.from_pretrained(folders["llama"]))
    assert (expected - base).abs().max() > NON_TRIVIAL
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folders["llama"]), tmp_path / "out")
    torch.testing.assert_close(logits(reloaded), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(load_adapter(load_model(folders["spec"]), tmp_path / "out").model), expected,
                               atol=ATOL, rtol=0)


def test_cat_of_different_ranks_is_the_exact_weighted_sum(folders, tmp_path, monkeypatch):
    """cat stacks the ranks (4 + 2 + 4): B·A is Σ wᵢ·sᵢ·Bᵢ·Aᵢ up to rounding, which the table's
    relative error says; linear, an approximation, is far from it."""
    labels, weights = ["first", "wide", "rs"], [0.7, 1.5, 0.4]
    figures = combine(folders, labels, tmp_path / "cat", "--weights", *weights)  # cat is the default
    theirs, _ = peft_combination(folders, labels, weights, "cat", monkeypatch=monkeypatch)
    assert max_difference(load_file(tmp_path / "cat" / WEIGHTS_FILE), theirs) <= ATOL
    assert figures["combine"] == "cat" and figures["r"] == 10 and figures["update_relative_error"] < 1e-6
    merged = combine(folders, ["first", "second"], tmp_path / "linear", "--combine", "linear")
    assert merged["update_relative_error"] > 0.1


def test_rslora_first_gives_the_intended_scale_where_peft_021_gives_sqrt_r_more(folders, tmp_path, monkeypatch):
    """peft 0.21's add_weighted_adapter keeps the first adapter's use_rslora with lora_alpha = r,
    so its combination is scaled by √r more than the weighted sum (peft PR #3449 fixes it). The
    tensors are the same; peftctl writes use_rslora: false, the intended scale 1."""
    labels, weights = ["rs", "first"], [1.0, 1.0]
    combine(folders, labels, tmp_path / "out", "--weights", *weights)
    theirs, peft_model = peft_combination(folders, labels, weights, "cat", monkeypatch=monkeypatch)
    assert max_difference(load_file(tmp_path / "out" / WEIGHTS_FILE), theirs) <= ATOL
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and "combined" in module.scaling:
            assert module.scaling["combined"] in (1.0, pytest.approx(math.sqrt(8)))
            module.scaling["combined"] = 1.0  # what the fixed peft computes
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folders["llama"]), tmp_path / "out")
    torch.testing.assert_close(logits(reloaded), logits(peft_model), atol=ATOL, rtol=0)


def test_dare_is_the_same_for_a_seed_and_another_for_another_seed(folders, tmp_path):
    for name, seed in (("one", 1), ("again", 1), ("other", 2)):
        figures = combine(folders, ["first", "second"], tmp_path / name, "--combine", "dare_ties", "--seed", seed)
        assert figures["seed"] == seed and figures["density"] == 0.5  # the default density
    one, again, other = (load_file(tmp_path / name / WEIGHTS_FILE) for name in ("one", "again", "other"))
    assert max_difference(one, again) == 0 and max_difference(one, other) > 0.01
    result = invoke("merge", folders["first"], folders["second"], "--out", tmp_path / "table", "--combine", "dare_linear")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.replace("│", " ").split())  # the table may wrap the row
    assert "dare_linear, density 0.5, seed 0 (random masks: the same seed gives the same adapter)" in text, text


def test_the_table_and_that_no_base_weights_load(folders, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("combining loaded the base model's weights")

    monkeypatch.setattr(peftctl.model.loading, "load_model", no_loading)
    result = invoke("merge", folders["first"], folders["second"], "--out", tmp_path / "out", "--weights", "0.5", "0.5")
    assert result.exit_code == 0, result.output
    for text in ("2 adapters combined", "cat", "0.5, 0.5", "r = 8, lora_alpha = 8", "relative error",
                 f"combined adapter: {tmp_path / 'out'}", "PeftModel.from_pretrained"):
        assert text in result.stdout, result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # written atomically: no staging left
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def test_bad_inputs_are_refused_before_anything_is_written(folders, tmp_path):
    a, b, rs = folders["first"], folders["second"], folders["rs"]
    out = tmp_path / "out"
    before = {label: snapshot(folders[label]) for label in ("first", "second")}
    cases = [
        ((a, folders["gpt2"]), (), ["gpt2", "another base model", "builtin:tiny-gpt2"]),
        ((a, b, rs), ("--weights", 0.5, 0.5), ["--weights", "2 weight(s) for 3 adapters", "one weight per adapter"]),
        ((a, b), ("--combine", "tie"), ["--combine", "unknown combination 'tie'", "did you mean 'ties'?"]),
        ((a, b), ("--combine", "svd"), ["not implemented in peftctl"]),
        ((a,), ("--combine", "linear"), ["two or more adapters", "drop --combine"]),
        ((a, b), ("--combine", "ties", "--density", 0), ["--density", "outside (0, 1]"]),
        ((a, b), ("--combine", "dare_ties", "--density", 1.5), ["--density", "outside (0, 1]"]),
        ((a, b), ("--density", 0.5), ["--density does nothing with --combine cat"]),
        ((a, b), ("--seed", 1), ["--seed does nothing with --combine cat"]),
        ((a, folders["wide"]), ("--combine", "linear"), ["wide", "r = 2", "needs one rank", "--combine cat"]),
        ((a, folders["dora"]), (), ["dora", "use_dora", "DoRA adapter cannot be combined"]),
        ((a, folders["ia3"]), (), ["ia3", "IA3 adapter cannot be combined", "LoRA adapters only"]),
        ((a, tmp_path / "missing"), (), ["missing", "no such adapter folder"]),
        ((a, b), ("--dtype", "bfloat16"), ["--dtype", "float32"]),
    ]
    for adapters, options, phrases in cases:
        assert_refused(invoke("merge", *adapters, "--out", out, *options), *phrases)
        assert not out.exists(), (adapters, options)
    # --out is one of the inputs, or an existing folder without --overwrite.
    assert_refused(invoke("merge", a, b, "--out", b), "--out", "would replace input adapter 2")
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert_refused(invoke("merge", a, b, "--out", out), "--out", "already exists", "--overwrite")
    assert_refused(invoke("merge", a, b, "--out", out, "--overwrite", "--json"), "--overwrite only replaces")
    assert (out / "notes.txt").read_text() == "keep me"
    # One adapter merges into its base, where the combining options mean nothing.
    assert_refused(invoke("merge", a, "--out", tmp_path / "merged", "--weights", 1), "--weights", "combining")
    assert {label: snapshot(folders[label]) for label in ("first", "second")} == before


def test_overwrite_replaces_a_combined_adapter(folders, tmp_path):
    out = tmp_path / "out"
    combine(folders, ["first", "second"], out)
    figures = combine(folders, ["first", "second"], out, "--combine", "ties", "--overwrite")
    assert figures["combine"] == "ties" and json.loads((out / CONFIG_FILE).read_text())["r"] == 4
