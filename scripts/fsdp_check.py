"""DDP and FSDP2 launches against one process: the same training, on this machine's GPUs.

Trains a recipe (default: the SmolLM2 quickstart) three ways with the same global batch: one
process with `grad_accum` = N, `accelerate launch` DDP with N processes, and FSDP2 with N
processes; prints per-step loss agreement, adapter agreement, tokens/s and what accelerate ran
(rich table, then one JSON line). N is the GPU count. Without a GPU it runs 2 CPU processes,
FSDP2 through tests/fsdp_on_cpu.py (accelerate shards only GPU groups; see the README).

    python scripts/fsdp_check.py [--recipe recipes/quickstart.yaml] [--steps 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
FSDP2 = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]


def train(out: Path, recipe: Path, sets: list[str], processes: int, launch: list[str] | None) -> dict:
    """One run; `launch`: accelerate launch options and program, or None for a plain process."""
    args = ["train", str(recipe), *(a for s in sets for a in ("--set", s)), "--output", str(out), "--json"]
    if launch is None:
        command = [sys.executable, "-m", "peftctl", *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", str(processes),
                   "--num_machines", "1", "--dynamo_backend", "no", "--main_process_port", str(port), *launch, *args]
    # On CPUs every run gets one thread per process: a bf16 matmul's rounding depends on how many
    # threads split it, and that alone would make the runs differ.
    env = None if torch.cuda.is_available() else {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)}\nfailed:\n{proc.stderr[-4000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, "losses": [e["loss"] for e in steps if "loss" in e],
            "adapter": load_file(out / "adapter" / "adapter_model.safetensors")}


def compare(run: dict, reference: dict) -> dict:
    """Largest relative loss difference, and largest adapter difference relative to each tensor's scale."""
    losses = max(abs(a - b) / abs(b) for a, b in zip(run["losses"], reference["losses"], strict=True))
    weights = max(float((run["adapter"][k].float() - w.float()).abs().max() / w.float().abs().max())
                  for k, w in reference["adapter"].items())
    s = run["summary"]
    return {"distributed": s["distributed"], "processes": s["processes"], "tokens_per_s": s["tokens_per_s"],
            "packed": s["packed"], "max_loss_rel_diff": losses, "max_weight_diff_of_scale": weights,
            "val_loss_after": s["val_loss_after"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run (default 10)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    gpus = torch.cuda.device_count()
    processes = gpus or 2
    fsdp = [*FSDP2, "-m", "peftctl"] if gpus else [*FSDP2, str(ROOT / "tests" / "fsdp_on_cpu.py")]
    sets = [f"train.max_steps={args.steps}", "train.log_every=1", "train.eval_every=null", "train.save_every=null"]
    with tempfile.TemporaryDirectory() as tmp:
        one = train(Path(tmp) / "one", args.recipe, [*sets, f"train.grad_accum={processes}"], 1, None)
        runs = {"one process": compare(one, one)}
        for name, launch in (("DDP", ["--multi_gpu", "-m", "peftctl"]), ("FSDP2", fsdp)):
            runs[name] = compare(train(Path(tmp) / name, args.recipe, [*sets, "train.grad_accum=1"], processes,
                                       launch), one)
    device = torch.cuda.get_device_name() if gpus else "CPU"
    report = {"device": device, "processes": processes, "recipe": str(args.recipe), "steps": args.steps, "runs": runs}
    if not args.json:
        from rich.table import Table

        from peftctl.cli.console import stdout

        table = Table(title=f"{args.recipe.name}, {args.steps} steps, {processes} processes on {device}",
                      title_justify="left")
        for column in ("run", "accelerate ran", "tokens/s", "packed", "loss vs one process", "adapter vs one process"):
            table.add_column(column, justify="left" if column in ("run", "accelerate ran") else "right")
        for name, run in runs.items():
            table.add_row(name, f"{run['distributed']} × {run['processes']}", f"{run['tokens_per_s']:,.0f}",
                          str(run["packed"]), f"{run['max_loss_rel_diff']:.1e}", f"{run['max_weight_diff_of_scale']:.1e}")
        stdout.print(table)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
