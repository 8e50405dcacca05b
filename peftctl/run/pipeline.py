"""The pipeline a recipe runs: data → model → method (or the saved adapter `model.adapter`
names, continued) → train (or resume it from a checkpoint) → export.

It runs in two steps. `prepare` does every check that needs no weights, once: the recipe's
output folder, the tokenizer and the data rows, the method on a weightless skeleton of the model
(plan/skeleton.py), and with `--resume` the checkpoint against this run's fingerprint; it returns
a `PreparedRun`. `execute` then loads the weights, puts the method (or the adapter to continue) on
them, trains and exports, and writes what the run's report shows (summary.json, the sample
replies, report.html). `run` is the two in a row.
"""

from __future__ import annotations

import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from peftctl import methods
from peftctl.core import jsontext
from peftctl.core.errors import ErrorGroup, UserError, blame
from peftctl.core.files import atomic_write_text, check_replaceable, output_lock, writing
from peftctl.data.tokenize import TokenizedData, load_data
from peftctl.eval.samples import replies, sample_rows, write_generations
from peftctl.eval.task_scores import score_classifier
from peftctl.export.adapter_files import load_adapter, save_adapter
from peftctl.methods import Adapter, MethodConfig
from peftctl.model.loading import base_facts, load_model, load_tokenizer, model_files, prefilled_cache_refusal
from peftctl.model.quantize import parameter_count
from peftctl.plan.skeleton import OnSkeleton, coverage_notes, method_on_skeleton, recipe_head
from peftctl.recipe.schema import Recipe
from peftctl.report.run_report import GENERATIONS_FILE, SUMMARY_FILE, write_run_report
from peftctl.train import checkpoint
from peftctl.train.loop import Reporter, TrainResult, loop_fingerprint, train
from peftctl.train.sharding import check_fsdp
from peftctl.train.trackers import check_installed, tracking

if TYPE_CHECKING:
    from accelerate import PartialState
    from transformers import PreTrainedTokenizerBase


@dataclass
class PreparedRun:
    """What `prepare` found without loading a weight: all `execute` needs to train the recipe."""

    recipe: Recipe
    processes: PartialState  # this process's place in an `accelerate launch` (a group of one otherwise)
    tokenizer: PreTrainedTokenizerBase
    data: TokenizedData
    on_skeleton: OnSkeleton  # the method's options and what they train, found on the weightless model
    fingerprint: dict[str, Any]  # what a checkpoint of this run shares with a run that resumes it
    saved: checkpoint.Checkpoint | None  # the checkpoint `--resume` continues from; None: a new run

    @property
    def method_cfg(self) -> MethodConfig:
        return self.on_skeleton.method_cfg

    @property
    def resolved_recipe(self) -> Recipe:
        """The recipe with the method options the adapter has, also those taken from a continued one,
        and a classifier's label names (in its outputs' order) where the data gave them."""
        update = {"method": self.method_cfg}
        if self.data.labels:
            update["data"] = self.recipe.data.model_copy(update={"labels": list(self.data.labels)})
        return self.recipe.model_copy(update=update)


@dataclass
class RunSummary:
    output_dir: Path
    adapter_dir: Path
    trainable_params: int
    total_params: int
    train_rows: int
    validation_rows: int
    dropped_rows: int
    result: TrainResult
    main_process: bool = True  # False in the other processes of `accelerate launch`: they print nothing
    report: Path | None = None  # <output>/report.html, when output.report wrote one
    # A classifier's held-out accuracy, macro-F1 and per-class figures after training (`classes`).
    task_scores: dict[str, Any] = field(default_factory=dict)


def run(recipe: Recipe, reporter: Reporter | None = None, overwrite: bool = False,
        resume: str | Path | None = None) -> RunSummary:
    """Train the recipe's adapter and export it; `resume`: 'latest' or a checkpoint folder to continue.

    Under `accelerate launch` every process runs this; only the main one writes the output folder.
    """
    return execute(prepare(recipe, overwrite, resume), reporter)


def prepare(recipe: Recipe, overwrite: bool = False, resume: str | Path | None = None) -> PreparedRun:
    """Every check of the run that needs no weights, each once; the plan `execute` runs."""
    from accelerate.utils import parse_flag_from_env

    processes = _join_processes()
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        check_fsdp(recipe, processes.distributed_type)
    with blame(recipe.source, recipe.locate):
        tokenizer, data = _first_checks(recipe, overwrite, resume)
        found = check_method(recipe, data)
        fingerprint = run_fingerprint(recipe, found.method_cfg, len(data.train), processes.num_processes)
        saved = None
        if resume is not None:  # a checkpoint of another recipe is refused before the weights load
            saved = checkpoint.read(find_checkpoint(recipe.output.dir, resume), named_by="--resume")
            checkpoint.check_compatible(saved, fingerprint)
    return PreparedRun(recipe, processes, tokenizer, data, found, fingerprint, saved)


def check_method(recipe: Recipe, data: TokenizedData) -> OnSkeleton:
    """The recipe's method on the weightless model, with the rows: target, shape and size errors, and
    what gradient checkpointing would refuse at the first step, all before any weights load."""
    found = method_on_skeleton(recipe, data)
    if recipe.train.gradient_checkpointing and methods.get(found.method_cfg.name).feeds_kv_cache:
        raise prefilled_cache_refusal()
    return found


def execute(plan: PreparedRun, reporter: Reporter | None = None) -> RunSummary:
    """Load the weights, put the method (or the adapter to continue) on them, train and export."""
    recipe, processes, out = plan.recipe, plan.processes, plan.recipe.output.dir
    with blame(recipe.source, recipe.locate), ExitStack() as held:
        if processes.is_main_process:  # one run at a time in an output folder; the others of a launch join it
            held.enter_context(output_lock(out, "output.dir"))
        torch.manual_seed(recipe.train.seed)  # a classifier's new head is drawn from it
        model = load_model(recipe.model, recipe_head(recipe, plan.data))
        # The base's sample replies come first: with the method on, not every method gives the base back exactly.
        rows = _sample_rows(plan)
        base_replies = replies(model, plan.tokenizer, rows, recipe.data.format, processes.device)
        torch.manual_seed(recipe.train.seed)
        continued = recipe.model.adapter
        facts = base_facts(recipe.model, plan.tokenizer, recipe.task)
        adapter = (load_adapter(model, continued, facts) if continued is not None
                   else methods.apply(model, plan.method_cfg, facts))
        if processes.is_main_process:
            with writing(out, "the output folder"):
                if plan.saved is None:
                    fresh_output_dir(out)
                else:
                    out.mkdir(parents=True, exist_ok=True)
                    for name in FINISHED_FILES:  # they told of a finish that this run continues from
                        (out / name).unlink(missing_ok=True)
        # train.report_to's trackers, in the main process; finished however the run ends (held exits them).
        on_record = held.enter_context(tracking(
            recipe.train.report_to if processes.is_main_process else (), out,
            plan.resolved_recipe.model_dump(mode="json"), None if plan.saved is None else plan.saved.state["metrics"],
            reporter and reporter.note))
        if reporter is not None and processes.is_main_process:
            # The header: what the recipe leaves frozen that the user may think it trains (as validate says).
            for line in coverage_notes(plan.on_skeleton):
                reporter.note(line)
        processes.wait_for_everyone()
        result = train(adapter, plan.data, recipe.train, out, plan.tokenizer.pad_token_id, reporter,
                       resume=plan.saved, fingerprint=plan.fingerprint, on_record=on_record)
        summary = RunSummary(
            output_dir=out,
            adapter_dir=out / "adapter",
            trainable_params=adapter.trainable_count(),
            total_params=parameter_count(model),
            train_rows=len(plan.data.train),
            validation_rows=len(plan.data.validation),
            dropped_rows=plan.data.dropped,
            result=result,
            main_process=processes.is_main_process,
        )
        if processes.is_main_process:
            _export(plan, adapter, summary.adapter_dir)
            summary.task_scores = _task_scores(plan, adapter)
            summary.report = _write_run_files(plan, summary, adapter, rows, base_replies)
        processes.wait_for_everyone()  # every process ends the run together
    return summary


def _join_processes() -> PartialState:
    """This process's state; under `accelerate launch` (or torchrun) this joins the other processes."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # accelerate only forms a group of CPU processes (gloo) when told it runs on the CPU: without
    # a GPU, it is.
    return PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))


def _export(plan: PreparedRun, adapter: Adapter, adapter_dir: Path) -> None:
    recipe = plan.recipe
    recipe_yaml = plan.resolved_recipe.to_yaml()
    with writing(adapter_dir, "the adapter"):
        save_adapter(adapter, adapter_dir, recipe.model.name_or_path, recipe_yaml, revision=recipe.model.revision)


def _sample_rows(plan: PreparedRun) -> list[dict[str, Any]]:
    """The validation rows whose replies the run shows (output.samples): the main process's only."""
    from accelerate.utils import DistributedType, parse_flag_from_env

    processes = plan.processes
    fsdp = parse_flag_from_env("ACCELERATE_USE_FSDP") or processes.distributed_type == DistributedType.FSDP
    if not processes.is_main_process or fsdp or plan.recipe.task != "causal_lm":
        return []  # a classifier's and seq2seq model's held-out predictions are `peftctl eval`'s  # FSDP shards the model over the processes: one of them alone cannot run it
    return sample_rows(plan.data, plan.recipe.data.format, plan.recipe.output.samples)


def _task_scores(plan: PreparedRun, adapter: Adapter) -> dict[str, Any]:
    """A classifier's held-out figures after training, for the summary and the report's confusion
    matrix (seq2seq's ROUGE needs generations: `peftctl eval` makes them)."""
    data = plan.data
    if data.task != "sequence_classification" or not data.validation:
        return {}
    scores = score_classifier(adapter.model, plan.tokenizer.pad_token_id, data.validation, data.labels,
                              plan.recipe.train.batch_size)
    return {"val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"], "classes": scores["details"]}


def _write_run_files(plan: PreparedRun, summary: RunSummary, adapter: Adapter, rows: list[dict[str, Any]],
                     base_replies: list[dict[str, Any]]) -> Path | None:
    """summary.json, the sample replies and the report (output.report), once the adapter is saved:
    the report's path, if it wrote one."""
    out = summary.output_dir
    with writing(out / SUMMARY_FILE, "the run's summary"):
        atomic_write_text(out / SUMMARY_FILE, jsontext.dumps(train_figures(summary), indent=1) + "\n")
    if rows:
        write_generations(out / GENERATIONS_FILE, base_replies,
                          replies(adapter.model, plan.tokenizer, rows, plan.recipe.data.format))
    return write_run_report(out) if plan.recipe.output.report else None


def train_figures(summary: RunSummary) -> dict[str, Any]:
    """The run's figures: `peftctl train --json`'s object, and <output>/summary.json."""
    result = summary.result
    return {
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
        "peak_memory_bytes": result.peak_memory_bytes,
        **summary.task_scores,
    }


def _first_checks(recipe: Recipe, overwrite: bool, resume: str | Path | None) -> tuple[Any, Any]:
    """The model's tokenizer and the data, after the checks that need neither the other nor any
    weights: every one of them runs, and all their errors come in one message."""
    checks = ErrorGroup(recipe.source, recipe.locate)
    tokenizer = data = None
    with checks.check():
        tokenizer = load_tokenizer(recipe.model, recipe.task)  # a Hub model: config and tokenizer files only
    with checks.check():
        if resume is None:
            check_output_dir(recipe, overwrite, tokenizer is not None)
        elif overwrite:
            raise UserError("--resume continues the run in its output folder, which --overwrite would delete first",
                            where="--resume", fix="drop --overwrite to resume, or drop --resume to start again")
    with checks.check():
        if tokenizer is not None:
            data = load_data(recipe.data, tokenizer, recipe.train.seed, recipe.task)
    with checks.check():
        check_installed(recipe.train.report_to)
    checks.raise_if_any()
    return tokenizer, data


def find_checkpoint(out: Path, resume: str | Path) -> Path:
    """The checkpoint `--resume` names: 'latest' is the newest under the output folder."""
    if str(resume) != "latest":
        return Path(resume)
    found = checkpoint.latest(out / checkpoint.CHECKPOINTS)
    if found is None:
        raise UserError(f"nothing to resume: {out / checkpoint.CHECKPOINTS} holds no checkpoint", where="--resume",
                        expected="a run of this recipe (same output folder) that wrote a checkpoint",
                        fix="train without --resume, or pass --resume PATH with a checkpoint folder (.../checkpoints/step-N)")
    return found


def run_fingerprint(recipe: Recipe, method_cfg: MethodConfig, train_rows: int, processes: int) -> dict[str, Any]:
    """What a checkpoint must share with the run that resumes it, by recipe key: the model, the
    adapter's options, the data (its order and token layout decide each step's batches) and the
    loop's batch layout (train.loop_fingerprint). Optimisation settings (lr, schedule, max_steps)
    may change: they act from the checkpoint on."""
    m, d = recipe.model, recipe.data
    found = {"task": recipe.task} if recipe.task != "causal_lm" else {}  # older checkpoints have no task: causal LM
    found |= {f"model.{key}": getattr(m, key) for key in ("name_or_path", "revision", "gguf_file", "dtype",
                                                         "quantization", "quant_type", "double_quant", "compute_dtype")}
    found.update({f"method.{key}": value for key, value in method_cfg.model_dump(mode="json").items()})
    found.update({f"data.{key}": str(value) if isinstance(value, Path) else value for key, value in
                  d.model_dump(include={"train", "validation", "subset", "split", "validation_split", "revision",
                                        "format", "columns", "roles", "max_seq_len", "train_on_inputs",
                                        "packing", "labels"}).items()})
    found["data.train rows"] = train_rows
    return {**found, **loop_fingerprint(recipe.train, processes)}


# What a peftctl run leaves in its output folder: --overwrite only ever deletes such a folder.
RUN_MARKERS = ("metrics.jsonl", "adapter", checkpoint.CHECKPOINTS)
# What a run writes once it has finished, and a resumed run rewrites when it finishes in turn.
FINISHED_FILES = (SUMMARY_FILE, GENERATIONS_FILE)


def check_output_dir(recipe: Recipe, overwrite: bool, model_found: bool = True) -> None:
    """`model_found`: the base model resolved, so its files are an input to spare."""
    validation = recipe.data.validation
    check_replaceable(recipe.output.dir, overwrite, "output.dir", RUN_MARKERS, inputs={
        "the recipe": recipe.source,
        "the training data": recipe.data.train if isinstance(recipe.data.train, Path) else None,
        "the validation data": validation if isinstance(validation, Path) else None,
        "the base model": model_files(recipe.model) if model_found else None, "the adapter to continue": recipe.model.adapter})


def fresh_output_dir(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
