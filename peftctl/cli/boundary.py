"""What the command line does around every command: user mistakes to exit 2, the libraries'
noise off, a distributed process group ended before the process exits."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from peftctl.cli.console import print_error
from peftctl.core import jsontext
from peftctl.core.errors import UserError


@contextmanager
def user_errors(json_: bool = False) -> Iterator[None]:
    """A UserError ends the command with exit 2: its message on stderr, or with --json one JSON
    object on stdout ({"error", "file", "key", "line", "expected", "fix", "also"}) for programs."""
    try:
        yield
    except UserError as err:
        if json_:
            print(jsontext.dumps(err.as_dict()))
        else:
            print_error(err)
        raise typer.Exit(2) from None


def quiet_libraries() -> None:
    """Our own progress bar and tables are the output; silence the libraries' bars and advice."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def leave_process_group() -> None:
    """End this process's part in an `accelerate launch` group, if it joined one: a process that
    exits with its gloo/NCCL group still up can abort ("terminate called without an active
    exception") and fail the whole launch."""
    torch = sys.modules.get("torch")  # not imported: no group was formed (a recipe error, say)
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
