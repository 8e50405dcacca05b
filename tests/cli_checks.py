"""Running the CLI in-process as a user types it, and what a refusal must look like."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from peftctl.cli.commands import app


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_refused(result, *phrases: str) -> str:
    """Exit 2, one `error:` message holding every phrase, no traceback; returns the message."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    if result.stdout.lstrip().startswith("{"):  # --json: the error is one JSON object on stdout
        error = json.loads(result.stdout)
        assert error["error"], error
        message = " ".join(str(value) for value in error.values() if value)
        for phrase in phrases:
            assert phrase in message, message
        return message
    # (Training's progress bar may come first in the captured output.)
    assert sum(line.startswith("error: ") for line in result.output.splitlines()) == 1, result.output
    message = " ".join(result.output.split())
    for phrase in phrases:
        assert phrase in message, message
    return message


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: equal before and after means nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
