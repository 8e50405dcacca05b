"""An example as every task's data ends up: token ids and what the model learns from them.

For a causal LM `labels` holds the token each position should predict (IGNORE where nothing is
learnt); for a classifier, its class index; for seq2seq, the target's token ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

IGNORE = -100  # label of tokens that carry no loss


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


# Batch widths are rounded up to a multiple of this. Every new batch shape makes the CPU's matmul
# library (oneDNN) build and keep new kernels for each of the model's weight shapes: ~9 ms and
# ~1 MiB of memory that is never returned, per shape and weight, which over a SmolLM2 run added
# ~140 MiB to the peak RSS. Rounding to 16 leaves a few shapes for the whole run, for under 16
# padding tokens a row (transformers' collators offer the same, pad_to_multiple_of, for GPUs).
WIDTH_MULTIPLE = 16


def padded_width(lengths: Iterable[int], multiple: int) -> int:
    return -(-max(lengths) // multiple) * multiple
