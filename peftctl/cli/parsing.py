"""How peftctl's commands read their arguments where typer's parser alone cannot.

Two options take values typer has no form for: `train --resume` with or without a value, and
`merge --weights 0.5 0.3 0.2` (several numbers after one option). Their command classes rewrite
the argument list before click parses it. Also here: the help shows a flag bare, and the option
types the commands share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

# typer labels every option in the help by its type, flags too (`--json <bool>`), which reads as
# if they took a value: a flag is shown bare.
_type_label = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = lambda self, ctx: "" if self.is_flag else _type_label(self, ctx)


class OptionalValueCommand(typer.core.TyperCommand):
    """A command whose `--resume` may come without a value, meaning 'latest'.

    Typer's parser has no optional-value options (click's flag_value): a bare `--resume`, at the
    end or before another option, is given its value here before parsing.
    """

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        args = [RESUME_LATEST_ARG if arg == "--resume" and (i + 1 == len(args) or args[i + 1].startswith("-"))
                else arg for i, arg in enumerate(args)]
        return super().parse_args(ctx, args)


RESUME_LATEST_ARG = "--resume=latest"


class SeveralNumbersCommand(typer.core.TyperCommand):
    """A command whose `--weights` takes several numbers, `--weights 0.5 0.3 0.2` (one per
    adapter, as peft's add_weighted_adapter takes a list). A click option takes one value, so
    each number that follows is given an option of its own before parsing."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        spread, option, taken = [], None, 0
        for arg in args:
            if option and _is_number(arg):
                spread.append(f"{option}={arg}")  # `=`: a negative weight is not read as an option
                taken += 1
                continue
            if option and not taken:
                spread.append(option)  # no number after it: click says that it needs a value
            option, taken = (arg, 0) if arg == "--weights" else (None, 0)
            if option is None:
                spread.append(arg)
        if option and not taken:
            spread.append(option)
        return super().parse_args(ctx, spread)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# `peftctl bakeoff`'s options, here so that commands.py stays the list of commands.
# Options several commands share.
RecipeArg = Annotated[Path, typer.Argument(help="The recipe YAML file.", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: --set train.lr=1e-4 (repeatable).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for programs instead of a "
                                       "table; an error too (on stdout, exit 2).")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Run the Python code a model folder ships (its own architecture). Only for models "
    "whose code you trust; an adapter folder never turns this on.")]

DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="Precision of the saved weights: float32, bfloat16 "
                                                 "or float16 (default: the base model's own).")]
OverwriteModelOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a model folder peftctl wrote.")]

# The bake-off's options.
MethodsOpt = Annotated[str, typer.Option(
    "--methods", show_default=False, help="The methods to compare, by name, separated by commas: "
    "lora,dora,ia3,bitfit,houlsby,prompt_tuning,prefix_tuning (also rslora, pissa, olora, loraplus).")]
GridOpt = Annotated[Optional[list[str]], typer.Option(
    "--grid", metavar="KEY=V1,V2,...", help="A run per value for the methods that have KEY: --grid method.r=4,8,16 "
    "(repeatable: every combination).")]
BudgetStepsOpt = Annotated[Optional[int], typer.Option("--budget-steps", metavar="N", show_default=False,
                                                       help="Optimizer steps per run (train.max_steps).")]
BudgetMinutesOpt = Annotated[Optional[float], typer.Option(
    "--budget-minutes", metavar="M", show_default=False,
    help="Minutes of training steps per run (train.max_minutes); the recipe's steps or epochs still set its schedule.")]
SamplesOpt = Annotated[int, typer.Option("--samples", min=0, help="Held-out rows to generate replies for, per run "
                                                                  "(exact match; greedy, stops at EOS).")]
BakeoffOutputOpt = Annotated[Optional[Path], typer.Option(
    "--output", help="The bake-off's folder (default: the recipe's output.dir + '-bakeoff'); run again to continue.")]
BakeoffOverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Start again in a folder that holds another "
                                                                       "(or the same) bake-off, deleting its runs.")]
