"""The run report: what `peftctl train` writes beside the adapter (summary.json, generations.jsonl,
report.html, loss.png), `peftctl report` on finished, interrupted and bare run folders and on a
bake-off folder, the page's escaping and self-containment, and the refusals."""

from __future__ import annotations

import ast
import html
import json
import re
import shutil
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from cli_checks import assert_refused, invoke

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes" / "smoke-gpt2.yaml"
VALIDATION = ROOT / "recipes" / "data" / "tiny" / "validation.jsonl"
# A run with several logged steps and evaluations, and two sample replies (the smoke recipe has none).
RUN_OPTIONS = ["--set", "train.max_steps=10", "--set", "train.log_every=2", "--set", "train.eval_every=4",
               "--set", "output.samples=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`peftctl train recipes/smoke-gpt2.yaml ... --json`: the run folder and train's JSON object."""
    out = tmp_path_factory.mktemp("report") / "run"
    result = invoke("train", SMOKE, "--output", out, *RUN_OPTIONS, "--json")
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def data_values(page: str, key: str) -> list[str]:
    """The exact values the page's figure cells carry for `key`, in the page's order."""
    return [html.unescape(value) for value in re.findall(rf'data-key="{key}" data-value="([^"]*)"', page)]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


class Tags(HTMLParser):
    """The page's elements as a browser's parser finds them: (tag, attributes)."""

    def __init__(self, page: str):
        super().__init__()
        self.found: list[tuple[str, dict]] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.found.append((tag, dict(attrs)))


def assert_self_contained(page: str) -> None:
    """Nothing the page would run or fetch: no script, no src or href that leaves the page
    (a chart's own #id references and a relative link to a run's report stay)."""
    tags = Tags(page).found
    assert "script" not in {tag for tag, _ in tags}
    links = [value for _, attrs in tags for key, value in attrs.items() if key in ("src", "href", "xlink:href")]
    assert not [link for link in links if re.match(r"\s*([a-z][a-z0-9+.-]*:|//)", link or "", re.IGNORECASE)], links


def test_train_writes_the_summary_the_sample_replies_and_the_report(trained):
    out, figures = trained
    assert json.loads((out / "summary.json").read_text()) == figures  # train's --json object
    page = (out / "report.html").read_text()
    assert_self_contained(page)
    assert png_size(out / "loss.png") == (960, 540)

    # The charts' numbers are metrics.jsonl's, to the last digit (the metrics table carries them).
    metrics = read_jsonl(out / "metrics.jsonl")
    for key in ("loss", "val_loss", "lr", "grad_norm"):
        wanted = [repr(entry[key]) if key in entry else "" for entry in metrics]
        assert data_values(page, key) == wanted, key
    assert [e["step"] for e in metrics if "val_loss" in e] == [0, 4, 8, 10]
    # Both loss curves are drawn: the SVG has the training line and the validation markers.
    assert 'id="loss-loss-train"' in page and 'id="loss-loss-validation"' in page

    # The closing table, the recipe (from the adapter folder) and the sample replies.
    assert data_values(page, "val_loss_after") == [repr(figures["val_loss_after"])]
    assert data_values(page, "trainable_params") == [str(figures["trainable_params"])]
    assert "name_or_path: builtin:tiny-gpt2" in html.unescape(page)
    rows = read_jsonl(out / "generations.jsonl")
    questions = [row["instruction"] for row in read_jsonl(VALIDATION)[:2]]
    assert [row["prompt"] for row in rows] == questions
    for question in questions:
        assert html.escape(question) in page
    assert "finished: 10 steps" in page


def test_sample_replies_are_the_base_models_and_the_adapters_own(trained):
    """The base's replies were taken before the method went on: they equal a fresh base's, and the
    adapter's equal the saved adapter's on a fresh base."""
    from peftctl.eval.samples import MAX_NEW_TOKENS
    from peftctl.eval.scores import generate_reply
    from peftctl.export.adapter_files import load_adapter
    from peftctl.model.loading import load_model, load_tokenizer
    from tiny_models import TINY_GPT2

    out, _ = trained
    tokenizer = load_tokenizer(TINY_GPT2)
    questions = read_jsonl(VALIDATION)[:2]
    base = load_model(TINY_GPT2).eval()
    adapted = load_adapter(load_model(TINY_GPT2), out / "adapter").model.eval()
    for row, saved in zip(questions, read_jsonl(out / "generations.jsonl")):
        assert saved["base"] == generate_reply(base, tokenizer, row, "alpaca", MAX_NEW_TOKENS)["generated"]
        assert saved["generated"] == generate_reply(adapted, tokenizer, row, "alpaca", MAX_NEW_TOKENS)["generated"]
    assert saved["generated"] != saved["base"]  # a trained adapter: the comparison above means something


def test_samples_and_the_report_leave_the_training_unchanged(trained, tmp_path):
    out, _ = trained
    plain = tmp_path / "plain"
    result = invoke("train", SMOKE, "--output", plain, *RUN_OPTIONS, "--set", "output.samples=0",
                    "--set", "output.report=false", "--json")
    assert result.exit_code == 0, result.output
    weights = "adapter/adapter_model.safetensors"
    assert (plain / weights).read_bytes() == (out / weights).read_bytes()
    same = ("step", "loss", "val_loss", "lr", "grad_norm")
    assert ([{k: e.get(k) for k in same} for e in read_jsonl(plain / "metrics.jsonl")]
            == [{k: e.get(k) for k in same} for e in read_jsonl(out / "metrics.jsonl")])
    assert not any((plain / name).exists() for name in ("report.html", "loss.png", "generations.jsonl"))
    assert (plain / "summary.json").is_file()


def test_a_resumed_run_drops_the_summary_of_the_finish_it_continues(trained, tmp_path, monkeypatch):
    """Resuming a finished run (to train further) makes its summary and samples stale: they go
    before training, so a resumed run that stops again is reported as unfinished."""
    from peftctl.recipe.load import load_recipe
    from peftctl.run import pipeline

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "train", stopped)
    overrides = [option for option in RUN_OPTIONS if option != "--set"]
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(load_recipe(SMOKE, overrides, output_dir=run), resume="latest")
    assert not (run / "summary.json").exists() and not (run / "generations.jsonl").exists()
    assert (run / "metrics.jsonl").is_file() and (run / "adapter").is_dir()


def test_an_interrupted_run_is_reported_from_its_metrics_and_checkpoint(trained, tmp_path):
    """What an interrupted run leaves: metrics.jsonl (its last line cut short by the kill) and
    checkpoints, no adapter, summary or samples."""
    out, _ = trained
    run = tmp_path / "interrupted"
    run.mkdir()
    shutil.copytree(out / "checkpoints", run / "checkpoints")
    lines = (out / "metrics.jsonl").read_text().splitlines()[:5]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 8, "loss": 5.3')
    result = invoke("report", run, "--json")
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    assert written == {"kind": "run", "report": str(run / "report.html"), "chart": str(run / "loss.png")}
    page = (run / "report.html").read_text()
    assert_self_contained(page)
    last_step = max(json.loads(line)["step"] for line in lines)
    assert f"did not finish: last logged step {last_step}; latest checkpoint step-10" in page
    assert "line 6 of metrics.jsonl was cut short" in page and "no summary.json" in page
    assert data_values(page, "step") == [str(json.loads(line)["step"]) for line in lines]  # the cut line left out
    assert data_values(page, "last_logged_step") == [str(last_step)]
    assert "model.name_or_path" in page and "builtin:tiny-gpt2" in page  # the checkpoint's recipe keys
    assert png_size(run / "loss.png") == (960, 540)


def test_metrics_alone_are_enough_and_the_page_says_what_is_missing(trained, tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    shutil.copy(trained[0] / "metrics.jsonl", run / "metrics.jsonl")
    result = invoke("report", run)
    assert result.exit_code == 0, result.output
    assert "report: " + str(run / "report.html") in " ".join(result.stdout.split())
    page = (run / "report.html").read_text()
    for missing in ("no summary.json", "no generations.jsonl", "no recipe"):
        assert missing in page
    assert data_values(page, "loss") == [repr(e["loss"]) if "loss" in e else ""
                                          for e in read_jsonl(run / "metrics.jsonl")]


def test_text_from_files_is_escaped(tmp_path):
    run = tmp_path / "hostile"
    (run / "adapter").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 0, "val_loss": 2.0}\n{"step": 1, "loss": 1.5, "lr": 0.1}\n')
    (run / "adapter" / "peftctl_recipe.yaml").write_text("model:\n  name_or_path: </pre><script>alert(1)</script>\n")
    (run / "generations.jsonl").write_text(json.dumps({
        "prompt": "<script>alert('prompt')</script>", "reference": "<img src=http://example.com/x.png>",
        "generated": "a & b <b>bold</b>", "stopped_at_eos": True, "base": "\"><iframe>", "base_stopped_at_eos": False,
    }) + "\n")
    (run / "summary.json").write_text("[1, 2]")  # damaged: the page says so and goes on
    result = invoke("report", run)
    assert result.exit_code == 0, result.output
    page = (run / "report.html").read_text()
    assert_self_contained(page)
    assert "summary.json is not a JSON object: left out" in page
    for tag in ("<iframe", "<img", "<b>", "</pre><"):
        assert tag not in page
    assert "&lt;script&gt;alert(&#x27;prompt&#x27;)&lt;/script&gt;" in page
    assert "a &amp; b &lt;b&gt;bold&lt;/b&gt;" in page
    assert "&lt;/pre&gt;&lt;script&gt;" in page


def write_bakeoff(folder: Path) -> dict:
    """A bake-off folder as peftctl bakeoff leaves it: two done runs (dora the better), one failed,
    one pending; each done run's metrics.jsonl made up."""
    def figures(val_after: float) -> dict:
        return {"trainable_params": 1000, "trainable_percent": 0.5, "planned_peak_bytes": 2**20,
                "measured_peak_bytes": None, "tokens_per_s": 120.5, "wall_s": 3.5, "val_loss_before": 3.0,
                "val_loss_after": val_after, "token_accuracy": 0.5, "exact_match": 0.0, "adapter_bytes": 4096,
                "mergeable": True}

    runs = [{"label": "lora", "method": "lora", "settings": {"method.r": 8}, "run_dir": "lora", "status": "done",
             "error": None, "figures": figures(2.5)},
            {"label": "dora <r16>", "method": "lora", "settings": {"method.use_dora": True}, "run_dir": "dora",
             "status": "done", "error": None, "figures": figures(2.1)},
            {"label": "ia3", "method": "ia3", "settings": {}, "run_dir": "ia3", "status": "failed",
             "error": "<b>out of memory</b>", "figures": {}},
            {"label": "vera", "method": "vera", "settings": {}, "run_dir": "vera", "status": "pending",
             "error": None, "figures": {}}]
    for run, end in (("lora", 2.5), ("dora", 2.1)):
        (folder / run).mkdir(parents=True)
        (folder / run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in [
            {"step": 0, "val_loss": 3.0}, {"step": 5, "loss": 2.9, "lr": 1e-3}, {"step": 5, "val_loss": 2.8},
            {"step": 10, "loss": end + 0.1, "lr": 0.0}, {"step": 10, "val_loss": end}]))
    state = {"version": 1, "recipe": "recipes/quickstart.yaml", "budget": {"steps": 10}, "fingerprint": {},
             "runs": runs}
    (folder / "bakeoff.json").write_text(json.dumps(state))
    return state


def test_a_bakeoff_report_overlays_every_done_runs_validation_curve(tmp_path):
    folder = tmp_path / "bakeoff"
    write_bakeoff(folder)
    result = invoke("report", folder, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"kind": "bakeoff", "report": str(folder / "report.html"),
                                         "chart": str(folder / "val_loss.png")}
    page = (folder / "report.html").read_text()
    assert_self_contained(page)
    assert png_size(folder / "val_loss.png") == (960, 540)
    # One validation line per done run, in the table's order: best validation loss first.
    assert len(re.findall(r'id="val-validation-loss-\d+"', page)) == 2
    assert len(re.findall(r'id="train-training-loss-\d+"', page)) == 2
    assert data_values(page, "val_loss_after") == ["2.1", "2.5"]
    table = page.split('id="runs-table"')[1].split("</table>")[0]
    assert table.index("dora &lt;r16&gt;") < table.index("lora</td>")
    assert "&lt;b&gt;out of memory&lt;/b&gt;" in page and "pending" in page


def test_the_overlay_draws_one_line_per_curve():
    from peftctl.report.plots import overlay_figure

    figure = overlay_figure({"a": ([0, 5], [3.0, 2.0]), "b": ([0, 5], [3.0, 2.5]), "c": ([], [])},
                            "validation loss", "loss", markers=True)
    lines = figure.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["a", "b"]  # a run with no point yet draws none
    assert list(lines[1].get_ydata()) == [3.0, 2.5]


def test_only_writing_a_report_imports_matplotlib():
    """No module imports matplotlib or report/plots.py when it is imported itself (only inside the
    functions that write a report), so `peftctl --help` and training never load it."""
    loaded_at_import = {}
    for path in sorted((ROOT / "peftctl").rglob("*.py")):
        imported = set()
        for node in ast.parse(path.read_text()).body:  # the module's own statements, not its functions'
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported |= {node.module or ""} | {f"{node.module}.{alias.name}" for alias in node.names}
        loaded_at_import[path.relative_to(ROOT).as_posix()] = sorted(name for name in imported
                                             if name.split(".")[0] == "matplotlib" or name == "peftctl.report.plots")
    assert loaded_at_import.pop("peftctl/report/plots.py")  # the scan sees the imports where they are
    assert not any(loaded_at_import.values()), loaded_at_import


@pytest.mark.parametrize("lines, phrases", [
    ('{"step": 0, "val_loss": 2.0}\nnot json\n{"step": 1, "loss": 1.5}\n',
     ["metrics.jsonl", "line 2", "not JSON", "repair or delete line 2"]),
    ('{"step": 0, "val_loss": 2.0}\n{"step": "one", "loss": 1.5}\n', ["line 2", "its step is 'one'"]),
    ('[1, 2]\n', ["line 1", "not an object"]),
    ('{"step": 3, "loss": "low"}\n', ["line 1", "its loss is 'low', not a number"]),
])
def test_a_malformed_metrics_line_is_refused_naming_it(tmp_path, lines, phrases):
    (tmp_path / "metrics.jsonl").write_text(lines)
    assert_refused(invoke("report", tmp_path), *phrases)
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "loss.png").exists()


def test_a_refusal_with_json_names_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "val_loss": 2.0}\n{"step": -1}\n')
    error = json.loads(invoke("report", tmp_path, "--json").stdout)
    assert (error["file"], error["line"]) == (str(tmp_path / "metrics.jsonl"), 2)


@pytest.mark.parametrize("make, phrases", [
    (lambda p: p / "nowhere", ["no such folder"]),
    (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", ["not a folder"]),
    (lambda p: p, ["not a peftctl run folder", "no metrics.jsonl"]),
])
def test_a_folder_that_is_not_a_run_is_refused(tmp_path, make, phrases):
    assert_refused(invoke("report", make(tmp_path)), *phrases)


@pytest.mark.parametrize("change, phrases", [
    (lambda state: "{not json", ["bakeoff.json", "not readable JSON"]),
    (lambda state: {**state, "version": 2}, ["version 2", "reads version 1"]),
    (lambda state: {**state, "runs": {}}, ["runs", "no list of runs"]),
    (lambda state: {**state, "runs": [{**state["runs"][0], "status": "finished"}]},
     ["runs[0].status", "'finished' is not one of pending, running, done, failed"]),
    (lambda state: {**state, "runs": [{**state["runs"][0], "figures": None}]}, ["runs[0].figures", "not a JSON object"]),
])
def test_a_malformed_bakeoff_file_is_refused_naming_the_key(tmp_path, change, phrases):
    state = write_bakeoff(tmp_path)
    changed = change(state)
    (tmp_path / "bakeoff.json").write_text(changed if isinstance(changed, str) else json.dumps(changed))
    assert_refused(invoke("report", tmp_path), *phrases)
    assert not (tmp_path / "report.html").exists()


@pytest.mark.parametrize("recipe, options, replies", [
    # A prompt method: its replies come through the virtual tokens it feeds the model.
    ("prefix_tuning-gpt2.yaml", ["--set", "output.samples=1", "--set", "train.max_steps=2"], 1),
    # Completion rows have no prompt to reply to: no samples, and the page says why.
    ("smoke-gpt2.yaml", ["--set", "data.format=completion", "--set", "data.train=data/tiny/completion.jsonl",
                         "--set", "data.validation=0.25", "--set", "output.samples=3", "--set", "train.max_steps=2"], 0),
])
def test_sample_replies_by_method_and_data_format(tmp_path, recipe, options, replies):
    from peftctl.eval.samples import MAX_NEW_TOKENS
    from peftctl.eval.scores import generate_reply
    from peftctl.export.adapter_files import load_adapter
    from peftctl.model.loading import load_model, load_tokenizer
    from peftctl.recipe.load import load_recipe

    out = tmp_path / "run"
    result = invoke("train", ROOT / "recipes" / recipe, "--output", out, *options)
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text()
    if replies:
        rows = read_jsonl(out / "generations.jsonl")
        assert len(rows) == replies
        spec = load_recipe(ROOT / "recipes" / recipe).model
        model = load_adapter(load_model(spec), out / "adapter").model.eval()
        reply = generate_reply(model, load_tokenizer(spec), read_jsonl(VALIDATION)[0], "alpaca", MAX_NEW_TOKENS)
        assert rows[0]["generated"] == reply["generated"]
    else:
        assert not (out / "generations.jsonl").exists() and "no generations.jsonl" in page
    shown = yaml.safe_load(html.unescape(page.split('<pre id="recipe-text">')[1].split("</pre>")[0]))
    assert shown == yaml.safe_load((out / "adapter" / "peftctl_recipe.yaml").read_text())
