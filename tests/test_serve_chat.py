"""`peftctl chat` with input from a pipe: one reply per line, the slash commands, the refusals."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli_checks import assert_refused, invoke
from peftctl.cli.commands import app
from serve_helpers import noisy_adapter


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-chat")
    return [noisy_adapter(root / "first" / "adapter", "lora", 1), noisy_adapter(root / "second", "ia3", 2)]


def chat_lines(folders, text, *options):
    result = CliRunner().invoke(app, ["chat", *map(str, folders), "--max-tokens", "8", *options], input=text)
    assert result.exit_code == 0, result.output
    return result


def test_one_reply_per_line_and_the_slash_commands(folders):
    script = ("Hi\n/compare\n/base\nHi\n/reset\n/system Be brief.\nHi\n/set temperature=0.9 seed=3 max_tokens=4\n"
              "Hi\n/set colour=red\n/adapter second\n/adapter nope\n/frobnicate\n")
    result = chat_lines(folders, script, "--json")
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    # Hi; /compare (base, first, second); /base Hi; Hi after /system; Hi sampled at 4 tokens.
    assert [r["model"] for r in replies] == ["first", "builtin:tiny-gpt2", "first", "second", "builtin:tiny-gpt2",
                                             "builtin:tiny-gpt2", "builtin:tiny-gpt2"]
    assert replies[0]["reply"] == replies[2]["reply"]  # /compare answers the last prompt again, greedy
    assert replies[1]["reply"] == replies[4]["reply"] != replies[0]["reply"]  # the base, before and after /base
    assert replies[-1]["finish_reason"] in ("stop", "length") and len(replies[-1]["reply"].encode()) <= 4 * 4
    for said in ("answering with the base model", "conversation forgotten", "system message set",
                 "temperature=0.9, seed=3, max_tokens=4", "cannot set 'colour=red'", "answering with second",
                 "no model named 'nope'", "unknown command /frobnicate"):
        assert said in result.stderr, result.stderr


def test_plain_lines_keep_one_reply_per_line(folders):
    result = chat_lines(folders, "Hi\n\nHello\n")
    assert len(result.stdout.splitlines()) == 2


def test_refusals(folders, tmp_path):
    assert_refused(invoke("chat", tmp_path / "missing"), "is not a model")
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "org/other"}))
    assert_refused(invoke("chat", folders[0], other), "another base model")


def test_a_conversation_longer_than_the_context_gets_no_reply_and_says_so(folders):
    from peftctl.serve.chat import open_chat
    from peftctl.serve.replies import Sampling

    session = open_chat([folders[0]], Sampling(max_tokens=2000))
    try:
        session.history = [{"role": "user", "content": "x" * 980}]  # ~1000 of the 1024 tokens' context
        reply = session.say("hi")  # max_tokens cut to the room the context leaves
        assert reply.reason == "length" and reply.prompt_tokens + reply.completion_tokens == 1024
        session.history = [{"role": "user", "content": "x" * 2000}]
        assert session.say("and?").reason == "context"
        assert session.command("/reset").text == "conversation forgotten"
        session.command("/set max_tokens=4")
        assert session.say("hi").completion_tokens == 4
    finally:
        session.engine.stop(drain=False)
