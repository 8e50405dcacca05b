"""The run report's charts, drawn by matplotlib without a display.

Only run_report.py imports this module, inside the functions that write a report, so `peftctl
--help` and training never pay for importing matplotlib. Figures are `matplotlib.figure.Figure`
objects on an Agg canvas, never pyplot: no global backend is chosen and no window can open, so
charts draw on machines without a display and inside other programs alike.

A curve is a pair of lists (steps, values); a chart without points says so in its plot area,
so an interrupted run or one that logged no grad norm still gets every chart. A classifier's
confusion matrix is a grid of counts (eval/task_metrics.py's `confusion`), not a curve.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

Curve = tuple[list[int], list[float]]

# matplotlib's default cycle, fixed here so a bake-off's runs keep their colours across charts.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
PNG_DPI = 120  # an 8 x 4.5 inch figure: a 960 x 540 PNG, legible at its own size


def _figure(width: float, height: float, **margins: float) -> Figure:
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)  # Agg draws the PNG; no display is involved
    # Fixed margins, not a layout engine: constrained layout doubled the time a report takes.
    figure.subplots_adjust(**{"left": 0.09, "right": 0.98, "bottom": 0.12, "top": 0.92, **margins})
    return figure


def _axes(ax, title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def _note_if_empty(ax, curves: list[Curve], note: str) -> bool:
    """Write `note` in the middle of an axes that has no point to draw; True if it had none."""
    if any(steps for steps, _ in curves):
        return False
    ax.text(0.5, 0.5, note, transform=ax.transAxes, ha="center", va="center", color="#666666", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return True


def loss_figure(train: Curve, validation: Curve) -> Figure:
    """Training loss per logged step and validation loss at each evaluation, on one axis."""
    figure = _figure(8, 4.5)
    ax = figure.subplots()
    _axes(ax, "loss", "loss (mean over response tokens)")
    if _note_if_empty(ax, [train, validation], "no loss recorded yet"):
        return figure
    if train[0]:
        ax.plot(*train, color=COLOURS[0], linewidth=1.6, label="train (mean over the logging window)",
                gid="loss-train")
    if validation[0]:
        ax.plot(*validation, color=COLOURS[1], linewidth=1.6, marker="o", markersize=5, label="validation",
                gid="loss-validation")
    ax.legend(loc="upper right")
    return figure


def panels_figure(lr: Curve, tokens_per_s: Curve, grad_norm: Curve) -> Figure:
    """Learning rate, tokens/s and gradient norm over the steps, side by side."""
    figure = _figure(11, 3.2, left=0.08, bottom=0.16, top=0.88, wspace=0.4)
    charts = (("learning rate", "lr", lr, "no step logged yet"),
              ("tokens / s", "tokens/s (training steps only)", tokens_per_s, "no step logged yet"),
              ("gradient norm", "norm before clipping", grad_norm,
               "not recorded\n(train.max_grad_norm: null)" if lr[0] else "no step logged yet"))
    for ax, (title, ylabel, curve, note), colour in zip(figure.subplots(1, 3), charts, COLOURS[2:]):
        _axes(ax, title, ylabel)
        if not _note_if_empty(ax, [curve], note):
            ax.plot(*curve, color=colour, linewidth=1.4, gid=f"panel-{_slug(title)}")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 5))  # lr as 1e-3 x ..., not 0.0010
    return figure


def overlay_figure(curves: dict[str, Curve], title: str, ylabel: str, markers: bool) -> Figure:
    """One line per run (the dict's order), for a bake-off: its runs' validation or training loss."""
    figure = _figure(8, 4.5)
    ax = figure.subplots()
    _axes(ax, title, ylabel)
    if _note_if_empty(ax, list(curves.values()), "no finished run has recorded it yet"):
        return figure
    for i, (label, (steps, values)) in enumerate(curves.items()):
        if steps:
            ax.plot(steps, values, color=COLOURS[i % len(COLOURS)], linewidth=1.6, label=label,
                    marker="o" if markers else None, markersize=4, gid=f"{_slug(title)}-{i}")
    ax.legend(loc="upper right", fontsize=9)
    return figure


def confusion_figure(confusion: list[list[int]], labels: list[str], title: str = "confusion matrix") -> Figure:
    """A classifier's confusion matrix (`confusion[gold][predicted]`): gold labels down, predicted
    across, each cell's count written in it. A cell's shade is its share of its gold row (the
    class's recall along the diagonal), so a small class's mistakes show as clearly as a large one's."""
    size = len(labels)
    # Room for the names: the longer the longest, the wider the left and bottom margins.
    name_inches = 0.3 + 0.075 * max((len(label) for label in labels), default=0)
    below = 0.7 * name_inches  # the predicted labels run at 45 degrees
    side = max(2.2, (0.55 if size <= 12 else 0.3) * size)
    width, height = name_inches + 0.9 + side, below + 1.0 + side
    figure = _figure(width, height, left=(name_inches + 0.6) / width, right=1 - 0.3 / width,
                     bottom=(below + 0.6) / height, top=1 - 0.4 / height)
    ax = figure.subplots()
    shares = [[count / max(sum(row), 1) for count in row] for row in confusion]
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto", gid="confusion-cells")
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_xticks(range(size), labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_yticks(range(size), labels, fontsize=9)
    if size <= 20:  # beyond that the numbers would not fit their cells
        for gold, row in enumerate(confusion):
            for predicted, count in enumerate(row):
                ax.text(predicted, gold, str(count), ha="center", va="center", fontsize=8,
                        color="white" if shares[gold][predicted] > 0.5 else "#222222")
    return figure


def svg(figure: Figure, name: str) -> str:
    """The figure as an `<svg>` element to put inside an HTML page (no XML prolog or doctype)."""
    text = io.StringIO()
    # Text stays text (smaller, selectable; the browser draws it), and the ids matplotlib gives
    # clip paths and markers are salted with the chart's name: unique among the page's charts,
    # and the same on every rebuild.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name}):
        figure.savefig(text, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    body = text.getvalue()
    body = body[body.index("<svg"):]
    # matplotlib numbers its groups figure_1, axes_1, ... in every chart: each id (and every
    # reference to one) takes the chart's name, so the page's ids are unique.
    return re.sub(r'(id="|url\(#|href="#)', rf"\1{name}-", body)


def write_png(figure: Figure, path: Path) -> None:
    # zlib's fastest level: a third of the time of the default for a few KiB more.
    figure.savefig(path, format="png", dpi=PNG_DPI, metadata={"Software": None}, pil_kwargs={"compress_level": 1})


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
