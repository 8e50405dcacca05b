"""The README and the docs are the user's manual: the recipe reference and the commands must match the code."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_recipe_reference_matches_schema():
    result = subprocess.run([sys.executable, "scripts/update_recipe_reference.py", "--check"], cwd=ROOT)
    assert result.returncode == 0, "docs/reference/recipe.md is stale: run python scripts/update_recipe_reference.py"


def test_ci_reads_install_and_test_commands_from_readme():
    readme = (ROOT / "README.md").read_text()
    for block in ("install", "quickstart", "test"):
        assert f"<!-- ci:{block} -->" in readme and f"<!-- /ci:{block} -->" in readme
    assert "peftctl train recipes/quickstart.yaml" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_block install" in ci and "readme_block test" in ci


def test_every_shipped_recipe_validates():
    from peftctl.core.hub import is_hub_id
    from peftctl.recipe.load import load_recipe

    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        recipe = load_recipe(path)
        if isinstance(recipe.data.train, str):  # a Hub dataset id: tests/test_hub.py trains it from a cache
            assert is_hub_id(recipe.data.train), f"{path.name}: data.train {recipe.data.train}"
        else:
            assert recipe.data.train.is_file(), f"{path.name}: data.train {recipe.data.train} is missing"


def test_install_uses_the_lock_and_the_lock_lies_inside_pyproject_ranges():
    """What a user installs is what CI tested: the README's install command (which CI runs)
    applies constraints.txt, and every locked version is one pyproject's ranges allow, so the
    lock and the ranges cannot drift apart unnoticed."""
    import tomllib

    from packaging.requirements import Requirement

    readme = (ROOT / "README.md").read_text()
    install = readme.split("<!-- ci:install -->")[1].split("<!-- /ci:install -->")[0]
    assert install.count("-c constraints.txt") == install.count("pip install") >= 1, install

    sys.path.insert(0, str(ROOT / "scripts"))
    from compat_check import normalise, read_lock

    lock = read_lock(ROOT / "constraints.txt")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    for requirement in requirements:
        name = normalise(requirement.name)
        assert name in lock, f"{requirement.name} is a dependency but constraints.txt does not lock it"
        assert requirement.specifier.contains(lock[name]), f"locked {name}=={lock[name]} is outside {requirement}"
        assert any(s.operator == "<" for s in requirement.specifier), f"{requirement} has no upper bound"
