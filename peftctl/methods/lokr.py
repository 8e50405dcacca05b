"""LoKr, low-rank Kronecker product (Yeh et al., 2023; LyCORIS), as peft's `LOKR`.

A frozen linear layer W [out, in] gains ΔW = (W1 ⊗ W2) · alpha/r. The dimensions are split as
peft splits them, out = a·b and in = c·d with each pair near a square root (`factorization`),
so W1 is [a, c] and W2 [b, d]: a few thousand weights for a layer of a million. W2 is a rank-r
product W2a·W2b when r is below half its larger side, and W1 too with `decompose_both`; else
each is one full matrix. peft's init makes W1 (or W1a) zero, so training starts from the base
model exactly; 'lycoris' zeroes W2 (or W2b) instead. Names and shapes are peft's (`lokr_w1`,
`lokr_w1_a`, `lokr_w1_b`, `lokr_w2`, `lokr_w2_a`, `lokr_w2_b`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from peftctl.methods.lycoris import LycorisLinear, LycorisMethod, LycorisOptions, kaiming_


class LokrConfig(LycorisOptions):
    name: Literal["lokr"] = Field(description="LoKr: a Kronecker product of two small matrices on linear layers.")
    r: int = Field(8, gt=0, description="Rank of W2 = W2a·W2b (and of W1 with decompose_both), used only while r "
                   "is below half the factor's larger side; above that the factor is one full matrix.")
    decompose_both: bool = Field(
        False, description="Also make the left Kronecker factor W1 a rank-r product (when r is below half its larger side).")
    decompose_factor: int = Field(
        -1, ge=-1, description="How each dimension d splits into m·n: m is this number where it divides d, else "
        "the largest divisor of d up to it and up to √d; -1: the divisor pair nearest √d (peft's default).")
    rank_dropout_scale: bool = Field(False, description="Rescale the rows rank_dropout keeps so that their mean is 1.")
    init_weights: bool | Literal["lycoris"] = Field(
        True, description="true: W1 starts at zero, so the adapter starts as the base model (peft's default); "
        "'lycoris': W2 starts at zero instead (the LyCORIS repository's init); false: every factor random (for tests).")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """peft's split of `dimension` into m ≤ n with m·n = dimension (LyCORIS's algorithm).

    With a factor > 0 that divides it: (factor, dimension / factor). Otherwise m walks up the
    divisors of `dimension` while m < n and m ≤ factor (no bound for -1): the divisor pair
    nearest the square root, or the nearest one the bound allows.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        next_m = m + 1
        while dimension % next_m:
            next_m += 1
        if next_m > bound:
            break
        m, n = next_m, dimension // next_m
    return min(m, n), max(m, n)


LOKR_FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


class LokrLinear(LycorisLinear):
    def __init__(self, base_layer: nn.Module, cfg: LokrConfig):
        super().__init__(base_layer, cfg)
        in_m, in_n = factorization(self.in_features, cfg.decompose_factor)
        out_l, out_k = factorization(self.out_features, cfg.decompose_factor)
        r = cfg.r
        for name in LOKR_FACTORS:  # each is a parameter or None, so the absent ones are no keys
            self.register_parameter(name, None)
        if cfg.decompose_both and r < max(out_l, in_m) / 2:
            self.lokr_w1_a, self.lokr_w1_b = self.factor(out_l, r), self.factor(r, in_m)
        else:
            self.lokr_w1 = self.factor(out_l, in_m)
        if r < max(out_k, in_n) / 2:
            self.lokr_w2_a, self.lokr_w2_b = self.factor(out_k, r), self.factor(r, in_n)
        else:
            self.lokr_w2 = self.factor(out_k, in_n)
        for factor in self.parameters(recurse=False):
            kaiming_(factor)
        # The factor that starts at zero, so that the product does: W1's first for peft, W2's last for LyCORIS.
        zero = {True: self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a,
                "lycoris": self.lokr_w2 if self.lokr_w2 is not None else self.lokr_w2_b}.get(cfg.init_weights)
        if zero is not None:
            nn.init.zeros_(zero)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W1 [a, c] and W2 [b, d]: out = a·b, in = c·d."""
        w1 = self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if self.lokr_w2 is not None else self.lokr_w2_a @ self.lokr_w2_b
        return w1, w2

    def delta_weight(self) -> torch.Tensor:
        w1, w2 = self.factors()
        return torch.kron(w1, w2) * self.scaling

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        # (W1 ⊗ W2)·x = vec(W1 · X · W2ᵀ) with X the input as a [c, d] matrix: the [out, in]
        # product is never made, and a token costs c·d·b + a·c·b multiply-adds instead of a·b·c·d.
        w1, w2 = self.factors()
        grid = x.reshape(*x.shape[:-1], w1.shape[1], w2.shape[1])
        return (w1 @ (grid @ w2.T)).flatten(-2) * self.scaling


class LoKr(LycorisMethod):
    name = "lokr"
    Config = LokrConfig
    Layer = LokrLinear
    peft_type = "LOKR"
    own_peft_fields = {"decompose_both": False, "decompose_factor": -1, "rank_dropout_scale": False}
    examples = {"lokr": {"r": 4}, "lokr-decomposed": {"r": 2, "decompose_both": True}}
    comparable_options = {"r": "low-rank rank", "alpha": "low-rank alpha", "target_modules": "linear layers"}


METHOD = LoKr()
