"""A validated recipe's paths: resolved from the recipe's folder, and checked before anything runs.

A data file named relative to the recipe is found next to it wherever peftctl runs, so a recipe
and its data travel together; a name that exists nowhere and reads as a Hub id (org/name) is a
Hub dataset.
"""

from __future__ import annotations

from pathlib import Path

from peftctl.core.errors import UserError
from peftctl.core.files import check_path
from peftctl.core.hub import is_hub_id
from peftctl.recipe.schema import DATA_SUFFIXES, Recipe



def resolve_paths(recipe: Recipe, path: Path) -> None:
    """Data, adapter and output paths from the recipe's folder `path` (output.dir by default runs/<recipe name>)."""
    base = path.resolve().parent
    data = recipe.data
    data.train = data_source(data.train, base)
    if isinstance(data.validation, (str, Path)):
        data.validation = data_source(data.validation, base)
    if recipe.model.adapter is not None:
        recipe.model.adapter = base / recipe.model.adapter.expanduser()
    if recipe.output.dir is None:
        recipe.output.dir = Path("runs") / path.stem


def data_source(value: str | Path, base: Path) -> str | Path:
    """A local file or folder (a Path, resolved from `base`, the recipe's folder) when one exists
    or the name is not a Hub id; otherwise a Hub dataset id (a str). A file name is a Path already
    (DataSpec._file_names_are_paths)."""
    if isinstance(value, Path):
        return base / value.expanduser()
    local = base / Path(value).expanduser()
    try:
        exists = local.exists()
    except OSError:  # a name too long to exist: check_path reports it
        exists = True
    return local if exists or not is_hub_id(value) else value


def check_paths(recipe: Recipe) -> None:
    """Every path the recipe names is one this system can hold (files.check_path)."""
    for key, value in (("model.name_or_path", recipe.model.name_or_path), ("model.adapter", recipe.model.adapter),
                       ("data.train", recipe.data.train), ("data.validation", recipe.data.validation),
                       ("output.dir", recipe.output.dir)):
        if isinstance(value, (str, Path)):
            check_path(value, key)


def check_data_files(recipe: Recipe, path: Path) -> None:
    """The recipe's local data files exist and are of a type peftctl reads."""
    locate = recipe.locate
    for key, file in (("data.train", recipe.data.train), ("data.validation", recipe.data.validation)):
        if not isinstance(file, Path):
            continue
        if not file.exists():
            raise UserError(f"data file not found: {file}", file=path, where=locate(key),
                            expected=f"a {', '.join(DATA_SUFFIXES)} file, a folder of them, or a Hub dataset id (org/name)",
                            fix="check the path; relative paths are resolved from the recipe's folder")
        if file.is_file() and file.suffix.lower() not in DATA_SUFFIXES:
            raise UserError(f"unsupported data file type '{file.suffix}': {file}", file=path, where=locate(key),
                            expected=f"a {', '.join(DATA_SUFFIXES)} file")
