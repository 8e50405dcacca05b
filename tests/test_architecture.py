"""The packages' layers are a rule a machine checks: import-linter's contracts in pyproject.toml.

Each package imports only from the packages below it (cli → bakeoff → run → report | eval | plan
→ train | export → data → model → recipe → methods → arch → core), and no module imports in a
circle, function-level and TYPE_CHECKING imports included. docs/architecture.md draws the same.
"""

import subprocess
import sys
import tomllib
from pathlib import Path

import peftctl

ROOT = Path(__file__).resolve().parent.parent


def test_the_layers_and_the_absence_of_import_circles_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout, result.stdout


def test_every_package_is_a_layer_and_says_its_job_and_what_it_may_import():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    layered = {name.strip() for layer in config["layers"] for name in layer.split("|")}
    packages = {p.parent.name for p in Path(peftctl.__file__).parent.glob("*/__init__.py")}
    assert packages == layered, f"packages outside the layers: {packages - layered}; layers without a package: {layered - packages}"
    for package in packages:
        doc = (Path(peftctl.__file__).parent / package / "__init__.py").read_text()
        assert doc.startswith('"""') and "May import:" in doc, f"peftctl/{package}/__init__.py lacks its job or its imports"


def test_modules_stay_inside_packages():
    """peftctl/ holds only packages (and the package's own __init__ / __main__): a new module goes
    into the package whose job it does."""
    loose = {p.name for p in Path(peftctl.__file__).parent.glob("*.py")} - {"__init__.py", "__main__.py"}
    assert not loose, f"modules outside any package: {sorted(loose)}"
