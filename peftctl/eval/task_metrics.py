"""The scores of the non-causal-LM tasks, from predictions already made: pure functions, no model.

Sequence classification (`classification_scores`): accuracy, macro-F1, each class's precision,
recall, F1 and support, and the confusion matrix, from gold and predicted label indices. The
conventions are scikit-learn's with `zero_division=0`, so the numbers match what people check
them against:
  * a class never predicted has precision 0 (not NaN), a class with no gold rows recall 0, and a
    class whose precision and recall are both 0 has F1 0;
  * macro-F1 is the unweighted mean of the F1 of the classes that occur among the gold or the
    predicted labels (scikit-learn's `f1_score(average="macro")` without `labels=`): a class that
    a small evaluation set never mentions does not pull the mean down.

Seq2seq (`seq2seq_scores`): ROUGE-1, ROUGE-2 and ROUGE-L F-measures with Porter stemming, by
Google's `rouge-score` package (the implementation summarization papers report), each averaged
over the rows; and exact match after whitespace normalisation. rouge-score's tokenizer lowercases
and keeps only a-z and 0-9 runs, so a text with neither (non-Latin script, punctuation only)
scores 0; it needs no NLTK data and no network for these three scores.

The results are dataclasses of plain numbers, lists and strings: `dataclasses.asdict` gives JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@dataclass(frozen=True)
class ClassScores:
    label: str
    precision: float
    recall: float
    f1: float
    support: int  # gold rows of this class


@dataclass(frozen=True)
class ClassificationScores:
    rows: int
    accuracy: float
    macro_f1: float
    per_class: list[ClassScores]  # in the order of the label names
    labels: list[str]
    confusion: list[list[int]]  # confusion[gold][predicted]: rows are gold labels, columns predictions


@dataclass(frozen=True)
class Seq2SeqScores:
    rows: int
    rouge1: float  # F-measures, each the mean over rows
    rouge2: float
    rouge_l: float  # rouge-score's "rougeL": the longest common subsequence, over the whole text
    exact_match: float  # the fraction of rows whose prediction equals the reference, whitespace normalised


def classification_scores(gold: Sequence[int], predicted: Sequence[int],
                          labels: Sequence[str]) -> ClassificationScores:
    """Scores of predicted label indices against gold ones; `labels[i]` names index i."""
    _check_pairs(gold, predicted)
    if bad := sorted({i for i in (*gold, *predicted) if not 0 <= i < len(labels)}):
        raise ValueError(f"label indices {bad} are outside the {len(labels)} labels")
    confusion = [[0] * len(labels) for _ in labels]
    for g, p in zip(gold, predicted):
        confusion[g][p] += 1
    per_class = []
    for i, label in enumerate(labels):
        hits = confusion[i][i]
        predicted_as = sum(row[i] for row in confusion)
        support = sum(confusion[i])
        precision = hits / predicted_as if predicted_as else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append(ClassScores(label, precision, recall, f1, support))
    present = set(gold) | set(predicted)
    macro_f1 = sum(per_class[i].f1 for i in present) / len(present)
    accuracy = sum(confusion[i][i] for i in range(len(labels))) / len(gold)
    return ClassificationScores(len(gold), accuracy, macro_f1, per_class, list(labels), confusion)


def seq2seq_scores(references: Sequence[str], predictions: Sequence[str]) -> Seq2SeqScores:
    """ROUGE F-measures and exact match of each prediction against its reference, averaged."""
    _check_pairs(references, predictions)
    from rouge_score import rouge_scorer  # imported here: it pulls in NLTK, which other tasks never need

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    exact = 0
    for reference, prediction in zip(references, predictions):
        scores = scorer.score(reference, prediction)  # rouge-score's order: target first
        for kind in ROUGE_TYPES:
            totals[kind] += scores[kind].fmeasure
        exact += " ".join(reference.split()) == " ".join(prediction.split())
    rows = len(references)
    return Seq2SeqScores(rows, *(totals[kind] / rows for kind in ROUGE_TYPES), exact / rows)


def _check_pairs(gold: Sequence, predicted: Sequence) -> None:
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold rows but {len(predicted)} predictions")
    if not gold:
        raise ValueError("no rows to score")
