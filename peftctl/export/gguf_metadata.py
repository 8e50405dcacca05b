"""The metadata of a GGUF model file: hyperparameters and tokenizer, as llama.cpp reads them.

A base that came from a GGUF file keeps that file's metadata (its converter knew the model
best); a transformers folder's is built here from its config and tokenizer, as llama.cpp's
convert_hf_to_gguf.py builds it, for the byte-level BPE tokenizers of the GPT-2, Llama 3, Qwen2
and SmolLM families. Either way the chat template is the one the adapter was trained with.
"""

from __future__ import annotations

import json
from typing import Any

from gguf import MODEL_ARCH, GGUFReader, GGUFValueType, GGUFWriter, Keys, TokenType

from peftctl.core.errors import UserError
from peftctl.export.gguf_tensors import CONVERT_FIX, architecture

# Keys of a source file that describe the file itself, not the model: written anew.
FILE_KEYS = (Keys.General.ARCHITECTURE, Keys.General.FILE_TYPE, Keys.General.QUANTIZATION_VERSION,
             Keys.Tokenizer.CHAT_TEMPLATE)

# The pre-tokenizer regexes of tokenizer.json that llama.cpp knows by name (llama-vocab.cpp).
LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
# A tokenizer.json pre-tokenizer, as its steps → llama.cpp's tokenizer.ggml.pre.
PRE_TOKENIZERS = {
    (("byte_level", True),): "gpt-2",  # ByteLevel's own regex is GPT-2's
    (("digits", True), ("byte_level", True)): "smollm",
    (("split", LLAMA3_SPLIT), ("byte_level", False)): "llama-bpe",
    (("split", QWEN2_SPLIT), ("byte_level", False)): "qwen2",
}


def copy_source_metadata(writer: GGUFWriter, reader: GGUFReader) -> None:
    """Every key of the source GGUF but those that describe the file (architecture, file type)."""
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in FILE_KEYS:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), value_type, sub_type=sub_type)


def write_hyperparameters(writer: GGUFWriter, config: Any) -> None:
    """The `<arch>.*` keys llama.cpp reads, from a transformers config (convert_hf_to_gguf's choices)."""
    arch = architecture(config).arch
    if arch == MODEL_ARCH.GPT2:
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        writer.add_block_count(config.n_layer)
        return
    rope = getattr(config, "rope_parameters", None) or {}
    unsupported = {
        f"RoPE scaling '{rope.get('rope_type')}'": rope.get("rope_type", "default") != "default",
        f"the activation '{config.hidden_act}'": config.hidden_act != "silu",
        "sliding-window attention": getattr(config, "use_sliding_window", False),
    }
    for what, present in unsupported.items():
        if present:
            raise UserError(f"GGUF export does not write {what} for a transformers-folder base", fix=CONVERT_FIX)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def write_tokenizer(writer: GGUFWriter, tokenizer: Any, vocab_size: int) -> None:
    """tokenizer.ggml.* for a byte-level BPE tokenizer, as convert_hf_to_gguf's _set_vocab_gpt2."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or ()]
    steps = pre_tokenizer_steps(spec.get("pre_tokenizer"))
    pre = PRE_TOKENIZERS.get(steps)
    if model.get("type") != "BPE" or pre is None or not merges:
        what = (f"a {model.get('type') or type(tokenizer).__name__} tokenizer" if model.get("type") != "BPE" else
                "a BPE tokenizer without merges (llama.cpp's loader requires them)" if not merges else
                f"a BPE tokenizer whose pre-tokenizer llama.cpp does not know by name ({steps})")
        raise UserError(f"GGUF export cannot write the tokenizer metadata of {what}",
                        expected="a byte-level BPE tokenizer of the GPT-2, Llama 3, Qwen2 or SmolLM family",
                        fix=CONVERT_FIX)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(max(vocab_size, len(by_id))):
        if index not in by_id:  # a padded embedding row no token uses
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        types.append(TokenType.NORMAL if index not in added else
                     TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        if (index := getattr(tokenizer, f"{kind}_token_id")) is not None:
            getattr(writer, f"add_{kind}_token_id")(index)
    # Whether the tokenizer adds BOS/EOS to a text by itself: llama.cpp's tokenizer then does too.
    ids = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id])


def pre_tokenizer_steps(pre_tokenizer: dict | None) -> tuple:
    """A tokenizer.json pre-tokenizer as a tuple of its steps, in the shape PRE_TOKENIZERS keys have."""
    if not pre_tokenizer:
        return ()
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return tuple(step for part in pre_tokenizer.get("pretokenizers", ()) for step in pre_tokenizer_steps(part))
    if kind == "ByteLevel":
        return (("byte_level", bool(pre_tokenizer.get("use_regex", True))),)
    if kind == "Digits":
        return (("digits", bool(pre_tokenizer.get("individual_digits"))),)
    if kind == "Split":
        pattern = pre_tokenizer.get("pattern") or {}
        return (("split", pattern.get("Regex", pattern.get("String"))),)
    return ((kind,),)
