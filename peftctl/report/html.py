"""The HTML of the run and bake-off reports: one self-contained page each.

Everything a page shows is inside it: the style sheet inline, the charts as inline SVG, no
script, no font, image or link that would be fetched. Every piece of text that comes from a
file (the recipe, prompts, replies, labels, errors, paths) goes through `esc`, so a `<script>`
in a prompt is shown, never run. Table cells of figures carry their exact value in
`data-key` / `data-value`, for programs and tests; the cell text is rounded for people.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from typing import Any

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1a1a1a; margin: 0 auto;
       max-width: 1180px; padding: 1.5em 2em 4em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.where { color: #555; margin-top: 0; }
.notes { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.6em 1em; }
.notes li { margin: 0.2em 0; }
table { border-collapse: collapse; margin: 0.5em 0; }
.scroll { overflow-x: auto; }
th { font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; vertical-align: top; }
th { background: #f4f4f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { white-space: pre-wrap; overflow-wrap: break-word; max-width: 28em; }
.reply { white-space: pre-wrap; overflow-wrap: anywhere; max-height: 14em; overflow-y: auto; }
.cut { color: #8a5a00; font-size: 0.85em; margin-top: 0.3em; }
table.generations td.text { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 0.9em; }
pre { background: #f7f7f7; border: 1px solid #e4e4e4; padding: 0.8em 1em; overflow-x: auto; }
svg { max-width: 100%; height: auto; }
figure { margin: 0.5em 0; }
figure.wide svg { width: 100%; max-width: 960px; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border-radius: 2px; margin-right: 0.4em;
          vertical-align: -0.1em; }
details summary { cursor: pointer; color: #444; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, body: Iterable[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def section(anchor: str, heading: str, *parts: str) -> str:
    return f"<section id=\"{esc(anchor)}\">\n<h2>{esc(heading)}</h2>\n" + "\n".join(parts) + "\n</section>"


def notes(lines: list[str]) -> str:
    """What the page could not show and why (a list of already escaped lines); '' when none."""
    if not lines:
        return ""
    return "<ul class=\"notes\" id=\"notes\">\n" + "\n".join(f"<li>{line}</li>" for line in lines) + "\n</ul>"


def table(table_id: str, headers: list[str], rows: Iterable[list[str]], css: str = "") -> str:
    """A table of cells already rendered by `cell`, `text_cell` or `raw_cell`."""
    head = "".join(f"<th>{esc(h.replace('_', ' '))}</th>" for h in headers)  # spaces: long headers wrap
    body = "\n".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    return (f"<div class=\"scroll\"><table id=\"{esc(table_id)}\" class=\"{esc(css)}\">\n<tr>{head}</tr>\n{body}\n"
            "</table></div>")


def cell(key: str, value: Any) -> str:
    """A figure: its exact value in data-value, rounded by `figure_text` for the eye."""
    exact = "" if value is None else repr(value) if isinstance(value, float) else str(value)
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (f"<td class=\"{'num' if numeric else 'text'}\" data-key=\"{esc(key)}\" data-value=\"{esc(exact)}\">"
            f"{esc(figure_text(key, value))}</td>")


def text_cell(value: Any) -> str:
    return f"<td class=\"text\">{esc('' if value is None else value)}</td>"


def raw_cell(markup: str) -> str:
    """A cell of markup the caller built (and escaped) itself."""
    return f"<td>{markup}</td>"


def figure_text(key: str, value: Any) -> str:
    """A figure as people read it: by what its key says it is."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str) or not isinstance(value, (int, float)):
        return str(value)
    if key.endswith("_bytes"):
        return f"{value / 2**20:,.1f} MiB" if value >= 2**20 else f"{value / 2**10:,.1f} KiB"
    if key.endswith("_percent"):
        return f"{value:.3f}%"
    if key == "seconds" or key.endswith("_s") and key != "tokens_per_s":
        return f"{value:,.1f} s"
    if isinstance(value, int) or key == "tokens_per_s":
        return f"{value:,.0f}"
    if key == "lr":
        return f"{value:.3e}"
    return f"{value:.4f}"


def figures_table(table_id: str, figures: dict[str, Any]) -> str:
    """A dict of figures as a two-column table, a row per key, in the dict's order."""
    return table(table_id, ["figure", "value"], ([f"<th>{esc(key.replace('_', ' '))}</th>", cell(key, value)]
                                           for key, value in figures.items()), css="figures")
