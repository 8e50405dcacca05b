"""The command line: parse arguments, load the recipe, call a component, print the result.

Every user mistake surfaces as a UserError: printed without a traceback, exit code 2.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from peftctl.cli import chat_serve
from peftctl.cli.boundary import leave_process_group, quiet_libraries, user_errors
from peftctl.cli.console import print_interrupted, print_summary, print_summary_lines, stdout
from peftctl.cli.parsing import (BakeoffOutputOpt, BakeoffOverwriteOpt, BudgetMinutesOpt, BudgetStepsOpt, DtypeOpt,
                                 GridOpt, JsonOpt, MethodsOpt, OptionalValueCommand, OverwriteModelOpt, RecipeArg,
                                 SamplesOpt, SetOpt, SeveralNumbersCommand, TrustOpt)
from peftctl.core import jsontext
from peftctl.core.errors import UserError

# Our own progress bar and tables are the output: libraries' tqdm bars (GGUF conversion,
# datasets) would interleave with them. Set before any library imports tqdm.
os.environ.setdefault("TQDM_DISABLE", "1")

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


@app.command(cls=OptionalValueCommand)
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
    from peftctl.cli.console import reporter
    from peftctl.recipe.load import load_recipe
    from peftctl.run import pipeline
    from peftctl.train.loop import TrainingInterrupted

    quiet_libraries()
    try:
        with user_errors(json_):
            spec = load_recipe(recipe, set_ or [], output)
            summary = pipeline.run(spec, reporter(quiet=json_), overwrite=overwrite, resume=resume)
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
    from peftctl.cli.console import print_train_summary

    figures = pipeline.train_figures(summary)
    if json_:
        print(jsontext.dumps(figures))
    else:
        print_train_summary(summary, figures)


@app.command()
def bakeoff(recipe: RecipeArg, methods: MethodsOpt, grid: GridOpt = None, set_: SetOpt = None,
            budget_steps: BudgetStepsOpt = None, budget_minutes: BudgetMinutesOpt = None, samples: SamplesOpt = 5,
            output: BakeoffOutputOpt = None, overwrite: BakeoffOverwriteOpt = False, json_: JsonOpt = False) -> None:
    """Train the recipe with each of several methods (or option values), one after another with the same data,
    seed and budget, and compare them in one table; the same command again continues an interrupted one."""
    from peftctl.bakeoff.planning import Request
    from peftctl.bakeoff.runner import BakeoffInterrupted, run_bakeoff
    from peftctl.cli import console as show

    quiet_libraries()
    try:
        with user_errors(json_):
            state, out = run_bakeoff(Request(recipe, methods, grid or [], set_ or [], budget_steps, budget_minutes,
                                             samples, output, overwrite), None if json_ else show.print_progress)
    except BakeoffInterrupted as stopped:
        show.print_bakeoff_interrupted(stopped)
        raise typer.Exit(130) from None
    if json_:
        print(jsontext.dumps(state))
    else:
        show.print_bakeoff(state, out)


@app.command()
def report(
    folder: Annotated[Path, typer.Argument(help="A run's output folder, or a bake-off's (it holds bakeoff.json).",
                                           metavar="DIR", show_default=False)],
    json_: JsonOpt = False,
) -> None:
    """Rebuild the report (report.html and its chart) of a run, old or interrupted, from its
    metrics.jsonl; or of a bake-off, every run's validation loss in one chart."""
    with user_errors(json_):
        written = rebuild_report(folder)
    if json_:
        print(jsontext.dumps(written))
    else:
        print_summary_lines([("report", written["report"]), ("chart", written["chart"])])


def rebuild_report(folder: Path) -> dict[str, str]:
    """The report of a run folder, or of a bake-off folder (it holds bakeoff.json); the paths written."""
    from peftctl.core.files import check_path
    from peftctl.report.bakeoff_report import BAKEOFF_FILE, BAKEOFF_PNG, write_bakeoff_report
    from peftctl.report.run_report import LOSS_PNG, write_run_report

    check_path(folder, "DIR")
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError("no such folder" if not folder.exists() else "not a folder", file=folder,
                        expected="the output folder of peftctl train (metrics.jsonl) or of peftctl bakeoff (bakeoff.json)",
                        fix="pass the folder that peftctl train's --output or the recipe's output.dir named")
    if (folder / BAKEOFF_FILE).is_file():
        return {"kind": "bakeoff", "report": str(write_bakeoff_report(folder)), "chart": str(folder / BAKEOFF_PNG)}
    return {"kind": "run", "report": str(write_run_report(folder)), "chart": str(folder / LOSS_PNG)}


@app.command()
def validate(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Check a recipe, and what its method trains on the model (from its config alone), and print
    the recipe with every default filled in."""
    from peftctl.recipe.load import load_recipe
    from peftctl.run.validate import findings

    quiet_libraries()
    with user_errors():
        spec = load_recipe(recipe, set_ or [])
        found = findings(spec)
    # Plain print: rich would wrap long values (paths) at the terminal width and break the YAML.
    print(spec.to_yaml(), end="")
    for line in found:  # stderr: stdout stays the recipe, for programs
        print(line, file=sys.stderr)


@app.command()
def schema() -> None:
    """Print the recipe's JSON schema (for editor completion and validation)."""
    from peftctl.recipe.schema import Recipe

    print(json.dumps(Recipe.model_json_schema(), indent=2))


@app.command(cls=SeveralNumbersCommand)
def merge(
    adapters: Annotated[list[Path], typer.Argument(
        help="The adapter folder (adapter_config.json + adapter_model.safetensors); several to combine them.",
        metavar="ADAPTER", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Folder for the merged model, or for the combined adapter.")],
    combine: Annotated[Optional[str], typer.Option(
        "--combine", help="Combine the adapters into one LoRA adapter instead, as peft's add_weighted_adapter: cat "
        "(exact: ranks add up; the default), linear, ties, dare_linear or dare_ties (one rank).")] = None,
    weights: Annotated[Optional[list[float]], typer.Option(
        "--weights", help="Combining: one weight per adapter, in order: --weights 0.5 0.3 0.2 (default: 1 each).",
        metavar="W...", show_default=False)] = None,
    density: Annotated[Optional[float], typer.Option(
        "--density", help="ties, dare_*: the fraction of each A and B tensor's entries kept (default 0.5).",
        show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", help="dare_*: seed of DARE's random masks (default 0): the same seed, the same adapter.",
        show_default=False)] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model (default: the adapter's own).")] = None,
    dtype: DtypeOpt = None,
    overwrite: OverwriteModelOpt = False,
    trust_remote_code: TrustOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Fold an adapter into its base model and save a plain transformers model folder; or combine
    several LoRA adapters of one base into one adapter folder in peft's format. A merged model
    holds one adapter, so several adapters (or --combine) mean combining; the base's weights are
    then never read, only its layer names and shapes."""
    if len(adapters) > 1 or combine is not None:
        return _combine_into_adapter(adapters, out, combine or "cat", weights, density, seed, base, dtype, overwrite,
                                     trust_remote_code, json_)
    from peftctl.export.merge import merge_to_folder

    def merged() -> dict:
        given = [name for name, value in (("--weights", weights), ("--density", density), ("--seed", seed))
                 if value is not None]
        if given:
            raise UserError(f"{given[0]} is an option for combining adapters, and one adapter is merged into its "
                            "base here", where=given[0], fix="pass several adapters (or --combine), or drop it")
        return {"merged_model": str(out), **merge_to_folder(adapters[0], out, base, dtype, trust_remote_code, overwrite)}

    def rows(figures: dict) -> list[tuple[str, str]]:
        return [(f"vs {figures['compared_with']}", f"max |Δlogit| {figures['max_abs_logit_diff']:.2e}, "
                 f"mean {figures['mean_abs_logit_diff']:.2e} (fp32 merge, probe batch)"),
                ("saved as", f"{figures['dtype']}" + (" (the base's precision)" if dtype is None else ""))]

    write_model_folder("peftctl merge", merged, rows, ("merged model", out), dtype, json_)


def _combine_into_adapter(adapters: list[Path], out: Path, how: str, weights: list[float] | None,
                          density: float | None, seed: int | None, base: str | None, dtype: str | None,
                          overwrite: bool, trust_remote_code: bool, json_: bool) -> None:
    """`peftctl merge A B C --out DIR`: the adapters combined into one adapter folder."""
    from peftctl.export.combine import combine_adapters as combine

    quiet_libraries()
    with user_errors(json_):
        if dtype is not None:
            raise UserError("--dtype sets a merged model's precision; a combined adapter is saved in float32",
                            where="--dtype", fix="drop --dtype")
        figures = combine(adapters, out, how, weights, density, seed, base, trust_remote_code, overwrite)
    if json_:
        print(jsontext.dumps(figures))
        return
    from peftctl.cli.console import print_combined

    print_combined(figures)


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
    from peftctl.export.merge import export_base as save_base

    write_model_folder("peftctl export-base", lambda: save_base(model, out, dtype, trust_remote_code, overwrite),
                       lambda figures: [("saved as", figures["dtype"])], ("model folder", out), dtype, json_)


def write_model_folder(title: str, write: Callable[[], dict], rows: Callable[[dict], list[tuple[str, str]]],
                       folder: tuple[str, Path], dtype: str | None, json_: bool) -> None:
    """The shape `merge` and `export-base` share: check --dtype, `write` the model folder (it
    checks the output, loads, and writes atomically), then print its figures: one JSON object
    with --json, else `rows` as a table and below it the folder and how to load it."""
    quiet_libraries()
    with user_errors(json_):
        check_dtype(dtype)
        figures = write()
    if json_:
        print(jsontext.dumps(figures))
        return
    label, out = folder
    print_summary(title, rows(figures), [
        (label, str(out)),
        ("load it with", f"{figures.get('auto_class', 'AutoModelForCausalLM')}.from_pretrained({str(out)!r})"),
    ])


def check_dtype(dtype: str | None) -> None:
    if dtype not in (None, "float32", "bfloat16", "float16"):
        raise UserError(f"unknown dtype '{dtype}'", where="--dtype", expected="float32, bfloat16 or float16")


@app.command()
def export(
    adapter: Annotated[Path, typer.Argument(help="The adapter folder (adapter_config.json + adapter_model.safetensors).")],
    fmt: Annotated[str, typer.Option("--format", help="The file format: gguf (llama.cpp, Ollama).")] = "gguf",
    out: Annotated[Optional[Path], typer.Option("--out", help="The GGUF file (default: beside the adapter folder).")] = None,
    merged: Annotated[bool, typer.Option("--merged", help="Fold the adapter into the base: one GGUF model file. "
                                         "Methods other than plain LoRA/rsLoRA are always exported so.")] = False,
    quant: Annotated[Optional[str], typer.Option("--quant", help="Precision of a merged model's matrices: q8_0, "
                                                 "f16, bf16 or f32 (default f16).")] = None,
    ollama: Annotated[bool, typer.Option("--ollama", help="Also write an Ollama Modelfile beside the GGUF file.")] = False,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model (default: the adapter's own).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    trust_remote_code: TrustOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Write an adapter for llama.cpp and Ollama: a LoRA GGUF, or the base with it merged."""
    from peftctl.export.gguf import export_gguf

    quiet_libraries()
    with user_errors(json_):
        if fmt != "gguf":
            raise UserError(f"unknown export format '{fmt}'", where="--format", expected="gguf",
                            fix="an adapter folder already is peft's format; `peftctl merge` writes a transformers folder")
        figures = export_gguf(adapter, out, merged, quant, ollama, base, trust_remote_code, overwrite)
    if json_:
        print(jsontext.dumps(figures))
        return
    from peftctl.cli.console import export_rows

    rows, lines = export_rows(figures)
    print_summary("peftctl export --format gguf", rows, lines)


@app.command("eval")
def evaluate(
    targets: Annotated[list[Path], typer.Argument(
        help="An adapter folder, or a recipe (its output.dir/adapter is evaluated); several, to compare "
             "adapters of one base in one table.", metavar="ADAPTER", show_default=False)],
    data: Annotated[Optional[Path], typer.Option("--data", help="Held-out rows (default: the recipe's validation data).")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="Row layout of --data: alpaca, chat or completion (default: the recipe's).")] = None,
    samples: Annotated[int, typer.Option("--samples", min=0, help="Rows to generate replies for (greedy, stops at EOS).")] = 5,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model (default: the adapter's own).")] = None,
    trust_remote_code: TrustOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Held-out loss, perplexity, token accuracy and generations: base model vs base + adapter, or
    the base and several adapters of it side by side."""
    from peftctl.cli.eval_args import eval_inputs, eval_inputs_of_several
    from peftctl.eval.scores import evaluate_adapter, evaluate_adapters

    quiet_libraries()
    with user_errors(json_):
        if len(targets) == 1:
            adapter_dir, data_file, data_format, recipe_trusts = eval_inputs(targets[0], data, fmt)
            report = evaluate_adapter(adapter_dir, data_file, data_format, samples, base=base,
                                      trust_remote_code=trust_remote_code or recipe_trusts)
        else:
            adapter_dirs, data_file, data_format, recipe_trusts = eval_inputs_of_several(targets, data, fmt)
            report = evaluate_adapters(adapter_dirs, data_file, data_format, samples, base=base,
                                       trust_remote_code=trust_remote_code or recipe_trusts)
    if json_:
        print(jsontext.dumps(report.as_dict()))
        return
    from peftctl.cli.console import print_comparison, print_eval

    (print_eval if len(targets) == 1 else print_comparison)(report)


@app.command()
def plan(recipe: RecipeArg, set_: SetOpt = None, json_: JsonOpt = False,
         fsdp: Annotated[int, typer.Option("--fsdp", min=1, metavar="GPUS",
                                           help="Memory per GPU when FSDP2 shards the model over this many GPUs.")] = 1,
         ) -> None:
    """Parameter counts and memory for a recipe, from the model's config alone (no weights load)."""
    from peftctl.cli.console import plan_table
    from peftctl.plan.memory_plan import plan as make_plan
    from peftctl.recipe.load import load_recipe

    quiet_libraries()
    with user_errors(json_):
        spec = load_recipe(recipe, set_ or [])
        result = make_plan(spec, shards=fsdp)
    if json_:
        print(jsontext.dumps(result.as_dict()))
        return
    stdout.print(plan_table(result))
    print_summary_lines([("model", str(result.model))])


# Defined beside their terminal and stdin handling; registered here with the other commands.
app.command()(chat_serve.chat)
app.command()(chat_serve.serve)

if __name__ == "__main__":
    app()
