"""scripts/bench_train.py: every contender trains on the same tokens, and the report parses.

No timed assertions: speed depends on the machine; the script's own checks (the same real and
labelled tokens at every step for every contender) are what is tested.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def bench_module():
    sys.path.insert(0, str(ROOT / "scripts"))  # its sibling modules, as when run as a script
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "scripts" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_contender_that_saw_other_tokens_stops_the_bench():
    bench = bench_module()
    same = {"counts": [[10, 4], [12, 5]], "expected": [[10, 4], [12, 5]]}
    assert bench.check_counts({"peftctl": [same], "flat": [same]}) == [[10, 4], [12, 5]]
    fewer_labels = {"counts": [[10, 4], [12, 3]], "expected": [[10, 4], [12, 5]]}
    with pytest.raises(SystemExit, match="flat saw .* at step 2"):
        bench.check_counts({"peftctl": [same], "flat": [fewer_labels]})


@pytest.mark.slow
def test_every_contender_finishes_on_the_same_tokens(tmp_path):
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "scripts/bench_train.py", "--model", "builtin:tiny-gpt2", "--steps", "3",
         "--untimed-steps", "1", "--repeats", "1", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = report["contenders"]
    assert set(rows) == {"peftctl", "flat", "trl", "stock"}
    assert len({(row["timed_real_tokens"], row["timed_labelled_tokens"]) for row in rows.values()}) == 1
    for row in rows.values():
        assert row["tokens_per_s"]["median"] > 0 and row["val_loss"]["median"] > 0
        assert 0 < row["mfu"]["median"] < 1
    assert rows["stock"]["attention"] == "sdpa" and not rows["stock"]["no_padding"]
    assert report["ratio_peftctl_over_stock"]["over"] == "stock"


def test_the_classifier_bench_parses_its_options():
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "scripts/bench_classify.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--quick" in proc.stdout and "DataCollatorWithPadding" in proc.stdout


def test_the_classifier_bench_states_ratios_over_the_faster_trainer():
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("bench_classify", ROOT / "scripts" / "bench_classify.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.parse_args(["--quick"]).steps == bench.QUICK_STEPS

    def row(tokens, rss, accuracy):
        return {"tokens_per_s": {"median": tokens}, "peak_rss_mib": {"median": rss}, "accuracy": {"median": accuracy}}

    rows = {"peftctl": row(300.0, 600.0, 0.90), "sdpa": row(150.0, 1000.0, 0.905)}
    assert bench.ratios(rows, "sdpa") == {"over": "sdpa", "tokens_per_s": 2.0, "peak_rss_mib": 0.6,
                                          "accuracy_points": -0.5}
    assert bench.ratios(rows, None) is None
