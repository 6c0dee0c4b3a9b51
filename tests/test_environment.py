"""Project hygiene: environment.yml covers pyproject's runtime dependencies; notebooks are clean."""
import json
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# conda-forge names that differ from PyPI names
CONDA_NAMES = {"torch": "pytorch"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_has_every_runtime_dependency():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {_name(d) for d in env["dependencies"] if isinstance(d, str)}
    missing = [r for r in _pyproject()["project"]["dependencies"]
               if CONDA_NAMES.get(_name(r), _name(r)) not in conda]
    assert not missing, f"environment.yml lacks runtime dependencies declared in pyproject: {missing}"
    assert "pip" in conda
    pip_section = [d for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert pip_section and any(".[notebooks,test]" in line for line in pip_section[0]["pip"])


def test_the_check_itself_catches_a_missing_dependency():
    deps = ["numpy>=1", "scipy", "torch>=2.4"]
    conda = {"numpy", "pytorch"}
    assert [d for d in deps if CONDA_NAMES.get(_name(d), _name(d)) not in conda] == ["scipy"]


def test_extras_exist():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert {"notebooks", "test", "dev"} <= set(extras)
    assert any(_name(r) == "nbval" for r in extras["test"])


def dirty_notebooks(folder: Path) -> list[str]:
    bad = []
    for path in sorted(folder.glob("*.ipynb")):
        nb = json.loads(path.read_text())
        for cell in nb.get("cells", []):
            if cell.get("cell_type") == "code" and (cell.get("outputs") or cell.get("execution_count")):
                bad.append(path.name)
                break
    return bad


def test_notebooks_are_committed_without_outputs():
    assert dirty_notebooks(ROOT / "notebooks") == []


def test_the_outputs_check_catches_a_dirty_notebook(tmp_path):
    cell = {"cell_type": "code", "source": "1", "metadata": {}, "outputs": [], "execution_count": 3}
    (tmp_path / "x.ipynb").write_text(json.dumps({"cells": [cell], "metadata": {}, "nbformat": 4,
                                                  "nbformat_minor": 5}))
    assert dirty_notebooks(tmp_path) == ["x.ipynb"]


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make study" in readme
