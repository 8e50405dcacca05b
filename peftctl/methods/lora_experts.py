"""LoRA on parameters that are not linear layers: the fused expert weights of mixture-of-experts
models (transformers 5 stores Mixtral's and Qwen3-MoE's experts as 3-D tensors, `gate_up_proj`
[E, out, in] and `down_proj` [E, out, in], each expert applied as F.linear(x, W[e])).

Each expert e gets its own rank-r update, s · B_e A_e, laid out as peft's `target_parameters`
does it, so exports load in peft: lora_A [r·E, in] holds the experts' A one after another,
lora_B [out, r·E] holds column r_i·E + e for expert e's rank i. The module that owns the
parameter is wrapped (kept as `base_layer`); its forward runs with W + ΔW in place of W. Two
parameters of one module nest two wrappers, the first parameter innermost, as peft nests them.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from peftctl.core.errors import UserError


class LoraExperts(nn.Module):
    """A module whose 3-D parameter `param_name` [E, out, in] gains one LoRA update per expert."""

    def __init__(self, base_layer: nn.Module, param_name: str, r: int, alpha: float, use_rslora: bool):
        super().__init__()
        self.base_layer = base_layer
        self.param_name = param_name
        shape = self.weight().shape  # [E, out, in]; a 2-D weight (a router's) is one expert
        experts, out_features, in_features = shape if len(shape) == 3 else (1, *shape)
        self.num_experts = experts
        factory = {"device": self.weight().device, "dtype": torch.float32}
        self.lora_A = nn.Linear(in_features, r * experts, bias=False, **factory)
        self.lora_B = nn.Linear(r * experts, out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)

    def _owner(self) -> tuple[nn.Module, str]:
        """The module that holds the wrapped parameter (inside any wrappers nested in this one),
        and the parameter's path from `base_layer`."""
        module, path = self.base_layer, self.param_name
        while isinstance(module, LoraExperts):
            module, path = module.base_layer, f"base_layer.{path}"
        return module, path

    def weight(self) -> torch.Tensor:
        return getattr(self._owner()[0], self.param_name)

    def delta(self) -> torch.Tensor:
        """ΔW [E, out, in] = s · B_e A_e for every expert e."""
        a = self.lora_A.weight.reshape(self.num_experts, -1, self.lora_A.weight.shape[-1])  # e r i
        b = self.lora_B.weight.reshape(self.lora_B.weight.shape[0], -1, self.num_experts)  # o r e
        return (torch.einsum("ore,eri->eoi", b, a) * self.scaling).reshape(self.weight().shape)

    def forward(self, *args, **kwargs):
        owner, path = self._owner()
        weight = getattr(owner, self.param_name)
        effective = weight + self.delta().to(weight.dtype)
        return functional_call(self.base_layer, {path: effective}, args, kwargs, strict=False)

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        weight = self.weight()
        weight.copy_((weight.to(torch.float32) + self.delta()).to(weight.dtype))
        return self.base_layer


def expert_parameters(model: nn.Module, targets: list[str]) -> dict[str, list[str]]:
    """{owning module: [parameter names]} for every 3-D parameter whose full name ends with one of
    `targets` (e.g. 'experts.gate_up_proj'); every target must match one, in the module's order."""
    found: dict[str, list[str]] = {}
    for target in targets:
        hits = [name for name, param in model.named_parameters()
                if (name == target or name.endswith("." + target))]
        if not hits:
            fused = sorted({".".join(name.split(".")[-2:]) for name, p in model.named_parameters() if p.dim() == 3})
            raise UserError(f"target parameter '{target}' matches no parameter of this model",
                            where="target_parameters",
                            expected=f"one of its 3-D expert weights: {', '.join(fused)}" if fused
                            else "a model with fused expert weights (this one has none)")
        for name in hits:
            owner, _, param_name = name.rpartition(".")
            if model.get_parameter(name).dim() not in (2, 3):
                raise UserError(f"target parameter '{name}' is not a weight matrix [out, in] or expert weights "
                                "[experts, out, in]", where="target_parameters",
                                fix="name a weight, such as experts.gate_up_proj or a router's gate.weight")
            found.setdefault(owner, []).append(param_name)
    # The owning module's own order, as peft nests the wrappers.
    return {owner: [n for n, _ in model.get_submodule(owner).named_parameters(recurse=False) if n in names]
            for owner, names in found.items()}


def wrap_expert_parameters(model: nn.Module, targets: list[str], r: int, alpha: float,
                           use_rslora: bool) -> list[str]:
    """Wrap every targeted expert parameter; returns the wrappers' names (innermost first)."""
    wrappers = []
    for owner, names in expert_parameters(model, targets).items():
        module = model.get_submodule(owner)
        depth = len(names)
        for index, param_name in enumerate(names):
            module = LoraExperts(module, param_name, r, alpha, use_rslora)
            # The innermost wrapper is reached through the outer ones' base_layer.
            wrappers.append(owner + ".base_layer" * (depth - 1 - index))
        model.set_submodule(owner, module)
    return wrappers
