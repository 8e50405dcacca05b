"""Compacter: bottleneck adapters built from low-rank hypercomplex layers (Karimi Mahabadi et al., 2021).

A Compacter adapter has the shape of a Houlsby / Pfeiffer bottleneck (bottleneck.py):

    adapter(y) = y + W_up · f(W_down · y + b_down) + b_up,     W_down [b, d], W_up [d, b]

but each projection W [out, in] is a parameterised hypercomplex multiplication (PHM) layer, a
sum of n Kronecker products, with each Bᵢ a low-rank product ("LPHM"):

    W = Σᵢ₌₁ⁿ Aᵢ ⊗ Bᵢ,     Aᵢ [n, n],     Bᵢ = sᵢ tᵢᵀ,  sᵢ [out/n, r],  tᵢ [in/n, r]

n is `phm_dim` and r is `phm_rank` (the paper's r = 1). The n matrices Aᵢ (the "slow weights",
`phm_rule` [n, n, n]) are one tensor shared by every projection of every adapter in the model;
sᵢ, tᵢ and the biases belong to each projection. An LPHM layer has r·(in + out) weights instead
of in·out: with the shared n³, the paper's count of n³ + Σ (2r(d + b) + b + d) over the adapters.
Both d and b must be multiples of n.

`compacter` places its adapters as Houlsby does (after the attention and the feed-forward block of
every layer), `compacter_plus_plus` as Pfeiffer does (after the feed-forward block only); sites,
sizing and non-linearity are bottleneck.py's. Initialisation: Aᵢ ~ N(0, 0.1²) and the sᵢ, tᵢ of
W_down Glorot-uniform per matrix, so W_down starts at about Houlsby's 1e-2 scale; W_up's sᵢ and
both biases start at zero, so W_up = 0 and an adapted model starts exactly equal to its base.

The non-linearity keeps it from being folded into the base weights. peft has no Compacter:
exports use peftctl's own peft_type (COMPACTER / COMPACTER_PLUS_PLUS) in peft's two-file layout.
The shared Aᵢ is registered on every wrapper (so `.to()` and dtype moves keep it one tensor) and
trains and saves once, under the first wrapper's name: `<first site>.phm_rule`. A launch that
shards each decoder layer on its own (FSDP2) would split it: training checks and refuses that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from peftctl.arch.layers import linear_shape
from peftctl.core.errors import UserError
from peftctl.methods.base import Adapter, MethodConfig, WrappedLinear
from peftctl.methods.bottleneck import ACTIVATIONS, Bottleneck, BottleneckApplied, BottleneckConfig

DEFAULT_PHM_DIM = 4
RULE_INIT_STD = 0.1
PHM_KEYS = ("phm_dim", "phm_rank")


class PHMBottleneckConfig(BottleneckConfig):
    """Options shared by Compacter and Compacter++; each sets its own `name` literal."""

    phm_dim: int = Field(
        DEFAULT_PHM_DIM, ge=1,
        description="n, the number of Kronecker products in each projection (Aᵢ [n, n] shared by the whole "
        "model): the hidden size and the bottleneck size must both be multiples of it.",
    )
    phm_rank: int = Field(
        1, ge=1, description="Rank r of each Bᵢ = sᵢ tᵢᵀ: each projection trains r·(in + out) weights (the paper's r is 1).",
    )


class CompacterConfig(PHMBottleneckConfig):
    name: Literal["compacter"] = Field(
        description="Compacter: a bottleneck adapter of low-rank Kronecker-product projections after the "
        "attention and the feed-forward block of every layer."
    )


class CompacterPlusPlusConfig(PHMBottleneckConfig):
    name: Literal["compacter_plus_plus"] = Field(
        description="Compacter++: a Compacter adapter after the feed-forward block of every layer only."
    )


class PHMLinear(nn.Module):
    """y = W x + b with W = Σᵢ Aᵢ ⊗ sᵢ tᵢᵀ; the shared Aᵢ (`rule`) come with each call."""

    def __init__(self, in_features: int, out_features: int, phm_dim: int, rank: int, device: torch.device):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        factory = {"device": device, "dtype": torch.float32}
        self.s = nn.Parameter(torch.empty(phm_dim, out_features // phm_dim, rank, **factory))
        self.t = nn.Parameter(torch.empty(phm_dim, in_features // phm_dim, rank, **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory))
        for factor in (self.s, self.t):
            for matrix in factor:  # Glorot over each sᵢ or tᵢ, not over the stack of n
                nn.init.xavier_uniform_(matrix)

    def kronecker_weight(self, rule: torch.Tensor) -> torch.Tensor:
        # Bᵢ = sᵢtᵢᵀ [n, out/n, in/n] by broadcasting, not matmul: a matmul's gradient for a
        # rank-1 factor comes back transposed in memory, which DDP's gradient buckets warn about.
        blocks = (self.s.unsqueeze(2) * self.t.unsqueeze(1)).sum(-1)
        # (Aᵢ ⊗ Bᵢ)[a·P + p, c·Q + q] = Aᵢ[a, c]·Bᵢ[p, q], summed over i.
        return torch.einsum("iac,ipq->apcq", rule, blocks).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor, rule: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.kronecker_weight(rule), self.bias)


class CompacterAdapter(WrappedLinear):
    """A frozen output projection followed by a Compacter adapter on its output."""

    def __init__(self, base_layer: nn.Module, bottleneck: int, cfg: PHMBottleneckConfig, phm_rule: nn.Parameter):
        super().__init__()
        self.base_layer = base_layer
        _, hidden, _ = linear_shape(base_layer)
        device = base_layer.weight.device
        self.phm_rule = phm_rule  # the same Parameter on every wrapper of the model
        self.adapter_down = PHMLinear(hidden, bottleneck, cfg.phm_dim, cfg.phm_rank, device)
        self.adapter_up = PHMLinear(bottleneck, hidden, cfg.phm_dim, cfg.phm_rank, device)
        # A zero sᵢ makes W_up zero, the adapter the identity: training starts from the base exactly.
        nn.init.zeros_(self.adapter_up.s)
        self.non_linearity = ACTIVATIONS[cfg.non_linearity]()
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        # New modules start in training mode; on a model loaded for inference dropout must stay off.
        self.train(base_layer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        h = self.dropout(y.to(self.phm_rule.dtype))
        z = self.non_linearity(self.adapter_down(h, self.phm_rule))
        return y + self.adapter_up(z, self.phm_rule).to(y.dtype)


@dataclass
class CompacterApplied(BottleneckApplied):
    phm_rule: nn.Parameter | None = None  # the Aᵢ every wrapper shares


def check_divisible(hidden: int, bottleneck: int, cfg: PHMBottleneckConfig) -> None:
    """Kronecker factors of n×n need both sizes in whole blocks of n; name the option to change."""
    n = cfg.phm_dim
    if hidden % n:
        divisors = [k for k in range(1, min(hidden, 64) + 1) if hidden % k == 0]
        raise UserError(
            f"phm_dim {n} does not divide the model's hidden size {hidden}",
            where="phm_dim",
            expected=f"a phm_dim that divides {hidden}: {', '.join(map(str, divisors))}",
            fix="pick phm_dim from that list (4 is the paper's default)",
        )
    if bottleneck % n:
        # The size the user set is the one to change; with neither set, the default factor made it.
        option = next((key for key in ("bottleneck_size", "reduction_factor") if getattr(cfg, key) is not None), "phm_dim")
        lower = max(n, bottleneck - bottleneck % n)
        raise UserError(
            f"the bottleneck of {bottleneck} units (hidden size {hidden}) is not a multiple of phm_dim {n}",
            where=option,
            expected=f"a bottleneck size that is a multiple of {n}, e.g. {lower} or {lower + n}",
            fix=f"set bottleneck_size: {lower}, or a phm_dim that divides {bottleneck}",
        )


def shared_rule_name(applied: CompacterApplied) -> str:
    """The shared rule trains and saves under the first wrapper's name."""
    return f"{applied.targets[0]}.phm_rule"


class PHMBottleneck(Bottleneck):
    """Compacter adapters on the output of the blocks named in `placements`."""

    Config: ClassVar[type[PHMBottleneckConfig]]

    def record(self, model: nn.Module, cfg: PHMBottleneckConfig, selected: dict[str, nn.Module]) -> CompacterApplied:
        sized = super().record(model, cfg, selected)
        first = next(iter(selected.values()))
        check_divisible(linear_shape(first)[1], sized.bottleneck_size, cfg)
        n = cfg.phm_dim
        rule = nn.Parameter(torch.empty(n, n, n, device=first.weight.device, dtype=torch.float32))
        nn.init.normal_(rule, std=RULE_INIT_STD)
        return CompacterApplied(**vars(sized), phm_rule=rule)

    def wrap(self, module: nn.Module, cfg: PHMBottleneckConfig, name: str, applied: CompacterApplied) -> nn.Module:
        return CompacterAdapter(module, applied.bottleneck_size, cfg, applied.phm_rule)

    def after_step(self, adapter: Adapter, step: int, total_steps: int) -> None:
        # FSDP2 shards each decoder block apart, which would split the shared Aᵢ into one copy per
        # block (only the first trained): refuse that rather than train something other than Compacter.
        rule = adapter.params[shared_rule_name(adapter.applied)]
        if any(adapter.model.get_submodule(site).phm_rule is not rule for site in adapter.applied.targets):
            raise UserError(
                f"method '{self.name}' shares one phm_rule across all decoder layers, and this launch "
                "split it into one copy per layer (FSDP shards each layer on its own)",
                expected="a launch that keeps the model's parameters whole in each process (one process, or DDP)",
                fix="train it without FSDP (accelerate launch --multi_gpu runs DDP), or use houlsby / pfeiffer",
            )

    def peft_config(self, adapter: Adapter) -> dict[str, Any]:
        cfg: PHMBottleneckConfig = adapter.cfg
        return {**super().peft_config(adapter), **{key: getattr(cfg, key) for key in PHM_KEYS}}

    def config_from_peft(self, peft_config: dict[str, Any], source: str) -> MethodConfig:
        sized = super().config_from_peft(peft_config, source)  # the bottleneck's own options, checked
        # A bad phm value is a ValidationError, which the adapter loader names by its key.
        return self.Config.model_validate({**sized.model_dump(), **{k: peft_config[k] for k in PHM_KEYS if k in peft_config}})


class Compacter(PHMBottleneck):
    name = "compacter"
    Config = CompacterConfig
    peft_type = "COMPACTER"
    placements = ("attention", "feed-forward")
    examples = {"compacter": {"bottleneck_size": 8},
                "compacter-rank2": {"bottleneck_size": 8, "phm_dim": 2, "phm_rank": 2, "non_linearity": "gelu"}}


class CompacterPlusPlus(PHMBottleneck):
    name = "compacter_plus_plus"
    Config = CompacterPlusPlusConfig
    peft_type = "COMPACTER_PLUS_PLUS"
    placements = ("feed-forward",)
    examples = {"compacter_plus_plus": {"bottleneck_size": 8}}


METHODS_IN_MODULE = (Compacter(), CompacterPlusPlus())
