"""A recipe file read: YAML, --set overrides, validation, its paths resolved and checked.

Every problem is a UserError naming the file and the key (with its line, or the --set it came
from); the schema is schema.py's, the YAML reading yaml_file.py's, the paths paths.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from peftctl.core.errors import blame
from peftctl.recipe.paths import check_data_files, check_paths, resolve_paths
from peftctl.recipe.schema import Recipe
from peftctl.recipe.validation_errors import explain
from peftctl.recipe.yaml_file import RawRecipe, read_recipe_yaml


def load_recipe(path: str | Path, overrides: list[str] = (), output_dir: str | Path | None = None,
                edit: Callable[[RawRecipe], None] | None = None) -> Recipe:
    """Read, override and validate a recipe; every problem is a UserError naming file and key.

    Data files are checked to exist here, so `peftctl validate` catches a wrong path too. `edit`
    changes the mapping read before it is validated (the bake-off's runs: their method, budget and
    grid values, each with the option it came from in `origins`).
    """
    path = Path(path)
    read = read_recipe_yaml(path, overrides, output_dir)
    if edit is not None:
        edit(read)
    try:
        recipe = Recipe.model_validate(read.raw)
    except ValidationError as err:
        raise explain(err, read.raw, path, read.locate, Recipe) from None
    recipe._source, recipe._text, recipe._origins = path, read.text, read.origins
    resolve_paths(recipe, path)
    with blame(path, recipe.locate):
        check_paths(recipe)
    check_data_files(recipe, path)
    return recipe
