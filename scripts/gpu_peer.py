"""The GPU proof's peer (scripts/gpu_proof.py): the same LoRA through peft + TRL's SFTTrainer.

The model is gpu_proof's (the same config, random bf16 weights built on the GPU), LoRA comes from
peft with the recipe's rank, alpha and targets, and TRL trains it padding-free in bf16 with the
Trainer settings scripts/bench_train.py gives every peer (AdamW, cosine schedule, clipping at 1,
no checkpoints), on the same fixed-length rows, every token labelled.
"""

from __future__ import annotations

import argparse
import importlib.metadata
from pathlib import Path

import bench_runs
import gpu_proof


def measure_trl(run, folder: Path, work: Path, warmup: int, steps: int, batch_size: int, device: str) -> dict:
    import datasets
    import peft
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from peftctl.model.builtins import byte_level_tokenizer

    recipe = gpu_proof.recipe_for(run, folder, work, warmup + steps, batch_size)
    model = gpu_proof.build_model(recipe.model, device)
    method = recipe.method
    model = peft.get_peft_model(model, peft.LoraConfig(r=method.r, lora_alpha=method.alpha, lora_dropout=method.dropout,
                                                       target_modules=method.target_modules, task_type="CAUSAL_LM"))
    data = gpu_proof.synthetic_rows(model.config.vocab_size, batch_size * (warmup + steps), run.row_len)
    times = gpu_proof.StepTimes()

    class Timed(TrainerCallback):
        def on_step_end(self, *_, **__):
            times.step(0, {})

    settings = bench_runs.trainer_settings(argparse.Namespace(
        batch_size=batch_size, steps=warmup + steps, lr=recipe.train.lr, seed=recipe.train.seed,
        peer_precision="native", dtype="bfloat16"), work, "trl")
    # One loss read at the end, not a device sync every step; no log lines between the proof's.
    settings.update(gradient_checkpointing=run.checkpointed, logging_steps=warmup + steps)
    config = SFTConfig(**settings, padding_free=True, completion_only_loss=False, packing=False, max_length=None,
                       gradient_checkpointing_kwargs={"use_reentrant": False})
    # The rows are token ids already: the tokenizer only gives the collator a pad id.
    trainer = SFTTrainer(model=model, args=config, processing_class=byte_level_tokenizer(), callbacks=[Timed()],
                         train_dataset=datasets.Dataset.from_list([{"input_ids": e.input_ids} for e in data.train]))
    trainer.remove_callback(PrinterCallback)
    before = gpu_proof.reset_peak()
    trainer.train()
    figures = {"tokens_per_s": gpu_proof.timed_rate(times.after, warmup, batch_size * run.row_len),
               "before_training": before, "extra": {"attention": model.config._attn_implementation}}
    del trainer, model
    return figures | gpu_proof.peaks()


def quiet() -> None:
    """transformers', peft's and datasets' logs and progress bars off: the proof's table is the output."""
    bench_runs.quiet()
    try:
        import datasets
    except ImportError:  # the peer's rows will say so
        return
    datasets.disable_progress_bars()


def versions() -> dict[str, str | None]:
    found = {}
    for name in ("torch", "transformers", "accelerate", "peft", "trl", "bitsandbytes", "datasets", "pydantic"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found
