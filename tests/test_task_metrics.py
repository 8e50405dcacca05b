"""The task metrics against hand-computed cases (which hold without scikit-learn), against
scikit-learn where it is installed, and ROUGE offline; the confusion-matrix picture as a PNG."""

import json
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from peftctl.eval.task_metrics import classification_scores, seq2seq_scores

ROOT = Path(__file__).resolve().parent.parent


def test_classification_by_hand_with_a_class_never_predicted():
    # confusion (gold down, predicted across): a [1 1 0], b [0 2 0], c [2 0 0]
    scores = classification_scores([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 0], ["a", "b", "c"])
    assert scores.confusion == [[1, 1, 0], [0, 2, 0], [2, 0, 0]]
    assert scores.accuracy == 0.5 and scores.rows == 6
    a, b, c = scores.per_class
    assert (a.precision, a.recall, a.f1, a.support) == pytest.approx((1 / 3, 1 / 2, 0.4, 2))
    assert (b.precision, b.recall, b.f1, b.support) == pytest.approx((2 / 3, 1.0, 0.8, 2))
    assert (c.precision, c.recall, c.f1, c.support) == (0.0, 0.0, 0.0, 2)  # never predicted: 0, not NaN
    assert scores.macro_f1 == pytest.approx(0.4)


def test_macro_f1_leaves_out_a_class_that_neither_side_names():
    scores = classification_scores([0, 1, 1], [0, 1, 0], ["a", "b", "unseen"])
    assert scores.per_class[2] == type(scores.per_class[2])("unseen", 0.0, 0.0, 0.0, 0)
    # a: P 1/2, R 1, F1 2/3; b: P 1, R 1/2, F1 2/3; "unseen" is not averaged in
    assert scores.macro_f1 == pytest.approx(2 / 3)
    assert scores.accuracy == pytest.approx(2 / 3)


def test_classification_scores_serialise_to_json():
    scores = classification_scores([0, 1], [1, 1], ["no", "yes"])
    again = json.loads(json.dumps(asdict(scores)))
    assert again["per_class"][1] == {"label": "yes", "precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3),
                                     "support": 1}
    assert again["confusion"] == [[0, 1], [0, 1]] and again["labels"] == ["no", "yes"]


@pytest.mark.parametrize(("gold", "predicted", "labels", "problem"), [
    ([0, 1], [0], ["a", "b"], "2 gold rows but 1 predictions"),
    ([], [], ["a"], "no rows"),
    ([0, 2], [0, 0], ["a", "b"], r"label indices \[2\] are outside the 2 labels"),
])
def test_mismatched_inputs_are_refused(gold, predicted, labels, problem):
    with pytest.raises(ValueError, match=problem):
        classification_scores(gold, predicted, labels)


@pytest.mark.parametrize("seed", range(5))
def test_classification_matches_scikit_learn(seed):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(seed)
    labels = [f"class{i}" for i in range(rng.randint(2, 6))]
    gold = [rng.randrange(len(labels)) for _ in range(rng.randint(1, 40))]
    # mostly right, and some classes never predicted at all
    predicted = [g if rng.random() < 0.6 else rng.randrange(len(labels) - 1) for g in gold]
    scores = classification_scores(gold, predicted, labels)
    everyone = list(range(len(labels)))
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        gold, predicted, labels=everyone, zero_division=0)
    assert [c.precision for c in scores.per_class] == pytest.approx(list(precision))
    assert [c.recall for c in scores.per_class] == pytest.approx(list(recall))
    assert [c.f1 for c in scores.per_class] == pytest.approx(list(f1))
    assert [c.support for c in scores.per_class] == list(support)
    assert scores.macro_f1 == pytest.approx(metrics.f1_score(gold, predicted, average="macro", zero_division=0))
    assert scores.accuracy == pytest.approx(metrics.accuracy_score(gold, predicted))
    assert scores.confusion == metrics.confusion_matrix(gold, predicted, labels=everyone).tolist()


def test_rouge_by_hand():
    # reference 6 tokens, prediction its first 3: unigrams P 1, R 1/2; bigrams 2 of 5; LCS 3
    scores = seq2seq_scores(["The cat sat on the mat."], ["the cat sat"])
    assert scores.rouge1 == pytest.approx(2 / 3)
    assert scores.rouge2 == pytest.approx(2 * 1 * 0.4 / 1.4)
    assert scores.rouge_l == pytest.approx(2 / 3)
    assert scores.exact_match == 0.0
    # the same words in reverse order: every unigram, no bigram, a longest common subsequence of 1
    reversed_words = seq2seq_scores(["one two three four"], ["four three two one"])
    assert (reversed_words.rouge1, reversed_words.rouge2, reversed_words.rouge_l) == pytest.approx((1.0, 0.0, 0.25))


def test_rouge_stems_and_averages_over_rows():
    scores = seq2seq_scores(["cats running", "one two three four"], ["cat runs", "four three two one"])
    # Porter stemming: cats/cat -> cat, running/runs -> run, so row 1 scores 1 throughout
    assert (scores.rouge1, scores.rouge2, scores.rouge_l) == pytest.approx((1.0, 0.5, 0.625))
    assert scores.rows == 2


def test_exact_match_normalises_whitespace_only():
    scores = seq2seq_scores(["a  b\n", "A b", "x"], [" a b", "a b", "x"])
    assert scores.exact_match == pytest.approx(2 / 3)  # case counts; spacing does not


def test_rouge_needs_no_network_and_no_nltk_data(tmp_path):
    """A fresh process with every connection refused and an empty NLTK data path scores with
    stemming on: rouge-score's three scores need neither (only rougeLsum's sentence splitter would)."""
    script = """
import json, socket, sys
def refuse(*args, **kwargs):
    raise OSError("network used")
socket.socket.connect = socket.create_connection = refuse
from dataclasses import asdict
from peftctl.eval.task_metrics import seq2seq_scores
print(json.dumps(asdict(seq2seq_scores(["the cats were running"], ["the cat runs"]))))
"""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "NLTK_DATA": str(tmp_path), "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    scores = json.loads(done.stdout)
    # stems: "the cat were run" / "the cat run": unigrams P 1, R 3/4; bigrams "the cat" of 2 and of 3
    assert scores["rouge1"] == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert scores["rouge2"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))


def test_confusion_figure_writes_a_png(tmp_path):
    from peftctl.report import plots

    path = tmp_path / "confusion.png"
    scores = classification_scores([0, 0, 1, 2], [0, 1, 1, 0], ["text processing", "networking", "math"])
    plots.write_png(plots.confusion_figure(scores.confusion, scores.labels), path)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000
    assert "networking" in plots.svg(plots.confusion_figure(scores.confusion, scores.labels), "confusion")
