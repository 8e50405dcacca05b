"""The contract every PEFT method implements, and the helpers methods share.

A method is one file in this folder holding three things:
  * its recipe options, a pydantic model derived from `MethodConfig` with a `name` literal;
  * its layers (plain `nn.Module`s that keep what they wrap as `base_layer`);
  * a `Method` subclass that injects or selects the trainable parameters (`apply`), describes
    them in `peft`'s on-disk format (`peft_config`, `export_state` / `import_state`) and, where
    the maths allows, folds them into the base weights (`merge`).
Most methods replace chosen layers by their own: they derive from `WrappingMethod`, which owns
freezing, replacing, collecting the trainable parameters and merging, so such a method only
says which layers (`select`) and what each becomes (`wrap`).
The training loop, the pipeline and the CLI only see `Adapter`, which is what `apply` returns;
a method that needs more from the loop (parameter groups, an extra loss term, work after each
step, state a checkpoint must keep) overrides the hooks below, which the loop always calls.
Errors a method raises name its own options (`target_modules`); the registry adds `method.`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from peftctl.arch.layers import linear_layers, linear_shape
from peftctl.core.errors import UserError
from peftctl.core.state_dicts import load_strict
from peftctl.methods.peft_names import peft_names

# peft prefixes every saved key with the wrapper path of its PeftModel.
PEFT_KEY_PREFIX = "base_model.model."
AllLinear = Literal["all-linear"]


class MethodConfig(BaseModel):
    """Options shared by every method; each method adds its own fields and a `name` literal."""

    model_config = ConfigDict(extra="forbid")
    # Options that steer training but are not part of the adapter (no exported field depends on
    # them): an adapter continued with `model.adapter` takes the recipe's values for these.
    training_only: ClassVar[frozenset[str]] = frozenset()


@dataclass(frozen=True)
class BaseFacts:
    """What a method may know of the base model beyond its modules, given to `Method.apply`.

    The model alone cannot say these: a weightless skeleton on the meta device is not quantized
    yet, though the recipe will quantize it (LoRA refuses PiSSA on a quantized base before the
    weights load), and the model keeps no tokenizer (prompt tuning's `init_text`).
    """

    quantized: bool = False  # the frozen linear layers are, or will be, stored in 4 or 8 bits
    tokenizer: Callable[[], Any] | None = None  # loads the base's tokenizer; only called by a method that needs it
    task: str = "causal_lm"  # what the model is trained for (arch/tasks.py): a classifier's head trains whole
    head: tuple[str, ...] | None = None  # the modules that train whole, where an adapter's config names them


@dataclass
class Applied:
    """What `apply` did, as the method's merge and export need it: the modules it replaced.

    Methods that record more derive from this (typed fields, not a dict of string keys).
    """

    targets: list[str]
    fan_in_fan_out: bool = False  # a replaced layer is GPT-2's Conv1D (weight stored [in, out])


class Method:
    """One PEFT method. Subclasses set the class attributes and implement `apply`."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    # The `peft_type` written to adapter_config.json (peft's own name where peft has the method).
    peft_type: ClassVar[str]
    # Whether the installed peft reads and writes this peft_type: the test suite's oracle then.
    in_peft: ClassVar[bool] = True
    # Why the method cannot be folded into the base weights; None when it can.
    merge_refusal: ClassVar[str | None] = None
    # Whether it feeds the model a prefilled KV cache, which gradient checkpointing drops.
    feeds_kv_cache: ClassVar[bool] = False
    # Where peft saves the modules that train whole (a classifier's head) for this method: under the
    # wrapper path of its model, which is one level shorter for the prompt-learning methods.
    head_key_prefix: ClassVar[str] = PEFT_KEY_PREFIX
    # Small, valid option sets (without `name`), by a label: what the cross-method tests run.
    # Each should make a non-trivial adapter on a tiny model; the first is the method's plain form.
    examples: ClassVar[dict[str, dict[str, Any]]] = {}

    # --- what a comparison of methods on one recipe (`peftctl bakeoff`) trains it with -------------
    # Named forms of this method that are asked for as methods of their own (LoRA's "dora":
    # use_dora: true); the plain name means none of their options.
    variants: ClassVar[dict[str, dict[str, Any]]] = {}
    # Options whose value means the same thing in another method that has the option under the same
    # meaning: option -> meaning. A recipe's value carries over only between equal meanings (LoRA's
    # `r` to LoHa's, not to VeRA's shared rank).
    comparable_options: ClassVar[dict[str, str]] = {}
    # Options given where the recipe gives none, so that the method trains on any model.
    suggested_options: ClassVar[dict[str, Any]] = {}
    # The AdamW learning rate the method is trained at by the source named, on the scale where LoRA
    # trains at 1e-4 (peft's method comparison): methods without a source of their own train as LoRA.
    suggested_lr: ClassVar[float] = 1e-4
    lr_source: ClassVar[str | None] = None

    def apply(self, model: nn.Module, cfg: MethodConfig, base: BaseFacts = BaseFacts()) -> Adapter:
        """Freeze `model`, add or select this method's parameters in place, return them. `base`
        is all a method may know of the model beyond its modules."""
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

    # --- hooks the training loop calls; the defaults do nothing --------------------------------

    def lr_scales(self, adapter: Adapter) -> dict[str, float]:
        """Learning-rate multipliers by parameter name (absent: 1); the loop makes one group per value."""
        return {}

    def extra_loss(self, adapter: Adapter) -> torch.Tensor | None:
        """A term added to each optimizer step's loss (e.g. a regulariser on the adapter weights)."""
        return None

    def after_step(self, adapter: Adapter, step: int, total_steps: int) -> None:
        """Called after each optimizer step, before the gradients are cleared."""

    def loop_state(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        """Tensors besides the weights that a checkpoint must keep for an exact resume."""
        return {}

    def restore_loop_state(self, adapter: Adapter, state: dict[str, torch.Tensor], source: str) -> None:
        """Load what `loop_state` saved (the same keys and shapes)."""
        load_strict(self.loop_state(adapter), state, source, whose="checkpoint")


@dataclass
class Adapter:
    """A method applied to a model: what the training loop trains and the exporter writes."""

    method: Method
    cfg: MethodConfig
    model: nn.Module
    # Trainable parameters by their name in `model`: the only tensors AdamW sees.
    params: dict[str, nn.Parameter]
    # What the method recorded while applying itself (its own `Applied` subclass).
    applied: Any = None
    # Linear layers 'all-linear' names that the method left out (within_rank), for `validate` to say.
    skipped: list[str] = field(default_factory=list)
    # Modules that train whole beside the method (a classifier's new head: peft's modules_to_save);
    # their parameters are in `params` too, and are saved under their own names.
    head: list[str] = field(default_factory=list)
    task: str = "causal_lm"  # the task the model was loaded for (BaseFacts.task): peft's task_type

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.params.values())

    # The loop calls the method's hooks through these, so its errors name recipe keys.
    def lr_scales(self) -> dict[str, float]:
        with options_named(self.cfg):
            return self.method.lr_scales(self)

    def extra_loss(self) -> torch.Tensor | None:
        with options_named(self.cfg):
            return self.method.extra_loss(self)

    def after_step(self, step: int, total_steps: int) -> None:
        with options_named(self.cfg):
            self.method.after_step(self, step, total_steps)

    def loop_state(self) -> dict[str, torch.Tensor]:
        return self.method.loop_state(self)

    def restore_loop_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        self.method.restore_loop_state(self, state, source)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.method.export_state(self._method_part()), **self._head_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        head = self._head_state()
        method_part = self._method_part()
        self.method.import_state(method_part, {k: v for k, v in state.items() if k not in head}, source)
        load_strict(head, {k: v for k, v in state.items() if k in head}, source)
        self.params = {**method_part.params, **self.head_params()}  # a method may rebuild its own on import

    def train_whole(self, modules: list[str]) -> None:
        """Train `modules` whole beside the method (peft's modules_to_save), e.g. a classifier's head:
        in float32 like every trainable weight, its inputs cast to it (the base may compute in bf16)."""
        self.head = list(modules)
        for name in modules:
            module = self.model.get_submodule(name)
            if not getattr(module, "_peftctl_trained_whole", False):
                module.float().requires_grad_(True)
                module.register_forward_pre_hook(_to_float32)
                module._peftctl_trained_whole = True
        self.params.update(self.head_params())

    def head_params(self) -> dict[str, nn.Parameter]:
        return {f"{name}.{param_name}": p for name in self.head
                for param_name, p in self.model.get_submodule(name).named_parameters()}

    def _method_part(self) -> Adapter:
        """This adapter without its head: what the method exports and imports, by its own rules."""
        if not self.head:
            return self
        head = self.head_params()
        return replace(self, params={k: p for k, p in self.params.items() if k not in head}, head=[])

    def _head_state(self) -> dict[str, torch.Tensor]:
        return {self.method.head_key_prefix + name: p for name, p in self.head_params().items()}


def _to_float32(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


@contextmanager
def options_named(cfg: MethodConfig) -> Iterator[None]:
    """A method names its own options in its errors (`r`); here they become recipe keys (`method.r`)."""
    try:
        yield
    except UserError as err:
        option = (err.where or "").split(".")[0].split(" ")[0]
        if option in type(cfg).model_fields:
            err.where = f"method.{err.where}"
            err._changed()
        raise


class WrappedLinear(nn.Module):
    """A layer wrapping a linear layer (`base_layer`): model code reading `weight` or `bias` itself
    (Mamba's mixer reads `out_proj.weight`) gets the wrapped layer's, as from peft's wrappers."""

    base_layer: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias


class WrappingMethod(Method):
    """A method that replaces chosen modules by its own layer (the shape of peft's BaseTuner).

    The subclass says which modules (`select`, default: the linear layers `target_modules`
    names) and what each becomes (`wrap`); this class freezes the model, replaces them, collects
    the trainable parameters (everything on a wrapper but its `base_layer`) and merges by asking
    each wrapper for `merged_base()`, the wrapped module with the update folded in.
    """

    def select(self, model: nn.Module, cfg: MethodConfig, base: BaseFacts) -> dict[str, nn.Module]:
        return match_targets(model, cfg.target_modules)

    def wrap(self, module: nn.Module, cfg: MethodConfig, name: str, applied: Applied) -> nn.Module:
        raise NotImplementedError

    def record(self, model: nn.Module, cfg: MethodConfig, selected: dict[str, nn.Module]) -> Applied:
        """What merge and export need to know, read from the model before anything is replaced."""
        return Applied(list(selected), any(linear_shape(m)[2] for m in selected.values()))

    def apply(self, model: nn.Module, cfg: MethodConfig, base: BaseFacts = BaseFacts()) -> Adapter:
        freeze(model)
        selected = self.select(model, cfg, base)
        skipped = [name for name in linear_layers(model) if name not in selected] \
            if getattr(cfg, "target_modules", None) == "all-linear" else []
        applied = self.record(model, cfg, selected)
        for name, module in selected.items():
            model.set_submodule(name, self.wrap(module, cfg, name, applied))
        return Adapter(self, cfg, model, wrapper_params(model, self.wrapped(applied)), applied, skipped)

    def wrapped(self, applied: Applied) -> list[str]:
        """The names of every wrapper holding trainable parameters, in a fixed order."""
        return applied.targets

    def merge(self, adapter: Adapter) -> nn.Module:
        self.check_mergeable()
        model = adapter.model
        for name in adapter.applied.targets:
            model.set_submodule(name, model.get_submodule(name).merged_base())
        return model


# --- helpers shared by methods ------------------------------------------------------------------

def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def match_targets(model: nn.Module, targets: list[str] | str, key: str = "target_modules") -> dict[str, nn.Module]:
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


def within_rank(targets: dict[str, nn.Module], rank: int, option: list[str] | str, key: str = "r",
                usual: str = "8-64") -> dict[str, nn.Module]:
    """The targets a rank-`rank` update can adapt. Under 'all-linear' (`option`), layers narrower than
    the rank are skipped; an explicit list keeps them, and `check_rank` refuses the rank.

    Skipped, not adapted at their rank: layers narrower than a usual rank are routers and gates
    (Qwen2-MoE's `mlp.shared_expert_gate`, 64 × 1) that "all linear layers" did not mean, where r
    cannot be reached. peft's all-linear adapts them at r (lora_A [r, in], lora_B [1, r]); our export
    lists the layers adapted, so peft loads exactly what was trained. If every layer is narrower, r
    is refused: an adapter of nothing is a mistake in r.
    """
    if option == "all-linear":
        wide = {name: layer for name, layer in targets.items() if min(linear_shape(layer)[:2]) >= rank}
        targets = wide or targets
    check_rank(targets, rank, key, usual)
    return targets


def check_rank(targets: dict[str, nn.Module], rank: int, key: str = "r", usual: str = "8-64") -> None:
    """A rank-`rank` update cannot exceed a target layer's smaller side: a larger rank only
    allocates (10^9 would ask for hundreds of GB), so it is refused before any weight exists."""
    if not targets:
        return
    shapes = {name: linear_shape(layer)[:2] for name, layer in targets.items()}
    narrowest = min(shapes, key=lambda name: min(shapes[name]))
    limit = min(shapes[narrowest])
    if rank > limit:
        suffix = narrowest.rsplit(".", 1)[-1]
        widest = max(min(shape) for shape in shapes.values())
        leave_out = (f", or leave {suffix} out of target_modules ('all-linear' skips layers narrower than "
                     f"{key})") if widest >= rank else ""
        raise UserError(f"{key} = {rank} is larger than the rank of the target layer {narrowest} "
                        f"({' × '.join(map(str, shapes[narrowest]))})", where=key,
                        expected=f"{key} ≤ {limit}", fix=f"use a smaller {key} ({usual} is usual){leave_out}")


def exported_targets(adapter: Adapter) -> list[str]:
    """`target_modules` as adapter_config.json says it: 'all-linear' is written out as the layers it
    chose (peft versions differ on its meaning), named so that peft selects exactly those."""
    targets = adapter.cfg.target_modules
    if targets != "all-linear":
        return list(targets)
    return peft_names(set(adapter.applied.targets), [name for name, _ in adapter.model.named_modules()])


def module_suffixes(names: list[str]) -> list[str]:
    """The last name component of each module, deduplicated: peft's target_modules for them."""
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def wrapper_params(model: nn.Module, wrapper_names: list[str]) -> dict[str, nn.Parameter]:
    """The parameters a method added to the wrappers at `wrapper_names`, by their name in `model`.

    Wrappers keep the layer they wrap as `base_layer` (peft's convention, so our in-memory names
    are peft's saved names); everything else on a wrapper belongs to the adapter.
    """
    params: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name in wrapper_names:
        for param_name, param in model.get_submodule(name).named_parameters(remove_duplicate=False):
            # A parameter the wrappers share (Compacter's rule) is trained once, under its first name.
            if not param_name.startswith("base_layer.") and id(param) not in seen:
                seen.add(id(param))
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
