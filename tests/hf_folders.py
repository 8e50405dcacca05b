"""Tiny models saved as local Hugging Face folders: what a user's own base model looks like on disk."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from peftctl.model.builtins import byte_level_tokenizer
from tiny_models import tiny_llama_config

BYTE_VOCAB = 257  # peftctl's byte-level tokenizer: 256 bytes + <|endoftext|> (id 256)

# SmolLM2-135M-Instruct's chat template (ChatML with a default system prompt), as its GGUF holds it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def save_tiny_llama(folder: Path, seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None,
                    **config_overrides) -> Path:
    """tests/tiny_models' 2-layer Llama, sized for its tokenizer (default: the byte-level one),
    saved with it."""
    tokenizer = tokenizer or byte_level_tokenizer()
    config = tiny_llama_config()
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    for key, value in config_overrides.items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def chatml_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer shaped like SmolLM2's, small: the 256 byte symbols, a few merges,
    GPT-2's pre-tokenizer (llama.cpp's "gpt-2"), ChatML's special tokens and SmolLM2's template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    tokenizer.add_special_tokens({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                                  "pad_token": "<|endoftext|>", "additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    return tokenizer
