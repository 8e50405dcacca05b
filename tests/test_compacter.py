"""Compacter and Compacter++ against a plain-PyTorch reference of the paper's equations.

peft has no Compacter and AdapterHub's `adapters` pins transformers 4.x, so the oracle is the
paper (Karimi Mahabadi et al., 2021): the reference hooks the base model's own output
projections and adds W_up·f(W_down·y + b_down) + b_up to their output y, each W built with
torch.kron as Σᵢ Aᵢ ⊗ sᵢtᵢᵀ from copies of the trained weights, one A for the whole model.
The sites are spelt out per architecture, so nothing here relies on peftctl's layer discovery.
Tolerances: fp32, logits within atol 1e-5, gradients within atol 1e-6 / rtol 1e-4.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_checks import assert_refused, invoke
from method_checks import assert_smoke_run
from safetensors.torch import load_file
from test_bottleneck import ACTIVATIONS, MODELS, assert_follows_the_equations, config
from test_bottleneck import sites as bottleneck_sites
from tiny_models import TINY_GPT2, batch_logits, tiny_gpt2, tiny_llama, token_batch, train_steps

from peftctl import methods
from peftctl.core.errors import UserError
from peftctl.export.adapter_files import CONFIG_FILE, load_adapter, save_adapter
from peftctl.model.loading import load_skeleton
from peftctl.recipe.load import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
HIDDEN = 64  # both tiny models
LAYERS = 2
PARTS = ("down.s", "down.t", "down.bias", "up.s", "up.t", "up.bias")

# Compacter sits where Houlsby does (attention and feed-forward outputs), Compacter++ where Pfeiffer does.
# Compacter sits where Houlsby does, Compacter++ where Pfeiffer does: the bottleneck tests' sites.
PLACED_AS = {"compacter": "houlsby", "compacter_plus_plus": "pfeiffer"}
CASES = [(arch, method) for arch in MODELS for method in PLACED_AS]


def sites(arch: str, method: str) -> list[str]:
    return bottleneck_sites(arch, PLACED_AS.get(method, method))


def adapted(arch: str, method: str, **options):
    make, vocab = MODELS[arch]
    model = make()
    # A fixed init: with ReLU, an unlucky draw can leave a site's few units dead on every token.
    torch.manual_seed(0)
    adapter = methods.apply(model, config(method, **options))
    return make, adapter, token_batch(vocab)


def phm_weight(rule: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The paper's W = Σᵢ Aᵢ ⊗ Bᵢ with Bᵢ = sᵢ tᵢᵀ, as explicit Kronecker products."""
    return sum(torch.kron(rule[i], s[i] @ t[i].T) for i in range(rule.shape[0]))


@pytest.mark.parametrize("arch,method", CASES)
def test_starts_exactly_at_the_base_model(arch, method):
    make, adapter, batch = adapted(arch, method)
    assert torch.equal(batch_logits(adapter.model, batch), batch_logits(make(), batch))


@pytest.mark.parametrize("arch,method,non_linearity,phm_dim,phm_rank,size", [
    ("gpt2", "compacter", "relu", 4, 1, 8), ("gpt2", "compacter_plus_plus", "tanh", 4, 3, 12),
    ("llama", "compacter", "silu", 8, 1, 16), ("llama", "compacter_plus_plus", "gelu", 2, 2, 6),
])
def test_trained_adapter_matches_the_papers_equations(arch, method, non_linearity, phm_dim, phm_rank, size):
    make, adapter, batch = adapted(arch, method, bottleneck_size=size, non_linearity=non_linearity,
                                   phm_dim=phm_dim, phm_rank=phm_rank)
    train_steps(adapter, batch)
    reference = make()
    act = ACTIVATIONS[non_linearity]
    copies = {name: p.detach().clone().requires_grad_(True) for name, p in adapter.params.items()}
    rule = copies[f"{sites(arch, method)[0]}.phm_rule"]  # one A for every projection of the model

    def hook(site: str):
        s_down, t_down, b_down, s_up, t_up, b_up = (copies[f"{site}.adapter_{part}"] for part in PARTS)
        assert s_up.abs().max() > 1e-3, "training should have moved the up projection off zero"

        def add_adapter(module, args, y):
            w_down, w_up = phm_weight(rule, s_down, t_down), phm_weight(rule, s_up, t_up)
            assert w_down.shape == (size, HIDDEN) and w_up.shape == (HIDDEN, size)
            return y + F.linear(act(F.linear(y, w_down, b_down)), w_up, b_up)
        return add_adapter

    # Logits and gradients (the shared A's summed over every site), so training follows the equations.
    assert_follows_the_equations(adapter, make, reference, copies, hook, sites(arch, method), batch)


@pytest.mark.parametrize("arch,method", CASES)
def test_trainable_count_is_the_papers_formula(arch, method):
    for options, n, r, b in (({}, 4, 1, HIDDEN // 16), ({"reduction_factor": 8, "phm_dim": 8}, 8, 1, 8),
                             ({"bottleneck_size": 6, "phm_dim": 2, "phm_rank": 3}, 2, 3, 6)):
        _, adapter, _ = adapted(arch, method, **options)
        adapters = LAYERS * (2 if method == "compacter" else 1)
        # n³ shared, then per adapter two LPHM layers of r·(d + b) weights, and the two biases.
        assert adapter.trainable_count() == n ** 3 + adapters * (2 * r * (HIDDEN + b) + b + HIDDEN)
        first = sites(arch, method)[0]
        assert sorted(adapter.params) == sorted([f"{first}.phm_rule"] + [
            f"{site}.adapter_{part}" for site in sites(arch, method) for part in PARTS])
        trainable = {n for n, p in adapter.model.named_parameters() if p.requires_grad}
        assert trainable == set(adapter.params)
        rule = adapter.params[f"{first}.phm_rule"]
        assert all(adapter.model.get_submodule(site).phm_rule is rule for site in sites(arch, method))


def test_the_shared_rule_stays_one_tensor_through_training_and_dtype_moves():
    _, adapter, batch = adapted("llama", "compacter")
    rule_name = next(name for name in adapter.params if name.endswith("phm_rule"))
    adapter.model.to(torch.float64).to(torch.float32)
    train_steps(adapter, batch, steps=2)
    rule = adapter.model.get_parameter(rule_name)
    assert rule is adapter.params[rule_name]
    assert all(adapter.model.get_submodule(site).phm_rule is rule for site in sites("llama", "compacter"))


def test_a_launch_that_splits_the_shared_rule_is_refused_after_the_step():
    """What FSDP2's per-layer sharding would do (one copy of A per decoder layer), simulated."""
    _, adapter, _ = adapted("gpt2", "compacter")
    adapter.method.after_step(adapter, 1, 10)  # whole: nothing to say
    last = adapter.model.get_submodule(sites("gpt2", "compacter")[-1])
    last.phm_rule = torch.nn.Parameter(last.phm_rule.detach().clone())
    with pytest.raises(UserError, match="split it into one copy per layer") as err:
        adapter.method.after_step(adapter, 1, 10)
    assert "without FSDP" in err.value.fix


def test_adapter_weights_are_fp32_on_a_bf16_base():
    model = tiny_llama().to(torch.bfloat16)
    adapter = methods.apply(model, config("compacter"))
    assert {p.dtype for p in adapter.params.values()} == {torch.float32}
    batch = token_batch(128)
    out = batch_logits(model, batch)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, batch_logits(tiny_llama().to(torch.bfloat16), batch))
    train_steps(adapter, batch, steps=2)
    assert not torch.equal(batch_logits(model, batch), out)


@pytest.mark.parametrize("method", ["compacter", "compacter_plus_plus"])
def test_applies_to_a_weightless_skeleton_as_to_the_model(method):
    skeleton = methods.apply(load_skeleton(TINY_GPT2), config(method, phm_rank=2))
    real = methods.apply(tiny_gpt2(), config(method, phm_rank=2))
    assert {p.device.type for p in skeleton.params.values()} == {"meta"}
    assert {n: p.shape for n, p in skeleton.params.items()} == {n: p.shape for n, p in real.params.items()}


@pytest.mark.parametrize("arch,method", CASES)
def test_export_loads_back_onto_a_fresh_base(arch, method, tmp_path):
    make, adapter, batch = adapted(arch, method, bottleneck_size=4, non_linearity="gelu", dropout=0.1,
                                   phm_dim=2, phm_rank=2)
    train_steps(adapter, batch)
    folder = save_adapter(adapter, tmp_path / "adapter", f"builtin:tiny-{arch}")
    saved = json.loads((folder / CONFIG_FILE).read_text())
    assert saved["peft_type"] == method.upper()
    assert {key: saved[key] for key in ("bottleneck_size", "non_linearity", "dropout", "phm_dim", "phm_rank")} == \
        {"bottleneck_size": 4, "non_linearity": "gelu", "dropout": 0.1, "phm_dim": 2, "phm_rank": 2}
    keys = load_file(folder / "adapter_model.safetensors")
    assert set(keys) == {"base_model.model." + name for name in adapter.params}
    assert sum(key.endswith(".phm_rule") for key in keys) == 1

    loaded = load_adapter(make(), folder)
    assert loaded.method is methods.get(method)
    assert loaded.cfg == adapter.cfg
    assert torch.equal(batch_logits(loaded.model, batch), batch_logits(adapter.model, batch))


def test_an_adapter_of_another_phm_dim_or_base_is_refused(tmp_path):
    _, adapter, _ = adapted("gpt2", "compacter_plus_plus")
    folder = save_adapter(adapter, tmp_path / "adapter", "builtin:tiny-gpt2")
    with pytest.raises(UserError, match="do not match the model"):
        load_adapter(tiny_llama(), folder)
    config_path = folder / CONFIG_FILE
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**saved, "phm_dim": 2}))
    with pytest.raises(UserError, match="phm_rule' has shape"):  # same keys, other shapes
        load_adapter(tiny_gpt2(), folder)
    config_path.write_text(json.dumps({**saved, "phm_dim": "four"}))
    with pytest.raises(UserError, match="invalid COMPACTER_PLUS_PLUS adapter option") as err:
        load_adapter(tiny_gpt2(), folder)
    assert err.value.where == "phm_dim"


@pytest.mark.parametrize("method", ["compacter", "compacter_plus_plus"])
def test_merge_is_refused(method):
    _, adapter, _ = adapted("gpt2", method)
    with pytest.raises(UserError, match="non-linearity"):
        adapter.method.merge(adapter)


@pytest.mark.parametrize("options,option,phrase", [
    ({"phm_dim": 3}, "phm_dim", "phm_dim 3 does not divide the model's hidden size 64"),
    ({"bottleneck_size": 6}, "bottleneck_size", "bottleneck of 6 units (hidden size 64) is not a multiple of phm_dim 4"),
    ({"reduction_factor": 16, "phm_dim": 8}, "reduction_factor", "bottleneck of 4 units"),
    ({"phm_dim": 32}, "phm_dim", "bottleneck of 4 units"),  # the default factor's 4 units: change phm_dim
])
def test_sizes_phm_dim_cannot_split_name_the_option(options, option, phrase):
    with pytest.raises(UserError, match=re.escape(phrase)) as err:
        adapted("gpt2", "compacter", **options)
    assert err.value.where == f"method.{option}"
    assert err.value.fix


def test_bad_options_exit_2_with_one_message_naming_them(tmp_path):
    text = (RECIPES / "compacter-gpt2.yaml").read_text().replace("data/tiny/", f"{RECIPES / 'data' / 'tiny'}/")
    for line, replacement, phrases in (
        ("  phm_dim: 4 ", "  phm_dim: 5 ", ["method.phm_dim", "does not divide the model's hidden size 64"]),
        ("  phm_rank: 1", "  phm_rank: 0", ["method.phm_rank (line 12)", "at least 1"]),
        ("  phm_dim: 4 ", "  phm_dims: 4 ", ["method.phm_dims", "phm_dim"]),
    ):
        assert line in text
        (tmp_path / "bad.yaml").write_text(text.replace(line, replacement))
        assert_refused(invoke("validate", tmp_path / "bad.yaml"), *phrases)


def test_recipe_smoke_run_lowers_the_loss(tmp_path):
    summary = assert_smoke_run("recipes/compacter-gpt2.yaml", tmp_path)
    assert summary.result.val_loss_after < summary.result.val_loss_before
    assert summary.trainable_params == 4 ** 3 + 4 * (2 * (HIDDEN + 8) + 8 + HIDDEN)
    saved = load_recipe(RECIPES / "compacter-gpt2.yaml")
    assert saved.method.name == "compacter" and saved.method.phm_dim == 4


@pytest.mark.slow
def test_smollm2_recipe_starts(tmp_path):
    summary = assert_smoke_run("recipes/compacter-smollm2.yaml", tmp_path, ["train.max_steps=2"], check_loss=False)
    hidden, bottleneck = 576, 36
    assert summary.trainable_params == 4 ** 3 + 30 * 2 * (2 * (hidden + bottleneck) + bottleneck + hidden)  # 110,224
    assert summary.result.steps == 2
    assert summary.result.val_loss_after < summary.result.val_loss_before


@pytest.mark.slow
def test_ddp_trains_as_one_process_and_fsdp2_is_refused(tmp_path):
    """Two CPU processes. DDP keeps the shared A one tensor per process: the same losses and adapter
    as one process with twice the grad_accum. FSDP2 shards each decoder layer apart, which splits
    A into per-layer copies: refused after the first step, exit 2, one message."""
    from test_distributed import assert_same_adapter, assert_same_losses, launch, losses

    from peftctl.run import pipeline

    recipe = RECIPES / "compacter-gpt2.yaml"
    sets = ["train.batch_size=2", "train.max_steps=6", "train.log_every=1"]
    pipeline.run(load_recipe(recipe, [*sets, "train.grad_accum=2"], tmp_path / "one"))
    ddp = launch(tmp_path / "ddp", recipe=recipe, sets=sets)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "Grad strides do not match" not in ddp.stderr
    assert_same_losses(losses(tmp_path / "ddp"), losses(tmp_path / "one"))
    assert_same_adapter(tmp_path / "ddp" / "adapter", tmp_path / "one" / "adapter")

    fsdp = launch(tmp_path / "fsdp", fsdp=True, recipe=recipe, sets=sets)
    assert fsdp.returncode != 0
    assert "split it into one copy per layer" in fsdp.stdout and "Traceback" not in fsdp.stdout
    assert not (tmp_path / "fsdp" / "adapter").exists()
