"""Held-out scores of a classifier and of a seq2seq model, base or adapted (scores.py: causal LM).

A classifier is scored on every row: the mean cross-entropy of its logits, and from its argmax
predictions accuracy, macro-F1, each class's precision and recall and the confusion matrix
(task_metrics.py). A base's classification head is new and untrained, so its figures are those
of chance: the comparison says what the head and adapter learnt, not what the base knew.
A seq2seq model is scored by its loss and token accuracy over the target tokens (teacher forcing,
as in training), then by greedy generations for every row: ROUGE-1/2/L and exact match against
the targets; the first `samples` rows' generations are kept for display.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftctl.data.examples import Example
from peftctl.data.task_examples import seq2seq_pair
from peftctl.data.tokenize import batches
from peftctl.eval.task_metrics import classification_scores, seq2seq_scores
from peftctl.train.task_losses import ClassificationLoss, Seq2SeqLoss

# Generations are as long as the longest target plus this, at most MAX_NEW_TOKENS.
SLACK_TOKENS, MAX_NEW_TOKENS = 16, 256


@torch.no_grad()
def score_classifier(model: nn.Module, pad_id: int, examples: list[Example], labels: tuple[str, ...],
                     batch_size: int = 16) -> dict[str, Any]:
    """The classifier's loss and scores on `examples` (their labels are class indices into `labels`)."""
    model.eval()
    classifier = ClassificationLoss(model)
    gold, predicted, total = [], [], 0.0
    for batch in batches(examples, batch_size, pad_id, task="sequence_classification"):
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = classifier.logits(batch["input_ids"], batch["attention_mask"]).float()
        total += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
        gold += batch["labels"].tolist()
        predicted += logits.argmax(-1).tolist()
    scores = classification_scores(gold, predicted, list(labels))
    return {"loss": total / max(len(gold), 1), "accuracy": scores.accuracy, "macro_f1": scores.macro_f1,
            "details": asdict(scores)}


@torch.no_grad()
def score_seq2seq(model: nn.Module, tokenizer: Any, examples: list[Example], rows: list[dict[str, Any]],
                  samples: int, batch_size: int = 8) -> dict[str, Any]:
    """The seq2seq model's target-token loss and accuracy, and its greedy generations' ROUGE and exact match."""
    model.eval()
    decoder = Seq2SeqLoss(model)
    total, correct, count = 0.0, 0, 0
    for batch in batches(examples, batch_size, tokenizer.pad_token_id, task="seq2seq"):
        logits, targets = decoder.labelled_logits(**{k: v.to(model.device) for k, v in batch.items()})
        total += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        correct += int((logits.argmax(-1) == targets).sum())
        count += targets.numel()
    generated = _generate(model, tokenizer, examples, batch_size)
    targets = [seq2seq_pair(row)[1] for row in rows]
    scores = seq2seq_scores(targets, [text for text, _ in generated])
    loss = total / max(count, 1)
    shown = [{"prompt": seq2seq_pair(row)[0], "reference": target, "generated": text, "stopped_at_eos": stopped}
             for row, target, (text, stopped) in zip(rows[:samples], targets, generated)]
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "token_accuracy": correct / max(count, 1),
            "exact_match": scores.exact_match, "rouge1": scores.rouge1, "rouge2": scores.rouge2,
            "rouge_l": scores.rouge_l, "generations": shown}


def _generate(model: nn.Module, tokenizer: Any, examples: list[Example], batch_size: int) -> list[tuple[str, bool]]:
    """Each example's greedy output text, in order, and whether it stopped at EOS."""
    limit = min(max(len(e.labels) for e in examples) + SLACK_TOKENS, MAX_NEW_TOKENS)
    out: list[tuple[str, bool]] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = batches(chunk, batch_size, tokenizer.pad_token_id, task="seq2seq")
        inputs = {k: v.to(model.device) for k, v in next(iter(batch)).items() if k != "labels"}
        output = model.generate(**inputs, do_sample=False, max_new_tokens=limit,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for ids in output.tolist():
            ids = ids[1:]  # the decoder's start token
            stopped = tokenizer.eos_token_id in ids
            if stopped:
                ids = ids[: ids.index(tokenizer.eos_token_id)]
            out.append((tokenizer.decode(ids, skip_special_tokens=True).strip(), stopped))
    return out
