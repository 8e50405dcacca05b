"""Writing result folders so that a crash or Ctrl-C never leaves a half-written one behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peftctl.errors import UserError


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` in one rename.

    If the body raises, the temporary folder is deleted and `target` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    # mkdtemp makes the folder private (0700); results get the usual permissions for a new folder.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        yield staging
        for path in staging.iterdir():
            _fsync(path)
        _fsync(staging)  # its entries: the names of the files just synced
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(staging, target)
        _fsync(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Replace the file `path` with `text` in one rename: readers see the old or the new file, whole."""
    path = Path(path)
    fd, staging = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
        _fsync(path.parent)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


@contextmanager
def writing(path: Path, what: str, keep: Path | None = None) -> Iterator[None]:
    """Turn a failed write (disk full, no permission, read-only file system) into a UserError.

    `keep` names what the failure left untouched (the previous checkpoint), so the message can
    say there is something to go back to.
    """
    try:
        yield
    except OSError as err:
        reason = err.strerror or str(err)
        fix = "free disk space or make the folder writable, then run again"
        if keep is not None:
            fix += f"; the previous checkpoint {keep} is intact (resume it with --resume {keep})"
        raise UserError(f"could not write {what}: {reason}", file=path, fix=fix) from None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_replaceable(out: Path, overwrite: bool, where: str, markers: tuple[str, ...],
                      protected: dict[str, Path | None]) -> None:
    """Refuse to write into `out` unless it is new, empty, or (with --overwrite) one of our results.

    A result folder is recognised by one of `markers`; and since replacing it deletes it, a slip
    such as `--output .` must not take `protected` inputs (the recipe, the data, the working
    directory) with it.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"the output path is a file, not a folder: {out}", where=where,
                        fix="pass a folder path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"the output folder already exists and is not empty: {out}", where=where,
                        fix="pass --overwrite to replace it, or choose a new folder")
    resolved = out.resolve()
    for what, path in protected.items():
        if isinstance(path, Path) and (path.resolve() == resolved or resolved in path.resolve().parents):
            raise UserError(f"--overwrite would delete {out}, which holds {what}", where=where,
                            fix="choose a folder of its own")
    if not any((out / name).exists() for name in markers):
        raise UserError(f"--overwrite only replaces a folder peftctl wrote, and {out} has no "
                        f"{' or '.join(markers)}", where=where,
                        fix="choose a new folder, or delete this one yourself")
