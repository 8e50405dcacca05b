"""The interface every PEFT method implements, and the helpers methods share.

A method is one file in this folder holding three things:
  * its recipe options, a pydantic model derived from `MethodConfig` with a `name` literal;
  * its layers (plain `nn.Module`s);
  * a `Method` subclass that injects or selects the trainable parameters (`apply`), describes
    them in `peft`'s on-disk format (`peft_config`, `export_state` / `import_state`) and, where
    the maths allows, folds them into the base weights (`merge`).
The training loop, the pipeline and the CLI only see `Adapter`, which is what `apply` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftctl.errors import UserError

# peft prefixes every saved key with the wrapper path of its PeftModel.
PEFT_KEY_PREFIX = "base_model.model."


class MethodConfig(BaseModel):
    """Options shared by every method; each method adds its own fields and a `name` literal."""

    model_config = ConfigDict(extra="forbid")


class Method:
    """One PEFT method. Subclasses set the class attributes and implement `apply`."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    # The `peft_type` written to adapter_config.json (peft's own name where peft has the method).
    peft_type: ClassVar[str]
    # Why the method cannot be folded into the base weights; None when it can.
    merge_refusal: ClassVar[str | None] = None
    # Whether it feeds the model a prefilled KV cache, which gradient checkpointing drops.
    feeds_kv_cache: ClassVar[bool] = False

    def apply(self, model: nn.Module, cfg: MethodConfig) -> Adapter:
        """Freeze `model`, add or select this method's parameters in place, return them."""
        raise NotImplementedError

    def peft_config(self, adapter: Adapter) -> dict[str, Any]:
        """The method's fields of adapter_config.json (peft_type and common keys are added)."""
        raise NotImplementedError

    def config_from_peft(self, peft_config: dict[str, Any], source: str) -> MethodConfig:
        """The recipe options that reproduce an adapter_config.json written by us or by peft."""
        raise NotImplementedError

    def export_state(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        """The adapter weights under peft's key names."""
        return {PEFT_KEY_PREFIX + name: p.detach() for name, p in adapter.params.items()}

    def import_state(self, adapter: Adapter, state: dict[str, torch.Tensor], source: str) -> None:
        """Load weights saved by `export_state` (ours or peft's), refusing any partial match."""
        expected = {PEFT_KEY_PREFIX + name: p for name, p in adapter.params.items()}
        load_strict(expected, state, source)

    def merge(self, adapter: Adapter) -> nn.Module:
        """Fold the adapter into the base weights and return the plain model."""
        self.check_mergeable()
        raise NotImplementedError

    def check_mergeable(self) -> None:
        if self.merge_refusal:
            raise UserError(
                f"method '{self.name}' cannot be merged into the base model: {self.merge_refusal}",
                fix="serve the base model with the adapter loaded instead (peftctl eval, or peft)",
            )


@dataclass
class Adapter:
    """A method applied to a model: what the training loop trains and the exporter writes."""

    method: Method
    cfg: MethodConfig
    model: nn.Module
    # Trainable parameters by their name in `model`: the only tensors AdamW sees.
    params: dict[str, nn.Parameter]
    # Method-specific facts the exporter needs (e.g. the resolved target module names).
    info: dict[str, Any] = field(default_factory=dict)

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.method.export_state(self)

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        self.method.import_state(self, state, source)


def load_strict(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str, *,
                whose: str = "adapter", headline: str = "adapter weights do not match the model",
                wanted: str = "an adapter trained on this base model with the same method options",
                fix: str = "check the adapter's base model and its adapter_config.json") -> None:
    """Copy `state` into `expected` only if keys and shapes match exactly; else name the first mismatch.

    `whose` names where `state` comes from (an adapter, a checkpoint) in the messages.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        key = missing[0] if missing else unexpected[0]
        kind = f"is missing from the {whose}" if missing else f"is in the {whose} but not in this model"
        raise UserError(f"{headline}: key '{key}' {kind} ({len(missing)} missing, {len(unexpected)} unexpected)",
                        file=source, expected=wanted, fix=fix)
    for key, target in expected.items():
        value = state[key]
        if tuple(value.shape) != tuple(target.shape):
            raise UserError(f"{whose} weight '{key}' has shape {tuple(value.shape)}, "
                            f"the model needs {tuple(target.shape)}", file=source, expected=wanted, fix=fix)
        if target.is_floating_point():
            # Integers would be cast to whole-number weights, NaN would poison every output: both
            # load "fine" and give a useless model, so they are refused here.
            if not value.is_floating_point():
                raise UserError(f"{whose} weight '{key}' is {str(value.dtype).removeprefix('torch.')}, not floating "
                                "point", file=source, expected=wanted, fix=fix)
            if not torch.isfinite(value).all():
                raise UserError(f"{whose} weight '{key}' holds NaN or infinite values", file=source,
                                expected="finite weights", fix="use an adapter saved from a run that did not diverge")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key].to(target.dtype))


# --- helpers shared by methods ------------------------------------------------------------------

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
AllLinear = Literal["all-linear"]


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer an adapter may target, without the output head (as peft's all-linear)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LINEAR_TYPES) and module is not head
    }


def linear_shape(layer: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out): GPT-2's Conv1D stores its weight as [in, out]."""
    if isinstance(layer, Conv1D):
        in_features, out_features = layer.weight.shape
        return in_features, out_features, True
    return layer.in_features, layer.out_features, False


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a plain [out, in] tensor, whatever its storage layout.

    A 4-bit or 8-bit layer (`model.quantization`) is dequantized: a new tensor each call, so
    writing to it does not change the layer.
    """
    from peftctl.quantize import dequantized_weight  # peftctl.quantize imports this module

    weight = dequantized_weight(layer)
    if weight is not None:
        return weight
    _, _, fan_in_fan_out = linear_shape(layer)
    return layer.weight.T if fan_in_fan_out else layer.weight


def match_targets(model: nn.Module, targets: list[str] | str, key: str = "method.target_modules") -> dict[str, nn.Module]:
    """The linear layers named by `targets`: module-name suffixes (as peft) or 'all-linear'.

    Every listed suffix must match at least one layer, so a typo is an error, not a silent no-op.
    """
    layers = linear_layers(model)
    if targets == "all-linear":
        return layers
    if not targets:
        raise UserError("the list of target modules is empty, so nothing would be trained", where=key,
                        expected=f"at least one of: {', '.join(module_suffixes(list(layers)))}",
                        fix="name the layers to adapt, or use 'all-linear'")
    def matches(name: str, target: str) -> bool:
        return name == target or name.endswith("." + target)

    for target in targets:
        if not any(matches(name, target) for name in layers):
            names = module_suffixes(list(layers))
            raise UserError(
                f"target module '{target}' matches no linear layer of this model",
                where=key,
                expected=f"suffixes of the model's linear layer names: {', '.join(names)}",
                fix="pick names from that list, or use 'all-linear'",
            )
    return {n: m for n, m in layers.items() if any(matches(n, t) for t in targets)}


def module_suffixes(names: list[str]) -> list[str]:
    """The last name component of each module, deduplicated: peft's target_modules for them."""
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def wrapper_params(model: nn.Module, wrapper_names: list[str]) -> dict[str, nn.Parameter]:
    """The parameters a method added to the wrappers at `wrapper_names`, by their name in `model`.

    Wrappers keep the layer they wrap as `base_layer` (peft's convention, so our in-memory names
    are peft's saved names); everything else on a wrapper belongs to the adapter.
    """
    params: dict[str, nn.Parameter] = {}
    for name in wrapper_names:
        for param_name, param in model.get_submodule(name).named_parameters():
            if not param_name.startswith("base_layer."):
                params[f"{name}.{param_name}"] = param
    return params


def reject_unsupported(peft_config: dict[str, Any], defaults: dict[str, Any], source: str) -> None:
    """Refuse a foreign adapter_config.json that uses a feature we do not implement."""
    for key, default in defaults.items():
        value = peft_config.get(key, default)
        # Older and newer peft versions spell "off" as null, false, {} or [].
        if value != default and value not in (None, False, {}, []):
            raise UserError(
                f"adapter option '{key}: {value!r}' is not supported by peftctl",
                file=source,
                where=key,
                expected=f"{key}: {default!r}",
                fix="retrain the adapter without that option, or use peft to serve it",
            )


def suffix_list_from_peft(value: Any, source: str, key: str = "target_modules") -> list[str] | str | None:
    """A module-name list read from a foreign adapter_config.json, as peftctl's options spell it.

    peft also accepts one regular expression here; peftctl matches name suffixes only, so an
    expression is refused (with the fix) rather than misread as a single suffix.
    """
    if isinstance(value, str) and value != "all-linear":
        raise UserError(
            f"{key} is a regular expression ({value!r}); peftctl matches name suffixes",
            file=source, where=key,
            expected="a list of module-name suffixes, or 'all-linear'",
            fix="list the suffixes the expression matches, e.g. [q_proj, v_proj]",
        )
    return value
