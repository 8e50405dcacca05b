"""The OpenAI API's shapes, as much of them as `peftctl serve` answers: the request bodies (pydantic,
so the server's OpenAPI schema documents them), the response objects, and the error object.

transformers' own server (`transformers serve`) types its requests with the `openai` package's
TypedDicts; that package is a test dependency here, not a runtime one, and TypedDicts do not
validate, so the few fields served are declared here, unknown ones ignored as OpenAI's clients
expect a server to.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from peftctl.serve.engine import Finished
from peftctl.serve.replies import Sampling

FINISH_REASONS = {"stop": "stop", "length": "length", "timeout": "length", "cancelled": "stop", "error": "stop"}


class Common(BaseModel):
    """What both endpoints take; other OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(max_length=256, description="The base model's name, or an adapter's (GET /v1/models).")
    max_tokens: int | None = Field(None, ge=1, description="At most this many tokens in the reply.")
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy (the same reply every time).")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; the reply ends before the first.")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=1, description="One reply per request.")
    ignore_eos: bool = Field(False, description="vLLM's extension: run on to max_tokens past the end-of-sequence token.")

    def sampling(self, default_max: int, timeout_s: float | None) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Sampling(max_tokens=self.max_tokens or default_max, temperature=self.temperature, top_p=self.top_p,
                        seed=self.seed, stop=tuple(stop), timeout_s=timeout_s, ignore_eos=self.ignore_eos)

    def wants_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = Field(None, description="Text, or text parts ({type: text, text}).")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1)

    def chat(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(Common):
    prompt: str | list[str] = Field(description="One prompt (a list holding one string is taken too).")
    max_tokens: int | None = Field(16, ge=1)


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=128, description="The name requests will give as `model`.")
    path: str = Field(max_length=4096, description="The adapter folder on the server's machine.")


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(finished: Finished) -> dict[str, int]:
    return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens}


def chat_response(request_id: str, model: str, finished: Finished) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": finished.text},
                         "finish_reason": FINISH_REASONS[finished.reason], "logprobs": None}],
            "usage": usage(finished)}


def completion_response(request_id: str, model: str, finished: Finished) -> dict[str, Any]:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": finished.text, "finish_reason": FINISH_REASONS[finished.reason],
                         "logprobs": None}],
            "usage": usage(finished)}


def chunk(request_id: str, model: str, chat: bool, text: str | None = None, finished: Finished | None = None,
          first: bool = False, with_usage: bool = False) -> dict[str, Any]:
    """One server-sent event's object: a piece of text, or the last one with the finish reason."""
    reason = FINISH_REASONS[finished.reason] if finished else None
    if chat:
        delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
    body = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}
    if with_usage:
        body["usage"] = usage(finished) if finished else None
    return body


def model_entry(name: str, parent: str | None, method: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "peftctl", "parent": parent, "method": method}
