"""The command line: parse arguments, load the recipe, call a component, print the result.

Every user mistake surfaces as a UserError: printed without a traceback, exit code 2.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

from peftctl import jsontext
from peftctl.console import fmt_loss, print_error, print_interrupted, print_summary, print_summary_lines, stdout
from peftctl.errors import UserError

# Our own progress bar and tables are the output: libraries' tqdm bars (GGUF conversion,
# datasets) would interleave with them. Set before any library imports tqdm.
os.environ.setdefault("TQDM_DISABLE", "1")

# typer labels every option in the help by its type, flags too (`--json <bool>`), which reads as
# if they took a value: a flag is shown bare.
_type_label = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = lambda self, ctx: "" if self.is_flag else _type_label(self, ctx)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Parameter-efficient fine-tuning of language models from YAML recipes.",
)

def _print_version(asked: bool) -> None:
    if asked:
        from peftctl import __version__

        print(f"peftctl {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                               help="Print peftctl's version and exit.")] = False) -> None:
    """Parameter-efficient fine-tuning of language models from YAML recipes."""
    if not sys.warnoptions:  # a library's warning that gets through is shown once, not once per step or layer
        warnings.filterwarnings("once", append=True)


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


@contextmanager
def user_errors(json_: bool = False) -> Iterator[None]:
    """A UserError ends the command with exit 2: its message on stderr, or with --json one JSON
    object on stdout ({"error", "file", "key", "line", "expected", "fix", "also"}) for programs."""
    try:
        yield
    except UserError as err:
        if json_:
            print(jsontext.dumps(err.as_dict()))
        else:
            print_error(err)
        raise typer.Exit(2) from None


def quiet_libraries() -> None:
    """Our own progress bar and tables are the output; silence the libraries' bars and advice."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class _OptionalValueCommand(typer.core.TyperCommand):
    """A command whose `--resume` may come without a value, meaning 'latest'.

    Typer's parser has no optional-value options (click's flag_value): a bare `--resume`, at the
    end or before another option, is given its value here before parsing.
    """

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        args = [RESUME_LATEST_ARG if arg == "--resume" and (i + 1 == len(args) or args[i + 1].startswith("-"))
                else arg for i, arg in enumerate(args)]
        return super().parse_args(ctx, args)


RESUME_LATEST_ARG = "--resume=latest"


def leave_process_group() -> None:
    """End this process's part in an `accelerate launch` group, if it joined one: a process that
    exits with its gloo/NCCL group still up can abort ("terminate called without an active
    exception") and fail the whole launch."""
    torch = sys.modules.get("torch")  # not imported: no group was formed (a recipe error, say)
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@app.command(cls=_OptionalValueCommand)
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    output: Annotated[Optional[Path], typer.Option("--output", help="Output folder (overrides output.dir).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")] = False,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", metavar="[PATH]", show_default=False,
        help="Continue from a checkpoint: alone, the latest under <output>/checkpoints; or a checkpoint folder. "
             "Uses the existing output folder (no --overwrite).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Train the recipe's adapter and export it in peft's format."""
    from peftctl import pipeline
    from peftctl.console import reporter
    from peftctl.recipe import load_recipe
    from peftctl.train import TrainingInterrupted

    quiet_libraries()
    try:
        with user_errors(json_):
            spec = load_recipe(recipe, set_ or [], output)
            summary = pipeline.run(spec, None if json_ else reporter(), overwrite=overwrite, resume=resume)
    except TrainingInterrupted as stopped:
        from accelerate import PartialState

        state = PartialState()
        if state.is_main_process:
            command = shlex.join(["peftctl", "train", str(recipe), *(arg for item in set_ or [] for arg in ("--set", item)),
                                  *(["--output", str(output)] if output is not None else []),
                                  *(["--json"] if json_ else []), "--resume"])
            if state.num_processes > 1:  # a checkpoint resumes with as many processes as wrote it
                command = f"accelerate launch <the same options: {state.num_processes} processes> -m {command}"
            print_interrupted(stopped.step, stopped.checkpoint, command)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:
        print_interrupted(None, None, None)
        raise typer.Exit(130) from None
    finally:
        leave_process_group()
    if not summary.main_process:
        return
    result = summary.result
    figures = {
        "adapter_dir": str(summary.adapter_dir),
        "trainable_params": summary.trainable_params,
        "total_params": summary.total_params,
        "trainable_percent": 100 * summary.trainable_params / summary.total_params,
        "steps": result.steps,
        "resumed_from_step": result.resumed_from,
        "packed": result.packed,
        "processes": result.processes,
        "distributed": result.distributed,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
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
        print(jsontext.dumps(figures))
        return
    print_summary("peftctl train", [
        ("trainable / total params", f"{summary.trainable_params:,} / {summary.total_params:,} "
                                     f"({figures['trainable_percent']:.3f}%)"),
        ("rows (train / validation)", f"{summary.train_rows} / {summary.validation_rows}"
                                      + (f" ({summary.dropped_rows} dropped: prompt fills max_seq_len)"
                                         if summary.dropped_rows else "")),
        ("steps", str(result.steps) + (f" (resumed from step {result.resumed_from})" if result.resumed_from else "")),
        ("batches", "packed" if result.packed else "padded" + (f" (packing auto: {result.padding_reason})"
                                                                 if result.padding_reason else "")),
        *([("processes", f"{result.processes} ({result.distributed})")] if result.processes > 1 else []),
        ("tokens/s", f"{result.tokens_per_second:,.0f} ({result.tokens:,} tokens in {result.seconds:.1f} s of "
                     "training steps)"),
        ("train loss (last window)", fmt_loss(result.train_loss)),
        ("validation loss", f"{fmt_loss(result.val_loss_before)} → {fmt_loss(result.val_loss_after)}"),
    ], [
        ("adapter", str(summary.adapter_dir)),
        ("metrics", str(summary.output_dir / "metrics.jsonl")),
        ("last checkpoint", str(result.checkpoint)),
    ])


@app.command()
def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe, and what its method trains on the model (from its config alone), and print
    the recipe with every default filled in."""
    from peftctl.recipe import load_recipe

    quiet_libraries()
    with user_errors():
        spec = load_recipe(recipe, set_ or [])
        found = hub_sources(spec)
        from peftctl.pipeline import describe_targets

        found.append(f"targets: {describe_targets(spec)}")
    # Plain print: rich would wrap long values (paths) at the terminal width and break the YAML.
    print(spec.to_yaml(), end="")
    for line in found:  # stderr: stdout stays the recipe, for programs
        print(line, file=sys.stderr)


def hub_sources(spec) -> list[str]:
    """Where the recipe's Hub model and datasets are (cache) or what training would fetch; nothing
    is downloaded. Local models and data are not looked at here (training reads them first)."""
    from peftctl.errors import blame
    from peftctl.hub import is_hub_id

    data = spec.data
    hub_named = [value for value in (spec.model.name_or_path, data.train, data.validation)
                 if isinstance(value, str) and is_hub_id(value)]
    if not hub_named:
        return []
    from peftctl.model import describe_hub_source as describe_model
    from peftctl.rows import describe_hub_source as describe_data

    with blame(spec.source, spec.locate):
        found = [describe_model(spec.model), describe_data(data.train, data, "data.train")]
        if data.validation != data.train:
            found.append(describe_data(data.validation, data, "data.validation"))
    return [f"source: {line}" for line in found if line]


@app.command()
def schema() -> None:
    """Print the recipe's JSON schema (for editor completion and validation)."""
    from peftctl.recipe import Recipe

    print(json.dumps(Recipe.model_json_schema(), indent=2))


@app.command()
def merge(
    adapter: Annotated[Path, typer.Argument(help="The adapter folder (adapter_config.json + adapter_model.safetensors).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the merged model.")],
    base: Annotated[Optional[str], typer.Option("--base", help="Base model (default: the adapter's own).")] = None,
    dtype: DtypeOpt = None,
    overwrite: OverwriteModelOpt = False,
    trust_remote_code: TrustOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Fold an adapter into its base model and save a plain transformers model folder."""
    from peftctl.export import merge_to_folder

    quiet_libraries()
    with user_errors(json_):
        check_dtype(dtype)
        figures = merge_to_folder(adapter, out, base, dtype, trust_remote_code, overwrite)
    figures = {"merged_model": str(out), **figures}
    print_result(figures, json_, "peftctl merge", [
        (f"vs {figures['compared_with']}", f"max |Δlogit| {figures['max_abs_logit_diff']:.2e}, "
                              f"mean {figures['mean_abs_logit_diff']:.2e} (fp32 merge, probe batch)"),
        ("saved as", f"{figures['dtype']}" + (" (the base's precision)" if dtype is None else "")),
    ], [
        ("merged model", str(out)),
        ("load it with", f"AutoModelForCausalLM.from_pretrained({str(out)!r})"),
    ])


@app.command("export-base")
def export_base(
    model: Annotated[str, typer.Argument(help="The model: a builtin (builtin:smollm2-135m), a .gguf file, a folder or a Hub id.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Folder for the model.")],
    dtype: DtypeOpt = None,
    overwrite: OverwriteModelOpt = False,
    trust_remote_code: TrustOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Save a base model as a plain transformers folder, for peft and other tools (builtins, GGUF)."""
    from peftctl.export import export_base as save_base

    quiet_libraries()
    with user_errors(json_):
        check_dtype(dtype)
        figures = save_base(model, out, dtype, trust_remote_code, overwrite)
    print_result(figures, json_, "peftctl export-base", [("saved as", figures["dtype"])], [
        ("model folder", str(out)),
        ("load it with", f"AutoModelForCausalLM.from_pretrained({str(out)!r})"),
    ])


def print_result(figures: dict, json_: bool, title: str, rows: list[tuple[str, str]],
                 verbatim: list[tuple[str, str]]) -> None:
    """A command's figures: one JSON object with --json, else a table and the paths below it."""
    if json_:
        print(jsontext.dumps(figures))
    else:
        print_summary(title, rows, verbatim)


def check_dtype(dtype: str | None) -> None:
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise UserError(f"unknown dtype '{dtype}'", where="--dtype", expected="float32, bfloat16 or float16")


@app.command("eval")
def evaluate(
    target: Annotated[Path, typer.Argument(help="An adapter folder, or a recipe (its output.dir/adapter is evaluated).")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Held-out rows (default: the recipe's validation data).")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="Row layout of --data: alpaca, chat or completion (default: the recipe's).")] = None,
    samples: Annotated[int, typer.Option("--samples", min=0, help="Rows to generate replies for (greedy, stops at EOS).")] = 5,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model (default: the adapter's own).")] = None,
    trust_remote_code: TrustOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Held-out loss, perplexity, token accuracy and generations: base model vs base + adapter."""
    from peftctl.evaluate import eval_inputs, evaluate_adapter

    quiet_libraries()
    with user_errors(json_):
        adapter_dir, data_file, data_format, recipe_trusts = eval_inputs(target, data, fmt)
        report = evaluate_adapter(adapter_dir, data_file, data_format, samples, base=base,
                                  trust_remote_code=trust_remote_code or recipe_trusts)
    if json_:
        print(jsontext.dumps(report.as_dict()))
        return
    from peftctl.console import print_eval

    print_eval(report)


@app.command()
def plan(recipe: RecipeArg, set_: SetOpt = None, json_: JsonOpt = False,
         fsdp: Annotated[int, typer.Option("--fsdp", min=1, metavar="GPUS",
                                           help="Memory per GPU when FSDP2 shards the model over this many GPUs.")] = 1,
         ) -> None:
    """Parameter counts and memory for a recipe, from the model's config alone (no weights load)."""
    from peftctl.console import plan_table
    from peftctl.plan import plan as make_plan
    from peftctl.recipe import load_recipe

    quiet_libraries()
    with user_errors(json_):
        spec = load_recipe(recipe, set_ or [])
        result = make_plan(spec, shards=fsdp)
    if json_:
        print(jsontext.dumps(result.as_dict()))
        return
    stdout.print(plan_table(result))
    print_summary_lines([("model", str(result.model))])


if __name__ == "__main__":
    app()
