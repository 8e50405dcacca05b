"""The one error type a user ever sees.

Every problem caused by the user's input (a recipe, a data file, a model path, an adapter
folder) is raised as `UserError`: it says where the problem is (file, key path or row), what was
expected, and how to fix it. The CLI prints it without a traceback and exits with code 2.
Anything else is a bug in peftctl and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    def __init__(
        self,
        problem: str,
        *,
        file: str | Path | None = None,
        where: str | None = None,
        expected: str | None = None,
        fix: str | None = None,
    ):
        self.problem = problem
        self.file = str(file) if file is not None else None
        self.where = where
        self.expected = expected
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        location = ": ".join(part for part in (self.file, self.where) if part)
        lines = [f"{location}: {self.problem}" if location else self.problem]
        if self.expected:
            lines.append(f"  expected: {self.expected}")
        if self.fix:
            lines.append(f"  fix: {self.fix}")
        return "\n".join(lines)


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A 'did you mean' hint for a misspelt key or name, or None when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None


@contextmanager
def blame(file: str | Path | None) -> Iterator[None]:
    """Attribute UserErrors raised inside to `file` (the recipe) when they name no file themselves."""
    try:
        yield
    except UserError as err:
        if err.file is None and file is not None:
            err.file = str(file)
            err.args = (err.render(),)
        raise
