"""`peftctl serve` through real clients: the official `openai` package and httpx against the
server on a free loopback port (uvicorn in a thread; a subprocess for SIGTERM), tiny GPT-2
adapters. Replies are greedy, so they can be compared token for token.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from typer.testing import CliRunner

from cli_checks import assert_refused, invoke
from peftctl.cli.commands import app
from peftctl.serve.http_app import Limits, create_app
from peftctl.serve.server import start_engine
from serve_helpers import noisy_adapter, with_config

KEY = "test-key"
BASE = "builtin:tiny-gpt2"
ADAPTERS = ["lora", "dora", "ia3"]
GREEDY = {"temperature": 0, "max_tokens": 10}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-http")
    return {label: noisy_adapter(root / label, label, seed) for seed, label in enumerate([*ADAPTERS, "prefix_tuning"], 1)}


@contextmanager
def running(engine, api_key=KEY, limits=Limits(max_body_bytes=20_000, max_tokens=64)):
    """The app on a free loopback port, uvicorn in a thread; its URL."""
    port = free_port()
    runner = uvicorn.Server(uvicorn.Config(create_app(engine, api_key, limits), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    while not runner.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        runner.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(folders):
    engine = start_engine(BASE, [(label, folders[label]) for label in ADAPTERS], max_batch=8, max_queue=64)
    with running(engine) as url:
        yield url, engine


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def chat(client, model, text, **options):
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                           **{**GREEDY, **options})
    return reply.choices[0].message.content


def test_models_chat_and_completions_streamed_or_not(client):
    assert [m.id for m in client.models.list().data] == [BASE, *ADAPTERS]
    reply = client.chat.completions.create(model="lora", messages=[{"role": "user", "content": "hi"}], **GREEDY)
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 10 and reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    pieces = client.chat.completions.create(model="lora", messages=[{"role": "user", "content": "hi"}], stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    chunks = list(pieces)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    text = client.completions.create(model="dora", prompt="Once upon", **GREEDY)
    streamed = client.completions.create(model="dora", prompt="Once upon", stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text


def test_the_model_field_picks_the_adapter(client):
    replies = {name: chat(client, name, "Which adapter are you?") for name in [BASE, *ADAPTERS]}
    assert len(set(replies.values())) >= 3, replies


def test_concurrent_requests_over_adapters_equal_each_alone(client):
    requests = [([BASE, *ADAPTERS][i % 4], f"request {i} {'x' * (i % 7)}") for i in range(32)]
    alone = [chat(client, model, text) for model, text in requests]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda request: chat(client, *request), requests))
    assert together == alone


def test_chat_line_mode_answers_as_the_server(client, folders):
    result = CliRunner().invoke(app, ["chat", str(folders["lora"]), str(folders["dora"]), "--max-tokens", "10",
                                      "--json"], input="Hello there\n/adapter dora\nAnd you?\n")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["model"] for line in lines] == ["lora", "dora"]
    assert lines[0]["reply"] == chat(client, "lora", "Hello there")
    # The history goes with every prompt: dora answers the conversation so far.
    history = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": lines[0]["reply"]},
               {"role": "user", "content": "And you?"}]
    reply = client.chat.completions.create(model="dora", messages=history, **GREEDY)
    assert lines[1]["reply"] == reply.choices[0].message.content


def test_errors_are_openai_error_objects(client, server):
    url = server[0]
    with pytest.raises(openai.NotFoundError) as found:
        chat(client, "no-such-adapter", "hi")
    assert found.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        chat(openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0), "lora", "hi")
    with pytest.raises(openai.BadRequestError) as capped:
        chat(client, "lora", "hi", max_tokens=10_000)
    assert capped.value.body["param"] == "max_tokens"
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body, status in ((b"{not json", 400), (b'{"model": "lora"}', 400), (b"[1, 2]", 400),
                         (json.dumps({"model": "lora", "prompt": "x" * 30_000}).encode(), 413)):
        response = httpx.post(url + "/v1/completions", content=body, headers=auth)
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(url + "/health").status_code == 401
    assert httpx.get(url + "/nowhere", headers=auth).json()["error"]["code"] == "not_found"


def test_adapters_load_and_unload_at_runtime(client, server, folders, tmp_path):
    url, engine = server
    auth = {"Authorization": f"Bearer {KEY}"}
    loaded = httpx.post(url + "/v1/adapters", json={"name": "prefix", "path": str(folders["prefix_tuning"])}, headers=auth)
    assert loaded.status_code == 201 and loaded.json()["batched"] is False
    assert chat(client, "prefix", "hi") == chat(client, "prefix", "hi")
    other = with_config(folders["lora"], tmp_path / "other-base", base_model_name_or_path="openai-community/gpt2")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{")
    for name, path, fragment in (("other", other, "another base model"), ("broken", broken, "not valid"),
                                 ("lora", folders["lora"], "already served")):
        refused = httpx.post(url + "/v1/adapters", json={"name": name, "path": str(path)}, headers=auth)
        assert refused.status_code in (400, 409) and fragment in refused.json()["error"]["message"], refused.text
    assert httpx.delete(url + "/v1/adapters/prefix", headers=auth).status_code == 200
    with pytest.raises(openai.NotFoundError):
        chat(client, "prefix", "hi")
    assert httpx.delete(url + f"/v1/adapters/{BASE}", headers=auth).status_code == 400
    assert chat(client, "lora", "still here?")


def test_a_client_gone_mid_stream_cancels_its_generation(server, client):
    url, engine = server
    body = {"model": "lora", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 60,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        next(response.iter_lines())
    deadline = time.monotonic() + 10
    while engine.load() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.load() == 0
    assert chat(client, "lora", "hi")


def test_a_full_queue_answers_429_with_retry_after(folders):
    engine = start_engine(BASE, [], max_batch=1, max_queue=1)
    engine.stop(drain=False)
    engine.running = True  # accepting, with no thread taking requests: the queue fills
    app = create_app(engine)
    from fastapi.testclient import TestClient

    with TestClient(app) as http:
        engine.submit(BASE, [1, 2], engine_sampling(), lambda event: None)
        response = http.post("/v1/completions", json={"model": BASE, "prompt": "hi"})
        assert response.status_code == 429 and response.headers["Retry-After"] == "1"
        assert response.json()["error"]["type"] == "rate_limit_error"
        engine.waiting.clear()  # nothing left to drain when the app shuts down


def engine_sampling():
    from peftctl.serve.replies import Sampling

    return Sampling(max_tokens=4)


def test_exposed_host_without_key_is_refused(monkeypatch):
    monkeypatch.delenv("PEFTCTL_API_KEY", raising=False)
    assert_refused(invoke("serve", BASE, "--host", "0.0.0.0"), "--host", "API key")
    assert_refused(invoke("serve", BASE, "--adapter", "nameonly"), "NAME=PATH")
    assert_refused(invoke("serve", BASE, "--dtype", "float64"), "--dtype", "float32")


def test_sigterm_finishes_the_replies_in_flight_then_exits(folders):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    process = subprocess.Popen([sys.executable, "-m", "peftctl", "serve", BASE, "--adapter", f"lora={folders['lora']}",
                                "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        # ignore_eos: the reply is long whatever the tiny adapter says, so SIGTERM comes mid-reply.
        body = {"model": "lora", "prompt": "count", "max_tokens": 200, "temperature": 0, "stream": True,
                "ignore_eos": True}
        lines = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line and not lines:
                    process.send_signal(signal.SIGTERM)
                lines.append(line)
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert lines[-2:] == ["data: [DONE]", ""] or "data: [DONE]" in lines
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        # uvicorn ends by re-raising the signal once it has shut down gracefully.
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        process.kill()


def test_a_flood_past_the_queue_gets_replies_or_429s_and_leaves_nothing_behind(folders):
    engine = start_engine(BASE, [("lora", folders["lora"])], max_batch=2, max_queue=4)
    with running(engine, None) as url:
        def send(i):
            body = {"model": ["lora", BASE][i % 2], "prompt": f"flood {i}", "max_tokens": 60, "temperature": 0,
                    "ignore_eos": True}
            return httpx.post(url + "/v1/completions", json=body, timeout=60)

        with ThreadPoolExecutor(12) as pool:  # twice the batch and the queue together
            answers = list(pool.map(send, range(12)))
        assert {a.status_code for a in answers} <= {200, 429} and 429 in {a.status_code for a in answers}
        for answer in answers:
            if answer.status_code == 200:  # complete: every token it asked for
                assert answer.json()["usage"]["completion_tokens"] == 60
            else:
                assert answer.headers["Retry-After"] == "1" and answer.json()["error"]["code"] == "queue_full"
        assert engine.load() == 0 and not engine.active and not engine.waiting
        assert send(0).status_code == 200  # and it serves on
