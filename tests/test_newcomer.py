"""What a newcomer sees: progress in logs, one tokens/s, output that pastes, JSON errors, merges
at the base's precision and files with the usual permissions (issue 17)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open

from cli_checks import invoke
from hf_folders import save_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "recipes" / "smoke-gpt2.yaml"


def test_a_run_into_a_log_prints_plain_progress_lines_whose_tokens_per_s_is_the_summarys(tmp_path):
    # A deep output folder: the paths printed after the table must come out whole, unbroken.
    out = tmp_path / ("a-rather-long-folder-name-" * 3) / "run"
    result = invoke("train", SMOKE, "--output", out)  # CliRunner: stderr is no terminal, as in a log
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("train step ")]
    assert lines[0].startswith("train step 1/20 (5%)  loss ") and lines[-1].startswith("train step 20/20 (100%)")
    assert all(re.search(r"lr \S+  [\d,]+ tok/s  elapsed \d:\d\d:\d\d  eta \d:\d\d:\d\d$", line) for line in lines)
    last_rate = re.search(r"([\d,]+) tok/s", lines[-1]).group(1)
    assert re.search(rf"│ tokens/s\s+│ {last_rate} \(", result.stdout), result.stdout  # one definition, one figure
    for name in ("adapter", "metrics"):  # whole on their own lines, to be copied
        assert any(line.startswith(f"{name}: {out}") for line in result.stdout.splitlines()), result.stdout
    assert "packing auto" not in result.stderr


def test_json_errors_are_one_object_on_stdout(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(SMOKE.read_text().replace("lr: 1.0e-2", "lr: -1"))
    result = invoke("train", recipe, "--json")
    assert result.exit_code == 2
    error = json.loads(result.stdout)
    assert error["file"] == str(recipe) and error["key"] == "train.lr" and isinstance(error["line"], int)
    assert error["error"] and set(error) == {"error", "file", "key", "line", "expected", "fix", "also"}


def test_version_and_flags_shown_as_flags():
    from peftctl import __version__

    assert invoke("--version").stdout.strip() == f"peftctl {__version__}"
    help_text = invoke("train", "--help").stdout
    assert "--overwrite" in help_text and "<bool>" not in help_text


def test_merge_saves_at_the_bases_precision_and_files_get_the_umasks_mode(tmp_path):
    from transformers import LlamaForCausalLM

    base = tmp_path / "bf16-base"
    LlamaForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "fp32")).to(torch.bfloat16).save_pretrained(base)
    (tmp_path / "fp32" / "tokenizer.json").rename(base / "tokenizer.json")
    (tmp_path / "fp32" / "tokenizer_config.json").rename(base / "tokenizer_config.json")
    assert json.loads((base / "config.json").read_text())["dtype"] == "bfloat16"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(SMOKE.read_text().replace("builtin:tiny-gpt2", str(base))
                      .replace("target_modules: [c_attn]", "target_modules: [q_proj, v_proj]")
                      .replace("data/tiny/", f"{ROOT / 'recipes' / 'data' / 'tiny'}/"))
    assert invoke("train", recipe, "--output", tmp_path / "run").exit_code == 0
    result = invoke("merge", tmp_path / "run" / "adapter", "--out", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    assert "bfloat16 (the base's precision)" in result.stdout
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    umask = os.umask(0)
    os.umask(umask)
    written = [*(tmp_path / "merged").iterdir(), *(tmp_path / "run" / "adapter").iterdir(),
               *next((tmp_path / "run" / "checkpoints").iterdir()).iterdir()]
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o666 & ~umask)}
