"""The README's main command on the real model (slow: SmolLM2-135M, minutes on 2 CPU cores)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_validation_loss_falls(tmp_path):
    out = tmp_path / "quickstart"
    result = subprocess.run(
        [sys.executable, "-m", "peftctl", "train", "recipes/quickstart.yaml", "--output", str(out), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["val_loss_after"] < figures["val_loss_before"] - 0.1, figures
    assert (out / "adapter" / "adapter_model.safetensors").is_file()

    # `peftctl eval` on the quickstart's held-out rows: the adapter beats the base, and its greedy
    # replies end by themselves (EOS), well before the token limit.
    result = subprocess.run(
        [sys.executable, "-m", "peftctl", "eval", str(out / "adapter"), "--samples", "3", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["adapter"]["loss"] < report["base"]["loss"], report
    assert len(report["generations"]) == 3
    for generation in report["generations"]:
        assert generation["stopped_at_eos"] is True, generation

    # The deploy page's peft snippet (docs/deploy.md), as written, on this adapter and the exported SmolLM2 base.
    from test_newcomer import run_peft_snippet

    reply = run_peft_snippet(out / "adapter", tmp_path / "smollm2-base", "builtin:smollm2-135m")
    assert reply.strip(), reply
