"""The Python standard library's objects and what their docstrings say, for make_quickstart_data.py
and make_classify_data.py.

Which modules, built-ins and built-in types' methods are asked about, the objects collected from
them (each with its qualified name, module, kind), and each one's docstring cut to a clean
summary and its signature, both skipped when too long or machine-specific (FORBIDDEN).
"""

from __future__ import annotations

import argparse
import builtins
import importlib
import inspect
import re
import sys
from pathlib import Path

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

MAX_DESCRIBE_WORDS = 50      # skip descriptions longer than this
MAX_SIGNATURE_CHARS = 90     # skip signatures longer than this

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


def script_args(description: str, seed: int) -> argparse.Namespace:
    """The data scripts' options (--seed, --out-dir), once this is the Python they need."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--out-dir", type=Path, default=Path("recipes/data"))
    args = parser.parse_args()
    if sys.version_info[:2] != (3, 11):
        sys.exit("this script must run on Python 3.11 (docstrings differ between versions)")
    return args
