"""Writing result folders so that a crash or Ctrl-C never leaves a half-written one behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from peftctl.core.errors import UserError


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
        for path in staging.rglob("*"):
            if path.is_file():  # safetensors writes its files private (0600): results get the usual mode
                path.chmod(0o666 & ~umask)
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


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary file name beside `path`; on success it replaces `path` in one rename, so
    readers see the old file or the new one, whole. If the body raises, the temporary file goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    staging = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield staging
        staging.chmod(0o666 & ~umask)  # mkstemp makes the file private; results get the usual mode
        _fsync(staging)
        os.replace(staging, path)
        _fsync(path.parent)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Replace the file `path` with `text` in one rename: readers see the old or the new file, whole."""
    with atomic_file(path) as staging:
        staging.write_text(text, encoding="utf-8")


@contextmanager
def writing(path: Path, what: str, keep: Path | None = None) -> Iterator[None]:
    """Turn a failed write (disk full, no permission, read-only file system) into a UserError.

    `keep` names what the failure left untouched (the previous checkpoint), so the message can
    say there is something to go back to.
    """
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as err:
        # safetensors reports the OS error inside its own text ("StorageFull", "code: 28").
        text = str(err)
        reason = getattr(err, "strerror", None) or (
            "No space left on device" if "StorageFull" in text or "code: 28" in text else " ".join(text.split()))
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


# What Linux and macOS file systems take: one name of at most 255 bytes, a path of at most 4095.
NAME_MAX, PATH_MAX = 255, 4095


def check_path(path: str | Path, where: str | None) -> None:
    """Refuse a path no file system can hold (a NUL byte, a name or path over the limits), which
    the OS would otherwise answer with an error deep inside whatever first touches it."""
    text = str(path)
    if "\0" in text:
        raise UserError(f"the path {text!r} contains a NUL byte", where=where, fix="remove it from the path")
    raw = os.fsencode(text)
    longest = max(raw.split(b"/"), key=len)
    if len(longest) > NAME_MAX or len(raw) > PATH_MAX:
        what = (f"a name in it is {len(longest)} bytes" if len(longest) > NAME_MAX else f"it is {len(raw)} bytes")
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise UserError(f"the path {shown} is longer than a file system allows: {what}", where=where,
                        expected=f"names of at most {NAME_MAX} bytes, a path of at most {PATH_MAX}",
                        fix="use a shorter path")


def check_replaceable(out: Path, overwrite: bool, where: str, markers: tuple[str, ...],
                      inputs: dict[str, Path | None]) -> None:
    """Refuse to write into `out` unless it is new, empty, or (with --overwrite) one of our results.

    A result folder is recognised by one of `markers`. Whatever `out` becomes, it must spare the
    command's `inputs` (recipe, data, base model, adapter, checkpoint; by resolved path): `out` may
    not be one of them or hold one (replacing it would delete the input), nor lie inside an input
    folder (the command would write into what it reads). The current directory is spared too,
    though a result inside it is the usual case.
    """
    out = Path(out)
    _check_spares_inputs(out, where, inputs)
    if out.exists() and not out.is_dir():
        raise UserError(f"the output path is a file, not a folder: {out}", where=where,
                        fix="pass a folder path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"the output folder already exists and is not empty: {out}", where=where,
                        fix="pass --overwrite to replace it, or choose a new folder")
    if not any((out / name).exists() for name in markers):
        raise UserError(f"--overwrite only replaces a folder peftctl wrote, and {out} has no "
                        f"{' or '.join(markers)}", where=where,
                        fix="choose a new folder, or delete this one yourself")


def check_new_file(out: Path, overwrite: bool, where: str, inputs: dict[str, Path | None]) -> None:
    """Refuse to write the file `out` where a file already is, unless --overwrite, and never
    where it would replace or sit inside one of the command's `inputs` (as check_replaceable)."""
    out = Path(out)
    _check_spares_inputs(out, where, inputs)
    if out.is_dir():
        raise UserError(f"the output path is a folder, not a file: {out}", where=where, fix="pass a file path")
    if out.exists() and not overwrite:
        raise UserError(f"the output file already exists: {out}", where=where,
                        fix="pass --overwrite to replace it, or choose a new file name")


def _check_spares_inputs(out: Path, where: str, inputs: dict[str, Path | None]) -> None:
    target = out.resolve()
    spared = {"the current directory": Path.cwd(), **inputs}
    for what, path in spared.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if target == source or target in source.parents:
            raise UserError(f"the output {out} would replace {what} ({path}), which this command reads",
                            where=where, fix="choose an output folder of its own, outside the inputs")
        if what != "the current directory" and source.is_dir() and source in target.parents:
            raise UserError(f"the output {out} is inside {what} ({path}): peftctl does not write into what a "
                            "command reads", where=where, fix="choose an output folder outside it")


@contextmanager
def output_lock(out: Path, where: str) -> Iterator[None]:
    """Hold the output folder for one command at a time: a second run into the same folder (while
    the first trains) is refused, naming the first. The lock is the file `.NAME.lock` beside the
    folder (the folder itself is replaced by the run); the OS releases it when the process ends,
    however it ends, so a killed run never leaves a stale lock."""
    import fcntl

    out = Path(out)
    lock_path = out.parent / f".{out.name}.lock"
    with writing(out, "the output folder"):
        if not out.parent.exists():
            out.parent.mkdir(parents=True)
        handle = open(lock_path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"the output folder {out} is in use by {holder}", where=where,
                            fix="wait for that run to end, or choose another output folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"peftctl (pid {os.getpid()})")
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock
