"""The generation engine: continuous batching over the base and every adapter.

One thread runs the model. Between decode steps it admits waiting requests (each prefilled
alone, so a long prompt never pads others), then runs one decode step: every sequence on the
shared router model in one forward pass, each row through its own adapter (routing.py), and
each sequence of an unbatchable adapter (prompt, P- and prefix tuning) on its own view. A
sequence leaves the batch the moment it ends; the next waiting one joins at the next step.

Each sequence keeps its own KV cache (transformers' DynamicCache). A mixed step stacks them,
left-padded to the longest, with an attention mask over the padding and each row's own
positions, and splits the grown cache back per sequence afterwards. Greedy replies are the
argmax of each row's own logits, so batching changes nothing but speed (up to the float
rounding of matmuls over more rows, which a greedy choice does not see in practice; the tests
compare replies token for token).

Why not transformers' continuous batching (`init_continuous_batching`): its manager flattens
all requests into one paged-attention sequence, switches the model's attention implementation,
and has no per-request place for an adapter, sampling settings or the decoder hooks prompt
methods use; a per-token adapter index would have to be reconstructed from its private batch
state. This loop is small, keeps the model as peftctl loads it, and gives every row its adapter.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from peftctl.arch.kv_cache import cache_keyword
from peftctl.serve.pool import ModelPool, Served
from peftctl.serve.replies import ReplyText, Sampling, next_token

log = logging.getLogger("peftctl.serve")


class Busy(Exception):
    """The queue is full: the request is refused now and may be retried."""


class Refused(ValueError):
    """A request the engine cannot run as asked (its prompt and max_tokens exceed the context)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class Finished:
    """The end of a reply: its whole text, why it ended, and the token counts."""

    text: str
    reason: str  # stop, length, cancelled, timeout, error
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Job:
    """One request's sequence. `listener` gets each streamable piece of text (a str) and, last,
    the `Finished`; it is called from the engine's thread."""

    id: str
    served: Served
    prompt: list[int]
    sampling: Sampling
    listener: Callable[[Any], None]
    reply: ReplyText
    started: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None  # seconds from submission to the first token chosen
    cache: Any = None
    position: int = 0  # tokens in the sequence so far (the next token's position)
    pending_token: int | None = None  # chosen, not yet fed to the model
    generator: torch.Generator | None = None
    cancelled: bool = False
    done: bool = False

    def cancel(self) -> None:
        """End the reply at the next step (a client gone, Ctrl-C)."""
        self.cancelled = True


class Engine:
    """Takes requests from any thread (`submit`), answers them on its own thread."""

    def __init__(self, pool: ModelPool, max_batch: int = 16, max_queue: int = 64):
        self.pool = pool
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []
        self.wake = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None
        self.ids = itertools.count(1)
        config = pool.base.config
        self.context = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
        eos = pool.base.generation_config.eos_token_id if pool.base.generation_config else None
        self.eos = {pool.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        # Stacking caches needs plain per-layer caches (no sliding windows or recurrent state).
        self.stackable = all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)
        self.keeps_last = "logits_to_keep" in inspect.signature(pool.base.forward).parameters
        self.cache_keyword = cache_keyword(pool.base)  # `cache` from transformers 5.24, `past_key_values` before

    # --- the requests' side ------------------------------------------------------------------

    def submit(self, name: str, prompt: list[int], sampling: Sampling, listener: Callable[[Any], None],
               request_id: str | None = None) -> Job:
        if not prompt:
            raise Refused("the prompt has no tokens", "prompt")
        if self.context and len(prompt) + sampling.max_tokens > self.context:
            raise Refused(f"the prompt ({len(prompt)} tokens) and max_tokens ({sampling.max_tokens}) exceed the "
                          f"model's context of {self.context} tokens", "max_tokens")
        with self.wake:  # looked up under the lock that `unload` takes: never a job for an unloaded adapter
            served = self.pool.get(name)
            if served is None:
                raise KeyError(name)
            if len(self.waiting) >= self.max_queue or not self.running:
                raise Busy()
            job = Job(request_id or f"req-{next(self.ids)}", served, list(prompt), sampling, listener,
                      ReplyText(self.pool.tokenizer, sampling.stop))
            self.waiting.append(job)
            self.wake.notify()
        return job

    def load(self) -> int:
        """Requests waiting and running: what a client sees as the queue."""
        return len(self.waiting) + len(self.active)

    def unload(self, name: str) -> bool:
        """Stop serving adapter `name`; False (nothing changed) while requests for it are waiting or running."""
        with self.wake:
            if any(job.served.name == name for job in [*self.waiting, *self.active]):
                return False
            self.pool.remove(name)
            return True

    # --- the thread -----------------------------------------------------------------------------

    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._run, name="peftctl-engine", daemon=True)
        self.thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the thread: with `drain`, after every accepted request is answered."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while drain and self.load() and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.01)
        with self.wake:
            self.running = False
            for job in [*self.waiting, *self.active]:
                job.cancel()
            self.wake.notify()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self.wake:
                while self.running and not self.waiting and not self.active:
                    self.wake.wait()
                if not self.running and not self.active and not self.waiting:
                    return
                joining = []
                while self.running and self.waiting and len(self.active) + len(joining) < self.max_batch:
                    joining.append(self.waiting.popleft())
                self.active += joining
            with torch.inference_mode(), self.pool.lock:
                for job in joining:
                    self._guarded([job], self._prefill)
                self._decode_step()
            with self.wake:
                self.active = [job for job in self.active if not job.done]
                if not self.running:
                    for job in self.waiting:
                        self._finish(job, "cancelled")
                    self.waiting.clear()

    def _guarded(self, jobs: list[Job], step: Callable[[list[Job]], None]) -> None:
        """Run a step; a failure ends its jobs (reason "error", logged with their ids), not the engine."""
        try:
            step(jobs)
        except Exception:
            log.exception("generation failed for request(s) %s", ", ".join(job.id for job in jobs))
            for job in jobs:
                self._finish(job, "error")

    def _decode_step(self) -> None:
        live = [job for job in self.active if not job.done and not self._ended(job)]
        batched = [job for job in live if job.served.batched]
        groups = [batched] if batched and self.stackable else [[job] for job in batched]
        groups += [[job] for job in live if not job.served.batched]
        for group in groups:
            self._guarded(group, self._decode)

    # --- the model ------------------------------------------------------------------------------

    def _forward(self, jobs: list[Job], cache: Any, **inputs: Any) -> tuple[torch.Tensor, Any]:
        """The rows' last logits and the grown cache."""
        model = jobs[0].served.model
        route = self.pool.slots.rows([job.served.slot for job in jobs], model.device) \
            if jobs[0].served.batched else nullcontext()
        if self.keeps_last:
            inputs["logits_to_keep"] = 1
        inputs[self.cache_keyword] = cache
        with route:
            out = model(**inputs, use_cache=True)
        grown = out.get(self.cache_keyword)  # the output names the cache as the forward does
        return out.logits[:, -1], grown

    def _prefill(self, jobs: list[Job]) -> None:
        (job,) = jobs
        job.generator = job.sampling.generator(job.served.model.device)
        ids = torch.tensor([job.prompt], device=job.served.model.device)
        logits, job.cache = self._forward(jobs, None, input_ids=ids, attention_mask=torch.ones_like(ids))
        job.position = len(job.prompt)
        self._choose(job, logits[0])

    def _decode(self, jobs: list[Job]) -> None:
        device = jobs[0].served.model.device
        ids = torch.tensor([[job.pending_token] for job in jobs], device=device)
        positions = torch.tensor([[job.position] for job in jobs], device=device)
        if len(jobs) == 1:  # its own cache, grown in place; the mask counts its real tokens only
            (job,) = jobs
            logits, _ = self._forward(jobs, job.cache, input_ids=ids, position_ids=positions,
                                      attention_mask=torch.ones(1, job.position + 1, dtype=torch.long, device=device))
        else:
            lengths = [job.cache.get_seq_length() for job in jobs]
            width = max(lengths)
            mask = torch.tensor([[0] * (width - n) + [1] * (n + 1) for n in lengths], device=device)
            stacked = DynamicCache(config=jobs[0].served.model.config)
            for i in range(len(jobs[0].cache.layers)):
                keys = [job.cache.layers[i].keys for job in jobs]
                values = [job.cache.layers[i].values for job in jobs]
                stacked.update(_left_pad(keys, width), _left_pad(values, width), i)
            logits, grown = self._forward(jobs, stacked, input_ids=ids, position_ids=positions, attention_mask=mask)
            for row, (job, n) in enumerate(zip(jobs, lengths)):
                for layer, mine in zip(grown.layers, job.cache.layers):
                    mine.keys = layer.keys[row:row + 1, :, width - n:]
                    mine.values = layer.values[row:row + 1, :, width - n:]
        for job, row in zip(jobs, logits):
            job.position += 1
            self._choose(job, row)

    def _choose(self, job: Job, logits: torch.Tensor) -> None:
        token = next_token(logits, job.sampling, job.generator)
        if job.first_token_s is None:
            job.first_token_s = time.monotonic() - job.started
        if token in self.eos and not job.sampling.ignore_eos:
            self._finish(job, "stop")
            return
        piece = job.reply.add(token)
        if piece:
            job.listener(piece)
        if job.reply.stopped:
            self._finish(job, "stop")
        elif len(job.reply.tokens) >= job.sampling.max_tokens:
            self._finish(job, "length")
        else:
            job.pending_token = token

    def _ended(self, job: Job) -> bool:
        """Whether a job ends before its next step: cancelled, or past its time."""
        timeout = job.sampling.timeout_s
        if job.cancelled or not self.running:
            self._finish(job, "cancelled")
        elif timeout is not None and time.monotonic() - job.started > timeout:
            self._finish(job, "timeout")
        return job.done

    def _finish(self, job: Job, reason: str) -> None:
        if job.done:
            return
        job.done, job.cache = True, None
        rest = job.reply.flush()
        if rest:
            job.listener(rest)
        job.listener(Finished(job.reply.text, reason, len(job.prompt), len(job.reply.tokens)))


def _left_pad(tensors: list[torch.Tensor], width: int) -> torch.Tensor:
    """[1, heads, n_i, dim] tensors as one [batch, heads, width, dim], each right-aligned."""
    first = tensors[0]
    out = first.new_zeros((len(tensors), first.shape[1], width, first.shape[3]))
    for row, tensor in enumerate(tensors):
        out[row, :, width - tensor.shape[2]:] = tensor[0]
    return out
