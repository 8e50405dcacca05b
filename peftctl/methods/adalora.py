"""AdaLoRA, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (Zhang et al., 2023).

Each targeted linear layer gains an update in SVD form, ΔW = P Λ Q · alpha / ranknum, with
Q = `lora_A` [r, in], Λ = `lora_E` [r, 1] (its diagonal), P = `lora_B` [out, r] and `ranknum`
the initial rank (a constant buffer): peft's names and shapes, so ours are peft's saved keys.
Λ starts at 0, so training starts from the base model exactly.

Training adds what makes it adaptive, through the loop's hooks:
  * `extra_loss`: peft's orthogonality regulariser, orth_reg_weight × the mean over every P and
    Q of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F (the norm itself, not its square, as peft computes it);
  * `after_step`: peft's RankAllocator. Each step smooths every weight's sensitivity |w · ∂L/∂w|
    and its uncertainty (two EMAs, beta1 and beta2); a triplet (Pᵢ, Λᵢ, Qᵢ) scores the product
    of the two, Λᵢ's plus the means of Qᵢ's row and Pᵢ's column. The rank budget over all
    layers falls from init_r per layer to target_r with a cubic schedule between step tinit and
    step total_step − tfinal; every deltaT steps the lowest-scoring triplets beyond the budget
    have Λᵢ set to 0 (pruned ranks can come back until the final allocation, as in peft), and
    after it the final ranks stay masked.
  * `loop_state`: the two EMAs and the kept ranks, so a resumed run continues exactly.
In memory every layer keeps all init_r ranks and a mask of the kept ones; the export writes only
the kept ones with peft's `rank_pattern`, as peft's save does, and an adapter saved so (by peft
or by us) loads with its kept ranks first and the pruned ones zero, which computes the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from peftctl.arch.layers import dense_weight, linear_shape
from peftctl.core.errors import UserError
from peftctl.core.state_dicts import load_strict
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
from peftctl.methods.low_rank import add_update, low_rank_update

FACTORS = ("lora_A", "lora_E", "lora_B")  # Q, Λ, P


class AdaLoraConfig(MethodConfig):
    name: Literal["adalora"] = Field(
        description="AdaLoRA: SVD-form low-rank updates whose ranks are pruned during training to where they matter.")
    init_r: int = Field(12, gt=0, description="Rank each targeted layer starts with (peft's init_r).")
    target_r: int = Field(8, gt=0, description="Average rank per layer left after the allocation: the total "
                          "budget is target_r × the number of targeted layers, shared out by importance. Below init_r.")
    lora_alpha: float = Field(8, gt=0, description="Scale numerator: the update is multiplied by lora_alpha/init_r.")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the update's input during training.")
    target_modules: list[str] | AllLinear = Field(
        "all-linear",
        description="Linear layers to adapt: module-name suffixes such as [q_proj, v_proj] (GPT-2: [c_attn]), "
        "or 'all-linear' for every linear layer except the output head.",
    )
    tinit: int = Field(0, ge=0, description="Steps of warm-up before any rank is pruned.")
    tfinal: int = Field(0, ge=0, description="Last steps of training with the final ranks fixed (after the allocation).")
    deltaT: int = Field(1, ge=1, description="Steps between two allocations during the budget's decrease.")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA coefficient of the sensitivity |w·grad| (smoothing).")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA coefficient of the sensitivity's uncertainty.")
    orth_reg_weight: float = Field(0.5, ge=0, description="Weight of the orthogonality regulariser on P and Q "
                                   "added to the loss; 0 turns it off.")
    total_step: int | None = Field(
        None, gt=0, description="Steps the budget schedule spans (peft's total_step). Omit for the run's own "
        "number of steps (train.max_steps, or the epochs' steps); the export writes the value used.")


class SVDLinear(WrappedLinear):
    """A frozen linear layer (nn.Linear or GPT-2's Conv1D) plus P Λ Q · alpha/ranknum, with the
    rank allocator's statistics for its three factors."""

    def __init__(self, base_layer: nn.Module, cfg: AdaLoraConfig):
        super().__init__()
        self.base_layer = base_layer
        in_features, out_features, self.fan_in_fan_out = linear_shape(base_layer)
        r = cfg.init_r
        # Trainable weights stay in fp32 whatever the base's precision (peft's init: normal(0, 0.02), Λ = 0).
        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory).normal_(0.0, 0.02))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory).normal_(0.0, 0.02))
        self.scaling = cfg.lora_alpha
        # The rank the update is scaled by stays init_r while ranks are pruned (as in peft).
        self.register_buffer("ranknum", torch.full((1,), float(r), **factory), persistent=False)
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=factory["device"]), persistent=False)
        for factor in FACTORS:
            like = getattr(self, factor)
            self.register_buffer(f"sensitivity_{factor}", torch.zeros_like(like), persistent=False)
            self.register_buffer(f"uncertainty_{factor}", torch.zeros_like(like), persistent=False)
        self.dropout = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        self.train(base_layer.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        weighted = self.lora_A * self.lora_E  # Λ Q: [r, in]
        if not torch.is_autocast_enabled(x.device.type):
            update = low_rank_update(x, weighted, self.lora_B, self.scaling, self.dropout)
        else:
            update = F.linear(F.linear(self.dropout(x.to(weighted.dtype)), weighted), self.lora_B) * self.scaling
        return add_update(result, update / (self.ranknum + 1e-5))

    def delta_weight(self) -> torch.Tensor:
        """ΔW as [out, in], in fp32."""
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + 1e-5)

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        merged = dense_weight(self.base_layer).to(torch.float32) + self.delta_weight()
        self.base_layer.weight.copy_((merged.T if self.fan_in_fan_out else merged).to(self.base_layer.weight.dtype))
        return self.base_layer

    # --- the rank allocator's share of the work, per layer (peft's RankAllocator) ----------------

    def allocator_state(self) -> dict[str, torch.Tensor]:
        names = [f"{kind}_{factor}" for factor in FACTORS for kind in ("sensitivity", "uncertainty")]
        return {name: getattr(self, name) for name in (*names, "rank_mask")}

    @torch.no_grad()
    def update_sensitivity(self, beta1: float, beta2: float) -> None:
        for factor in FACTORS:
            param = getattr(self, factor)
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            importance = (param * grad).abs()
            sensitivity, uncertainty = getattr(self, f"sensitivity_{factor}"), getattr(self, f"uncertainty_{factor}")
            # peft's expressions exactly (not fused in-place updates), so the masks match bit for bit.
            sensitivity.copy_(beta1 * sensitivity + (1 - beta1) * importance)
            uncertainty.copy_(beta2 * uncertainty + (1 - beta2) * (importance - sensitivity).abs())

    @torch.no_grad()
    def reset_sensitivity(self) -> None:
        for name, tensor in self.allocator_state().items():
            if name != "rank_mask":
                tensor.zero_()

    @torch.no_grad()
    def rank_scores(self) -> torch.Tensor:
        """Each triplet's importance: Λᵢ's score plus the means of Qᵢ's row and Pᵢ's column ([r])."""
        def score(factor: str) -> torch.Tensor:
            return getattr(self, f"sensitivity_{factor}") * getattr(self, f"uncertainty_{factor}")

        rows = torch.mean(score("lora_A"), dim=1, keepdim=True)
        columns = torch.mean(score("lora_B"), dim=0, keepdim=False).view(-1, 1)
        return score("lora_E").view(-1) + (rows + columns).view(-1)

    @torch.no_grad()
    def keep_ranks(self, keep: torch.Tensor) -> None:
        self.rank_mask.copy_(keep)
        self.apply_rank_mask()

    @torch.no_grad()
    def apply_rank_mask(self) -> None:
        self.lora_E.masked_fill_(~self.rank_mask.view(-1, 1), 0.0)

    def kept(self) -> dict[str, torch.Tensor]:
        """The factors restricted to the kept ranks (peft's saved shapes after an allocation)."""
        keep = self.rank_mask
        return {"lora_A": self.lora_A[keep], "lora_E": self.lora_E[keep], "lora_B": self.lora_B[:, keep]}


@dataclass
class AdaLoraApplied(Applied):
    # The run's number of steps the allocator scheduled for when total_step is unset (the loop
    # tells it at every step), so the export writes the schedule that was used.
    run_steps: int | None = None


@dataclass(frozen=True)
class BudgetSchedule:
    """peft's budget_schedule: how many ranks all layers may keep after each step."""

    init_budget: int
    target_budget: int
    tinit: int
    final_step: int  # total_step − tfinal: the last allocation; the ranks stay fixed after it
    delta_t: int

    def at(self, step: int) -> tuple[int, bool]:
        """The budget after `step`, and whether the ranks are allocated to it now."""
        if step <= self.tinit:
            return self.init_budget, False
        if step > self.final_step:
            return self.target_budget, True
        remaining = 1 - (step - self.tinit) / (self.final_step - self.tinit)
        budget = int((self.init_budget - self.target_budget) * (remaining ** 3) + self.target_budget)
        return budget, step % self.delta_t == 0


class AdaLoRA(WrappingMethod):
    name = "adalora"
    Config = AdaLoraConfig
    peft_type = "ADALORA"
    examples = {"adalora": {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "total_step": 5}}
    comparable_options = {"target_modules": "linear layers"}

    def select(self, model: nn.Module, cfg: AdaLoraConfig, base: BaseFacts) -> dict[str, nn.Module]:
        if cfg.target_r >= cfg.init_r:
            raise UserError(f"target_r = {cfg.target_r} leaves nothing to prune from init_r = {cfg.init_r}",
                            where="target_r", expected=f"target_r < init_r ({cfg.init_r})",
                            fix="lower target_r, or raise init_r (peft's defaults: init_r 12, target_r 8)")
        if cfg.total_step is not None:
            check_schedule(cfg, cfg.total_step, "total_step")
        return within_rank(match_targets(model, cfg.target_modules), cfg.init_r, cfg.target_modules,
                           key="init_r", usual="12")

    def record(self, model: nn.Module, cfg: AdaLoraConfig, selected: dict[str, nn.Module]) -> AdaLoraApplied:
        applied = super().record(model, cfg, selected)
        return AdaLoraApplied(applied.targets, applied.fan_in_fan_out)

    def wrap(self, module: nn.Module, cfg: AdaLoraConfig, name: str, applied: AdaLoraApplied) -> nn.Module:
        return SVDLinear(module, cfg)

    @staticmethod
    def layers(adapter: Adapter) -> dict[str, SVDLinear]:
        return {name: adapter.model.get_submodule(name) for name in adapter.applied.targets}

    # --- the loop's hooks ---------------------------------------------------------------------

    def extra_loss(self, adapter: Adapter) -> torch.Tensor | None:
        cfg: AdaLoraConfig = adapter.cfg
        if cfg.orth_reg_weight == 0:
            return None
        norms = []
        for layer in self.layers(adapter).values():
            # In fp32 under a 16-bit autocast too: the factors are fp32 and near-orthogonal.
            with torch.autocast(layer.lora_A.device.type, enabled=False):
                for gram in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):
                    identity = torch.eye(*gram.shape, dtype=gram.dtype, device=gram.device)
                    norms.append(torch.norm(gram - identity, p="fro"))
        return cfg.orth_reg_weight * (sum(norms) / len(norms))

    def after_step(self, adapter: Adapter, step: int, total_steps: int) -> None:
        """peft's update_and_allocate(step): called after optimizer.step(), with the gradients present."""
        cfg: AdaLoraConfig = adapter.cfg
        layers = self.layers(adapter)
        refuse_sharded(layers)
        if cfg.total_step is None:
            adapter.applied.run_steps = total_steps
            check_schedule(cfg, total_steps, "train.max_steps")
        schedule = self.schedule(adapter)
        if step < schedule.final_step:
            for layer in layers.values():
                layer.update_sensitivity(cfg.beta1, cfg.beta2)
            budget, allocate = schedule.at(step)
            if allocate:
                allocate_ranks(layers, schedule.init_budget - budget)
        elif step == schedule.final_step:
            allocate_ranks(layers, schedule.init_budget - schedule.target_budget)
            for layer in layers.values():
                layer.reset_sensitivity()  # peft's reset_ipt: they are not used again
        else:
            for layer in layers.values():
                layer.apply_rank_mask()

    def schedule(self, adapter: Adapter) -> BudgetSchedule:
        cfg: AdaLoraConfig = adapter.cfg
        count = len(adapter.applied.targets)
        return BudgetSchedule(cfg.init_r * count, cfg.target_r * count, cfg.tinit,
                              self.total_step(adapter) - cfg.tfinal, cfg.deltaT)

    def total_step(self, adapter: Adapter) -> int:
        """total_step, else the run's steps, else (never trained in a loop) the smallest peft accepts."""
        cfg: AdaLoraConfig = adapter.cfg
        return cfg.total_step or adapter.applied.run_steps or cfg.tinit + cfg.tfinal + 1

    def loop_state(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        return {f"{name}.{key}": tensor for name, layer in self.layers(adapter).items()
                for key, tensor in layer.allocator_state().items()}

    # --- peft's format ------------------------------------------------------------------------

    def rank_pattern(self, adapter: Adapter) -> dict[str, list[bool]] | None:
        """peft's rank_pattern (module path + '.lora_E' → kept flags), None before any allocation."""
        layers = self.layers(adapter)
        if all(bool(layer.rank_mask.all()) for layer in layers.values()):
            return None
        return {f"{name}.lora_E": layer.rank_mask.tolist() for name, layer in layers.items()}

    def export_state(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        pruned = self.rank_pattern(adapter) is not None
        state = {}
        for name, layer in self.layers(adapter).items():
            factors = layer.kept() if pruned else {factor: getattr(layer, factor) for factor in FACTORS}
            state.update({f"{PEFT_KEY_PREFIX}{name}.{factor}": t.detach() for factor, t in factors.items()})
        return state

    def import_state(self, adapter: Adapter, state: dict[str, torch.Tensor], source: str) -> None:
        """Weights with all ranks, or only the kept ones (after an allocation): those fill the first
        ranks and the rest stay pruned, which computes what peft's resized layers compute."""
        layers = self.layers(adapter)
        kept = {}
        for name, layer in layers.items():
            saved_e = state.get(f"{PEFT_KEY_PREFIX}{name}.lora_E")
            kept[name] = int(saved_e.shape[0]) if saved_e is not None and saved_e.dim() > 0 else layer.rank_mask.numel()
        # Views of the first ranks, so the strict load writes into the parameters themselves.
        expected = {}
        for name, layer in layers.items():
            k = kept[name]
            expected.update({f"{PEFT_KEY_PREFIX}{name}.lora_A": layer.lora_A.detach()[:k],
                             f"{PEFT_KEY_PREFIX}{name}.lora_E": layer.lora_E.detach()[:k],
                             f"{PEFT_KEY_PREFIX}{name}.lora_B": layer.lora_B.detach()[:, :k]})
        load_strict(expected, state, source)
        with torch.no_grad():
            for name, layer in layers.items():
                k = kept[name]
                layer.lora_A[k:].zero_()
                layer.lora_E[k:].zero_()
                layer.lora_B[:, k:].zero_()
                layer.rank_mask.copy_(torch.arange(layer.rank_mask.numel(), device=layer.rank_mask.device) < k)

    def peft_config(self, adapter: Adapter) -> dict[str, Any]:
        cfg: AdaLoraConfig = adapter.cfg
        return {
            "init_r": cfg.init_r,
            "target_r": cfg.target_r,
            "lora_alpha": int(cfg.lora_alpha) if float(cfg.lora_alpha).is_integer() else cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout,
            "target_modules": exported_targets(adapter),
            "tinit": cfg.tinit,
            "tfinal": cfg.tfinal,
            "deltaT": cfg.deltaT,
            "beta1": cfg.beta1,
            "beta2": cfg.beta2,
            "orth_reg_weight": cfg.orth_reg_weight,
            "total_step": self.total_step(adapter),
            "rank_pattern": self.rank_pattern(adapter),
            "fan_in_fan_out": adapter.applied.fan_in_fan_out,
            "bias": "none",
        }

    def config_from_peft(self, peft_config: dict[str, Any], source: str) -> AdaLoraConfig:
        # rank_pattern needs no option: the saved shapes say how many ranks each layer kept.
        reject_unsupported(
            peft_config,
            {"bias": "none", "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None,
             "lora_bias": False, "trainable_token_indices": None, "layer_replication": None,
             "exclude_modules": None, "target_parameters": None, "use_dora": False},
            source,
        )
        targets = suffix_list_from_peft(peft_config.get("target_modules"), source)
        defaults = AdaLoraConfig.model_fields
        options = {key: peft_config.get(key, defaults[key].default) for key in
                   ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight")}
        return AdaLoraConfig(
            name="adalora", **options,
            lora_alpha=peft_config.get("lora_alpha", 8),
            lora_dropout=peft_config.get("lora_dropout", 0.0),
            target_modules=targets if targets is not None else [],
            total_step=peft_config.get("total_step"),
        )


def check_schedule(cfg: AdaLoraConfig, total_step: int, steps_key: str) -> None:
    """peft's own check: tinit and tfinal must leave steps for the budget to fall."""
    if cfg.tinit >= total_step - cfg.tfinal:
        raise UserError(f"tinit = {cfg.tinit} and tfinal = {cfg.tfinal} leave no step for the rank budget to "
                        f"fall in a schedule of {total_step} steps", where="tinit",
                        expected=f"tinit < {total_step} - tfinal",
                        fix=f"lower tinit or tfinal, or raise {steps_key}")


def refuse_sharded(layers: dict[str, SVDLinear]) -> None:
    from torch.distributed.tensor import DTensor

    if any(isinstance(layer.lora_E, DTensor) for layer in layers.values()):
        raise UserError("AdaLoRA's rank allocation ranks every layer's whole gradients, which FSDP shards",
                        where="accelerate config (distributed_type: FSDP)",
                        fix="launch DDP instead: accelerate launch --multi_gpu --num_processes N -m peftctl train RECIPE")


def allocate_ranks(layers: dict[str, SVDLinear], pruned: int) -> None:
    """peft's mask_to_budget: prune the `pruned` lowest-scoring ranks over all layers (ties included)."""
    if pruned <= 0:
        return
    scores = {name: layer.rank_scores() for name, layer in layers.items()}
    threshold = torch.kthvalue(torch.cat(list(scores.values())), k=pruned)[0].item()
    for name, layer in layers.items():
        layer.keep_ranks(scores[name] > threshold)


METHOD = AdaLoRA()
