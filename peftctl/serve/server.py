"""Running the API under uvicorn, safe by default: loopback unless an API key guards the server.

uvicorn answers SIGTERM and SIGINT by closing its socket (no new requests) and waiting for the
connections in flight to finish (up to Limits.drain_s); the app's shutdown then stops the engine
once every accepted reply is done.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

from peftctl.core.errors import UserError
from peftctl.serve.engine import Engine
from peftctl.serve.http_app import Limits, create_app
from peftctl.serve.pool import ModelPool, spec_of

API_KEY_VARIABLE = "PEFTCTL_API_KEY"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None) -> str | None:
    """The API key to require (the option's, else the environment's); refuse a server reachable
    from other machines without one."""
    api_key = api_key or os.environ.get(API_KEY_VARIABLE) or None
    if not is_loopback(host) and not api_key:
        raise UserError(f"--host {host} would let other machines use the server, and no API key guards it",
                        where="--host", expected="127.0.0.1 (this machine only), or an API key",
                        fix=f"pass --api-key KEY or set {API_KEY_VARIABLE}; clients then send 'Authorization: Bearer KEY'")
    return api_key


def parse_adapters(items: list[str]) -> list[tuple[str, Path]]:
    """--adapter NAME=PATH options as (name, folder) pairs."""
    pairs = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"'{item}' is not NAME=PATH", where="--adapter",
                            fix="pass --adapter NAME=PATH, e.g. --adapter support=runs/support/adapter")
        pairs.append((name, Path(path)))
    return pairs


def start_engine(base: str, adapters: list[tuple[str, Path]], dtype: str = "auto", trust_remote_code: bool = False,
                 max_batch: int = 16, max_queue: int = 64) -> Engine:
    """Load the base once and every adapter on it; a refused adapter stops the start (exit 2)."""
    spec, _ = spec_of(base, dtype, trust_remote_code)
    pool = ModelPool(spec, base)
    for name, folder in adapters:
        pool.add(name, folder)
    engine = Engine(pool, max_batch=max_batch, max_queue=max_queue)
    engine.start()
    return engine


def serve(engine: Engine, host: str, port: int, api_key: str | None, limits: Limits) -> None:
    """Serve until SIGTERM or Ctrl-C (blocks)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(engine, api_key, limits)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=int(limits.drain_s),
                            limit_concurrency=engine.max_queue + engine.max_batch + 16)
    uvicorn.Server(config).run()
