"""LoHa, low-rank Hadamard product (FedPara, Hyeon-Woo et al., 2022; LyCORIS), as peft's `LOHA`.

A frozen linear layer W gains ΔW = (W1a·W1b) ⊙ (W2a·W2b) · alpha/r, the elementwise product of
two rank-r products, whose rank can reach r² for the weights of two rank-r LoRAs. W1a, W1b and
W2a start Kaiming-uniform and W2b at zero (peft's init), so training starts from the base model
exactly. The factors are stored in peft's shapes and names (`hada_w1_a` [out, r], `hada_w1_b`
[r, in], `hada_w2_a`, `hada_w2_b`), so our parameter names are the keys peft saves.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from peftctl.methods.base import BaseFacts, within_rank
from peftctl.methods.lycoris import LycorisLinear, LycorisMethod, LycorisOptions, kaiming_


class LohaConfig(LycorisOptions):
    name: Literal["loha"] = Field(description="LoHa: a Hadamard product of two low-rank updates on linear layers.")
    init_weights: bool = Field(
        True, description="true: W2b starts at zero, so the adapter starts as the base model (peft's default); "
        "false: every factor random (for tests).")


class HadamardProduct(torch.autograd.Function):
    """(W1a·W1b) ⊙ (W2a·W2b) · s, keeping only the factors for the backward pass.

    Plain autograd would keep both [out, in] products for it; they are made again instead (as
    peft's HadaWeight does), so training holds one [out, in] tensor per layer, not three.
    """

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, scaling: float) -> torch.Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.scaling = scaling
        return (w1a @ w1b) * (w2a @ w2b) * scaling

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        grad = grad * ctx.scaling
        through_first = grad * (w2a @ w2b)  # ∂/∂(W1a·W1b)
        through_second = grad * (w1a @ w1b)
        return (through_first @ w1b.T, w1a.T @ through_first,
                through_second @ w2b.T, w2a.T @ through_second, None)


class LohaLinear(LycorisLinear):
    def __init__(self, base_layer: nn.Module, cfg: LohaConfig):
        super().__init__(base_layer, cfg)
        out_features, in_features, r = self.out_features, self.in_features, cfg.r
        self.hada_w1_a = self.factor(out_features, r)
        self.hada_w1_b = self.factor(r, in_features)
        self.hada_w2_a = self.factor(out_features, r)
        self.hada_w2_b = self.factor(r, in_features)
        for factor in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b):
            kaiming_(factor)
        if cfg.init_weights:
            nn.init.zeros_(self.hada_w2_b)  # one zero factor makes the whole product zero

    def delta_weight(self) -> torch.Tensor:
        return HadamardProduct.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scaling)


class LoHa(LycorisMethod):
    name = "loha"
    Config = LohaConfig
    Layer = LohaLinear
    peft_type = "LOHA"
    examples = {"loha": {"r": 4}}
    comparable_options = {"r": "low-rank rank", "alpha": "low-rank alpha", "target_modules": "linear layers"}

    def select(self, model: nn.Module, cfg: LohaConfig, base: BaseFacts) -> dict[str, nn.Module]:
        return within_rank(super().select(model, cfg, base), cfg.r, cfg.target_modules, usual="4-32")


METHOD = LoHa()
