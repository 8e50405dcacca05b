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

import builtins
import json
import random
from pathlib import Path

from stdlib_docs import FORBIDDEN, collect_objects, script_args, signature, summary

# ---------------------------------------------------------------------------
# Configuration (the objects asked about: stdlib_docs.py)
# ---------------------------------------------------------------------------

SEED = 0
N_TRAIN, N_VALID = 400, 60
N_TINY_TRAIN, N_TINY_VALID, N_TINY_CHAT, N_TINY_COMPLETION = 16, 4, 8, 8
TINY_MAX_CHARS = 120         # instruction + input + output, tiny Alpaca rows


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
    args = script_args(__doc__.splitlines()[0], SEED)
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
