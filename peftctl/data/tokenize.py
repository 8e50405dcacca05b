"""Training data: rows in (rows.py reads them), token ids with loss masks out.

Every row becomes a conversation (alpaca rows are one user turn and one assistant turn) rendered
with the tokenizer's chat template, or plain text for the completion format. Labels are -100 on
prompt tokens unless `train_on_inputs`, so only responses are learned; every response ends with
EOS so the model learns to stop. Each assistant turn of a multi-turn chat is learned, not only
the last. A classifier's and a seq2seq model's rows go through task_examples.py instead, and are
batched by its collate functions (`collate_for`).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from peftctl.core.errors import UserError
from peftctl.data import task_examples
from peftctl.data.examples import IGNORE, WIDTH_MULTIPLE, Example, padded_width
from peftctl.data.rows import alpaca_prompt, read_source
from peftctl.recipe.schema import DataSpec


@dataclass
class TokenizedData:
    train: list[Example]
    validation: list[Example]
    dropped: int  # rows whose prompt filled max_seq_len, leaving no response token to learn
    packing: bool | Literal["auto"] = False  # DataSpec.packing: how the loop lays out training batches
    max_seq_len: int | None = None  # the longest packed row; None: the longest example
    # The validation rows as read (the format's fields): prompts for the run's sample replies.
    validation_rows: list[dict[str, Any]] = field(default_factory=list)
    task: str = "causal_lm"  # the recipe's task: how examples are batched (`collate_for`) and scored
    labels: tuple[str, ...] = ()  # a classifier's label names, in the order of its outputs


def load_data(spec: DataSpec, tokenizer: PreTrainedTokenizerBase, seed: int, task: str = "causal_lm") -> TokenizedData:
    train_rows = read_source(spec.train, spec)
    if isinstance(spec.validation, (str, Path)):
        val_rows = read_source(spec.validation, spec, key="data.validation", split=spec.validation_split)
    elif isinstance(spec.validation, float):
        random.Random(seed).shuffle(train_rows)
        held_out = max(1, round(len(train_rows) * spec.validation))
        if held_out >= len(train_rows):
            raise UserError(f"validation fraction {spec.validation} leaves no training rows",
                            where="data.validation", file=spec.train)
        val_rows, train_rows = train_rows[:held_out], train_rows[held_out:]
    else:
        val_rows = []
    if task != "causal_lm":
        return _task_data(spec, tokenizer, task, train_rows, val_rows)
    train, dropped_train = tokenize_rows(train_rows, spec, tokenizer)
    validation, dropped_val = tokenize_rows(val_rows, spec, tokenizer)
    if not train:
        raise UserError("no training row has a response token left after truncation",
                        file=spec.train, where="data.max_seq_len", fix="raise data.max_seq_len")
    return TokenizedData(train, validation, dropped_train + dropped_val, spec.packing, spec.max_seq_len, val_rows)


def _task_data(spec: DataSpec, tokenizer: PreTrainedTokenizerBase, task: str, train_rows: list[dict[str, Any]],
               val_rows: list[dict[str, Any]]) -> TokenizedData:
    """A classifier's or a seq2seq model's examples (task_examples.py): every row trains, none is dropped."""
    labels: tuple[str, ...] = ()
    if task == "sequence_classification":
        # A fraction held out of the same file: its labels are the file's (a rare class may land
        # only in the held-out part), so no held-out row is refused for a label training lacks.
        held_out_of_train = isinstance(spec.validation, float)
        labels = task_examples.label_names(train_rows + (val_rows if held_out_of_train else []), spec)
        val_file = spec.validation if isinstance(spec.validation, (str, Path)) else spec.train
        train = task_examples.classification_examples(train_rows, spec, tokenizer, labels, spec.train)
        validation = task_examples.classification_examples(val_rows, spec, tokenizer, labels, val_file)
    else:
        train = task_examples.seq2seq_examples(train_rows, spec, tokenizer)
        validation = task_examples.seq2seq_examples(val_rows, spec, tokenizer)
    return TokenizedData(train, validation, 0, False, spec.max_seq_len, val_rows, task, labels)


def collate_for(task: str) -> Callable[[list[Example], int], dict[str, torch.Tensor]]:
    """How a task's examples become a padded batch."""
    return {"sequence_classification": task_examples.collate_classification,
            "seq2seq": task_examples.collate_seq2seq}.get(task, collate)


# --- tokenizing ---------------------------------------------------------------------------------


def tokenize_rows(rows: list[dict[str, Any]], spec: DataSpec, tokenizer: PreTrainedTokenizerBase) -> tuple[list[Example], int]:
    examples, dropped = [], 0
    for row in rows:
        example = tokenize_row(row, spec, tokenizer)
        if example.trained_tokens == 0:
            dropped += 1
        else:
            examples.append(example)
    return examples, dropped


def tokenize_row(row: dict[str, Any], spec: DataSpec, tokenizer: PreTrainedTokenizerBase) -> Example:
    if spec.format == "completion":
        ids = _encode(tokenizer, row["text"]) + [tokenizer.eos_token_id]
        example = Example(ids, list(ids))
    else:
        example = tokenize_chat(to_messages(row, spec.format), tokenizer, spec.train_on_inputs)
    return Example(example.input_ids[: spec.max_seq_len], example.labels[: spec.max_seq_len])


def to_messages(row: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    if fmt == "chat":
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    return [{"role": "user", "content": alpaca_prompt(row)}, {"role": "assistant", "content": row["output"]}]


def tokenize_chat(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, train_on_inputs: bool) -> Example:
    """Render the conversation turn by turn, masking everything but the assistant's replies.

    The text before each assistant reply (earlier turns and the reply's header) comes from the
    template with `add_generation_prompt`, the reply from the template's next rendering, so the
    masks follow whatever layout the template uses.
    """
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:turn], generation_prompt=True)
        full = _render(tokenizer, messages[: turn + 1], generation_prompt=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise UserError("the tokenizer's chat template does not render turns incrementally, so "
                            "prompt and response tokens cannot be told apart", where="model.name_or_path")
        prompt_ids = _encode(tokenizer, prompt[len(rendered):])
        reply_ids = _encode(tokenizer, full[len(prompt):])
        if tokenizer.eos_token_id not in reply_ids:
            reply_ids.append(tokenizer.eos_token_id)
        ids += prompt_ids + reply_ids
        labels += (prompt_ids if train_on_inputs else [IGNORE] * len(prompt_ids)) + reply_ids
        rendered = full
    return Example(ids, labels)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """The token ids of a conversation up to the assistant's next turn, in the model's chat template,
    as training renders the text before each reply: what generation (eval, chat, serve) feeds."""
    return _encode(tokenizer, _render(tokenizer, messages, generation_prompt=True))


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- batching -----------------------------------------------------------------------------------


def batches(examples: list[Example], batch_size: int, pad_id: int, shuffle_seed: int | None = None,
            group_by_length: bool = False, pack_len: int | None = None,
            task: str = "causal_lm") -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches; shuffled with `shuffle_seed` (a new order for each epoch's seed).

    `group_by_length` (needs a seed) sorts each run of 50 batches' worth of shuffled examples by
    length before cutting it into batches, then shuffles the batches: each batch holds examples
    of similar length, so little of it is padding, while the order of batches stays random.
    `pack_len` packs each batch's examples into fewer rows of at most that many tokens (see
    `pack`): the same examples per batch, less padding. `task` says how a batch is laid out.
    """
    order = list(range(len(examples)))
    rng = random.Random(shuffle_seed)
    if shuffle_seed is not None:
        rng.shuffle(order)
    chunks = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if group_by_length and shuffle_seed is not None:
        span = 50 * batch_size
        chunks = []
        for start in range(0, len(order), span):
            run = sorted(order[start : start + span], key=lambda i: len(examples[i].input_ids), reverse=True)
            chunks += [run[at : at + batch_size] for at in range(0, len(run), batch_size)]
        rng.shuffle(chunks)
    for chunk in chunks:
        group = [examples[i] for i in chunk]
        yield collate_packed(pack(group, pack_len), pad_id) if pack_len else collate_for(task)(group, pad_id)


def epochs_of_batches(examples: list[Example], batch_size: int, pad_id: int, seed: int, group_by_length: bool = False,
                      pack_len: int | None = None, start: int = 0,
                      task: str = "causal_lm") -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches (`batches`), a fresh order each epoch (seed + epoch), from the `start`-th on.

    An epoch's order depends only on its seed, so a resumed run skips whole epochs without
    building them, and the batches before `start` in its epoch are built and dropped (no
    tokenising: the examples are already token ids).
    """
    position = stream_position(start, len(examples), batch_size)
    epoch, skip = position["epoch"], position["epoch_micro_batch"]
    while True:
        epoch_batches = batches(examples, batch_size, pad_id, shuffle_seed=seed + epoch,
                                group_by_length=group_by_length, pack_len=pack_len, task=task)
        yield from itertools.islice(epoch_batches, skip, None)
        epoch, skip = epoch + 1, 0


def stream_position(consumed: int, examples: int, batch_size: int) -> dict[str, int]:
    """Where `epochs_of_batches` is after `consumed` batches: the epoch, and the batch in it."""
    epoch, micro_batch = divmod(consumed, math.ceil(examples / batch_size))
    return {"micro_batches": consumed, "epoch": epoch, "epoch_micro_batch": micro_batch}


def collate(examples: list[Example], pad_id: int, multiple: int = WIDTH_MULTIPLE) -> dict[str, torch.Tensor]:
    width = padded_width((len(e.input_ids) for e in examples), multiple)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# Attention costs every token of a row in proportion to the row's length; packing weighs a row of
# w tokens as w·(1 + w/ATTENTION_SPAN) tokens of work, so it prefers a few shorter rows to one
# long one. 1024: measured on SmolLM2-135M on CPU, where one 512-token row costs about as much
# as two 256-token rows plus a third.
ATTENTION_SPAN = 1024


def pack(examples: list[Example], max_len: int) -> list[list[Example]]:
    """The examples spread over rows of at most `max_len` tokens, for the least work.

    For each row count k, longest example first into the shortest row (LPT); of the layouts
    whose rows fit, the one with the least k·w·(1 + w/ATTENTION_SPAN) for its longest row w
    (ties: more, shorter rows). k = len(examples) is plain batching, so packing never does more
    work than it by this measure.
    """
    ordered = sorted(examples, key=lambda e: len(e.input_ids), reverse=True)
    max_len = max(max_len, len(ordered[0].input_ids))
    best, best_cost = None, math.inf
    for k in range(1, len(ordered) + 1):
        rows: list[list[Example]] = [[] for _ in range(k)]
        sizes = [(0, row) for row in range(k)]  # a heap: the shortest row first
        for example in ordered:
            size, row = heapq.heappop(sizes)
            rows[row].append(example)
            heapq.heappush(sizes, (size + len(example.input_ids), row))
        width = max(size for size, _ in sizes)
        cost = k * width * (1 + width / ATTENTION_SPAN)
        if width <= max_len and cost <= best_cost:
            best, best_cost = rows, cost
    return best


def collate_packed(rows: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of several examples each, kept apart: positions restart at 0 for every example.

    transformers reads restarting `position_ids` (with no `attention_mask`) as packed sequences
    and masks attention between them; the loop checks the model does before it trains this way.
    An example's first label is dropped: there it would be the target of the previous
    example's last token, and unpacked it is never a target. `attention_mask` marks the real
    tokens, for counting; it is not given to the model.
    """
    width = padded_width((sum(len(e.input_ids) for e in row) for row in rows), WIDTH_MULTIPLE)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for row, examples in enumerate(rows):
        at = 0
        for example in examples:
            n = len(example.input_ids)
            input_ids[row, at : at + n] = torch.tensor(example.input_ids)
            labels[row, at + 1 : at + n] = torch.tensor(example.labels[1:])
            attention_mask[row, at : at + n] = 1
            position_ids[row, at : at + n] = torch.arange(n)
            at += n
        # Padding is a sequence of its own at the end: no real token can attend to it.
        position_ids[row, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}
