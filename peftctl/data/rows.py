"""Reading data rows: local files, local dataset folders and Hub datasets, in the recipe's layout.

A data file is read here line by line (so a broken line is reported by its number); a folder or a
Hub dataset goes through `datasets.load_dataset` and its cache, with `data.subset`, `data.split`
and `data.revision`. Either way, `data.columns` and `data.roles` then rename the rows' fields to
the format's (alpaca, chat, completion), and every row is checked before any weights load;
errors name the file or dataset, its split and the row.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from peftctl.core import hub
from peftctl.core.errors import UserError, did_you_mean, one_line
from peftctl.recipe.schema import DATA_SUFFIXES, FORMAT_FIELDS, ROLES, DataSpec

_LAYOUTS = {
    "alpaca": '{"instruction": "...", "input": "... (optional)", "output": "..."}',
    "chat": '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    "completion": '{"text": "..."}',
    "classification": '{"text": "...", "text_pair": "... (optional)", "label": "a name or an integer"}',
    "seq2seq": '{"source": "...", "target": "..."}',
}


def read_source(source: str | Path, spec: DataSpec, key: str = "data.train", split: str | None = None) -> list[dict[str, Any]]:
    """The rows of a data file, folder or Hub dataset, renamed to `spec.format`'s fields and checked.

    `split` (for folders and Hub datasets) defaults to `spec.split`; `key` is the recipe key that
    named the source, for messages.
    """
    split = split or spec.split
    if isinstance(source, Path) and not source.is_dir():
        rows, places = _read_file(source, key)
        label = str(source)
    else:
        rows = _load_dataset(source, spec, key, split)
        places = [f"row index {index}" for index in range(len(rows))]
        label = f"{source} (split {split})"
    if not rows:
        raise UserError("the data has no rows", file=label, where=key, expected=_LAYOUTS[spec.format] + " per row")
    columns = sorted({name for row in rows[:1000] if isinstance(row, dict) for name in row})
    rows = [_renamed(row, spec, columns, label) for row in rows]
    for row, place in zip(rows, places):
        check_row(row, spec.format, label, place, columns)
    return rows


def read_rows(path: Path, fmt: str, key: str = "data.train") -> list[dict[str, Any]]:
    """The rows of a local data file in layout `fmt`, checked (errors name the 1-based row)."""
    return read_source(Path(path), DataSpec(train=Path(path), format=fmt), key)


# --- local files --------------------------------------------------------------------------------


def _read_file(path: Path, key: str) -> tuple[list[Any], list[str]]:
    if not path.is_file():
        raise UserError("data file not found", file=path, where=key,
                        fix="check the path; relative paths are resolved from the recipe's folder")
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise UserError(f"unsupported data file type '{path.suffix}'", file=path, where=key,
                        expected=f"a {', '.join(DATA_SUFFIXES)} file, a folder of them, or a Hub dataset id")
    rows, lines = _read_json(path) if suffix in (".json", ".jsonl") else _read_table(path, suffix.lstrip("."))
    places = [f"row {number}" + (f" (line {line})" if line not in (None, number) else "")
              for number, line in enumerate(lines, start=1)]
    return rows, places


def _read_json(path: Path) -> tuple[list[Any], list[int | None]]:
    """A JSON list of rows, or JSON Lines; read here rather than by `datasets` so that a broken
    line is reported by its number (and nothing is cached)."""
    text = _read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"invalid JSON: {err.msg}", file=path, where=f"line {err.lineno}, column {err.colno}",
                            expected="a JSON list of row objects, or one JSON object per line") from None
        except RecursionError:
            raise _too_deep(path, None) from None
        return rows, [None] * len(rows)
    rows, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise UserError(f"invalid JSON: {err.msg}", file=path, where=f"line {number}, column {err.colno}",
                            expected="one JSON object per line (JSON Lines)") from None
        except RecursionError:
            raise _too_deep(path, number) from None
        lines.append(number)
    return rows, lines


def _too_deep(path: Path, line: int | None) -> UserError:
    return UserError("the JSON is nested too deeply to be a data row", file=path,
                     where=f"line {line}" if line else None, expected="row objects whose fields are text")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"the data file is not UTF-8 text (byte {err.start})", file=path,
                        expected="a UTF-8 encoded file") from None


def _read_table(path: Path, reader: str) -> tuple[list[Any], list[int | None]]:
    import datasets

    datasets.disable_progress_bars()
    try:
        table = datasets.load_dataset(reader, data_files=str(path), split="train", keep_in_memory=True)
    except Exception as err:  # datasets/pyarrow raise many types for malformed files
        raise UserError(f"could not read the data file: {_root_cause(err)}", file=path,
                        expected=f"a valid {reader} file") from None
    rows = table.to_list()
    # CSV: the header is line 1, so row N is on line N + 1.
    return rows, [n + 2 for n in range(len(rows))] if reader == "csv" else [None] * len(rows)


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ or err.__context__:  # datasets wraps the reader's useful message
        err = err.__cause__ or err.__context__
    return err


# --- folders and Hub datasets, through `datasets` -----------------------------------------------


def _load_dataset(source: str | Path, spec: DataSpec, key: str, split: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    split_key = "data.split" if key == "data.train" else "data.validation_split"
    ref = hub.RepoRef(str(source), spec.revision, kind="dataset", key=key, revision_key="data.revision")
    try:
        if isinstance(source, Path):
            table = load_dataset(str(source), name=spec.subset, split=split)
        elif hub.offline() and (snapshot := _cached_snapshot(ref)) is not None:
            # Fetched with `hf download --repo-type dataset`: its files are in the Hub cache.
            table = load_dataset(str(snapshot), name=spec.subset, split=split)
        else:  # online; offline, datasets' own cache of an earlier load
            table = load_dataset(str(source), name=spec.subset, split=split, revision=spec.revision)
    except Exception as err:  # noqa: BLE001 - datasets and huggingface_hub raise many types for the same mistakes
        raise _dataset_error(err, ref, split_key, split, local=isinstance(source, Path)) from None
    return table.to_list()


def describe_hub_source(source: str | Path, spec: DataSpec, key: str) -> str | None:
    """For `peftctl validate`: whether a Hub dataset exists (online) or is cached (offline),
    without loading it. None for local data."""
    if not isinstance(source, str):
        return None
    ref = hub.RepoRef(source, spec.revision, kind="dataset", key=key, revision_key="data.revision")
    if not hub.offline():
        from huggingface_hub import HfApi

        try:
            info = HfApi().dataset_info(source, revision=spec.revision)
        except Exception as err:  # noqa: BLE001 - huggingface_hub's HTTP errors, mapped to one message
            raise hub.hub_error(err, ref) from None
        return f"{ref.label}: on the Hub (commit {info.sha}); datasets fetches the files it needs when training"
    if (snapshot := _cached_snapshot(ref)) is not None:
        return f"{ref.label}: in the Hugging Face cache, {snapshot}"
    import datasets

    prepared = Path(datasets.config.HF_DATASETS_CACHE) / "___".join(source.split("/"))
    if prepared.is_dir():
        return f"{ref.label}: in the datasets cache, {prepared}"
    raise hub.not_cached(ref)


def _cached_snapshot(ref: hub.RepoRef) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(ref.repo_id, repo_type="dataset", revision=ref.revision, local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def _dataset_error(err: Exception, ref: hub.RepoRef, split_key: str, split: str, local: bool) -> UserError:
    from datasets.exceptions import DatasetNotFoundError

    text = one_line(_root_cause(err) if local else err, 240)
    if "Unknown split" in text or "Bad split" in text:
        listed = re.search(r"\[([^\]]*)\]", text)
        return UserError(f"{ref.repo_id} has no split '{split}'", where=split_key,
                         expected=f"one of: {listed.group(1).replace(chr(39), '')}" if listed else None,
                         fix=f"set {split_key} to one of the dataset's splits (a slice like 'train[:1000]' works too)")
    if "BuilderConfig" in text or "Config name is missing" in text or "available configs" in text.lower():
        return UserError(f"{ref.repo_id}: {text}", where="data.subset",
                         fix="set data.subset to one of the dataset's configurations")
    if not local and isinstance(err, ConnectionError):
        return hub.not_cached(ref)
    if not local and isinstance(err, DatasetNotFoundError):
        revision = "Revision" in text
        return UserError(f"{ref.label}: {text}", where=ref.revision_key if revision else ref.key,
                         fix="check the revision (a branch, tag or commit)" if revision else
                         "check the id (org/name); for a gated or private dataset, set HF_TOKEN to a token "
                         "of an account that has access (or run `hf auth login`)")
    return UserError(f"could not load {ref.label if not local else ref.repo_id}: {text}", where=ref.key,
                     expected="data files (json, jsonl, csv, parquet) datasets can read")


# --- renaming fields, and checking rows ---------------------------------------------------------


def _renamed(row: Any, spec: DataSpec, columns: list[str], label: str) -> Any:
    """`row` with the fields `data.columns` maps renamed to the format's, and chat roles mapped."""
    if not isinstance(row, dict):
        return row
    fields = FORMAT_FIELDS[spec.format]
    renamed = dict(row)
    for field in fields:
        column = spec.columns.get(field)
        if column is None or field in ("role", "content"):
            continue
        if column not in columns:
            hint = did_you_mean(column, columns)
            raise UserError(f"{label} has no column '{column}'" + (f" ({hint})" if hint else ""),
                            where=f"data.columns.{field}", expected=f"one of its columns: {', '.join(columns)}")
        renamed[field] = renamed.pop(column, None)
    if spec.format == "chat" and isinstance(renamed.get("messages"), list):
        role_key, content_key = spec.columns.get("role", "role"), spec.columns.get("content", "content")
        renamed["messages"] = [
            {"role": _role(m.get(role_key), spec.roles), "content": m.get(content_key)}
            if isinstance(m, dict) else m for m in renamed["messages"]]
    return renamed


def _role(name: Any, roles: dict[str, str]) -> Any:
    return roles.get(name, name) if isinstance(name, str) else name


def alpaca_prompt(row: dict[str, Any]) -> str:
    """An alpaca row's prompt: its instruction, then its input (if any) after a blank line; what a
    causal LM's user turn and a seq2seq model's source both are."""
    return row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")


def check_row(row: Any, fmt: str, path: Path | str, place: str, columns: list[str] | None = None) -> None:
    def fail(problem: str, expected: str = _LAYOUTS[fmt], fix: str | None = None) -> None:
        raise UserError(problem, file=path, where=place, expected=expected,
                        fix=fix or f"fix that row, or set data.format to the layout the data uses (now '{fmt}')")

    if not isinstance(row, dict):
        fail(f"the row is {_kind(row)}, not an object with fields")

    def text(key: str, required: bool = True) -> None:
        value = row.get(key)
        if value is None:
            if required:
                fail(f"missing field '{key}'", fix=_mapping_hint(key, fmt, columns))
            return
        if not isinstance(value, str):
            fail(f"field '{key}' is {_kind(value)}, not text")
        if required and not value.strip():
            fail(f"field '{key}' is empty")

    if fmt == "alpaca":
        text("instruction")
        text("input", required=False)
        text("output")
    elif fmt == "completion":
        text("text")
    elif fmt == "classification":
        text("text")
        text("text_pair", required=False)
        label = row.get("label")
        if label is None:
            fail("missing field 'label'", fix=_mapping_hint("label", fmt, columns))
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            fail(f"field 'label' is {_kind(label)}, not a label name or an integer",
                 expected="one label per row: a name (text) or an integer index into data.labels",
                 fix="give each row a single label; multi-label rows are not supported")
        if isinstance(label, str) and not label.strip():
            fail("field 'label' is empty")
        if isinstance(label, int) and label < 0:
            fail(f"field 'label' is {label}; integer labels count from 0")
    elif fmt == "seq2seq":
        text("source")
        text("target")
    else:
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            fail("missing field 'messages'" if messages is None else "field 'messages' is empty or not a list",
                 fix=_mapping_hint("messages", fmt, columns) if messages is None else None)
        for i, message in enumerate(messages, start=1):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                fail(f"message {i} is not a {{role, content}} pair with text content",
                     fix="map your keys with data.columns (ShareGPT: {messages: conversations, role: from, "
                         "content: value})")
            if message.get("role") is None:
                fail(f"message {i} has no role", expected=f"a role of {', '.join(ROLES)}",
                     fix="name your role key with data.columns, e.g. {role: from}")
            if message["role"] not in ROLES:
                fail(f"message {i} has role {message['role']!r}", expected=f"a role of {', '.join(ROLES)}",
                     fix=f"map your role names with data.roles, e.g. {{{message['role']}: assistant}}")
        if messages[0]["role"] == "assistant":
            fail("the first message is from the assistant", "a system or user message first")
        if not any(m["role"] == "assistant" for m in messages):
            fail("no assistant message: nothing to learn", "at least one assistant message")


def _mapping_hint(field: str, fmt: str, columns: list[str] | None) -> str | None:
    """For data whose fields have other names than the format's: say how to map them."""
    if not columns or field in columns:
        return None
    return (f"the data's fields are {', '.join(columns[:12])}: name the one that holds {field} with "
            f"data.columns ({{{field}: COLUMN}}), or set data.format to the layout the data uses (now '{fmt}')")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "true/false", int: "a number", float: "a number",
            str: "text"}.get(type(value), type(value).__name__)
