"""VeRA, "Vector-based Random Matrix Adaptation" (Kopiczko et al., 2024).

LoRA's update B·A, but A [r, in] and B [out, r] are frozen random matrices shared by every
targeted layer; each layer trains only two vectors that scale them: ΔW x = Λ_b B Λ_d A x, with
Λ_d = diag(vera_lambda_d) [r] and Λ_b = diag(vera_lambda_b) [out]. λ_b starts at zero, so
training starts from the base model exactly; λ_d at `d_initial`.

As peft: A and B are drawn once from a torch.Generator seeded by `projection_prng_key`
(Kaiming-uniform, A before B), sized to the largest in and out features among the targets, and
each layer uses their top-left slice A[:, :in], B[:out, :]. They are saved as
`base_model.vera_A` / `base_model.vera_B` when `save_projection` (peft's default), else rebuilt
from the seed. They live once per model, on a small module at the model's root
(`vera_projections`), which every wrapper reads: moving the model moves one copy, not one per
layer. The update is linear in the weights, so a merge folds Λ_b B Λ_d A into W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from peftctl.arch.layers import dense_weight, linear_shape
from peftctl.core.state_dicts import load_strict
from peftctl.methods.base import (
    PEFT_KEY_PREFIX,
    Adapter,
    AllLinear,
    Applied,
    MethodConfig,
    WrappedLinear,
    WrappingMethod,
    exported_targets,
    reject_unsupported,
    suffix_list_from_peft,
)

# Where the shared projections sit: an attribute of the model's root, and their saved keys.
PROJECTIONS = "vera_projections"
SAVED_PROJECTIONS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}


class VeraConfig(MethodConfig):
    name: Literal["vera"] = Field(description="VeRA: trained scaling vectors on frozen random low-rank matrices.")
    r: int = Field(256, gt=0, description="Rank of the shared random matrices A [r, in] and B [out, r]; "
                   "each layer trains r + out weights, so VeRA takes larger ranks than LoRA.")
    target_modules: list[str] | AllLinear = Field(
        "all-linear",
        description="Linear layers to adapt: module-name suffixes such as [q_proj, v_proj] (GPT-2: [c_attn]), "
        "or 'all-linear' for every linear layer except the output head.",
    )
    projection_prng_key: int = Field(0, ge=0, description="Seed of the generator that draws the shared A and B.")
    save_projection: bool = Field(
        True, description="Save A and B in the adapter file (peft's default): it then loads identically "
        "anywhere, not only where the seed redraws the same matrices.",
    )
    vera_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the VeRA path's input during training.")
    d_initial: float = Field(0.1, description="Initial value of every vera_lambda_d entry (the paper: 0.1 or less).")


class VeraProjections(nn.Module):
    """The frozen A [r, in_max] and B [out_max, r] shared by every VeRA layer of one model."""

    def __init__(self, r: int, in_max: int, out_max: int, seed: int, device: torch.device):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        # Drawn on the CPU whatever the model's device, so a seed gives the same matrices anywhere.
        a = kaiming_uniform((r, in_max), generator)
        b = kaiming_uniform((out_max, r), generator)
        # Buffers, not parameters: frozen, and outside the model's state dict (export writes them).
        self.register_buffer("vera_A", a.to(device), persistent=False)
        self.register_buffer("vera_B", b.to(device), persistent=False)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """peft's `_kaiming_init`: uniform in ±√3·√2/√fan_in, fan_in being the second dimension."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraLinear(WrappedLinear):
    """A frozen linear layer (nn.Linear or GPT-2's Conv1D) plus λ_b ⊙ B (λ_d ⊙ A x)."""

    def __init__(self, base_layer: nn.Module, projections: VeraProjections, cfg: VeraConfig):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, **factory))
        self.vera_lambda_d = nn.Parameter(torch.full((cfg.r,), float(cfg.d_initial), **factory))
        self.dropout = nn.Dropout(cfg.vera_dropout) if cfg.vera_dropout > 0 else nn.Identity()
        # Shared with every other VeRA layer and owned by the model's root: kept out of this
        # module's children, so it is neither moved nor saved once per layer.
        self._projections = (projections,)
        self.train(base_layer.training)

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        projections = self._projections[0]
        return projections.vera_A[:, : self.in_features], projections.vera_B[: self.out_features, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        a, b = self.sliced()
        # In the vectors' precision (fp32), then back: peft's order of operations.
        x = self.dropout(x.to(self.vera_lambda_d.dtype))
        update = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(x, a), b)
        return (result + update).to(result.dtype)

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """The base layer with Λ_b B Λ_d A folded into its weight."""
        a, b = self.sliced()
        delta = (self.vera_lambda_b[:, None] * b.float()) @ (self.vera_lambda_d[:, None] * a.float())
        merged = dense_weight(self.base_layer).to(torch.float32) + delta
        merged = merged.T if self.fan_in_fan_out else merged
        self.base_layer.weight.copy_(merged.to(self.base_layer.weight.dtype))
        return self.base_layer


@dataclass
class VeraApplied(Applied):
    projections: VeraProjections | None = None


class VeRA(WrappingMethod):
    name = "vera"
    Config = VeraConfig
    peft_type = "VERA"
    examples = {"vera": {"r": 8}}
    comparable_options = {"target_modules": "linear layers"}

    def record(self, model: nn.Module, cfg: VeraConfig, selected: dict[str, nn.Module]) -> VeraApplied:
        applied = super().record(model, cfg, selected)
        shapes = [linear_shape(layer)[:2] for layer in selected.values()]
        device = next(iter(selected.values())).weight.device
        projections = VeraProjections(cfg.r, max(i for i, _ in shapes), max(o for _, o in shapes),
                                      cfg.projection_prng_key, device)
        # Registered here, once, before the layers are wrapped, so every wrapper reads the same one.
        setattr(model, PROJECTIONS, projections)
        return VeraApplied(applied.targets, applied.fan_in_fan_out, projections)

    def wrap(self, module: nn.Module, cfg: VeraConfig, name: str, applied: VeraApplied) -> nn.Module:
        return VeraLinear(module, applied.projections, cfg)

    def saved_projections(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        """The shared A and B under peft's keys, when the options say they are saved."""
        if not adapter.cfg.save_projection:
            return {}
        projections = adapter.applied.projections
        return {key: getattr(projections, attr) for attr, key in SAVED_PROJECTIONS.items()}

    def export_state(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        state = super().export_state(adapter)
        return {**state, **{key: t.detach() for key, t in self.saved_projections(adapter).items()}}

    def import_state(self, adapter: Adapter, state: dict[str, torch.Tensor], source: str) -> None:
        # Saved projections replace the ones the seed drew (peft does the same on load).
        expected = {PEFT_KEY_PREFIX + name: p for name, p in adapter.params.items()}
        load_strict({**expected, **self.saved_projections(adapter)}, state, source)

    def merge(self, adapter: Adapter) -> nn.Module:
        model = super().merge(adapter)
        delattr(model, PROJECTIONS)
        return model

    def peft_config(self, adapter: Adapter) -> dict[str, Any]:
        cfg: VeraConfig = adapter.cfg
        return {
            "r": cfg.r,
            "target_modules": exported_targets(adapter),
            "projection_prng_key": cfg.projection_prng_key,
            "save_projection": cfg.save_projection,
            "vera_dropout": cfg.vera_dropout,
            "d_initial": cfg.d_initial,
            "fan_in_fan_out": adapter.applied.fan_in_fan_out,
            "bias": "none",
        }

    def config_from_peft(self, peft_config: dict[str, Any], source: str) -> VeraConfig:
        reject_unsupported(peft_config, {"bias": "none", "modules_to_save": None, "layers_to_transform": None,
                                         "layers_pattern": None, "exclude_modules": None}, source)
        return VeraConfig(
            name="vera",
            r=peft_config.get("r", 256),
            target_modules=suffix_list_from_peft(peft_config.get("target_modules"), source),
            projection_prng_key=peft_config.get("projection_prng_key", 0),
            save_projection=peft_config.get("save_projection", True),
            vera_dropout=peft_config.get("vera_dropout", 0.0),
            d_initial=peft_config.get("d_initial", 0.1),
        )


METHOD = VeRA()
