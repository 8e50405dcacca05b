"""A run's sample replies: the first `output.samples` validation rows answered greedily by the
base model and by base + adapter, for <output>/generations.jsonl and the run report.

The base answers before the method goes on the model: no method's adapter can be taken off
again exactly (scores.evaluate_adapters says why), and loading the base a second time would
cost as much as the run's own load. Replies are greedy (no random draw: the run's seeds and
results are the same with or without samples) and stop at EOS or after MAX_NEW_TOKENS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftctl.core import jsontext
from peftctl.core.files import atomic_write_text, writing
from peftctl.data.tokenize import TokenizedData
from peftctl.eval.scores import generate_reply, paired_generations

# A preview, not an evaluation (`peftctl eval` is that): a base that runs on to the limit costs
# 64 tokens a row, and a one-paragraph reply fits.
MAX_NEW_TOKENS = 64


def sample_rows(data: TokenizedData, fmt: str, count: int) -> list[dict[str, Any]]:
    """The validation rows to answer: none for completion data, which has no prompt to reply to."""
    return [] if fmt == "completion" else data.validation_rows[:count]


def replies(model: nn.Module, tokenizer: Any, rows: list[dict[str, Any]], fmt: str,
            device: torch.device | None = None) -> list[dict[str, Any]]:
    """Greedy replies to `rows`. `device`: where to generate (the run's accelerator) when the
    model is elsewhere; the model goes back to where it was after, so the method is applied to
    it, and its adapter initialised, as without samples."""
    if not rows:
        return []
    home = model.device
    moved = device is not None and torch.device(device) != home
    if moved:
        model.to(device)
    was_training = model.training
    model.eval()  # no dropout: the replies are the model's own, and draw nothing from the RNGs
    try:
        return [generate_reply(model, tokenizer, row, fmt, max_new_tokens=MAX_NEW_TOKENS) for row in rows]
    finally:
        model.train(was_training)
        if moved:
            model.to(home)


def write_generations(path: Path, base: list[dict[str, Any]], adapter: list[dict[str, Any]]) -> None:
    """One JSON object per row, as `peftctl eval --json` gives them: prompt, reference, the
    adapter's reply (`generated`) and the base's (`base`), each with whether it stopped at EOS."""
    with writing(path, "the sample replies"):
        atomic_write_text(path, "".join(jsontext.dumps(row) + "\n" for row in paired_generations(base, adapter)))
