"""What people see: the training progress bar and the result tables (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from peftctl.errors import UserError

stdout = Console()
stderr = Console(stderr=True)


class RichReporter:
    """Training progress on stderr: step, loss, learning rate, tokens/s, elapsed and ETA."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold blue]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss [bold]{task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=stderr,
        )
        self.task = None

    def start(self, total_steps: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, loss="-", lr="-", tps="-")

    def step(self, step: int, metrics: dict[str, float]) -> None:
        self.progress.update(self.task, completed=step, loss=f"{metrics['loss']:.4f}",
                             lr=f"{metrics['lr']:.2e}", tps=f"{metrics['tokens_per_s']:,.0f}")

    def note(self, text: str) -> None:
        self.progress.console.print(text)

    def finish(self) -> None:
        self.progress.stop()


def print_error(err: UserError) -> None:
    # The message is printed as-is: never re-wrapped (it is grepped and copied into issues) and
    # never read as markup (recipe values such as [c_attn] would vanish as style tags).
    stderr.print(Text.assemble(("error:", "bold red"), " ", err.render()), highlight=False, soft_wrap=True)


def key_value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    # Wrap long values (paths) rather than cut them with an ellipsis: they are copied from here.
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    return table


def fmt_loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
