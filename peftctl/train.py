"""One training loop for every method.

It sees an `Adapter` (a model plus the parameters to train) and token batches; it never knows
which method runs. AdamW on the trainable parameters only, linear warmup then cosine / linear /
constant, gradient accumulation with the loss averaged over every response token of the
optimizer step, gradient clipping, periodic validation loss and metrics in metrics.jsonl.
accelerate places the model and, on GPUs, runs bf16/fp16 autocast; under `accelerate launch`
it runs the same loop in every process (DDP, or FSDP2: see sharding.py). Checkpoints (checkpoint.py) every
`train.save_every` steps, at the end and on Ctrl-C let a run continue exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from peftctl import checkpoint, jsontext
from peftctl.data import IGNORE, Example, TokenizedData, batches, collate, collate_packed
from peftctl.errors import UserError
from peftctl.files import atomic_write_text, writing
from peftctl.methods import Adapter
from peftctl.recipe import TrainSpec
from peftctl.sharding import rebind_trainable, shard_like, unshard_trainable, whole


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

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class CausalLMLoss(nn.Module):
    """Summed next-token cross-entropy over labelled positions, and how many there were.

    Logits are computed only where a label exists: with prompt masking most positions carry
    none, and the output layer over a large vocabulary is a big share of a small model's FLOPs.
    When the output layer is a frozen bias-free linear layer (no method touches it), they are
    not even kept for the backward pass (see HeadCrossEntropy). Wrapping the loss in a module
    lets accelerate (DDP, FSDP) wrap one forward.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def _no_split_modules(self) -> list[str] | None:
        # accelerate's FSDP auto-wrap shards one unit per transformer block, the classes the
        # module it prepares names here: this wrapper is that module.
        return getattr(self.model, "_no_split_modules", None)

    def tie_weights(self, *args, **kwargs) -> None:
        # accelerate's FSDP2 loading (cpu_ram_efficient_loading) moves the module it prepares to
        # the meta device, which unties shared weights (a tied output head), then re-ties them here.
        self.model.tie_weights(*args, **kwargs)

    def labelled_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                        position_ids: torch.Tensor | None = None):
        """Logits at the positions that predict a label, and those labels."""
        hidden, targets = self.labelled_hidden(input_ids, attention_mask, labels, position_ids)
        return self.model.get_output_embeddings()(hidden), targets

    def labelled_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                        position_ids: torch.Tensor | None = None):
        """Final hidden states at the positions that predict a label, and those labels.

        Packed rows (`position_ids` restarting at every example, see data.collate_packed) go in
        without the mask: from restarting positions transformers builds the mask that keeps the
        examples apart, and the padding at a row's end is after every real token. No KV cache:
        transformers would otherwise fill one on every forward, for nothing (a method's own
        prefilled cache is still used).
        """
        inputs = {"attention_mask": attention_mask} if position_ids is None else {"position_ids": position_ids}
        hidden = self.model.base_model(input_ids=input_ids, use_cache=False, **inputs).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE
        return hidden[:, :-1][keep], targets[keep]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None, per_token: bool = False):
        """The loss sum and the labelled token count; with `per_token`, each labelled token's loss.

        Anything that runs the model during training calls this (not the other methods): under
        FSDP2 the weights this module holds itself are gathered when its forward starts.
        """
        if per_token:
            logits, targets = self.labelled_logits(input_ids, attention_mask, labels, position_ids)
            return F.cross_entropy(logits.float(), targets, reduction="none")
        hidden, targets = self.labelled_hidden(input_ids, attention_mask, labels, position_ids)
        head = self.model.get_output_embeddings()
        if HeadCrossEntropy.takes(head):
            return HeadCrossEntropy.apply(hidden, head.weight, targets), targets.numel()
        return F.cross_entropy(head(hidden).float(), targets, reduction="sum"), targets.numel()


class HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the logits `hidden @ weight.T` against `targets`, for a frozen weight.

    Plain autograd would keep the logits over the vocabulary (for SmolLM2 49k values per
    position, the fp32 log-probabilities among them) from the loss until the backward pass has
    gone back through the output layer, that is while every activation of the model is alive
    too. Here only `hidden` is kept: the forward and backward passes each recompute the logits a
    chunk of positions at a time. That costs one more output-layer matmul over the labelled
    positions (~2% of a SmolLM2 step) and takes the logits out of the peak memory. The arithmetic
    is autograd's own (log_softmax, then its gradient scaled before the matmul), so gradients
    match plain `cross_entropy(hidden @ weight.T)` to rounding.
    """

    CHUNK_VALUES = 1 << 23  # logits per chunk: 32 MiB in fp32

    @staticmethod
    def takes(head: nn.Module) -> bool:
        """Whether the loss can go through this function: a frozen bias-free linear head that no
        method hooks into (a method that trains or wraps the head gets plain autograd)."""
        return (type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad
                and not (head._forward_hooks or head._forward_pre_hooks))

    @staticmethod
    def _chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
        rows = max(1, HeadCrossEntropy.CHUNK_VALUES // weight.shape[0])
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            yield start, t, torch.log_softmax(F.linear(h, weight).float(), dim=-1)

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight, targets)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for _, t, log_probs in HeadCrossEntropy._chunks(hidden, weight, targets):
            loss -= log_probs.gather(1, t[:, None]).sum()
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, weight, targets = ctx.saved_tensors
        grad = torch.empty_like(hidden)
        for start, t, log_probs in HeadCrossEntropy._chunks(hidden, weight, targets):
            # d loss / d logits = softmax - one_hot(target), times the incoming gradient
            grad_logits = log_probs.exp_().mul_(grad_loss)
            grad_logits[torch.arange(len(t), device=t.device), t] -= grad_loss
            grad[start : start + len(t)] = grad_logits.to(weight.dtype) @ weight
        return grad, None, None


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after a whole step, which was checkpointed."""

    def __init__(self, step: int, checkpoint: Path):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"interrupted after step {step}; checkpoint {checkpoint}")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the step that produced it was not applied."""


def train(adapter: Adapter, data: TokenizedData, spec: TrainSpec, out_dir: Path, pad_id: int,
          reporter: Reporter | None = None, *, resume: Path | checkpoint.Checkpoint | None = None,
          fingerprint: dict[str, Any] | None = None) -> TrainResult:
    """Train `adapter`, checkpointing under `out_dir`/checkpoints; `resume` continues from a checkpoint.

    `fingerprint`: what the caller knows must not change between a checkpoint and a resumed run
    (model, method options, data); the loop adds its own (batch layout, seed, processes).
    Under `accelerate launch` every process runs this same function: each takes its share of a
    step's micro-batches, and only the main process writes files or reports progress.
    """
    from accelerate import Accelerator

    release_freed_memory()
    model = adapter.model
    if spec.gradient_checkpointing:
        from peftctl.model import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    accelerator = Accelerator(mixed_precision=_mixed_precision(model))
    processes, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    reporter = (reporter if main else None) or SilentReporter()
    groups = param_groups(adapter, spec.lr)
    optimizer = torch.optim.AdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay)
    per_step = spec.grad_accum * processes  # micro-batches in one optimizer step, over all processes
    steps_per_epoch = math.ceil(math.ceil(len(data.train) / spec.batch_size) / per_step)
    total_steps = spec.max_steps or spec.epochs * steps_per_epoch
    schedule = lr_schedule(spec, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    loss_model, optimizer = accelerator.prepare(CausalLMLoss(model), optimizer)
    rebind_trainable(adapter)
    params = list(adapter.params.values())
    device = accelerator.device
    restore_attention = _use_attention(model, spec, data)
    attention = getattr(model.config, "_attn_implementation", None)
    pack_len, padding_reason = _pack_len(loss_model, data, pad_id, device)
    compiled = _compile(model) if spec.compile else []
    fingerprint = {**(fingerprint or {}), **loop_fingerprint(spec, processes)}
    checkpoints = out_dir / checkpoint.CHECKPOINTS

    def diverged(step: int, what: str, value: float, applied: bool = False) -> TrainingDiverged:
        return _diverged(step, what, value, last_checkpoint or checkpoint.latest(checkpoints), applied)

    def evaluate(step: int) -> float | None:
        val = validation_loss(loss_model, data.validation, spec.batch_size, pad_id, device)
        if val is not None and not math.isfinite(val):
            raise diverged(step, "validation loss", val)
        return val

    metrics_file = out_dir / "metrics.jsonl"
    history: list[dict[str, Any]] = []

    def record(entry: dict[str, Any]) -> None:
        history.append(entry)
        if main:
            with writing(metrics_file, "the metrics"), metrics_file.open("a", encoding="utf-8") as f:
                f.write(jsontext.dumps(entry) + "\n")

    # What a checkpoint holds besides the tensors; a resumed run starts from the saved values.
    # train_s: wall time of the training steps alone (not validation or checkpoints), the one
    # time tokens/s is measured against, in the progress line, metrics.jsonl and the summary.
    counters = {"tokens": 0, "window_loss": 0.0, "window_tokens": 0, "window_real": 0, "train_loss": None,
                "elapsed_s": 0.0, "train_s": 0.0}
    resumed = checkpoint.read(resume) if isinstance(resume, Path) else resume
    last_checkpoint = resumed.path if resumed is not None else None
    if resumed is not None:
        checkpoint.check_compatible(resumed, fingerprint)
        _restore_optimizer(resumed, adapter, optimizer, scheduler, spec.lr, schedule)
        counters.update(resumed.state["counters"])
        val_before = resumed.state["val_loss_before"]
        history.extend(resumed.state["metrics"])
        if main:  # the file reads like one run: what was logged after the checkpoint is dropped
            with writing(metrics_file, "the metrics"):
                atomic_write_text(metrics_file, "".join(jsontext.dumps(entry) + "\n" for entry in history))
    else:
        val_before = evaluate(0)
        if val_before is not None:
            record({"step": 0, "val_loss": val_before})
    first_step = resumed.step + 1 if resumed is not None else 1

    def save(step: int, batch: dict[str, torch.Tensor]) -> Path:
        # An update can leave weights whose forward overflows though the step's own loss and
        # gradients were finite (lr 1e30): what is saved must give a finite loss, or nothing is.
        probe = _weights_loss(accelerator, loss_model, batch, device)
        if not math.isfinite(probe):
            raise diverged(step, "loss of the weights after this step's update", probe, applied=True)
        # Whole tensors: under FSDP2 every process joins the gathering, the main one writes.
        tensors = {"adapter": {name: whole(p.detach()) for name, p in adapter.params.items()},
                   "optimizer": {key: whole(t) for key, t in _optimizer_tensors(optimizer, adapter.params).items()},
                   "rng": _rng_tensors(accelerator),  # all processes: gathers each one's RNG
                   "method": adapter.method.loop_state(adapter)}
        state = {"step": step, "micro_batches": step * per_step, **_data_position(step * per_step, len(data.train), spec.batch_size),
                 "scheduler": scheduler.state_dict(), "python_random": random.getstate(),
                 "counters": {**counters, "elapsed_s": time.perf_counter() - started},
                 "val_loss_before": val_before, "metrics": history, "fingerprint": fingerprint}
        if main:
            checkpoint.write(checkpoints, step, tensors, state, spec.keep_last)
        return checkpoints / f"step-{step}"

    reporter.start(total_steps)
    micro_batches = _micro_batches(data.train, spec, pad_id, pack_len, start=(first_step - 1) * per_step)
    if resumed is not None:
        _restore_rng(resumed, rank)  # last: nothing before the loop may draw from the restored RNG
    started = time.perf_counter() - counters["elapsed_s"]  # elapsed_s and tokens/s count the run before a resume too
    loss_model.train()
    with _StopRequests() as stop:
        for step in range(first_step, total_steps + 1):
            step_started = time.perf_counter()
            group = [next(micro_batches) for _ in range(per_step)]
            step_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in group)
            local_loss, local_real = _backward(accelerator, loss_model, group, step_tokens, device, adapter)
            step_loss, step_real = _over_processes(accelerator, local_loss, local_real)
            if not math.isfinite(step_loss):
                raise diverged(step, "training loss", step_loss)
            counters["window_loss"] += step_loss
            counters["window_real"] += step_real
            counters["window_tokens"] += step_tokens
            grad_norm = None
            if spec.max_grad_norm is not None:
                grad_norm = float(accelerator.clip_grad_norm_(params, spec.max_grad_norm))
                if not math.isfinite(grad_norm):
                    raise diverged(step, "gradient norm", grad_norm)
            optimizer.step()
            scheduler.step()
            adapter.method.after_step(adapter, step, total_steps)
            optimizer.zero_grad(set_to_none=True)

            now = time.perf_counter()
            counters["train_s"] += now - step_started
            metrics = {"loss": counters["window_loss"] / max(counters["window_tokens"], 1),
                       "lr": spec.lr * schedule(scheduler.last_epoch),
                       "tokens_per_s": (counters["tokens"] + counters["window_real"]) / max(counters["train_s"], 1e-9)}
            reporter.step(step, metrics)
            if step % spec.log_every == 0 or step == total_steps:
                record({"step": step, **metrics, "grad_norm": grad_norm, "elapsed_s": round(now - started, 3)})
                counters["train_loss"] = metrics["loss"]
                counters["tokens"] += counters["window_real"]
                counters.update(window_loss=0.0, window_tokens=0, window_real=0)
            if spec.eval_every and step % spec.eval_every == 0 and step != total_steps:
                val = evaluate(step)
                if val is not None:
                    record({"step": step, "val_loss": val})
                    reporter.note(f"step {step}: validation loss {val:.4f}")
                loss_model.train()
            stopping = _any_process(accelerator, stop.requested)  # read last: a Ctrl-C during this step stops after it
            if step == total_steps or stopping or (spec.save_every and step % spec.save_every == 0):
                last_checkpoint = save(step, group[0])
            if stopping and step < total_steps:
                reporter.finish()
                raise TrainingInterrupted(step, last_checkpoint)
    reporter.finish()
    return_free_heap()
    loss_model.eval()
    val_after = evaluate(total_steps)
    if val_after is not None:
        record({"step": total_steps, "val_loss": val_after})
    unshard_trainable(adapter)
    for module in compiled:
        module._compiled_call_impl = None  # later use of the model (export, generation) runs eagerly
    if restore_attention is not None:
        model.set_attn_implementation(restore_attention)
    return TrainResult(total_steps, counters["tokens"], counters["train_s"], counters["train_loss"], val_before, val_after,
                       history, packed=pack_len is not None, padding_reason=padding_reason, attention=attention, checkpoint=last_checkpoint,
                       resumed_from=resumed.step if resumed is not None else None, processes=processes,
                       distributed=accelerator.distributed_type.value)


def loop_fingerprint(spec: TrainSpec, processes: int) -> dict[str, Any]:
    """The loop's settings that decide which micro-batches a step trains on: a checkpoint is only
    resumed with the same (see checkpoint.check_compatible)."""
    return {"train.batch_size": spec.batch_size, "train.grad_accum": spec.grad_accum, "train.seed": spec.seed,
            "train.group_by_length": spec.group_by_length, "processes (accelerate launch)": processes}


class _StopRequests:
    """SIGINT / SIGTERM ask the loop to stop after the current step; the same signal again aborts.

    Only a repeat of the same signal aborts: `accelerate launch` (torchrun) answers a Ctrl-C,
    which every process of the terminal's group also gets, by sending its workers SIGTERM, and
    that must not cut their checkpoint short. The previous handlers are restored on exit.
    """

    def __init__(self) -> None:
        self.requested = False
        self._received: set[int] = set()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():  # Python only signals the main thread
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum in self._received:
            raise KeyboardInterrupt
        self.requested = True
        self._received.add(signum)

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _backward(accelerator: Any, loss_model: nn.Module, group: list[dict[str, torch.Tensor]], step_tokens: int,
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
                extra = adapter.method.extra_loss(adapter)
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


def _weights_loss(accelerator: Any, loss_model: nn.Module, batch: dict[str, torch.Tensor], device) -> float:
    """The loss the current weights give on `batch` (every process's, summed), without gradients."""
    was_training = loss_model.training
    loss_model.eval()
    with torch.no_grad():
        loss_sum, _ = loss_model(**{k: v.to(device) for k, v in batch.items()})
    loss_model.train(was_training)
    return _over_processes(accelerator, float(loss_sum), 0)[0]


def _diverged(step: int, what: str, value: float, last_checkpoint: Path | None,
              applied: bool = False) -> TrainingDiverged:
    if last_checkpoint is None:
        saved = "no checkpoint was written before it (lower train.save_every to have one)"
        fix = "lower train.lr, add train.warmup_steps or set train.max_grad_norm, and train again"
    else:
        saved = f"the last good checkpoint is {last_checkpoint}"
        fix = (f"lower train.lr, add train.warmup_steps or set train.max_grad_norm, and continue from it: "
               f"--resume {last_checkpoint} --set train.lr=...")
    stopped = "with that step's update unsaved" if applied else "before that step's update"
    return TrainingDiverged(f"the {what} is not finite ({value}) at step {step}; training stopped {stopped}, "
                            f"and no adapter or checkpoint of it was written; {saved}", fix=fix)


def _optimizer_tensors(optimizer: torch.optim.Optimizer, named: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state (step, exp_avg, exp_avg_sq) as `KIND/param name` tensors."""
    return {f"{kind}/{name}": value for name, p in named.items()
            for kind, value in optimizer.state.get(p, {}).items() if torch.is_tensor(value)}


ADAMW_STATE = ("step", "exp_avg", "exp_avg_sq")


def _restore_optimizer(saved: checkpoint.Checkpoint, adapter: Adapter, optimizer: Any, scheduler: Any,
                       lr: float, schedule) -> None:
    """Load the adapter weights, AdamW's state and the schedule's position from a checkpoint.

    The learning rate comes from the recipe, at the saved step of its schedule: the same as the
    checkpoint's when the recipe is unchanged, and a lowered lr takes effect (after a NaN loss).
    """
    # Checkpoints hold whole tensors (`p.shape` is the whole shape of an FSDP2 shard too).
    weights = {name: torch.zeros(p.shape, dtype=p.dtype) for name, p in adapter.params.items()}
    checkpoint.load_into(weights, saved, "adapter")
    with torch.no_grad():
        for name, p in adapter.params.items():
            p.copy_(shard_like(weights[name], p))
    targets = {f"{kind}/{name}": torch.zeros(() if kind == "step" else p.shape, dtype=torch.float32 if kind == "step" else p.dtype)
               for name, p in adapter.params.items() for kind in ADAMW_STATE}
    checkpoint.load_into(targets, saved, "optimizer")
    # The optimizer indexes parameters by position, group after group, as param_groups built them.
    in_order = [name for group in param_groups(adapter, lr) for name in group["names"]]
    per_param = {i: {kind: targets[f"{kind}/{name}"] if kind == "step" else shard_like(targets[f"{kind}/{name}"], p)
                     for kind in ADAMW_STATE}
                 for i, (name, p) in enumerate((name, adapter.params[name]) for name in in_order)}
    optimizer.load_state_dict({"state": per_param, "param_groups": optimizer.state_dict()["param_groups"]})
    scheduler.load_state_dict(saved.state["scheduler"])
    scheduler.base_lrs = [lr * group["lr_scale"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"] * schedule(scheduler.last_epoch)
    method_state = adapter.method.loop_state(adapter)
    if method_state:
        adapter.method.restore_loop_state(adapter, saved.tensors["method"], str(saved.path / "method.safetensors"))


def param_groups(adapter: Adapter, lr: float) -> list[dict[str, Any]]:
    """AdamW's parameter groups: one per learning-rate multiplier the method asks for (usually one)."""
    scales = adapter.method.lr_scales(adapter)
    by_scale: dict[float, list[str]] = {}
    for name in adapter.params:
        by_scale.setdefault(float(scales.get(name, 1.0)), []).append(name)
    return [{"params": [adapter.params[n] for n in names], "names": names, "lr": lr * scale, "lr_scale": scale}
            for scale, names in by_scale.items()]


def _rng_tensors(accelerator: Any) -> dict[str, torch.Tensor]:
    """Each process's torch RNG states (dropout draws from them), one row per process."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    if accelerator.num_processes > 1:
        states = {k: accelerator.gather(v.to(accelerator.device)[None]).cpu() for k, v in states.items()}
    else:
        states = {k: v[None] for k, v in states.items()}
    return states


def _restore_rng(saved: checkpoint.Checkpoint, rank: int) -> None:
    states = saved.tensors["rng"]
    torch.set_rng_state(states["torch"][rank].clone())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"][rank].clone())
    version, internal, gauss = saved.state["python_random"]
    random.setstate((version, tuple(internal), gauss))


def _data_position(consumed: int, examples: int, batch_size: int) -> dict[str, int]:
    """Where the stream of micro-batches is after `consumed` of them: the epoch, and the micro-batch in it."""
    epoch, micro_batch = divmod(consumed, math.ceil(examples / batch_size))
    return {"epoch": epoch, "epoch_micro_batch": micro_batch}


@torch.no_grad()
def validation_loss(loss_model: nn.Module, examples: list[Example], batch_size: int, pad_id: int,
                    device: torch.device) -> float | None:
    """Mean cross-entropy per response token over `examples`; None when there are none."""
    if not examples:
        return None
    was_training = loss_model.training
    loss_model.eval()
    # Sorted by length: batches of similar rows waste little on padding.
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    total, count = 0.0, 0
    for batch in batches(ordered, batch_size, pad_id):
        loss_sum, n = loss_model(**{k: v.to(device) for k, v in batch.items()})
        total, count = total + float(loss_sum), count + int(n)
    loss_model.train(was_training)
    return total / max(count, 1)


def lr_schedule(spec: TrainSpec, total_steps: int):
    """Multiplier of the peak lr at each step: linear warmup, then the chosen decay to zero."""

    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / (spec.warmup_steps + 1)
        if spec.scheduler == "constant":
            return 1.0
        progress = (step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps)
        if spec.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _micro_batches(examples: list[Example], spec: TrainSpec, pad_id: int, pack_len: int | None,
                   start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled micro-batches, a fresh order each epoch, from the `start`-th on.

    An epoch's order depends only on its seed, so a resumed run skips whole epochs without
    building them, and the batches before `start` in its epoch are built and dropped (no
    tokenising: the examples are already token ids).
    """
    position = _data_position(start, len(examples), spec.batch_size)
    epoch, skip = position["epoch"], position["epoch_micro_batch"]
    while True:
        epoch_batches = batches(examples, spec.batch_size, pad_id, shuffle_seed=spec.seed + epoch,
                                group_by_length=spec.group_by_length, pack_len=pack_len)
        yield from itertools.islice(epoch_batches, skip, None)
        epoch, skip = epoch + 1, 0


def _compile(model: nn.Module) -> list[nn.Module]:
    """torch.compile each repeated block (decoder layer) of the model, or the whole decoder.

    The blocks share one compiled graph (same code, parameters passed as inputs), so compiling
    takes as long as for one block, not one per layer.
    """
    from peftctl.model import transformer_blocks

    blocks = transformer_blocks(model) or [model.base_model]
    for block in blocks:
        block.compile(dynamic=True)
    return blocks


# Longer rows than this train faster with the fused (sdpa) kernel than with eager attention on CPU.
EAGER_MAX_ROW = 512


def _use_attention(model: nn.Module, spec: TrainSpec, data: TokenizedData) -> str | None:
    """Switch the model to the attention kernel `spec.attention` picks; returns the one to restore."""
    current = getattr(model.config, "_attn_implementation", None)
    wanted = spec.attention
    if wanted == "auto":
        longest = data.max_seq_len if data.packing and data.max_seq_len else max(len(e.input_ids) for e in data.train)
        wanted = "eager" if not torch.cuda.is_available() and longest <= EAGER_MAX_ROW else current
    if current is None or wanted == current or not hasattr(model, "set_attn_implementation"):
        return None
    model.set_attn_implementation(wanted)
    return current


def _pack_len(loss_model: nn.Module, data: TokenizedData, pad_id: int, device: torch.device) -> tuple[int | None, str | None]:
    """The longest packed row when batches are packed (DataSpec.packing), else None; and why
    'auto' chose padding, if it did (said once, in the run's summary)."""
    if not data.packing or len(data.train) < 2:
        return None, None
    problem = packing_problem(loss_model, data.train, pad_id, device)
    if problem is None:
        # Packed rows carry no attention mask by design: transformers' warning that the input
        # "may be padded" without one would only mislead.
        logging.getLogger("transformers.modeling_utils").addFilter(_drop_padding_warning)
        return data.max_seq_len or max(len(e.input_ids) for e in data.train), None
    if data.packing is True:
        raise UserError(f"batches cannot be packed for this model and method: {problem}", where="data.packing",
                        fix="set data.packing: false (or auto, which falls back to padding)")
    return None, problem


def _drop_padding_warning(record: logging.LogRecord) -> bool:
    return "may be padded" not in record.getMessage()


@torch.no_grad()
def packing_problem(loss_model: nn.Module, examples: list[Example], pad_id: int,
                    device: torch.device) -> str | None:
    """Why packed rows would not train like separate ones on this model, or None if they would.

    Two examples share a row: the second must get the per-token losses it gets alone (its
    positions restart at 0) and keep them when the first changes (no attention across). Checked
    on the model as it trains (method, attention kernel), in eval mode so dropout is off.
    """
    first = examples[0]
    second = next((e for e in examples[1:] if any(label != IGNORE for label in e.labels[1:])), None)
    if second is None:
        return None
    module = getattr(loss_model, "module", loss_model)  # unwrapped from DDP (FSDP2 has no wrapper)
    count = sum(label != IGNORE for label in second.labels[1:])

    def second_losses(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module(**{k: v.to(device) for k, v in batch.items()}, per_token=True)[-count:]

    was_training = module.training
    module.eval()
    try:
        alone = second_losses(collate([second], pad_id))
        packed = second_losses(collate_packed([[first, second]], pad_id))
        changed = second_losses(collate_packed([[Example(first.input_ids[::-1], first.labels), second]], pad_id))
    except Exception as err:  # noqa: BLE001 - any model or method that cannot take a packed row
        return f"the model failed on a packed row ({type(err).__name__}: {err})"
    finally:
        module.train(was_training)
    if not torch.allclose(packed, changed, rtol=1e-4, atol=1e-4):
        return "packed examples would attend to each other with this model and method"
    # In fp32 they agree to ~1e-7. In bf16 a different row layout alone moves a SmolLM2 token's loss
    # by ~0.02-0.06 nats on average (rounding, amplified over 30 layers); wrong positions move it more.
    exact = next(p.dtype for p in module.parameters() if not p.requires_grad) == torch.float32
    if float((packed - alone).abs().mean()) > (1e-3 if exact else 0.15):
        return "a packed example's losses differ from its losses alone"
    return None


def _glibc():
    """The C library when it is glibc (its malloc tunables are used below), else None."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    """Make glibc hand large freed blocks back to the OS instead of keeping them on the heap.

    PyTorch on CPU allocates activations of a different size every step (batches vary in
    length); with glibc's adaptive thresholds these land on the heap and fragment it, and the
    resident size of a SmolLM2 run grew from 1.4 to 2.1 GB over 25 steps. Blocks of 1 MiB and
    more now get their own mappings, returned when freed. A lower threshold keeps the heap
    smaller still (128 KiB: peak 1.36 instead of 1.71 GB, SmolLM2 benchmark) but maps and
    zeroes so many pages each step that training ran 1.9× slower (72 s instead of 38 s, same
    run). No-op off glibc.
    """
    libc = _glibc()
    if libc is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1024 * 1024)
        libc.mallopt(m_trim_threshold, 128 * 1024)


def return_free_heap() -> None:
    """Give the heap's free pages back to the OS (malloc_trim) once training is done, so that what
    runs next (validation, export, generation) does not start on top of a fragmented heap: the
    resident size after a SmolLM2 benchmark run fell from 1.52 to 0.88 GB. Per step it would cost
    ~15% of the step time in refaulted pages, for a peak only 10% lower."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _mixed_precision(model: nn.Module) -> str:
    """Autocast on GPUs to the base's 16-bit type; on CPU the bf16 base weights already do the work."""
    if not torch.cuda.is_available():
        return "no"
    dtype = next(p.dtype for p in model.parameters() if not p.requires_grad)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
