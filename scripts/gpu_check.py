"""QLoRA against 16-bit LoRA on a CUDA GPU: training speed (tokens/s) and peak GPU memory.

Trains the SmolLM2 quickstart (recipes/quickstart.yaml: LoRA r=8 on the attention projections)
for a fixed number of steps with its base in bf16/fp16, in 4 bit (NF4, double quantization)
and in 8 bit, each with and without gradient checkpointing, and prints one row per run as a
rich table and as one JSON line (the last line of stdout). On a machine without CUDA it says so
and exits 0.

    python scripts/gpu_check.py [--steps 30] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart.yaml"
RUNS = {
    "lora-16bit": [],
    "lora-16bit+ckpt": ["train.gradient_checkpointing=true"],
    "qlora": ["model.quantization=4bit"],
    "qlora+ckpt": ["model.quantization=4bit", "train.gradient_checkpointing=true"],
    "lora-8bit": ["model.quantization=8bit"],
}


def measure(name: str, overrides: list[str], steps: int, out: Path) -> dict:
    from peftctl import pipeline
    from peftctl.recipe import load_recipe

    recipe = load_recipe(RECIPE, [*overrides, f"train.max_steps={steps}", f"train.log_every={steps}",
                                  "train.eval_every=null"], output_dir=out / name)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    summary = pipeline.run(recipe)
    result = summary.result
    return {
        "name": name,
        "quantization": recipe.model.quantization,
        "gradient_checkpointing": recipe.train.gradient_checkpointing,
        "steps": result.steps,
        "tokens_per_s": round(result.tokens_per_second, 1),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
        "train_loss": result.train_loss,
        "val_loss_before": result.val_loss_before,
        "val_loss_after": result.val_loss_after,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine: nothing to measure (run this where torch.cuda.is_available() is true)")
        return 0

    import transformers

    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [measure(name, overrides, args.steps, Path(tmp)) for name, overrides in RUNS.items()]
    report = {"device": torch.cuda.get_device_name(), "recipe": str(RECIPE.relative_to(ROOT)), "steps": args.steps,
              "runs": runs}
    if not args.json:
        from rich.table import Table

        from peftctl.console import stdout

        table = Table(title=f"SmolLM2 quickstart, {args.steps} steps on {report['device']}", title_justify="left")
        for column in ("run", "tokens/s", "peak GPU memory", "train loss", "validation loss"):
            table.add_column(column, justify="left" if column == "run" else "right")
        for run in runs:
            table.add_row(run["name"], f"{run['tokens_per_s']:,.0f}", f"{run['peak_gpu_memory_gb']:.2f} GB",
                          f"{run['train_loss']:.4f}", f"{run['val_loss_before']:.4f} → {run['val_loss_after']:.4f}")
        stdout.print(table)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
