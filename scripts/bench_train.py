#!/usr/bin/env python3
"""peftctl against `peft` + `transformers.Trainer` on the same training work, side by side.

Both runs train the same LoRA on the same base model in the same precision, from the same
token streams (peftctl's tokenization of recipes/data/quickstart/train.jsonl, fed to both), with
the same batch size, max sequence length, seed, AdamW, cosine schedule and number of optimizer
steps. The reference is fed peftctl's shuffled example order, so with default settings both see
identical batches and their losses can be compared step for step.

Each run is a subprocess of its own (this script re-invokes itself with --only), so its peak
RSS is its own. Reported per run: real tokens/s (padding excluded) over the training loop, peak
RSS of the whole process (loading included), the final training loss (mean of the last few
steps), the validation loss after training (same rows, same function for both), and MFU:
tokens/s × 4 × params / the matmul FLOP/s this machine reaches in the same dtype, measured here
with a 2048×2048 matmul loop. 4 × params is the FLOPs of a token when the base is frozen
(2N forward, 2N backward for activation gradients, no weight gradients).

    python scripts/bench_train.py                          # SmolLM2-135M, bf16, 30 steps
    python scripts/bench_train.py --model builtin:tiny-gpt2 --steps 20
    python scripts/bench_train.py --set data.packing=false # a peftctl recipe override
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "recipes" / "data" / "quickstart"
MARKER = "BENCH_RESULT "
LAST_STEPS = 5  # the final training loss is the mean over this many last steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="precision of the frozen base in both runs (LoRA weights are fp32 in both)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--targets", default=None,
                        help="comma-separated module suffixes; default q_proj,v_proj (c_attn for tiny-gpt2)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--train", type=Path, default=DATA / "train.jsonl")
    parser.add_argument("--validation", type=Path, default=DATA / "validation.jsonl")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for the peftctl run's recipe, e.g. data.packing=false (repeatable)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for both runs and the matmul peak (default: torch's, one per core)")
    parser.add_argument("--only", choices=["peftctl", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.targets is None:
        args.targets = "c_attn" if args.model == "builtin:tiny-gpt2" else "q_proj,v_proj"
    return args


# --- the recipe both runs share -----------------------------------------------------------------


def recipe_for(args: argparse.Namespace, out_dir: Path, overrides: list[str]):
    """The benchmark's recipe through peftctl's own loader (so --set works as on the CLI)."""
    import yaml

    from peftctl.recipe import load_recipe

    raw = {
        "model": {"name_or_path": args.model, "dtype": args.dtype},
        "method": {"name": "lora", "r": args.r, "alpha": args.alpha, "dropout": 0.0,
                   "target_modules": args.targets.split(",")},
        "data": {"train": str(args.train.resolve()), "format": "alpaca", "max_seq_len": args.max_seq_len},
        # No warmup: peftctl's warmup ramp and transformers' differ by one step; cosine decay is the same.
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "scheduler": "cosine",
                  "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": args.seed,
                  "log_every": 1},
        "output": {"dir": str(out_dir)},
    }
    path = out_dir.parent / "bench.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return load_recipe(path, overrides)


def validation_examples(args: argparse.Namespace, recipe, tokenizer):
    from peftctl.data import tokenize_rows
    from peftctl.rows import read_rows

    if not args.validation or not args.validation.is_file():
        return []
    return tokenize_rows(read_rows(args.validation, "alpaca"), recipe.data, tokenizer)[0]


def mean_loss(model, examples, batch_size: int, pad_id: int) -> float | None:
    """Token-weighted validation loss through the model's own forward (full logits, transformers' loss)."""
    import torch

    from peftctl.data import IGNORE, batches

    if not examples:
        return None
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches(sorted(examples, key=lambda e: len(e.input_ids)), batch_size, pad_id):
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            total += float(model(**batch).loss) * n
            count += n
    return total / max(count, 1)


# --- one run each -------------------------------------------------------------------------------


def run_peftctl(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from peftctl import methods
    from peftctl.data import load_data
    from peftctl.model import load_model, load_tokenizer
    from peftctl.train import train

    recipe = recipe_for(args, work / "peftctl", args.set)
    tokenizer = load_tokenizer(recipe.model)
    data = load_data(recipe.data, tokenizer, recipe.train.seed)
    model = load_model(recipe.model)
    params = sum(p.numel() for p in model.parameters())
    torch.manual_seed(recipe.train.seed)
    adapter = methods.apply(model, recipe.method)
    (work / "peftctl").mkdir()
    result = train(adapter, data, recipe.train, work / "peftctl", tokenizer.pad_token_id)
    losses = [e["loss"] for e in result.history if "loss" in e]
    return {
        "tokens": result.tokens, "seconds": result.seconds, "params": params, "step_losses": losses,
        "packed": result.packed, "attention": result.attention,
        "val_loss": mean_loss(adapter.model, validation_examples(args, recipe, tokenizer),
                              args.batch_size, tokenizer.pad_token_id),
        "settings": {k: v for k, v in recipe.model_dump(mode="json")["data"].items() if k not in ("train",)}
        | recipe.model_dump(mode="json")["train"],
    }


def run_reference(args: argparse.Namespace, work: Path) -> dict:
    import peft
    import torch
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from peftctl.data import Example, collate, load_data
    from peftctl.model import load_tokenizer, resolve_source, tiny_gpt2_config

    recipe = recipe_for(args, work / "reference", [])
    tokenizer = load_tokenizer(recipe.model)
    data = load_data(recipe.data, tokenizer, recipe.train.seed)
    dtype = getattr(torch, args.dtype)
    source = resolve_source(recipe.model, weights=True)
    if source.builtin:  # the builtin tiny GPT-2: the same fixed-seed weights peftctl builds
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = GPT2LMHeadModel(tiny_gpt2_config()).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, **source.from_pretrained_args())
        if getattr(model, "hf_quantizer", None) is not None:  # a dequantized GGUF still tagged as quantized
            model.hf_quantizer.remove_quantization_config(model)
    params = sum(p.numel() for p in model.parameters())
    torch.manual_seed(recipe.train.seed)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=args.targets.split(","),
        task_type="CAUSAL_LM"))

    # peftctl's shuffled order (a fresh shuffle per epoch), read sequentially by the Trainer.
    rows: list[Example] = []
    epoch = 0
    while len(rows) < args.steps * args.batch_size:
        order = list(range(len(data.train)))
        random.Random(recipe.train.seed + epoch).shuffle(order)
        rows += [data.train[i] for i in order]
        epoch += 1
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in rows]

    def collator(features):
        return collate([Example(f["input_ids"], f["labels"]) for f in features], tokenizer.pad_token_id)

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_train_end(self, *_, **__):
            self.end = time.perf_counter()

    clock = Clock()
    training_args = TrainingArguments(
        output_dir=str(work / "reference"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", seed=args.seed, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        remove_unused_columns=False, train_sampling_strategy="sequential",
        include_num_input_tokens_seen="non_padding")
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                      callbacks=[clock])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "tokens": int(trainer.state.num_input_tokens_seen), "seconds": clock.end - clock.start, "params": params,
        "step_losses": losses, "packed": False, "attention": model.config._attn_implementation,
        "val_loss": mean_loss(model, validation_examples(args, recipe, tokenizer), args.batch_size,
                              tokenizer.pad_token_id),
    }


def run_only(args: argparse.Namespace) -> None:
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        result = (run_peftctl if args.only == "peftctl" else run_reference)(args, Path(tmp))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result |= {
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "cpu_user_s": round(usage.ru_utime, 1), "cpu_system_s": round(usage.ru_stime, 1),
        "threads": torch.get_num_threads(),
        "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(MARKER + json.dumps(result), flush=True)


# --- the machine's matmul peak and the report ---------------------------------------------------


def matmul_peak(dtype_name: str, size: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of a size×size matmul loop in `dtype_name` on this process's threads."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    for _ in range(3):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size**3 * n / (time.perf_counter() - start)


def spawn(which: str, argv: list[str]) -> dict:
    print(f"running {which} ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, __file__, *argv, "--only", which], capture_output=True, text=True,
                          cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"the {which} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(MARKER):])


def summarise(run: dict, peak: float) -> dict:
    tokens_per_s = run["tokens"] / run["seconds"]
    last = run["step_losses"][-LAST_STEPS:]
    return {
        "tokens_per_s": round(tokens_per_s, 1),
        "tokens": run["tokens"],
        "train_seconds": round(run["seconds"], 2),
        "peak_rss_mib": round(run["peak_rss_mib"], 1),
        "final_loss": round(sum(last) / len(last), 4),
        "val_loss": None if run["val_loss"] is None else round(run["val_loss"], 4),
        "mfu": round(tokens_per_s * 4 * run["params"] / peak, 4),
        "params": run["params"],
        "cpu_user_s": run["cpu_user_s"],
        "cpu_system_s": run["cpu_system_s"],
        "packed": run["packed"],
        "attention": run["attention"],
        "load_avg": run["load_avg"],
    }


def main() -> None:
    args = parse_args()
    if args.only:
        run_only(args)
        return
    argv = sys.argv[1:]
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"measuring the {args.dtype} matmul peak ...", file=sys.stderr, flush=True)
    peak = matmul_peak(args.dtype)
    runs = {which: spawn(which, argv) for which in ("reference", "peftctl")}
    ours, ref = (summarise(runs[w], peak) for w in ("peftctl", "reference"))
    ratios = {
        "tokens_per_s": round(ours["tokens_per_s"] / ref["tokens_per_s"], 3),
        "peak_rss": round(ours["peak_rss_mib"] / ref["peak_rss_mib"], 3),
        "final_loss": round(ours["final_loss"] / ref["final_loss"], 4),
        "val_loss": round(ours["val_loss"] / ref["val_loss"], 4) if ours["val_loss"] and ref["val_loss"] else None,
        "mfu": round(ours["mfu"] / ref["mfu"], 3),
    }
    report = {
        "model": args.model, "dtype": args.dtype, "steps": args.steps, "batch_size": args.batch_size,
        "max_seq_len": args.max_seq_len, "lora": {"r": args.r, "alpha": args.alpha, "targets": args.targets},
        "peftctl_overrides": args.set, "peftctl_settings": runs["peftctl"]["settings"],
        "threads": runs["peftctl"]["threads"],
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "matmul_peak_how": f"2048x2048 {args.dtype} matmul loop, {torch.get_num_threads()} threads",
        "peftctl": ours, "reference": ref, "ratio_peftctl_over_reference": ratios,
    }
    print_table(report)
    print(json.dumps(report))


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    ours, ref, ratio = report["peftctl"], report["reference"], report["ratio_peftctl_over_reference"]
    table = Table(title=f"{report['model']} · LoRA r={report['lora']['r']} on {report['lora']['targets']} · "
                        f"{report['dtype']} · batch {report['batch_size']} · {report['steps']} steps")
    for column in ("", "peftctl", "peft + Trainer", "peftctl / reference"):
        table.add_column(column, justify="right" if column else "left")
    rows = [
        ("real tokens/s", "tokens_per_s", "{:.1f}", "tokens_per_s"),
        ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}", "peak_rss"),
        (f"train loss (last {LAST_STEPS} steps)", "final_loss", "{:.4f}", "final_loss"),
        ("validation loss after", "val_loss", "{:.4f}", "val_loss"),
        (f"MFU (vs {report['matmul_peak_gflops']} GFLOP/s)", "mfu", "{:.1%}", "mfu"),
        ("training seconds", "train_seconds", "{:.1f}", None),
        ("process CPU s (user, system)", "cpu", "{}", None),
        ("packed batches", "packed", "{}", None),
        ("attention kernel", "attention", "{}", None),
        ("load average (start, end)", "load_avg", "{}", None),
    ]
    ours, ref = ({**run, "cpu": [run["cpu_user_s"], run["cpu_system_s"]]} for run in (ours, ref))
    for label, key, fmt, ratio_key in rows:
        cells = ["–" if run[key] is None else fmt.format(run[key]) for run in (ours, ref)]
        r = ratio.get(ratio_key) if ratio_key else None
        table.add_row(label, *cells, "" if r is None else f"{r:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
