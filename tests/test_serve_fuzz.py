"""Property: whatever body a client posts to `peftctl serve`'s endpoints, the answer is a reply
or an OpenAI error object with a 4xx status: never a 5xx, never a traceback.

Bodies are valid requests with fields swapped for JSON values of any type and size (hypothesis,
derandomised, in-process through FastAPI's test client: no socket). A schemathesis run over the
published OpenAPI schema would do the same from the schema; it is not a dependency here.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftctl.serve.http_app import Limits, create_app
from peftctl.serve.server import start_engine
from serve_helpers import noisy_adapter

BASE = "builtin:tiny-gpt2"
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                    | st.text(max_size=40), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
VALID = {
    "/v1/chat/completions": {"model": "lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                             "temperature": 0, "stream": False, "stop": ["\n"], "seed": 1, "top_p": 0.9},
    "/v1/completions": {"model": BASE, "prompt": "hi", "max_tokens": 3, "temperature": 0.5, "stream": True},
    "/v1/adapters": {"name": "x", "path": "/nonexistent"},
}
FIELDS = sorted({key for body in VALID.values() for key in body} | {"messages", "n", "max_completion_tokens",
                                                                     "stream_options", "role", "content"})


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    folder = noisy_adapter(tmp_path_factory.mktemp("serve-fuzz") / "lora", "lora", 1)
    engine = start_engine(BASE, [("lora", folder)], max_batch=4, max_queue=8)
    with TestClient(create_app(engine, limits=Limits(max_tokens=8, max_body_bytes=20_000))) as client:
        yield client


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(endpoint=st.sampled_from(sorted(VALID)), changes=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=3),
       drop=st.lists(st.sampled_from(FIELDS), max_size=2), whole=st.none() | JSON)
def test_every_body_gets_a_reply_or_an_error_object(http, endpoint, changes, drop, whole):
    body = whole if whole is not None else {key: value for key, value in {**VALID[endpoint], **changes}.items()
                                            if key not in drop}
    response = http.post(endpoint, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in error["message"]
    elif endpoint == "/v1/adapters":
        pytest.fail(f"an adapter loaded from {body}")
