"""The one error type a user ever sees.

Every problem caused by the user's input (a recipe, a data file, a model path, an adapter
folder) is raised as `UserError`: it says where the problem is (file, key path or row), what was
expected, and how to fix it. The CLI prints it without a traceback and exits with code 2.
Anything else is a bug in peftctl and keeps its traceback.

Rendered, every error has the same shape, so people and scripts can read it the same way:

    FILE: WHERE: PROBLEM
      expected: WHAT WOULD BE VALID
      fix: WHAT TO DO
      also: ANOTHER PROBLEM FOUND IN THE SAME PASS
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator
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
        also: list[str] | None = None,
    ):
        self.problem = problem
        self.file = str(file) if file is not None else None
        self.where = where
        self.expected = expected
        self.fix = fix
        self.also = list(also or [])
        super().__init__(self.render())

    def render(self) -> str:
        location = ": ".join(part for part in (self.file, self.where) if part)
        lines = [f"{location}: {self.problem}" if location else self.problem]
        if self.expected:
            lines.append(f"  expected: {self.expected}")
        if self.fix:
            lines.append(f"  fix: {self.fix}")
        lines += [f"  also: {other}" for other in self.also]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        """The message for programs (`--json`): the key path and line apart, so nothing is parsed."""
        key, line = self.where, None
        if self.where and (found := _KEY_LINE.fullmatch(self.where)):
            key, line = found["key"], int(found["line"]) if found["line"] else None
        elif self.where and (found := _LINE_ONLY.match(self.where)):
            key, line = None, int(found["line"])
        return {"error": self.problem, "file": self.file, "key": key, "line": line,
                "expected": self.expected, "fix": self.fix, "also": self.also}

    def _changed(self) -> None:
        self.args = (self.render(),)


_KEY_LINE = re.compile(r"(?P<key>.+?) \((?:line (?P<line>\d+)|from .*)\)")
_LINE_ONLY = re.compile(r"line (?P<line>\d+)")


# Names people bring from peft and transformers for keys that peftctl spells differently; the
# hint only uses an entry when its target is a valid key where the mistake was made.
KNOWN_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "lr_scheduler_type": "scheduler",
    "max_length": "max_seq_len",
    "max_seq_length": "max_seq_len",
    "output_dir": "dir",
    "model_name_or_path": "name_or_path",
    "torch_dtype": "dtype",
}


def one_line(err: BaseException, limit: int = 300) -> str:
    """A library's error message on one line, cut to `limit` characters, to quote inside ours."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A 'did you mean' hint for a misspelt key or name, or None when nothing is close."""
    choices = list(choices)
    alias = KNOWN_ALIASES.get(word.lower())
    close = [alias] if alias in choices else difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close:
        # A method-prefixed spelling (peft's lora_alpha, ia3_...): the bare key is what we call it.
        close = [c for c in choices if word.endswith("_" + c)][:1]
    return f"did you mean '{close[0]}'?" if close else None


class ErrorGroup:
    """Independent checks run one after another, their errors reported together: fixing a recipe
    should not take one run per mistake. Each check's error is attributed like `blame` does."""

    def __init__(self, file: str | Path | None, locate: Callable[[str], str] | None = None):
        self.file, self.locate, self.found = file, locate, []

    @contextmanager
    def check(self) -> Iterator[None]:
        try:
            with blame(self.file, self.locate):
                yield
        except UserError as err:
            if all(err.render() != seen.render() for seen in self.found):
                self.found.append(err)

    def raise_if_any(self) -> None:
        if not self.found:
            return
        first, *others = self.found
        for other in others:  # one line each, as `also` lines are
            first.also.append(" ".join(other.render().split()))
        first._changed()
        raise first


@contextmanager
def blame(file: str | Path | None, locate: Callable[[str], str] | None = None) -> Iterator[None]:
    """Attribute UserErrors raised inside to `file` (the recipe) when they name no file themselves.

    `locate` turns the error's key path into one that says where in the recipe it is (its line,
    or the --set override it came from).
    """
    try:
        yield
    except UserError as err:
        if err.file is None and file is not None:
            err.file = str(file)
            if locate is not None and err.where:
                err.where = locate(err.where)
            err._changed()
        raise
