"""What every study shares (fa_study.experiments.core): settings by profile with unknown ones
refused, the last-epoch / finished-run / per-layer helpers, and a failed unit rendered by every
view as a named row while the other units' results are kept."""
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from fa_study import experiments
from fa_study.experiments import finished, last_epoch, layer_long


def test_profile_config_rejects_unknown_settings():
    with pytest.raises(ValueError, match="unknown setting"):
        experiments.RAStudy.for_profile("quick", epoch=3)
    with pytest.raises(ValueError, match="unknown setting.*'rules'"):
        experiments.RAStudy.for_profile("quick", arms=("bp", "ra_fa"))  # the old name of the field
    with pytest.raises(ValueError, match="'bp', 'ra_fa', 'ra_rev'"):
        experiments.RAStudy.for_profile("quick", rules=("bp", "backprop"))
    with pytest.raises(ValueError, match="must not repeat a seed"):
        experiments.RAStudy.for_profile("quick", seeds=(1, 1))
    with pytest.raises(ValueError, match="quick"):
        experiments.RAStudy.for_profile("fastest")
    assert experiments.RAStudy.for_profile("paper").seeds == (42, 123, 456)
    assert set(experiments.RAStudy.rule_choices()) == {"bp", "ra_fa", "ra_rev", "ra_recon", "ra_comb"}


def test_study_helpers_pick_last_rows_and_finished_runs():
    df = pd.DataFrame({"model": "m", "arm": ["a", "a", "b", "b", "b"], "seed": 0, "epoch": [0, 1, 0, 1, 2],
                       "status": ["ok", "diverged", "ok", "ok", "ok"], "h_0": [1.0, np.nan, 2.0, 3.0, 4.0],
                       "h_1": [5.0, np.nan, 6.0, 7.0, 8.0]})
    last = last_epoch(df)
    assert list(zip(last["arm"], last["epoch"])) == [("a", 1), ("b", 2)]  # a diverged run: its NaN row
    assert set(finished(df)["arm"]) == {"b"} and len(finished(df)) == 3
    assert finished(df.drop(columns="status")).equals(df.drop(columns="status"))
    long = layer_long(last, "h_")
    assert list(zip(long["arm"], long["layer"], long["h_"])) == [("b", 0, 4.0), ("b", 1, 8.0)]


# ---------------------------------------------------------------------------- failed runs in every view

def _view_cases():
    """view name -> (view function, tiny study, the label made to fail, the table's key column,
    a column the runs that trained fill in)."""
    from fa_study.experiments import audit, direction, feedback_tour, learned, penalty, ra_study

    tiny_audit = audit.AuditStudy.for_profile("quick", rules=("bp", "dfa"), seeds=(0,), d=16, num_blocks=2,
                                              epochs=1, n_train=256, n_test=128, null_draws=0)
    common = dict(d=16, epochs=1, n_train=256, n_test=128, null_draws=0, seeds=(3,))
    return {
        "tour": (feedback_tour.tour_view,
                 feedback_tour.FeedbackTour.for_profile(
                     "quick", rules=("bp", "layer_fa"), fa_inits=("gaussian",), seeds=(0,), hidden=16,
                     epochs=1, n_train=200, n_test=100, batch_size=50, record_every=2, probe_size=64),
                 "layer_fa", "arm", "test_acc"),
        "ra": (ra_study.ra_view,
               ra_study.RAStudy.for_profile("quick", rules=("bp", "ra_fa"), epochs=1, n_train=300, n_test=200,
                                            hidden=32),
               "ra_fa", "arm", "test_acc"),
        "audit": (audit.audit_view, tiny_audit, "dfa", "rule", "test_acc"),
        "blind_spot": (audit.blind_spot_view, tiny_audit, "dfa", "arm", "hL_init_ratio"),
        "penalty": (penalty.penalty_view,
                    penalty.PenaltyStudy.for_profile("quick", lambdas=(0.0, 1.0), **common),
                    "dfa", "arm", "test_acc"),
        "direction": (direction.direction_view, direction.DirectionStudy.for_profile("quick", **common),
                      "dfa λ=0.01", "arm", "test_acc"),
        "learned": (learned.learned_view,
                    learned.LearnedStudy.for_profile("quick", rules=("fa",), epochs=1, n_train=256,
                                                     n_test=128, d=16, num_blocks=2, seeds=(3,)),
                    "fa", "arm", "test_acc"),
    }


VIEWS = ("tour", "ra", "audit", "blind_spot", "penalty", "direction", "learned")


def _figure_texts(figures) -> str:
    """Every text written on the figures and their axes."""
    return "\n".join(t.get_text() for fig in figures
                     for t in [*fig.texts, *(x for ax in fig.axes for x in ax.texts)])


@pytest.mark.parametrize("name", VIEWS)
def test_every_view_renders_a_failed_unit_and_keeps_the_others(cache, fail_runs, name):
    from study_helpers import assert_not_drawn

    view, study, bad, key, value = _view_cases()[name]
    fail_runs(bad)
    out = view(study)
    status = out.extra.runs.set_index("arm")["status"]
    assert status[bad] == "error" and (status.drop(bad) == "ok").all(), status
    # the figures are drawn, the failed run is not, and is named under them with its error
    assert out.figures and all(isinstance(f, Figure) for f in out.figures)
    assert_not_drawn(out.figures, bad)
    assert f"{bad} (seed" in _figure_texts(out.figures) and "injected failure" in _figure_texts(out.figures)
    # the notes and the table name it with its error; the others' results are all there
    assert any(n.startswith("Failed runs") and f"{bad} (seed" in n and f"injected failure of {bad}" in n
               for n in out.notes), out.notes
    t = out.table
    row = t[t[key] == bad]
    assert len(row) >= 1 and row["error"].str.contains(f"RuntimeError: injected failure of {bad}").all()
    assert (row["status"] == "error").all() if "status" in t else (row["verdict"] == "ERROR").all()
    others = t[(t[key] != bad)]
    assert len(others) and np.isfinite(others[value].to_numpy(dtype=float)).all(), others
    assert (others["error"] == "").all()


@pytest.mark.parametrize("name", VIEWS)
def test_every_view_renders_when_every_unit_fails(cache, fail_runs, name):
    view, study, _, key, _ = _view_cases()[name]
    labels = list(dict.fromkeys(s.label for s in study.specs()))
    fail_runs(*labels)
    out = view(study)  # no KeyError: nothing trained, every run is a row
    assert set(out.extra.runs["status"]) == {"error"}
    assert set(out.table[key]) == set(labels), out.table
    assert out.table["error"].str.contains("injected failure").all()
    failed = [n for n in out.notes if n.startswith("Failed runs")]
    assert len(failed) == 1 and all(f"{a} (seed" in failed[0] for a in labels)
    assert isinstance(out.figures, list)
    if out.figures:
        assert "injected failure" in _figure_texts(out.figures)


def test_every_study_runner_is_named_where_it_lives():
    """study_runner's run_* functions carry their study module's name (help() shows where they
    are; pickle, which joblib and dask use, finds them by it)."""
    import importlib
    import pickle

    for module, name in (("audit", "run_audit"), ("direction", "run_direction"), ("penalty", "run_penalty"),
                         ("ra_study", "run_ra"), ("feedback_tour", "run_tour")):
        fn = getattr(importlib.import_module(f"fa_study.experiments.{module}"), name)
        assert (fn.__module__, fn.__name__) == (f"fa_study.experiments.{module}", name)
        assert pickle.loads(pickle.dumps(fn)) is fn
