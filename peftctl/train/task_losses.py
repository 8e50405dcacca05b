"""The losses of the tasks beside causal LM (loss.py), with the same contract as CausalLMLoss.

Each module runs the model on a batch and returns the summed loss and how many targets it
covered, so the loop averages over every target of an optimizer step whatever the task:
  * a classifier: cross-entropy of its logits against one class per row (the targets are rows);
  * seq2seq: next-token cross-entropy of the decoder over the target's tokens, the decoder fed
    the target shifted right (teacher forcing), as the model's own `labels` argument does.
`loss_module` picks the task's; `labelled` counts a batch's targets before any forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftctl.data.examples import IGNORE
from peftctl.train.loss import CausalLMLoss


class _TaskLoss(nn.Module):
    """A loss module holds the model (accelerate prepares the one module)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


class ClassificationLoss(_TaskLoss):
    """Summed cross-entropy of the classifier's logits, and the number of rows."""

    @staticmethod
    def labelled(batch: dict[str, torch.Tensor]) -> int:
        return int(batch["labels"].numel())

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                per_token: bool = False):
        losses = F.cross_entropy(self.logits(input_ids, attention_mask).float(), labels, reduction="none")
        return losses if per_token else (losses.sum(), labels.numel())


class Seq2SeqLoss(_TaskLoss):
    """Summed cross-entropy of the decoder over the target tokens, and their number."""

    @staticmethod
    def labelled(batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def labelled_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        """The decoder's logits at the target tokens (fed the target shifted right), and those tokens."""
        # The model's own shift (decoder_start_token_id first, IGNORE read as padding).
        decoder_input_ids = self.model.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                            use_cache=False).logits
        keep = labels != IGNORE
        return logits[keep], labels[keep]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                per_token: bool = False):
        logits, targets = self.labelled_logits(input_ids, attention_mask, labels)
        losses = F.cross_entropy(logits.float(), targets, reduction="none")
        return losses if per_token else (losses.sum(), targets.numel())


LOSSES = {"causal_lm": CausalLMLoss, "sequence_classification": ClassificationLoss, "seq2seq": Seq2SeqLoss}


def loss_module(task: str, model: nn.Module) -> nn.Module:
    """The loss module training and validation run `model` through for `task`."""
    return LOSSES[task](model)
