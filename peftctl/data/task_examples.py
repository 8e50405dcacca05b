"""Rows of the classification and seq2seq tasks as token ids, and their batches.

A classification row becomes its text (and text pair) encoded as the model's own tokenizer pairs
them, with special tokens ([CLS] ... [SEP] for BERT), and one label: the index of its label name.
Label names are the recipe's `data.labels`, or those the training rows use, sorted, so a run's
classes always come in the same order. A seq2seq row becomes its source (the encoder's input)
and its target (what the decoder learns, every token of it, ending in the tokenizer's EOS).
Examples keep tokenize.py's shape: `labels` holds the class index (one value), or the target ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from peftctl.core.errors import UserError
from peftctl.data.examples import IGNORE, WIDTH_MULTIPLE, Example, padded_width
from peftctl.data.rows import alpaca_prompt
from peftctl.recipe.schema import DataSpec


def label_names(rows: list[dict[str, Any]], spec: DataSpec) -> tuple[str, ...]:
    """The classifier's labels in output order: `data.labels`, or the training rows' labels sorted
    (integer labels: '0' to the largest, so that index i is label i)."""
    if spec.labels is not None:
        return tuple(spec.labels)
    found = {row["label"] for row in rows}
    if all(isinstance(label, int) for label in found):
        return tuple(str(i) for i in range(max(found) + 1))
    if any(isinstance(label, int) for label in found):
        raise UserError("the training rows mix label names and integer labels", file=spec.train, where="data.labels",
                        fix="use names throughout, or integers with data.labels naming them in order")
    if len(found) < 2:
        raise UserError(f"the training rows use only one label ({next(iter(found))!r}): nothing to tell apart",
                        file=spec.train, expected="rows of at least two labels")
    return tuple(sorted(found))


def label_index(label: str | int, names: tuple[str, ...], file: Path | str, place: str) -> int:
    """A row's label as the index of its class; a label outside `names` is an error naming the row."""
    if isinstance(label, int):
        if label < len(names):
            return label
        problem = f"label {label} is outside the {len(names)} labels (0 to {len(names) - 1})"
    elif label in names:
        return names.index(label)
    else:
        problem = f"label {label!r} is not one the training rows use"
    raise UserError(problem, file=file, where=place, expected=f"one of: {', '.join(names)}",
                    fix="fix the row, or name every label in data.labels")


def classification_examples(rows: list[dict[str, Any]], spec: DataSpec, tokenizer: Any, names: tuple[str, ...],
                            file: Path | str) -> list[Example]:
    examples = []
    for number, row in enumerate(rows, start=1):
        ids = tokenizer(row["text"], row.get("text_pair") or None, truncation=True,
                        max_length=spec.max_seq_len)["input_ids"]
        examples.append(Example(ids, [label_index(row["label"], names, file, f"row {number}")]))
    return examples


def seq2seq_examples(rows: list[dict[str, Any]], spec: DataSpec, tokenizer: Any) -> list[Example]:
    examples = []
    for row in rows:
        source, target = seq2seq_pair(row)
        ids = tokenizer(source, truncation=True, max_length=spec.max_seq_len)["input_ids"]
        target_ids = tokenizer(text_target=target, truncation=True, max_length=spec.max_seq_len)["input_ids"]
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in target_ids[-1:]:
            target_ids = target_ids[: spec.max_seq_len - 1] + [tokenizer.eos_token_id]  # the model learns to stop
        examples.append(Example(ids, target_ids))
    return examples


def seq2seq_pair(row: dict[str, Any]) -> tuple[str, str]:
    """A row's source and target; an alpaca row's source is its instruction and input."""
    if "source" in row:
        return row["source"], row["target"]
    return alpaca_prompt(row), row["output"]


def _padded(rows: list[list[int]], fill: int, multiple: int = WIDTH_MULTIPLE) -> torch.Tensor:
    out = torch.full((len(rows), padded_width((len(r) for r in rows), multiple)), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _inputs(examples: list[Example], pad_id: int, multiple: int = WIDTH_MULTIPLE) -> dict[str, torch.Tensor]:
    input_ids = _padded([e.input_ids for e in examples], pad_id, multiple)
    mask = _padded([[1] * len(e.input_ids) for e in examples], 0, multiple)
    return {"input_ids": input_ids, "attention_mask": mask}


def collate_classification(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Texts padded to the batch's longest row, and one class index per row (labels [batch]).

    Not rounded up to WIDTH_MULTIPLE: a classifier's rows are short (the classify quickstart's
    average 16 tokens), where rounding made 23% more positions than the longest row."""
    labels = torch.tensor([e.labels[0] for e in examples], dtype=torch.long)
    return {**_inputs(examples, pad_id, multiple=1), "labels": labels}


def collate_seq2seq(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Padded sources, and the targets padded with IGNORE to their own width."""
    return {**_inputs(examples, pad_id), "labels": _padded([e.labels for e in examples], IGNORE)}
