"""The model as the training loop runs it, and back as the rest of peftctl uses it.

`prepare_model` makes every change training wants on the model in one place: gradient
checkpointing, the attention kernel (`train.attention`, as attention_choice.py decides), whether
batches may be packed (`data.packing`, probed on the model so changed), fused RMSNorm kernels
where they compute the same and element-wise work recomputed in the backward pass instead of kept
(`fused.py`) and `torch.compile` (`train.compile`). What it returns says what it chose and undoes
the changes later use of the model would notice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from peftctl.core.errors import UserError
from peftctl.data.tokenize import TokenizedData
from peftctl.model import loading as model_loading
from peftctl.recipe.schema import TrainSpec
from peftctl.train import fused
from peftctl.train.attention_choice import use_attention
from peftctl.train.loss import packing_problem

@dataclass
class PreparedModel:
    """What `prepare_model` chose, and how to put the model back."""

    model: nn.Module
    attention: str | None  # the attention kernel it trains with
    pack_len: int | None  # the longest packed row, or None when batches are padded
    padding_reason: str | None  # why packing 'auto' padded instead, if it did
    previous_attention: str | None = None  # the kernel to switch back to; None when unchanged
    compiled: list[nn.Module] = field(default_factory=list)
    fused_norms: list[nn.Module] = field(default_factory=list)  # RMSNorms running torch's fused kernel
    recomputed_mlps: list[nn.Module] = field(default_factory=list)  # gated MLPs keeping only gate and up

    def undo(self) -> None:
        """Back to eager forwards and the model's own attention kernel, for export and generation.

        Gradient checkpointing stays on: it only acts on forwards that record gradients in
        training mode, and a model trained with it still says so (`is_gradient_checkpointing`).
        Calling this twice does nothing more.
        """
        fused.unfuse(self.fused_norms + self.recomputed_mlps)
        self.fused_norms, self.recomputed_mlps = [], []
        for module in self.compiled:
            # nn.Module.compile() has no public inverse: it only sets this attribute.
            module._compiled_call_impl = None
        self.compiled = []
        if self.previous_attention is not None:
            self.model.set_attn_implementation(self.previous_attention)
            self.previous_attention = None


def prepare_model(model: nn.Module, loss_model: nn.Module, spec: TrainSpec, data: TokenizedData, pad_id: int,
                  device: torch.device) -> PreparedModel:
    """Change `model` for training as `spec` and `data` ask; `loss_model` is its loss module as
    accelerate prepared it, on which packing is probed before anything is compiled."""
    if spec.gradient_checkpointing:
        model_loading.enable_gradient_checkpointing(model)
    previous = use_attention(model, loss_model, spec.attention, data, pad_id, device)
    pack_len, padding_reason = _pack_len(loss_model, data, pad_id, device)
    prepared = PreparedModel(model, getattr(model.config, "_attn_implementation", None), pack_len, padding_reason,
                             previous_attention=previous)
    # Before compiling: the graphs hold these forwards. Under gradient checkpointing the layer's
    # forward is recomputed whole, so recomputing its parts again would only cost time.
    recompute = not spec.gradient_checkpointing
    prepared.fused_norms = fused.fuse_rms_norms(model, recompute)
    prepared.recomputed_mlps = fused.recompute_gated_mlps(model) if recompute else []
    if spec.compile:
        prepared.compiled = _compile(model)
    return prepared


def _pack_len(loss_model: nn.Module, data: TokenizedData, pad_id: int, device: torch.device) -> tuple[int | None, str | None]:
    """The longest packed row when batches are packed (DataSpec.packing), else None; and why
    'auto' chose padding, if it did (said once, in the run's summary)."""
    if not data.packing or len(data.train) < 2:
        return None, None
    problem = packing_problem(loss_model, data.train, pad_id, device)
    if problem is None:
        # Packed rows carry no attention mask by design: transformers' warning that the input
        # "may be padded" without one would only mislead.
        logging.getLogger("transformers.modeling_utils").addFilter(_drop_padding_warning)
        return data.max_seq_len or max(len(e.input_ids) for e in data.train), None
    if data.packing is True:
        raise UserError(f"batches cannot be packed for this model and method: {problem}", where="data.packing",
                        fix="set data.packing: false (or auto, which falls back to padding)")
    return None, problem


def _drop_padding_warning(record: logging.LogRecord) -> bool:
    return "may be padded" not in record.getMessage()


def _compile(model: nn.Module) -> list[nn.Module]:
    """torch.compile each repeated block (decoder layer) of the model, or the whole decoder.

    The blocks share one compiled graph (same code, parameters passed as inputs), so compiling
    takes as long as for one block, not one per layer.
    """
    blocks = model_loading.transformer_blocks(model) or [model.base_model]
    for block in blocks:
        block.compile(dynamic=True)
    return blocks
