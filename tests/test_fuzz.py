"""Property: whatever a user puts in a recipe, a data file or an adapter folder, peftctl exits 0 or 2,
never with a traceback, and never changes an input file.

Inputs are random mutations of valid ones (hypothesis): values of other types and sizes swapped
in at random keys, text cut short or with bytes flipped, rows with fields of any JSON type,
adapter files truncated or overwritten. The default run is derandomised and small (well under a
minute); `pytest -m slow tests/test_fuzz.py` runs the same properties on many more, random,
examples.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from peftctl.cli.commands import app
from peftctl.recipe.load import load_recipe
from peftctl.run import pipeline
from test_bad_input import recipe_text

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "data" / "tiny"
VALID = yaml.safe_load(recipe_text())

QUICK = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
THOROUGH = settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))

# Values of every kind a YAML or JSON file can hold, the awkward ones included.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["", "\x00", "all-linear", "builtin:tiny-gpt2", "/", "..", "~", "-1", "1e400", "q" * 300]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                                            inner, max_size=4),
                      max_leaves=12)


def key_paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    paths = []
    for key, value in tree.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths += key_paths(value, (*prefix, key))
    return paths


@st.composite
def mutated_recipes(draw) -> str:
    """The valid recipe with a few keys given other values (or removed, or added), as YAML text,
    sometimes then cut short or with a byte changed."""
    recipe = copy.deepcopy(VALID)
    recipe["train"]["max_steps"] = 1
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(key_paths(recipe) + [("method", "extra"), ("train", "seed")]))
        parent = recipe
        for key in path[:-1]:
            parent = parent.setdefault(key, {}) if isinstance(parent, dict) else {}
        if isinstance(parent, dict):
            if draw(st.booleans()) or path[-1] not in parent:
                parent[path[-1]] = draw(values)
            else:
                del parent[path[-1]]
    text = yaml.safe_dump(recipe, allow_unicode=True)
    edit = draw(st.sampled_from(["none", "none", "cut", "flip"]))
    if edit == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif edit == "flip" and text:
        at = draw(st.integers(0, len(text) - 1))
        text = text[:at] + draw(st.characters()) + text[at + 1:]
    return text


rows = st.dictionaries(st.sampled_from(["instruction", "input", "output", "messages", "text", "other"]), values,
                       max_size=4)


def assert_exits_cleanly(args: list, inputs: list[Path]) -> None:
    before = {path: path.read_bytes() for path in inputs}
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code in (0, 2), (result.exit_code, result.output[-2000:], args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert {path: path.read_bytes() for path in inputs} == before, "an input file changed"


def check_recipe(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(text, encoding="utf-8", errors="surrogateescape")
        for command in (["validate", recipe], ["plan", recipe]):
            assert_exits_cleanly(command, [recipe, TINY / "train.jsonl"])


def check_rows(lines: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(recipe_text(train=data))
        assert_exits_cleanly(["train", recipe, "--output", Path(tmp) / "run"], [recipe, data])


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz") / "run"
    pipeline.run(load_recipe(ROOT / "recipes" / "smoke-gpt2.yaml", ["train.max_steps=1"], output_dir=out))
    return out / "adapter"


adapter_damage = st.tuples(
    st.sampled_from(["adapter_config.json", "adapter_model.safetensors", "peftctl_recipe.yaml"]),
    st.sampled_from(["cut", "flip", "replace"]), st.integers(0, 10_000), st.binary(max_size=64))


def check_adapter(adapter: Path, damage: tuple) -> None:
    name, how, at, data = damage
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        shutil.copytree(adapter, folder)
        target = folder / name
        content = target.read_bytes()
        at %= max(len(content), 1)
        target.write_bytes({"cut": content[:at], "flip": content[:at] + data + content[at + len(data):],
                            "replace": data}[how])
        inputs = sorted(p for p in folder.iterdir() if p.is_file())
        assert_exits_cleanly(["eval", folder, "--data", TINY / "validation.jsonl", "--samples", "0"], inputs)


@QUICK
@given(mutated_recipes())
def test_any_recipe_exits_0_or_2(text):
    check_recipe(text)


@QUICK
@given(st.lists(rows | st.text(max_size=30), min_size=1, max_size=5))
def test_any_data_rows_exit_0_or_2(lines):
    check_rows(lines)


@settings(QUICK, max_examples=12)
@given(damage=adapter_damage)
def test_any_damaged_adapter_exits_0_or_2(adapter, damage):
    check_adapter(adapter, damage)


@pytest.mark.slow
@THOROUGH
@given(mutated_recipes())
def test_any_recipe_exits_0_or_2_thorough(text):
    check_recipe(text)


@pytest.mark.slow
@settings(THOROUGH, max_examples=150)
@given(st.lists(rows | st.text(max_size=30), min_size=1, max_size=5))
def test_any_data_rows_exit_0_or_2_thorough(lines):
    check_rows(lines)


@pytest.mark.slow
@settings(THOROUGH, max_examples=150)
@given(damage=adapter_damage)
def test_any_damaged_adapter_exits_0_or_2_thorough(adapter, damage):
    check_adapter(adapter, damage)
