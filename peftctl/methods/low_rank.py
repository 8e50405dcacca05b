"""The low-rank update s·B·A·dropout(x) as one autograd function, shared by LoRA and AdaLoRA.

Two costs of the plain modules (nn.Dropout, then two nn.Linear) on a 16-bit base, measured on a
SmolLM2 step with LoRA on q and v (scripts/bench_kernels.py):
- autograd keeps the fp32 copy of `x` the adapter's matmul reads, and nn.Dropout keeps its fp32
  mask and its fp32 output: three [tokens, hidden] fp32 tensors per adapted layer. Here the
  backward pass keeps `x` as it came (shared by every adapter reading it) and a one-byte mask.
- nn.Dropout draws one Bernoulli sample per element with torch's per-element sampler: about a
  tenth of the whole step on CPU. Here the mask comes from raw 64-bit random words cut into
  16-bit draws (four per word, one generator call per word), so the drop probability is p
  rounded to a multiple of 1/65536 (0.05 → 0.0500031), and the kept values are scaled by the
  exact 1/(1 - that probability), so the update's expectation is unchanged. The draws come from
  torch's default generator, so seeds and checkpointed RNG states govern them as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DRAWS = 1 << 16  # the resolution of one 16-bit draw


def keep_mask(like: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """Which elements of `like` a dropout of probability p keeps (bool, its shape), and 1/(1-p')."""
    dropped = round(p * DRAWS)
    words = torch.empty((like.numel() + 3) // 4, dtype=torch.int64, device=like.device)
    words.random_(-(1 << 63), None)  # every one of the 64 bits uniform (from=min, to=None: the full range)
    draws = words.view(torch.int16)[: like.numel()].view(like.shape)
    # A draw is uniform over [-32768, 32767]: it falls below the threshold with probability dropped/65536.
    return draws >= dropped - DRAWS // 2, DRAWS / (DRAWS - dropped)


def low_rank_update(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                    dropout: nn.Module) -> torch.Tensor:
    """s·B·A·dropout(x) in the adapter's precision, `dropout` an nn.Dropout or nn.Identity."""
    if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
        keep, keep_scale = keep_mask(x, dropout.p)
        # 1/(1-p) moves from x to the output: (s/(1-p))·B·A·(x⊙keep) is the same update.
        return LowRankUpdate.apply(x, a, b, scaling * keep_scale, keep)
    return LowRankUpdate.apply(x, a, b, scaling, None)


def add_update(result: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """result + update as peft adds them: in the wider dtype (fp32 for a 16-bit base), rounded to
    result's once; a cast of the update first would round twice. In place where autograd allows it
    (one pass, no new tensor, nn.Linear's output): not into a view, which GPT-2's Conv1D and
    bitsandbytes' 4-bit matmul return. The base layers (nn.Linear, Conv1D, bitsandbytes') keep
    their inputs for backward, not their output."""
    if result._is_view():
        return torch.add(result, update).to(result.dtype)
    return result.add_(update)


class LowRankUpdate(torch.autograd.Function):
    """(s·x'·Aᵀ)·Bᵀ with x' = x where `keep` (all of x without a mask), in the adapter's precision.

    The backward pass rebuilds x' and its fp32 copy from `x` and `keep`, one layer at a time; the
    masking and the bf16 → fp32 copy are exact, so the arithmetic is autograd's own but for where
    s multiplies (fp32 rounding).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                keep: torch.Tensor | None) -> torch.Tensor:
        kept = _kept(x, keep)
        # s scales the r-wide x'·Aᵀ, not the [tokens, out] result: the same product, a fraction of the work.
        xa = F.linear(kept.to(a.dtype), a) * scaling
        ctx.save_for_backward(x, a, b, xa, keep)
        ctx.scaling = scaling
        return F.linear(xa, b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, a, b, xa, keep = ctx.saved_tensors
        kept = _kept(x, keep)
        grad = grad.flatten(0, -2)
        grad_b = grad.T @ xa.flatten(0, -2) if ctx.needs_input_grad[2] else None
        grad_xa = (grad @ b) * ctx.scaling
        grad_a = grad_xa.T @ kept.flatten(0, -2).to(a.dtype) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_xa @ a).to(x.dtype).view(x.shape)
            grad_x = _kept(grad_x, keep)
        return grad_x, grad_a, grad_b, None, None


# Integer types of the float types' widths, for masking by bits.
_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _kept(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """x where the mask keeps it, else +0: one definition, so the backward pass rebuilds exactly
    what the forward pass multiplied.

    As a bitwise AND of x's bits with all-ones or all-zeros words: the same values as
    torch.where(keep, x, 0), which on CPU took ~1 ms per [512, 576] bf16 tensor (about 4% of a
    SmolLM2 step), this ~0.25 ms."""
    if keep is None:
        return x
    bits = _BITS.get(x.element_size()) if x.is_floating_point() else None
    if bits is None:
        return torch.where(keep, x, 0)
    return (x.view(bits) & keep.to(bits).neg_()).view(x.dtype)
