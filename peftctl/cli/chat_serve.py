"""`peftctl chat` and `peftctl serve`: their options, the terminal and stdin, and what is printed.
The conversation is serve/chat.py's, the server serve/server.py's."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from peftctl.cli.boundary import quiet_libraries, user_errors
from peftctl.cli.parsing import TrustOpt

TemperatureOpt = Annotated[float, typer.Option("--temperature", min=0, help="0: greedy, the same reply every time.")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", min=1, help="At most this many tokens per reply.")]


def chat(
    targets: Annotated[list[Path], typer.Argument(
        help="An adapter folder (its base is loaded, as `peftctl eval` finds it) or a base model; then more "
             "adapters of the same base. /adapter NAME switches between them.", metavar="ADAPTER_OR_MODEL",
        show_default=False)],
    temperature: TemperatureOpt = 0.0,
    max_tokens: MaxTokensOpt = 256,
    system: Annotated[Optional[str], typer.Option("--system", help="A system message to start with.")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Input not a terminal: one JSON object per reply.")] = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Talk to a base model and its adapters in the model's chat template, tokens streamed as they come.
    With input from a pipe or file: one prompt per line in, one reply per line out."""
    from peftctl.serve.chat import open_chat
    from peftctl.serve.replies import Sampling

    quiet_libraries()
    with user_errors():
        session = open_chat(targets, Sampling(max_tokens=max_tokens, temperature=temperature), trust_remote_code)
    session.system = system
    try:
        if sys.stdin.isatty():
            print(f"chatting with {session.current} (/help: the commands; Ctrl-C stops a reply, Ctrl-D leaves)",
                  file=sys.stderr)
            _terminal(session)
        else:
            _lines(session, json_)
    finally:
        session.engine.stop(drain=False)


# What str.splitlines and most readers split on: written as escapes, a reply stays one line.
LINE_BREAKS = "\\\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def one_line(text: str) -> str:
    """`text` with its backslashes and line breaks escaped (\\n, \\r, \\x0b, ...)."""
    return "".join(ch.encode("unicode_escape").decode() if ch in LINE_BREAKS else ch for ch in text)


def _lines(session, json_: bool) -> None:
    """One prompt per input line, one reply per output line (a reply's line breaks escaped: \\n)."""
    def show(name: str, finished) -> None:
        if json_:
            # ASCII: JSON leaves U+2028 and U+0085 raw, which some readers take for line breaks.
            print(json.dumps({"model": name, "reply": finished.text, "finish_reason": finished.reason}), flush=True)
        else:
            print(one_line(finished.text), flush=True)

    for line in sys.stdin:
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            said = session.command(line)
            if said.text:
                print(said.text, file=sys.stderr)
            for name, finished in said.replies:
                show(name, finished)
        else:
            show(session.current, session.say(line))


def _terminal(session) -> None:
    """A conversation on the terminal: replies streamed; Ctrl-C stops a reply, Ctrl-D (or Ctrl-C at
    the prompt) leaves."""
    while True:
        try:
            line = input(f"{session.current}> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if not line.strip():
            continue
        if line.startswith("/"):
            said = session.command(line)
            if said.text:
                print(said.text)
            for name, finished in said.replies:
                print(f"[{name}] {finished.text}")
            continue
        finished = session.say(line, lambda piece: print(piece, end="", flush=True))
        print({"cancelled": " [stopped]", "context": "[the conversation fills the model's context: /reset]"}
              .get(finished.reason, ""))


def serve(
    base: Annotated[str, typer.Argument(help="The base model: a Hub id, a folder, a .gguf file or a builtin; or an "
                                        "adapter folder, whose base is served.", metavar="BASE", show_default=False)],
    adapter: Annotated[Optional[list[str]], typer.Option("--adapter", metavar="NAME=PATH",
                                                         help="An adapter to serve as model NAME (repeatable).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; anything but loopback needs an API key.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="PEFTCTL_API_KEY", show_envvar=True,
                                                   help="Require 'Authorization: Bearer KEY' on every request.")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Sequences decoded together.")] = 16,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Requests waiting beyond the batch; "
                                           "more are answered 429.")] = 64,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="The most a request may ask for.")] = 2048,
    max_body: Annotated[int, typer.Option("--max-body-bytes", min=1024, help="Larger request bodies get 413.")]
    = 1_000_000,
    timeout: Annotated[float, typer.Option("--timeout", min=1, help="Seconds a reply may run.")] = 600.0,
    dtype: Annotated[str, typer.Option("--dtype", help="Precision of the base: auto, float32, bfloat16, float16.")]
    = "auto",
    trust_remote_code: TrustOpt = False,
) -> None:
    """Serve the base model and adapters over an OpenAI-compatible HTTP API (/v1/chat/completions,
    /v1/completions, /v1/models), each request's `model` picking the adapter; rows of different
    adapters are batched together."""
    import importlib.util

    from peftctl.core.errors import UserError

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    with user_errors():
        if missing:
            raise UserError(f"peftctl serve needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                            "not installed", fix="pip install -c constraints.txt 'peftctl[serve]'")
    from peftctl.serve.http_app import Limits
    from peftctl.serve.server import check_exposure, parse_adapters, serve as run_server, start_engine

    quiet_libraries()
    with user_errors():
        key = check_exposure(host, api_key)
        engine = start_engine(base, parse_adapters(adapter or []), dtype, trust_remote_code, max_batch, max_queue)
    run_server(engine, host, port, key, Limits(max_body_bytes=max_body, max_tokens=max_tokens, timeout_s=timeout))
