"""One contender's training run for scripts/bench_train.py, in a process of its own.

`bench_train.py --only NAME` lands here (run_only): peftctl's own loop, or a peer (peft + Trainer
flattened or padded, TRL's SFTTrainer padding-free) fed exactly peftctl's micro-batches, counting
the real and labelled tokens it trains on and the time after each optimizer step. The result is
one line on stdout (MARKER + JSON) that the parent reads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

MARKER = "BENCH_RESULT "


# --- what every contender shares ----------------------------------------------------------------


def recipe_for(args: argparse.Namespace, out_dir: Path, overrides: list[str], dtype: str | None = None):
    """The benchmark's recipe through peftctl's own loader (so --set works as on the CLI)."""
    import yaml

    from peftctl.recipe.load import load_recipe

    raw = {
        "model": {"name_or_path": args.model, "dtype": dtype or args.dtype},
        "method": {"name": "lora", "r": args.r, "alpha": args.alpha, "dropout": args.dropout,
                   "target_modules": args.targets.split(",")},
        "data": {"train": str(args.train.resolve()), "format": "alpaca", "max_seq_len": args.max_seq_len},
        # No lr warmup: peftctl's warmup ramp and transformers' differ by one step; cosine decay is the same.
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "scheduler": "cosine",
                  "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": args.seed,
                  "log_every": 1, "save_every": None},
        "output": {"dir": str(out_dir)},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return load_recipe(path, overrides)


def step_batches(data, spec) -> list[list[list[int]]]:
    """The example indices of each micro-batch of each step, in the order peftctl's loop reads them.

    Taken from peftctl's own batching (data.epochs_of_batches) run over stand-in examples that
    carry their index as first token and their real length (group_by_length sorts by it).
    """
    from itertools import islice

    from peftctl.data.tokenize import IGNORE, Example, epochs_of_batches

    stand_ins = [Example([i] + [0] * (len(e.input_ids) - 1), [IGNORE] * len(e.input_ids))
                 for i, e in enumerate(data.train)]
    stream = epochs_of_batches(stand_ins, spec.batch_size, 0, spec.seed, spec.group_by_length)
    micro = [batch["input_ids"][:, 0].tolist() for batch in islice(stream, spec.max_steps * spec.grad_accum)]
    return [micro[s * spec.grad_accum:(s + 1) * spec.grad_accum] for s in range(spec.max_steps)]


def expected_counts(data, steps: list[list[list[int]]]) -> list[list[int]]:
    """[real tokens, labelled tokens] of each step: what every contender must see."""
    from peftctl.data.tokenize import IGNORE

    def count(i: int) -> tuple[int, int]:
        e = data.train[i]
        return len(e.input_ids), sum(label != IGNORE for label in e.labels[1:])

    return [[sum(count(i)[k] for batch in step for i in batch) for k in (0, 1)] for step in steps]


def model_shapes(model, targets: list[str]) -> dict:
    """The matmul weights' (in, out) shapes: the decoder's, the output head's, and LoRA's targets."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    decoder, lora = [], []
    for name, module in model.named_modules():
        if module is head or not isinstance(module, (nn.Linear, Conv1D)):
            continue
        w = module.weight  # nn.Linear is [out, in]; GPT-2's Conv1D is [in, out]
        shape = (w.shape[1], w.shape[0]) if isinstance(module, nn.Linear) else (w.shape[0], w.shape[1])
        decoder.append(shape)
        if any(name == t or name.endswith("." + t) for t in targets):
            lora.append(shape)
    return {"decoder": decoder, "head": (head.weight.shape[1], head.weight.shape[0]), "lora": lora}


# --- the contenders, one per process ------------------------------------------------------------


class StepClock:
    """perf_counter after each optimizer step; steps k+1..N are timed from the k-th entry."""

    def __init__(self):
        self.after_step: list[float] = []

    def tick(self) -> None:
        self.after_step.append(time.perf_counter())


def run_peftctl(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from peftctl import methods
    from peftctl.data.tokenize import load_data
    from peftctl.export.adapter_files import save_adapter
    from peftctl.model.loading import load_model, load_tokenizer
    from peftctl.train.loop import SilentReporter, train

    recipe = recipe_for(args, work / "peftctl", args.set)
    tokenizer = load_tokenizer(recipe.model)
    data = load_data(recipe.data, tokenizer, recipe.train.seed)
    model = load_model(recipe.model)
    torch.manual_seed(recipe.train.seed)
    adapter = methods.apply(model, recipe.method)
    clock = StepClock()

    class Clocked(SilentReporter):  # the loop reports each step once its optimizer step is done
        def step(self, step, metrics):
            clock.tick()

    result = train(adapter, data, recipe.train, work / "peftctl", tokenizer.pad_token_id, Clocked())
    counts = expected_counts(data, step_batches(data, recipe.train))
    if sum(real for real, _ in counts) != result.tokens:
        raise SystemExit(f"peftctl trained {result.tokens} real tokens; its batch stream, rebuilt here, has "
                         f"{sum(real for real, _ in counts)}: the bench no longer reads peftctl's order")
    save_adapter(adapter, args.adapter_out, args.model)
    # `counts` is the rebuilt stream, checked above against the real tokens peftctl itself counted.
    return {"clock": clock.after_step, "counts": counts, "expected": counts,
            "step_losses": [e["loss"] for e in result.history if "loss" in e],
            "packed": result.packed, "attention": result.attention,
            "settings": recipe.model_dump(mode="json")["data"] | recipe.model_dump(mode="json")["train"]}


def peer_attention(args: argparse.Namespace, which: str, longest_row: int) -> str:
    """The stock Trainer's SDPA, or the flat and trl peers' kernel: --peer-attention, or for 'auto' the
    rule peftctl applies to its own rows (attention_choice.auto_kernel): eager on CPU for rows up to 512
    tokens, SDPA for longer ones (and on GPUs). A flattened row is a whole batch, so it is often longer."""
    import torch

    from peftctl.train.attention_choice import auto_kernel

    if which == "stock":
        return "sdpa"
    if args.peer_attention != "auto":
        return args.peer_attention
    return auto_kernel("sdpa", longest_row, torch.cuda.is_available())


def peer_model(args: argparse.Namespace, recipe, attention: str):
    """The base through peftctl's loader (from_pretrained, or the builtin), its attention, peft's LoRA."""
    import peft
    import torch

    from peftctl.model.loading import load_model

    model = load_model(recipe.model)
    model.set_attn_implementation(attention)
    torch.manual_seed(args.seed)
    return peft.get_peft_model(model, peft.LoraConfig(
        r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=args.targets.split(","),
        task_type="CAUSAL_LM"))


def trainer_settings(args: argparse.Namespace, work: Path, which: str) -> dict:
    """TrainingArguments shared by every peer (SFTConfig takes them too, plus its own)."""
    import torch

    return dict(
        output_dir=str(work / which), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", seed=args.seed, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        remove_unused_columns=False, gradient_checkpointing=False,
        # peftctl autocasts to the base's 16-bit type on GPUs only; on CPU the bf16 weights do the work.
        bf16=args.peer_precision == "autocast" or (torch.cuda.is_available() and args.dtype == "bfloat16"))


def labelled_tokens(labels) -> int:
    """A causal LM batch's labelled tokens: the positions after the first whose label is not -100."""
    return int((labels[:, 1:] != -100).sum())


def counted(trainer_class, micro_batches: list[list[int]], clock: StepClock, labelled=labelled_tokens):
    """`trainer_class` reading exactly peftctl's micro-batches, counting the tokens of every one it
    trains on (from the collated inputs the model gets: real tokens, and `labelled(labels)`) and
    ticking `clock` after each step."""
    from torch.utils.data import DataLoader
    from transformers import TrainerCallback

    class Tick(TrainerCallback):
        def on_step_end(self, *_, **__):
            clock.tick()

    class Counted(trainer_class):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw, callbacks=[Tick()])
            self.seen: list[list[int]] = []  # [real, labelled] tokens of each micro-batch

        def get_train_dataloader(self):
            # The trainer's own (prepared) dataset and collator; only the sampling is peftctl's.
            return self.accelerator.prepare(DataLoader(self.train_dataset, batch_sampler=micro_batches,
                                                       collate_fn=self.data_collator))

        def training_step(self, model, inputs, num_items_in_batch=None):
            ids, labels = inputs["input_ids"], inputs["labels"]
            real = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else ids.numel()
            self.seen.append([real, labelled(labels)])
            return super().training_step(model, inputs, num_items_in_batch)

    return Counted


def run_peer(args: argparse.Namespace, work: Path) -> dict:
    import datasets
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    from peftctl.data.tokenize import load_data
    from peftctl.model.loading import load_tokenizer

    which = args.only
    recipe = recipe_for(args, work / which, [], "float32" if args.peer_precision == "autocast" else None)
    tokenizer = load_tokenizer(recipe.model)
    data = load_data(recipe.data, tokenizer, recipe.train.seed)
    steps = step_batches(data, recipe.train)
    micro_batches = [batch for step in steps for batch in step]
    longest = max(sum(len(data.train[i].input_ids) for i in batch) for batch in micro_batches)
    model = peer_model(args, recipe, peer_attention(args, which, longest))
    clock, settings = StepClock(), trainer_settings(args, work, which)
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in data.train]
    if which == "trl":
        from trl import SFTConfig, SFTTrainer

        # A user's completion-only data: TRL builds the labels from the mask (prompt tokens -100).
        masked = [{"input_ids": e.input_ids, "completion_mask": [int(label != -100) for label in e.labels]}
                  for e in data.train]
        config = SFTConfig(**settings, padding_free=True, completion_only_loss=True, packing=False,
                           max_length=None)
        trainer = counted(SFTTrainer, micro_batches, clock)(
            model=model, args=config, train_dataset=datasets.Dataset.from_list(masked), processing_class=tokenizer)
    else:
        collator = DataCollatorWithFlattening() if which == "flat" else _padding_collator(tokenizer.pad_token_id)
        trainer = counted(Trainer, micro_batches, clock)(
            model=model, args=TrainingArguments(**settings), train_dataset=rows, data_collator=collator)
    trainer.train()
    model.save_pretrained(args.adapter_out)
    accum, seen = recipe.train.grad_accum, trainer.seen
    return {"clock": clock.after_step, "step_losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "counts": [[sum(c[k] for c in seen[s * accum:(s + 1) * accum]) for k in (0, 1)] for s in range(len(steps))],
            "expected": expected_counts(data, steps), "packed": which != "stock",
            "attention": model.config._attn_implementation}


def _padding_collator(pad_id: int):
    """The stock Trainer's batches: each batch padded to its longest row, with an attention mask."""
    from peftctl.data.tokenize import Example, collate

    # A stock Trainer pads to the longest row (its collators' pad_to_multiple_of is off by default).
    return lambda features: collate([Example(f["input_ids"], f["labels"]) for f in features], pad_id, multiple=1)


def quiet() -> None:
    """transformers' and peft's warnings off: the report is what this script prints."""
    import logging
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("peft").setLevel(logging.ERROR)
    warnings.simplefilter("ignore", FutureWarning)


def run_only(args: argparse.Namespace, runner=None) -> None:
    """One contender's run (`runner(args, work)`, by default bench_train's peftctl or peer) and its
    peak RSS, threads and load, printed as one MARKER line."""
    import torch

    quiet()

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        runner = runner or (run_peftctl if args.only == "peftctl" else run_peer)
        result = runner(args, Path(tmp))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result |= {"peak_rss_mib": usage.ru_maxrss / 1024, "threads": torch.get_num_threads(),
               "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
               "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}
    print(MARKER + json.dumps(result), flush=True)
