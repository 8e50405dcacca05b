"""The command line: parse arguments, load the recipe, call a component, print the result.

Every user mistake surfaces as a UserError: printed without a traceback, exit code 2.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from peftctl.console import fmt_loss, key_value_table, print_error, stdout
from peftctl.errors import UserError

# Our own progress bar and tables are the output: libraries' tqdm bars (GGUF conversion,
# datasets) would interleave with them. Set before any library imports tqdm.
os.environ.setdefault("TQDM_DISABLE", "1")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Parameter-efficient fine-tuning of language models from YAML recipes.",
)

RecipeArg = Annotated[Path, typer.Argument(help="The recipe YAML file.", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: --set train.lr=1e-4 (repeatable).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for programs instead of a table.")]


@contextmanager
def user_errors() -> Iterator[None]:
    try:
        yield
    except UserError as err:
        print_error(err)
        raise typer.Exit(2) from None


def quiet_libraries() -> None:
    """Our own progress bar and tables are the output; silence the libraries' bars and advice."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@app.command()
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", help="Output folder (overrides output.dir).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Train the recipe's adapter and export it in peft's format."""
    from peftctl import pipeline
    from peftctl.console import RichReporter
    from peftctl.recipe import load_recipe

    quiet_libraries()
    with user_errors():
        spec = load_recipe(recipe, set_ or [], output)
        summary = pipeline.run(spec, None if json_ else RichReporter(), overwrite=overwrite)
    result = summary.result
    figures = {
        "adapter_dir": str(summary.adapter_dir),
        "trainable_params": summary.trainable_params,
        "total_params": summary.total_params,
        "trainable_percent": 100 * summary.trainable_params / summary.total_params,
        "steps": result.steps,
        "train_rows": summary.train_rows,
        "validation_rows": summary.validation_rows,
        "dropped_rows": summary.dropped_rows,
        "tokens": result.tokens,
        "seconds": round(result.seconds, 2),
        "tokens_per_s": round(result.tokens_per_second, 1),
        "train_loss": result.train_loss,
        "val_loss_before": result.val_loss_before,
        "val_loss_after": result.val_loss_after,
    }
    if json_:
        print(json.dumps(figures))
        return
    stdout.print(key_value_table("peftctl train", [
        ("trainable / total params", f"{summary.trainable_params:,} / {summary.total_params:,} "
                                     f"({figures['trainable_percent']:.3f}%)"),
        ("rows (train / validation)", f"{summary.train_rows} / {summary.validation_rows}"
                                      + (f" ({summary.dropped_rows} dropped: prompt fills max_seq_len)"
                                         if summary.dropped_rows else "")),
        ("steps", str(result.steps)),
        ("tokens/s", f"{result.tokens_per_second:,.0f} ({result.tokens:,} tokens in {result.seconds:.1f} s)"),
        ("train loss (last window)", fmt_loss(result.train_loss)),
        ("validation loss", f"{fmt_loss(result.val_loss_before)} → {fmt_loss(result.val_loss_after)}"),
        ("adapter", str(summary.adapter_dir)),
        ("metrics", str(summary.output_dir / "metrics.jsonl")),
    ]))


@app.command()
def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe and print it with every default filled in."""
    from peftctl.recipe import load_recipe

    with user_errors():
        spec = load_recipe(recipe, set_ or [])
    # Plain print: rich would wrap long values (paths) at the terminal width and break the YAML.
    print(spec.to_yaml(), end="")


@app.command()
def schema() -> None:
    """Print the recipe's JSON schema (for editor completion and validation)."""
    from peftctl.recipe import Recipe

    print(json.dumps(Recipe.model_json_schema(), indent=2))


if __name__ == "__main__":
    app()
