#!/usr/bin/env python3
"""Generate the small instruction-tuning datasets that ship with peftctl.

Everything is built offline from the Python standard library of the running
interpreter: the docstrings and signatures of well-known stdlib functions,
classes and built-in methods (json, os.path, re, itertools, collections, math,
string, textwrap, functools, pathlib, statistics, datetime, ...).  Nothing is
downloaded.

Files written (relative to ``--out-dir``, default ``recipes/data``):

* ``quickstart/train.jsonl``       400 Alpaca rows  {"instruction", "input", "output"}
* ``quickstart/validation.jsonl``   60 Alpaca rows, about objects never seen in train
* ``tiny/train.jsonl``              16 very short Alpaca rows (overfit smoke tests)
* ``tiny/validation.jsonl``          4 very short Alpaca rows
* ``tiny/chat.jsonl``                8 rows {"messages": [{"role", "content"}, ...]}
* ``tiny/completion.jsonl``          8 rows {"text": ...}

Row kinds (one object gives up to four rows, all in one consistent style so a
small model such as SmolLM2-135M-Instruct can pick the style up in one epoch):

* describe:  "What does `json.dumps` do in Python?"
             -> "`json.dumps` is a function in the `json` module. Serialize ..."
* module:    "Which Python module provides `dumps`?" -> "The `json` module."
* signature: "Give the signature of `textwrap.wrap`."
             -> "The signature is `textwrap.wrap(text, width=70, **kwargs)`."
* kind:      "Is the following Python object a function, a class or a method?"
             with input "`collections.Counter`" -> "`collections.Counter` is a class."

The tiny files use only short rows (instruction + input + output at most 120
characters) about objects that the quickstart files do not use, each object at
most once: mostly "Which Python module provides X?", every fourth Alpaca row
the function/class question with a non-empty input.

The quickstart split is made per object (all rows about one object land in the
same split), after shuffling the objects with a fixed seed.  Output is
deterministic for a given seed and Python version; it requires CPython 3.11
(docstrings differ between versions) and a POSIX platform (``os.path`` is
``posixpath`` there).

Regenerate from the repository root with:

    python scripts/make_quickstart_data.py

Options: ``--seed`` (default 0) and ``--out-dir`` (default ``recipes/data``).
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import inspect
import json
import random
import re
import sys
from pathlib import Path

# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

# Modules whose public functions and classes are used.  "os.path" is shown to
# the model under that name (it is posixpath on POSIX systems).
MODULES = [
    "json", "os.path", "re", "itertools", "collections", "math", "string",
    "textwrap", "functools", "pathlib", "statistics", "datetime", "heapq",
    "bisect", "random", "shutil", "operator", "difflib", "fnmatch", "glob",
    "base64", "copy", "csv", "uuid", "secrets", "fractions", "decimal",
    "html", "urllib.parse", "shlex", "zlib", "calendar", "unicodedata",
]

# Built-in functions and classes (no module prefix in the questions).
BUILTIN_NAMES = [
    "abs", "all", "any", "ascii", "bin", "callable", "chr", "divmod",
    "enumerate", "filter", "format", "getattr", "hasattr", "hash", "hex",
    "id", "isinstance", "issubclass", "iter", "len", "map", "max", "min",
    "next", "oct", "ord", "pow", "print", "repr", "reversed", "round",
    "setattr", "sorted", "sum", "vars", "zip", "dict", "frozenset", "list",
    "set", "tuple", "range", "slice", "bytearray", "memoryview",
]

# Methods of built-in types, shown as e.g. `str.split`.
METHOD_TYPES = [str, list, dict, set, bytes]

SEED = 0
N_TRAIN, N_VALID = 400, 60
N_TINY_TRAIN, N_TINY_VALID, N_TINY_CHAT, N_TINY_COMPLETION = 16, 4, 8, 8
MAX_DESCRIBE_WORDS = 50      # skip descriptions longer than this
MAX_SIGNATURE_CHARS = 90     # skip signatures longer than this
TINY_MAX_CHARS = 120         # instruction + input + output, tiny Alpaca rows

# Anything matching this must never reach the data (machine-specific or noisy).
FORBIDDEN = re.compile(r"0x[0-9a-fA-F]{4,}|/usr/|/home/|/work/|/tmp/|site-packages|\\\\")


# ---------------------------------------------------------------------------
# Collecting objects
# ---------------------------------------------------------------------------

def public_names(module) -> list[str]:
    """Public names of a module: its __all__, else non-underscore names."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in dir(module) if not n.startswith("_")]
    return sorted(set(names))


def kind_of(obj) -> str | None:
    """'class', 'function' or None for anything else (constants, modules...)."""
    if inspect.isclass(obj):
        return "class"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return "function"
    return None


def defined_in(obj, modname: str) -> bool:
    """False for names a module merely re-exports (e.g. `uuid.Enum`).

    C accelerators count as the module itself (`_heapq` for `heapq`), and
    os.path's functions live in posixpath/genericpath.
    """
    home = getattr(obj, "__module__", None)
    if home is None:
        return True
    if modname == "os.path":
        return home in ("posixpath", "genericpath")
    return home.lstrip("_").split(".")[0] == modname.split(".")[0]


def collect_objects() -> list[dict]:
    """All candidate objects as dicts: qualname, module, name, kind, obj."""
    found = []
    for modname in MODULES:
        module = importlib.import_module(modname)
        for name in public_names(module):
            obj = getattr(module, name, None)
            kind = kind_of(obj)
            if kind is None or not defined_in(obj, modname):
                continue
            found.append(dict(qualname=f"{modname}.{name}", module=modname,
                              name=name, kind=kind, obj=obj))
    for name in BUILTIN_NAMES:
        obj = getattr(builtins, name)
        found.append(dict(qualname=name, module="builtins", name=name,
                          kind=kind_of(obj), obj=obj))
    for typ in METHOD_TYPES:
        for name in sorted(vars(typ)):
            if name.startswith("_"):
                continue
            obj = getattr(typ, name)
            if not callable(obj):
                continue
            found.append(dict(qualname=f"{typ.__name__}.{name}",
                              module="builtins", name=name, kind="method",
                              obj=obj, owner=typ.__name__))
    return found


# ---------------------------------------------------------------------------
# Cleaning docstrings
# ---------------------------------------------------------------------------

# "name(args)", "name(args) -> result", "D.get(k[,d]) --> v, ..." or
# "partial(func, ...) - new function ..." lines that old-style docstrings
# start with instead of a prose summary.
SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)\s*(-+>?.*)?$")
# A sentence ends at . ! or ? followed by a capitalised word or code.
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z`'\"])")
ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "approx.")


def own_docstring(obj) -> str:
    """The object's own docstring (not inherited), dedented, or ''."""
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else ""
    if inspect.isclass(obj):
        # A class without its own docstring reports its base's; ignore that.
        doc = vars(obj).get("__doc__") or ""
    return inspect.cleandoc(doc) if doc else ""


def clean_markup(text: str) -> str:
    """Collapse whitespace and turn reST markup into plain Markdown-ish code."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)   # :func:`x` -> `x`
    text = re.sub(r"``([^`]+)``", r"`\1`", text)       # ``x`` -> `x`
    text = re.sub(r"\s+", " ", text)
    return text.strip()


def sentences(text: str) -> list[str]:
    """Split prose into sentences, keeping "e.g. foo" and the like together."""
    pieces = SENTENCE_BREAK.split(text)
    merged = [pieces[0]]
    for piece in pieces[1:]:
        if merged[-1].endswith(ABBREVIATIONS):
            merged[-1] += " " + piece
        else:
            merged.append(piece)
    return merged


def summary(obj) -> str | None:
    """First one or two sentences of the docstring, or None if unusable."""
    doc = own_docstring(obj)
    if not doc:
        return None
    lines = doc.split("\n\n")[0].splitlines()
    # Docstrings that open with a signature ("int([x]) -> integer") rarely
    # have a clean summary after it; skip those objects altogether.
    if not lines or SIGNATURE_LINE.match(lines[0].strip()):
        return None
    # Stop at a line introducing a list or example ("... from:").
    kept = []
    for line in lines:
        kept.append(line)
        if line.rstrip().endswith(":"):
            break
    text = clean_markup(" ".join(kept))
    if any(bad in text for bad in ("See help(", ">>>", "->")):
        return None
    if text.lower().startswith("deprecated"):
        return None
    parts = sentences(text)
    result = parts[0]
    if len(parts) > 1 and len(result.split()) < 12 and not parts[1].endswith(":"):
        result = f"{result} {parts[1]}"
    if result.endswith(":"):
        return None          # introduces a list or example we dropped
    if not result.endswith((".", "!", "?")):
        result += "."
    result = result[0].upper() + result[1:]
    if not 4 <= len(result.split()) <= MAX_DESCRIBE_WORDS:
        return None
    return result


def signature(obj, qualname: str) -> str | None:
    """`qualname(params)` from inspect.signature, or None if unavailable."""
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return None
    sig = re.sub(r" -> .*$", "", sig)      # return annotations add noise
    text = f"{qualname}{sig}"
    if "<" in text or len(text) > MAX_SIGNATURE_CHARS:
        return None
    return text


# ---------------------------------------------------------------------------
# Building rows
# ---------------------------------------------------------------------------

def row(instruction: str, output: str, input_: str = "") -> dict:
    return {"instruction": instruction, "input": input_, "output": output}


def where(item: dict) -> str:
    """Phrase saying what the object is and where it lives."""
    if item["kind"] == "method":
        return f"a method of the built-in `{item['owner']}` type"
    if item["module"] == "builtins":
        return f"a built-in {item['kind']}"
    return f"a {item['kind']} in the `{item['module']}` module"


def rows_for(item: dict, text: str, unique_names: set[str]) -> dict[str, dict]:
    """All rows about one object, keyed by template name.

    `text` is the object's docstring summary.
    """
    q = item["qualname"]
    out = {"describe": row(f"What does `{q}` do in Python?",
                           f"`{q}` is {where(item)}. {text}")}
    if item["module"] != "builtins" and item["name"] in unique_names:
        out["module"] = row(f"Which Python module provides `{item['name']}`?",
                            f"The `{item['module']}` module.")
    if item["kind"] in ("function", "method"):
        sig = signature(item["obj"], q)
        if sig:
            out["signature"] = row(f"Give the signature of `{q}`.",
                                   f"The signature is `{sig}`.")
    article = "an" if item["kind"][0] in "aeiou" else "a"
    out["kind"] = row("Is the following Python object a function, a class or a method?",
                      f"`{q}` is {article} {item['kind']}.", input_=f"`{q}`")
    return out


def build_items() -> list[dict]:
    """Objects with their rows; duplicates (same object or same text) dropped."""
    objects = collect_objects()
    # A bare name is only asked about ("Which module provides X?") when exactly
    # one chosen module exports it and it is not also a builtin.
    counts: dict[str, int] = {}
    for item in objects:
        if item["module"] != "builtins":
            counts[item["name"]] = counts.get(item["name"], 0) + 1
    unique_names = {n for n, c in counts.items()
                    if c == 1 and not hasattr(builtins, n)}

    items, seen_ids, seen_texts = [], set(), set()
    for item in objects:
        text = summary(item["obj"])
        if text is None:
            continue
        # Skip aliases (same object under another name) and objects whose
        # summary repeats one already used (e.g. shared generic docstrings).
        if id(item["obj"]) in seen_ids or text in seen_texts:
            continue
        by_template = rows_for(item, text, unique_names)
        rows = list(by_template.values())
        if any(FORBIDDEN.search(v) for r in rows for v in r.values()):
            continue
        seen_ids.add(id(item["obj"]))
        seen_texts.add(text)
        items.append({"qualname": item["qualname"], "name": item["name"],
                      "module": item["module"], "rows": rows,
                      "by_template": by_template})
    return items


def take(items: list[dict], n_rows: int) -> tuple[list[dict], list[dict]]:
    """Rows of whole objects from the front of `items` until n_rows is reached.

    Returns (rows, remaining items).  The last object may be cut short so the
    count is exact; its leftover rows are discarded, never reused elsewhere.
    """
    rows = []
    while len(rows) < n_rows:
        if not items:
            raise SystemExit(f"not enough material: wanted {n_rows} rows")
        rows.extend(items[0]["rows"])
        items = items[1:]
    return rows[:n_rows], items


# ---------------------------------------------------------------------------
# Tiny sets (short texts for a randomly initialised byte-level GPT-2)
# ---------------------------------------------------------------------------

def short_enough(r: dict) -> bool:
    return len(r["instruction"]) + len(r["input"]) + len(r["output"]) <= TINY_MAX_CHARS


def tiny_alpaca(items: list[dict], n: int) -> tuple[list[dict], list[dict]]:
    """n short rows, one per object: mostly "Which module provides X?", every
    fourth row the function/class question with a non-empty input field.

    Returns (rows, unused items).
    """
    out = []
    while len(out) < n:
        if not items:
            raise SystemExit("not enough short rows for the tiny sets")
        item, items = items[0], items[1:]
        wanted = "kind" if len(out) % 4 == 3 else "module"
        r = item["by_template"].get(wanted)
        if r and short_enough(r):
            out.append(r)
    return out, items


def with_module_row(items: list[dict], n: int) -> tuple[list[dict], list[dict]]:
    """The first n items that have a short "Which module provides X?" row."""
    chosen = []
    while len(chosen) < n:
        if not items:
            raise SystemExit("not enough short rows for the tiny sets")
        item, items = items[0], items[1:]
        r = item["by_template"].get("module")
        if r and short_enough(r):
            chosen.append(item)
    return chosen, items


def tiny_chat(items: list[dict]) -> list[dict]:
    """Chat rows: even rows get a system prompt, the second half two turns."""
    system = "You are a concise Python assistant."
    chats = []
    for i, item in enumerate(items):
        first = item["by_template"]["module"]
        messages = []
        if i % 2 == 0:
            messages.append({"role": "system", "content": system})
        messages += [{"role": "user", "content": first["instruction"]},
                     {"role": "assistant", "content": first["output"]}]
        if i >= len(items) // 2:
            messages += [{"role": "user", "content": "How do I import it?"},
                         {"role": "assistant",
                          "content": f"from {item['module']} import {item['name']}"}]
        chats.append({"messages": messages})
    return chats


def tiny_completion(items: list[dict]) -> list[dict]:
    """Plain-text rows: one short sentence each."""
    return [{"text": f"The `{item['name']}` name comes from the `{item['module']}` module."}
            for item in items]


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows):4d} rows  {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out-dir", type=Path, default=Path("recipes/data"))
    args = parser.parse_args()

    if sys.version_info[:2] != (3, 11):
        sys.exit("this script must run on Python 3.11 (docstrings differ between versions)")

    rng = random.Random(args.seed)
    items = build_items()
    rng.shuffle(items)

    # Quickstart: validation objects first, then train; no object is in both.
    valid, rest = take(items, N_VALID)
    train, rest = take(rest, N_TRAIN)
    rng.shuffle(valid)
    rng.shuffle(train)

    # Tiny: short rows about objects not used by quickstart (and each object
    # used at most once across the tiny files).
    tiny_train, rest = tiny_alpaca(rest, N_TINY_TRAIN)
    tiny_valid, rest = tiny_alpaca(rest, N_TINY_VALID)
    chat_items, rest = with_module_row(rest, N_TINY_CHAT)
    completion_items, rest = with_module_row(rest, N_TINY_COMPLETION)

    out = args.out_dir
    write_jsonl(out / "quickstart" / "train.jsonl", train)
    write_jsonl(out / "quickstart" / "validation.jsonl", valid)
    write_jsonl(out / "tiny" / "train.jsonl", tiny_train)
    write_jsonl(out / "tiny" / "validation.jsonl", tiny_valid)
    write_jsonl(out / "tiny" / "chat.jsonl", tiny_chat(chat_items))
    write_jsonl(out / "tiny" / "completion.jsonl", tiny_completion(completion_items))


if __name__ == "__main__":
    main()
