"""`make study`'s runner: executes notebooks with the profile injected and writes the report."""
import json
import os

import nbformat
import pytest

from fa_study import study


@pytest.fixture(autouse=True)
def _restore_environ(monkeypatch):
    """main() exports the profile, the report directory and the core share to its kernels."""
    before = dict(os.environ)
    monkeypatch.setenv("FA_STUDY_CORES", "5")  # the budget a caller gave (split between kernels)
    yield
    os.environ.clear()
    os.environ.update(before)


def test_no_notebooks_still_succeeds(tmp_path, capsys):
    (tmp_path / "nb").mkdir()
    rc = study.main(["--profile", "quick", "--notebooks", str(tmp_path / "nb"), "--out", str(tmp_path / "r")])
    assert rc == 0
    assert "No notebooks found" in capsys.readouterr().out
    assert (tmp_path / "r" / "summary.md").exists()


def test_bad_profile_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="'quick', 'default', 'paper'"):
        study.main(["--profile", "fastest", "--notebooks", str(tmp_path), "--out", str(tmp_path / "r")])


def test_executes_a_notebook_with_injected_profile_and_key_numbers(tmp_path, capsys):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("PROFILE = None")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "import os\nfrom fa_study import study, config\n"
        "p = config.get_profile(PROFILE)\n"
        "assert p == os.environ['FA_STUDY_PROFILE']\n"
        "study.record('01_demo', {'profile': p, 'answer': 42.123456})")]
    folder = tmp_path / "nb"
    folder.mkdir()
    nbformat.write(nb, str(folder / "01_demo.ipynb"))
    rc = study.main(["--profile", "quick", "--notebooks", str(folder), "--out", str(tmp_path / "r")])
    assert rc == 0, capsys.readouterr().out
    keys = json.loads((tmp_path / "r" / "01_demo.keys.json").read_text())
    assert keys == {"profile": "quick", "answer": 42.12}
    assert (tmp_path / "r" / "01_demo.html").stat().st_size > 1000
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert "answer: 42.12" in summary


def test_a_failing_notebook_is_reported_and_the_exit_code_says_so(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("raise RuntimeError('boom')")]
    folder = tmp_path / "nb"
    folder.mkdir()
    nbformat.write(nb, str(folder / "02_fail.ipynb"))
    rc = study.main(["--profile", "quick", "--notebooks", str(folder), "--out", str(tmp_path / "r")])
    assert rc == 1
    assert "FAILED" in (tmp_path / "r" / "summary.md").read_text()


def test_two_notebooks_at_once_report_in_notebook_order(tmp_path):
    """--jobs 2: both notebooks run (one fails), the summary keeps their order, the exit code says so."""
    folder = tmp_path / "nb"
    folder.mkdir()
    for name, source in [("01_ok", "import os\nfrom fa_study import study, units\n"
                                   "study.record('01_ok', {'x': 1.5, 'cores': units.core_budget()})"),
                         ("02_fail", "raise RuntimeError('boom')")]:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(source)]
        nbformat.write(nb, str(folder / f"{name}.ipynb"))
    rc = study.main(["--profile", "quick", "--notebooks", str(folder), "--out", str(tmp_path / "r"),
                     "--jobs", "2"])
    assert rc == 1
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert summary.index("## 01_ok  (ok") < summary.index("## 02_fail  (FAILED")
    assert "x: 1.5" in summary and "with 2 notebook(s) at a time" in summary
    # each of two kernels at once spreads its units over half the caller's 5 cores, rounded down
    assert "cores: 2" in summary


@pytest.mark.parametrize("jobs", ["0", "two", "1.5"])
def test_a_bad_job_count_is_refused_before_anything_runs(tmp_path, jobs):
    with pytest.raises(ValueError, match="--jobs .*positive integer.*" + repr(jobs)):
        study.main(["--profile", "quick", "--notebooks", str(tmp_path), "--out", str(tmp_path / "r"),
                    "--jobs", jobs])
