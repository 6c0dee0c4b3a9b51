"""The notebooks' two files agree, and their code passes ruff.

Every ``notebooks/NN_name.ipynb`` is paired by jupytext with ``notebooks/NN_name.py`` (py:percent):
the script is what one edits and reviews, the .ipynb what JupyterLab, papermill and nbval open.
``make notebooks`` syncs them; these tests fail when a commit carries a pair that disagrees.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
PAIRING = "ipynb,py:percent"
SYNC_HINT = "run `make notebooks` (jupytext --sync) and commit both files"


def _cells(nb) -> list[tuple[str, str, bool]]:
    """What must agree between the two files: cell type, source, the papermill `parameters` tag."""
    return [(c.cell_type, c.source, "parameters" in c.metadata.get("tags", [])) for c in nb.cells]


def _describe(i: int, a: tuple[str, str, bool], b: tuple[str, str, bool]) -> str:
    if a[0] != b[0]:
        return f"cell {i} is {a[0]} in the .ipynb but {b[0]} in the .py"
    if a[2] != b[2]:
        where = ".ipynb" if a[2] else ".py"
        return f"cell {i}: only the {where} tags it `parameters`"
    first = next(n for n, (x, y) in enumerate(zip(a[1].splitlines() + [""], b[1].splitlines() + [""]))
                 if x != y)
    return f"cell {i} ({a[0]}) differs at its line {first + 1}"


def pair_problems(folder: Path) -> list[str]:
    """Disagreements between each numbered notebook in ``folder`` and its paired script."""
    problems = []
    notebooks = {p.stem for p in folder.glob("[0-9][0-9]_*.ipynb")}
    scripts = {p.stem for p in folder.glob("[0-9][0-9]_*.py")}
    problems += [f"{s}.ipynb has no paired {s}.py" for s in sorted(notebooks - scripts)]
    problems += [f"{s}.py has no paired {s}.ipynb" for s in sorted(scripts - notebooks)]
    for stem in sorted(notebooks & scripts):
        ipynb = nbformat.read(folder / f"{stem}.ipynb", as_version=4)
        script = jupytext.read(folder / f"{stem}.py")
        fmt = script.metadata.get("jupytext", {}).get("text_representation", {}).get("format_name")
        if fmt != "percent":
            problems.append(f"{stem}.py is not in jupytext's py:percent format (found {fmt!r})")
        a, b = _cells(ipynb), _cells(script)
        diffs = [_describe(i, x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y]
        if len(a) != len(b):
            diffs.insert(0, f"{len(a)} cells in the .ipynb, {len(b)} in the .py")
        problems += [f"{stem}: {d}" for d in diffs[:3]]
    return problems


# ------------------------------------------------------------------------------ the real pairs
def test_every_notebook_agrees_with_its_script():
    assert sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb")), "no notebooks found"
    problems = pair_problems(NOTEBOOK_DIR)
    assert not problems, "\n".join(problems) + f"\n({SYNC_HINT})"


def test_the_pairing_is_declared_for_jupytext():
    """JupyterLab's jupytext extension pairs new notebooks through notebooks/jupytext.toml, and
    each notebook says so in its own metadata too (so that it stays paired wherever it is opened)."""
    config = tomllib.loads((NOTEBOOK_DIR / "jupytext.toml").read_text())
    assert config.get("formats") == PAIRING
    for path in sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb")):
        formats = nbformat.read(path, as_version=4).metadata.get("jupytext", {}).get("formats")
        assert formats == PAIRING, f"{path.name}: jupytext formats {formats!r}, expected {PAIRING!r}"


def test_every_notebook_has_one_parameters_cell():
    """papermill injects the profile after the cell tagged `parameters` (make study)."""
    for path in sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py")):
        tagged = [c for c in jupytext.read(path).cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged `parameters`"
        assert tagged[0].cell_type == "code" and "PROFILE" in tagged[0].source


# ------------------------------------------------------------------------------ the check itself
def _copy_pair(dest: Path) -> str:
    stem = "03_penalty_sweep"
    for ext in (".ipynb", ".py"):
        shutil.copy(NOTEBOOK_DIR / f"{stem}{ext}", dest / f"{stem}{ext}")
    return stem


def _edit_script(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _edit_notebook(path: Path, edit) -> None:
    nb = nbformat.read(path, as_version=4)
    edit(nb)
    nbformat.write(nb, path)


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


MUTATIONS = {
    "code edited in the .py": (
        lambda d, s: _edit_script(d / f"{s}.py", "import numpy as np\n", "import numpy as np  # new\n"),
        "cell 2 (code) differs at its line 1"),
    "markdown edited in the .ipynb": (
        lambda d, s: _edit_notebook(d / f"{s}.ipynb",
                                    lambda nb: setattr(nb.cells[0], "source", nb.cells[0].source + " More.")),
        "cell 0 (markdown) differs"),
    "parameters tag dropped from the .ipynb": (
        lambda d, s: _edit_notebook(d / f"{s}.ipynb", lambda nb: _code_cells(nb)[0].metadata.pop("tags")),
        "cell 1: only the .py tags it `parameters`"),
    "cell type changed in the .ipynb": (
        lambda d, s: _edit_notebook(d / f"{s}.ipynb", lambda nb: nb.cells.__setitem__(
            0, nbformat.v4.new_code_cell(nb.cells[0].source))),
        "cell 0 is code in the .ipynb but markdown in the .py"),
    "cell added to the .py": (
        lambda d, s: _edit_script(d / f"{s}.py", "# %% [markdown]\n", "# %%\nx = 1\n\n# %% [markdown]\n"),
        "cells in the .ipynb"),
    "script missing": (
        lambda d, s: (d / f"{s}.py").unlink(),
        "03_penalty_sweep.ipynb has no paired 03_penalty_sweep.py"),
    "script in light format instead of percent": (
        lambda d, s: jupytext.write(jupytext.read(d / f"{s}.py"), d / f"{s}.py", fmt="py:light"),
        "is not in jupytext's py:percent format"),
}


def test_the_check_passes_an_unchanged_copy_of_a_pair(tmp_path):
    _copy_pair(tmp_path)
    assert pair_problems(tmp_path) == []


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_the_check_catches_a_disagreeing_pair(tmp_path, mutation):
    stem = _copy_pair(tmp_path)
    mutate, expected = MUTATIONS[mutation]
    mutate(tmp_path, stem)
    problems = pair_problems(tmp_path)
    assert any(expected in p for p in problems), problems


# ------------------------------------------------------------------------------ ruff
def _ruff(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args],
                          cwd=cwd, capture_output=True, text=True)


def test_notebook_code_passes_ruff():
    """ruff with pyproject's [tool.ruff] over notebooks/: the .py scripts (every rule but line
    length, since markdown cells are comments there) and the .ipynb (ruff reads code cells only)."""
    listed = _ruff("--show-files", "notebooks", cwd=ROOT)
    checked = {Path(line.strip()).name for line in listed.stdout.splitlines()}
    expected = {p.name for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.*") if p.suffix in (".py", ".ipynb")}
    assert expected and expected <= checked, f"ruff does not check {sorted(expected - checked)}"
    result = _ruff("--output-format", "concise", "notebooks", cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


SCRIPT = '''# %% tags=["parameters"]
PROFILE = None

# %%
{imports}
print(PROFILE, config)
'''


LONG = "label = '" + "x" * 110 + "'"


@pytest.mark.parametrize("imports, findings", [
    # an import after the parameters cell (E402 in the script) is allowed
    ("from fa_study import config", set()),
    # an unused import is not, in either file
    ("import numpy as np\nfrom fa_study import config", {(".py", "F401"), (".ipynb", "F401")}),
    # nor an import redefined before use
    ("from fa_study import config\nfrom fa_study import config", {(".py", "F811"), (".ipynb", "F811")}),
    # a code line over 110 characters is caught on the .ipynb (the script leaves length alone)
    ("from fa_study import config\n" + LONG, {(".ipynb", "E501")}),
])
def test_the_ruff_check_catches_a_real_problem(tmp_path, imports, findings):
    """The repository's ruff config, applied to a paired notebook written to a temp dir."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "notebooks").mkdir()
    script = tmp_path / "notebooks" / "99_probe.py"
    script.write_text(SCRIPT.format(imports=imports))
    jupytext.write(jupytext.read(script), tmp_path / "notebooks" / "99_probe.ipynb")
    result = _ruff("--output-format", "concise", "notebooks", cwd=tmp_path)
    found = {(Path(line.split(":")[0]).suffix, line.split(": ")[1].split()[0])
             for line in result.stdout.splitlines() if line.startswith("notebooks")}
    assert found == findings, result.stdout + result.stderr
    assert result.returncode == (1 if findings else 0), result.stdout + result.stderr
