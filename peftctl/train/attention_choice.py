"""Which attention kernel a run trains with: the one decision `train` makes and `plan` counts.

`train.attention` names a kernel (transformers' `eager`, `sdpa`, ...) or `auto`. `auto` is eager
attention on a CPU for rows up to EAGER_MAX_ROW tokens (shorter rows train faster eager than fused
there), and the model's own kernel otherwise (SDPA on GPUs and for long rows). Where `auto` says
eager, training takes peftctl's grouped eager kernel (attention.py) if it gives this model's
per-token losses on a training row bit for bit (`grouped_if_same`), else transformers' eager;
`plan` counts the grouped kernel's activations, which is what a model it matches keeps.
"""

from __future__ import annotations

import torch
from torch import nn

from peftctl.data.tokenize import TokenizedData, collate
from peftctl.train import attention
from peftctl.train.loss import probing

# Longer rows than this train faster with the fused (sdpa) kernel than with eager attention on CPU.
EAGER_MAX_ROW = 512


def auto_kernel(current: str | None, longest_row: int, cuda: bool) -> str | None:
    """What `auto` picks before the probe: eager on a CPU for rows up to EAGER_MAX_ROW tokens, else
    `current` (the model's own kernel)."""
    return "eager" if not cuda and longest_row <= EAGER_MAX_ROW else current


def planned_kernel(wanted: str, current: str | None, max_seq_len: int, cuda: bool) -> str:
    """The kernel `plan` counts activations for: `wanted` (train.attention), with `auto` resolved
    as training resolves it on rows `max_seq_len` long (eager as peftctl's grouped kernel)."""
    current = current or "sdpa"
    if wanted != "auto":
        return wanted
    chosen = auto_kernel(current, max_seq_len, cuda)
    return attention.NAME if chosen == "eager" else chosen


def use_attention(model: nn.Module, loss_model: nn.Module, wanted: str, data: TokenizedData, pad_id: int,
                  device: torch.device) -> str | None:
    """Switch `model` to the kernel `wanted` (train.attention) picks for `data`; returns the one to
    restore, or None when unchanged."""
    current = getattr(model.config, "_attn_implementation", None)
    if wanted == "auto" and data.task != "causal_lm":
        # Eager was measured faster on CPU for decoders' short rows only; MiniLM classifying 36-token
        # rows in bf16 ran a step ~1.7x faster with its own sdpa than eager.
        return None
    if wanted == "auto":
        longest = data.max_seq_len if data.packing and data.max_seq_len else max(len(e.input_ids) for e in data.train)
        wanted = auto_kernel(current, longest, torch.cuda.is_available())
        # The grouped kernel is probed on a causal LM's per-token losses; other tasks take transformers' eager.
        if wanted == "eager" and data.task == "causal_lm" and hasattr(model, "set_attn_implementation"):
            wanted = grouped_if_same(model, loss_model, data, pad_id, device)
    if current is None or wanted == current or not hasattr(model, "set_attn_implementation"):
        return None
    model.set_attn_implementation(wanted)
    return current


def grouped_if_same(model: nn.Module, loss_model: nn.Module, data: TokenizedData, pad_id: int,
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
