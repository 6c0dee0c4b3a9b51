"""Shared test settings: CPU only, small thread count, quick profile, no downloads."""
import os

import pytest
import torch

os.environ.setdefault("FA_STUDY_PROFILE", "quick")
# units in the test process (pytest-xdist already gives every core a worker; loky workers on top
# would oversubscribe them, and monkeypatched unit functions must run where they were patched);
# tests/test_units.py lifts it where it tests the parallel path
os.environ.setdefault("FA_STUDY_JOBS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(min(int(os.environ.get("OMP_NUM_THREADS", "2")), torch.get_num_threads()))


@pytest.fixture(scope="session")
def _standin_roots(tmp_path_factory):
    return tmp_path_factory.mktemp("no_real_data"), tmp_path_factory.mktemp("tensor_cache")


@pytest.fixture(autouse=True)
def standin_data(monkeypatch, _standin_roots):
    """Unit tests see no real dataset: an empty data root, the known roots left out, one tensor
    cache for the session. They then check the documented stand-ins, whatever the machine holds
    (CI puts the real MNIST on FA_STUDY_DATA for the notebooks). Tests of the real files pass
    their roots explicitly. The environment is restored after each test, so the notebooks that
    nbval runs in this process see the caller's data path."""
    empty, tensors = _standin_roots
    monkeypatch.setenv("FA_STUDY_DATA", str(empty))
    monkeypatch.setenv("FA_STUDY_DATA_KNOWN", "0")
    monkeypatch.setenv("FA_STUDY_TENSOR_CACHE", str(tensors))
    monkeypatch.setenv("FA_STUDY_OFFLINE", "1")


@pytest.fixture
def fresh_data_state(monkeypatch, tmp_path):
    """An empty data directory as the only data root (the known roots left out), its own
    tensor cache, no downloads, and the loader's in-process memo cleared."""
    from fa_study import data

    monkeypatch.setenv("FA_STUDY_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("FA_STUDY_DATA_KNOWN", "0")
    monkeypatch.setenv("FA_STUDY_TENSOR_CACHE", str(tmp_path / "tensor_cache"))
    monkeypatch.setenv("FA_STUDY_OFFLINE", "1")
    monkeypatch.setattr(data, "_MEMO", {})
    monkeypatch.setattr(data, "_ANNOUNCED", set())
    return tmp_path / "data"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty results cache (``FA_STUDY_CACHE``) for one test."""
    monkeypatch.setenv("FA_STUDY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory, request):
    """A results cache shared by the tests of one module, so later tests reuse earlier runs."""
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]) / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FA_STUDY_CACHE", str(path))
        yield path


@pytest.fixture
def fail_runs(monkeypatch):
    """``fail_runs(*labels)``: runs whose label is one of ``labels`` raise inside training
    (``RuntimeError: injected failure of <label>``), which :func:`fa_study.runs.execute` records
    with ``status="error"``; the others train as specified. Patches ``execute`` (cache entries go
    under the wrapper's name, so no real run's entry is touched)."""
    from fa_study import runs
    from fa_study import train as train_module

    def fail(*labels: str) -> None:
        original, real_train = runs.execute, train_module.train

        def execute_with_failures(spec, fingerprint="", callback=None):
            if spec.label not in labels:
                return original(spec, fingerprint, callback)

            def broken(*args, **kwargs):
                raise RuntimeError(f"injected failure of {spec.label}")

            train_module.train = broken
            try:
                return original(spec, fingerprint, callback)
            finally:
                train_module.train = real_train

        monkeypatch.setattr(runs, "execute", execute_with_failures)

    return fail
