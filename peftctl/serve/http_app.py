"""`peftctl serve`'s HTTP API: OpenAI's chat and completions endpoints over the engine, plus
adapters loaded and unloaded at runtime. FastAPI publishes its OpenAPI schema at /openapi.json.

Every refusal is an OpenAI error object ({"error": {message, type, param, code}}) with its
status: 400 for a malformed or invalid body, 401 without the API key, 404 for an unknown model,
409 for a name in use, 413 past the body limit, 429 when the queue is full (with Retry-After).
An unexpected failure is a 500 whose message holds only the request id; the traceback goes to the
log under that id, never to the client.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from peftctl.core.errors import UserError
from peftctl.data.tokenize import chat_prompt
from peftctl.serve.engine import Busy, Engine, Finished, Refused
from peftctl.serve.openai_api import (AdapterRequest, ChatRequest, CompletionRequest, chat_response, chunk,
                                      completion_response, error_body, model_entry)
from peftctl.serve.replies import text_prompt

log = logging.getLogger("peftctl.serve")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1_000_000
    max_tokens: int = 2048  # the most a request may ask for
    default_max_tokens: int = 256  # a chat request that names none
    timeout_s: float | None = 600.0  # a reply running longer ends (finish reason "length")
    drain_s: float = 60.0  # how long a stopping server finishes the replies in flight


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = \
            status, message, param, code, kind, headers


def refusal(status: int, message: str, **fields: Any) -> JSONResponse:
    headers = fields.pop("headers", None)
    return JSONResponse(error_body(message, **fields), status_code=status, headers=headers)


class Guard:
    """Before any route: the API key on every request, and the body size limit (by Content-Length,
    and by the bytes actually received, for a chunked body)."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        if self.api_key and not hmac.compare_digest(headers.get("authorization", "").encode(),
                                                    f"Bearer {self.api_key}".encode()):
            return await refusal(401, "a valid API key is needed: send 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")(scope, receive, send)
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_body:
            return await self._too_large(scope, receive, send)
        received, started = 0, False

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise _TooLarge()
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if not started:
                await self._too_large(scope, receive, send)

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        await refusal(413, f"the request body is over {self.max_body} bytes", code="request_too_large")(
            scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(engine: Engine, api_key: str | None = None, limits: Limits = Limits()) -> FastAPI:
    """The app over a started engine; it stops the engine (finishing what is in flight) on shutdown."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(engine.stop, True, limits.drain_s)

    app = FastAPI(title="peftctl serve", version="1", lifespan=lifespan,
                  description="OpenAI-compatible chat and completions with many adapters on one base model.")
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    pool = engine.pool

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return refusal(err.status, err.message, kind=err.kind, param=err.param, code=err.code, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            return refusal(400, "the request body is not valid JSON", code="invalid_json")
        return refusal(400, f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}",
                       param=".".join(loc) or None, code="invalid_value")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return refusal(err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def failure(request: Request, err: Exception) -> JSONResponse:
        request_id = uuid.uuid4().hex[:16]
        log.error("request %s failed", request_id, exc_info=err)
        return refusal(500, f"internal error (request {request_id}; the server's log has the details)",
                       kind="server_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "requests": engine.load()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_entry(s.name, None if s.folder is None else pool.base_name, s.method)
                                           for s in list(pool.served.values())]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        wanted = body.max_completion_tokens or body.max_tokens
        return await answer(request, body, wanted, lambda: chat_prompt(pool.tokenizer, body.chat()), chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "one prompt per request", param="prompt")
        return await answer(request, body, body.max_tokens, lambda: text_prompt(pool.tokenizer, prompts[0]), chat=False)

    async def answer(request: Request, body: Any, wanted: int | None, prompt: Any, chat: bool) -> Any:
        if wanted is not None and wanted > limits.max_tokens:
            raise ApiError(400, f"max_tokens is {wanted}; this server allows at most {limits.max_tokens}",
                           param="max_tokens")
        if pool.get(body.model) is None:
            raise ApiError(404, f"no model named '{body.model}' (GET /v1/models lists them)", param="model",
                           code="model_not_found")
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stops) > 4:
            raise ApiError(400, "at most 4 stop strings", param="stop")
        try:
            ids = prompt()
        except Exception as err:  # a chat template that refuses these roles, say
            raise ApiError(400, f"the messages do not fit the model's chat template: {err}", param="messages") from None
        request_id = request.headers.get("x-request-id", "")[:64] or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def listener(event: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                pass

        sampling = body.sampling(wanted or limits.default_max_tokens, limits.timeout_s)
        try:
            job = engine.submit(body.model, ids, sampling, listener, request_id)
        except Busy:
            raise ApiError(429, "the server is busy: too many requests are waiting; retry shortly",
                           kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        except KeyError:
            raise ApiError(404, f"no model named '{body.model}'", param="model", code="model_not_found") from None
        except Refused as err:
            raise ApiError(400, str(err), param=err.param) from None
        if body.stream:
            return StreamingResponse(stream(job, events, request_id, body, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        finished = await collect(request, job, events)
        if finished.reason == "error":
            raise ApiError(500, f"generation failed (request {request_id}; the server's log has the details)",
                           kind="server_error")
        make = chat_response if chat else completion_response
        return make(request_id, body.model, finished)

    async def collect(request: Request, job: Any, events: asyncio.Queue) -> Finished:
        """Wait for the reply; a client that disconnects meanwhile cancels it."""
        while True:
            try:
                event = await asyncio.wait_for(events.get(), 0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                continue
            if isinstance(event, Finished):
                return event

    async def stream(job: Any, events: asyncio.Queue, request_id: str, body: Any, chat: bool):
        usage = body.wants_usage()
        try:
            if chat:
                yield sse(chunk(request_id, body.model, True, "", first=True, with_usage=usage))
            while True:
                event = await events.get()
                if not isinstance(event, Finished):
                    yield sse(chunk(request_id, body.model, chat, event, with_usage=usage))
                    continue
                if event.reason == "error":
                    yield sse(error_body(f"generation failed (request {request_id})", "server_error"))
                else:
                    yield sse(chunk(request_id, body.model, chat, None if chat else "", finished=event))
                    if usage:
                        yield sse({**chunk(request_id, body.model, chat, finished=event, with_usage=True),
                                   "choices": []})
                yield "data: [DONE]\n\n"
                return
        finally:
            job.cancel()  # a client gone mid-stream: its sequence leaves the batch at the next step

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(body: AdapterRequest) -> dict[str, Any]:
        if pool.get(body.name) is not None:
            raise ApiError(409, f"'{body.name}' is already served; DELETE /v1/adapters/{body.name} first",
                           param="name", code="name_in_use")
        try:
            served = await asyncio.to_thread(pool.add, body.name, Path(body.path))
        except UserError as err:
            raise ApiError(400, " ".join(err.render().split()), param=err.where, code="adapter_refused") from None
        except Exception as err:  # a folder that is not what it claims; the server keeps serving
            log.warning("adapter %s at %s could not be loaded", body.name, body.path, exc_info=err)
            raise ApiError(400, f"the adapter could not be loaded: {type(err).__name__}: {err}"[:500], param="path",
                           code="adapter_refused") from None
        return {**model_entry(served.name, pool.base_name, served.method), "batched": served.batched,
                "unbatched_because": served.unbatched_because}

    @app.delete("/v1/adapters/{name:path}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        served = pool.get(name)
        if served is None:
            raise ApiError(404, f"no adapter named '{name}'", param="name", code="model_not_found")
        if served.folder is None:
            raise ApiError(400, "the base model cannot be unloaded", param="name")
        if not engine.unload(name):
            raise ApiError(409, f"'{name}' is answering requests; retry when they are done", param="name",
                           code="adapter_in_use", headers={"Retry-After": "1"})
        return {"id": name, "object": "model", "deleted": True}

    return app


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
