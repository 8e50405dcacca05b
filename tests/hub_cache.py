"""A Hugging Face Hub cache written by the tests: what `hf download` leaves on a user's disk.

The layout is huggingface_hub's (see its "Manage the cache" guide): for each repo,
`{models,datasets}--ORG--NAME/` with `blobs/` (file contents, named by hash), `snapshots/COMMIT/`
(the repo's files as relative symlinks into blobs) and `refs/BRANCH` (a file holding COMMIT).
peftctl's own resolution code then reads it through huggingface_hub, as it reads a real cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_repo(cache: Path, repo_id: str, files: Path | dict[str, bytes], kind: str = "model",
               revision: str = "main") -> Path:
    """Put `files` (a folder, or {path in repo: bytes}) into `cache` as repo `repo_id` at branch
    or tag `revision`; returns the snapshot folder."""
    if isinstance(files, Path):
        files = {str(p.relative_to(files)): p.read_bytes() for p in sorted(files.rglob("*")) if p.is_file()}
    commit = hashlib.sha1(repr(sorted(files.items())).encode() + revision.encode()).hexdigest()
    repo = Path(cache) / f"{kind}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    ref = repo / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return snapshot
