"""What a newcomer sees: progress in logs, one tokens/s, output that pastes, JSON errors, merges
at the base's precision and files with the usual permissions (issue 17)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from cli_checks import assert_refused, invoke
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
    # The hint, pasted as printed, loads the merged model.
    hint = next(line for line in result.stdout.splitlines() if line.startswith("load it with: "))
    pasted = subprocess.run([sys.executable, "-c", "from transformers import AutoModelForCausalLM\n"
                             f"print(type({hint.removeprefix('load it with: ')}).__name__)"],
                            capture_output=True, text=True, timeout=300)
    assert pasted.stdout.strip() == "LlamaForCausalLM", pasted.stderr[-2000:]
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    umask = os.umask(0)
    os.umask(umask)
    written = [*(tmp_path / "merged").iterdir(), *(tmp_path / "run" / "adapter").iterdir(),
               *next((tmp_path / "run" / "checkpoints").iterdir()).iterdir()]
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o666 & ~umask)}


def peft_snippet() -> tuple[str, str]:
    """The deploy page's export-base command and the Python that loads the adapter in peft."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    block = text.split("<!-- peft-snippet -->")[1].split("<!-- /peft-snippet -->")[0]
    command = block.split("```bash\n")[1].split("```")[0].strip()
    return command, block.split("```python\n")[1].split("```")[0]


def run_peft_snippet(adapter: Path, base: Path, model: str) -> str:
    """The deploy page's snippet as written, with the tiny model and these folders in its places."""
    command, code = peft_snippet()
    args = command.replace("builtin:smollm2-135m", model).replace("runs/smollm2-base", str(base)).split()
    assert args[:2] == ["peftctl", "export-base"]
    result = invoke(*args[1:])
    assert result.exit_code == 0, result.output
    code = code.replace("runs/smollm2-base", str(base)).replace("runs/quickstart/adapter", str(adapter))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_the_deploy_pages_peft_snippet_runs_on_an_exported_builtin_base(tmp_path):
    assert invoke("train", SMOKE, "--output", tmp_path / "run").exit_code == 0
    printed = run_peft_snippet(tmp_path / "run" / "adapter", tmp_path / "base", "builtin:tiny-gpt2")
    assert printed.strip()  # a reply was generated and decoded
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peftctl.export.adapter_files import load_adapter
    from peftctl.model.loading import load_model
    from peftctl.recipe.schema import ModelSpec

    ids = torch.tensor([[5, 17, 99, 3, 250, 42]])
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                           tmp_path / "run" / "adapter")(ids).logits
        ours = load_adapter(load_model(ModelSpec(name_or_path="builtin:tiny-gpt2", dtype="float32")),
                            tmp_path / "run" / "adapter").model(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_independent_mistakes_come_in_one_message(tmp_path):
    """A model that is not there, an output folder in the way and a data file with a bad row:
    one run names all three (the recipe's own errors already come together)."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello"}\n{"instruction": "no output"}\n')
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(SMOKE.read_text().replace("builtin:tiny-gpt2", "tiny-org/not-cached")
                      .replace("data/tiny/train.jsonl", str(data)).replace("  validation: data/tiny/validation.jsonl\n", ""))
    assert_refused(invoke("train", recipe, "--output", tmp_path / "run"),
                   "model 'tiny-org/not-cached' is not in the Hugging Face cache",
                   "also: ", "the output folder already exists and is not empty")
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    # With the model fixed, the data row's error comes with the output folder's.
    recipe.write_text(recipe.read_text().replace("tiny-org/not-cached", "builtin:tiny-gpt2"))
    assert_refused(invoke("train", recipe, "--output", tmp_path / "run"),
                   "the output folder already exists", f"{data}: row 2: missing field 'output'")


def test_peftctls_own_calls_raise_no_deprecation_warnings(tmp_path):
    """Training, evaluating (with generation) and merging, on GPT-2 and a Llama folder, with the
    prompt methods that feed the KV cache: transformers deprecates what peftctl must not call."""
    import warnings

    llama = save_tiny_llama(tmp_path / "llama")
    runs = []
    for method in ("prefix_tuning", "p_tuning", "smoke"):
        text = (ROOT / "recipes" / f"{method}-gpt2.yaml").read_text().replace("data/tiny/", f"{ROOT / 'recipes' / 'data' / 'tiny'}/")
        runs.append((method, text))
    llama_prefix = runs[0][1].replace("builtin:tiny-gpt2", str(llama))
    runs.append(("prefix_tuning-llama", llama_prefix))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, text in runs:
            recipe = tmp_path / f"{name}.yaml"
            recipe.write_text(text)
            out = tmp_path / name
            assert invoke("train", recipe, "--output", out, "--set", "train.max_steps=2").exit_code == 0
            assert invoke("eval", out / "adapter", "--samples", "2", "--json").exit_code == 0
        assert invoke("merge", tmp_path / "smoke" / "adapter", "--out", tmp_path / "merged").exit_code == 0
    deprecations = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                    if issubclass(w.category, (DeprecationWarning, FutureWarning, PendingDeprecationWarning))]
    assert not deprecations, deprecations
