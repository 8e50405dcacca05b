"""Write docs/reference/recipe.md, the recipe reference, from the recipe schema.

    python scripts/update_recipe_reference.py          # rewrite docs/reference/recipe.md
    python scripts/update_recipe_reference.py --check  # exit 1 if it is out of date

tests/test_readme.py runs the check, so the reference cannot drift from the schema.
"""

from __future__ import annotations

import sys
from pathlib import Path

from peftctl.recipe.reference import markdown_reference

PAGE = Path(__file__).resolve().parent.parent / "docs" / "reference" / "recipe.md"
HEADER = """# Recipe reference

Every key of a recipe, its type, its default and what it means. This page is generated from the
recipe schema (`peftctl/recipe/schema.py`, each method's options in `peftctl/methods/`) by
`python scripts/update_recipe_reference.py`; a test fails when it is out of date, so edit the
schema, not this page. A guide to recipes: [Recipes](../recipes.md); `peftctl schema` prints the
same schema as JSON Schema, for editor completion.

"""


def page() -> str:
    return HEADER + markdown_reference()


if __name__ == "__main__":
    updated = page()
    if "--check" in sys.argv[1:]:
        current = PAGE.read_text(encoding="utf-8") if PAGE.is_file() else None
        sys.exit(0 if updated == current else 1)
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(updated, encoding="utf-8")
