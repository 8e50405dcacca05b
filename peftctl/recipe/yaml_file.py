"""Reading a recipe's YAML: the file, a strict loader (a key given twice is an error, aliases
cannot blow a short file up), the `--set key.path=value` overrides, and where a key was set
(its line in the file, or the override), for error messages.

The result is the raw mapping schema.py validates; nothing here knows the recipe's keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftctl.core.errors import UserError


@dataclass
class RawRecipe:
    """A recipe file as read: its text, the mapping with the overrides applied, and which key
    paths the command line set (so errors point there instead of into the file)."""

    path: Path
    text: str
    raw: dict[str, Any]
    origins: dict[str, str] = field(default_factory=dict)

    def locate(self, key: str) -> str:
        return locate(key, self.text, self.origins)


def read_recipe_yaml(path: Path, overrides: list[str] = (), output_dir: str | Path | None = None) -> RawRecipe:
    """The recipe file at `path` parsed, `--set` overrides and `--output` applied."""
    if not path.is_file():
        raise UserError("recipe file not found" if not path.exists() else "the recipe path is a folder, not a file",
                        file=path, expected="a YAML recipe file", fix="check the path")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError("the recipe is not UTF-8 text", file=path, expected="a YAML recipe file") from None
    read = RawRecipe(path, text, _parse_yaml(text, path))
    for override in overrides:
        read.origins[_apply_override(read.raw, override, path)] = f"--set {override}"
    if output_dir is not None:
        if not isinstance(read.raw.get("output"), dict):
            read.raw["output"] = {}
        read.raw["output"]["dir"] = str(output_dir)
        read.origins["output.dir"] = "--output"
    return read


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain name, not a {type(key).__name__}", key_node.start_mark)
            if key in seen:
                raise _DuplicateKey(
                    None, None, f"key '{key}' is given twice (first on line {seen[key]})", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# A recipe is a few dozen values; aliases (*name) can make a short file stand for billions, which
# validating or printing would then walk.
MAX_VALUES = 100_000


def _count_values(value: Any, budget: int) -> int:
    """How many values `value` holds, counting each alias use again; stops once over `budget`."""
    stack, seen = [value], 0
    while stack and seen <= budget:
        item = stack.pop()
        seen += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return seen


def _parse_yaml(text: str, path: Path) -> dict[str, Any]:
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise UserError("the YAML is nested too deeply to be a recipe", file=path,
                        expected="a YAML mapping with sections model, method, data, train, output") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        if isinstance(err, _DuplicateKey):
            raise UserError(problem, file=path, where=where, fix="keep one of the two") from None
        raise UserError(f"YAML syntax error: {problem}" + (f" ({context})" if context else ""),
                        file=path, where=where, expected="valid YAML: `key: value` lines, nested by indentation",
                        fix="fix the YAML at that position (indentation, colons, brackets, quotes)") from None
    if not isinstance(raw, dict):
        raise UserError(f"the recipe is {'empty' if raw is None else 'not a mapping of sections'}", file=path,
                        expected="a YAML mapping with sections model, method, data, train, output")
    if _count_values(raw, MAX_VALUES) > MAX_VALUES:
        raise UserError(f"the recipe expands to more than {MAX_VALUES:,} values (YAML aliases repeating "
                        "lists inside lists?)", file=path, expected="a recipe: a few dozen values",
                        fix="write the values out instead of through nested aliases (*name)")
    # A section whose keys are all commented out reads as null: treat it as an empty section.
    return {key: {} if value is None else value for key, value in raw.items()}


def _apply_override(raw: dict[str, Any], override: str, path: Path) -> str:
    """Set `key.path=value` in the raw recipe (the value read as YAML); returns the key path."""
    key, sep, value = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(parts):
        raise UserError("an override must look like key.path=value", file=path, where=f"--set {override}",
                        expected="a dotted key path, '=', a value; e.g. --set train.lr=1e-4 or --set method.r=16")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            section = ".".join(parts[: depth + 1])
            raise UserError(f"'{section}' is a value, not a section, so it has no key '{parts[depth + 1]}'",
                            file=path, where=f"{key} (from --set {override})",
                            expected=f"a key path that ends at a value, e.g. --set {section}=VALUE")
        node = node[part]
    node[parts[-1]] = parse_value(value)
    return key


def parse_value(value: str) -> Any:
    """An override's value as YAML (numbers, booleans, lists, null); text that is not YAML stays text."""
    if not value:
        return None
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def locate(key: str, text: str | None, origins: dict[str, str]) -> str:
    """`key` with where it was set: 'train.lr (line 12)', 'train.lr (from --set train.lr=1)', or
    the bare key when neither the command line nor the file has it (a default)."""
    for path, origin in origins.items():
        if key == path or key.startswith(path + ".") or path.startswith(key + "."):
            return f"{key} (from {origin})"
    line = _line_of(text, key.split(".")) if text else None
    return f"{key} (line {line})" if line else key


def _line_of(text: str, keys: list[str]) -> int | None:
    """1-based line of the key path `keys` in the YAML text; None when it is not there."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            return None
        for key_node, value_node in node.value:
            if key_node.value == key:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            return None
    return line
