"""What training bought: held-out loss, perplexity, token accuracy and generations, base vs adapter.

Loss, perplexity and accuracy are over response tokens only (the same masking as training).
Generations are greedy, stop at the tokenizer's EOS, and are scored against the reference
response by exact match (after stripping surrounding whitespace) and by token F1: the overlap of
their bags of words after SQuAD's answer normalisation (lower case, punctuation and the English
articles a / an / the removed), so "Paris." and "paris" score 1.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftctl.arch.tasks import TaskHead
from peftctl.core.errors import UserError
from peftctl.data.tokenize import Example, batches, chat_prompt, to_messages
from peftctl.eval.task_scores import score_classifier, score_seq2seq
from peftctl.model.loading import base_facts
from peftctl.train.loss import CausalLMLoss


@dataclass
class Scores:
    loss: float
    perplexity: float | None  # None for a classifier (one target per row: no sequence to be perplexed by)
    token_accuracy: float | None
    exact_match: float | None = None
    token_f1: float | None = None
    generations: list[dict[str, str]] = field(default_factory=list)
    # A classifier's (task_scores.py): accuracy and macro-F1, with per-class figures and the confusion
    # matrix in `details`; a seq2seq model's ROUGE F-measures. None where the task has none.
    accuracy: float | None = None
    macro_f1: float | None = None
    rouge1: float | None = None
    rouge2: float | None = None
    rouge_l: float | None = None
    details: dict[str, Any] | None = None

    TASK_FIGURES = ("accuracy", "macro_f1", "rouge1", "rouge2", "rouge_l")

    def figures(self) -> dict[str, Any]:
        """The scalar figures; another task's figures are left out rather than shown as null."""
        return {k: v for k, v in self.__dict__.items() if k not in ("generations", "details")
                and not (k in self.TASK_FIGURES and v is None)}


@torch.no_grad()
def score(model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[Example],
          rows: list[dict[str, Any]], fmt: str, samples: int, batch_size: int = 8) -> Scores:
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    loss_model = CausalLMLoss(model)
    for batch in batches(sorted(examples, key=lambda e: len(e.input_ids)), batch_size, tokenizer.pad_token_id):
        logits, targets = loss_model.labelled_logits(**batch)
        total_loss += float(torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum"))
        correct += int((logits.argmax(-1) == targets).sum())
        count += targets.numel()
    loss = total_loss / max(count, 1)
    scores = Scores(loss=loss, perplexity=math.exp(min(loss, 50)), token_accuracy=correct / max(count, 1))
    if samples and fmt != "completion":
        scores.generations = [generate_reply(model, tokenizer, row, fmt) for row in rows[:samples]]
        scores.exact_match = sum(g["generated"].strip() == g["reference"].strip() for g in scores.generations) / len(scores.generations)
        scores.token_f1 = sum(token_f1(g["generated"], g["reference"]) for g in scores.generations) / len(scores.generations)
    return scores


def generate_reply(model: nn.Module, tokenizer: PreTrainedTokenizerBase, row: dict[str, Any], fmt: str,
                   max_new_tokens: int = 128) -> dict[str, Any]:
    """Greedy reply to the row's prompt (everything before its last assistant turn)."""
    messages = to_messages(row, fmt)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    input_ids = torch.tensor([chat_prompt(tokenizer, messages[:last])], device=model.device)
    output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                            max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    new_tokens = output[0, input_ids.shape[1]:].tolist()
    stopped = tokenizer.eos_token_id in new_tokens
    if stopped:
        new_tokens = new_tokens[: new_tokens.index(tokenizer.eos_token_id)]
    return {"prompt": messages[last - 1]["content"], "reference": messages[last]["content"],
            "generated": tokenizer.decode(new_tokens, skip_special_tokens=True), "stopped_at_eos": stopped}


def paired_generations(base: list[dict[str, Any]], adapter: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's reply by base + adapter (`generated`) with the base's beside it (`base`): the
    rows of `peftctl eval --json`'s generations and of a run's generations.jsonl."""
    return [{**a, "base": b["generated"], "base_stopped_at_eos": b["stopped_at_eos"]} for a, b in zip(adapter, base)]


def answer_words(text: str) -> list[str]:
    """The words of an answer under SQuAD's normalisation (its evaluation script's, Rajpurkar et al. 2016)."""
    text = "".join(c for c in text.lower() if c not in string.punctuation and not unicodedata.category(c).startswith("P"))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = answer_words(prediction), answer_words(reference)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if not predicted or not expected or overlap == 0:
        return float(predicted == expected)
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


@dataclass
class EvalReport:
    adapter_dir: Path
    data_file: Path
    rows: int
    base: Scores
    adapter: Scores

    def as_dict(self) -> dict[str, Any]:
        found = {"adapter_dir": str(self.adapter_dir), "data": str(self.data_file), "rows": self.rows,
                 "base": self.base.figures(), "adapter": self.adapter.figures(),
                 "generations": paired_generations(self.base.generations, self.adapter.generations)}
        if self.adapter.details is not None:  # a classifier's per-class figures and confusion matrices
            found["base"]["classes"], found["adapter"]["classes"] = self.base.details, self.adapter.details
        return found


@dataclass
class ComparisonReport:
    """Several adapters of one base scored on the same rows, beside the base."""

    adapter_dirs: list[Path]
    data_file: Path
    rows: int
    base: Scores
    adapters: list[Scores]

    def as_dict(self) -> dict[str, Any]:
        generations = [{"prompt": base["prompt"], "reference": base["reference"], "base": base["generated"],
                        "base_stopped_at_eos": base["stopped_at_eos"],
                        "adapters": [{"adapter_dir": str(folder), "generated": scores.generations[i]["generated"],
                                      "stopped_at_eos": scores.generations[i]["stopped_at_eos"]}
                                     for folder, scores in zip(self.adapter_dirs, self.adapters)]}
                       for i, base in enumerate(self.base.generations)]
        return {"data": str(self.data_file), "rows": self.rows, "base": self.base.figures(),
                "adapters": [{"adapter_dir": str(folder), **scores.figures()}
                             for folder, scores in zip(self.adapter_dirs, self.adapters)],
                "generations": generations}


def evaluate_adapter(adapter_dir: Path, data_file: Path, fmt: str, samples: int, max_seq_len: int = 1024,
                     base: str | None = None, trust_remote_code: bool = False) -> EvalReport:
    """Score the base model, then the same model with the adapter, on the same rows."""
    report = evaluate_adapters([adapter_dir], data_file, fmt, samples, max_seq_len, base, trust_remote_code)
    return EvalReport(Path(adapter_dir), report.data_file, report.rows, report.base, report.adapters[0])


def evaluate_adapters(adapter_dirs: list[Path], data_file: Path, fmt: str, samples: int, max_seq_len: int = 1024,
                      base: str | None = None, trust_remote_code: bool = False) -> ComparisonReport:
    """Score the base model once, then the base with each adapter, on the same rows.

    The first adapter is applied to the model the base was scored with; each further one to a
    fresh load of the base. There is no way to take any method's adapter off again exactly:
    some change the base itself (PiSSA/OLoRA move part of each weight into the adapter, BitFit
    can create biases), so reloading is what is exact for every method.
    """
    from peftctl.export.adapter_base import check_same_base
    from peftctl.export.adapter_files import load_adapter
    from peftctl.model.loading import load_model

    adapter_dirs = [Path(folder) for folder in adapter_dirs]
    check_same_base(adapter_dirs, "be evaluated on one base model", named=base is None)
    held = held_out_rows(adapter_dirs, data_file, fmt, max_seq_len, base, trust_remote_code)
    torch.manual_seed(0)  # a classifier's untrained head: the same draw for base and adapter (then replaced)
    model = load_model(held.spec, held.head)
    base_scores = held.score(model, samples)
    adapter_scores = []
    for i, folder in enumerate(adapter_dirs):
        if i:
            model = None  # the previous adapter's model is let go before the next base loads
            model = load_model(held.spec, held.head)
        load_adapter(model, folder)
        adapter_scores.append(held.score(model, samples))
    return ComparisonReport(adapter_dirs, Path(data_file), len(held.examples), base_scores, adapter_scores)


@dataclass
class HeldOut:
    """Held-out rows ready to score on one base model: its spec, its tokenizer, the rows and their tokens."""

    spec: Any
    tokenizer: PreTrainedTokenizerBase
    rows: list[dict[str, Any]]
    examples: list[Example]
    fmt: str
    head: TaskHead = TaskHead()  # the task the adapters were trained for, a classifier's labels

    def score(self, model: nn.Module, samples: int) -> Scores:
        if self.head.task == "sequence_classification":
            found = score_classifier(model, self.tokenizer.pad_token_id, self.examples, self.head.labels)
            return Scores(perplexity=None, token_accuracy=None, **found)
        if self.head.task == "seq2seq":
            return Scores(**score_seq2seq(model, self.tokenizer, self.examples, self.rows, samples))
        return score(model, self.tokenizer, self.examples, self.rows, self.fmt, samples)


def held_out_rows(adapter_dirs: list[Path], data_file: Path, fmt: str, max_seq_len: int = 1024,
                  base: str | None = None, trust_remote_code: bool = False) -> HeldOut:
    """The rows of `data_file` tokenized for the adapters' base model (`base`: another), after
    checking each adapter against a weightless copy of it: a foreign or mismatched adapter fails
    before any weights load."""
    from peftctl.data.rows import read_rows
    from peftctl.data.task_examples import classification_examples, seq2seq_examples
    from peftctl.data.tokenize import tokenize_rows
    from peftctl.export.adapter_base import base_model_spec
    from peftctl.export.adapter_files import adapter_head, load_adapter
    from peftctl.model.loading import load_skeleton, load_tokenizer
    from peftctl.recipe.schema import DataSpec

    spec = base_model_spec(adapter_dirs[0], base, trust_remote_code)
    head = adapter_head(adapter_dirs[0])
    for folder in adapter_dirs:
        if (own := adapter_head(folder)) != head:
            raise UserError(f"its task or labels ({own}) differ from {adapter_dirs[0]}'s ({head})",
                            file=folder, fix="evaluate adapters of one task and one set of labels together")
        load_adapter(load_skeleton(spec, head), folder, base_facts(spec))
    tokenizer = load_tokenizer(spec, head.task)
    rows = read_rows(data_file, fmt, key="--data")
    data_spec = DataSpec(train=data_file, format=fmt, max_seq_len=max_seq_len)
    if head.task == "sequence_classification":
        examples = classification_examples(rows, data_spec, tokenizer, head.labels, data_file)
    elif head.task == "seq2seq":
        examples = seq2seq_examples(rows, data_spec, tokenizer)
    else:
        examples, _ = tokenize_rows(rows, data_spec, tokenizer)
    return HeldOut(spec, tokenizer, rows, examples, fmt, head)
