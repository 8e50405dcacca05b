"""What people see: the training progress bar and the result tables (rich)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.markup import escape
from rich.text import Text

from peftctl.core.errors import UserError

stdout = Console()
stderr = Console(stderr=True)


class RichReporter:
    """Training progress on stderr: step, loss, learning rate, tokens/s, elapsed and ETA."""

    def __init__(self, label: str = "train") -> None:
        self.progress = Progress(
            TextColumn(f"[bold blue]{escape(label)}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss [bold]{task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=stderr,
        )
        self.task = None

    def start(self, total_steps: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, loss="-", lr="-", tps="-")

    def step(self, step: int, metrics: dict[str, float]) -> None:
        self.progress.update(self.task, completed=step, loss=f"{metrics['loss']:.4f}",
                             lr=f"{metrics['lr']:.2e}", tps=f"{metrics['tokens_per_s']:,.0f}")

    def note(self, text: str) -> None:
        self.progress.console.print(text)

    def finish(self) -> None:
        self.progress.stop()


class PlainReporter:
    """Training progress as plain lines on stderr, for logs and CI (no terminal to redraw a bar on):
    the first step, then every 5% of the steps or 30 seconds, whichever comes first, and the last."""

    def __init__(self, every_s: float = 30.0, label: str = "train") -> None:
        self.every_s, self.label = every_s, label

    def start(self, total_steps: int) -> None:
        self.total, self.started, self.last = total_steps, time.monotonic(), None
        self.stride = max(1, total_steps // 20)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        due = self.last is None or step == self.total or step % self.stride == 0 or now - self.last >= self.every_s
        if not due:
            return
        self.last = now
        elapsed = now - self.started
        eta = elapsed / step * (self.total - step) if step else 0.0
        self.note(f"{self.label} step {step}/{self.total} ({100 * step / self.total:.0f}%)  loss {metrics['loss']:.4f}  "
                  f"lr {metrics['lr']:.2e}  {metrics['tokens_per_s']:,.0f} tok/s  "
                  f"elapsed {_clock(elapsed)}  eta {_clock(eta)}")

    def note(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def finish(self) -> None:
        pass


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def reporter(quiet: bool = False):
    """A live bar on a terminal; plain lines when stderr goes to a file or a CI log. `quiet` (--json):
    none, unless a bake-off runs this training and shows its progress."""
    from peftctl.bakeoff.runner import PROGRESS_LABEL

    label = os.environ.get(PROGRESS_LABEL)
    if quiet and not label:
        return None
    return RichReporter(label or "train") if stderr.is_terminal else PlainReporter(label=label or "train")


def print_error(err: UserError) -> None:
    # The message is printed as-is: never re-wrapped (it is grepped and copied into issues) and
    # never read as markup (recipe values such as [c_attn] would vanish as style tags).
    stderr.print(Text.assemble(("error:", "bold red"), " ", err.render()), highlight=False, soft_wrap=True)


def print_interrupted(step: int | None, checkpoint, resume_command: str | None) -> None:
    """What a stopped run left and the exact command that continues it (stderr: stdout may be --json)."""
    if step is None:
        stderr.print(Text("aborted: no checkpoint was written by this interruption", style="bold red"))
        return
    stderr.print(Text.assemble(("interrupted", "bold yellow"), f" after step {step}; checkpoint written to {checkpoint}\n",
                               "resume with:\n  ", (resume_command, "bold")), highlight=False, soft_wrap=True)


def print_summary(title: str, rows: list[tuple[str, str]], verbatim: list[tuple[str, str]]) -> None:
    """A command's figures as a table, then `verbatim` values (paths, commands), each whole on a
    line of its own: they are copied from here, and a table cell would break them inside a word."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    stdout.print(table)
    print_summary_lines(verbatim)


def print_summary_lines(verbatim: list[tuple[str, str]]) -> None:
    for key, value in verbatim:
        stdout.print(Text.assemble((f"{key}: ", "bold"), value), highlight=False, soft_wrap=True)


def print_combined(figures: dict) -> None:
    """`peftctl merge A B C`'s table: how the adapters were combined, and how far the combined
    update is from their weighted sum (exact for cat); then where it is and how to load it."""
    options = ([f"density {figures['density']}"] if figures["density"] is not None else []) + (
        [f"seed {figures['seed']} (random masks: the same seed gives the same adapter)"]
        if figures["seed"] is not None else [])
    out = figures["adapter_dir"]
    print_summary(f"peftctl merge: {len(figures['adapters'])} adapters combined", [
        ("combination", ", ".join([figures["combine"], *options])),
        ("weights", ", ".join(f"{w:g}" for w in figures["weights"])),
        ("rank", f"r = {figures['r']}, lora_alpha = {figures['lora_alpha']} (each adapter's scale is in its tensors)"),
        ("layers", str(figures["layers"])),
        ("vs weighted sum", f"relative error {figures['update_relative_error']:.2e} of B·A vs Σ wᵢ·sᵢ·Bᵢ·Aᵢ"),
    ], [
        ("combined adapter", out),
        ("load it with", f"PeftModel.from_pretrained(base_model, {out!r}), or peftctl eval {out}"),
    ])


def fmt_loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def print_train_summary(summary, figures: dict) -> None:
    """`peftctl train`'s table, then the paths it wrote."""
    result = summary.result
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
        *([("validation accuracy / macro-F1", f"{figures['val_accuracy']:.4f} / {figures['val_macro_f1']:.4f}")]
          if "val_accuracy" in figures else []),
    ], [
        ("adapter", str(summary.adapter_dir)),
        ("metrics", str(summary.output_dir / "metrics.jsonl")),
        *([("report", str(summary.report))] if summary.report else []),
        ("last checkpoint", str(result.checkpoint)),
    ])


def print_eval(report) -> None:
    """What was evaluated (paths whole, on lines of their own: they are copied from here), the
    figures side by side (base, adapter, change), then the sampled generations."""
    for label, path in (("adapter", report.adapter_dir), ("data", report.data_file)):
        stdout.print(Text.assemble((f"{label}: ", "bold"), str(path)), highlight=False, soft_wrap=True)
    for table in _eval_tables(report):
        stdout.print(table)


def _eval_tables(report) -> list[Table]:
    figures = Table(title=f"peftctl eval: {report.rows} rows, base vs adapter", title_justify="left")
    for column in ("metric", "base", "adapter", "change"):
        figures.add_column(column, justify="left" if column == "metric" else "right")
    lower_is_better = {"loss", "perplexity"}
    for metric, base_value in report.base.figures().items():
        value = report.adapter.figures()[metric]
        if base_value is None or value is None:
            continue
        change = value - base_value
        better = change < 0 if metric in lower_is_better else change > 0
        style = "green" if better else "red" if change else ""
        figures.add_row(metric, f"{base_value:.4f}", f"{value:.4f}", Text(f"{change:+.4f}", style=style))
    tables = [figures]
    if report.adapter.details is not None:
        figures.caption = "base: the base model with a new, untrained classification head (chance level)"
        tables += _class_tables(report.adapter.details)
    if report.adapter.generations:
        samples = Table(title="generations (greedy)", title_justify="left", show_lines=True)
        for column in ("prompt", "reference", "base", "adapter"):
            samples.add_column(column, overflow="fold")
        for with_adapter, base in zip(report.adapter.generations, report.base.generations):
            samples.add_row(*(_one_line(text) for text in (with_adapter["prompt"], with_adapter["reference"],
                                                            base["generated"], with_adapter["generated"])))
        tables.append(samples)
    return tables


def _class_tables(details: dict) -> list[Table]:
    """The adapter's per-class precision, recall and F1, and its confusion matrix (rows: gold labels,
    columns: predicted, by number so that six or more classes fit a terminal)."""
    labels = details["labels"]
    per_class = Table(title="per class (base + adapter)", title_justify="left")
    for column in ("label", "precision", "recall", "F1", "support"):
        per_class.add_column(column, justify="left" if column == "label" else "right", no_wrap=True)
    for row in details["per_class"]:
        per_class.add_row(row["label"], f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
                          str(row["support"]))
    confusion = Table(title="confusion matrix (rows: gold label, columns: predicted)", title_justify="left")
    confusion.add_column("gold", no_wrap=True)
    for number in range(len(labels)):
        confusion.add_column(str(number), justify="right", no_wrap=True)
    for number, (label, counts) in enumerate(zip(labels, details["confusion"])):
        confusion.add_row(f"{number} {label}", *(str(count) for count in counts))
    return [per_class, confusion]


# print_comparison's column headers: short, so that a row of figures fits a terminal's 80 columns.
HEADERS = {"loss": "loss", "perplexity": "perplexity", "token_accuracy": "accuracy", "exact_match": "exact",
           "token_f1": "F1", "accuracy": "acc", "macro_f1": "macro-F1", "rouge1": "R-1", "rouge2": "R-2",
           "rouge_l": "R-L"}


def print_comparison(report) -> None:
    """Several adapters beside the base: each adapter's path under its short label, the data, one
    table with a row for the base and one per adapter, then the sampled generations side by side."""
    labels = short_labels(report.adapter_dirs)
    for label, path in zip(labels, report.adapter_dirs):
        stdout.print(Text.assemble((f"adapter {label}: ", "bold"), str(path)), highlight=False, soft_wrap=True)
    stdout.print(Text.assemble(("data: ", "bold"), str(report.data_file)), highlight=False, soft_wrap=True)
    metrics = [metric for metric, value in report.base.figures().items() if value is not None]
    table = Table(title=f"peftctl eval: {report.rows} rows, base and {len(labels)} adapters", title_justify="left")
    table.add_column("model")
    for column in (*(HEADERS[metric] for metric in metrics), "Δ loss"):
        table.add_column(column, justify="right", no_wrap=True)
    table.caption = ", ".join(f"{HEADERS[m]}: {m}" for m in metrics if HEADERS[m] != m) + "; Δ loss: vs the base"
    table.add_row("base", *(f"{report.base.figures()[metric]:.4f}" for metric in metrics), "")
    for label, scores in zip(labels, report.adapters):
        change = scores.loss - report.base.loss
        table.add_row(label, *(f"{scores.figures()[metric]:.4f}" for metric in metrics),
                      Text(f"{change:+.4f}", style="green" if change < 0 else "red" if change else ""))
    stdout.print(table)
    if report.base.generations:
        samples = Table(title="generations (greedy)", title_justify="left", show_lines=True)
        for column in ("prompt", "reference", "base", *labels):
            samples.add_column(column, overflow="fold")
        for i, base in enumerate(report.base.generations):
            samples.add_row(*(_one_line(text) for text in (base["prompt"], base["reference"], base["generated"],
                                                            *(scores.generations[i]["generated"]
                                                              for scores in report.adapters))))
        stdout.print(samples)


def short_labels(paths) -> list[str]:
    """Each path's fewest trailing components that tell it from the others (run-a/adapter,
    run-b/adapter, combined); the same folder twice keeps its whole path."""
    parts = [Path(path).resolve().parts for path in paths]
    depths = [1] * len(parts)
    while True:
        labels = ["/".join(p[-depth:]) for p, depth in zip(parts, depths)]
        clashing = [i for i, label in enumerate(labels) if labels.count(label) > 1 and depths[i] < len(parts[i])]
        if not clashing:
            return labels
        for i in clashing:
            depths[i] += 1


def _one_line(text: str, limit: int = 160) -> str:
    """Whitespace collapsed and long text cut, so one table row stays readable."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plan_table(plan) -> Table:
    """Memory for this recipe's method next to full fine-tuning of the same model."""
    quantized = plan.unquantized is not None
    base = f"{plan.quantization} base" if quantized else f"{plan.weight_dtype} base"
    per_gpu = f", per GPU of FSDP over {plan.shards}" if plan.shards > 1 else ""
    # The model's name (a path, perhaps) is printed whole below the table, not in its title.
    table = Table(title=f"peftctl plan: {plan.method} ({base}{per_gpu})", title_justify="left")
    table.add_column("")
    table.add_column(f"{plan.method}, {plan.quantization}" if quantized else plan.method, justify="right")
    memories = [plan.peft]
    if quantized:  # the saving, next to the same method on the unquantized base
        table.add_column(f"{plan.method}, {plan.weight_dtype}", justify="right")
        memories.append(plan.unquantized)
    table.add_column("full fine-tuning", justify="right")
    memories.append(plan.full)
    trainable = f"{plan.trainable_params:,} ({100 * plan.trainable_params / plan.total_params:.3f}%)"
    table.add_row("trainable parameters", *[trainable] * (len(memories) - 1),
                  f"{plan.total_params - plan.trainable_params:,}")
    parts = ("weights", "gradients", "optimizer", "activations", *(("gathered",) if plan.shards > 1 else ()))
    for part in parts:
        table.add_row(part, *[_gb(getattr(memory, part)) for memory in memories])
    table.add_row("total", *[_gb(memory.total) for memory in memories], style="bold")
    kept = "each layer's input, one layer rebuilt at a time: gradient checkpointing" if plan.gradient_checkpointing \
        else "every layer's activations"
    table.caption = (f"activations: what a step of {plan.tokens_per_step:,} tokens (batch_size × max_seq_len, every row "
                     f"full) keeps for the backward pass ({kept}) with {plan.attention} attention"
                     + (" under a GPU's autocast" if plan.autocast else "")
                     + " (peftctl/plan/activations.py), + fp32 logits of labelled tokens (with a frozen output head, one "
                     "chunk at a time); optimizer: AdamW, 8 B per trainable parameter"
                     + ("; gathered: whole weights of 2 transformer blocks (computed and prefetched; full fine-tuning: and their gradients)" if plan.shards > 1 else ""))
    return table


def _gb(value: float) -> str:
    return f"{value / 1e9:,.2f} GB" if value >= 1e8 else f"{value / 1e6:,.1f} MB"


def export_rows(figures: dict) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """`peftctl export`'s table rows and verbatim lines (paths, commands) from its figures."""
    size = f"{figures['bytes'] / 1e6:,.1f} MB"
    if figures["kind"] == "lora":
        rows = [("written", f"LoRA adapter for llama.cpp's {figures['architecture']}: {figures['layers']} layers, "
                            f"{size}"),
                ("scale", f"each layer's scaling is in B (alpha = r = {figures['alpha']:g}): llama.cpp's "
                          "scale 1.0 is the adapter as trained")]
        base = figures["base_gguf"] or "BASE.gguf (the base converted with llama.cpp's convert_hf_to_gguf.py)"
        command = f"llama-cli -m {base} --lora {figures['gguf']}"
    else:
        rows = [("written", f"base + adapter merged, {figures['tensors']} tensors in {figures['quant']}, {size}"),
                ("metadata", f"from {figures['metadata_from']}"),
                (f"vs {figures['compared_with']}", f"max |Δlogit| {figures['max_abs_logit_diff']:.2e} (fp32 merge), "
                 f"{figures['gguf_max_abs_logit_diff']:.2e} as written in {figures['quant']} (probe batch)")]
        command = f"llama-cli -m {figures['gguf']}"
    if figures.get("why_merged"):
        rows.insert(0, ("merged because", figures["why_merged"]))
    lines = [("gguf", figures["gguf"]), ("run it with", command)]
    if figures.get("modelfile"):
        rows.append(("chat template", f"{figures['chat_template']}, as Ollama's TEMPLATE"))
        lines += [("modelfile", figures["modelfile"]),
                  ("then", f"cd {_quoted_folder(figures['modelfile'])} && ollama create NAME -f Modelfile")]
    return rows, lines


def _quoted_folder(path: str) -> str:
    import shlex

    return shlex.quote(str(Path(path).parent))


# --- a bake-off ----------------------------------------------------------------------------------


def print_bakeoff(state: dict[str, Any], out: Path) -> None:
    from peftctl.bakeoff import table as bakeoff_table  # here: the bake-off's modules load torch
    from peftctl.bakeoff.state import ordered

    table = Table(title=f"peftctl bakeoff: {state['recipe']}, sorted by validation loss", title_justify="left")
    for header in bakeoff_table.HEADERS:
        table.add_column(header, justify="left" if header == "run" else "right", overflow="fold")
    for run in ordered(state["runs"]):
        if run["status"] == "done":
            table.add_row(*bakeoff_table.cells(run))
    # Into a file or a log the table keeps its width: rich would fold it to 80 columns.
    (stdout if stdout.is_terminal else Console(width=200)).print(table)
    for line in bakeoff_table.notes(state):
        stdout.print(Text(line), highlight=False, soft_wrap=True)
    stdout.print(Text.assemble(("results: ", "bold"), f"{out / 'bakeoff.json'}, {out / 'bakeoff.md'}"), soft_wrap=True)


def print_progress(line: str) -> None:
    """A bake-off's progress and its runs' own, as plain lines on stderr (stdout is the table)."""
    print(line, file=sys.stderr, flush=True)


def print_bakeoff_interrupted(stopped) -> None:
    if stopped.command is None:
        stderr.print(Text("aborted while planning: nothing was trained", style="bold red"))
        return
    during = f" during {stopped.run}; state saved in {stopped.state_file} (a run in training is checkpointed)" \
        if stopped.run else " before its first run"
    stderr.print(Text.assemble(("interrupted", "bold yellow"), during, "\ncontinue with:\n  ", (stopped.command, "bold")),
                 highlight=False, soft_wrap=True)
