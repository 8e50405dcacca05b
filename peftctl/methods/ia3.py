"""(IA)³, "Infused Adapter by Inhibiting and Amplifying Inner Activations" (Liu et al., 2022).

Each targeted linear layer gains one learned vector l that rescales an activation elementwise:
its output, y = l ⊙ (W x + b), or, for the feed-forward layers the paper names, its input,
y = W (l ⊙ x) + b. l starts at 1, so training starts from the base model exactly. The vector is
stored in peft's shape, [out, 1] for output scaling and [1, in] for input scaling, so our
parameter names and shapes are the keys peft saves (`<path>.ia3_l`). Both forms are linear in
the weights, so merging folds l into W's rows (output; the bias is scaled too, since it is part
of the scaled output) or columns (input; the bias is untouched).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from peftctl.arch.architectures import IA3_DEFAULTS
from peftctl.arch.layers import dense_weight, linear_shape
from peftctl.core.errors import UserError
from peftctl.methods.base import (
    Adapter,
    AllLinear,
    Applied,
    BaseFacts,
    MethodConfig,
    WrappedLinear,
    WrappingMethod,
    match_targets,
    reject_unsupported,
    suffix_list_from_peft,
)
from peftctl.methods.peft_names import peft_names


class IA3Config(MethodConfig):
    name: Literal["ia3"] = Field(description="(IA)³: a learned scaling vector on each targeted linear layer.")
    target_modules: list[str] | AllLinear | None = Field(
        None,
        description="Linear layers to scale: module-name suffixes such as [k_proj, v_proj, down_proj] "
        "(GPT-2: [c_attn, mlp.c_proj]), or 'all-linear' for every linear layer except the output head. "
        f"Omit for the paper's choice on known architectures ({', '.join(IA3_DEFAULTS)}).",
    )
    feedforward_modules: list[str] | None = Field(
        None,
        description="Targeted layers whose input is scaled (a vector of in_features) instead of their "
        "output (out_features), e.g. [down_proj]; each must name targeted layers only. Omit for the "
        "architecture's feed-forward output layer where it is targeted (as peft); [] scales every output.",
    )


class IA3Linear(WrappedLinear):
    """A frozen linear layer (nn.Linear or GPT-2's Conv1D) with its input or output rescaled."""

    def __init__(self, base_layer: nn.Module, feedforward: bool):
        super().__init__()
        self.base_layer = base_layer
        in_features, out_features, self.fan_in_fan_out = linear_shape(base_layer)
        self.feedforward = feedforward
        shape = (1, in_features) if feedforward else (out_features, 1)
        # fp32 whatever the base's precision, so AdamW's small updates to values near 1 are not lost.
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base_layer.weight.device, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scale in fp32, then return to the activations' dtype (peft's order of operations).
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype))
        result = self.base_layer(x)
        return (result * scale).to(result.dtype)

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """The base layer with the vector folded into its weight (and bias, for output scaling)."""
        layer, scale = self.base_layer, self.ia3_l.flatten()
        weight = dense_weight(layer).to(torch.float32)  # [out, in]
        merged = weight * scale[None, :] if self.feedforward else weight * scale[:, None]
        layer.weight.copy_((merged.T if self.fan_in_fan_out else merged).to(layer.weight.dtype))
        if not self.feedforward and layer.bias is not None:
            layer.bias.copy_((layer.bias.to(torch.float32) * scale).to(layer.bias.dtype))
        return layer


@dataclass
class IA3Applied(Applied):
    feedforward: list[str] = field(default_factory=list)  # the targets whose input is scaled
    module_names: list[str] = field(default_factory=list)  # every module name as peft will see it (no wrappers), for export


class IA3(WrappingMethod):
    name = "ia3"
    Config = IA3Config
    peft_type = "IA3"
    examples = {"ia3": {}}
    suggested_lr = 5e-3
    lr_source = ("peft's method comparison (MetaMathQA, Llama-3.2-3B): (IA)³ at 5e-3; T-Few (Liu et al., 2022): "
                 "3e-3 with Adafactor")

    def select(self, model: nn.Module, cfg: IA3Config, base: BaseFacts) -> dict[str, nn.Module]:
        return match_targets(model, resolved_targets(model, cfg))

    def record(self, model: nn.Module, cfg: IA3Config, selected: dict[str, nn.Module]) -> IA3Applied:
        applied = super().record(model, cfg, selected)
        feedforward = feedforward_layers(model, cfg, selected)
        return IA3Applied(applied.targets, applied.fan_in_fan_out, [n for n in selected if n in feedforward],
                          [n for n, _ in model.named_modules()])

    def wrap(self, module: nn.Module, cfg: IA3Config, name: str, applied: IA3Applied) -> nn.Module:
        return IA3Linear(module, name in applied.feedforward)

    def peft_config(self, adapter: Adapter) -> dict[str, Any]:
        # Written as resolved name lists, never null or 'all-linear', so the adapter means the same
        # layers to any peft version and does not depend on our architecture table.
        applied: IA3Applied = adapter.applied
        feedforward = set(applied.feedforward)
        others = {n for n in applied.targets if n not in feedforward}
        feedforward_names = peft_names(feedforward, applied.module_names, applied.targets)
        return {
            "target_modules": sorted(set(peft_names(others, applied.module_names)) | set(feedforward_names)),
            "feedforward_modules": feedforward_names,
            "fan_in_fan_out": applied.fan_in_fan_out,
        }

    def config_from_peft(self, peft_config: dict[str, Any], source: str) -> IA3Config:
        reject_unsupported(peft_config, {"modules_to_save": None, "exclude_modules": None}, source)
        return IA3Config(
            name="ia3",
            target_modules=suffix_list_from_peft(peft_config.get("target_modules"), source),
            feedforward_modules=suffix_list_from_peft(
                peft_config.get("feedforward_modules"), source, key="feedforward_modules"),
        )


def architecture_defaults(model: nn.Module) -> tuple[list[str], list[str]] | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return IA3_DEFAULTS.get(model_type)


def resolved_targets(model: nn.Module, cfg: IA3Config) -> list[str] | str:
    if cfg.target_modules is not None:
        if not cfg.target_modules:
            raise UserError("target_modules is empty, so (IA)³ would train nothing",
                            where="target_modules", fix="list layers, omit the key, or use 'all-linear'")
        return cfg.target_modules
    defaults = architecture_defaults(model)
    if defaults is None:
        model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
        raise UserError(
            f"(IA)³ has no default layers for model type '{model_type}'",
            where="target_modules",
            expected=f"target_modules set, or a model of type {', '.join(IA3_DEFAULTS)}",
            # The first fix works on any model with linear layers (the architecture matrix runs it).
            fix="set target_modules: all-linear with feedforward_modules: [] (every layer scales its output), "
                "or name the attention key/value layers and the feed-forward output layer in target_modules "
                "and that output layer in feedforward_modules (e.g. [down_proj])",
        )
    return defaults[0]


def feedforward_layers(model: nn.Module, cfg: IA3Config, targets: dict[str, nn.Module]) -> set[str]:
    """The targeted layers whose input is scaled."""
    if cfg.feedforward_modules is None:
        defaults = architecture_defaults(model)
        return set(match_targets(model, defaults[1])) & set(targets) if defaults else set()
    if not cfg.feedforward_modules:
        # [] is not a typo to refuse (as an empty target_modules is): it asks for no input-scaled layers,
        # so every target scales its output; peft reads feedforward_modules=[] the same way.
        return set()
    chosen = match_targets(model, cfg.feedforward_modules, key="feedforward_modules")
    untargeted = sorted(set(chosen) - set(targets))
    if untargeted:
        raise UserError(
            f"feedforward module '{untargeted[0]}' is not among the target modules "
            f"({len(untargeted)} such layers)",
            where="feedforward_modules",
            expected="a subset of the layers target_modules selects",
            fix="add the layers to target_modules, or name them more precisely (e.g. mlp.c_proj, not c_proj)",
        )
    return set(chosen)


METHOD = IA3()
