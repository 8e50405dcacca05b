"""What a model's description must say before peftctl builds anything from it.

A config.json edited by hand, a GGUF header that was written wrong, a generation_config.json or a
tokenizer that does not belong to the model: the libraries find such faults late (a tensor of
negative size, an index out of range in the first step) and report them as their own crashes. The
checks here run on the description alone, before any tensor, meta or real, is made from it, and
each fault is one `UserError` keyed `model.name_or_path` that names the file and the field, says
what was expected and how to fix it. `plan` runs on models too big for this machine, so a size too
large to count is one of those faults, not an overflow inside torch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peftctl.core.errors import UserError, one_line

# Sizes a decoder's config gives (transformers' standard names; a family's own spelling, GPT-2's
# n_embd, is found through its config's attribute_map). Each, when set, is a whole number ≥ 1.
SIZE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "head_dim", "max_position_embeddings", "n_inner", "ffn_dim", "word_embed_proj_dim",
    "moe_intermediate_size", "shared_expert_intermediate_size", "num_local_experts", "num_experts",
    "num_experts_per_tok", "decoder_sparse_step", "sliding_window", "rotary_dim",
)
# Without these no decoder can be built: a config that leaves one out (or sets it to null) is broken.
# (Attention heads are not among them: state-space models such as Mamba have none.)
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers")
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# One size beyond 2^32, or a model beyond 2^50 parameters (a thousand times the largest trained
# today), cannot be a real model; counting it would overflow the 64-bit sizes torch computes with.
LARGEST_SIZE = 2**32
LARGEST_MODEL = 2**50
# Counts of modules, not tensor sizes: even on the meta device each layer or expert is Python
# objects, so two billion layers would exhaust memory while `plan` builds them. The largest models
# have about a hundred layers and a few hundred experts.
MOST_MODULES = {"num_hidden_layers": 10_000, "num_local_experts": 65_536, "num_experts": 65_536}

# Values that a family's own config class writes for "none" (Qwen2-MoE's default sliding window
# is 0 with use_sliding_window false; XLNet's max_position_embeddings is -1): not faults.
NO_LIMIT = {"sliding_window": 0, "max_position_embeddings": -1}
EXPECTED_SIZE = "a whole number of at least 1 (a JSON integer, not a string or a fraction)"
FIX_CONFIG = "restore the model's original {file} (download it again), or correct the field by hand"


def _refusal(file: str | Path, field: str, problem: str, expected: str, fix: str | None = None) -> UserError:
    return UserError(f"{file}: '{field}' {problem}", where="model.name_or_path", expected=expected,
                     fix=fix or FIX_CONFIG.format(file=Path(file).name))


def _own_name(config: Any, name: str) -> str:
    """The field as the file spells it (GPT-2 stores hidden_size as n_embd)."""
    mapping = getattr(config, "attribute_map", {}) or {}
    return mapping.get(name, name)


def _get(config: Any, name: str) -> Any:
    """`config.name`, or None where the config has none or cannot give one globally: transformers
    raises its own errors for per-layer fields of heterogeneous configs (Gemma 4's attention heads),
    which such a family checks per layer itself."""
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - transformers' AmbiguousGlobalPerLayerAttributeError is no AttributeError
        return None


def _text_config(config: Any) -> Any:
    """The language model's config of a multimodal one (what peftctl builds), else `config` itself;
    `config` where transformers cannot say which of several it is (MusicGen's text encoder and decoder)."""
    try:
        return config.get_text_config() if hasattr(config, "get_text_config") else config
    except ValueError:
        return config


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(config: Any, file: str | Path) -> None:
    """Every size a whole number in range, heads that divide as the model needs, token ids inside
    the vocabulary, dropout probabilities between 0 and 1, and the whole countable: before any
    tensor is made from `config` (read from `file`, named in the error)."""
    text = _text_config(config)
    if text is not config:  # a multimodal config: its language model's sizes are what peftctl builds,
        _check_sizes(config, file, required=())  # the outer one's own sizes only where it gives them
    _check_sizes(text, file, required=REQUIRED)
    _check_relations(text, file)
    _check_count(text, file)


def _check_sizes(config: Any, file: str | Path, required: tuple[str, ...]) -> None:
    for name in SIZE_FIELDS:
        field = _own_name(config, name)
        if name not in required and _get(config, name) is None:
            continue
        value = _get(config, name)
        if value is None:
            if name in required:
                raise _refusal(file, field, "is missing", EXPECTED_SIZE)
            continue  # optional: the family derives it (head_dim from hidden_size, say)
        # A list is one size per layer (Gemma 3n's intermediate_size): each is checked.
        for size in value if isinstance(value, list) and value else [value]:
            _check_size(file, name, field, size)
    for name, value in vars(config).items():
        if (name.endswith("dropout") or name.endswith("pdrop")) and value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise _refusal(file, name, f"is {value!r}, not a probability", "a number from 0 to 1")


def _check_size(file: str | Path, name: str, field: str, value: Any) -> None:
    if not _is_whole(value):
        raise _refusal(file, field, f"is {value!r} ({type(value).__name__}), not a size", EXPECTED_SIZE)
    if value < 1 and NO_LIMIT.get(name) != value:
        raise _refusal(file, field, f"is {value}, not a size", EXPECTED_SIZE)
    if value > MOST_MODULES.get(name, LARGEST_SIZE):
        if name in MOST_MODULES:
            raise _refusal(file, field, f"is {value}: a model of that many is too large to build",
                           f"at most {MOST_MODULES[name]:,}")
        raise _refusal(file, field, f"is {value}: a model of that size is too large to count",
                       f"a size of at most 2^32 ({LARGEST_SIZE:,})")


def _check_relations(config: Any, file: str | Path) -> None:
    heads = _get(config, "num_attention_heads")
    kv_heads = _get(config, "num_key_value_heads")
    if not _is_whole(heads):
        heads = kv_heads = None  # no attention: nothing to divide
    if _is_whole(kv_heads) and heads % kv_heads:
        raise _refusal(file, _own_name(config, "num_key_value_heads"),
                       f"is {kv_heads}, which does not divide the {heads} attention heads "
                       f"('{_own_name(config, 'num_attention_heads')}')",
                       "a number of key/value heads that divides the number of attention heads")
    # Heads that do not divide the hidden size are not checked here: families that derive head_dim
    # as hidden // heads build and run so (GLM-4-MoE's default config does); those that cannot
    # (GPT-2) refuse while the model is built, which `building` reports as a UserError.
    experts = _get(config, "num_local_experts") or _get(config, "num_experts")
    chosen = _get(config, "num_experts_per_tok")
    if _is_whole(experts) and _is_whole(chosen) and chosen > experts:
        raise _refusal(file, "num_experts_per_tok", f"is {chosen}, more than the {experts} experts there are",
                       "at most the number of experts")
    vocab = config.vocab_size
    for name in TOKEN_ID_FIELDS:
        for token in _token_ids(_get(config, name)):
            if not _is_whole(token) or not 0 <= token < vocab:
                raise _refusal(file, name, f"names token {token!r}, outside the vocabulary of {vocab} "
                               f"('{_own_name(config, 'vocab_size')}')",
                               f"token ids from 0 to {vocab - 1}, as the tokenizer numbers them")


def _token_ids(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_count(config: Any, file: str | Path) -> None:
    """An upper estimate of the parameters, in Python's unbounded integers: what torch would
    overflow on is refused here."""
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    inner = max((v for v in (_get(config, name) for name in (
        "intermediate_size", "n_inner", "ffn_dim", "moe_intermediate_size")) if _is_whole(v)), default=4 * hidden)
    experts = max((v for v in (_get(config, "num_local_experts"), _get(config, "num_experts"))
                   if _is_whole(v)), default=1)
    head_dim = _get(config, "head_dim")
    heads = _get(config, "num_attention_heads")
    attention = heads * head_dim if _is_whole(head_dim) and _is_whole(heads) else hidden
    positions = _get(config, "max_position_embeddings")
    count = (layers * (4 * hidden * max(hidden, attention) + 3 * hidden * inner * (experts + 1))
             + 2 * vocab * hidden + (max(positions, 0) if _is_whole(positions) else 0) * hidden)
    if count > LARGEST_MODEL:
        raise _refusal(file, _own_name(config, "hidden_size"),
                       f"and the other sizes describe a model too large to count (about 10^{int(math.log10(count))} "
                       "parameters)", "a model of at most 2^50 (about 10^15) parameters")


@contextmanager
def reading_config(file: str | Path) -> Iterator[None]:
    """transformers checks a config's field types as it reads it (a strict dataclass): its error
    becomes ours, naming the field."""
    from huggingface_hub.errors import StrictDataclassError, StrictDataclassFieldValidationError

    try:
        yield
    except StrictDataclassFieldValidationError as err:
        # It keeps the field only in its message ("Validation error for field 'n_embd': ...").
        field = re.search(r"field '([^']*)'", str(err))
        raise _refusal(file, field[1] if field else "?", f"has the wrong type: {one_line(err.__cause__ or err)}",
                       "the type transformers' config class gives that field (a size is a JSON integer)") from None
    except (StrictDataclassError, ArithmeticError, TypeError, AttributeError, IndexError, AssertionError) as err:
        # A config class derives fields as it reads (head_dim = hidden_size // num_attention_heads):
        # on impossible values that arithmetic fails. OSError and ValueError (a missing file, an
        # unknown model_type, remote code) are left to the caller's wording.
        raise UserError(f"{file}: transformers cannot read it: {one_line(err)}", where="model.name_or_path",
                        expected="a config whose fields have the types and sizes the model family takes",
                        fix=FIX_CONFIG.format(file=Path(file).name)) from None


@contextmanager
def building(file: str | Path) -> Iterator[None]:
    """The model's modules built from a config that passed check_config: whatever transformers still
    refuses is a fault of that config (the only input of the build), said so, not a crash."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - the config is the build's only input (see above)
        raise UserError(f"{file}: transformers cannot build a model from it: {one_line(err)}",
                        where="model.name_or_path",
                        expected="a config whose sizes and options the model family accepts",
                        fix=FIX_CONFIG.format(file=Path(file).name)) from None


# --- generation_config.json and the tokenizer -----------------------------------------------------

# generation_config.json's numbers, and what each may be: transformers checks almost none of them
# (a temperature of "hot" loads), and the first generation fails on them.
_GENERATION_WHOLE = {"max_new_tokens": 1, "max_length": 1, "min_new_tokens": 0, "min_length": 0,
                     "num_beams": 1, "num_return_sequences": 1, "top_k": 0, "no_repeat_ngram_size": 0}
_GENERATION_NUMBERS = {"temperature": (0, math.inf), "top_p": (0, 1), "min_p": (0, 1), "typical_p": (0, 1),
                       "repetition_penalty": (0, math.inf)}


def check_generation_config(file: Path, config: Any) -> None:
    """generation_config.json, when the folder has one: JSON, and its numbers possible (token ids
    inside the vocabulary of `config`'s language model)."""
    try:
        found = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise _refusal(file, "(the whole file)", f"is not readable JSON: {one_line(err)}",
                       "a JSON object of generation settings", fix=f"delete {file.name} (optional) or restore it")
    if not isinstance(found, dict):
        raise _refusal(file, "(the whole file)", f"is a JSON {type(found).__name__}, not an object",
                       "a JSON object of generation settings", fix=f"delete {file.name} (optional) or restore it")
    fix = f"correct the field, or delete {file.name} (optional: peftctl's generations set their own limits)"
    for name, least in _GENERATION_WHOLE.items():
        value = found.get(name)
        if value is not None and (not _is_whole(value) or value < least):
            raise _refusal(file, name, f"is {value!r}", f"a whole number of at least {least}", fix)
    for name, (low, high) in _GENERATION_NUMBERS.items():
        value = found.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not low <= value <= high):
            raise _refusal(file, name, f"is {value!r}", f"a number from {low} to {high}", fix)
    vocab = _get(_text_config(config), "vocab_size")
    for name in (*TOKEN_ID_FIELDS, "decoder_start_token_id") if _is_whole(vocab) else ():
        for token in _token_ids(found.get(name)):
            if not _is_whole(token) or not 0 <= token < vocab:
                raise _refusal(file, name, f"names token {token!r}, outside the model's vocabulary of {vocab}",
                               f"token ids from 0 to {vocab - 1}", fix)


def check_tokenizer_fits(tokenizer: Any, config: Any, file: str | Path) -> None:
    """Every id the tokenizer can give must be a row of the model's embeddings: an id beyond them
    is an index error in the first step."""
    text = _text_config(config)
    vocab = _get(text, "vocab_size")
    if not _is_whole(vocab):
        return  # the config's own check names it
    size = len(tokenizer)
    if size > vocab:
        raise UserError(
            f"the tokenizer has {size} tokens (ids up to {size - 1}), but {file} gives the model "
            f"'{_own_name(text, 'vocab_size')}' {vocab} embeddings: ids from {vocab} on have none",
            where="model.name_or_path", expected="a tokenizer with at most as many tokens as the model's vocab_size",
            fix="use the tokenizer files that came with this model, or correct vocab_size in the config")
