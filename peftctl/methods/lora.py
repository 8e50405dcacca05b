"""LoRA (Hu et al., 2021) and its variants rsLoRA (Kalajdzievski, 2023) and DoRA (Liu et al., 2024).

A frozen linear layer W gains a low-rank update: y = W x + s · B A x, with A [r, in] drawn
Kaiming-uniform, B [out, r] zero (so training starts from the base model exactly) and
s = alpha / r, or alpha / sqrt(r) for rsLoRA, which keeps the update's scale stable as r grows.
DoRA splits the updated weight into a direction and a learned magnitude m per output unit:
y = m / ||W + s·B A||_row · (W + s·B A) x, the norm treated as a constant in the backward pass
(the DoRA paper, section 4.3).
How A and B start (PiSSA, OLoRA, ...) and LoRA+'s learning rates are in lora_init.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from peftctl.arch.layers import dense_weight, linear_shape, quantized_kind
from peftctl.core.errors import UserError
from peftctl.methods.base import (
    PEFT_KEY_PREFIX,
    Adapter,
    AllLinear,
    Applied,
    BaseFacts,
    MethodConfig,
    WrappedLinear,
    WrappingMethod,
    exported_targets,
    match_targets,
    reject_unsupported,
    suffix_list_from_peft,
    within_rank,
)
from peftctl.methods.lora_experts import LoraExperts, wrap_expert_parameters
from peftctl.methods.lora_init import (
    BASE_CHANGING,
    exported_rank_options,
    exported_state,
    init_from_peft,
    initialise,
    loraplus_scales,
)
from peftctl.methods.low_rank import add_update, low_rank_update


class LoraConfig(MethodConfig):
    training_only: ClassVar[frozenset[str]] = frozenset({"loraplus_lr_ratio"})
    name: Literal["lora"] = Field(description="LoRA: trainable low-rank updates on linear layers.")
    r: int = Field(8, gt=0, description="Rank of the update B·A; trainable weights grow linearly with it.")
    alpha: float = Field(16, gt=0, description="Scale numerator: the update is multiplied by alpha/r (alpha/sqrt(r) with rsLoRA).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA path's input during training; 0 skips the work entirely.")
    target_modules: list[str] | AllLinear = Field(
        "all-linear",
        description="Linear layers to adapt: module-name suffixes such as [q_proj, v_proj] (GPT-2: [c_attn]), "
        "or 'all-linear' for every linear layer except the output head.",
    )
    target_parameters: list[str] | None = Field(
        None,
        description="Mixture-of-experts weights to adapt, which are 3-D parameters, not linear layers: name "
        "suffixes such as [experts.gate_up_proj, experts.down_proj] (Mixtral, Qwen3-MoE). Each expert gets its own "
        "rank-r update, as peft's target_parameters. The router stays frozen unless named (gate.weight). Combine with target_modules "
        "(which may then be []) for the attention layers.",
    )
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha/sqrt(r) instead of alpha/r.")
    use_dora: bool = Field(False, description="DoRA: learn a magnitude per output unit on top of the LoRA direction.")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default",
        description="How A and B start (peft's init_lora_weights). default: A Kaiming-uniform, B zero; gaussian: A "
        "normal with std 1/r, B zero; pissa: the top-r singular vectors of each weight (PiSSA), olora: its QR "
        "factors (OLoRA), both moved out of the frozen weight so the model starts unchanged. A PiSSA/OLoRA adapter "
        "is exported as a plain LoRA of rank 2r for the unmodified base, as peft converts it.",
    )
    loraplus_lr_ratio: float | None = Field(
        None, gt=0,
        description="LoRA+: the B matrices (and DoRA's magnitudes) learn this many times the learning rate "
        "(16 is typical); null: one learning rate. A training setting: the saved adapter is a plain LoRA.",
    )


class LoraLinear(WrappedLinear):
    """A frozen linear layer (nn.Linear or GPT-2's Conv1D) plus a LoRA or DoRA update."""

    def __init__(self, base_layer: nn.Module, cfg: LoraConfig):
        super().__init__()
        self.base_layer = base_layer
        in_features, out_features, self.fan_in_fan_out = linear_shape(base_layer)
        # Trainable weights stay in fp32 whatever the base's precision, so AdamW's updates are exact.
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Linear(in_features, cfg.r, bias=False, **factory)
        self.lora_B = nn.Linear(cfg.r, out_features, bias=False, **factory)
        self.scaling = cfg.alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)
        initialise(self, cfg.init, cfg.r)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.lora_magnitude_vector: nn.Parameter | None = None
        if cfg.use_dora:
            with torch.no_grad():
                norm = self._row_norm(dense_weight(base_layer).to(torch.float32))
            self.lora_magnitude_vector = nn.Parameter(norm)
        self.train(base_layer.training)  # an adapter loaded into an eval-mode model runs no dropout

    def _row_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + s·B A|| per output unit."""
        delta = self.lora_B.weight.to(weight.dtype) @ self.lora_A.weight.to(weight.dtype)
        return torch.linalg.vector_norm(weight + self.scaling * delta, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.lora_magnitude_vector is None and not torch.is_autocast_enabled(x.device.type):
            update = low_rank_update(x, self.lora_A.weight, self.lora_B.weight, self.scaling, self.dropout)
            return add_update(result, update)
        x = self.dropout(x.to(self.lora_A.weight.dtype))
        # x·A then ·B: never materialise the [out, in] product during training.
        update = self.lora_B(self.lora_A(x)) * self.scaling
        if self.lora_magnitude_vector is not None:
            update = self._dora_update(x, result, update)
        return result + update.to(result.dtype)

    def _dora_update(self, x: torch.Tensor, result: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """What DoRA adds to the base output: (m/||W'|| - 1)·W x + m/||W'||·s·B A x."""
        weight = dense_weight(self.base_layer).to(x.dtype)
        scale = self.lora_magnitude_vector / self._row_norm(weight).detach()
        if isinstance(self.dropout, nn.Identity):
            # The base output is already computed; only its bias must not be rescaled.
            bias = self.base_layer.bias
            base = result.to(x.dtype) - (bias.to(x.dtype) if bias is not None else 0)
        else:
            base = F.linear(x, weight)
        return (scale - 1) * base + scale * update

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """The base layer with the update folded into its weight."""
        weight = dense_weight(self.base_layer).to(torch.float32)
        delta = self.scaling * (self.lora_B.weight @ self.lora_A.weight)
        merged = weight + delta
        if self.lora_magnitude_vector is not None:
            merged = (self.lora_magnitude_vector / self._row_norm(weight)).unsqueeze(1) * merged
        merged = merged.T if self.fan_in_fan_out else merged
        self.base_layer.weight.copy_(merged.to(self.base_layer.weight.dtype))
        return self.base_layer


@dataclass
class LoraApplied(Applied):
    experts: list[str] = field(default_factory=list)  # wrappers of expert parameters (lora_experts)


class LoRA(WrappingMethod):
    name = "lora"
    Config = LoraConfig
    peft_type = "LORA"
    examples = {"lora": {"r": 4}, "rslora": {"r": 4, "use_rslora": True}, "dora": {"r": 4, "use_dora": True},
                "gaussian": {"r": 4, "init": "gaussian"}, "pissa": {"r": 4, "init": "pissa"},
                "olora": {"r": 4, "init": "olora", "use_rslora": True},
                "loraplus": {"r": 4, "loraplus_lr_ratio": 16}, "loraplus_dora": {"r": 4, "use_dora": True,
                                                                                "loraplus_lr_ratio": 16}}
    variants = {"dora": {"use_dora": True}, "rslora": {"use_rslora": True}, "pissa": {"init": "pissa"},
                "olora": {"init": "olora"}, "loraplus": {"loraplus_lr_ratio": 16}}
    comparable_options = {"r": "low-rank rank", "alpha": "low-rank alpha", "dropout": "LoRA input dropout",
                          "target_modules": "linear layers"}
    lr_source = "peft's method comparison (MetaMathQA, Llama-3.2-3B): LoRA at 1e-4"

    def select(self, model: nn.Module, cfg: LoraConfig, base: BaseFacts) -> dict[str, nn.Module]:
        if cfg.target_parameters and cfg.use_dora:
            raise UserError("DoRA on expert parameters is not supported (nor in peft)", where="use_dora",
                            fix="use plain LoRA or rsLoRA with target_parameters")
        if cfg.target_parameters and cfg.target_modules == []:
            check_base_changing_init(cfg, {}, base)
            return {}
        targets = within_rank(match_targets(model, cfg.target_modules), cfg.r, cfg.target_modules)
        check_base_changing_init(cfg, targets, base)
        return targets

    def record(self, model: nn.Module, cfg: LoraConfig, selected: dict[str, nn.Module]) -> LoraApplied:
        applied = super().record(model, cfg, selected)
        # Expert weights are 3-D parameters, not layers to replace: they are wrapped here, in place.
        experts = wrap_expert_parameters(model, cfg.target_parameters, cfg.r, cfg.alpha, cfg.use_rslora) \
            if cfg.target_parameters else []
        for name in experts if cfg.init == "gaussian" else ():
            initialise(model.get_submodule(name), cfg.init, cfg.r)
        return LoraApplied(applied.targets, applied.fan_in_fan_out, experts)

    def wrap(self, module: nn.Module, cfg: LoraConfig, name: str, applied: LoraApplied) -> nn.Module:
        return LoraLinear(module, cfg)

    def wrapped(self, applied: LoraApplied) -> list[str]:
        return applied.targets + applied.experts

    def peft_config(self, adapter: Adapter) -> dict[str, Any]:
        cfg: LoraConfig = adapter.cfg
        return {
            **exported_rank_options(cfg),
            "lora_dropout": cfg.dropout,
            "target_modules": exported_targets(adapter),
            "target_parameters": list(cfg.target_parameters) if cfg.target_parameters else None,
            "use_rslora": cfg.use_rslora,
            "use_dora": cfg.use_dora,
            "fan_in_fan_out": adapter.applied.fan_in_fan_out,
            "bias": "none",
        }

    def config_from_peft(self, peft_config: dict[str, Any], source: str) -> LoraConfig:
        reject_unsupported(
            peft_config,
            {"bias": "none", "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
             "modules_to_save": None, "lora_bias": False,
             "trainable_token_indices": None, "layer_replication": None, "exclude_modules": None,
             # Variants that change the forward pass (newer peft); init-only options are harmless.
             "use_qalora": False, "alora_invocation_tokens": None, "use_bdlora": None, "arrow_config": None,
             "kasa_config": None, "velora_config": None, "monteclora_config": None},
            source,
        )
        targets = suffix_list_from_peft(peft_config.get("target_modules"), source)
        return LoraConfig(
            name="lora",
            r=peft_config["r"],
            alpha=peft_config.get("lora_alpha", 8),
            dropout=peft_config.get("lora_dropout", 0.0),
            target_modules=targets if targets is not None else [],
            target_parameters=suffix_list_from_peft(peft_config.get("target_parameters"), source,
                                                    "target_parameters") or None,
            use_rslora=peft_config.get("use_rslora", False),
            use_dora=peft_config.get("use_dora", False),
            init=init_from_peft(peft_config, source),
        )

    def export_state(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        state = super().export_state(adapter)
        if adapter.cfg.init not in BASE_CHANGING:
            return state
        layers = {name: adapter.model.get_submodule(name) for name in adapter.applied.targets}
        return exported_state(state, layers, PEFT_KEY_PREFIX)

    def lr_scales(self, adapter: Adapter) -> dict[str, float]:
        return loraplus_scales(adapter.params, adapter.cfg.loraplus_lr_ratio)

    def merge(self, adapter: Adapter) -> nn.Module:
        model = super().merge(adapter)
        for name in adapter.applied.experts:
            if not name.endswith(".base_layer"):  # the outermost wrapper: unwrap all of its nesting
                module = model.get_submodule(name)
                while isinstance(module, LoraExperts):
                    module = module.merged_base()
                model.set_submodule(name, module)
        return model


def check_base_changing_init(cfg: LoraConfig, targets: dict[str, nn.Module], base: BaseFacts) -> None:
    """Refuse PiSSA / OLoRA where the residual weight or the rank-2r conversion cannot be exact."""
    if cfg.init not in BASE_CHANGING:
        return
    # A skeleton is not quantized yet (the facts say it will be); a loaded base's layers say so themselves.
    quantized = base.quantized or any(map(quantized_kind, targets.values()))
    fix = "use init: default (or gaussian)"
    if quantized:
        # peft refuses PiSSA on a 4-bit weight; re-quantizing W_res (its OLoRA) changes what the model computes.
        raise UserError(f"init: {cfg.init} needs the base weights in 16 or 32 bits, to subtract their principal "
                        "part exactly; this base is quantized", where="init",
                        fix=f"train on an unquantized base (model.quantization: none), or {fix}")
    if cfg.target_parameters:
        raise UserError(f"init: {cfg.init} is not supported on expert parameters (target_parameters), nor in peft",
                        where="init", fix=f"{fix}, or drop target_parameters")
    if cfg.use_dora:
        # peft's conversion to a plain LoRA drops DoRA's magnitudes, so its exports would not load as trained.
        raise UserError(f"init: {cfg.init} cannot be combined with DoRA: its export to a plain LoRA of the "
                        "unmodified base (peft's conversion) has no place for the magnitudes", where="init",
                        fix=f"{fix}, or use_dora: false")


METHOD = LoRA()
