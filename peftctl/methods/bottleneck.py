"""Bottleneck adapters: Houlsby et al. (2019) and Pfeiffer et al. (2021).

An adapter is a small residual MLP on the output y (hidden size d) of a transformer sublayer:

    adapter(y) = y + W_up · f(W_down · y + b_down) + b_up,     W_down [b, d], W_up [d, b]

with a bottleneck of b = floor(d / reduction_factor) units (or `bottleneck_size`) and a
non-linearity f. W_down is drawn from a normal of std 1e-2 truncated at two standard deviations
(Houlsby's near-identity init); W_up and both biases start at zero, so an adapted model starts
exactly equal to its base and the first gradient step moves W_up.

Houlsby puts two adapters in every transformer layer: on the attention block's output and on the
feed-forward block's output, each before that block's residual add. Pfeiffer keeps only the
feed-forward one (half the parameters; the paper's best accuracy for its cost).

Placement: the adapter wraps the block's output projection (Llama family: self_attn.o_proj and
mlp.down_proj; GPT-2: attn.c_proj and mlp.c_proj), so the projection's output y becomes
adapter(y) before the residual add. GPT-2 applies `resid_dropout` after its projections; the
adapter sits before that dropout, which is off in eval and in peftctl's builtin GPT-2.

f sits between the two projections, so an adapter is not a linear map: it cannot be folded
into the base weights. peft has no bottleneck adapters: exports use peftctl's own peft_type
(HOULSBY / PFEIFFER) in peft's two-file layout and load back with peftctl only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, ValidationError, ValidationInfo, field_validator
from torch import nn

from peftctl.arch.architectures import BOTTLENECK_SITES
from peftctl.arch.layers import LINEAR_TYPES, linear_shape
from peftctl.core.errors import UserError
from peftctl.methods.base import Adapter, Applied, BaseFacts, MethodConfig, WrappedLinear, WrappingMethod

DEFAULT_REDUCTION_FACTOR = 16
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
NonLinearity = Literal["relu", "gelu", "silu", "tanh"]


class BottleneckConfig(MethodConfig):
    """Options shared by Houlsby and Pfeiffer adapters; each sets its own `name` literal."""

    # Declared here so that `name` stays the first key of the schema; the subclasses narrow it.
    name: str = Field(description="The bottleneck adapter variant.")
    reduction_factor: float | None = Field(
        None, gt=0,
        description=f"Hidden size ÷ bottleneck size: each adapter has floor(hidden / reduction_factor) units. "
        f"Default {DEFAULT_REDUCTION_FACTOR} when bottleneck_size is not set; set one of the two, not both.",
    )
    bottleneck_size: int | None = Field(
        None, gt=0, description="Units in each adapter's bottleneck, whatever the hidden size (instead of reduction_factor)."
    )
    non_linearity: NonLinearity = Field(
        "relu",
        description="Activation between the down and up projections: relu (Pfeiffer et al.'s choice), "
        "gelu (exact erf form), silu or tanh.",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on each adapter's input during training; 0 skips it.")

    @field_validator("bottleneck_size")
    @classmethod
    def _one_size(cls, size: int | None, info: ValidationInfo) -> int | None:
        if size is not None and info.data.get("reduction_factor") is not None:
            raise ValueError("set reduction_factor or bottleneck_size, not both")
        return size

    def bottleneck(self, hidden: int) -> int:
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return int(hidden // (self.reduction_factor or DEFAULT_REDUCTION_FACTOR))


class HoulsbyConfig(BottleneckConfig):
    name: Literal["houlsby"] = Field(
        description="Houlsby adapters: a trainable bottleneck MLP after the attention and the feed-forward block of every layer."
    )


class PfeifferConfig(BottleneckConfig):
    name: Literal["pfeiffer"] = Field(
        description="Pfeiffer adapters: a trainable bottleneck MLP after the feed-forward block of every layer."
    )


class BottleneckAdapter(WrappedLinear):
    """A frozen output projection (nn.Linear or GPT-2's Conv1D) followed by an adapter on its output."""

    def __init__(self, base_layer: nn.Module, bottleneck: int, cfg: BottleneckConfig):
        super().__init__()
        self.base_layer = base_layer
        _, hidden, _ = linear_shape(base_layer)
        # Trainable weights stay in fp32 whatever the base's precision, so AdamW's updates are exact.
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.adapter_down = nn.Linear(hidden, bottleneck, **factory)
        self.adapter_up = nn.Linear(bottleneck, hidden, **factory)
        self.non_linearity = ACTIVATIONS[cfg.non_linearity]()
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        nn.init.trunc_normal_(self.adapter_down.weight, std=1e-2, a=-2e-2, b=2e-2)
        nn.init.zeros_(self.adapter_down.bias)
        # A zero up-projection makes the adapter the identity: training starts from the base exactly.
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        # New modules start in training mode; on a model loaded for inference dropout must stay off.
        self.train(base_layer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        h = self.dropout(y.to(self.adapter_down.weight.dtype))
        return y + self.adapter_up(self.non_linearity(self.adapter_down(h))).to(y.dtype)


def _output_projection(layer: nn.Module, placement: str) -> str | None:
    """The path inside `layer` of the linear layer that ends the `placement` block, if any."""
    blocks, projections = BOTTLENECK_SITES[placement]  # layouts not in the table are refused, not guessed
    for block in blocks:
        for projection in projections:
            path = f"{block}.{projection}" if block else projection
            try:
                module = layer.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(module, LINEAR_TYPES):
                return path
    return None


def adapter_sites(model: nn.Module, placements: tuple[str, ...], method: str) -> dict[str, nn.Module]:
    """The output projections to wrap, by name: each placement's block in every decoder layer.

    The layers are every ModuleList whose every element has all the placements, except those
    inside another (a mixture-of-experts layer's experts): a decoder's layers, or an
    encoder-decoder's encoder and decoder blocks.
    """
    sites, stacks = {}, []
    for list_name, layers in model.named_modules():
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            continue
        if any(list_name.startswith(stack + ".") for stack in stacks):
            continue
        paths = [[_output_projection(layer, p) for p in placements] for layer in layers]
        if all(all(layer_paths) for layer_paths in paths):
            stacks.append(list_name)
            sites.update({f"{list_name}.{i}.{path}": layers[i].get_submodule(path)
                          for i, layer_paths in enumerate(paths) for path in layer_paths})
    if sites:
        return sites
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    arch = type(model).__name__ + (f" (model_type '{model_type}')" if model_type else "")
    raise UserError(
        f"method '{method}' does not support {arch}: it cannot find the end of the "
        f"{' and '.join(placements)} block{'s' if len(placements) > 1 else ''} in its decoder layers",
        where="model.name_or_path",
        expected="a model whose layers end their blocks in linear layers peftctl knows (GPT-2, the Llama "
        "family, GPT-NeoX, Falcon, OPT, BERT and its kin, T5, BART; see peftctl/arch/architectures.py)",
        fix="use another method such as lora on this model",
    )


@dataclass
class BottleneckApplied(Applied):
    bottleneck_size: int = 0  # resolved from reduction_factor where that was given


class Bottleneck(WrappingMethod):
    """Bottleneck adapters on the output of the blocks named in `placements`."""

    Config: ClassVar[type[BottleneckConfig]]
    placements: ClassVar[tuple[str, ...]]
    in_peft = False
    merge_refusal = (
        "a bottleneck adapter has a non-linearity between its down and up projections, so it is "
        "not a linear map that could be folded into the base weights"
    )
    comparable_options = {key: f"bottleneck {key}" for key in ("reduction_factor", "bottleneck_size",
                                                               "non_linearity", "dropout")}
    lr_source = "AdapterHub's training guide: 1e-4 'works well for most settings'"

    def select(self, model: nn.Module, cfg: BottleneckConfig, base: BaseFacts) -> dict[str, nn.Module]:
        return adapter_sites(model, self.placements, self.name)

    def record(self, model: nn.Module, cfg: BottleneckConfig, selected: dict[str, nn.Module]) -> BottleneckApplied:
        hidden = linear_shape(next(iter(selected.values())))[1]
        size = cfg.bottleneck(hidden)
        if size < 1:
            raise UserError(
                f"reduction_factor {cfg.reduction_factor:g} leaves no bottleneck units: "
                f"the model's hidden size is {hidden}",
                where="reduction_factor",
                expected=f"a reduction factor of at most {hidden}",
                fix="lower reduction_factor, or set bottleneck_size instead",
            )
        return BottleneckApplied(list(selected), bottleneck_size=size)

    def wrap(self, module: nn.Module, cfg: BottleneckConfig, name: str, applied: BottleneckApplied) -> nn.Module:
        return BottleneckAdapter(module, applied.bottleneck_size, cfg)

    def peft_config(self, adapter: Adapter) -> dict[str, Any]:
        cfg: BottleneckConfig = adapter.cfg
        # The resolved size, not the factor: it is what the weights' shapes depend on.
        return {"bottleneck_size": adapter.applied.bottleneck_size, "non_linearity": cfg.non_linearity,
                "dropout": cfg.dropout}

    def config_from_peft(self, peft_config: dict[str, Any], source: str) -> BottleneckConfig:
        if "bottleneck_size" not in peft_config:
            raise UserError(f"the {self.name} adapter config has no 'bottleneck_size'", file=source,
                            where="bottleneck_size", fix="re-export the adapter with peftctl train")
        options = {key: peft_config[key] for key in ("bottleneck_size", "non_linearity", "dropout") if key in peft_config}
        try:
            return self.Config(name=self.name, **options)
        except ValidationError as err:
            first = err.errors()[0]
            raise UserError(
                f"invalid {self.name} adapter config: {first['msg']}",
                file=source,
                where=".".join(str(part) for part in first["loc"]) or None,
                fix="re-export the adapter with peftctl train",
            ) from None


class Houlsby(Bottleneck):
    name = "houlsby"
    Config = HoulsbyConfig
    peft_type = "HOULSBY"
    placements = ("attention", "feed-forward")
    examples = {"houlsby": {"bottleneck_size": 8}}


class Pfeiffer(Bottleneck):
    name = "pfeiffer"
    Config = PfeifferConfig
    peft_type = "PFEIFFER"
    placements = ("feed-forward",)
    examples = {"pfeiffer": {"bottleneck_size": 8}}


METHODS_IN_MODULE = (Houlsby(), Pfeiffer())
