"""Adapters made by `peft` in peftctl: eval, merge, continued training, and the ones refused.

The adapters are what a peft user has: get_peft_model on a base model loaded from a local
folder, five AdamW steps on the tiny alpaca rows, save_pretrained. LoRA, DoRA and IA3 adapt the
tiny Llama's projections, prompt tuning trains 4 virtual tokens. Tolerances: fp32, logits within 1e-5 of peft's
(its prompt-tuning logits include the virtual positions; the comparison takes the real ones).
Every adapter moves the logits by more than 1e-3, so the comparisons mean something.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from peftctl.cli.commands import app
from peftctl.core.errors import UserError
from peftctl.data.rows import read_rows
from peftctl.data.tokenize import tokenize_rows
from peftctl.export.adapter_files import CONFIG_FILE, WEIGHTS_FILE, load_adapter
import peftctl.model.loading
from peftctl.model.loading import load_model, load_tokenizer
from peftctl.plan import skeleton
from peftctl.plan.memory_plan import plan
from peftctl.recipe.load import load_recipe
from peftctl.recipe.schema import DataSpec, ModelSpec
from peftctl.run import pipeline
from hf_folders import BYTE_VOCAB, save_tiny_llama
from tiny_models import token_batch

ATOL = 1e-5
NON_TRIVIAL = 1e-3
ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "recipes" / "data" / "tiny" / "train.jsonl"
VALIDATION = ROOT / "recipes" / "data" / "tiny" / "validation.jsonl"
HUB_NAME = "some-org/tiny-llama"  # what peft writes when the base came from the hub

# name: (peft config, learning rate: the methods' usual ones, high enough to move the loss in 5 steps)
PEFT_CONFIGS = {
    "lora": (lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
             1e-2),
    "dora": (lambda: peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, use_dora=True,
                                     target_modules=["q_proj", "v_proj", "down_proj"]), 1e-2),
    # peft's Llama default: k_proj, v_proj (outputs scaled) and down_proj (input scaled).
    "ia3": (lambda: peft.IA3Config(task_type="CAUSAL_LM"), 1e-1),
    "prompt_tuning": (lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), 3e-1),
}
MERGEABLE = ("lora", "dora", "ia3")


def cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def real_positions(logits: torch.Tensor, length: int) -> torch.Tensor:
    return logits[:, -length:]


@pytest.fixture(scope="module")
def made_by_peft(tmp_path_factory):
    """{name: (adapter folder, the peft model that saved it)}, all on one tiny Llama folder."""
    root = tmp_path_factory.mktemp("peft")
    base = save_tiny_llama(root / "llama")
    batch = rows_batch(base, TRAIN)
    adapters = {}
    for name, (make, lr) in PEFT_CONFIGS.items():
        torch.manual_seed(0)
        model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), make())
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        for _ in range(5):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        model.save_pretrained(root / name)
        adapters[name] = (root / name, model)
    return base, adapters


def tiny_examples(base: Path, data: Path):
    rows = read_rows(data, "alpaca")
    return tokenize_rows(rows, DataSpec(train=data, max_seq_len=256), load_tokenizer(spec_of(base)))[0]


def rows_batch(base: Path, data: Path) -> dict[str, torch.Tensor]:
    """The rows of `data` as one right-padded batch, responses labelled, as peft users train."""
    examples = tiny_examples(base, data)
    length = max(len(e.input_ids) for e in examples)
    pad = [length - len(e.input_ids) for e in examples]
    return {
        "input_ids": torch.tensor([e.input_ids + [BYTE_VOCAB - 1] * n for e, n in zip(examples, pad)]),
        "attention_mask": torch.tensor([[1] * len(e.input_ids) + [0] * n for e, n in zip(examples, pad)]),
        "labels": torch.tensor([e.labels + [-100] * n for e, n in zip(examples, pad)]),
    }


def spec_of(base: Path) -> ModelSpec:
    return ModelSpec(name_or_path=str(base), dtype="float32")


# --- loading: the same model as peft's -------------------------------------------------------------


@pytest.mark.parametrize("name", PEFT_CONFIGS)
def test_peft_adapter_loads_with_peft_logits(made_by_peft, name):
    base, adapters = made_by_peft
    folder, peft_model = adapters[name]
    tokens = token_batch(BYTE_VOCAB)["input_ids"]
    with torch.no_grad():
        theirs = real_positions(peft_model(input_ids=tokens).logits, tokens.shape[1])
        ours = load_adapter(load_model(spec_of(base)), folder).model(tokens).logits
        plain = load_model(spec_of(base))(tokens).logits
    assert (theirs - plain).abs().max() > NON_TRIVIAL
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


# --- eval: the CLI with --base and --data ----------------------------------------------------------


def peft_loss(peft_model, base: Path, adapter: bool) -> float:
    """Mean cross-entropy per response token of VALIDATION, computed with peft (fp32)."""
    total, count = 0.0, 0
    with torch.no_grad(), (peft_model.disable_adapter() if not adapter else contextlib.nullcontext()):
        for example in tiny_examples(base, VALIDATION):
            ids, labels = torch.tensor([example.input_ids]), torch.tensor([example.labels])
            logits = real_positions(peft_model(input_ids=ids).logits, ids.shape[1])
            keep = labels[:, 1:] != -100
            total += float(F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


@pytest.mark.parametrize("name", PEFT_CONFIGS)
def test_eval_cli_on_a_peft_adapter(made_by_peft, name, tmp_path):
    base, adapters = made_by_peft
    folder = shutil.copytree(adapters[name][0], tmp_path / name)
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, "base_model_name_or_path": HUB_NAME}))

    result = cli("eval", folder, "--data", VALIDATION)
    assert result.exit_code == 2, result.output
    assert f"'{HUB_NAME}'" in result.output and "--base" in result.output
    result = cli("eval", folder, "--base", tmp_path / "no-model", "--data", VALIDATION)
    assert result.exit_code == 2 and "--base: " in result.output and "is not a model: no such file or folder here" in result.output

    result = cli("eval", folder, "--base", base, "--data", VALIDATION, "--samples", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows"] == 4 and len(report["generations"]) == 1
    # Without a recipe beside the adapter the base loads at dtype auto (bf16 where the CPU has it;
    # measured 1.4e-4 off the fp32 loss): the tolerance is bf16's, 5x below the adapter's effect.
    peft_model = adapters[name][1]
    expected = {"base": peft_loss(peft_model, base, adapter=False), "adapter": peft_loss(peft_model, base, adapter=True)}
    assert abs(expected["adapter"] - expected["base"]) > 1e-2, expected
    for side in ("base", "adapter"):
        assert report[side]["loss"] == pytest.approx(expected[side], abs=2e-3), (side, expected)


# --- merge -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MERGEABLE)
def test_merge_cli_on_a_peft_adapter_matches_peft_merge(made_by_peft, name, tmp_path):
    base, adapters = made_by_peft
    folder, peft_model = adapters[name]
    result = cli("merge", folder, "--base", base, "--out", tmp_path / "merged", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["max_abs_logit_diff"] < 1e-4
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).merge_and_unload()
    theirs = reference.state_dict()
    ours = merged.state_dict()
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        torch.testing.assert_close(ours[key], tensor, atol=ATOL, rtol=0, msg=key)
    tokens = token_batch(BYTE_VOCAB)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, peft_model(input_ids=tokens).logits, atol=1e-4, rtol=0)


# --- continued training: model.adapter --------------------------------------------------------------


def write_recipe(folder: Path, base: Path, adapter: str, method: dict, out: Path, steps: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {"model": {"name_or_path": str(base), "dtype": "float32", "adapter": adapter}, "method": method,
              "data": {"train": str(TRAIN), "validation": str(VALIDATION), "max_seq_len": 256},
              "train": {"max_steps": steps, "batch_size": 4, "lr": 1e-2}, "output": {"dir": str(out)}}
    path = folder / "continue.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.mark.parametrize("name", ["lora", "prompt_tuning"])
def test_continued_training_from_a_peft_adapter(made_by_peft, name, tmp_path):
    base, adapters = made_by_peft
    folder = adapters[name][0]
    shutil.copytree(folder, tmp_path / "start")
    # `method: {name}` is enough; the adapter path is relative to the recipe's folder.
    recipe = load_recipe(write_recipe(tmp_path / "recipes", base, "../start", {"name": name}, tmp_path / "run"))
    assert recipe.model.adapter.resolve() == tmp_path / "start"
    planned = plan(recipe).trainable_params  # the adapter's options (r=4 for lora), not the defaults
    summary = pipeline.run(recipe)
    assert planned == summary.trainable_params

    # Training started from the adapter: its first validation loss is the peft adapter's.
    assert summary.result.val_loss_before == pytest.approx(peft_loss(adapters[name][1], base, adapter=True), abs=1e-4)
    assert summary.result.val_loss_after < summary.result.val_loss_before
    before, after = load_file(folder / WEIGHTS_FILE), load_file(summary.adapter_dir / WEIGHTS_FILE)
    assert set(after) == set(before)
    assert all(after[key].shape == before[key].shape for key in before)
    assert max(float((after[key] - before[key]).abs().max()) for key in before) > NON_TRIVIAL
    # The options are the adapter's, in the export and in the recipe saved beside it.
    saved = json.loads((summary.adapter_dir / CONFIG_FILE).read_text())
    original = json.loads((folder / CONFIG_FILE).read_text())
    for key in ("r", "lora_alpha", "num_virtual_tokens"):
        assert saved.get(key) == original.get(key)
    if name == "lora":
        assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]
        assert yaml.safe_load((summary.adapter_dir / "peftctl_recipe.yaml").read_text())["method"]["r"] == 4

    # What it exports is an adapter peft loads, with the logits peftctl gives it.
    tokens = token_batch(BYTE_VOCAB)["input_ids"]
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), summary.adapter_dir)
        theirs = real_positions(theirs.eval()(input_ids=tokens).logits, tokens.shape[1])
        ours = load_adapter(load_model(spec_of(base)), summary.adapter_dir).model(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert (folder / WEIGHTS_FILE).read_bytes() == (tmp_path / "start" / WEIGHTS_FILE).read_bytes()


def test_method_options_must_agree_with_the_adapter(made_by_peft, tmp_path):
    base, adapters = made_by_peft
    lora = adapters["lora"][0]

    def options(method: dict):
        return skeleton.continued_method(load_recipe(write_recipe(tmp_path, base, str(lora), method, tmp_path / "o")))

    # The same options in another order or spelling agree, and what is left out is the adapter's.
    cfg = options({"name": "lora", "r": 4, "alpha": 8.0, "target_modules": ["v_proj", "q_proj"]})
    assert (cfg.r, cfg.alpha, sorted(cfg.target_modules)) == (4, 8, ["q_proj", "v_proj"])
    # An option that only steers training is the recipe's: the adapter has no record of it.
    cfg = options({"name": "lora", "loraplus_lr_ratio": 16})
    assert (cfg.r, cfg.loraplus_lr_ratio) == (4, 16)
    with pytest.raises(UserError) as err:
        options({"name": "lora", "r": 8})
    assert err.value.where == "method.r"  # the CLI adds the recipe line: see the next test
    assert "r is 8 in the recipe, but the adapter to continue" in err.value.problem and "has 4" in err.value.problem
    with pytest.raises(UserError) as err:
        options({"name": "lora", "alpha": 8, "target_modules": "all-linear", "use_rslora": True})
    assert err.value.where.startswith("method.target_modules")  # the first that differs, in field order
    with pytest.raises(UserError) as err:
        options({"name": "ia3"})
    assert err.value.where.startswith("method.name") and "'lora'" in err.value.problem

    # 'all-linear' is the list of every projection it selects: an adapter saved with that list agrees.
    every = tmp_path / "every"
    shutil.copytree(lora, every)
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = json.loads((every / CONFIG_FILE).read_text())
    (every / CONFIG_FILE).write_text(json.dumps({**config, "target_modules": projections}))
    recipe = load_recipe(write_recipe(tmp_path, base, str(every), {"name": "lora", "target_modules": "all-linear"},
                                      tmp_path / "o"))
    assert sorted(skeleton.continued_method(recipe).target_modules) == sorted(projections)


def test_continuing_errors_exit_2_through_the_cli(made_by_peft, tmp_path):
    base, adapters = made_by_peft
    recipe = write_recipe(tmp_path, base, str(adapters["lora"][0]), {"name": "lora", "r": 16}, tmp_path / "run")
    result = cli("train", recipe)
    assert result.exit_code == 2, result.output
    assert "method.r (line 7)" in result.output and "has 4" in result.output
    assert not (tmp_path / "run").exists()

    recipe = write_recipe(tmp_path, base, "no-such-adapter", {"name": "lora"}, tmp_path / "run")
    result = cli("train", recipe)
    assert result.exit_code == 2 and "model.adapter (line 4)" in result.output, result.output
    assert "no adapter to continue at" in result.output and "no-such-adapter" in result.output

    # --overwrite of the output folder must never delete the adapter it continues from.
    run = tmp_path / "run2"
    shutil.copytree(adapters["lora"][0], run / "adapter")
    (run / "metrics.jsonl").write_text("")
    recipe = write_recipe(tmp_path, base, str(run / "adapter"), {"name": "lora"}, run)
    result = cli("train", recipe, "--overwrite")
    assert result.exit_code == 2 and "the adapter to continue" in result.output, result.output
    assert (run / "adapter" / WEIGHTS_FILE).is_file()


# --- refused: foreign configs and adapters for another base -----------------------------------------


@pytest.fixture
def no_weights(monkeypatch):
    """Refusals must come from the config and the model's shapes, before any weights load."""
    def refuse(*args, **kwargs):
        raise AssertionError("the base model's weights were loaded before the adapter was checked")

    monkeypatch.setattr(peftctl.model.loading, "load_model", refuse)


def edited_copy(source: Path, folder: Path, **changes) -> Path:
    shutil.copytree(source, folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize("change, key", [
    ({"peft_type": "BOFT"}, "peft_type"),  # a peft method peftctl does not implement
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"bias": "all"}, "bias"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"r": 0}, "r"),
    ({"target_modules": ".*proj"}, "target_modules"),
    ({"use_qalora": True}, "use_qalora"),
    ({"alora_invocation_tokens": [5, 6]}, "alora_invocation_tokens"),
])
def test_foreign_config_is_refused_naming_the_key(made_by_peft, tmp_path, no_weights, change, key):
    base, adapters = made_by_peft
    folder = edited_copy(adapters["lora"][0], tmp_path / "adapter", **change)
    for command in (["merge", folder, "--base", base, "--out", tmp_path / "merged"],
                    ["eval", folder, "--base", base, "--data", VALIDATION]):
        result = cli(*command)
        assert result.exit_code == 2, result.output
        assert f"{folder / CONFIG_FILE}: {key}:" in "".join(result.output.split("\n")), result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "merged").exists()


def test_config_without_a_required_key(made_by_peft, tmp_path, no_weights):
    base, adapters = made_by_peft
    folder = shutil.copytree(adapters["lora"][0], tmp_path / "adapter")
    config = json.loads((folder / CONFIG_FILE).read_text())
    del config["r"]
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    result = cli("merge", folder, "--base", base, "--out", tmp_path / "merged")
    assert result.exit_code == 2 and "the LORA adapter config has no 'r'" in result.output, result.output


@pytest.mark.parametrize("other_base, key", [
    # Another architecture: the adapter's target modules do not exist.
    ("builtin:tiny-gpt2", "target_modules"),
    # Narrower layers: the first adapter weight (layer 0's q_proj lora_A) has the wrong shape.
    ({"hidden_size": 32}, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
    # One layer fewer: layer 1's weights have nowhere to go.
    ({"num_hidden_layers": 1}, "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"),
])
def test_adapter_for_another_base_is_refused_without_a_partial_load(made_by_peft, tmp_path, no_weights, other_base,
                                                                   key):
    _, adapters = made_by_peft
    folder = adapters["lora"][0]
    base = other_base if isinstance(other_base, str) else str(save_tiny_llama(tmp_path / "other", **other_base))
    result = cli("merge", folder, "--base", base, "--out", tmp_path / "merged")
    assert result.exit_code == 2, result.output
    assert key in result.output.replace("\n", ""), result.output
    assert not (tmp_path / "merged").exists()
    # All or nothing: no weight was copied before the mismatch was found (B is still its zero init).
    if not isinstance(other_base, str):
        model = load_model(spec_of(Path(base)))
        with pytest.raises(UserError):
            load_adapter(model, folder)
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert lora_b and all(float(p.detach().abs().max()) == 0 for p in lora_b)
