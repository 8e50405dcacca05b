"""The model as the training loop runs it, and back as the rest of peftctl uses it.

`prepare_model` makes every change training wants on the model in one place: gradient
checkpointing, the attention kernel (`train.attention`), whether batches may be packed
(`data.packing`, probed on the model so changed), fused RMSNorm kernels where they compute the
same and element-wise work recomputed in the backward pass instead of kept (`fused.py`) and
`torch.compile` (`train.compile`). What it returns says what it chose and
undoes the changes later use of the model would notice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from peftctl.train import attention

from peftctl.train import fused
from peftctl.model import loading as model_loading
from peftctl.data.tokenize import TokenizedData, collate
from peftctl.core.errors import UserError
from peftctl.train.loss import packing_problem, probing
from peftctl.recipe.schema import TrainSpec

# Longer rows than this train faster with the fused (sdpa) kernel than with eager attention on CPU.
EAGER_MAX_ROW = 512


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
    previous = _use_attention(model, loss_model, spec, data, pad_id, device)
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


def _use_attention(model: nn.Module, loss_model: nn.Module, spec: TrainSpec, data: TokenizedData, pad_id: int,
                   device: torch.device) -> str | None:
    """Switch the model to the attention kernel `spec.attention` picks; returns the one to restore.

    'auto' on CPU with short rows is eager attention, as peftctl's grouped kernel
    (attention.py) where it gives this model bit-identical logits on a training row, else
    transformers' own."""
    current = getattr(model.config, "_attn_implementation", None)
    wanted = spec.attention
    if wanted == "auto":
        longest = data.max_seq_len if data.packing and data.max_seq_len else max(len(e.input_ids) for e in data.train)
        wanted = auto_attention(current, longest, torch.cuda.is_available())
        if wanted == "eager" and hasattr(model, "set_attn_implementation"):
            wanted = _grouped_if_same(model, loss_model, data, pad_id, device)
    if current is None or wanted == current or not hasattr(model, "set_attn_implementation"):
        return None
    model.set_attn_implementation(wanted)
    return current


def auto_attention(current: str | None, longest_row: int, cuda: bool) -> str | None:
    """What `train.attention: auto` picks before its probe: eager on CPU for rows up to
    EAGER_MAX_ROW tokens (then peftctl's grouped kernel where it matches), else the model's own.
    plan/memory_plan.py sizes the activations from the same rule."""
    return "eager" if not cuda and longest_row <= EAGER_MAX_ROW else current


def _grouped_if_same(model: nn.Module, loss_model: nn.Module, data: TokenizedData, pad_id: int,
                     device: torch.device) -> str:
    """peftctl's grouped eager kernel if its per-token losses on a training row are eager's, bit for bit."""
    batch = {k: v.to(device) for k, v in collate(data.train[:1], pad_id).items()}
    previous, losses = model.config._attn_implementation, []
    with probing(loss_model) as module:
        try:
            for kernel in ("eager", attention.register()):
                model.set_attn_implementation(kernel)
                losses.append(module(**batch, per_token=True))
        except Exception:  # noqa: BLE001 - a model whose attention the grouped kernel cannot take
            losses = []
        finally:
            model.set_attn_implementation(previous)
    return attention.NAME if len(losses) == 2 and torch.equal(*losses) else "eager"


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
