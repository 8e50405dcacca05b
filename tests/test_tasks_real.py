"""The classify quickstart on the real MiniLM, and SmolLM2 as a classifier (slow: minutes on 2
CPU cores); the commands of docs/tasks.md as a user types them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def peftctl(*args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "peftctl", *args, "--json"], cwd=ROOT, capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_classify_quickstart_beats_its_chance_level_base(tmp_path):
    out = tmp_path / "classify"
    trained = peftctl("train", "recipes/classify-quickstart.yaml", "--output", str(out))
    assert trained["val_loss_after"] < trained["val_loss_before"] - 0.5, trained
    report = peftctl("eval", str(out / "adapter"))
    adapter, base = report["adapter"], report["base"]
    assert adapter["accuracy"] > 0.6 and adapter["macro_f1"] > 0.6, adapter  # chance: 1/6
    assert adapter["accuracy"] > base["accuracy"] + 0.3 and adapter["macro_f1"] > base["macro_f1"] + 0.3
    assert adapter["accuracy"] == pytest.approx(trained["val_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_smollm2_trains_as_a_classifier_and_merges(tmp_path):
    recipe = tmp_path / "smollm2-classify.yaml"
    data = ROOT / "recipes" / "data" / "classify"
    recipe.write_text(
        "task: sequence_classification\nmodel: {name_or_path: builtin:smollm2-135m}\n"
        "method: {name: lora, r: 8, target_modules: [q_proj, v_proj]}\n"
        f"data: {{train: {data / 'train.jsonl'}, validation: {data / 'validation.jsonl'}, max_seq_len: 96}}\n"
        "train: {max_steps: 30, batch_size: 8, lr: 1.0e-3, warmup_steps: 3}\n")
    trained = peftctl("train", str(recipe), "--output", str(tmp_path / "run"))
    assert trained["val_loss_after"] < trained["val_loss_before"], trained
    assert trained["val_accuracy"] > 1 / 6, trained
    merged = peftctl("merge", str(tmp_path / "run" / "adapter"), "--out", str(tmp_path / "merged"))
    assert merged["max_abs_logit_diff"] < 1e-3, merged
