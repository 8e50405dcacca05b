"""One training loop for every method.

It sees an `Adapter` (a model plus the parameters to train) and token batches; it never knows
which method runs. AdamW on the trainable parameters only, linear warmup then cosine / linear /
constant, gradient accumulation with the loss averaged over every response token of the
optimizer step, gradient clipping, periodic validation loss and metrics in metrics.jsonl.
accelerate places the model and, on GPUs, runs bf16/fp16 autocast; under `accelerate launch`
it runs the same loop in every process (DDP, or FSDP2: see sharding.py). Checkpoints (checkpoint.py) every
`train.save_every` steps, at the end and on Ctrl-C let a run continue exactly where it stopped.

A run reads as its stages, in `train`: set up (accelerate, AdamW and its schedule from optim.py, the model
prepared by model_setup.py), start afresh or restore a checkpoint, then per step `step`, `log`,
`evaluate` and `save`, and `finish`. Its progress is one `checkpoint.TrainingState`. The loss
is loss.py's, the memory tuning allocator.py's.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from peftctl.core import jsontext
from peftctl.core.errors import UserError
from peftctl.core.files import atomic_write_text, writing
from peftctl.data.tokenize import TokenizedData, epochs_of_batches, stream_position
from peftctl.methods import Adapter
from peftctl.recipe.schema import TrainSpec
from peftctl.train import checkpoint
from peftctl.train.allocator import peak_memory_bytes, release_freed_memory, return_free_heap
from peftctl.train.checkpoint import restore_rng as _restore_rng  # a name of its own: tests resume without it
from peftctl.train.interrupts import StopRequests
from peftctl.train.loss import validation_loss
from peftctl.train.model_setup import prepare_model
from peftctl.train.optim import setup_optimizer
from peftctl.train.sharding import rebind_trainable, unshard_trainable
from peftctl.train.task_losses import loss_module

Batch = dict[str, torch.Tensor]


class Reporter(Protocol):
    """Where the loop reports progress: a rich progress bar in the CLI, nothing in tests."""

    def start(self, total_steps: int) -> None: ...
    def step(self, step: int, metrics: dict[str, float]) -> None: ...
    def note(self, text: str) -> None: ...
    def finish(self) -> None: ...


class SilentReporter:
    def start(self, total_steps: int) -> None: ...
    def step(self, step: int, metrics: dict[str, float]) -> None: ...
    def note(self, text: str) -> None: ...
    def finish(self) -> None: ...


@dataclass
class TrainResult:
    steps: int
    tokens: int  # real (non-padding) tokens fed to the model
    seconds: float  # wall time of the training steps (forward, backward, optimizer), not validation or checkpoints
    train_loss: float | None  # mean over the last logging window
    val_loss_before: float | None
    val_loss_after: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    packed: bool = False  # whether batches were packed (DataSpec.packing)
    padding_reason: str | None = None  # why packing 'auto' padded instead
    attention: str | None = None  # the attention kernel it trained with (TrainSpec.attention)
    checkpoint: Path | None = None  # the last checkpoint written (or resumed from)
    resumed_from: int | None = None  # the step of the checkpoint a resumed run continued from
    processes: int = 1  # under `accelerate launch`
    distributed: str = "NO"  # what accelerate ran them as: MULTI_GPU / MULTI_CPU (DDP), FSDP, NO
    peak_memory_bytes: int | None = None  # this process's peak: CUDA memory allocated on a GPU, resident size on CPU

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a whole step, which was checkpointed."""

    def __init__(self, step: int, checkpoint: Path):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"interrupted after step {step}; checkpoint {checkpoint}")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the step that produced it was not applied."""


def train(adapter: Adapter, data: TokenizedData, spec: TrainSpec, out_dir: Path, pad_id: int,
          reporter: Reporter | None = None, *, resume: Path | checkpoint.Checkpoint | None = None,
          fingerprint: dict[str, Any] | None = None, on_record: Callable[[dict[str, Any]], None] | None = None
          ) -> TrainResult:
    """Train `adapter`, checkpointing under `out_dir`/checkpoints; `resume` continues from a checkpoint.

    `fingerprint`: what the caller knows must not change between a checkpoint and a resumed run
    (model, method options, data); the loop adds its own (batch layout, seed, processes).
    `on_record` gets every metrics.jsonl entry too, in the main process (the trackers: trackers.py).
    Under `accelerate launch` every process runs this same function: each takes its share of a
    step's micro-batches, and only the main process writes files or reports progress.
    """
    release_freed_memory()
    run = _Run(adapter, data, spec, out_dir, pad_id, reporter, fingerprint)
    run.on_record = on_record  # called in `record`
    try:
        saved = resume
        if isinstance(resume, Path):  # a Checkpoint given is one the caller checked (pipeline.prepare)
            saved = checkpoint.read(resume)
            checkpoint.check_compatible(saved, run.fingerprint)
        if saved is None:
            run.start()
        else:
            run.restore(saved)
        micro_batches = run.begin()
        if saved is not None:
            _restore_rng(saved, run.accelerator.process_index)  # last: nothing before the loop may draw from it
        run.steps(micro_batches)
        return run.finish()
    finally:
        run.prepared.undo()  # export and generation run the model eagerly, with its own attention kernel


class _Run:
    """One call of `train`: what it set up, its progress (`state`), and its stages as methods."""

    def __init__(self, adapter: Adapter, data: TokenizedData, spec: TrainSpec, out_dir: Path, pad_id: int,
                 reporter: Reporter | None, fingerprint: dict[str, Any] | None):
        """Set up: accelerate, AdamW and its schedule, the model prepared for training."""
        from accelerate import Accelerator

        self.adapter, self.data, self.spec, self.pad_id = adapter, data, spec, pad_id
        self.accelerator = Accelerator(mixed_precision=_mixed_precision(adapter.model))
        self.main = self.accelerator.is_main_process
        self.reporter = (reporter if self.main else None) or SilentReporter()
        processes = self.accelerator.num_processes
        self.per_step = spec.grad_accum * processes  # micro-batches in one optimizer step, over all processes
        steps_per_epoch = math.ceil(math.ceil(len(data.train) / spec.batch_size) / self.per_step)
        self.total_steps = spec.max_steps or spec.epochs * steps_per_epoch
        self.last_step = self.total_steps  # earlier when train.max_minutes runs out
        optimizer, self.scheduler, self.schedule = setup_optimizer(adapter, spec, self.total_steps)
        loss = loss_module(data.task, adapter.model)
        self.labelled = loss.labelled  # the targets a batch holds, counted before its forward
        self.loss_model, self.optimizer = self.accelerator.prepare(loss, optimizer)
        rebind_trainable(adapter)
        self.params = list(adapter.params.values())
        self.device = self.accelerator.device
        self.prepared = prepare_model(adapter.model, self.loss_model, spec, data, pad_id, self.device)
        self.fingerprint = {**(fingerprint or {}), **loop_fingerprint(spec, processes)}
        self.checkpoints = out_dir / checkpoint.CHECKPOINTS
        self.metrics_file = out_dir / "metrics.jsonl"
        self.state = checkpoint.TrainingState()
        self.last_checkpoint: Path | None = None  # the last one written, or resumed from
        self.resumed_from: int | None = None
        self.started = time.perf_counter()  # set again when the steps begin

    def start(self) -> None:
        """A new run: the validation loss before training is step 0 of the metrics."""
        self.state.val_loss_before = self.validate(0)
        if self.state.val_loss_before is not None:
            self.record({"step": 0, "val_loss": self.state.val_loss_before})

    def restore(self, saved: checkpoint.Checkpoint) -> None:
        """Go on from `saved`: its weights, AdamW's state, the schedule's position, the progress."""
        self.last_checkpoint, self.resumed_from = saved.path, saved.step
        self.state = checkpoint.restore(saved, self.adapter, self.optimizer, self.scheduler, self.spec.lr,
                                        self.schedule)
        if self.main:  # the file reads like one run: what was logged after the checkpoint is dropped
            with writing(self.metrics_file, "the metrics"):
                atomic_write_text(self.metrics_file, "".join(jsontext.dumps(e) + "\n" for e in self.state.history))

    def begin(self) -> Iterator[Batch]:
        """The progress report started, and the micro-batches from the first step still to take."""
        self.reporter.start(self.total_steps)
        spec = self.spec
        return epochs_of_batches(self.data.train, spec.batch_size, self.pad_id, spec.seed, spec.group_by_length,
                                 self.prepared.pack_len, start=self.state.step * self.per_step, task=self.data.task)

    def steps(self, micro_batches: Iterator[Batch]) -> None:
        """Every step still to take, each logged, validated and checkpointed as the recipe says;
        SIGINT or SIGTERM stop the run after the step they came in, checkpointed."""
        spec, last = self.spec, self.total_steps
        self.started = time.perf_counter() - self.state.elapsed_s  # elapsed_s and tokens/s count the run before a resume too
        self.loss_model.train()
        with StopRequests() as stop:
            for step in range(self.state.step + 1, last + 1):
                group, grad_norm = self.step(step, micro_batches)
                if step < last and self.out_of_time():
                    last = self.last_step = step
                    self.reporter.note(f"train.max_minutes ({spec.max_minutes:g}) reached: stopping after step {step}")
                self.log(step, grad_norm)
                if spec.eval_every and step % spec.eval_every == 0 and step != last:
                    self.evaluate(step)
                stopping = _any_process(self.accelerator, stop.requested)  # read last: a Ctrl-C during this step stops after it
                if step == last or stopping or (spec.save_every and step % spec.save_every == 0):
                    self.save(step, group[0])
                if stopping and step < last:
                    self.reporter.finish()
                    raise TrainingInterrupted(step, self.last_checkpoint)
                if step == last:
                    break
        self.reporter.finish()

    def out_of_time(self) -> bool:
        """Whether train.max_minutes of training steps are spent, in any process (they stop together)."""
        limit = self.spec.max_minutes
        return limit is not None and _any_process(self.accelerator, self.state.train_s >= 60 * limit)

    def step(self, step: int, micro_batches: Iterator[Batch]) -> tuple[list[Batch], float | None]:
        """One optimizer step over the next micro-batches; returns them and the gradient norm."""
        began = time.perf_counter()
        group = [next(micro_batches) for _ in range(self.per_step)]
        step_tokens = sum(self.labelled(batch) for batch in group)
        local_loss, local_real = _backward(self.accelerator, self.loss_model, group, step_tokens, self.device,
                                           self.adapter)
        step_loss, step_real = _over_processes(self.accelerator, local_loss, local_real)
        if not math.isfinite(step_loss):
            raise self.diverged(step, "training loss", step_loss)
        grad_norm = None
        if self.spec.max_grad_norm is not None:
            grad_norm = float(self.accelerator.clip_grad_norm_(self.params, self.spec.max_grad_norm))
            if not math.isfinite(grad_norm):
                raise self.diverged(step, "gradient norm", grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.adapter.after_step(step, self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        state = self.state
        state.step = step
        state.window_loss += step_loss
        state.window_real += step_real
        state.window_tokens += step_tokens
        state.train_s += time.perf_counter() - began
        return group, grad_norm

    def log(self, step: int, grad_norm: float | None) -> None:
        """Report the step's figures; every `log_every` steps (and the last) they go to the metrics."""
        state, now = self.state, time.perf_counter()
        metrics = {"loss": state.window_loss / max(state.window_tokens, 1),
                   "lr": self.spec.lr * self.schedule(self.scheduler.last_epoch),
                   "tokens_per_s": (state.tokens + state.window_real) / max(state.train_s, 1e-9)}
        self.reporter.step(step, metrics)
        if step % self.spec.log_every == 0 or step == self.last_step:
            self.record({"step": step, **metrics, "grad_norm": grad_norm, "elapsed_s": round(now - self.started, 3)})
            state.train_loss = metrics["loss"]
            state.tokens += state.window_real
            state.window_loss, state.window_tokens, state.window_real = 0.0, 0, 0

    def evaluate(self, step: int) -> None:
        """The validation loss between steps, into the metrics and the progress report."""
        val = self.validate(step)
        if val is not None:
            self.record({"step": step, "val_loss": val})
            self.reporter.note(f"step {step}: validation loss {val:.4f}")
        self.loss_model.train()

    def save(self, step: int, batch: Batch) -> None:
        """Checkpoint the weights `step` left, if they still give a finite loss."""
        # An update can leave weights whose forward overflows though the step's own loss and
        # gradients were finite (lr 1e30): what is saved must give a finite loss, or nothing is.
        probe = _weights_loss(self.accelerator, self.loss_model, batch, self.device)
        if not math.isfinite(probe):
            raise self.diverged(step, "loss of the weights after this step's update", probe, applied=True)
        self.state.elapsed_s = time.perf_counter() - self.started
        position = stream_position(step * self.per_step, len(self.data.train), self.spec.batch_size)
        self.last_checkpoint = checkpoint.save(self.checkpoints, self.state, position, self.adapter, self.optimizer,
                                               self.scheduler, self.accelerator, self.fingerprint, self.spec.keep_last)

    def finish(self) -> TrainResult:
        """The validation loss after training, whole trainable tensors back in the model, the result."""
        return_free_heap()
        self.loss_model.eval()
        val_after = self.validate(self.last_step)
        if val_after is not None:
            self.record({"step": self.last_step, "val_loss": val_after})
        unshard_trainable(self.adapter)
        state, prepared = self.state, self.prepared
        return TrainResult(self.last_step, state.tokens, state.train_s, state.train_loss, state.val_loss_before,
                           val_after, state.history, packed=prepared.pack_len is not None,
                           padding_reason=prepared.padding_reason, attention=prepared.attention,
                           checkpoint=self.last_checkpoint, resumed_from=self.resumed_from,
                           processes=self.accelerator.num_processes,
                           distributed=self.accelerator.distributed_type.value, peak_memory_bytes=peak_memory_bytes())

    def validate(self, step: int) -> float | None:
        val = validation_loss(self.loss_model, self.data.validation, self.spec.batch_size, self.pad_id, self.device,
                              self.data.task)
        if val is not None and not math.isfinite(val):
            raise self.diverged(step, "validation loss", val)
        return val

    def record(self, entry: dict[str, Any]) -> None:
        """One entry of the run's metrics: kept for the result and checkpoints, appended to metrics.jsonl."""
        self.state.history.append(entry)
        if self.main:
            with writing(self.metrics_file, "the metrics"), self.metrics_file.open("a", encoding="utf-8") as f:
                f.write(jsontext.dumps(entry) + "\n")
            if self.on_record is not None:
                self.on_record(entry)

    def diverged(self, step: int, what: str, value: float, applied: bool = False) -> TrainingDiverged:
        last = self.last_checkpoint or checkpoint.latest(self.checkpoints)
        if last is None:
            saved = "no checkpoint was written before it (lower train.save_every to have one)"
            fix = "lower train.lr, add train.warmup_steps or set train.max_grad_norm, and train again"
        else:
            saved = f"the last good checkpoint is {last}"
            fix = (f"lower train.lr, add train.warmup_steps or set train.max_grad_norm, and continue from it: "
                   f"--resume {last} --set train.lr=...")
        stopped = "with that step's update unsaved" if applied else "before that step's update"
        return TrainingDiverged(f"the {what} is not finite ({value}) at step {step}; training stopped {stopped}, "
                                f"and no adapter or checkpoint of it was written; {saved}", fix=fix)


def loop_fingerprint(spec: TrainSpec, processes: int) -> dict[str, Any]:
    """The loop's settings that decide which micro-batches a step trains on: a checkpoint is only
    resumed with the same (see checkpoint.check_compatible)."""
    return {"train.batch_size": spec.batch_size, "train.grad_accum": spec.grad_accum, "train.seed": spec.seed,
            "train.group_by_length": spec.group_by_length, "processes (accelerate launch)": processes}


def _backward(accelerator: Any, loss_model: nn.Module, group: list[Batch], step_tokens: int,
              device: torch.device, adapter: Adapter) -> tuple[float, int]:
    """Forward and backward this process's share of a step's micro-batches; its loss sum and real tokens.

    Every process reads the same stream; process r of P takes micro-batches r, r + P, ... DDP and
    FSDP average gradients over processes: scaled by P, the sum is the token-weighted mean over
    the whole step, as in one process. Gradients sync on the last micro-batch only. A method's
    extra loss term counts once per step: each micro-batch carries its share.
    """
    processes = accelerator.num_processes
    mine = group[accelerator.process_index::processes]
    loss, real = 0.0, 0
    for i, batch in enumerate(mine):
        batch = {k: v.to(device) for k, v in batch.items()}
        sync = accelerator.no_sync(loss_model) if i < len(mine) - 1 else contextlib.nullcontext()
        with sync:
            with accelerator.autocast():
                loss_sum, _ = loss_model(**batch)
                objective = loss_sum * processes / step_tokens
                extra = adapter.extra_loss()
                if extra is not None:
                    objective = objective + extra / len(mine)
            accelerator.backward(objective)
        loss += float(loss_sum.detach())
        real += int(batch["attention_mask"].sum())
    return loss, real


def _over_processes(accelerator: Any, loss: float, real: int) -> tuple[float, int]:
    """The step's loss sum and real tokens over all processes (one all-reduce): every process
    sees a NaN anywhere, so all stop together."""
    if accelerator.num_processes == 1:
        return loss, real
    totals = torch.tensor([loss, real], dtype=torch.float64, device=accelerator.device)
    totals = accelerator.reduce(totals, reduction="sum")
    return float(totals[0]), int(totals[1])


def _any_process(accelerator: Any, flag: bool) -> bool:
    """Whether `flag` is set in any process: all must stop, on the same step, or the others
    would wait forever in the next step's gradient sync."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum") > 0)


def _weights_loss(accelerator: Any, loss_model: nn.Module, batch: Batch, device: torch.device) -> float:
    """The loss the current weights give on `batch` (every process's, summed), without gradients."""
    was_training = loss_model.training
    loss_model.eval()
    with torch.no_grad():
        loss_sum, _ = loss_model(**{k: v.to(device) for k, v in batch.items()})
    loss_model.train(was_training)
    return _over_processes(accelerator, float(loss_sum), 0)[0]


def _mixed_precision(model: nn.Module) -> str:
    """Autocast on GPUs to the base's 16-bit type; on CPU the bf16 base weights already do the work."""
    if not torch.cuda.is_available():
        return "no"
    dtype = next(p.dtype for p in model.parameters() if not p.requires_grad)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
