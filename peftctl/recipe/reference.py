"""The recipe reference (docs/reference/recipe.md), generated from the recipe's models
(scripts/update_recipe_reference.py writes it; tests/test_readme.py checks it is current).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel

from peftctl.methods import METHODS
from peftctl.recipe.schema import Recipe


def markdown_reference() -> str:
    """The recipe reference as Markdown tables, one per section and one per method."""
    top_level = {key: field for key, field in Recipe.model_fields.items()
                  if not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))
                  and key != "method"}
    parts = [_markdown_table("top-level keys — beside the sections", top_level)]
    for section, field in Recipe.model_fields.items():
        if section == "method":
            for method in METHODS.values():
                parts.append(_markdown_table(f"`method` — `name: {method.name}`", method.Config.model_fields))
        elif section not in top_level:
            parts.append(_markdown_table(f"`{section}` — {field.description}", field.annotation.model_fields))
    return "\n".join(parts)


def _markdown_table(title: str, fields: dict[str, Any]) -> str:
    lines = [f"#### {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, field in fields.items():
        if key == "name":
            continue
        default = "required" if field.is_required() else f"`{_yaml_value(field.get_default(call_default_factory=True))}`"
        kind = _type_name(field.annotation)
        lines.append(f"| `{key}` | {kind} | {default} | {_text(field.description)} |")
    return "\n".join(lines) + "\n"


def _text(description: str | None) -> str:
    """A description as Markdown table text: `<output>` and the like shown, not taken for HTML tags."""
    return (description or "").replace("<", "&lt;").replace(">", "&gt;")


def _yaml_value(value: Any) -> str:
    if isinstance(value, BaseModel):
        return "{}"
    return yaml.safe_dump(value if not isinstance(value, Path) else str(value), default_flow_style=True).strip().removesuffix("\n...").removesuffix("...").strip()


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type_name(arg) for arg in args)
    if origin is Literal:
        return " \\| ".join(f"'{arg}'" for arg in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if annotation is type(None):
        return "null"
    return {Path: "path"}.get(annotation, getattr(annotation, "__name__", str(annotation)))
