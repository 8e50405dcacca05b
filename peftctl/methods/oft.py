"""OFT, Orthogonal Finetuning (Qiu et al., 2023), as peft implements it since 0.18.

Each targeted linear layer's input is rotated before the frozen layer sees it: y = W x' + b with
x' = x·R (x a row vector), R block-diagonal, one orthogonal [b, b] block per `b` input features
(or one block shared by all, `block_share`). Each block is the Cayley transform of a
skew-symmetric Q = U - Uᵀ, U holding the trained upper-triangular entries: peft's
`oft_R.weight`, [blocks, b·(b-1)/2]. The entries start at zero, so R = I and training starts
from the base model exactly.

As peft: with `use_cayley_neumann` (its default) R is the truncated Neumann series of
(I + Q)(I - Q)⁻¹, I + 2Q + 2Q² + … + 2Q^(n-2) + Q^(n-1) for n = `num_cayley_neumann_terms` ≥ 4
(peft computes n = 3 as n = 4); without it, the exact (I - Q)(I + Q)⁻¹ by a matrix solve, which
is the transpose of what the series approximates (in peft too). Rotating the input rotates the
weight's columns, so a merge folds R into W: W'ᵀ = R Wᵀ, peft's merge.

peft's OFT takes nn.Linear layers only: on GPT-2 (Conv1D layers) peftctl trains, saves and
merges OFT the same way, but peft 0.21 refuses to load such an adapter.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
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

DEFAULT_BLOCK_SIZE = 32  # peft's default oft_block_size
# The first peft release computing the Cayley-Neumann series as here; peft warns without it.
PEFT_VERSION_OF_THE_MATHS = "0.18.0"


class OftConfig(MethodConfig):
    name: Literal["oft"] = Field(description="OFT: a trained block-diagonal rotation of each targeted layer's input.")
    oft_block_size: int | None = Field(
        None, gt=0, description=f"Size b of each orthogonal block (default {DEFAULT_BLOCK_SIZE}); each layer's "
        "in_features must be a multiple of it. Trainable weights per layer: in/b · b(b-1)/2. Give this or r, not both.",
    )
    r: int | None = Field(
        None, gt=0, description="Number of blocks per layer instead of their size (b = in_features / r, so it "
        "must divide every targeted layer's in_features). Give this or oft_block_size, not both.",
    )
    target_modules: list[str] | AllLinear = Field(
        "all-linear",
        description="Linear layers to adapt: module-name suffixes such as [q_proj, v_proj] (GPT-2: [c_attn]), "
        "or 'all-linear' for every linear layer except the output head.",
    )
    block_share: bool = Field(False, description="One block shared by all of a layer's blocks: b(b-1)/2 weights per layer.")
    use_cayley_neumann: bool = Field(
        True, description="Approximate the Cayley transform by a Neumann series (peft's default: no matrix "
        "inverse, nearly orthogonal); false computes it exactly with a solve.",
    )
    num_cayley_neumann_terms: int = Field(5, gt=0, description="Terms of the Neumann series (use_cayley_neumann only).")

    @model_validator(mode="after")
    def _block_size_or_count(self) -> OftConfig:
        if self.r is not None and self.oft_block_size is not None:
            raise ValueError("give either r (blocks per layer) or oft_block_size, not both: r × oft_block_size "
                             "is each layer's in_features")
        return self


class OftRotation(nn.Module):
    """The trained entries of the skew-symmetric blocks, as peft stores them (`oft_R.weight`)."""

    def __init__(self, blocks: int, block_size: int, cfg: OftConfig, device: torch.device):
        super().__init__()
        self.block_size = block_size
        self.blocks = blocks  # how many blocks rotate the input (the weight holds 1 when shared)
        stored = 1 if cfg.block_share else blocks
        n_entries = block_size * (block_size - 1) // 2
        self.weight = nn.Parameter(torch.zeros(stored, n_entries, device=device, dtype=torch.float32))
        self.neumann_terms = cfg.num_cayley_neumann_terms if cfg.use_cayley_neumann else None
        rows, cols = torch.triu_indices(block_size, block_size, 1, device=device)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def skew(self) -> torch.Tensor:
        upper = torch.zeros(self.weight.shape[0], self.block_size, self.block_size,
                            device=self.weight.device, dtype=self.weight.dtype)
        upper[:, self.rows, self.cols] = self.weight
        return upper - upper.transpose(-2, -1)

    def matrices(self) -> torch.Tensor:
        """The orthogonal blocks, [blocks, b, b] (the one shared block repeated)."""
        q = self.skew()
        eye = torch.eye(self.block_size, device=q.device, dtype=q.dtype).expand_as(q)
        if self.neumann_terms is None:
            rotation = torch.linalg.solve(eye + q, eye - q, left=False)
        else:
            rotation = neumann_series(q, eye, self.neumann_terms)
        return rotation.expand(self.blocks, -1, -1) if rotation.shape[0] == 1 else rotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.reshape(*x.shape[:-1], self.blocks, self.block_size)
        return torch.einsum("...rk,rkc->...rc", blocks, self.matrices()).reshape(x.shape)


def neumann_series(q: torch.Tensor, eye: torch.Tensor, terms: int) -> torch.Tensor:
    """peft's truncated series, term for term: I + 2Q, then + 2Q² + … + 2Q^(n-2) + Q^(n-1) from
    three terms on (peft's loop makes 3 and 4 terms the same: I + 2Q + 2Q² + Q³)."""
    rotation = eye.clone()
    if terms > 1:
        rotation = rotation + 2.0 * q
    if terms > 2:
        power = torch.bmm(q, q)
        rotation = rotation + 2.0 * power
        for _ in range(3, terms - 1):
            power = torch.bmm(power, q)
            rotation = rotation + 2.0 * power
        rotation = rotation + torch.bmm(power, q)
    return rotation


class OftLinear(WrappedLinear):
    """A frozen linear layer (nn.Linear or GPT-2's Conv1D) whose input is rotated block by block."""

    def __init__(self, base_layer: nn.Module, block_size: int, cfg: OftConfig):
        super().__init__()
        self.base_layer = base_layer
        in_features, _, self.fan_in_fan_out = linear_shape(base_layer)
        self.oft_R = OftRotation(in_features // block_size, block_size, cfg, base_layer.weight.device)
        self.train(base_layer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Rotated in fp32 (the trained entries' precision), then back: peft's order of operations.
        rotated = self.oft_R(x.to(self.oft_R.weight.dtype))
        return self.base_layer(rotated.to(x.dtype))

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """The base layer with the rotation folded into its weight: Wᵀ ← R_bd Wᵀ, block by block."""
        rotation = self.oft_R.matrices()
        blocks, size, _ = rotation.shape
        transposed = dense_weight(self.base_layer).to(torch.float32).T  # [in, out]
        merged = torch.einsum("rkc,rco->rko", rotation, transposed.reshape(blocks, size, -1)).reshape(transposed.shape)
        merged = merged if self.fan_in_fan_out else merged.T
        self.base_layer.weight.copy_(merged.to(self.base_layer.weight.dtype))
        return self.base_layer


class OFT(WrappingMethod):
    name = "oft"
    Config = OftConfig
    peft_type = "OFT"
    examples = {"oft": {"oft_block_size": 16}}
    comparable_options = {"target_modules": "linear layers"}

    def select(self, model: nn.Module, cfg: OftConfig, base: BaseFacts) -> dict[str, nn.Module]:
        targets = match_targets(model, cfg.target_modules)
        for name, layer in targets.items():
            block_size(layer, cfg, name)  # every layer's blocks must tile its input, before any is wrapped
        return targets

    def wrap(self, module: nn.Module, cfg: OftConfig, name: str, applied: Any) -> nn.Module:
        return OftLinear(module, block_size(module, cfg, name), cfg)

    def peft_config(self, adapter: Adapter) -> dict[str, Any]:
        cfg: OftConfig = adapter.cfg
        # peft's spelling: exactly one of r and oft_block_size is non-zero.
        r, size = (cfg.r, 0) if cfg.r is not None else (0, cfg.oft_block_size or DEFAULT_BLOCK_SIZE)
        return {
            "r": r,
            "oft_block_size": size,
            "target_modules": exported_targets(adapter),
            "block_share": cfg.block_share,
            "use_cayley_neumann": cfg.use_cayley_neumann,
            "num_cayley_neumann_terms": cfg.num_cayley_neumann_terms,
            "coft": False,
            "module_dropout": 0.0,
            "fan_in_fan_out": adapter.applied.fan_in_fan_out,
            "bias": "none",
            "peft_version": PEFT_VERSION_OF_THE_MATHS,
        }

    def config_from_peft(self, peft_config: dict[str, Any], source: str) -> OftConfig:
        # module_dropout is accepted: peft 0.21 never applies it to linear layers, and it does
        # nothing at inference either way.
        reject_unsupported(peft_config, {"coft": False, "bias": "none", "modules_to_save": None,
                                         "layers_to_transform": None, "layers_pattern": None,
                                         "exclude_modules": None}, source)
        if "oft_block_size" not in peft_config:
            raise UserError("the OFT adapter has no oft_block_size: it was made by peft before 0.14, whose "
                            "OFT computed something else", file=source, where="oft_block_size",
                            fix="retrain the adapter with peft 0.18 or later, or with peftctl")
        r, size = peft_config.get("r") or None, peft_config.get("oft_block_size") or None
        return OftConfig(
            name="oft", r=r, oft_block_size=size,
            target_modules=suffix_list_from_peft(peft_config.get("target_modules"), source),
            block_share=peft_config.get("block_share", False),
            use_cayley_neumann=peft_config.get("use_cayley_neumann", True),
            num_cayley_neumann_terms=peft_config.get("num_cayley_neumann_terms", 5),
        )


def block_size(layer: nn.Module, cfg: OftConfig, name: str) -> int:
    """The layer's block size from the options, refused unless its blocks tile the input exactly.

    peft quietly moves a block size that does not divide in_features to a nearby divisor; a
    recipe here says which, so the adapter trains what its options say.
    """
    in_features = linear_shape(layer)[0]
    option, value = ("r", cfg.r) if cfg.r is not None else ("oft_block_size", cfg.oft_block_size or DEFAULT_BLOCK_SIZE)
    if in_features % value == 0:
        return value if option == "oft_block_size" else in_features // value
    divisors = [d for d in range(1, in_features + 1) if in_features % d == 0]
    nearest = sorted(divisors, key=lambda d: (abs(d - value), d))[:3]
    raise UserError(f"{option} = {value} does not divide the {in_features} input features of {name}",
                    where=option, expected=f"a divisor of {in_features} (nearest: {', '.join(map(str, nearest))})",
                    fix=f"set {option} to one of those, or leave out the layers it does not fit")


METHOD = OFT()
