#!/usr/bin/env python3
"""The GPU proof: LoRA and QLoRA on 1B- and 7B-shaped models, measured against `peftctl plan` and peft + TRL.

For each model shape (SmolLM2-135M, Llama-3.2-1B and Llama-2-7B configs, random weights built on
the GPU in bf16: speed and memory do not depend on what the weights are, and nothing is
downloaded) and each method (LoRA r=8 on q/v, LoRA r=8 on every linear layer, QLoRA: that on a
4-bit NF4 base with double quantization), with and without gradient checkpointing, for rows of
512 and 2048 tokens: `--warmup` steps, then `--steps` timed ones, through peftctl's own loop
(peftctl.train.loop.train, with the recipe's method from peftctl.methods and its quantization from
peftctl.model.quantize). Per run: real tokens/s over the timed steps, the peak GPU memory
(torch.cuda.max_memory_allocated and _reserved over the whole run) and `peftctl plan`'s total for
the same recipe, with its error. Then LoRA on q/v through peft + TRL's SFTTrainer (padding-free,
bf16) where TRL imports, for the ratios. One run that fails (out of memory, no bitsandbytes)
records its error and the next one starts; runs not started within `--minutes` are marked
skipped. A rich table, then one JSON line (also written to --out).

    python scripts/gpu_proof.py --wheels .whl        # here: the wheels the GPU machine lacks (gpu_wheels.py)
    python scripts/gpu_proof.py                      # there: every run, under 8 minutes on one H200
    python scripts/gpu_proof.py --only llama-2-7b,qlora --steps 10
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # the GPU machine runs the checkout, not an install

# The shapes of the published configs (rope scaling and token ids left out: they change neither
# speed nor memory).
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=True),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
}
LORA = {"name": "lora", "r": 8, "alpha": 16}
# name -> (method options, model options)
METHODS = {
    "lora-qv": ({**LORA, "target_modules": ["q_proj", "v_proj"]}, {}),
    "lora-all": ({**LORA, "target_modules": "all-linear"}, {}),
    "qlora": ({**LORA, "target_modules": "all-linear"}, {"quantization": "4bit", "quant_type": "nf4",
                                                           "double_quant": True}),
}
LENGTHS = (512, 2048)
PEER_METHOD = "lora-qv"
NEVER_READ = ROOT / "recipes" / "data" / "tiny" / "train.jsonl"  # data.train must name a file; rows are synthetic
PLAN_TOLERANCE = 0.10  # the bar: plan within 10% of the measured peak
QLORA_7B_BAR = 6e9  # QLoRA's 7B peak at 512 tokens with gradient checkpointing, bytes


@dataclass(frozen=True)
class Run:
    shape: str
    method: str
    row_len: int
    checkpointed: bool
    peer: bool = False  # peft + TRL instead of peftctl

    @property
    def name(self) -> str:
        return " ".join([self.shape, self.method if not self.peer else f"{self.method} peft+trl", str(self.row_len),
                         *(["ckpt"] if self.checkpointed else [])])


def matrix(shapes=tuple(SHAPES), methods=tuple(METHODS), lengths=LENGTHS, peers: bool = True,
           only: list[str] | None = None) -> list[Run]:
    """Every run, peftctl's first; `only`: the runs whose name holds every one of these words."""
    runs = [Run(s, m, n, c) for s in shapes for m in methods for c in (False, True) for n in lengths]
    if peers and PEER_METHOD in methods:
        runs += [Run(s, PEER_METHOD, n, c, peer=True) for s in shapes for c in (False, True) for n in lengths]
    words = [w for w in (only or []) if w]
    return [run for run in runs if all(w in run.name for w in words)]


def write_config(shape: dict, folder: Path) -> Path:
    """A model folder holding only config.json: what `plan` reads, and what the builders build."""
    from transformers import LlamaConfig

    LlamaConfig(**shape).save_pretrained(folder)
    return folder


def recipe_for(run: Run, folder: Path, out: Path, steps: int, batch_size: int):
    """The recipe of `run` on the model in `folder`: what `plan` sizes and the loop trains."""
    from peftctl.recipe.schema import Recipe

    method, model = METHODS[run.method]
    return Recipe.model_validate({
        "model": {"name_or_path": str(folder), "dtype": "bfloat16", **model},
        "method": method,
        # Fixed-length rows fill every batch: nothing to pack.
        "data": {"train": str(NEVER_READ), "format": "completion", "max_seq_len": run.row_len, "packing": False},
        "train": {"batch_size": batch_size, "max_steps": steps, "log_every": steps, "save_every": None, "keep_last": 1,
                  "gradient_checkpointing": run.checkpointed, "lr": 1e-4},
        "output": {"dir": str(out), "report": False, "samples": 0},
    })


def build_model(spec, device: str):
    """The config in spec.name_or_path with random weights, made on `device` in spec.dtype (a 7B is
    never made in fp32 on the CPU), then quantized and marked as load_model finishes a base."""
    import torch
    from transformers import AutoModelForCausalLM

    from peftctl.arch.layers import resolve_dtype
    from peftctl.model import quantize
    from peftctl.model.loading import finish_base, load_config

    if spec.quantization != "none":
        quantize.check_quantization(spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(load_config(spec), dtype=resolve_dtype(spec.dtype))
    model.to(device)  # nothing to move where from_config honoured the device, as it does today
    return finish_base(model, spec)


def synthetic_rows(vocab: int, rows: int, row_len: int, seed: int = 0):
    """`rows` rows of `row_len` random tokens, every one labelled: what plan assumes (full rows)."""
    import torch

    from peftctl.data.tokenize import Example, TokenizedData

    ids = torch.randint(3, vocab, (rows, row_len), generator=torch.Generator().manual_seed(seed)).tolist()
    return TokenizedData([Example(row, list(row)) for row in ids], [], 0, packing=False, max_seq_len=row_len)


@dataclass
class Measured:
    name: str
    shape: str
    method: str
    row_len: int
    checkpointed: bool
    peer: bool
    status: str = "ok"  # ok, failed, skipped
    error: str | None = None
    seconds: float | None = None  # the whole run: building, training, clearing up
    tokens_per_s: float | None = None
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    before_training: int | None = None  # allocated once the model was built: its weights
    plan_total: float | None = None
    plan_activations: float | None = None
    plan_error: float | None = None  # plan_total / peak_allocated - 1
    extra: dict = field(default_factory=dict)


class StepTimes:
    """A Reporter for peftctl.train.loop: the time after each step, the GPU's queue drained first."""

    def __init__(self):
        self.after: list[float] = []

    def start(self, total_steps: int) -> None: ...
    def note(self, text: str) -> None: ...
    def finish(self) -> None: ...

    def step(self, step: int, metrics: dict) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.after.append(time.perf_counter())


def timed_rate(after: list[float], warmup: int, tokens_per_step: int) -> float | None:
    """Tokens/s over the steps after the first `warmup` (the clock starts when step `warmup` ends)."""
    if len(after) <= warmup or warmup < 1:
        return None
    return (len(after) - warmup) * tokens_per_step / (after[-1] - after[warmup - 1])


def measure_peftctl(run: Run, folder: Path, work: Path, warmup: int, steps: int, batch_size: int,
                    device: str) -> dict:
    """One run through peftctl's loop; its figures and `plan`'s for the same recipe."""
    from peftctl import methods
    from peftctl.plan.memory_plan import plan
    from peftctl.train.loop import train

    recipe = recipe_for(run, folder, work / "run", warmup + steps, batch_size)
    recipe.output.dir.mkdir()  # what pipeline.execute makes before training
    planned = plan(recipe)
    model = build_model(recipe.model, device)
    adapter = methods.apply(model, recipe.method)
    data = synthetic_rows(model.config.vocab_size, batch_size * (warmup + steps), run.row_len)
    times = StepTimes()
    before = reset_peak()
    train(adapter, data, recipe.train, work / "run", pad_id=0, reporter=times)
    figures = {"tokens_per_s": timed_rate(times.after, warmup, batch_size * run.row_len), "before_training": before,
               "plan_total": planned.peft.total, "plan_activations": planned.peft.activations,
               "extra": {"plan_attention": planned.attention, "plan_autocast": planned.autocast}}
    del adapter, model
    return figures | peaks()


def reset_peak() -> int | None:
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peaks() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_allocated": torch.cuda.max_memory_allocated(), "peak_reserved": torch.cuda.max_memory_reserved()}


def clear_device() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(run: Run, folders: dict[str, Path], work: Path, args, device: str) -> Measured:
    """`run`, failing soft: an error is recorded in its row and the device cleared for the next one."""
    import gpu_peer

    row = Measured(run.name, run.shape, run.method, run.row_len, run.checkpointed, run.peer)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            if run.peer:
                figures = gpu_peer.measure_trl(run, folders[run.shape], Path(tmp), args.warmup, args.steps,
                                               args.batch_size, device)
            else:
                figures = measure_peftctl(run, folders[run.shape], Path(tmp), args.warmup, args.steps, args.batch_size,
                                          device)
        for key, value in figures.items():
            setattr(row, key, value)
        if row.plan_total and row.peak_allocated:
            row.plan_error = row.plan_total / row.peak_allocated - 1
    except Exception as err:  # noqa: BLE001 - out of memory, a missing package: recorded, and on to the next
        row.status, row.error = "failed", f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]
    finally:
        clear_device()
    row.seconds = round(time.perf_counter() - started, 1)
    return row


def verdict(rows: list[Measured]) -> dict:
    """The issue's bars, read off the rows."""
    ours = [r for r in rows if not r.peer]
    errors = [abs(r.plan_error) for r in ours if r.plan_error is not None]
    qlora = [r for r in ours if r.shape == "llama-2-7b" and r.method == "qlora" and r.row_len == 512 and r.checkpointed]
    return {"every_run_trained": bool(ours) and all(r.status == "ok" for r in ours),
            "worst_plan_error": max(errors, default=None),
            "plan_within_10_percent": bool(errors) and len(errors) == len(ours) and max(errors) < PLAN_TOLERANCE,
            "qlora_7b_512_ckpt_peak": qlora[0].peak_allocated if qlora else None,
            "qlora_7b_below_6_gb": bool(qlora) and qlora[0].peak_allocated is not None
            and qlora[0].peak_allocated < QLORA_7B_BAR}


def ratios(rows: list[Measured]) -> list[dict]:
    """peftctl over peft + TRL for each configuration both ran: tokens/s and peak memory."""
    ours = {(r.shape, r.row_len, r.checkpointed): r for r in rows if not r.peer and r.method == PEER_METHOD}
    found = []
    for peer in (r for r in rows if r.peer and r.status == "ok"):
        mine = ours.get((peer.shape, peer.row_len, peer.checkpointed))
        if mine and mine.status == "ok" and mine.tokens_per_s and peer.tokens_per_s:
            found.append({"run": mine.name, "speed": mine.tokens_per_s / peer.tokens_per_s,
                          "memory": mine.peak_allocated / peer.peak_allocated if peer.peak_allocated else None})
    return found


def table(rows: list[Measured], title: str):
    from rich.table import Table

    out = Table(title=title, title_justify="left")
    for column in ("run", "tokens/s", "peak alloc", "peak reserved", "plan", "plan error", "time"):
        out.add_column(column, justify="left" if column == "run" else "right")
    for r in rows:
        if r.status != "ok":
            out.add_row(f"{r.name}\n[red]{r.status}: {r.error or ''}[/red]", *[""] * 5, _cell(r.seconds, "{:.0f} s"))
            continue
        out.add_row(r.name, _cell(r.tokens_per_s, "{:,.0f}"), _cell(r.peak_allocated, "{:.2f} GB", 1e-9),
                    _cell(r.peak_reserved, "{:.2f} GB", 1e-9), _cell(r.plan_total, "{:.2f} GB", 1e-9),
                    _cell(r.plan_error, "{:+.1%}"), _cell(r.seconds, "{:.0f} s"))
    return out


def _cell(value, fmt: str, scale: float = 1.0) -> str:
    return "" if value is None else fmt.format(value * scale)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wheels", type=Path, help="download the wheels the GPU machine lacks into this folder, and "
                        "print the command to run there; nothing is trained")
    parser.add_argument("--only", default="", help="comma-separated words: the runs whose name holds each "
                        "(e.g. llama-2-7b,qlora; 'ckpt'; 'peft+trl')")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the clock starts (default 3)")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per step (default 1)")
    parser.add_argument("--no-peers", action="store_true", help="leave out peft + TRL")
    parser.add_argument("--minutes", type=float, default=7.5, help="start no run after this many minutes (default 7.5)")
    parser.add_argument("--out", type=Path, default=Path("gpu_proof.json"), help="where the JSON goes too")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.wheels is not None:
        import gpu_wheels

        return gpu_wheels.main(args.wheels)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine: nothing to measure (run this where torch.cuda.is_available() is true; "
              "python scripts/gpu_proof.py --wheels .whl prints how)")
        return 0
    import gpu_peer

    gpu_peer.quiet()
    started, rows = time.perf_counter(), []
    runs = matrix(peers=not args.no_peers, only=args.only.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folders = {shape: write_config(SHAPES[shape], work / shape) for shape in {r.shape for r in runs}}
        for run in runs:
            if time.perf_counter() - started > 60 * args.minutes:
                rows.append(Measured(run.name, run.shape, run.method, run.row_len, run.checkpointed, run.peer,
                                     status="skipped", error=f"--minutes {args.minutes:g} spent"))
                continue
            rows.append(measure(run, folders, work, args, "cuda"))
            print(f"{rows[-1].name}: {rows[-1].status} in {rows[-1].seconds:.0f} s", file=sys.stderr, flush=True)
    report = {"device": torch.cuda.get_device_name(), "versions": gpu_peer.versions(), "steps": args.steps,
              "warmup": args.warmup, "batch_size": args.batch_size, "seconds": round(time.perf_counter() - started),
              "verdict": verdict(rows), "ratios_over_peft_trl": ratios(rows), "runs": [asdict(r) for r in rows]}
    from peftctl.cli.console import stdout

    stdout.print(table(rows, f"{report['device']}: {args.warmup} + {args.steps} steps, batch {args.batch_size}"))
    stdout.print(report["verdict"])
    line = json.dumps(report)
    args.out.write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
