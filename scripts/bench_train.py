#!/usr/bin/env python3
"""peftctl against the strongest configurations a knowledgeable user runs instead, like for like.

Contenders (`--contenders`, any subset, comma-separated):
  peftctl  peftctl's own loop (packing, labelled-only logits, its attention choice);
  flat     peft + transformers.Trainer with DataCollatorWithFlattening (each batch one row with
           restarting position ids: no padding) and the faster attention kernel for such rows
           (--peer-attention; auto applies peftctl's own eager/sdpa rule to the flattened rows);
  trl      TRL's SFTTrainer, padding_free=True, completion-only loss (a completion_mask column),
           the same attention kernel;
  stock    peft + a stock Trainer: padded batches, SDPA (the second reference row).

What is the same for every contender: peftctl's tokenization of the training rows, fed in
peftctl's shuffled order, step by step (the peers read exactly peftctl's micro-batches); the LoRA
(r, alpha, dropout, targets); batch size, steps, AdamW, cosine schedule, seed; precision (the
frozen base in bf16, LoRA in fp32, by default); the glibc allocator settings, given to every
process as the environment variables equivalent to peftctl/train/allocator.py's in-process mallopt calls.
The script fails unless every contender saw the same real and labelled tokens at every step.

Each contender trains in a subprocess of its own (peak RSS is the whole process's, loading
included); repeats alternate the order. The clock runs over steps k+1..N for everyone
(`--untimed-steps k`): what runs before it (peftctl's packing probe, the Trainers' first steps) is
warm-up. Each trained adapter is saved and scored afterwards by one function (this script's
`held_out_loss`, through peft, on peftctl's tokenization of the validation rows).

MFU counts the model FLOPs each side performs per timed step: 4 × the decoder's matmul weights
(forward, and the input gradients of a frozen base) and LoRA's 6 × r × (in + out) per adapted
layer, for every real token; 4 × the output head's weights only at the positions where the side
computes logits (peftctl: labelled ones; Trainer: every real position; TRL: every position on
CPU, labelled ones where its Triton kernel runs). Recomputation (peftctl's and TRL's head
backward) is not counted; nor is attention's own sequence-length-dependent work (a few % here).
The peak is the faster of two bf16 rates at the model's own training shapes ([tokens of a step,
in] × [in, out]): F.linear repeated on one weight (which stays in the core's cache), and the
base's matmuls alone run as a step runs them (every layer's own weight, forward, then the input
gradients in reverse), each measured after every round of repeats, the highest seen taken (a
shared machine's speed drifts). All are printed, with the CPU's model name.

    python scripts/bench_train.py                                    # SmolLM2-135M, 30 steps, 3 repeats
    python scripts/bench_train.py --model builtin:tiny-gpt2 --steps 10 --repeats 1
    python scripts/bench_train.py --contenders peftctl,flat --set data.packing=false
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_flops
import bench_runs

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "recipes" / "data" / "quickstart"
LAST_STEPS = 5  # the final training loss is the mean over this many last steps
CONTENDERS = {"peftctl": "peftctl", "flat": "Trainer + flattening", "trl": "TRL SFT padding-free",
              "stock": "stock Trainer (padded, sdpa)"}
# peftctl/train/allocator.py's release_freed_memory() calls mallopt(M_MMAP_THRESHOLD, 1 MiB) and
# mallopt(M_TRIM_THRESHOLD, 128 KiB) when training starts. glibc reads these variables at process
# start with the same effect (either form also turns off the adaptive thresholds), so every
# contender gets the same allocator from its first allocation; in peftctl's process the
# in-process calls then set the same values again.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1024 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        help=f"comma-separated subset of {', '.join(CONTENDERS)}")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--untimed-steps", type=int, default=3,
                        help="first steps of every contender left off the clock (warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each contender, the order alternated")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="precision of the frozen base (LoRA weights are fp32 everywhere)")
    parser.add_argument("--peer-precision", default="weights", choices=["weights", "autocast"],
                        help="peers: the base loaded in --dtype like peftctl (weights), or loaded in fp32 and "
                             "trained under bf16 autocast")
    parser.add_argument("--peer-attention", default="auto", choices=["auto", "eager", "sdpa"],
                        help="attention of the flat and trl peers; auto: peftctl's own rule on their rows (eager "
                             "on CPU when the longest flattened batch has at most 512 tokens, else sdpa)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--targets", default=None,
                        help="comma-separated module suffixes; default q_proj,v_proj (c_attn for tiny-gpt2)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--train", type=Path, default=DATA / "train.jsonl")
    parser.add_argument("--validation", type=Path, default=DATA / "validation.jsonl")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for the peftctl run's recipe, e.g. data.packing=false (repeatable)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every run and the matmul peak (default: torch's, one per core)")
    parser.add_argument("--only", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    parser.add_argument("--adapter-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.targets is None:
        args.targets = "c_attn" if args.model == "builtin:tiny-gpt2" else "q_proj,v_proj"
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in args.contenders if c not in CONTENDERS]
    if unknown or not args.contenders:
        parser.error(f"--contenders: unknown {unknown}; choose from {', '.join(CONTENDERS)}")
    if not 0 < args.untimed_steps < args.steps:
        parser.error("--untimed-steps must be at least 1 and fewer than --steps (some steps must be timed)")
    return args


# --- the parent: repeats, the one scorer, the FLOPs and the report ------------------------------


def spawn(which: str, argv: list[str], adapter_out: Path, script: str = __file__) -> dict:
    """One contender's run in a fresh process (`script --only which`), with the allocator settings
    every contender gets."""
    print(f"running {which} ...", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, script, *argv, "--only", which, "--adapter-out", str(adapter_out)],
                          capture_output=True, text=True, cwd=ROOT, env=os.environ | MALLOC_ENV)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(bench_runs.MARKER)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"the {which} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(bench_runs.MARKER):]) | {"adapter": str(adapter_out)}


def check_counts(runs: dict[str, list[dict]]) -> list[list[int]]:
    """Every run saw the same [real, labelled] tokens at every step as its stream says, and all
    streams agree; the script stops otherwise. Returns those per-step counts."""
    reference = next(iter(runs.values()))[0]["expected"]
    for which, repeats in runs.items():
        for run in repeats:
            for label, counts in (("saw", run["counts"]), ("was given", run["expected"])):
                if counts != reference:
                    step = next(i for i, (a, b) in enumerate(zip(counts, reference)) if a != b) + 1
                    raise SystemExit(f"token counts differ: {which} {label} [real, labelled] = {counts[step - 1]} "
                                     f"at step {step}, the others {reference[step - 1]}")
    return reference


def held_out_loss(model, examples, batch_size: int, pad_id: int) -> float | None:
    """The one scorer: token-weighted mean loss over the validation rows, through the model's own
    forward (full logits, transformers' loss), the same for every contender's adapter."""
    import torch

    from peftctl.data.tokenize import IGNORE, batches

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


def score_adapters(args: argparse.Namespace, work: Path, folders: list[str]) -> dict[str, float | None]:
    """Each saved adapter loaded through peft onto one freshly loaded base, scored by held_out_loss."""
    import peft

    from peftctl.data.rows import read_rows
    from peftctl.data.tokenize import tokenize_rows
    from peftctl.model.loading import load_model, load_tokenizer

    if not args.validation or not args.validation.is_file():
        return dict.fromkeys(folders)
    bench_runs.quiet()
    recipe = bench_runs.recipe_for(args, work / "scorer", [])
    tokenizer = load_tokenizer(recipe.model)
    examples = tokenize_rows(read_rows(args.validation, "alpaca"), recipe.data, tokenizer)[0]
    base, scores = load_model(recipe.model), {}
    for folder in folders:
        model = peft.PeftModel.from_pretrained(base, folder)
        scores[folder] = held_out_loss(model, examples, args.batch_size, tokenizer.pad_token_id)
        base = model.unload()  # the base's own layers back, for the next adapter
    return scores


def head_positions(which: str) -> str:
    """Where each side computes logits: peftctl at labelled positions, Trainer everywhere; TRL's
    fused head scores only labelled positions with its Triton kernel (CUDA), every position elsewhere."""
    import torch

    if which == "trl":
        return "labelled" if torch.cuda.is_available() else "real"
    return "labelled" if which == "peftctl" else "real"


def measure(run: dict, counts: list[list[int]], untimed: int, flops: dict, peak: float, which: str) -> dict:
    """One run's figures over the timed steps untimed+1..N."""
    real = sum(c[0] for c in counts[untimed:])
    labelled = sum(c[1] for c in counts[untimed:])
    seconds = run["clock"][-1] - run["clock"][untimed - 1]
    head = labelled if head_positions(which) == "labelled" else real
    last = run["step_losses"][-LAST_STEPS:]
    return {"tokens_per_s": real / seconds, "seconds": seconds, "real_tokens": real, "labelled_tokens": labelled,
            "mfu": (flops["decoder"] * real + flops["head"] * head) / seconds / peak,
            "peak_rss_mib": run["peak_rss_mib"], "peak_gpu_mib": run["peak_gpu_mib"], "train_loss": sum(last) / len(last),
            "val_loss": run["val_loss"], "load_avg": run["load_avg"]}


def spread(values: list[float | None], digits: int) -> dict | None:
    if any(v is None for v in values):
        return None
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits)}


def summarise(which: str, runs: list[dict], counts, untimed: int, flops: dict, peak: float) -> dict:
    measured = [measure(run, counts, untimed, flops, peak, which) for run in runs]
    out = {key: spread([m[key] for m in measured], digits)
           for key, digits in (("tokens_per_s", 1), ("mfu", 4), ("peak_rss_mib", 0), ("peak_gpu_mib", 0), ("train_loss", 4),
                               ("val_loss", 4), ("seconds", 2))}
    return out | {"label": CONTENDERS[which], "timed_real_tokens": measured[0]["real_tokens"],
                  "timed_labelled_tokens": measured[0]["labelled_tokens"], "logits_at": head_positions(which),
                  "attention": runs[0]["attention"], "no_padding": runs[0]["packed"],
                  "load_avg": [m["load_avg"] for m in measured]}


def ratios(rows: dict[str, dict], over: str) -> dict | None:
    """peftctl's medians over `over`'s: tokens/s, peak RSS, held-out loss, MFU."""
    if "peftctl" not in rows or over not in rows or over == "peftctl":
        return None
    ours, theirs = rows["peftctl"], rows[over]
    out = {"over": over}
    for key in ("tokens_per_s", "peak_rss_mib", "val_loss", "mfu"):
        if ours[key] is not None and theirs[key] is not None and theirs[key]["median"]:
            out[key] = round(ours[key]["median"] / theirs[key]["median"], 3)
    return out


def run_all(args: argparse.Namespace, argv: list[str], work: Path, after_round,
            script: str = __file__) -> dict[str, list[dict]]:
    """Every contender `--repeats` times, each repeat's order rotated one place from the last;
    `after_round(runs)` after each repeat of them all; each run is `script --only NAME`."""
    runs: dict[str, list[dict]] = {which: [] for which in args.contenders}
    for repeat in range(args.repeats):
        shift = repeat % len(args.contenders)
        for which in args.contenders[shift:] + args.contenders[:shift]:
            runs[which].append(spawn(which, argv, work / f"{which}-{repeat}", script))
        after_round(runs)
    return runs


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (MFU's peak belongs to it), else the platform's."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    args = parse_args()
    if args.only:
        bench_runs.run_only(args)
        return
    import torch

    from peftctl.model.loading import load_skeleton

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        recipe = bench_runs.recipe_for(args, work / "shapes", args.set)
        shapes = bench_runs.model_shapes(load_skeleton(recipe.model), args.targets.split(","))
        # The peak after every round of repeats, and the highest taken: a shared machine's speed
        # drifts over a run, and the highest rate seen is the conservative denominator for MFU.
        peaks: list[tuple[dict, float]] = []

        def measure_peak(runs: dict[str, list[dict]]) -> None:
            print("measuring the matmul peak ...", file=sys.stderr, flush=True)
            counts = next(iter(runs.values()))[0]["expected"]
            tokens = round(statistics.median(c[0] for c in counts) / recipe.train.grad_accum)
            peaks.append((bench_flops.matmul_peak(shapes["decoder"] + [shapes["head"]], tokens, args.dtype),
                          bench_flops.matmuls_alone(shapes["decoder"], tokens, args.dtype)))

        runs = run_all(args, sys.argv[1:], work, measure_peak)
        counts = check_counts(runs)
        rates = {shape: max(r[shape] for r, _ in peaks) for shape in peaks[0][0]}
        alone = max(a for _, a in peaks)
        round_peaks = [max(*r.values(), a) for r, a in peaks]
        print("scoring the adapters ...", file=sys.stderr, flush=True)
        scores = score_adapters(args, work, [run["adapter"] for repeats in runs.values() for run in repeats])
    for repeats in runs.values():
        for run in repeats:
            run["val_loss"] = scores[run["adapter"]]
    # The peak is the fastest these shapes' matmuls were seen to run, one weight repeated or the model's pass.
    peak, flops = max(round_peaks), bench_flops.flops_per_token(shapes, args.r)
    rows = {which: summarise(which, runs[which], counts, args.untimed_steps, flops, peak) for which in runs}
    peers = [w for w in rows if w != "peftctl"]
    fastest = max(peers, key=lambda w: rows[w]["tokens_per_s"]["median"]) if peers else None
    report = {
        "model": args.model, "dtype": args.dtype, "peer_precision": args.peer_precision, "steps": args.steps,
        "timed_steps": [args.untimed_steps + 1, args.steps], "repeats": args.repeats,
        "batch_size": args.batch_size, "max_seq_len": args.max_seq_len,
        "lora": {"r": args.r, "alpha": args.alpha, "dropout": args.dropout, "targets": args.targets},
        "peftctl_overrides": args.set, "threads": next(iter(runs.values()))[0]["threads"],
        "allocator_env": MALLOC_ENV, "flops_per_token": flops,
        "cpu": cpu_model(), "matmul_peak_gflops": round(peak / 1e9, 1),
        "matmul_peak_by_round_gflops": [round(p / 1e9, 1) for p in round_peaks],
        "matmul_gflops_by_shape": {k: round(v / 1e9, 1)
                                                                               for k, v in rates.items()},
        "base_matmuls_alone_gflops": round(alone / 1e9, 1),
        "contenders": rows, "fastest_peer": fastest,
        "ratio_peftctl_over_fastest_peer": ratios(rows, fastest), "ratio_peftctl_over_stock": ratios(rows, "stock"),
    }
    print_table(report)
    print(json.dumps(report))


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    def cell(value: dict | None, fmt: str, with_spread: bool = True) -> str:
        if value is None:
            return "–"
        text = fmt.format(value["median"])
        return escape(text + (f" [{fmt.format(value['min'])}–{fmt.format(value['max'])}]" if with_spread else ""))

    lora = report["lora"]
    table = Table(title=escape(f"{report['model']} · LoRA r={lora['r']} on {lora['targets']} · {report['dtype']} · "
                               f"batch {report['batch_size']} · steps {report['timed_steps'][0]}–{report['steps']} "
                               f"timed · {report['repeats']} repeats (median [min–max])"))
    for column in ("contender", "real tokens/s", "peak RSS MiB", "held-out loss", "train loss",
                   f"MFU (peak {report['matmul_peak_gflops']} GFLOP/s)", "attention", "logits at"):
        table.add_column(column, justify="left" if column in ("contender", "attention", "logits at") else "right")
    for row in report["contenders"].values():
        table.add_row(row["label"], cell(row["tokens_per_s"], "{:.1f}"), cell(row["peak_rss_mib"], "{:.0f}"),
                      cell(row["val_loss"], "{:.4f}", False), cell(row["train_loss"], "{:.4f}", False),
                      cell(row["mfu"], "{:.1%}"), str(row["attention"]), row["logits_at"])
    console = Console()
    if not console.is_terminal:  # into a log: wide enough for the spreads, not rich's 80 columns
        console = Console(width=160)
    console.print(table)
    shown = set()
    for key in ("ratio_peftctl_over_fastest_peer", "ratio_peftctl_over_stock"):
        ratio = report[key]
        if ratio and ratio["over"] not in shown:
            shown.add(ratio["over"])
            console.print(f"peftctl / {CONTENDERS[ratio['over']]}: " + ", ".join(f"{k} {v:.3f}" for k, v in ratio.items()
                                                                     if k != "over"))
    console.print(f"CPU: {report['cpu']}; the MFU peak is the highest of the peaks measured after each round of "
                  f"repeats: {', '.join(map(str, report['matmul_peak_by_round_gflops']))} GFLOP/s")
    console.print(f"the base's matmuls alone, in the model's order (weights from memory): "
                  f"{report['base_matmuls_alone_gflops']} GFLOP/s; one weight repeated, by shape: "
                  + ", ".join(f"{k} {v}" for k, v in report["matmul_gflops_by_shape"].items()))


if __name__ == "__main__":
    main()
