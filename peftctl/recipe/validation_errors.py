"""Turning pydantic's validation errors into ones a person can act on: the key path as the
user's YAML spells it (not pydantic's union members), its line, what was expected, and the
closest known key for a misspelt one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from peftctl.core.errors import UserError, did_you_mean
from peftctl.methods import METHODS


# What a valid value looks like, by pydantic error type; formatted with the error's context.
_EXPECTED = {
    "int_parsing": "an integer",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "float_type": "a number",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "path_type": "a file path",
    "literal_error": "one of {expected}",
    "greater_than": "a number greater than {gt}",
    "greater_than_equal": "a number of at least {ge}",
    "less_than": "a number less than {lt}",
    "less_than_equal": "a number of at most {le}",
}


def explain(err: ValidationError, raw: dict[str, Any], path: Path, locate: Callable[[str], str],
            schema: type[BaseModel]) -> UserError:
    """One UserError for all of `err`: the first problem, the others as `also` lines.

    `schema` is the recipe's model (recipe.Recipe), whose sections name the keys allowed where.
    """
    # One entry per key path: a union reports each alternative it tried for the same value.
    found: dict[str, tuple[str, list[str]]] = {}
    sections = _Sections(schema, raw)
    for error in err.errors():
        key, problem, expected = _describe(error, sections)
        _, expects = found.setdefault(key, (problem, []))
        if expected and expected not in expects:
            expects.append(expected)
    (key, (problem, expects)), *others = found.items()
    also = [f"{locate(k)}: {p}" + (f" (expected {' or '.join(e)})" if e else "") for k, (p, e) in others]
    return UserError(problem, file=path, where=locate(key), expected=" or ".join(expects) or None, also=also)


def _describe(error: dict[str, Any], sections: _Sections) -> tuple[str, str, str | None]:
    """(key path, problem, what was expected) for one pydantic error."""
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    loc, item = _data_path(error["loc"], sections.raw, missing=kind == "missing")
    key = ".".join(loc)
    methods = ", ".join(METHODS)
    if kind == "extra_forbidden":
        known = sections.known_keys(loc[:-1])
        hint = did_you_mean(loc[-1], known)
        return key, f"unknown key '{loc[-1]}'" + (f" ({hint})" if hint else ""), \
            f"one of: {', '.join(known)}" if known else None
    if kind == "union_tag_not_found":
        return key + ".name", "required key is missing (it picks the method)", f"one of: {methods}"
    if kind == "union_tag_invalid" or (key == "method.name" and kind == "literal_error"):
        name = ctx.get("tag", value)
        hint = did_you_mean(str(name), METHODS)
        return "method.name", f"unknown method '{name}'" + (f" ({hint})" if hint else ""), f"one of: {methods}"
    if kind == "missing":
        field = sections.field_at(loc)
        return key, "required key is missing", field.description if field else None
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        known = sections.known_keys(loc)
        return key, f"expected a section of keys, got {value!r}", \
            f"a mapping with keys: {', '.join(known)}" if known else "a mapping of keys"
    if kind == "value_error":
        return key, str(ctx.get("error", error["msg"])), None
    template = _EXPECTED.get(kind)
    expected = template.format(**ctx) if template else error["msg"]
    if kind == "literal_error" and "," not in expected and " or " not in expected:
        expected = expected.removeprefix("one of ")
    field = sections.field_at(loc)
    if field is not None and int in (field.annotation, *get_args(field.annotation)):
        expected = expected.replace("a number", "an integer")
    return key, f"invalid value {value!r}" + (f" (item {item} of the list)" if item else ""), expected


def _data_path(loc: tuple, raw: dict[str, Any], missing: bool) -> tuple[list[str], int | None]:
    """The error's location as keys of the user's YAML, and the 1-based list item if any.

    pydantic puts the union member it tried into the location (method.lora.r,
    target_modules.list[str]); those parts are not in the data, so following the data drops them.
    """
    keys: list[str] = []
    item = None
    node: Any = raw
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            keys.append(str(part))
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            item, node = part + 1, node[part]
        elif missing and i == len(loc) - 1:
            keys.append(str(part))
    return keys, item


@dataclass
class _Sections:
    """Which pydantic model holds the keys at a path of this recipe (under `method`, the Config of
    the method its `name` picks), to name the keys allowed where a wrong one was written."""

    schema: type[BaseModel]
    raw: dict[str, Any]

    def model_at(self, loc: list[str]) -> type[BaseModel] | None:
        model = self.schema
        for part in loc:
            if model is self.schema and part == "method":
                section = self.raw.get("method")
                method = METHODS.get(str(section.get("name"))) if isinstance(section, dict) else None
                if method is None:
                    return None
                model = method.Config
                continue
            field = model.model_fields.get(part)
            annotation = field.annotation if field else None
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return None
            model = annotation
        return model

    def known_keys(self, loc: list[str]) -> list[str]:
        """The keys allowed at `loc`, to suggest the closest one for a misspelt key."""
        model = self.model_at(loc)
        if model is None:
            return ["name"] if loc == ["method"] else []
        return list(model.model_fields)

    def field_at(self, loc: list[str]) -> FieldInfo | None:
        model = self.model_at(loc[:-1]) if loc else None
        return model.model_fields.get(loc[-1]) if model else None
