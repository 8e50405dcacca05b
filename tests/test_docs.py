"""The docs build as a site with no broken link or anchor, and every relative link of the README
(which lies outside the site's docs_dir) leads to a file that exists, and to an anchor it has."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_docs_site_builds_strictly(tmp_path):
    """mkdocs.yml's `validation:` makes a missing page, a missing anchor or an absolute link a
    warning, and --strict makes any warning fail the build."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces to
    hyphens, a repeated heading suffixed -1, -2, ... (code blocks hold no headings)."""
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        heading = re.match(r"#{1,6} +(.*?) *#* *$", line)
        if in_code or not heading:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1))  # a link's text only
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def relative_links(markdown: str) -> list[str]:
    """Link targets `](path)` and `](path#anchor)` outside code blocks and spans, not URLs."""
    links = []
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                links.append(target)
    return links


def test_github_anchors_follow_githubs_rule():
    page = "# A title\n## llama.cpp and Ollama (GGUF)\n## Mistakes, inputs and outputs\n## A title\n```\n# not a heading\n```\n"
    assert github_anchors(page) == {"a-title", "llamacpp-and-ollama-gguf", "mistakes-inputs-and-outputs", "a-title-1"}
    assert relative_links("[a](docs/x.md#y) `[b](no.md)` [c](https://example.org)") == ["docs/x.md#y"]


def test_every_relative_link_in_the_readme_resolves():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = relative_links(readme)
    assert links, "the README links to no page"
    broken = []
    for link in links:
        path, _, anchor = link.partition("#")
        target = (ROOT / path).resolve() if path else ROOT / "README.md"
        if not target.is_file():
            broken.append(f"{link}: no file {path}")
        elif anchor and anchor not in github_anchors(target.read_text(encoding="utf-8")):
            broken.append(f"{link}: {path or 'README.md'} has no heading #{anchor}")
    assert not broken, broken


def test_the_readme_links_every_docs_page():
    """The README's index reaches every page of docs/, so no page is an orphan."""
    linked = {(ROOT / link.partition("#")[0]).resolve() for link in relative_links((ROOT / "README.md").read_text())}
    pages = {page.resolve() for page in (ROOT / "docs").rglob("*.md") if page.name != "index.md"}
    assert pages <= linked, sorted(str(p.relative_to(ROOT)) for p in pages - linked)
