"""Eager attention for training on CPUs, without the copies transformers' eager kernel makes.

transformers' `eager` attention repeats each key/value head for every query head of its group
(a copy of K and V per layer), computes the softmax into a new fp32 [batch, heads, rows, rows]
tensor and copies it back to the activations' dtype, and keeps that fp32 tensor for the backward
pass. Here a group's query heads are stacked into one matrix against their shared K and V
(no copy), and the softmax takes and returns the activations' dtype (torch's CPU kernel computes
in fp32 inside, with the same single rounding at the end): the forward pass is bit-identical to
`eager`; the softmax's backward uses the rounded probabilities, so gradients agree to bf16
rounding. Registered with transformers as `peftctl_eager` (with eager's causal mask), chosen by
`train.attention: auto` where eager is (CPU, rows up to 512 tokens) and only after a training row
gave bit-identical losses through both (attention_choice.py): a model whose eager attention does more
(Gemma's softcapping, sinks) keeps transformers' kernel. Attention dropout, per-head masks and
returned attention weights run the model's own eager kernel.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

NAME = "peftctl_eager"


def register() -> str:
    """Make `NAME` an attention implementation transformers knows; returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(NAME, grouped_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)
    return NAME


def grouped_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """transformers' attention-function contract: query [b, heads, rows, d], key/value
    [b, kv_heads, cols, d]; returns ([b, rows, heads, d], None)."""
    batch, heads, rows, dim = query.shape
    kv_heads, cols = key.shape[1], key.shape[2]
    per_mask_head = attention_mask is not None and attention_mask.shape[1] != 1
    if (dropout and module.training) or per_mask_head or heads % kv_heads or kwargs.get("output_attentions"):
        # The model's own eager kernel (its module defines it: softcapping, sinks and all).
        own = sys.modules[type(module).__module__].eager_attention_forward
        return own(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    groups = heads // kv_heads
    stacked = query.reshape(batch, kv_heads, groups * rows, dim)  # a group's heads share their K and V
    # Scale and mask go into the scores in place: neither's backward needs them, and each
    # out-of-place pass wrote a fresh [batch, heads, rows, cols] tensor (~4× the in-place time on CPU).
    scores = torch.matmul(stacked, key.transpose(2, 3)).mul_(scaling).view(batch, kv_heads, groups, rows, cols)
    if attention_mask is not None:
        scores.add_(attention_mask[:, :, None, :, :cols])
    weights = torch.softmax(scores, dim=-1)
    output = torch.matmul(weights.view(batch, kv_heads, groups * rows, cols), value)
    return output.view(batch, heads, rows, dim).transpose(1, 2).contiguous(), None
