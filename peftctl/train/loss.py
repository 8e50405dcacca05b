"""The training loss: next-token cross-entropy over the response tokens, and what is built on it.

Labels hold the token each position should predict, or `IGNORE` (data/tokenize.py) where nothing is
learnt (the prompt, padding). `CausalLMLoss` is the one module training, evaluation and the
packing probe run the model through; `HeadCrossEntropy` keeps the vocabulary-sized logits out of
the peak memory; plan/memory_plan.py sizes that peak from the same chunking.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from peftctl.data.tokenize import IGNORE, Example, batches, collate, collate_packed


def labelled_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many positions of `batch` carry a loss: those whose next token has a label."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


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

    @staticmethod
    def labelled(batch: dict[str, torch.Tensor]) -> int:
        """How many targets `batch` holds (the loop's step average divides by them)."""
        return labelled_tokens(batch)

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
    too. Here the forward pass computes the logits a chunk of positions at a time and keeps only
    the last chunk's (alive at the forward's end anyway, where the peak is, and the first thing
    the backward pass reads); the backward pass recomputes the others. With up to CHUNK_VALUES
    labelled logits a step (SmolLM2: ~170 positions) nothing is recomputed; beyond, one more
    output-layer matmul over the earlier chunks, and the logits stay out of the peak memory. The arithmetic
    is autograd's own (log_softmax, then its gradient scaled before the matmul), so gradients
    match plain `cross_entropy(hidden @ weight.T)` to rounding.
    """

    CHUNK_VALUES = 1 << 23  # logits per output-layer matmul: 16 MiB in bf16
    # Logits per element-wise pass (fp32 copy, log-softmax, its gradient): 1 MiB in fp32, within a
    # core's L2 cache. A whole chunk's passes would each go through memory instead; the rows are
    # independent, so blocking them changes no value (only the order the loss is summed in).
    BLOCK_VALUES = 1 << 18

    @staticmethod
    def block_rows(vocab: int) -> int:
        """Rows per element-wise pass: about BLOCK_VALUES logits, in whole rows per thread (torch's
        CPU softmax splits a block by rows: SmolLM2's 5-row blocks left one of two threads idle for
        a fifth of each pass; 4 rows ran the head's forward and backward ~14% faster)."""
        threads = torch.get_num_threads()
        rows = max(1, HeadCrossEntropy.BLOCK_VALUES // vocab)
        return max(threads, rows - rows % threads)

    @staticmethod
    def takes(head: nn.Module) -> bool:
        """Whether the loss can go through this function: a frozen bias-free linear head that no
        method hooks into (a method that trains or wraps the head gets plain autograd)."""
        return (type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad
                and not (head._forward_hooks or head._forward_pre_hooks))

    @staticmethod
    def _chunks(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                last: torch.Tensor | None = None):
        """(first row, targets, logits in the weight's dtype, their row blocks) for each chunk;
        `last`: the last chunk's logits, already computed."""
        rows = max(1, HeadCrossEntropy.CHUNK_VALUES // weight.shape[0])
        block = HeadCrossEntropy.block_rows(weight.shape[0])
        for start in range(0, hidden.shape[0], rows):
            is_last = start + rows >= hidden.shape[0]
            logits = last if is_last and last is not None else F.linear(hidden[start : start + rows], weight)
            yield start, targets[start : start + rows], logits, logits.split(block)

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        logits = hidden.new_empty(0)
        for _, t, logits, blocks in HeadCrossEntropy._chunks(hidden, weight, targets):
            for block, block_targets in zip(blocks, t.split(len(blocks[0]))):
                log_probs = torch.log_softmax(block.float(), dim=-1)
                loss -= log_probs.gather(1, block_targets[:, None]).sum()
        ctx.save_for_backward(hidden, weight, targets)
        # Not a saved tensor: the backward pass writes the gradient over it, so it serves one pass
        # (a second, with retain_graph, recomputes it), which autograd's version check would refuse.
        ctx.last_logits = logits if logits.numel() else None
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, weight, targets = ctx.saved_tensors
        last, ctx.last_logits = ctx.last_logits, None
        grad = torch.empty_like(hidden)
        for start, t, logits, blocks in HeadCrossEntropy._chunks(hidden, weight, targets, last):
            for block, block_targets in zip(blocks, t.split(len(blocks[0]))):
                # d loss / d logits = softmax - one_hot(target), times the incoming gradient
                grad_logits = torch.log_softmax(block.float(), dim=-1).exp_().mul_(grad_loss)
                grad_logits[torch.arange(len(block_targets), device=t.device), block_targets] -= grad_loss
                block.copy_(grad_logits)  # in the weight's dtype, where the logits were
            grad[start : start + len(t)] = logits @ weight
        return grad, None, None


@torch.no_grad()
def validation_loss(loss_model: nn.Module, examples: list[Example], batch_size: int, pad_id: int,
                    device: torch.device, task: str = "causal_lm") -> float | None:
    """Mean cross-entropy per target (response token, class, target token) over `examples`; None when there are none."""
    if not examples:
        return None
    was_training = loss_model.training
    loss_model.eval()
    # Sorted by length: batches of similar rows waste little on padding.
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    total, count = 0.0, 0
    for batch in batches(ordered, batch_size, pad_id, task=task):
        loss_sum, n = loss_model(**{k: v.to(device) for k, v in batch.items()})
        total, count = total + float(loss_sum), count + int(n)
    loss_model.train(was_training)
    return total / max(count, 1)


@contextmanager
def probing(loss_model: nn.Module) -> Iterator[nn.Module]:
    """The loss module unwrapped from DDP (FSDP2 has no wrapper), in eval mode so dropout is off
    and without autograd while a probe runs it; its training mode comes back after. (no_grad as a
    decorator would not do: on a generator it restores grad mode at every yield, so the caller's
    body would run with autograd.)"""
    module = getattr(loss_model, "module", loss_model)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


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
    count = sum(label != IGNORE for label in second.labels[1:])
    with probing(loss_model) as module:
        def second_losses(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return module(**{k: v.to(device) for k, v in batch.items()}, per_token=True)[-count:]

        try:
            alone = second_losses(collate([second], pad_id))
            packed = second_losses(collate_packed([[first, second]], pad_id))
            changed = second_losses(collate_packed([[Example(first.input_ids[::-1], first.labels), second]], pad_id))
        except Exception as err:  # noqa: BLE001 - any model or method that cannot take a packed row
            return f"the model failed on a packed row ({type(err).__name__}: {err})"
    if not torch.allclose(packed, changed, rtol=1e-4, atol=1e-4):
        return "packed examples would attend to each other with this model and method"
    # In fp32 they agree to ~1e-7. In bf16 a different row layout alone moves a SmolLM2 token's loss
    # by ~0.02-0.06 nats on average (rounding, amplified over 30 layers); wrong positions move it more.
    exact = next(p.dtype for p in module.parameters() if not p.requires_grad) == torch.float32
    if float((packed - alone).abs().mean()) > (1e-3 if exact else 0.15):
        return "a packed example's losses differ from its losses alone"
    return None
