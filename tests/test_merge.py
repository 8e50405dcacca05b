"""`peftctl merge`: adapters folded into plain transformers model folders, and what it refuses.

Each mergeable method is trained a few steps on a tiny base (a Llama saved as a local folder, or
the builtin GPT-2 with its Conv1D layers), exported, and merged by the CLI. A separate Python
process that never imports peftctl loads every merged folder with plain
`AutoModelForCausalLM.from_pretrained`; its logits must equal base + adapter's (computed here,
before the merge) within 1e-4 in fp32. Adapters are non-trivial: they move the logits by more
than 1e-3. Also: `peftctl plan --json` on a Llama-2-7B config, the first step of the workflow.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from typer.testing import CliRunner

from peftctl import methods
from peftctl.cli.commands import app
from peftctl.export.adapter_files import CONFIG_FILE, save_adapter
from peftctl.methods import METHODS
from peftctl.methods.bitfit import BitFitConfig
from peftctl.methods.ia3 import IA3Config
from peftctl.methods.lora import LoraConfig
import peftctl.model.loading
from peftctl.model.loading import load_model
from peftctl.recipe.schema import ModelSpec
from hf_folders import BYTE_VOCAB, save_tiny_llama
from method_checks import examples_where, on_llama
from tiny_models import token_batch, train_steps

ATOL = 1e-4
NON_TRIVIAL = 1e-3
PROBE = torch.randint(3, BYTE_VOCAB - 1, (2, 16), generator=torch.Generator().manual_seed(3))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}

# label: (base, method options). DoRA and IA3 on GPT-2 exercise Conv1D's transposed weights; BitFit
# on a Llama creates biases the architecture has none of, which the merged config must declare.
# Every other mergeable method's example runs on the tiny Llama.
CASES = {
    **{label: ("llama", on_llama(label)) for label in examples_where(lambda method: method.merge_refusal is None)},
    "lora": ("llama", LoraConfig(name="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "dora": ("builtin:tiny-gpt2", LoraConfig(name="lora", r=4, alpha=8, target_modules=["c_attn", "c_fc"],
                                             use_dora=True)),
    "rslora": ("llama", LoraConfig(name="lora", r=4, alpha=8, target_modules="all-linear", use_rslora=True)),
    "ia3": ("builtin:tiny-gpt2", IA3Config(name="ia3")),
    "bitfit": ("llama", BitFitConfig(name="bitfit", create_missing_biases=True)),
}
# Every method merge_refusal keeps out (bottleneck non-linearity, virtual tokens, ...).
UNMERGEABLE = [method.name for method in METHODS.values() if method.merge_refusal]


def merge(*args: str):
    return CliRunner().invoke(app, ["merge", *map(str, args)])


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """Every case trained, exported, merged with --json, then reloaded by a process without peftctl."""
    root = tmp_path_factory.mktemp("merge")
    llama = save_tiny_llama(root / "llama")
    cases = {}
    for name, (base, cfg) in CASES.items():
        spec = ModelSpec(name_or_path=str(llama) if base == "llama" else base, dtype="float32")
        base = load_model(spec)
        with torch.no_grad():
            base_logits = base(PROBE).logits
        base_keys = set(base.state_dict())
        torch.manual_seed(0)
        adapter = methods.apply(load_model(spec), cfg)
        train_steps(adapter, token_batch(BYTE_VOCAB), steps=5)
        with torch.no_grad():
            expected = adapter.model(PROBE).logits
        save_adapter(adapter, root / name / "adapter", spec.name_or_path)
        result = merge(root / name / "adapter", "--out", root / name / "merged", "--json")
        assert result.exit_code == 0, result.output
        cases[name] = {"dir": root / name, "base": base_logits, "base_keys": base_keys, "expected": expected,
                       "figures": json.loads(result.stdout)}
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "probe, out = torch.load(sys.argv[1]), {}\n"
        "for folder in sys.argv[3:]:\n"
        "    AutoTokenizer.from_pretrained(folder)\n"
        "    with torch.no_grad():\n"
        "        out[folder] = AutoModelForCausalLM.from_pretrained(folder).eval()(probe).logits\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'peftctl'], 'peftctl was imported'\n"
        "torch.save(out, sys.argv[2])\n"
    )
    torch.save(PROBE, root / "probe.pt")
    folders = [str(case["dir"] / "merged") for case in cases.values()]
    proc = subprocess.run([sys.executable, "-c", script, str(root / "probe.pt"), str(root / "logits.pt"), *folders],
                          capture_output=True, text=True, timeout=120, cwd=root, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = torch.load(root / "logits.pt")
    for case in cases.values():
        case["reloaded"] = reloaded[str(case["dir"] / "merged")]
    return cases


@pytest.mark.parametrize("name", CASES)
def test_merged_folder_loads_in_plain_transformers_with_the_adapters_logits(merged, name):
    case = merged[name]
    assert (case["expected"] - case["base"]).abs().max() > NON_TRIVIAL  # the adapter changes the model
    torch.testing.assert_close(case["reloaded"], case["expected"], atol=ATOL, rtol=0)
    # The figures peftctl prints are its own comparison of the same two models.
    figures = case["figures"]
    assert figures["merged_model"] == str(case["dir"] / "merged")
    assert figures["compared_with"] == "base + adapter"
    assert 0 <= figures["mean_abs_logit_diff"] <= figures["max_abs_logit_diff"] < ATOL
    assert figures["max_abs_logit_diff"] == pytest.approx(
        float((case["reloaded"] - case["expected"]).abs().max()), abs=1e-5)


def test_merged_weights_are_plain(merged):
    """The base model's tensor names and nothing else (BitFit: its new biases), whatever the method;
    BitFit's new biases are declared in the config."""
    for name, case in merged.items():
        with safe_open(case["dir"] / "merged" / "model.safetensors", "pt") as f:
            keys = set(f.keys())
            assert {f.get_tensor(k).dtype for k in keys} == {torch.float32}
        tied = {k for k in case["base_keys"] - keys if k.endswith("lm_head.weight")}  # saved once, with the embeddings
        assert case["base_keys"] - keys == tied, name
        added = keys - case["base_keys"]
        assert all(k.endswith(".bias") for k in added) and (not added or name == "bitfit"), (name, sorted(added)[:3])
    config = json.loads((merged["bitfit"]["dir"] / "merged" / "config.json").read_text())
    assert config["attention_bias"] is True and config["mlp_bias"] is True


def test_table_shows_the_logit_difference_and_overwrite_replaces_the_folder(merged, tmp_path):
    """--overwrite replaces a merged folder with another adapter's merge; the table shows the figures."""
    target = tmp_path / "merged"
    assert merge(merged["lora"]["dir"] / "adapter", "--out", target, "--json").exit_code == 0
    result = merge(merged["rslora"]["dir"] / "adapter", "--out", target, "--overwrite")
    assert result.exit_code == 0, result.output
    assert re.search(r"max \|Δlogit\| \d\.\d\de-\d\d, mean \d\.\d\de-\d\d", result.stdout), result.stdout
    assert "vs base + adapter" in result.stdout and "from_pretrained" in result.stdout
    assert digest(target)["model.safetensors"] == digest(merged["rslora"]["dir"] / "merged")["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no staging or old copies left


def test_out_not_empty_without_overwrite_changes_nothing(merged, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    existing = merged["lora"]["dir"] / "merged"
    before = digest(existing)
    for out in (other, existing):
        result = merge(merged["rslora"]["dir"] / "adapter", "--out", out)
        assert result.exit_code == 2, result.output
        assert "already exists and is not empty" in result.output and "--overwrite" in result.output
    assert (other / "notes.txt").read_text() == "keep me" and len(list(other.iterdir())) == 1
    assert digest(existing) == before
    # --overwrite replaces only a model folder: one without config.json is somebody's own files.
    result = merge(merged["rslora"]["dir"] / "adapter", "--out", other, "--overwrite")
    assert result.exit_code == 2 and "config.json" in result.output
    assert (other / "notes.txt").read_text() == "keep me"


def test_a_failed_overwrite_keeps_the_previous_merge(merged, tmp_path, monkeypatch):
    target = tmp_path / "merged"
    assert merge(merged["lora"]["dir"] / "adapter", "--out", target).exit_code == 0
    before = digest(target)

    def disk_full(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", disk_full)
    result = merge(merged["rslora"]["dir"] / "adapter", "--out", target, "--overwrite")
    assert result.exit_code == 2 and "could not write the merged model: No space left on device" in result.output
    assert digest(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_dtype_option(merged, tmp_path):
    result = merge(merged["dora"]["dir"] / "adapter", "--out", tmp_path / "bf16", "--dtype", "bfloat16", "--json")
    assert result.exit_code == 0, result.output
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    # The difference is measured in fp32, before rounding to the saved precision.
    assert json.loads(result.stdout)["max_abs_logit_diff"] < ATOL
    result = merge(merged["dora"]["dir"] / "adapter", "--out", tmp_path / "x", "--dtype", "int8")
    assert result.exit_code == 2 and "--dtype" in result.output and not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", UNMERGEABLE)
def test_unmergeable_methods_are_refused_before_any_weights_load(name, tmp_path, monkeypatch):
    """The adapter folder has only its config, naming a base that does not exist: the refusal must
    come from the method alone, before the base model or the adapter weights are looked at."""
    def no_loading(*args, **kwargs):
        raise AssertionError("merge loaded a model for a method it cannot merge")

    monkeypatch.setattr(peftctl.model.loading, "load_model", no_loading)
    monkeypatch.setattr(peftctl.model.loading, "load_tokenizer", no_loading)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / CONFIG_FILE).write_text(json.dumps(
        {"peft_type": METHODS[name].peft_type, "base_model_name_or_path": str(tmp_path / "no-such-model")}))
    result = merge(adapter, "--out", tmp_path / "merged")
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert f"method '{name}' cannot be merged into the base model: {METHODS[name].merge_refusal}" in output
    assert "fix: serve the base model with the adapter loaded instead" in output
    assert "Traceback" not in result.output and not (tmp_path / "merged").exists()


