#!/usr/bin/env python3
"""Generate the text-classification dataset that ships with peftctl: stdlib docstrings by topic.

Each row is a sentence or two from the docstring of a Python standard-library function, class or
method, labelled with the topic of the module it comes from: six classes, each from modules
chosen for it (TOPICS below):

* text             re, string, textwrap, difflib, unicodedata, codecs, shlex, locale, str's methods, ...
* files            os, os.path, shutil, pathlib, glob, tempfile, io, zipfile, tarfile, ...
* networking       socket, http.*, urllib.*, smtplib, ftplib, imaplib, ipaddress, xmlrpc.*, ...
* math             math, cmath, statistics, decimal, fractions, random, numbers
* data_structures  collections, heapq, bisect, array, dataclasses, enum, weakref, list's and dict's methods, ...
* concurrency      threading, multiprocessing.*, concurrent.futures, asyncio, queue, subprocess, ...

Nothing is downloaded: the text is the running interpreter's own docstrings, cut to a clean
summary (the first one or two sentences) by stdlib_docs.py, as the quickstart data is, and kept
only under MAX_CHARS characters.

What would give the label away without reading the text is masked: the object's own name and its
class's name become `<name>` (a name that is a lowercase word, such as "exists" or "deque", only
where it is written as code: "`deque`", ".exists", "copy("), and the name of any module in TOPICS
becomes `<module>` wherever it stands as a whole identifier ("asyncio.run()" -> "<module>.<name>()").
Module names that are ordinary English words (ENGLISH_WORDS: "string", "socket", "random",
"queue", ...) are left alone, since prose uses them as words; the topic's own vocabulary
("thread", "socket", "path") stays too: it is what a classifier should learn from.

Files written (relative to ``--out-dir``, default ``recipes/data``), rows {"text", "label"}:

* ``classify/train.jsonl``       480 rows, 80 per class
* ``classify/validation.jsonl``  120 rows, 20 per class

The split is made by source: a source is a module-level function, or a class together with its
methods, and all its rows land in the same file. Before the split, a text whose words mostly repeat
an earlier text's (NEAR_COPY) is dropped, so no validation row is a near-copy of a training row.
Each source gives at most MAX_PER_SOURCE rows, and each class takes its sources from its modules in
turn, so no single large module (asyncio, decimal) fills a class.

Output is deterministic for a given seed: inputs are sorted, shuffles use ``random.Random(seed)``.
It requires CPython 3.11 (docstrings differ between versions) on a POSIX platform, as
make_quickstart_data.py does. Regenerate from the repository root with:

    python scripts/make_classify_data.py

Options: ``--seed`` (default 0) and ``--out-dir`` (default ``recipes/data``).
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import random
import re

from make_quickstart_data import take, write_jsonl
from stdlib_docs import FORBIDDEN, defined_in, kind_of, public_names, script_args, summary

SEED = 0
N_TRAIN, N_VALID = 80, 20  # rows per class
MAX_CHARS = 300
MAX_PER_SOURCE = 6
NEAR_COPY = 0.7  # a text sharing this share of its words with a kept one (Jaccard) is dropped

# Per class, the modules its rows come from; "builtins.X" is the built-in type X's methods.
TOPICS = {
    "text": ["re", "string", "textwrap", "difflib", "unicodedata", "html", "html.parser", "shlex",
             "fnmatch", "codecs", "locale", "builtins.str"],
    "files": ["os", "os.path", "shutil", "pathlib", "glob", "tempfile", "stat", "filecmp", "io", "zipfile",
              "tarfile", "fileinput"],
    "networking": ["socket", "http.client", "http.server", "http.cookiejar", "urllib.request", "urllib.parse",
                   "smtplib", "ftplib", "poplib", "imaplib", "ipaddress", "socketserver", "xmlrpc.client",
                   "xmlrpc.server", "email.message", "mimetypes"],
    "math": ["math", "cmath", "statistics", "decimal", "fractions", "random", "numbers"],
    "data_structures": ["collections", "collections.abc", "heapq", "bisect", "array", "dataclasses", "enum",
                        "copy", "weakref", "graphlib", "types", "builtins.list", "builtins.dict", "builtins.set",
                        "builtins.frozenset", "builtins.tuple"],
    "concurrency": ["threading", "multiprocessing.pool", "multiprocessing.managers", "multiprocessing.synchronize",
                    "multiprocessing.connection", "multiprocessing.shared_memory", "multiprocessing.process",
                    "concurrent.futures", "asyncio", "queue", "sched", "subprocess", "contextvars", "selectors"],
}
# Module names that prose uses as ordinary words: masking them would blank out real text.
ENGLISH_WORDS = {"string", "html", "locale", "stat", "socket", "random", "decimal", "numbers", "statistics",
                 "collections", "array", "copy", "types", "enum", "queue", "email", "message", "client",
                 "server", "request", "parse", "parser", "path", "abc", "pool", "managers", "synchronize",
                 "connection", "process", "futures", "threading", "builtins", "str", "list", "dict", "set",
                 "frozenset", "tuple"}


def module_names() -> list[str]:
    """Every module name and dotted part in TOPICS that is masked, longest first ("os.path" before "os")."""
    names = set()
    for modules in TOPICS.values():
        for module in modules:
            names.add(module)
            names.update(module.split("."))
    return sorted(names - ENGLISH_WORDS, key=lambda n: (-len(n), n))


def identifier(name: str) -> str:
    """A pattern for `name` standing alone, not inside a longer identifier or hyphenated word. A
    hyphen after a two-letter name starts a word ("re-raise" is no module); after a longer one it
    does not ("pathlib-compatible")."""
    after = r"(?![\w-])" if len(name) <= 2 else r"(?!\w)"
    return rf"(?<![\w-]){re.escape(name)}{after}"


def as_code(name: str) -> str:
    """A pattern for `name` written as code: after a dot or backtick, or before a call's parenthesis."""
    return rf"(?<=[.`]){re.escape(name)}(?!\w)|(?<![\w-]){re.escape(name)}(?=[(`])"


MODULE_PATTERN = re.compile("|".join(identifier(name) for name in module_names()))


def mask(text: str, names: list[str]) -> str:
    """`text` with the object's and its class's names, and the modules' names, masked. A name that
    is a lowercase word ("exists", "copy", "deque") is masked only where it is written as code, so
    the prose that uses it as a word stays readable."""
    for name in names:
        pattern = as_code(name) if re.fullmatch("[a-z]+", name) else identifier(name)
        text = re.sub(pattern, "<name>", text)
    return MODULE_PATTERN.sub("<module>", text)


def public_members(cls) -> list[tuple[str, object]]:
    """A class's own public methods and properties (not inherited ones: their docstrings are the base's)."""
    found = []
    for name, value in sorted(vars(cls).items()):
        if name.startswith("_"):
            continue
        if isinstance(value, (classmethod, staticmethod)):
            value = value.__func__
        if isinstance(value, property):
            value = value.fget
        if callable(value) or inspect.ismethoddescriptor(value):
            found.append((name, value))
    return found


def sources(module_name: str) -> list[tuple[str, list[tuple[list[str], object]]]]:
    """The module's sources: (name, [(names to mask, object), ...]), a class with its methods."""
    if module_name.startswith("builtins."):
        owner = getattr(builtins, module_name.split(".")[1])
        return [(module_name, [([name, owner.__name__], obj) for name, obj in public_members(owner)])]
    module = importlib.import_module(module_name)
    found = []
    for name in public_names(module):
        obj = getattr(module, name, None)
        kind = kind_of(obj)
        if kind is None or not defined_in(obj, module_name):
            continue
        objects = [([name], obj)]
        if kind == "class":
            objects += [([member, name], value) for member, value in public_members(obj)]
        found.append((f"{module_name}.{name}", objects))
    return found


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def near_copy(seen: list[set[str]], text: str) -> bool:
    mine = words(text)
    return any(len(mine & other) / len(mine | other) >= NEAR_COPY for other in seen)


def class_items(label: str, seen: list[set[str]], rng: random.Random) -> list[dict]:
    """The class's sources as items {"rows": [...]} for take(), its modules taking turns."""
    per_module = []
    for module_name in TOPICS[label]:
        items = []
        for _source, objects in sources(module_name):
            rows = []
            for names, obj in objects:
                text = summary(obj)
                if text is None or len(text) > MAX_CHARS or FORBIDDEN.search(text) or near_copy(seen, text):
                    continue
                seen.append(words(text))
                rows.append({"text": mask(text, names), "label": label})
            if rows:
                items.append({"rows": rows[:MAX_PER_SOURCE]})
        rng.shuffle(items)
        per_module.append(items)
    # One source from each module in turn, until every module has given all of its.
    return [items[i] for i in range(max(map(len, per_module))) for items in per_module if i < len(items)]


def main() -> None:
    args = script_args(__doc__.splitlines()[0], SEED)
    rng = random.Random(args.seed)
    seen: list[set[str]] = []  # the words of every text kept so far, across classes
    train, valid = [], []
    for label in TOPICS:
        items = class_items(label, seen, rng)
        class_valid, rest = take(items, N_VALID)
        class_train, _ = take(rest, N_TRAIN)
        valid += class_valid
        train += class_train
    rng.shuffle(train)
    rng.shuffle(valid)
    write_jsonl(args.out_dir / "classify" / "train.jsonl", train)
    write_jsonl(args.out_dir / "classify" / "validation.jsonl", valid)


if __name__ == "__main__":
    main()
