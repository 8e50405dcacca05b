"""The run report in a real browser: headless Chromium opens report.html from disk, draws it and
logs no console error; the screenshot shows a page (not blank), the DOM has the loss chart and
the tables, and loss.png beside it is a real, non-blank image.

Needs Debian's Chromium (`apt-get install -y chromium`); skipped without it.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from cli_checks import invoke
from test_report import Tags  # the page's elements as a browser's parser finds them

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
WINDOW = (1280, 2200)


def chromium(profile: Path, page: Path, *options: str) -> subprocess.CompletedProcess:
    """Chromium, headless, that reaches for no network of its own (without the background
    flags it contacts Google's services, which this machine refuses)."""
    if not CHROMIUM.is_file():
        pytest.skip("no /usr/bin/chromium: install it with `apt-get install -y chromium` (sudo if not root)")
    return subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=1",
                           *options, page.as_uri()], capture_output=True, text=True, timeout=120)


def console_errors(log: str) -> list[str]:
    """The page's console messages and uncaught exceptions in Chromium's log."""
    return [line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def image_stats(path: Path) -> tuple[tuple[int, int], float]:
    """(width, height) and the variance of the grey levels: a blank image has none."""
    from PIL import Image, ImageStat

    with Image.open(path) as image:
        return image.size, ImageStat.Stat(image.convert("L")).var[0]


def points(length: str) -> float:
    """An SVG width or height ('576pt') as a number."""
    return float(re.fullmatch(r"([\d.]+)(pt|px)?", length).group(1))


def test_chromium_draws_the_report_with_its_chart_and_tables(tmp_path):
    out = tmp_path / "run"
    result = invoke("train", ROOT / "recipes" / "smoke-gpt2.yaml", "--output", out, "--set", "train.log_every=2",
                    "--set", "train.eval_every=5", "--set", "output.samples=2", "--json")
    assert result.exit_code == 0, result.output
    report = out / "report.html"

    # The check for console errors finds them: a page that logs one and throws one.
    control = tmp_path / "control.html"
    control.write_text("<!DOCTYPE html><script>console.error('made up'); undefined_function();</script>")
    assert len(console_errors(chromium(tmp_path / "profile", control, "--dump-dom").stderr)) >= 1

    dumped = chromium(tmp_path / "profile", report, "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-3000:]
    assert not console_errors(dumped.stderr), console_errors(dumped.stderr)
    elements = Tags(dumped.stdout).found
    ids = {attrs.get("id") for _, attrs in elements}
    assert {"summary", "metrics-table", "generations-table", "loss-loss-train", "loss-loss-validation"} <= ids
    charts = [attrs for tag, attrs in elements if tag == "svg"]
    assert len(charts) == 2  # the loss chart, and the learning rate / tokens/s / grad norm panels
    assert points(charts[0]["width"]) >= 400 and points(charts[0]["height"]) >= 200

    screenshot = tmp_path / "screenshot.png"
    shot = chromium(tmp_path / "profile", report, f"--screenshot={screenshot}",
                    f"--window-size={WINDOW[0]},{WINDOW[1]}", "--hide-scrollbars")
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-3000:]
    assert not console_errors(shot.stderr), console_errors(shot.stderr)
    size, variance = image_stats(screenshot)
    assert size == WINDOW and variance > 100, (size, variance)
    size, variance = image_stats(out / "loss.png")
    assert size == (960, 540) and variance > 100, (size, variance)
    assert json.loads((out / "summary.json").read_text())["steps"] == 20
