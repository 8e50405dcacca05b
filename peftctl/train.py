"""One training loop for every method.

It sees an `Adapter` (a model plus the parameters to train) and token batches; it never knows
which method runs. AdamW on the trainable parameters only, linear warmup then cosine / linear /
constant, gradient accumulation with the loss averaged over every response token of the
optimizer step, gradient clipping, periodic validation loss and metrics in metrics.jsonl.
accelerate places the model and, on GPUs, runs bf16/fp16 autocast.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from peftctl.data import IGNORE, Example, TokenizedData, batches, collate, collate_packed
from peftctl.errors import UserError
from peftctl.methods import Adapter
from peftctl.recipe import TrainSpec


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
    seconds: float
    train_loss: float | None  # mean over the last logging window
    val_loss_before: float | None
    val_loss_after: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    packed: bool = False  # whether batches were packed (DataSpec.packing)
    attention: str | None = None  # the attention kernel it trained with (TrainSpec.attention)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class CausalLMLoss(nn.Module):
    """Summed next-token cross-entropy over labelled positions, and how many there were.

    Logits are computed only where a label exists: with prompt masking most positions carry
    none, and the output layer over a large vocabulary is a big share of a small model's FLOPs.
    When the output layer is a frozen bias-free linear layer (no method touches it), they are
    not even kept for the backward pass (see HeadCrossEntropy). Wrapping the loss in a module
    lets accelerate (DDP) wrap one forward.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

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
                position_ids: torch.Tensor | None = None):
        hidden, targets = self.labelled_hidden(input_ids, attention_mask, labels, position_ids)
        head = self.model.get_output_embeddings()
        if (type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad
                and not (head._forward_hooks or head._forward_pre_hooks)):
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


def train(adapter: Adapter, data: TokenizedData, spec: TrainSpec, out_dir: Path, pad_id: int,
          reporter: Reporter | None = None) -> TrainResult:
    from accelerate import Accelerator

    release_freed_memory()
    reporter = reporter or SilentReporter()
    model = adapter.model
    if spec.gradient_checkpointing:
        from peftctl.model import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    accelerator = Accelerator(mixed_precision=_mixed_precision(model))
    params = list(adapter.params.values())
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(data.train) / spec.batch_size) / spec.grad_accum)
    total_steps = spec.max_steps or spec.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(spec, total_steps))
    loss_model, optimizer = accelerator.prepare(CausalLMLoss(model), optimizer)
    device = accelerator.device
    restore_attention = _use_attention(model, spec, data)
    attention = getattr(model.config, "_attn_implementation", None)
    pack_len = _pack_len(loss_model, data, pad_id, device, reporter)
    compiled = _compile(model) if spec.compile else []

    def evaluate() -> float | None:
        return validation_loss(loss_model, data.validation, spec.batch_size, pad_id, device)

    metrics_file = out_dir / "metrics.jsonl"
    history: list[dict[str, Any]] = []

    def record(entry: dict[str, Any]) -> None:
        history.append(entry)
        with metrics_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    val_before = evaluate()
    if val_before is not None:
        record({"step": 0, "val_loss": val_before})
    reporter.start(total_steps)
    micro_batches = _micro_batches(data.train, spec, pad_id, pack_len)
    tokens_total, window_loss, window_tokens, window_real = 0, 0.0, 0, 0
    train_loss = None
    started = window_start = time.perf_counter()
    loss_model.train()
    for step in range(1, total_steps + 1):
        group = [next(micro_batches) for _ in range(spec.grad_accum)]
        step_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in group)
        for batch in group:
            batch = {k: v.to(device) for k, v in batch.items()}
            with accelerator.autocast():
                loss_sum, _ = loss_model(**batch)
            accelerator.backward(loss_sum / step_tokens)
            window_loss += float(loss_sum.detach())
            window_real += int(batch["attention_mask"].sum())
        window_tokens += step_tokens
        grad_norm = None
        if spec.max_grad_norm is not None:
            grad_norm = float(accelerator.clip_grad_norm_(params, spec.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        now = time.perf_counter()
        metrics = {"loss": window_loss / max(window_tokens, 1), "lr": scheduler.get_last_lr()[0],
                   "tokens_per_s": window_real / max(now - window_start, 1e-9)}
        reporter.step(step, metrics)
        if step % spec.log_every == 0 or step == total_steps:
            record({"step": step, **metrics, "grad_norm": grad_norm, "elapsed_s": round(now - started, 3)})
            train_loss = metrics["loss"]
            tokens_total += window_real
            window_loss, window_tokens, window_real, window_start = 0.0, 0, 0, time.perf_counter()
        if spec.eval_every and step % spec.eval_every == 0 and step != total_steps:
            val = evaluate()
            if val is not None:
                record({"step": step, "val_loss": val})
                reporter.note(f"step {step}: validation loss {val:.4f}")
            loss_model.train()
    seconds = time.perf_counter() - started
    reporter.finish()
    loss_model.eval()
    val_after = evaluate()
    if val_after is not None:
        record({"step": total_steps, "val_loss": val_after})
    for module in compiled:
        module._compiled_call_impl = None  # later use of the model (export, generation) runs eagerly
    if restore_attention is not None:
        model.set_attn_implementation(restore_attention)
    return TrainResult(total_steps, tokens_total, seconds, train_loss, val_before, val_after, history,
                       packed=pack_len is not None, attention=attention)


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


def _micro_batches(examples: list[Example], spec: TrainSpec, pad_id: int,
                   pack_len: int | None) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled micro-batches, a fresh order each epoch."""
    epoch = 0
    while True:
        yield from batches(examples, spec.batch_size, pad_id, shuffle_seed=spec.seed + epoch,
                           group_by_length=spec.group_by_length, pack_len=pack_len)
        epoch += 1


def _compile(model: nn.Module) -> list[nn.Module]:
    """torch.compile each repeated block (decoder layer) of the model, or the whole decoder.

    The blocks share one compiled graph (same code, parameters passed as inputs), so compiling
    takes as long as for one block, not one per layer.
    """
    kinds = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in kinds] or [model.base_model]
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


def _pack_len(loss_model: nn.Module, data: TokenizedData, pad_id: int, device: torch.device,
              reporter: Reporter) -> int | None:
    """The longest packed row when batches are packed (DataSpec.packing), else None."""
    if not data.packing or len(data.train) < 2:
        return None
    problem = packing_problem(loss_model, data.train, pad_id, device)
    if problem is None:
        # Packed rows carry no attention mask by design: transformers' warning that the input
        # "may be padded" without one would only mislead.
        logging.getLogger("transformers.modeling_utils").addFilter(_drop_padding_warning)
        return data.max_seq_len or max(len(e.input_ids) for e in data.train)
    if data.packing is True:
        raise UserError(f"batches cannot be packed for this model and method: {problem}", where="data.packing",
                        fix="set data.packing: false (or auto, which falls back to padding)")
    reporter.note(f"data.packing auto: padding batches, not packing them: {problem}")
    return None


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
    module = getattr(loss_model, "module", loss_model)  # unwrapped from DDP
    count = sum(label != IGNORE for label in second.labels[1:])

    def second_losses(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, targets = module.labelled_logits(**{k: v.to(device) for k, v in batch.items()})
        return F.cross_entropy(logits.float(), targets, reduction="none")[-count:]

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
        return "examples packed into one row attend to each other"
    # In fp32 they agree to ~1e-7. In bf16 a different row layout alone moves a SmolLM2 token's loss
    # by ~0.02-0.06 nats on average (rounding, amplified over 30 layers); wrong positions move it more.
    exact = next(p.dtype for p in module.parameters() if not p.requires_grad) == torch.float32
    if float((packed - alone).abs().mean()) > (1e-3 if exact else 0.15):
        return "a packed example's losses differ from its losses alone"
    return None


def release_freed_memory() -> None:
    """Make glibc hand large freed blocks back to the OS instead of keeping them on the heap.

    PyTorch on CPU allocates activations of a different size every step (batches vary in
    length); with glibc's adaptive thresholds these land on the heap and fragment it, and the
    resident size of a SmolLM2 run grew from 1.4 to 2.1 GB over 25 steps. With fixed 128 KiB
    mmap and trim thresholds it stays at 0.7-0.9 GB (measured, same run). No-op off glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1024 * 1024)
        libc.mallopt(m_trim_threshold, 128 * 1024)
    except (OSError, AttributeError):
        pass


def _mixed_precision(model: nn.Module) -> str:
    """Autocast on GPUs to the base's 16-bit type; on CPU the bf16 base weights already do the work."""
    if not torch.cuda.is_available():
        return "no"
    dtype = next(p.dtype for p in model.parameters() if not p.requires_grad)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
