"""Tiny models saved as local Hugging Face folders: what a user's own base model looks like on disk."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from peftctl.model import byte_level_tokenizer
from tiny_models import tiny_llama_config

BYTE_VOCAB = 257  # peftctl's byte-level tokenizer: 256 bytes + <|endoftext|> (id 256)


def save_tiny_llama(folder: Path, seed: int = 0, **config_overrides) -> Path:
    """tests/tiny_models' 2-layer Llama, sized for the byte-level tokenizer, saved with it."""
    config = tiny_llama_config()
    config.vocab_size = BYTE_VOCAB
    config.bos_token_id = config.eos_token_id = config.pad_token_id = BYTE_VOCAB - 1
    for key, value in config_overrides.items():
        setattr(config, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return Path(folder)
