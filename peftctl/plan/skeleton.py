"""The recipe's method on the weightless skeleton of its model (meta device, no weights).

Everything a method can refuse (targets that match nothing, a layout it cannot take, shapes of an
adapter to continue, sizes out of proportion) is found here, before any weight loads, and what
it will train is counted. `peftctl train` (pipeline.prepare), `peftctl validate` and `peftctl
plan` start from here, so they agree on which options train: the recipe's, or with
`model.adapter` the continued adapter's (`method_config`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from torch import nn

from peftctl import methods
from peftctl.arch.architectures import TESTED
from peftctl.arch.layers import expert_tensors, layer_kind, linear_shape
from peftctl.arch.tasks import TaskHead
from peftctl.core.errors import UserError, blame
from peftctl.export.adapter_files import CONFIG_FILE, WEIGHTS_FILE, adapter_method, load_adapter
from peftctl.methods import Adapter, Method, MethodConfig
from peftctl.model.loading import base_facts, load_skeleton
from peftctl.model.quantize import parameter_count

if TYPE_CHECKING:
    from peftctl.data.tokenize import TokenizedData
    from peftctl.recipe.schema import Recipe


@dataclass
class OnSkeleton:
    """The recipe's method on the weightless model: the options that train and what they train."""

    method_cfg: MethodConfig  # the recipe's options, or those of the adapter `model.adapter` continues
    adapter: Adapter  # on the skeleton (adapter.model): its params name and count what will train

    @property
    def config(self) -> Any:
        return self.adapter.model.config


def method_on_skeleton(recipe: Recipe, data: TokenizedData | None = None) -> OnSkeleton:
    """The recipe's method on a weightless copy of its model: the adapter to continue loaded (its
    targets and shapes checked), or a new one applied and sized. With `data`, every row must also
    fit the model's positions (checked first: a prompt method's tokens are part of the fit)."""
    with blame(recipe.source, recipe.locate):
        skeleton = load_skeleton(recipe.model, recipe_head(recipe, data))
        method_cfg = method_config(recipe)
        facts = base_facts(recipe.model, task=recipe.task)
        if data is not None:
            check_context(skeleton.config, data, getattr(method_cfg, "num_virtual_tokens", 0))
        if recipe.model.adapter is not None:
            return OnSkeleton(method_cfg, load_adapter(skeleton, recipe.model.adapter, facts))
        adapter = methods.apply(skeleton, method_cfg, facts)
        check_size(adapter)
        return OnSkeleton(method_cfg, adapter)


def describe_targets(found: OnSkeleton) -> str:
    """For `peftctl validate`: what the method trains on this model, counted."""
    adapter = found.adapter
    model_type = getattr(found.config, "model_type", None)
    untested = "" if model_type in TESTED else (
        f" (model_type '{model_type}' is not among the architectures peftctl's contract suite tests: generic rules)")
    return (f"method {found.method_cfg.name}: {adapter.trainable_count():,} trainable parameters in "
            f"{len(adapter.params)} tensors: {_folded(adapter.params)}{untested}")


def coverage_notes(found: OnSkeleton) -> list[str]:
    """What the recipe leaves frozen that a user may think it trains, one line each (for `validate`
    and the training header): the layers 'all-linear' skipped, and the expert weights no target reaches."""
    adapter, notes = found.adapter, []
    if adapter.skipped:
        shapes = {layer_kind(name): " × ".join(map(str, linear_shape(adapter.model.get_submodule(name))[:2]))
                  for name in adapter.skipped}
        notes.append(f"skipped: 'all-linear' leaves out {len(adapter.skipped)} linear layers narrower than the rank "
                     f"(routers and gates): {_folded(adapter.skipped, shapes)}")
    named = getattr(found.method_cfg, "target_parameters", None) or []
    frozen = {name: size for name, size in expert_tensors(adapter.model).items()
              if not any(name == target or name.endswith("." + target) for target in named)}
    if frozen:
        total = parameter_count(adapter.model) - adapter.trainable_count()
        suffixes = ", ".join(sorted({".".join(name.split(".")[-2:]) for name in frozen}))
        how = (f"add them to method.target_parameters: [{suffixes}] (one rank-r update per expert, as peft)"
               if "target_parameters" in type(found.method_cfg).model_fields
               else f"method lora adapts them: name: lora, target_parameters: [{suffixes}]")
        notes.append(f"experts: {sum(frozen.values()):,} parameters ({100 * sum(frozen.values()) / total:.1f}% of "
                     f"the model) sit in expert tensors that the method's target_modules do not reach: "
                     f"{_folded(frozen)}; {how}")
    return notes


def _folded(names, details: dict[str, str] | None = None) -> str:
    """Names with their layer numbers folded, so 30 layers' q_proj read as one entry: "model.layers.N.self_attn.q_proj ×30"."""
    kinds = Counter(layer_kind(name) for name in names)
    return ", ".join(kind + (f" ({details[kind]})" if details and kind in details else "")
                     + (f" ×{count}" if count > 1 else "") for kind, count in kinds.items())


def recipe_head(recipe: Recipe, data: TokenizedData | None = None) -> TaskHead:
    """The task the recipe's base is loaded for, with a classifier's labels: the data's, or where
    no data is read (plan) the recipe's `data.labels`, else two (the head's size barely counts)."""
    if recipe.task != "sequence_classification":
        return TaskHead(recipe.task)
    labels = data.labels if data is not None else tuple(recipe.data.labels or ("LABEL_0", "LABEL_1"))
    return TaskHead(recipe.task, labels)


def method_config(recipe: Recipe) -> MethodConfig:
    """The method options that train: the recipe's, or those of the adapter it continues."""
    return recipe.method if recipe.model.adapter is None else continued_method(recipe)


def check_size(adapter: Adapter) -> None:
    """A parameter-efficient adapter larger than its base model is a mistake in its sizes (a rank or
    width of 10^9 would otherwise surface as a failed allocation of hundreds of GB)."""
    trainable, base = adapter.trainable_count(), parameter_count(adapter.model) - adapter.trainable_count()
    if trainable > base:
        raise UserError(f"the adapter would have {trainable:,} trainable parameters, more than the "
                        f"{base:,} of the base model", where="method",
                        expected="an adapter a small fraction of the model's size",
                        fix="lower the method's rank, width or number of tokens")


def check_context(config: Any, data: TokenizedData, virtual_tokens: int) -> None:
    """Every row, with a prompt method's virtual tokens in front, must fit the positions the model
    has (learned position tables, GPT-2's say, cannot go past them at all)."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return
    if virtual_tokens >= limit:
        raise UserError(f"{virtual_tokens} virtual tokens fill the model's whole context ({limit} positions)",
                        where="method.num_virtual_tokens", expected=f"fewer than {limit}, leaving room for the rows")
    longest = max((len(e.input_ids) for e in [*data.train, *data.validation]), default=0)
    if longest + virtual_tokens > limit:
        room = limit - virtual_tokens
        extra = f" + {virtual_tokens} virtual tokens" if virtual_tokens else ""
        raise UserError(f"the longest row is {longest} tokens{extra}, more than the model's {limit} positions",
                        where="data.max_seq_len", expected=f"max_seq_len of at most {room}",
                        fix=f"set data.max_seq_len: {room} (longer rows are cut to it)")


def continued_method(recipe: Recipe) -> MethodConfig:
    """The options of the adapter that `model.adapter` continues, checked against `method`.

    `method.name` must be the adapter's method. Options the recipe writes must equal the
    adapter's, as the weights' shapes and meaning depend on them; options it leaves out are the
    adapter's. Values spelt differently that select the same thing ('all-linear' and the list
    of layers it resolves to) agree: both configs are compared as they would be exported, so
    options that only steer training (`MethodConfig.training_only`, e.g. LoRA+'s ratio) are the recipe's.
    """
    folder = recipe.model.adapter
    if not (folder / CONFIG_FILE).is_file():
        raise UserError(f"no adapter to continue at {folder}: it has no {CONFIG_FILE}", where="model.adapter",
                        expected=f"a folder with {CONFIG_FILE} and {WEIGHTS_FILE} (peftctl train's <output>/adapter, "
                        "or peft's save_pretrained)",
                        fix="check the path; a relative path is resolved from the recipe's folder")
    method, saved = adapter_method(folder)
    ours = recipe.method
    if ours.name != method.name:
        raise UserError(f"the recipe's method is '{ours.name}' but the adapter to continue ({folder}) is "
                        f"'{method.name}'", where="method.name", expected=f"name: {method.name}",
                        fix=f"set method.name: {method.name}, or remove model.adapter to train a new adapter")
    written = [key for key in type(ours).model_fields if key in ours.model_fields_set and key != "name"]
    steering = {key: getattr(ours, key) for key in written if key in type(ours).training_only}
    saved = saved.model_copy(update=steering)
    written = [key for key in written if key not in steering]
    differing = [key for key in written if _canonical(getattr(ours, key)) != _canonical(getattr(saved, key))]
    if not differing:
        return saved
    try:
        chosen = type(saved).model_validate({**saved.model_dump(), **{key: getattr(ours, key) for key in written}})
        agree = _exported(recipe, method, chosen) == _exported(recipe, method, saved)
    except (ValidationError, UserError):
        agree = False
    if agree:
        return saved
    key = differing[0]
    raise UserError(
        f"{key} is {getattr(ours, key)!r} in the recipe, but the adapter to continue ({folder}) has "
        f"{getattr(saved, key)!r}", where=f"method.{key}",
        expected=f"{key}: {getattr(saved, key)!r}, or no {key} (the adapter's is used)",
        fix=f"remove method.{key} from the recipe, or remove model.adapter to train a new adapter")


def _exported(recipe: Recipe, method: Method, cfg: MethodConfig) -> dict:
    """The adapter_config.json fields `cfg` resolves to on the recipe's model (no weights load);
    a skeleton of its own for each, as applying a method changes the model it is applied to."""
    skeleton: nn.Module = load_skeleton(recipe.model, recipe_head(recipe))
    applied = methods.apply(skeleton, cfg, base_facts(recipe.model, task=recipe.task))
    return {key: _canonical(value) for key, value in method.peft_config(applied).items()}


def _canonical(value):
    return sorted(map(str, value)) if isinstance(value, list) else value
