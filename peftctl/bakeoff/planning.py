"""`peftctl bakeoff`: one recipe trained with each of several methods (and option values), one run
after another, on the same data, split, seed, precision and budget, then compared in one table.

This module plans the runs, and does every check that needs no weights for all of them before the
first one trains (a typo in the seventh run must not surface after six): each run's recipe (the
user's, its method replaced) is validated by the recipe model, its method put on the weightless
model with the rows as `peftctl train` does first (pipeline.check_method), its memory planned.
state.py keeps `<output>/bakeoff.json`, runner.py trains the runs (each in a process
of its own), table.py makes the rows and bakeoff.md that cli/console.py shows.

What each run trains with:
  * the method: a registered name, or a named variant of one (`dora`: LoRA with use_dora). The
    recipe's own method keeps the recipe's options. Another method takes the recipe's options that
    mean the same there (`Method.comparable_options`: LoRA's r and alpha are LoHa's), then its
    `suggested_options` (options it needs on any model), else its defaults;
  * the learning rate: the recipe's for its own method. Another method gets the recipe's lr times
    the ratio of the two methods' `suggested_lr`: the recipe's lr is taken as tuned for its method,
    and each method trains at the same multiple of the rate its sources train it at (prompt tuning
    and IA3 an order or two above LoRA). `--set train.lr=` or `--grid train.lr=` give every run
    the value named;
  * `--grid KEY=V1,V2`: a run per value (the product over several grids), for the runs whose
    method has KEY (`method.r`), or every run (`train.lr`);
  * the budget: `train.max_steps` (`--budget-steps`) or `train.max_minutes` (`--budget-minutes`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftctl.core.errors import ErrorGroup, UserError, blame, did_you_mean
from peftctl.methods import METHODS, Method
from peftctl.recipe.load import load_recipe
from peftctl.recipe.schema import Recipe
from peftctl.recipe.yaml_file import RawRecipe, parse_value

# Recipe keys the bake-off sets itself, by the option that sets them: a grid over one would contradict it.
OWN_KEYS = {"method.name": "--methods", "train.max_steps": "--budget-steps", "train.max_minutes": "--budget-minutes",
            "output.dir": "--output"}
RECIPES = "recipes"  # the runs' recipe files, beside (never inside) their output folders


def method_choices() -> dict[str, tuple[Method, dict[str, Any]]]:
    """What `--methods` takes: every registered method, and each named variant of one, with its options."""
    choices = {name: (method, {}) for name, method in METHODS.items()}
    for method in METHODS.values():
        for variant, options in method.variants.items():
            if variant in choices:
                raise ValueError(f"the variant '{variant}' of '{method.name}' has the name of another method")
            choices[variant] = (method, options)
    return choices


@dataclass
class Request:
    """What `peftctl bakeoff` was asked."""

    recipe: Path
    methods: str  # comma-separated, as typed
    grid: list[str] = field(default_factory=list)  # "KEY=V1,V2,..."
    sets: list[str] = field(default_factory=list)  # --set, applied to every run
    budget_steps: int | None = None
    budget_minutes: float | None = None
    samples: int = 5  # generated replies scored per run (exact match)
    output: Path | None = None
    overwrite: bool = False

    def command(self, out: Path) -> str:
        """The command that runs this bake-off again, which continues it where it stopped."""
        args = ["peftctl", "bakeoff", str(self.recipe), "--methods", self.methods,
                *(arg for item in self.grid for arg in ("--grid", item)),
                *(arg for item in self.sets for arg in ("--set", item)),
                *(["--budget-steps", str(self.budget_steps)] if self.budget_steps is not None
                  else ["--budget-minutes", f"{self.budget_minutes:g}"]),
                "--samples", str(self.samples), "--output", str(out)]
        return shlex.join(args)


@dataclass
class Run:
    """One run of the bake-off: its recipe and what sets it apart."""

    label: str  # "lora", "lora r=4"
    method: str  # as asked: a method or a variant of one ("dora")
    settings: dict[str, Any]  # the options the bake-off chose (variant, suggested) and the grid's values, by key
    run_dir: str  # its folder in the bake-off's, also the name of its recipe file
    recipe: Recipe
    lr_rule: str  # where its learning rate comes from
    trainable_params: int | None = None  # found on the weightless model
    planned_peak_bytes: int | None = None  # peftctl plan's total

    @property
    def lr(self) -> float:
        return self.recipe.train.lr

    @property
    def recipe_file(self) -> str:
        return f"{RECIPES}/{self.run_dir}.yaml"


@dataclass
class BakeoffPlan:
    """The checked runs of a bake-off and where it writes."""

    request: Request
    recipe: Recipe  # the user's recipe with --set applied
    out: Path  # the bake-off folder
    where: str  # the option that named it, for errors
    budget: dict[str, float]  # {"steps": N} or {"minutes": M}
    runs: list[Run]


def plan_bakeoff(request: Request) -> BakeoffPlan:
    """Every run of the bake-off, each checked as far as it can be without weights, all errors together."""
    budget = _budget(request)
    choices = method_choices()
    names = _method_names(request.methods, choices)
    base = load_recipe(request.recipe, request.sets)
    if base.model.adapter is not None:
        raise UserError("a bake-off trains new adapters, and this recipe continues one", file=request.recipe,
                        where=base.locate("model.adapter"), fix="remove model.adapter (or --set model.adapter=null)")
    if request.output is not None:
        out, where = Path(request.output), "--output"
    else:  # beside the recipe's own run folder, never inside it (`train --overwrite` would delete it)
        out, where = Path(f"{base.output.dir}-bakeoff"), f"{base.locate('output.dir')} + '-bakeoff'"
    grid = _grid(request.grid, [choices[name][0] for name in names])
    runs = _runs(request, base, names, choices, grid, budget, out)
    _check_runs(runs)
    return BakeoffPlan(request, base, out, where, budget, runs)


def _budget(request: Request) -> dict[str, float]:
    steps, minutes = request.budget_steps, request.budget_minutes
    if (steps is None) == (minutes is None):
        raise UserError("a bake-off needs one budget, the same for every run" if steps is None else
                        "--budget-steps and --budget-minutes are two budgets; a bake-off has one",
                        where="--budget-steps / --budget-minutes",
                        expected="--budget-steps N (optimizer steps) or --budget-minutes M (minutes of training "
                                 "steps), not both", fix="pass one of them, e.g. --budget-steps 50")
    if steps is not None and steps <= 0:
        raise UserError(f"the budget must be at least one step, got {steps}", where="--budget-steps",
                        expected="a whole number of optimizer steps, 1 or more")
    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        raise UserError(f"the budget must be a positive number of minutes, got {minutes}", where="--budget-minutes",
                        expected="minutes of training steps, e.g. 5 or 0.5")
    return {"steps": steps} if steps is not None else {"minutes": minutes}


def _method_names(text: str, choices: dict[str, Any]) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    expected = f"method names separated by commas, out of: {', '.join(choices)}"
    if not all(names):
        raise UserError(f"--methods '{text}' has an empty name", where="--methods", expected=expected)
    for name in names:
        if name not in choices:
            hint = did_you_mean(name, choices)
            raise UserError(f"unknown method '{name}'" + (f" ({hint})" if hint else ""), where="--methods",
                            expected=expected)
    if len(set(names)) < len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise UserError(f"'{twice}' is named twice", where="--methods", fix="name each method once")
    return names


def _grid(items: list[str], methods_asked: list[Method]) -> dict[str, tuple[str, list[str]]]:
    """Each --grid as key -> (the option as typed, its values as typed)."""
    grid: dict[str, tuple[str, list[str]]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key, where = key.strip(), f"--grid {item}"
        if not sep or len(key.split(".")) < 2 or not all(key.split(".")):
            raise UserError("a grid must look like KEY=V1,V2,...", where=where,
                            expected="a dotted recipe key, '=', values separated by commas: --grid method.r=4,8,16")
        if key in OWN_KEYS:
            raise UserError(f"{key} is what {OWN_KEYS[key]} sets in a bake-off", where=where,
                            fix=f"use {OWN_KEYS[key]}" + (" (several names)" if key == "method.name" else ""))
        if key in grid:
            raise UserError(f"{key} has two grids", where=where, fix="give all its values in one --grid")
        texts = split_values(values)
        if not texts or not all(texts):
            raise UserError(f"--grid {key} has an empty value", where=where, expected="values separated by commas")
        if len(set(texts)) < len(texts):
            raise UserError(f"--grid {key} names a value twice", where=where, fix="name each value once")
        if key.startswith("method."):
            option = key.removeprefix("method.")
            if not any(option in method.Config.model_fields for method in methods_asked):
                known = sorted({o for method in methods_asked for o in method.Config.model_fields if o != "name"})
                hint = did_you_mean(option, known)
                raise UserError(f"no method of this bake-off has an option '{option}'" + (f" ({hint})" if hint else ""),
                                where=where, expected=f"an option of {', '.join(m.name for m in methods_asked)}: "
                                f"{', '.join(known)}")
        grid[key] = (item, texts)
    return grid


def split_values(text: str) -> list[str]:
    """A grid's values, split at the commas outside brackets and quotes: `[q_proj,v_proj],all-linear`."""
    values, depth, quote, current = [], 0, None, ""
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    return [*values, current.strip()]


def _runs(request: Request, base: Recipe, names: list[str], choices: dict[str, tuple[Method, dict[str, Any]]],
          grid: dict[str, tuple[str, list[str]]], budget: dict[str, float], out: Path) -> list[Run]:
    """Every run, its recipe validated; errors of all runs together."""
    lr_fixed = "train.lr" in grid or any(item.partition("=")[0].strip() == "train.lr" for item in request.sets)
    short = {key: key.split(".")[-1] for key in grid}
    short = {key: name if list(short.values()).count(name) == 1 else key for key, name in short.items()}
    checks, runs, folders = ErrorGroup(None), [], set()
    for name in names:
        method, variant = choices[name]
        keys = [key for key in grid if not key.startswith("method.")
                or key.removeprefix("method.") in method.Config.model_fields]
        for values in itertools.product(*(grid[key][1] for key in keys)):
            chosen = dict(zip(keys, values))
            label = " ".join([name, *(f"{short[key]}={text}" for key, text in chosen.items())])
            folder = slug = re.sub(r"[^\w.=+-]+", "_", label).strip("_") or "run"
            for n in itertools.count(2):
                if folder.lower() not in folders:
                    break
                folder = f"{slug}-{n}"
            folders.add(folder.lower())
            with checks.check(), run_named(label):
                runs.append(_run(request, base, name, method, variant, chosen, grid, label, folder,
                                 budget, out, lr_fixed))
    checks.raise_if_any()
    return runs


def _run(request: Request, base: Recipe, name: str, method: Method, variant: dict[str, Any], chosen: dict[str, str],
         grid: dict[str, tuple[str, list[str]]], label: str, folder: str, budget: dict[str, float], out: Path,
         lr_fixed: bool) -> Run:
    options, ours = variant_options(base, method, variant)
    lr, lr_rule = learning_rate(base, method, lr_fixed)
    if "train.lr" in chosen:
        lr_rule = "--grid"

    def edit(read: RawRecipe) -> None:
        raw = read.raw
        raw["method"] = {"name": method.name, **options}
        read.origins.update({"method.name": f"--methods {name}", **{f"method.{key}": f"--methods {name}" for key in ours}})
        train = raw.setdefault("train", {})
        if isinstance(train, dict):  # (anything else is refused by the recipe model, naming `train`)
            if lr != base.train.lr:
                train["lr"] = lr
                read.origins["train.lr"] = f"--methods {name}: {lr_rule}"
            budget_key, option = ("max_steps", "--budget-steps") if "steps" in budget else \
                ("max_minutes", "--budget-minutes")
            train[budget_key] = next(iter(budget.values()))
            read.origins[f"train.{budget_key}"] = f"{option} {train[budget_key]:g}"
        for key, text in chosen.items():
            _set_key(raw, key, parse_value(text))
            read.origins[key] = f"--grid {grid[key][0]}"

    recipe = load_recipe(request.recipe, request.sets, Path(os.path.abspath(out)) / folder, edit=edit)
    settings = {f"method.{key}": options[key] for key in sorted(ours)}  # the bake-off's choices, then the grid's
    settings.update({key: _value_at(recipe, key) for key in chosen})
    return Run(label, name, settings, folder, recipe, lr_rule)


def variant_options(base: Recipe, method: Method, variant: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """The run's method options (without `name`), and those the bake-off chose rather than the recipe."""
    written = base.method.model_dump(mode="json", exclude_unset=True, exclude={"name"})
    if method.name == base.method.name:
        return {**written, **variant}, set(variant)
    theirs = METHODS[base.method.name].comparable_options
    carried = {key: value for key, value in written.items()
               if key in method.comparable_options and theirs.get(key) == method.comparable_options[key]}
    chosen = {key: value for key, value in {**method.suggested_options, **variant}.items()
              if key not in carried or key in variant}
    return {**carried, **chosen}, set(chosen)


def learning_rate(base: Recipe, method: Method, fixed: bool) -> tuple[float, str]:
    """The run's learning rate and its rule (see the module's docstring)."""
    lr, own = base.train.lr, METHODS[base.method.name]
    if fixed:
        return lr, "--set"
    if method is own:
        return lr, "the recipe's"
    ratio = method.suggested_lr / own.suggested_lr
    if ratio == 1:
        return lr, f"the recipe's (suggested_lr as {own.name})"
    return float(f"{lr * ratio:.3g}"), f"the recipe's × {ratio:g} (suggested_lr {method.name} / {own.name})"


def _set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    *sections, last = key.split(".")
    node = raw
    for part in sections:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value


def _value_at(recipe: Recipe, key: str) -> Any:
    """A grid key's value as validated (`4` for '4', 0.001 for '1e-3'), as JSON."""
    node: Any = recipe.model_dump(mode="json")
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return json.loads(json.dumps(node, default=str))


@contextmanager
def run_named(label: str) -> Iterator[None]:
    """An error of one run names it: there are several recipes in one command."""
    try:
        yield
    except UserError as err:
        err.problem = f"bake-off run '{label}': {err.problem}"
        err._changed()
        raise


def _check_runs(runs: list[Run]) -> None:
    """Each run as `peftctl train` starts it, without weights: its output folder, its method on the
    weightless model with the rows, its planned memory. The tokenizer and the rows are read once
    for all runs that share them."""
    from peftctl.data.tokenize import load_data
    from peftctl.model.loading import load_tokenizer
    from peftctl.plan.memory_plan import plan
    from peftctl.run.pipeline import check_method, check_output_dir

    tokenizers: dict[str, Any] = {}
    data: dict[str, Any] = {}
    checks = ErrorGroup(None)
    for run in runs:
        recipe = run.recipe
        with checks.check(), run_named(run.label), blame(recipe.source, recipe.locate):
            model_key = json.dumps(recipe.model.model_dump(mode="json"), sort_keys=True) + recipe.task
            if model_key not in tokenizers:
                tokenizers[model_key] = load_tokenizer(recipe.model, recipe.task)
            data_key = model_key + json.dumps(recipe.data.model_dump(mode="json"), sort_keys=True) + str(recipe.train.seed)
            if data_key not in data:
                data[data_key] = load_data(recipe.data, tokenizers[model_key], recipe.train.seed, recipe.task)
            check_output_dir(recipe, overwrite=True)  # a run's folder may hold its earlier attempt
            run.trainable_params = check_method(recipe, data[data_key]).adapter.trainable_count()
            run.planned_peak_bytes = int(plan(recipe).peft.total)
    checks.raise_if_any()
