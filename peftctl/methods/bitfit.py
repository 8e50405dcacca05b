"""BitFit (Ben Zaken et al., 2022): fine-tune only the bias terms, everything else frozen.

peft has no BitFit, so the adapter uses peftctl's own `peft_type: BITFIT` in peft's two-file
layout: adapter_model.safetensors holds the trained biases under `base_model.model.<module>.bias`
and adapter_config.json the options that rebuild the same selection. peft cannot load it.

Models without biases (Llama, SmolLM2) can opt in to new zero biases on their linear layers: the
model starts equal to the base exactly, and the biases merge into plain `bias` tensors.

Precision: each trained bias is an fp32 parameter on a small wrapper, whatever the base dtype.
A 16-bit layer cannot hold an fp32 bias (its matmul needs one dtype), and a 16-bit bias would
lose AdamW's small updates to rounding, so the wrapper runs the layer without its bias and adds
the fp32 bias to the output in fp32, then returns to the output's dtype: one rounding, as the
base layer's own fused bias add.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, ValidationError
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftctl.arch.architectures import BIAS_FLAGS
from peftctl.arch.layers import LINEAR_TYPES, linear_layers, linear_shape
from peftctl.arch.tasks import in_own_head
from peftctl.core.errors import UserError
from peftctl.methods.base import (
    Adapter,
    AllLinear,
    Applied,
    BaseFacts,
    MethodConfig,
    WrappingMethod,
    match_targets,
    module_suffixes,
)

# Layers whose bias is added last, along the output's last dimension, which is what the wrapper
# reproduces. (A Conv2d's bias, for one, is added along dimension 1.)
BIAS_LAYER_TYPES: tuple[type[nn.Module], ...] = (*LINEAR_TYPES, nn.LayerNorm)


class BitFitConfig(MethodConfig):
    name: Literal["bitfit"] = Field(description="BitFit: train only the bias terms of the model.")
    target_modules: list[str] | AllLinear | None = Field(
        None,
        description="Whose biases to train. Omit for every bias in the model (linear and LayerNorm layers); "
        "or linear-layer name suffixes such as [q_proj, v_proj] (GPT-2: [c_attn]); or 'all-linear' "
        "for every linear layer except the output head.",
    )
    create_missing_biases: bool = Field(
        False,
        description="Give targeted linear layers that have no bias (Llama, SmolLM2: all of them) a new "
        "zero bias to train; with target_modules omitted, every linear layer except the output head. "
        "The model starts equal to the base; merging adds the biases to the base model.",
    )


class TrainedBias(nn.Module):
    """A frozen layer whose bias is a separate fp32 parameter, added to the bias-free output."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        old = base_layer.bias
        device = base_layer.weight.device
        if old is None:
            bias = torch.zeros(linear_shape(base_layer)[1], device=device, dtype=torch.float32)
        else:
            bias = old.detach().to(torch.float32).clone()
        self.bias = nn.Parameter(bias)
        del base_layer.bias
        if isinstance(base_layer, Conv1D):
            # Conv1D's forward is addmm(bias, x, W) and needs a tensor; zero adds nothing.
            base_layer.register_buffer("bias", torch.zeros_like(bias, dtype=base_layer.weight.dtype),
                                       persistent=False)
        else:
            base_layer.register_parameter("bias", None)
        self.base_layer = base_layer

    @property
    def weight(self) -> torch.Tensor:
        """The frozen layer's weight, for model code that reads it itself (Mamba's mixer, HunYuan v4);
        `bias` is the trained one. Not WrappedLinear: its `bias` property would hide the trained bias."""
        return self.base_layer.weight

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(*args, **kwargs)
        return (result.to(self.bias.dtype) + self.bias).to(result.dtype)

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """The base layer with the trained bias as its own (created where it had none)."""
        layer = self.base_layer
        del layer.bias
        layer.bias = nn.Parameter(self.bias.detach().to(layer.weight.dtype).clone(), requires_grad=False)
        return layer


@dataclass
class BitFitApplied(Applied):
    created: list[str] = field(default_factory=list)  # targets that had no bias before


class BitFit(WrappingMethod):
    name = "bitfit"
    Config = BitFitConfig
    peft_type = "BITFIT"
    in_peft = False
    examples = {"bitfit": {}}
    # Models with biases train them all either way; bias-free ones (Llama, SmolLM2) get zero biases to train.
    suggested_options = {"create_missing_biases": True}

    def select(self, model: nn.Module, cfg: BitFitConfig, base: BaseFacts) -> dict[str, nn.Module]:
        return bias_layers(model, cfg)

    def record(self, model: nn.Module, cfg: BitFitConfig, selected: dict[str, nn.Module]) -> BitFitApplied:
        # LayerNorms are among the targets: no linear layout to record.
        return BitFitApplied(list(selected), created=[name for name, layer in selected.items() if layer.bias is None])

    def wrap(self, module: nn.Module, cfg: BitFitConfig, name: str, applied: BitFitApplied) -> nn.Module:
        return TrainedBias(module)

    def peft_config(self, adapter: Adapter) -> dict[str, Any]:
        cfg: BitFitConfig = adapter.cfg
        targets = cfg.target_modules
        if targets == "all-linear":
            targets = module_suffixes(adapter.applied.targets)
        return {"target_modules": targets, "create_missing_biases": cfg.create_missing_biases}

    def config_from_peft(self, peft_config: dict[str, Any], source: str) -> BitFitConfig:
        try:
            return BitFitConfig(
                name="bitfit",
                target_modules=peft_config.get("target_modules"),
                create_missing_biases=peft_config.get("create_missing_biases", False),
            )
        except ValidationError as err:
            problem = err.errors()[0]
            raise UserError(
                f"invalid BitFit option {'.'.join(map(str, problem['loc']))}: {problem['msg']}",
                file=source,
                expected="target_modules: null, 'all-linear' or a list of names; create_missing_biases: a bool",
            ) from None

    def merge(self, adapter: Adapter) -> nn.Module:
        model = super().merge(adapter)
        declare_created_biases(model, adapter.applied.created)
        return model


@torch.no_grad()
def declare_created_biases(model: nn.Module, created: list[str]) -> None:
    """Make the model's config say it has the biases merging created, so that save_pretrained →
    from_pretrained keeps them: set the block's flag and give the block's other linear layers a
    zero bias (the flag builds one on each). On architectures without such a flag the created
    biases are exact in memory, but a saved merged model would load without them."""
    config = getattr(model, "config", None)
    for flag, block in BIAS_FLAGS.items():
        def in_block(name: str) -> bool:
            return f".{block}." in f".{name}"

        if getattr(config, flag, None) is not False or not any(in_block(n) for n in created):
            continue
        for name, layer in linear_layers(model).items():
            if in_block(name) and layer.bias is None:
                weight = layer.weight
                layer.bias = nn.Parameter(torch.zeros(linear_shape(layer)[1], dtype=weight.dtype,
                                                      device=weight.device), requires_grad=False)
        setattr(config, flag, True)


def bias_layers(model: nn.Module, cfg: BitFitConfig) -> dict[str, nn.Module]:
    """The layers whose bias is trained, checked: each has a bias, or will be given one."""
    if cfg.target_modules is None:
        return every_bias_layer(model, cfg.create_missing_biases)
    if not cfg.target_modules:
        raise UserError("target_modules is empty, so BitFit would train nothing",
                        where="target_modules", fix="list layers, omit the key, or use 'all-linear'")
    layers = match_targets(model, cfg.target_modules)
    missing = [name for name, layer in layers.items() if layer.bias is None]
    if missing and not cfg.create_missing_biases:
        raise UserError(
            f"{len(missing)} of the {len(layers)} targeted layers have no bias (e.g. '{missing[0]}'), "
            "so BitFit has nothing to train there",
            where="target_modules",
            expected="linear layers that have a bias",
            fix="set method.create_missing_biases: true to give them zero-initialised biases to train, "
                "or target layers that have biases",
        )
    return layers


def every_bias_layer(model: nn.Module, create_missing: bool) -> dict[str, nn.Module]:
    # A classifier's head trains whole (weights and biases) beside the method: not BitFit's.
    trained_whole = in_own_head(model)
    layers = {name: module for name, module in model.named_modules()
              if module._parameters.get("bias") is not None and not trained_whole(name)}
    unsupported = {name: m for name, m in layers.items() if not isinstance(m, BIAS_LAYER_TYPES)}
    if unsupported:
        name, module = next(iter(unsupported.items()))
        raise UserError(
            f"BitFit cannot train the bias of '{name}' ({type(module).__name__}): only linear and LayerNorm "
            f"biases are supported ({len(unsupported)} such layers)",
            where="target_modules",
            expected="target_modules naming linear layers",
            # all-linear alone is refused where most linear layers have no bias (Mamba's): say both keys.
            fix="list the linear layers whose biases to train, or 'all-linear'"
                + ("" if create_missing else " (with create_missing_biases: true where they have none)"),
        )
    if create_missing:
        layers.update({n: m for n, m in linear_layers(model).items() if m.bias is None})
        layers = {name: module for name, module in model.named_modules() if name in layers}  # model order
    if not layers:
        raise UserError(
            "this model has no bias terms, so BitFit has nothing to train",
            where="create_missing_biases",
            expected="a model with biases (GPT-2 has them; Llama and SmolLM2 have none)",
            fix="set method.create_missing_biases: true to give every linear layer a zero-initialised bias to train",
        )
    return layers


METHOD = BitFit()
