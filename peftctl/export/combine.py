"""Several LoRA adapters of one base combined into one adapter, in peft's format.

The semantics are peft's `LoraModel.add_weighted_adapter` for its combinations without an SVD;
peft is the tests' oracle, not a dependency. Adapter i has weight w_i and its own scale s_i
(alpha/r, or alpha/√r for rsLoRA). The combined adapter has lora_alpha = r, so its own scale is
1: every s_i is folded into the tensors, and the result is a plain LoRA whatever the inputs were.

- cat: A = [w_1·s_1·A_1; …; w_n·s_n·A_n], B = [B_1 … B_n]. The ranks add up and
  B·A = Σ w_i·s_i·B_i·A_i exactly.
- linear: A = Σ ±√|w_i·s_i|·A_i, B = Σ √|w_i·s_i|·B_i (the sign on A only, so a negative weight
  subtracts). Needs one rank. B·A also holds the cross terms B_i·A_j: a rough approximation of
  the weighted sum, as peft's documentation warns.
- ties (TIES-merging, Yadav et al. 2023): per A and per B tensor, keep each adapter's `density`
  largest-magnitude entries, elect each entry's sign by the sum over adapters, and average the
  weighted entries that agree with it.
- dare_linear / dare_ties (DARE, Yu et al. 2024): drop entries at random, keeping each with
  probability `density` and rescaling by 1/density, then the linear sum or ties' election.
ties and dare work on the A and B tensors separately, not on B·A, exactly as peft's do.

DARE is random. Its masks come from a torch.Generator seeded with `seed`, drawn layer by layer in
the model's module order, the A tensors before the B tensors, adapter by adapter. That is the
order in which peft draws from torch's global generator, so peft gives the same masks when
`torch.manual_seed(seed)` runs right before it starts drawing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from peftctl.core.errors import UserError, did_you_mean
from peftctl.core.files import check_path, check_replaceable, writing
from peftctl.export.adapter_base import base_model_spec, check_same_base, saved_base
from peftctl.export.adapter_files import CONFIG_FILE, WEIGHTS_FILE, adapter_method, adapter_task, prepare_adapter, read_weights, save_adapter
from peftctl.methods import Adapter
from peftctl.methods.base import PEFT_KEY_PREFIX
from peftctl.methods.lora import METHOD as LORA, LoraConfig
from peftctl.methods.lora_init import BASE_CHANGING
from peftctl.model.loading import base_facts

COMBINATIONS = ("cat", "linear", "ties", "dare_linear", "dare_ties")
PRUNED = ("ties", "dare_linear", "dare_ties")  # the ones that take a density
RANDOM = ("dare_linear", "dare_ties")  # the ones that take a seed
ONE_RANK = ("linear", "ties", "dare_linear", "dare_ties")  # entry-by-entry on A and B
DEFAULT_DENSITY = 0.5
DEFAULT_SEED = 0
# peft's other combination types, which peftctl does not implement (all need an SVD but one).
NOT_IMPLEMENTED = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")


def check_options(how: str, count: int, weights: list[float] | None, density: float | None,
                  seed: int | None) -> tuple[list[float], float | None, int | None]:
    """The weights, density and seed to combine `count` adapters with `how`, defaults filled in:
    a weight of 1 each (their sum), density 0.5 for ties and DARE, seed 0 for DARE."""
    choices = ", ".join(COMBINATIONS)
    if how in NOT_IMPLEMENTED:
        raise UserError(f"peft's combination '{how}' is not implemented in peftctl", where="--combine",
                        expected=choices, fix="use one of those (cat is exact; peft can make the others)")
    if how not in COMBINATIONS:
        raise UserError(f"unknown combination '{how}'", where="--combine", expected=choices,
                        fix=did_you_mean(how, COMBINATIONS) or "pass one of those")
    if count < 2:
        raise UserError("combining needs two or more adapters", where="--combine",
                        fix="pass more adapter folders, or drop --combine to merge one adapter into its base model")
    weights = [1.0] * count if weights is None else list(weights)
    if len(weights) != count:
        raise UserError(f"{len(weights)} weight(s) for {count} adapters", where="--weights",
                        expected="one weight per adapter, in the adapters' order",
                        fix=f"pass {count} numbers, e.g. --weights {' '.join(['0.5'] * count)}")
    if not all(math.isfinite(w) for w in weights):
        raise UserError(f"weights must be finite numbers, not {weights}", where="--weights")
    if how in PRUNED:
        density = DEFAULT_DENSITY if density is None else density
        if not 0 < density <= 1:
            raise UserError(f"density {density} is outside (0, 1]", where="--density",
                            expected="the fraction of each tensor's entries to keep: 0 < density ≤ 1",
                            fix="pass e.g. --density 0.5")
    elif density is not None:
        raise UserError(f"--density does nothing with --combine {how}", where="--density",
                        expected=f"--density with {', '.join(PRUNED)} only", fix="drop --density")
    if how in RANDOM:
        seed = DEFAULT_SEED if seed is None else seed
    elif seed is not None:
        raise UserError(f"--seed does nothing with --combine {how}: it draws no random numbers", where="--seed",
                        expected=f"--seed with {', '.join(RANDOM)} only", fix="drop --seed")
    return weights, density, seed


def lora_options(folder: Path) -> LoraConfig:
    """The LoRA options of the adapter in `folder`; any other kind of adapter is refused."""
    method, cfg = adapter_method(folder)
    source = Path(folder) / CONFIG_FILE
    fix = "combine plain LoRA or rsLoRA adapters of one base model"
    if method is not LORA:
        raise UserError(f"a {method.peft_type} adapter cannot be combined: peftctl combines LoRA adapters only",
                        file=source, where="peft_type", expected="peft_type: LORA", fix=fix)
    if cfg.use_dora:
        # peft's add_weighted_adapter accepts DoRA and silently gives the result fresh magnitudes
        # (peft issue #3761): a weighted combination of the low-rank parts has no place for them.
        raise UserError("a DoRA adapter cannot be combined: its learned magnitude per output unit has no "
                        "counterpart in a weighted combination of low-rank updates", file=source,
                        where="use_dora", expected="use_dora: false", fix=fix)
    if cfg.target_parameters:
        raise UserError("an adapter of expert parameters cannot be combined (nor in peft)", file=source,
                        where="target_parameters", fix=fix)
    if cfg.init in BASE_CHANGING:
        raise UserError(f"an unconverted {cfg.init} adapter cannot be combined: it was trained on the base with "
                        "its principal part removed, not on the base the others share", file=source,
                        where="init_lora_weights", fix="convert it to a plain LoRA first (peft's "
                        "path_initial_model_for_weight_conversion; peftctl train exports it converted)")
    return cfg


def scale(cfg: LoraConfig) -> float:
    return cfg.alpha / (math.sqrt(cfg.r) if cfg.use_rslora else cfg.r)


def combine_adapters(folders: list[Path], out: Path, how: str = "cat", weights: list[float] | None = None,
                     density: float | None = None, seed: int | None = None, base: str | None = None,
                     trust_remote_code: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Combine the LoRA adapters in `folders` into one adapter folder `out`; return its figures.

    Everything that can be checked is checked before any weights are read: the options, that each
    adapter is a LoRA of the same base, its ranks, the output folder, and (on a weightless
    skeleton of the base) that the adapters adapt the same layers with the shapes the base has.
    """
    from peftctl.model.loading import load_skeleton, model_files

    folders = [Path(folder) for folder in folders]
    weights, density, seed = check_options(how, len(folders), weights, density, seed)
    for folder in folders:
        check_path(folder, "the adapter folder")
        if not folder.is_dir():
            raise UserError("no such adapter folder", file=folder)
        if (task := adapter_task(folder)) != "causal_lm":
            raise UserError(f"a {task} adapter cannot be combined: each has its own head, trained whole, and heads "
                            "of different classifiers do not add up", file=folder,
                            fix="combine causal LM adapters; evaluate classifiers side by side with peftctl eval")
    configs = [lora_options(folder) for folder in folders]
    check_same_base(folders, "be combined", named=base is None)
    if how in ONE_RANK:
        for folder, cfg in zip(folders, configs):
            if cfg.r != configs[0].r:
                raise UserError(f"r = {cfg.r}, but {folders[0]} has r = {configs[0].r}: --combine {how} combines "
                                "the A and B tensors entry by entry, which needs one rank (as peft)",
                                file=folder / CONFIG_FILE, where="r", expected=f"r = {configs[0].r}",
                                fix="use --combine cat (the ranks add up), or adapters of one rank")
    spec = base_model_spec(folders[0], base, trust_remote_code)
    check_replaceable(out, overwrite, "--out", (CONFIG_FILE,), inputs={
        **{f"input adapter {i}": folder for i, folder in enumerate(folders, 1)}, "the base model": model_files(spec)})
    adapters = [prepare_adapter(load_skeleton(spec), folder, base_facts(spec)) for folder in folders]
    check_same_layers(folders, adapters)
    states = []
    for folder, adapter in zip(folders, adapters):
        state = read_weights(folder / WEIGHTS_FILE)
        adapter.load_state_dict(state, str(folder / WEIGHTS_FILE))  # keys, shapes, finite values
        states.append({key: tensor.to(torch.float32) for key, tensor in state.items()})

    rank = sum(cfg.r for cfg in configs) if how == "cat" else configs[0].r
    combined = combined_skeleton(load_skeleton(spec), configs[0], rank, how)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    scaled = [w * scale(cfg) for w, cfg in zip(weights, configs)]
    state, error = {}, Residual()
    for layer in adapters[0].applied.targets:  # the model's module order: DARE's draws depend on it
        keys = [PEFT_KEY_PREFIX + f"{layer}.lora_{side}.weight" for side in "AB"]
        a_tensors, b_tensors = ([s[key] for s in states] for key in keys)
        if how == "cat":
            # peft's operation order, (A·w)·s, so the result matches its bit for bit.
            a = torch.cat([a * w * scale(cfg) for a, w, cfg in zip(a_tensors, weights, configs)], dim=0)
            b = torch.cat(b_tensors, dim=1)
        else:
            a_weights = torch.tensor([math.copysign(math.sqrt(abs(ws)), ws) for ws in scaled])
            b_weights = torch.tensor([math.sqrt(abs(ws)) for ws in scaled])
            a = merge_tensors(how, a_tensors, a_weights, density, generator)
            b = merge_tensors(how, b_tensors, b_weights, density, generator)
        state[keys[0]], state[keys[1]] = a, b
        error.add(b @ a, sum(ws * (bi @ ai) for ws, ai, bi in zip(scaled, a_tensors, b_tensors)))
    combined.load_state_dict(state, "the combined adapter")  # the keys and shapes its own config implies
    # The config names the base the adapters say they share (not --base, which may be a local
    # copy of it); for adapters that name none, --base.
    own = saved_base(folders[0], named=False)
    named = isinstance(own["name_or_path"], str) and own["name_or_path"]
    name, revision = (own["name_or_path"], own["revision"]) if named else (spec.name_or_path, spec.revision)
    with writing(out, "the combined adapter"):
        save_adapter(combined, out, name, revision=revision, state=state)
    return {"adapter_dir": str(out), "combine": how, "adapters": [str(folder) for folder in folders],
            "weights": weights, "density": density, "seed": seed, "r": rank, "lora_alpha": rank,
            "layers": len(adapters[0].applied.targets), "base_model": name,
            "update_relative_error": error.value()}


def check_same_layers(folders: list[Path], adapters: list[Adapter]) -> None:
    """peft combines adapters of different layers (each layer from those that have it);
    peftctl refuses, since a layer's weights would then mean something else per layer."""
    expected = adapters[0].applied.targets
    for folder, adapter in zip(folders[1:], adapters[1:]):
        if adapter.applied.targets != expected:
            extra = sorted(set(adapter.applied.targets) - set(expected))
            missing = sorted(set(expected) - set(adapter.applied.targets))
            raise UserError(f"this adapter adapts other layers than {folders[0]}: "
                            + "; ".join(part for part in (extra and f"only here: {', '.join(extra[:4])}",
                                                          missing and f"not here: {', '.join(missing[:4])}") if part),
                            file=folder / CONFIG_FILE, where="target_modules",
                            expected="adapters with the same target_modules", fix="combine adapters of the same layers")


def combined_skeleton(skeleton, first: LoraConfig, rank: int, how: str) -> Adapter:
    """The combined adapter applied to a weightless skeleton: its config, and the keys and shapes
    its weights must have. Scale 1 (lora_alpha = r), not rsLoRA: each adapter's own scale is
    already in its tensors. (peft 0.21 keeps the first adapter's use_rslora, which scales the
    result by √r more: peft PR #3449.)"""
    cfg = LoraConfig(name="lora", r=rank, alpha=rank, dropout=first.dropout, target_modules=first.target_modules)
    try:
        return LORA.apply(skeleton, cfg)
    except UserError as err:
        if how != "cat" or err.where != "r":
            raise
        raise UserError(f"--combine cat adds the ranks up to r = {rank}: {err.problem.split(' is ', 1)[1]}",
                        where="--combine", expected=err.expected,
                        fix="combine fewer adapters, or use --combine linear or ties (one rank)") from None


def merge_tensors(how: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None,
                  generator: torch.Generator | None) -> torch.Tensor:
    """One combined A (or B) from the adapters' `tensors`, as peft's merge_utils computes it."""
    if how == "ties":
        tensors = [keep_largest(t, density) for t in tensors]
    elif how in RANDOM:
        tensors = [keep_at_random(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * weights.view(-1, *[1] * (stacked.dim() - 1))
    if how in ("linear", "dare_linear"):
        return weighted.sum(dim=0)
    # The sign elected per entry: that of the sum of the (pruned, unweighted) entries, ties to +.
    agree = stacked.sign() == torch.where(stacked.sum(dim=0) >= 0, 1, -1)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def keep_largest(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """The tensor with all but its int(density · size) largest-magnitude entries set to zero."""
    if density >= 1:
        return tensor
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    mask[torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel())).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def keep_at_random(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Each entry kept with probability `density` and divided by it (so the expectation stays);
    at density 1 nothing is drawn, as in peft, so later draws stay aligned with its own."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


class Residual:
    """How far the combined update B·A is from the weighted sum of the adapters' own updates,
    Σ w_i·s_i·B_i·A_i, over all layers: ‖difference‖ / ‖sum‖ (Frobenius). About 1e-7 for cat
    (exact up to rounding); for the others, what the approximation or the pruning costs."""

    def __init__(self) -> None:
        self.difference = self.total = 0.0

    def add(self, got: torch.Tensor, wanted: torch.Tensor) -> None:
        self.difference += float((got.double() - wanted.double()).square().sum())
        self.total += float(wanted.double().square().sum())

    def value(self) -> float:
        return math.sqrt(self.difference / self.total) if self.total else 0.0
