"""What LoHa and LoKr share, the LyCORIS methods as peft implements them (`tuners/lycoris_utils.py`).

Both add to a frozen linear layer W an update ΔW of its full shape [out, in], built from a few
small factors and scaled by alpha / r: y = W x + ΔW x. They differ only in how the factors make
ΔW (a Hadamard product of two low-rank products for LoHa, a Kronecker product for LoKr), so this
file holds the rest: the options both have, the layer's forward pass with peft's two training-only
dropouts, the merge (W + ΔW, which is exact), and the adapter_config.json plumbing.

peft's LyCORIS layers take torch's nn.Linear (and convolutions) only. peftctl also adapts GPT-2's
Conv1D (the same update on the transposed weight), which peft refuses to load; and peft's
delta reshapes to the stored weight's shape, which fails on a 4-bit base, where peftctl's works.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from peftctl.arch.layers import dense_weight, linear_shape
from peftctl.core.errors import UserError
from peftctl.methods.base import (
    Adapter,
    AllLinear,
    BaseFacts,
    MethodConfig,
    WrappedLinear,
    WrappingMethod,
    exported_targets,
    match_targets,
    reject_unsupported,
    suffix_list_from_peft,
)


class LycorisOptions(MethodConfig):
    """The options LoHa and LoKr share (each adds its `name` and its own)."""

    r: int = Field(8, gt=0, description="Rank of the low-rank factors; trainable weights grow linearly with it.")
    alpha: float = Field(8, gt=0, description="Scale numerator: the update is multiplied by alpha/r (peft's default alpha is 8).")
    rank_dropout: float = Field(
        0.0, ge=0, lt=1,
        description="During training, the probability of dropping each output row of the update (peft's rank_dropout).")
    module_dropout: float = Field(
        0.0, ge=0, lt=1,
        description="During training, the probability of skipping a layer's whole update for a step (peft's module_dropout).")
    use_effective_conv2d: bool = Field(
        False, description="peft's extra decomposition for convolution kernels; peftctl adapts linear layers only, "
        "so it must stay false.")
    target_modules: list[str] | AllLinear = Field(
        "all-linear",
        description="Linear layers to adapt: module-name suffixes such as [q_proj, v_proj] (GPT-2: [c_attn]), "
        "or 'all-linear' for every linear layer except the output head. peft cannot load LyCORIS adapters on "
        "GPT-2's Conv1D layers; peftctl trains, reloads and merges them.",
    )


def kaiming_(tensor: torch.Tensor) -> None:
    """peft's (and nn.Linear's) initialisation of every non-zero factor."""
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


def rank_dropout_mask(size: int, p: float, rescale: bool, device: torch.device) -> torch.Tensor:
    """peft's rank dropout: keep each output row with probability 1 - p, optionally rescaled to mean 1.

    peft divides by the mask's mean, which is NaN when every row is dropped; then nothing is added.
    """
    keep = (torch.rand(size) > p).to(device=device, dtype=torch.float32)
    return keep / keep.mean().clamp_min(1 / size) if rescale else keep


class LycorisLinear(WrappedLinear):
    """A frozen linear layer (nn.Linear, GPT-2's Conv1D or a quantized one) plus a LyCORIS update.

    Subclasses create their factors and say what they make: `delta_weight()` (ΔW [out, in],
    scaled) and, where it is cheaper than ΔW x, `delta_output(x)`.
    """

    def __init__(self, base_layer: nn.Module, cfg: LycorisOptions):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        self.scaling = cfg.alpha / cfg.r
        self.rank_dropout = cfg.rank_dropout
        self.module_dropout = cfg.module_dropout
        # Whether rank dropout rescales the rows it keeps: LoHa always (it has no option), LoKr when asked.
        self.rescales_rank_dropout = getattr(cfg, "rank_dropout_scale", True)
        self.train(base_layer.training)  # an adapter loaded into an eval-mode model drops nothing

    def factor(self, *shape: int) -> nn.Parameter:
        # Trainable factors stay in fp32 whatever the base's precision, so AdamW's updates are exact.
        return nn.Parameter(torch.empty(shape, device=self.base_layer.weight.device, dtype=torch.float32))

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def delta_output(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.delta_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        # peft's module dropout skips this layer's update for the step. peft draws for it on every
        # training step (p = 0 too), then for rank dropout: the same draws, in the same order, make
        # a training step here equal to peft's under the same seed.
        if self.training and float(torch.rand(1)) <= self.module_dropout:
            return result
        update = self.delta_output(x.to(torch.float32))
        if self.training and self.rank_dropout:
            update = update * rank_dropout_mask(self.out_features, self.rank_dropout,
                                                self.rescales_rank_dropout, update.device)
        return result + update.to(result.dtype)

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """The base layer with ΔW added to its weight."""
        merged = dense_weight(self.base_layer).to(torch.float32) + self.delta_weight()
        merged = merged.T if self.fan_in_fan_out else merged
        self.base_layer.weight.copy_(merged.to(self.base_layer.weight.dtype))
        return self.base_layer


class LycorisMethod(WrappingMethod):
    """LoHa or LoKr: selection, wrapping and peft's config fields, given the layer class."""

    Layer: ClassVar[type[LycorisLinear]]
    # The method's own adapter_config.json fields (beyond the shared ones), with peft's defaults.
    own_peft_fields: ClassVar[dict[str, Any]] = {}

    def select(self, model: nn.Module, cfg: LycorisOptions, base: BaseFacts) -> dict[str, nn.Module]:
        if cfg.use_effective_conv2d:
            raise UserError("use_effective_conv2d only changes convolution layers, and peftctl adapts linear layers only",
                            where="use_effective_conv2d", expected="false", fix="remove the option")
        targets = match_targets(model, cfg.target_modules)
        if not targets:  # 'all-linear' on a model without linear layers
            raise UserError(f"this model has no linear layers for {self.name} to adapt", where="target_modules",
                            expected="a transformer with nn.Linear or Conv1D projection layers")
        return targets

    def wrap(self, module: nn.Module, cfg: LycorisOptions, name: str, applied) -> nn.Module:
        return self.Layer(module, cfg)

    def peft_config(self, adapter: Adapter) -> dict[str, Any]:
        cfg: LycorisOptions = adapter.cfg
        return {
            "r": cfg.r,
            "alpha": int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha,
            "rank_dropout": cfg.rank_dropout,
            "module_dropout": cfg.module_dropout,
            "target_modules": exported_targets(adapter),
            "init_weights": cfg.init_weights,
            "use_effective_conv2d": False,
            **self.own_fields_to_peft(cfg),
        }

    def own_fields_to_peft(self, cfg: LycorisOptions) -> dict[str, Any]:
        return {key: getattr(cfg, key) for key in self.own_peft_fields}

    def config_from_peft(self, peft_config: dict[str, Any], source: str) -> LycorisOptions:
        reject_unsupported(peft_config, {"rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
                                         "layers_pattern": None, "modules_to_save": None, "exclude_modules": None},
                           source)
        targets = suffix_list_from_peft(peft_config.get("target_modules"), source)
        # use_effective_conv2d is not read: on linear layers peft computes the same update either way.
        return self.Config(
            name=self.name,
            r=peft_config.get("r", 8),
            alpha=peft_config.get("alpha", 8),
            rank_dropout=peft_config.get("rank_dropout", 0.0),
            module_dropout=peft_config.get("module_dropout", 0.0),
            target_modules=targets if targets is not None else [],
            init_weights=peft_config.get("init_weights", True),
            **{key: peft_config.get(key, default) for key, default in self.own_peft_fields.items()},
        )
