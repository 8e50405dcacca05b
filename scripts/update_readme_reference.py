"""Regenerate the README's recipe reference from the recipe schema (peftctl/recipe/schema.py, via peftctl/recipe/reference.py).

    python scripts/update_readme_reference.py          # rewrite README.md in place
    python scripts/update_readme_reference.py --check  # exit 1 if README.md is out of date

tests/test_readme.py runs the check, so the reference cannot drift from the schema.
"""

from __future__ import annotations

import sys
from pathlib import Path

from peftctl.recipe.reference import markdown_reference

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- recipe-reference:begin -->", "<!-- recipe-reference:end -->"


def with_reference(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{markdown_reference()}{END}{tail}"


if __name__ == "__main__":
    current = README.read_text(encoding="utf-8")
    updated = with_reference(current)
    if "--check" in sys.argv[1:]:
        sys.exit(0 if updated == current else 1)
    README.write_text(updated, encoding="utf-8")
