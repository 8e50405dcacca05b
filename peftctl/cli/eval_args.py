"""`peftctl eval`'s arguments resolved: which adapter folders, which held-out rows, which format.

A target is an adapter folder or a recipe (whose output.dir/adapter is evaluated); the data and
its format default to the recipe's validation data, the recipe saved beside an adapter counting as
its recipe. eval/scores.py then scores what this returns; it knows nothing of the command line.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

from peftctl.core.errors import UserError
from peftctl.core.files import check_path
from peftctl.export.adapter_files import saved_recipe
from peftctl.recipe.load import load_recipe
from peftctl.recipe.schema import DataSpec


def eval_inputs_of_several(targets: list[Path], data: Path | None, fmt: str | None) -> tuple[list[Path], Path, str, bool]:
    """`eval_inputs` for several targets: their adapter folders, and the one data file and format
    they are all scored on (--data, else the one their recipes name; different ones are an error)."""
    found = [eval_inputs(target, data, fmt) for target in targets]
    _, data_file, data_format, _ = found[0]
    for target, (_, other_file, other_format, _) in zip(targets[1:], found[1:]):
        if (Path(other_file).resolve(), other_format) != (Path(data_file).resolve(), data_format):
            raise UserError(f"its recipe holds out {other_file} ({other_format}), but {targets[0]}'s holds out "
                            f"{data_file} ({data_format})", file=target, where="--data",
                            expected="one data file for all the adapters, to compare them on the same rows",
                            fix="pass --data FILE (and --format) to score them all on it")
    return [item[0] for item in found], data_file, data_format, any(item[3] for item in found)


def eval_inputs(target: Path, data: Path | None, fmt: str | None) -> tuple[Path, Path, str, bool]:
    """(adapter folder, data file, format, trust_remote_code) from `peftctl eval`'s arguments.

    The target is an adapter folder or a recipe (whose output.dir/adapter is evaluated); the data
    and its format default to the recipe's validation data, the recipe saved beside an adapter
    counting as its recipe. An adapter made elsewhere (by peft) needs --data. Remote code is
    trusted only where the target is a recipe that says so (the user's own file); a recipe saved
    inside an adapter folder grants nothing.
    """
    for where, path in (("the adapter folder or recipe", target), ("--data", data)):
        if path is not None:
            check_path(path, where)
    target = Path(target)
    data_spec: dict[str, Any] = {}
    trust_remote_code = False
    if target.is_file():
        recipe = load_recipe(target)
        adapter_dir = recipe.output.dir / "adapter"
        data_spec = recipe.data.model_dump()
        trust_remote_code = recipe.model.trust_remote_code
    elif target.is_dir():
        adapter_dir = target
        data_spec = saved_recipe(target).get("data") or {}
    else:
        raise UserError("no such adapter folder or recipe", file=target)
    if not adapter_dir.is_dir():
        raise UserError("the recipe's adapter has not been trained yet", file=adapter_dir,
                        fix=f"run peftctl train {target} first")
    validation = data_spec.get("validation")
    data_file = Path(data) if data is not None else Path(validation) if isinstance(validation, (str, Path)) else None
    if data_file is None:
        reason = (f"the recipe holds out a fraction ({validation}) of its training rows, not a file"
                  if isinstance(validation, float) else "the adapter has no recipe with a validation file"
                  if not data_spec else "the adapter's recipe has no validation file")
        raise UserError(f"no evaluation data: {reason}", where="--data", fix="pass --data FILE with held-out rows")
    formats = typing.get_args(DataSpec.model_fields["format"].annotation)
    fmt = fmt or data_spec.get("format", "alpaca")
    if fmt not in formats:
        raise UserError(f"unknown data format {fmt!r}", where="--format", expected=" or ".join(formats),
                        fix="pass --format with one of those")
    return adapter_dir, data_file, fmt, trust_remote_code
