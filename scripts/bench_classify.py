#!/usr/bin/env python3
"""peftctl's sequence classifier against peft + transformers.Trainer, like for like (issue 37).

Contenders (`--contenders`, any subset, comma-separated):
  peftctl   the recipe (default recipes/classify-quickstart.yaml) through peftctl's own loop, as the
            pipeline runs it: its data, its model and head, its method, `train`;
  sdpa      peft (LoRA, task_type SEQ_CLS: the classifier trained whole as modules_to_save) +
            transformers.Trainer with DataCollatorWithPadding (each batch padded to its longest
            row) and SDPA attention;
  eager     the same Trainer with eager attention.
Ratios are peftctl's over the faster Trainer (by median tokens/s).

What is the same for every contender: peftctl's tokenization of the rows and its label order, its
shuffled batches step by step (the Trainers read exactly peftctl's batches; the script stops if
any contender trained on other real tokens or rows at any step); the base (loaded by peftctl's
loader in the recipe's dtype: bf16 on CPUs that have it) and its new head (drawn from the same
seed); LoRA's r, alpha, dropout and targets; batch size, steps (the recipe's epochs), AdamW, lr,
weight decay, clipping and the schedule (the Trainers run peftctl's own warmup-then-decay
multiplier, whose warmup differs from transformers' by one step); the glibc allocator settings.

Each run is a process of its own (peak RSS is the whole process's, loading included); repeats
alternate the order. The clock runs over steps k+1..N (`--untimed-steps k`). Each adapter is
saved, loaded back through peft onto a fresh base and scored by one function (`accuracy`: argmax
of the logits against the label, over the recipe's validation rows).

    python scripts/bench_classify.py                     # 90 steps (3 epochs), 2 repeats of 3 contenders
    python scripts/bench_classify.py --quick             # 20 steps, 2 repeats
    python scripts/bench_classify.py --contenders peftctl,sdpa --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import bench_runs
import bench_train

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "classify-quickstart.yaml"
CONTENDERS = {"peftctl": "peftctl", "sdpa": "Trainer + DataCollatorWithPadding (sdpa)",
              "eager": "Trainer + DataCollatorWithPadding (eager)"}
QUICK_STEPS = 20
GOALS = {"tokens_per_s": 1.5, "peak_rss_mib": 0.7, "accuracy_points": 1.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="a sequence_classification recipe")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help=f"comma-separated subset of {', '.join(CONTENDERS)}")
    parser.add_argument("--steps", type=int, default=None, help="steps to train (default: the recipe's epochs)")
    parser.add_argument("--quick", action="store_true", help=f"a smaller run: {QUICK_STEPS} steps")
    parser.add_argument("--untimed-steps", type=int, default=3,
                        help="first steps of every contender left off the clock (warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each contender, the order alternated")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for the recipe, every contender's (repeatable)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every run (default: torch's, one per core)")
    parser.add_argument("--only", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    parser.add_argument("--adapter-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and args.steps is None:
        args.steps = QUICK_STEPS
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in args.contenders if c not in CONTENDERS]
    if unknown or not args.contenders:
        parser.error(f"--contenders: unknown {unknown}; choose from {', '.join(CONTENDERS)}")
    if args.steps is not None and not 0 < args.untimed_steps < args.steps:
        parser.error("--untimed-steps must be at least 1 and fewer than --steps (some steps must be timed)")
    return args


# --- what every contender shares ----------------------------------------------------------------


def load_recipe(args: argparse.Namespace, out_dir: Path, validation: bool = False):
    """The recipe as the runs train it: no validation during training (each adapter is scored
    afterwards, off the clock), no checkpoints but the last, `--steps` if given."""
    from peftctl.recipe.load import load_recipe as load

    overrides = [f"output.dir={out_dir}", "train.eval_every=null", "train.save_every=null", *args.set]
    if not validation:
        overrides.append("data.validation=null")
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    recipe = load(args.recipe, overrides)
    if recipe.task != "sequence_classification":
        raise SystemExit(f"{args.recipe}: task is {recipe.task}, not sequence_classification")
    return recipe


def total_steps(recipe, rows: int) -> int:
    """The loop's step count: train.max_steps, or the epochs of batches (one process)."""
    spec = recipe.train
    return spec.max_steps or spec.epochs * math.ceil(math.ceil(rows / spec.batch_size) / spec.grad_accum)


def the_data(recipe):
    from peftctl.data.tokenize import load_data
    from peftctl.model.loading import load_tokenizer

    tokenizer = load_tokenizer(recipe.model, recipe.task)
    return tokenizer, load_data(recipe.data, tokenizer, recipe.train.seed, recipe.task)


def batches_and_counts(recipe, data) -> tuple[list[list[list[int]]], list[list[int]]]:
    """peftctl's micro-batches of each step (example indices), and [real tokens, rows] of each step."""
    spec = recipe.train.model_copy(update={"max_steps": total_steps(recipe, len(data.train))})
    steps = bench_runs.step_batches(data, spec)
    counts = [[sum(len(data.train[i].input_ids) for batch in step for i in batch), sum(map(len, step))]
              for step in steps]
    return steps, counts


def base_model(recipe, data):
    """The base and its new head, as peftctl's pipeline loads them (the head drawn from the seed)."""
    import torch

    from peftctl.model.loading import load_model
    from peftctl.plan.skeleton import recipe_head

    torch.manual_seed(recipe.train.seed)
    return load_model(recipe.model, recipe_head(recipe, data))


# --- the contenders, one per process ------------------------------------------------------------


def run_peftctl(args: argparse.Namespace, work: Path) -> dict:
    """The recipe through peftctl's pipeline stages: prepare (data, method on the skeleton), then
    execute's loading, method and loop, with a reporter that clocks each step."""
    import torch

    from peftctl import methods
    from peftctl.export.adapter_files import save_adapter
    from peftctl.model.loading import base_facts
    from peftctl.run.pipeline import prepare
    from peftctl.train.loop import SilentReporter, train

    plan = prepare(load_recipe(args, work / "peftctl"))
    recipe, data = plan.recipe, plan.data
    model = base_model(recipe, data)
    torch.manual_seed(recipe.train.seed)
    adapter = methods.apply(model, plan.method_cfg, base_facts(recipe.model, plan.tokenizer, recipe.task))
    recipe.output.dir.mkdir(parents=True)
    clock = bench_runs.StepClock()

    class Clocked(SilentReporter):  # the loop reports each step once its optimizer step is done
        def step(self, step, metrics):
            clock.tick()

    result = train(adapter, data, recipe.train, recipe.output.dir, plan.tokenizer.pad_token_id, Clocked())
    _, counts = batches_and_counts(recipe, data)
    if sum(real for real, _ in counts) != result.tokens:
        raise SystemExit(f"peftctl trained {result.tokens} real tokens; its batch stream, rebuilt here, has "
                         f"{sum(real for real, _ in counts)}: the bench no longer reads peftctl's order")
    save_adapter(adapter, args.adapter_out, recipe.model.name_or_path)
    return {"clock": clock.after_step, "counts": counts, "expected": counts,
            "step_losses": [e["loss"] for e in result.history if "loss" in e], "attention": result.attention,
            "padding": _peftctl_padding()}


def _peftctl_padding() -> str:
    """How peftctl pads a classifier's batch: a 17-token row's width says it."""
    from peftctl.data.examples import Example
    from peftctl.data.task_examples import collate_classification

    width = collate_classification([Example([0] * 17, [0])], 0)["input_ids"].shape[1]
    return "to the longest row" if width == 17 else f"to a multiple of {width}"


def run_trainer(args: argparse.Namespace, work: Path) -> dict:
    """peft + transformers.Trainer, DataCollatorWithPadding, the attention `args.only` names."""
    import peft
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from peftctl.train.optim import lr_schedule

    recipe = load_recipe(args, work / args.only)
    tokenizer, data = the_data(recipe)
    steps, counts = batches_and_counts(recipe, data)
    spec, method = recipe.train, recipe.method
    model = base_model(recipe, data)
    model.set_attn_implementation(args.only)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout, target_modules=list(method.target_modules),
        task_type="SEQ_CLS"))
    # bench_train's Trainer settings, given this recipe's figures.
    settings = bench_runs.trainer_settings(argparse.Namespace(
        batch_size=spec.batch_size, steps=len(steps), lr=spec.lr, seed=spec.seed, peer_precision="weights",
        dtype=str(next(model.parameters()).dtype).removeprefix("torch.")), work, args.only)
    settings |= {"weight_decay": spec.weight_decay, "max_grad_norm": spec.max_grad_norm or 0.0}
    clock = bench_runs.StepClock()
    counting = bench_runs.counted(Trainer, [b for step in steps for b in step], clock,
                                  labelled=lambda labels: int(labels.numel()))
    multiplier = lr_schedule(spec, len(steps))

    class SameSchedule(counting):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = LambdaLR(optimizer or self.optimizer, multiplier)
            return self.lr_scheduler

    rows = [{"input_ids": e.input_ids, "labels": e.labels[0]} for e in data.train]
    trainer = SameSchedule(model=model, args=TrainingArguments(**settings), train_dataset=rows,
                           data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    model.save_pretrained(args.adapter_out)
    return {"clock": clock.after_step, "counts": trainer.seen, "expected": counts,
            "step_losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "attention": model.config._attn_implementation, "padding": "to the longest row"}


# --- the parent: repeats, the one scorer and the report -----------------------------------------


def accuracy(model, examples, batch_size: int, pad_id: int) -> float:
    """The one scorer: the share of rows whose argmax logit is their label."""
    import torch

    from peftctl.data.task_examples import collate_classification

    model.eval()
    right = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate_classification(examples[start:start + batch_size], pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            right += int((logits.argmax(-1) == batch["labels"]).sum())
    return right / len(examples)


def score_adapters(args: argparse.Namespace, work: Path, folders: list[str]) -> dict[str, float]:
    """Each saved adapter loaded through peft onto a freshly loaded base, scored by `accuracy`."""
    import peft

    bench_runs.quiet()
    recipe = load_recipe(args, work / "scorer", validation=True)
    tokenizer, data = the_data(recipe)
    if not data.validation:
        raise SystemExit(f"{args.recipe}: no validation rows to score the adapters on")
    return {folder: accuracy(peft.PeftModel.from_pretrained(base_model(recipe, data), folder), data.validation,
                             recipe.train.batch_size, tokenizer.pad_token_id)
            for folder in folders}


def summarise(which: str, runs: list[dict], counts: list[list[int]], untimed: int) -> dict:
    real = sum(c[0] for c in counts[untimed:])
    measured = [{"tokens_per_s": real / (run["clock"][-1] - run["clock"][untimed - 1]),
                 "peak_rss_mib": run["peak_rss_mib"], "accuracy": run["accuracy"]} for run in runs]
    out = {key: bench_train.spread([m[key] for m in measured], digits)
           for key, digits in (("tokens_per_s", 1), ("peak_rss_mib", 0), ("accuracy", 4))}
    return out | {"label": CONTENDERS[which], "timed_real_tokens": real, "attention": runs[0]["attention"],
                  "padding": runs[0]["padding"], "load_avg": [run["load_avg"] for run in runs]}


def ratios(rows: dict[str, dict], over: str | None) -> dict | None:
    """peftctl's medians over `over`'s: tokens/s and peak RSS as ratios, accuracy as a difference in points."""
    if "peftctl" not in rows or over is None:
        return None
    ours, theirs = rows["peftctl"], rows[over]
    return {"over": over,
            "tokens_per_s": round(ours["tokens_per_s"]["median"] / theirs["tokens_per_s"]["median"], 3),
            "peak_rss_mib": round(ours["peak_rss_mib"]["median"] / theirs["peak_rss_mib"]["median"], 3),
            "accuracy_points": round(100 * (ours["accuracy"]["median"] - theirs["accuracy"]["median"]), 2)}


def main() -> None:
    args = parse_args()
    if args.only:
        bench_runs.run_only(args, run_peftctl if args.only == "peftctl" else run_trainer)
        return
    with tempfile.TemporaryDirectory(prefix="bench-classify-") as tmp:
        work = Path(tmp)
        runs = bench_train.run_all(args, sys.argv[1:], work, lambda runs: None, script=__file__)
        counts = bench_train.check_counts(runs)
        print("scoring the adapters ...", file=sys.stderr, flush=True)
        scores = score_adapters(args, work, [run["adapter"] for repeats in runs.values() for run in repeats])
    for repeats in runs.values():
        for run in repeats:
            run["accuracy"] = scores[run["adapter"]]
    untimed = args.untimed_steps
    if not 0 < untimed < len(counts):
        raise SystemExit(f"--untimed-steps {untimed}: the runs took {len(counts)} steps; some must be timed")
    rows = {which: summarise(which, runs[which], counts, untimed) for which in runs}
    peers = [w for w in rows if w != "peftctl"]
    fastest = max(peers, key=lambda w: rows[w]["tokens_per_s"]["median"]) if peers else None
    ratio = ratios(rows, fastest)
    report = {"recipe": str(args.recipe), "overrides": args.set, "steps": len(counts),
              "timed_steps": [untimed + 1, len(counts)], "repeats": args.repeats,
              "threads": next(iter(runs.values()))[0]["threads"], "allocator_env": bench_train.MALLOC_ENV,
              "cpu": bench_train.cpu_model(), "contenders": rows, "fastest_peer": fastest,
              "ratio_peftctl_over_fastest_peer": ratio,
              "goals_met": None if ratio is None else {
                  "tokens_per_s": ratio["tokens_per_s"] >= GOALS["tokens_per_s"],
                  "peak_rss_mib": ratio["peak_rss_mib"] <= GOALS["peak_rss_mib"],
                  "accuracy": abs(ratio["accuracy_points"]) <= GOALS["accuracy_points"]}}
    print_table(report)
    print(json.dumps(report))


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    def cell(value: dict, fmt: str) -> str:
        return escape(f"{fmt.format(value['median'])} [{fmt.format(value['min'])}–{fmt.format(value['max'])}]")

    table = Table(title=escape(f"{report['recipe']} · steps {report['timed_steps'][0]}–{report['steps']} timed · "
                               f"{report['repeats']} repeats (median [min–max]) · {report['threads']} threads"))
    for column in ("contender", "real tokens/s", "peak RSS MiB", "held-out accuracy", "attention", "padding"):
        table.add_column(column, justify="right" if column in ("real tokens/s", "peak RSS MiB", "held-out accuracy")
                         else "left")
    for row in report["contenders"].values():
        table.add_row(row["label"], cell(row["tokens_per_s"], "{:.1f}"), cell(row["peak_rss_mib"], "{:.0f}"),
                      cell(row["accuracy"], "{:.4f}"), str(row["attention"]), row["padding"])
    console = Console() if sys.stdout.isatty() else Console(width=160)
    console.print(table)
    ratio = report["ratio_peftctl_over_fastest_peer"]
    if ratio:
        met = report["goals_met"]
        console.print(escape(
            f"peftctl / {CONTENDERS[ratio['over']]}: tokens/s {ratio['tokens_per_s']:.3f}× (goal ≥ "
            f"{GOALS['tokens_per_s']}: {'met' if met['tokens_per_s'] else 'not met'}), peak RSS "
            f"{ratio['peak_rss_mib']:.3f}× (goal ≤ {GOALS['peak_rss_mib']}: {'met' if met['peak_rss_mib'] else 'not met'}), "
            f"accuracy {ratio['accuracy_points']:+.2f} points (goal within {GOALS['accuracy_points']:g}: "
            f"{'met' if met['accuracy'] else 'not met'})"))
    console.print(f"CPU: {report['cpu']}")


if __name__ == "__main__":
    main()
