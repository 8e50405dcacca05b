"""What a request asks of its reply (`Sampling`), how each next token is chosen, and the reply's
text as it grows: streamed in pieces that never split a character or show part of a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Sampling:
    """A reply's settings: temperature 0 is greedy (the argmax; no random draw at all)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    timeout_s: float | None = None  # the reply ends (finish reason "timeout") after this many seconds
    ignore_eos: bool = False  # run on to max_tokens past EOS (vLLM's option; for benchmarks)

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The request's own random stream: seeded, the same draw whatever else is in the batch."""
        if self.temperature <= 0:
            return None
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token from one row's logits [vocab]: the argmax, or a draw at the temperature from
    the smallest set of tokens whose probability reaches top_p (nucleus sampling)."""
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        ordered, order = probs.sort(descending=True)
        keep = ordered.cumsum(0) - ordered < sampling.top_p  # the top token is always kept
        probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class ReplyText:
    """A reply's text from its tokens so far, and the part not yet streamed."""

    tokenizer: object
    stop: tuple[str, ...]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters already streamed
    stopped: bool = False  # a stop string was reached; the text ends before it

    def add(self, token: int) -> str:
        """Take one more token; return the text that can be streamed now (maybe empty)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop if s) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self.flush()
        self.text = text
        held = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        ready = len(text) - held
        if text[:ready].endswith("\ufffd"):  # a character whose bytes are not all generated yet
            return ""
        piece, self.sent = text[self.sent:ready], max(self.sent, ready)
        return piece

    def flush(self) -> str:
        """The rest of the text, at the reply's end."""
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece


def text_prompt(tokenizer, text: str) -> list[int]:
    """The token ids of a raw completion prompt (the tokenizer's own special tokens, such as BOS, added)."""
    return tokenizer(text)["input_ids"]
