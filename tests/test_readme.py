"""The README is the user's manual: its reference and its commands must match the code."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_recipe_reference_matches_schema():
    result = subprocess.run([sys.executable, "scripts/update_readme_reference.py", "--check"], cwd=ROOT)
    assert result.returncode == 0, "README's recipe reference is stale: run python scripts/update_readme_reference.py"


def test_ci_reads_install_and_test_commands_from_readme():
    readme = (ROOT / "README.md").read_text()
    for block in ("install", "quickstart", "test"):
        assert f"<!-- ci:{block} -->" in readme and f"<!-- /ci:{block} -->" in readme
    assert "peftctl train recipes/quickstart.yaml" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_block install" in ci and "readme_block test" in ci


def test_every_shipped_recipe_validates():
    from peftctl.recipe import load_recipe

    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe.data.train.is_file(), f"{path.name}: data.train {recipe.data.train} is missing"
