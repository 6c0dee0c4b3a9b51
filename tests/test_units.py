"""Dispatch over the cores (fa_study.units): the core budget, and a parallel run equal to a
sequential one bit for bit, with progress, live replay and the cache as in a sequential run."""
import os
from pathlib import Path

import pandas as pd
import pytest

from fa_study import units
from fa_study.cache import ResultsCache, unit_name
from fa_study.units import core_budget, run_units, workers_for
from sweep_units import TorchSpec, torch_unit


def _pids(markers: Path) -> set[int]:
    return {int(f.name.split("-")[1]) for f in markers.iterdir()}


@pytest.fixture
def budget(monkeypatch):
    monkeypatch.delenv("FA_STUDY_JOBS", raising=False)
    monkeypatch.setenv("FA_STUDY_CORES", "2")


def test_the_core_budget_and_its_overrides(monkeypatch):
    monkeypatch.delenv("FA_STUDY_CORES", raising=False)
    monkeypatch.delenv("FA_STUDY_JOBS", raising=False)
    assert core_budget() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("FA_STUDY_CORES", "3")
    assert core_budget() == 3
    # None: min(units to compute, budget); one unit stays in this process; an int as given
    assert [workers_for(None, n) for n in (0, 1, 2, 5)] == [1, 1, 2, 3]
    assert [workers_for(4, 8), workers_for(4, 2), workers_for(1, 8), workers_for(-1, 8)] == [4, 2, 1, -1]
    monkeypatch.setenv("FA_STUDY_JOBS", "1")  # the sequential path, for everyone
    assert workers_for(None, 8) == 1 and workers_for(2, 8) == 2


@pytest.mark.parametrize("name", ["FA_STUDY_CORES", "FA_STUDY_JOBS"])
@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_budget_variable_is_refused_naming_it(monkeypatch, name, value):
    monkeypatch.delenv("FA_STUDY_JOBS", raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf"\${name} must be a positive integer .*got '{value}'"):
        workers_for(None, 4)


def test_a_parallel_run_equals_a_sequential_one_bit_for_bit(cache, tmp_path, monkeypatch, budget):
    specs = [TorchSpec(i, str(tmp_path / "markers")) for i in range(4)]
    (tmp_path / "markers").mkdir()
    monkeypatch.setenv("FA_STUDY_JOBS", "1")
    sequential, stats = run_units(torch_unit, specs)
    assert stats.computed == 4 and _pids(tmp_path / "markers") == {os.getpid()}
    monkeypatch.delenv("FA_STUDY_JOBS")
    monkeypatch.setenv("FA_STUDY_CACHE", str(tmp_path / "cache2"))
    for f in (tmp_path / "markers").iterdir():
        f.unlink()
    for _ in range(3):  # again if the package's source was edited meanwhile (workers then refuse)
        units.cache.code_fingerprint.cache_clear()  # the source as the workers will see it
        seen, replayed = [], []
        parallel, stats = run_units(torch_unit, specs, progress=lambda *a: seen.append(a),
                                    replay=lambda spec, payload: replayed.append(spec.i))
        if not stats.notes:
            break
        ResultsCache().clear()
        for f in (tmp_path / "markers").iterdir():
            f.unlink()
    assert stats.computed == 4 and not stats.notes
    assert os.getpid() not in _pids(tmp_path / "markers")  # computed by worker processes
    assert [s[0] for s in seen] == [1, 2, 3, 4] and {s[1:] for s in seen} == {(4, False)}
    assert sorted(replayed) == [0, 1, 2, 3]  # each worker's unit handed over as it finished
    for a, b in zip(sequential, parallel):  # payload by payload, bit for bit
        pd.testing.assert_frame_equal(a["history"], b["history"], check_exact=True)
        assert a["w"] == b["w"] and a["threads"] == b["threads"] == 1
    assert len(ResultsCache().entries(unit_name(torch_unit))) == 4  # each written by its worker
    again, stats = run_units(torch_unit, specs)
    assert stats.hits == 4 and len(_pids(tmp_path / "markers")) <= 2


def test_run_specs_in_workers_equals_a_sequential_run(cache, tmp_path, monkeypatch, budget):
    from test_runs import tiny

    from fa_study.runs import run_specs

    specs = [tiny("dfa", seed=0), tiny("bp", seed=1)]
    monkeypatch.setenv("FA_STUDY_JOBS", "1")
    sequential = run_specs(specs)
    monkeypatch.delenv("FA_STUDY_JOBS")
    monkeypatch.setenv("FA_STUDY_CACHE", str(tmp_path / "cache2"))
    records = []
    parallel = run_specs(specs, callback=records.append)
    for name in ("history", "runs", "layers", "null"):
        pd.testing.assert_frame_equal(getattr(sequential, name), getattr(parallel, name), check_exact=True)
    # the live callback saw each run's history, per epoch, once it finished in its worker
    assert {r["arm"] for r in records} == {"dfa", "bp"}
    assert all(r["loss"] == r["train_loss"] for r in records)


def _here_and_in_two_workers(specs, monkeypatch, tmp_path):
    """Run ``specs`` in this process, then over two workers with another empty cache; assert
    that the workers ran them all and equal this process bit for bit; return this process's."""
    from fa_study.runs import run_specs

    monkeypatch.setenv("FA_STUDY_JOBS", "1")
    here = run_specs(specs)
    monkeypatch.delenv("FA_STUDY_JOBS")
    monkeypatch.setenv("FA_STUDY_CACHE", str(tmp_path / "cache2"))
    there = run_specs(specs)
    assert (there.runs["status"] == "ok").all(), there.runs["error"].tolist()
    pd.testing.assert_frame_equal(here.history, there.history, check_exact=True)
    return here


def test_a_rule_registered_in_main_runs_in_the_workers(cache, tmp_path, monkeypatch, budget):
    """A rule a notebook registers (its class lives in ``__main__``, which a fresh worker does
    not have) travels with the tasks: the runs in two workers equal the runs in this process
    (before the fix, the workers refused it as an unknown rule)."""
    from test_runs import tiny

    from fa_study.rules import BP, RULES, register
    from fa_study.runs import run_specs

    class ShiftedBP(BP):  # BP with every gradient shifted by 0.01 (AdamW ignores a scale)
        name = "shifted_bp_in_main"

        def fill_grads(self, model, x, y):
            loss, logits = super().fill_grads(model, x, y)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.add_(0.01)
            return loss, logits

    ShiftedBP.__module__ = "__main__"  # as a notebook cell defines it; cloudpickle sends it by value
    monkeypatch.setitem(RULES, ShiftedBP.name, ShiftedBP)  # recorded as absent: removed after
    register(ShiftedBP)
    assert [(r, n) for r, n, _ in units.registered_in_main()] == [("rules", ShiftedBP.name)]
    specs = [tiny(ShiftedBP.name, seed=s) for s in (0, 1)]
    here = _here_and_in_two_workers(specs, monkeypatch, tmp_path)
    plain = run_specs([tiny("bp", seed=0)]).history  # the rule ran, not BP under its name
    assert not plain["train_loss"].equals(here.history[here.history["seed"] == 0]["train_loss"])


def test_an_architecture_registered_in_main_runs_in_the_workers(cache, tmp_path, monkeypatch, budget):
    """An architecture a notebook registers travels with the tasks and is registered in the
    worker as register_arch does it (its derived tables too): the runs in two workers equal the
    runs in this process (before the fix, a worker held it in ARCHITECTURES only and refused it
    as an unknown model)."""
    from test_runs import TINY_DATA, TINY_TRAIN

    from fa_study import models
    from fa_study.models.resmlp import ResidualMLP
    from fa_study.runs import ModelSpec, RunSpec, run_specs

    monkeypatch.setitem(models.ARCHITECTURES, "resmlp_in_main", None)  # recorded as absent: removed after
    monkeypatch.setitem(models.DEFAULTS, "resmlp_in_main", None)

    class PlainResMLP(ResidualMLP):  # the ResidualMLP without its terminal LayerNorm
        def __init__(self, input_shape, num_classes, d, num_blocks):
            super().__init__(input_shape, num_classes, d, num_blocks, final_norm=False)

    PlainResMLP.__module__ = "__main__"  # as a notebook cell defines it; cloudpickle sends it by value
    models.register_arch("resmlp_in_main", PlainResMLP, d=8, num_blocks=1)
    assert [(r, n) for r, n, _ in units.registered_in_main()] == [("architectures", "resmlp_in_main")]
    specs = [RunSpec("dfa", model=ModelSpec("resmlp_in_main"), data=TINY_DATA, train=TINY_TRAIN, seed=s)
             for s in (0, 1)]
    here = _here_and_in_two_workers(specs, monkeypatch, tmp_path)
    plain = run_specs([RunSpec("dfa", model=ModelSpec("resmlp", 8, 1), data=TINY_DATA, train=TINY_TRAIN,
                               seed=0)]).history  # the architecture ran, not resmlp under its name
    assert not plain["train_loss"].equals(here.history[here.history["seed"] == 0]["train_loss"])


def test_a_unit_that_raises_in_a_worker_fails_the_call_as_in_this_process(cache, tmp_path, budget):
    with pytest.raises(ValueError, match="bad unit"):
        run_units(_raising_unit, [TorchSpec(i, str(tmp_path)) for i in range(2)])


def _raising_unit(spec, fingerprint, callback=None):
    raise ValueError(f"bad unit {spec.i}")


def test_workers_get_the_callers_settings(cache, tmp_path, monkeypatch):
    """A task runs under exactly the caller's $FA_STUDY_* settings, whatever the (reused) worker
    had before: the one extra variable is gone, the caller's is there."""
    monkeypatch.setattr(os, "environ", dict(os.environ, FA_STUDY_SOMETHING="here"))  # restored after
    index, payload = units._call_as({"FA_STUDY_OTHER": "there"}, [], 7, _settings_unit,
                                    (TorchSpec(0, ""), ""))
    assert index == 7 and payload["env"] == {"FA_STUDY_OTHER": "there"}


def _settings_unit(spec, fingerprint, callback=None):
    return {"env": {k: v for k, v in os.environ.items() if k in ("FA_STUDY_SOMETHING", "FA_STUDY_OTHER")}}
