"""The shipped text-classification data (recipes/data/classify/) is what scripts/make_classify_data.py
makes, byte for byte, and keeps its promises: balanced classes, short texts, no text in both splits."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "recipes" / "data" / "classify"
LABELS = {"text", "files", "networking", "math", "data_structures", "concurrency"}


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the script reads CPython 3.11's docstrings")
def test_the_script_reproduces_the_committed_files(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_classify_data.py"), "--out-dir", str(tmp_path)],
                   check=True, capture_output=True, cwd=tmp_path)
    for name in ("train.jsonl", "validation.jsonl"):
        assert (tmp_path / "classify" / name).read_bytes() == (DATA / name).read_bytes(), name


def test_the_classes_are_balanced_and_the_splits_apart():
    train, validation = read("train.jsonl"), read("validation.jsonl")
    assert Counter(row["label"] for row in train) == dict.fromkeys(LABELS, 80)
    assert Counter(row["label"] for row in validation) == dict.fromkeys(LABELS, 20)
    assert all(set(row) == {"text", "label"} and 0 < len(row["text"]) <= 300 for row in train + validation)
    texts = [row["text"] for row in train + validation]
    assert len(set(texts)) == len(texts)
    # the modules' names are masked: none stands in a text as code
    assert not any(name in text for text in texts for name in ("asyncio.", "shutil.", "os.path", "heapq."))
