"""Tiny models of every architecture the classification and seq2seq tasks cover, saved as Hub-style
folders with a word-level tokenizer, and small data files for them (no downloads, seconds each)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM, PreTrainedTokenizerFast

WORDS = ["<pad>", "</s>", "<unk>", "<s>", "<mask>"] + (
    "the a film was is good great fine bad awful poor plot acting movie and but not very it "
    "0 1 2 3 4 5 6 7 8 9").split()

# Small sizes in each config class's own field names; every classifier gets num_labels from the recipe.
ENCODERS = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, dropout=0.0, seq_classif_dropout=0.0),
    "deberta-v2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16),
    "electra": dict(hidden_size=32, embedding_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64),
    "modernbert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       global_attn_every_n_layers=2, local_attention=16),
}
DECODERS = {
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64),
    "qwen2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64),
    "qwen3": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, head_dim=8),
    "mistral": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64),
    "gemma": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, head_dim=8),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4),
}
SEQ2SEQ = {
    "t5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0),
    "mt5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
                feed_forward_proj="gated-gelu"),
    "bart": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, decoder_start_token_id=1,
                 forced_eos_token_id=None),
}
# initializer_range 0.2: a random body whose outputs depend on the words (at transformers' 0.02 a
# tiny encoder's [CLS] state is nearly the same for every row, which no few steps can classify).
SPECIAL = dict(initializer_range=0.2, pad_token_id=0, eos_token_id=1, bos_token_id=3, cls_token_id=3, sep_token_id=1, vocab_size=len(WORDS),
               max_position_embeddings=128)


def word_tokenizer(pairs_with_cls: bool) -> PreTrainedTokenizerFast:
    """Whitespace words; an encoder's rows are [CLS] A [SEP] (B [SEP]), a decoder's and seq2seq's end in EOS."""
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece()
    if pairs_with_cls:
        core.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", 3), ("</s>", 1)])
    else:
        core.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   cls_token="<s>", sep_token="</s>", bos_token="<s>", mask_token="<mask>")


def save_tiny(model_type: str, folder: Path, seed: int = 0) -> Path:
    """A tiny pretrained-style folder of `model_type` (the bare body for encoders and decoders, as a
    base checkpoint has no classifier), with fixed-seed weights and the word tokenizer."""
    sizes = {**ENCODERS, **DECODERS, **SEQ2SEQ}[model_type]
    config = AutoConfig.for_model(model_type, **{**SPECIAL, **sizes})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (AutoModelForSeq2SeqLM if model_type in SEQ2SEQ else AutoModel).from_config(config)
    model.save_pretrained(folder)
    word_tokenizer(model_type in ENCODERS).save_pretrained(folder)
    return folder


def classification_rows(n: int, seed: int = 0, pairs: bool = False) -> list[dict]:
    """Three classes told apart by their words (so a few steps learn them)."""
    rng = random.Random(seed)
    words = {"positive": "good great fine", "negative": "bad awful poor", "neutral": "plot acting movie"}
    rows = []
    for i in range(n):
        label = ["positive", "negative", "neutral"][i % 3]
        text = " ".join(rng.sample(words[label].split(), 2) + ["the", "film", str(rng.randint(0, 9))])
        rows.append({"text": text, "label": label, **({"text_pair": "it was very good"} if pairs else {})})
    return rows


def seq2seq_rows(n: int, seed: int = 0) -> list[dict]:
    """Copy the digits of the source in sorted order."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        digits = [str(rng.randint(0, 9)) for _ in range(3)]
        rows.append({"source": "the film was " + " ".join(digits), "target": " ".join(sorted(digits))})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
