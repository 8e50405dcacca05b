"""Models and datasets named by their Hugging Face Hub id (`org/name`).

A name that is not a path on this machine is a Hub id. Its files come from the Hugging Face
cache (HF_HOME / HF_HUB_CACHE, as huggingface_hub defines them) or are downloaded into it, the
way transformers and datasets do it, so every tool on the machine shares one copy. Only the files
loading needs are fetched, and never pickled weights (`.bin`, `.pt`: unpickling runs code).
HF_HUB_OFFLINE=1 keeps everything to the cache. A token (HF_TOKEN, or `hf auth login`) is passed
on by huggingface_hub itself for gated and private repos; peftctl never reads, prints or writes it.

A model is fetched in two steps: config and tokenizer first (what the checks before the weights
load need), then the weights, so a recipe mistake costs seconds, not a download (a GGUF file
holds all three: it is fetched whole, first).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

from peftctl.core.errors import UserError, one_line

# org/name as the Hub spells repo ids: letters, digits, '-', '_', '.'; no '--' or '..' inside.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")

# What loading a transformers model reads, besides weights (tokenizers keep their files under
# several names; chat templates live in the tokenizer config or a file of their own).
SETUP_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "*.tiktoken", "vocab.json",
               "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja", "chat_template.json"]
WEIGHT_FILES = ["*.safetensors", "*.safetensors.index.json"]
CODE_FILES = ["*.py"]  # a model's own architecture: fetched only with trust_remote_code
PICKLE_WEIGHTS = ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl"]


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and "--" not in name


def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


@dataclass(frozen=True)
class RepoRef:
    """A Hub repository at a revision, and the recipe keys that named them (for messages)."""

    repo_id: str
    revision: str | None = None
    kind: str = "model"  # or "dataset"
    key: str = "model.name_or_path"
    revision_key: str = "model.revision"

    @property
    def label(self) -> str:
        return f"{self.kind} '{self.repo_id}'" + (f" (revision {self.revision})" if self.revision else "")

    def fetch_command(self) -> str:
        parts = ["hf download", self.repo_id]
        if self.kind == "dataset":
            parts.insert(1, "--repo-type dataset")
        if self.revision:
            parts.append(f"--revision {self.revision}")
        return " ".join(parts)


@dataclass(frozen=True)
class HubFile:
    name: str
    size: int | None
    cached: bool


def model_patterns(gguf_file: str | None, weights: bool, trust_remote_code: bool) -> list[str]:
    if gguf_file:  # a GGUF file holds config, tokenizer and weights in one: it is needed from the start
        return [gguf_file]
    return SETUP_FILES + (WEIGHT_FILES if weights else []) + (CODE_FILES if trust_remote_code else [])


def planned_files(ref: RepoRef, patterns: list[str]) -> list[HubFile] | None:
    """The files a download would fetch, from the Hub's listing; None when the Hub cannot be
    asked (offline, or unreachable: the cache decides then). Nothing is downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import DryRunError

    if offline():
        return None
    try:
        listing = snapshot_download(ref.repo_id, repo_type=ref.kind, revision=ref.revision,
                                    allow_patterns=patterns, dry_run=True)
    except DryRunError:
        return None
    except Exception as err:  # noqa: BLE001 - huggingface_hub's HTTP errors, mapped to one message
        raise hub_error(err, ref) from None
    return [HubFile(item.filename, item.file_size, item.is_cached) for item in listing]


def check_model_weights(ref: RepoRef, gguf_file: str | None) -> list[HubFile] | None:
    """Refuse a repo whose weights are only pickles (or missing), from the Hub's listing when
    online; returns that listing (None offline)."""
    listed = planned_files(ref, [gguf_file] if gguf_file else WEIGHT_FILES + PICKLE_WEIGHTS)
    if listed is not None:
        _check_weight_names(ref, [item.name for item in listed], gguf_file, "on the Hub")
    return listed


def _check_weight_names(ref: RepoRef, names: list[str], gguf_file: str | None, where: str) -> None:
    if gguf_file:
        if gguf_file not in names:
            raise UserError(f"{ref.label} has no file '{gguf_file}' {where}", where="model.gguf_file",
                            fix="name a .gguf file the repo has (see its Files tab)")
        return
    if any(fnmatch.fnmatch(name, "*.safetensors") for name in names):
        return
    pickles = sorted(name for name in names if any(fnmatch.fnmatch(name, p) for p in PICKLE_WEIGHTS))
    if pickles:
        raise UserError(
            f"{ref.label} has its weights only as pickle files ({', '.join(pickles[:3])}), which peftctl does "
            "not load: unpickling a file can run any code in it", where=ref.key,
            expected="a repo with .safetensors weights",
            fix="use a revision or copy of the model with safetensors weights (many repos have a 'refs/pr' "
                "conversion), or a .gguf file")
    raise UserError(f"{ref.label} has no model weights {where}", where=ref.key,
                    expected="a repo with .safetensors weights, or model.gguf_file naming a .gguf file in it")


def download(ref: RepoRef, patterns: list[str]) -> Path:
    """The snapshot folder holding `patterns` of the repo: from the cache, or downloaded into it."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(ref.repo_id, repo_type=ref.kind, revision=ref.revision,
                                   allow_patterns=patterns, tqdm_class=_progress_bar())
    except Exception as err:  # noqa: BLE001 - huggingface_hub's HTTP and cache errors, mapped to one message
        raise hub_error(err, ref) from None
    return Path(folder)


def check_cached_weights(ref: RepoRef, folder: Path, gguf_file: str | None) -> None:
    """The same refusal as `check_model_weights`, for a snapshot read from the cache offline."""
    names = [str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()]
    _check_weight_names(ref, names, gguf_file, f"in the Hugging Face cache ({folder})")


def _progress_bar():
    """huggingface_hub's own download bar, shown even though peftctl silences the libraries' tqdm
    bars (TQDM_DISABLE, see cli/commands.py): an explicit `disable=False` outranks that default."""
    from huggingface_hub.utils import tqdm

    class Shown(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = False
            super().__init__(*args, **kwargs)

    return Shown


def cached_revisions(ref: RepoRef) -> list[str]:
    """The branches and tags of the repo the cache knows (refs/), to suggest one."""
    from huggingface_hub.file_download import repo_folder_name

    refs = cache_dir() / repo_folder_name(repo_id=ref.repo_id, repo_type=ref.kind) / "refs"
    return sorted(str(path.relative_to(refs)) for path in refs.rglob("*") if path.is_file()) if refs.is_dir() else []


def not_cached(ref: RepoRef) -> UserError:
    cached = [rev for rev in cached_revisions(ref) if rev != (ref.revision or "main")]
    reason = "HF_HUB_OFFLINE is set, so nothing is downloaded" if offline() else "the Hub could not be reached"
    return UserError(
        f"{ref.label} is not in the Hugging Face cache ({cache_dir()}) and {reason}",
        where=ref.revision_key if cached else ref.key,
        expected=f"a revision the cache has: {', '.join(cached)}" if cached else None,
        fix=f"fetch it on a machine with a network: `{ref.fetch_command()}` (into the same cache, HF_HOME), "
            "or run the same recipe there" + ("; or unset HF_HUB_OFFLINE" if offline() else ""))


def hub_error(err: Exception, ref: RepoRef) -> UserError:
    """huggingface_hub's exception as a message that says which repo, what went wrong and what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"https://huggingface.co/{'datasets/' if ref.kind == 'dataset' else ''}{ref.repo_id}"
    token_fix = "set HF_TOKEN to a token of an account that has access (or run `hf auth login`)"
    if isinstance(err, GatedRepoError):
        return UserError(f"{ref.label} is gated: its authors grant access to each account", where=ref.key,
                         fix=f"ask for access at {page}, then {token_fix}")
    if isinstance(err, RepositoryNotFoundError):
        return UserError(f"{ref.label} is not on the Hub, or is private", where=ref.key,
                         fix=f"check the id (org/name) at {page}; for a private repo, {token_fix}")
    if isinstance(err, RevisionNotFoundError):
        return UserError(f"{ref.label}: the Hub has no such branch, tag or commit", where=ref.revision_key,
                         expected="a branch, tag or commit hash of the repo (default: main)")
    if isinstance(err, HFValidationError):
        return UserError(f"'{ref.repo_id}' is not a valid Hub id: {one_line(err, 160)}", where=ref.key,
                         expected="org/name, or a path on this machine")
    if isinstance(err, LocalEntryNotFoundError):
        return not_cached(ref)
    if isinstance(err, HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        return UserError(f"the Hub refused {ref.label}" + (f" (HTTP {status})" if status else "")
                         + f": {one_line(err, 200)}", where=ref.key,
                         fix="try again later; for a private repo, " + token_fix)
    if isinstance(err, OSError):
        return UserError(f"could not fetch {ref.label}: {one_line(err, 200)}", where=ref.key,
                         fix=f"check the network and the cache folder ({cache_dir()}), then run again")
    raise err
