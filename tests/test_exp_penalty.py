"""Notebook 03's study: the residual-branch penalty sweep (config, runs, summary, panel)."""
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from study_helpers import assert_not_drawn, diverge, html_outputs, output_mimes, run_panel

from fa_study import widgets
from fa_study.experiments.audit import AuditStudy, audit_spec
from fa_study.experiments.penalty import (PenaltyStudy, arm_colours, parse_lambdas,
                                          penalty_runs, penalty_view, run_penalty)
from fa_study.runs import Results

# tiny runs: 2 epochs of 384 synthetic-CIFAR images on a d=16 ResidualMLP
TINY = dict(d=16, epochs=2, n_train=384, n_test=128, null_draws=3, seeds=(3,))


# ---------------------------------------------------------------------------- config

def test_parse_lambdas_reads_text_and_sequences():
    assert parse_lambdas("0, 1e-4, 1e-2") == (0.0, 1e-4, 1e-2)
    assert parse_lambdas("1e-2; 0") == (0.0, 0.01)  # sorted
    assert parse_lambdas([0.01, 0, 0.01]) == (0.0, 0.01)  # repeats dropped
    assert parse_lambdas(0.5) == (0.5,)
    for bad in ("0, ten", "-1e-3", "nan", "", "inf", [True]):
        with pytest.raises(ValueError, match="lambdas"):
            parse_lambdas(bad)


def test_study_rejects_bad_values_with_clear_errors():
    with pytest.raises(ValueError, match="takes the residual-branch penalty.*'fa', 'dfa'"):
        PenaltyStudy(rule="bp")
    with pytest.raises(ValueError, match="'fa', 'dfa'"):
        PenaltyStudy(rule="layer_fa")  # a layer rule takes no penalty
    with pytest.raises(ValueError, match="arch"):
        PenaltyStudy(arch="resmlp_d1024")
    with pytest.raises(ValueError, match="epochs"):
        PenaltyStudy(epochs=0)
    with pytest.raises(ValueError, match="null_draws"):
        PenaltyStudy(null_draws=1)
    with pytest.raises(ValueError, match="grad_clip"):
        PenaltyStudy(grad_clip=0.0)
    with pytest.raises(ValueError, match="seeds"):
        PenaltyStudy(seeds=())
    with pytest.raises(ValueError, match="must not repeat a seed"):
        PenaltyStudy(seeds=(3, 3))
    with pytest.raises(ValueError, match="lambdas"):
        PenaltyStudy(lambdas="0, -1")
    with pytest.raises(ValueError, match="unknown setting"):
        PenaltyStudy.for_profile("quick", lambda_=(0.0,))
    assert PenaltyStudy(lambdas="1e-2, 0").lambdas == (0.0, 0.01)  # the panel's text box
    assert PenaltyStudy.for_profile("paper").epochs == 30  # 003's sweep length


def test_specs_are_the_audit_specs_notebook_02_would_build():
    """Equal settings give equal cache keys: a run notebook 02 trained is reused here."""
    kw = dict(d=64, epochs=5, n_train=4000, n_test=1000, null_draws=20)
    study = PenaltyStudy(lambdas=(0.0, 0.01), seeds=(42,), **kw)
    audit = AuditStudy(rules=("bp", "dfa"), seeds=(42,), **kw)
    assert study.spec("bp", 42) == audit.spec("bp", "resmlp", 42)
    assert study.spec("dfa", 42) == audit.spec("dfa", "resmlp", 42)
    penalised = AuditStudy(rules=("dfa",), seeds=(42,), penalty=0.01, **kw)
    assert study.spec("dfa", 42, 0.01) == penalised.spec("dfa", "resmlp", 42)
    assert study.spec("dfa", 42, 0.01) == audit_spec("dfa", "resmlp", 42, options={"penalty": 0.01}, d=64,
                                                      epochs=5, n_train=4000, n_test=1000, null_draws=20)
    specs = study.specs()
    assert [(s.rule, dict(s.options).get("penalty", 0.0)) for s in specs] == \
        [("bp", 0.0), ("dfa", 0.0), ("dfa", 0.01)]
    assert specs[0].read.null_draws == 0 and specs[1].read.null_draws == 20  # no null for BP
    assert study.arms() == ["bp", "dfa", "dfa λ=0.01"] == [s.label for s in specs]
    with pytest.raises(ValueError, match="rule"):
        study.spec("fa", 42)


def test_arm_colours_come_from_the_specs_fixed_for_rules_and_distinct():
    specs = PenaltyStudy(lambdas=(0.0, 1e-4, 1e-2), seeds=(1, 2)).specs()
    cols = arm_colours(specs)
    assert list(cols) == ["bp", "dfa", "dfa λ=0.0001", "dfa λ=0.01"]  # the specs' order, once per arm
    assert len(set(cols.values())) == 4
    from fa_study.plots import RULE_COLOURS

    assert cols["bp"] == RULE_COLOURS["bp"] and cols["dfa"] == RULE_COLOURS["dfa"]
    # the same λ has the same colour in notebook 04, which runs only vanilla and λ = 1e-2
    from fa_study.experiments.direction import DirectionStudy

    nb04 = arm_colours(DirectionStudy(lam=1e-2, seeds=(1,)).specs())
    assert nb04 == {"dfa": cols["dfa"], "dfa λ=0.01": cols["dfa λ=0.01"]}
    # read from the specs, not parsed from labels: a rule whose label carries another option
    # is not taken for a penalised arm
    from fa_study.runs import ModelSpec, RunSpec

    layer = RunSpec(rule="layer_fa", model=ModelSpec("mlp"), options={"init": "sparse"})
    assert arm_colours([layer]) == {"layer_fa init=sparse": RULE_COLOURS["layer_fa"]}


# ---------------------------------------------------------------------------- runs

def test_run_penalty_is_tidy_cached_and_consistent(module_cache):
    study = PenaltyStudy.for_profile("quick", lambdas=(0.0, 1.0), **TINY)
    res = run_penalty(study)
    assert isinstance(res, Results) and res.units == 3 and res.from_cache == 0
    hist = res.history
    assert {"arm", "rule", "seed", "penalty", "epoch", "test_acc", "h_norm_4", "g_norm_4", "cos_4", "status",
            "data_source"} <= set(hist.columns)
    assert set(hist["arm"]) == {"bp", "dfa", "dfa λ=1"} and set(hist["epoch"]) == {0, 1, 2}
    assert hist["data_source"].notna().all()
    assert dict(zip(hist["arm"], hist["penalty"])) == {"bp": 0.0, "dfa": 0.0, "dfa λ=1": 1.0}
    runs = penalty_runs(res)
    # the audit's ||h_L|| is the history's last-epoch value (same model, same 128 test images)
    last = hist[hist["epoch"] == 2].set_index("arm")["h_norm_4"]
    assert np.allclose(runs.set_index("arm")["h_L"], last.loc[runs["arm"]].to_numpy(), rtol=1e-5)
    assert runs.loc[runs["arm"] == "bp", "h_L_vs_bp"].item() == pytest.approx(1.0)
    # the null is drawn for the rule's runs only, with n_draws fresh draws
    assert set(res.null["arm"]) == {"dfa", "dfa λ=1"}
    assert runs.loc[runs["arm"] == "bp", "z_score"].isna().all()
    r = runs.set_index("arm")
    assert r.loc["dfa λ=1", "h_L_vs_bp"] == pytest.approx(r.loc["dfa λ=1", "h_L"] / r.loc["bp", "h_L"])
    d = r.loc["dfa"]
    z = (d["training_deep_cos"] - d["fresh_deep_mean"]) / d["fresh_deep_std"]
    assert d["z_score"] == pytest.approx(z)
    # the penalty is part of the run: the two rule runs differ (same seed, same init)
    assert r.loc["dfa λ=1", "h_L"] != r.loc["dfa", "h_L"]
    assert hist.loc[hist["epoch"] == 0, "h_norm_4"].nunique() == 1  # one init for all arms
    again = run_penalty(study)
    assert again.from_cache == again.units == 3
    pd.testing.assert_frame_equal(again.history, hist)


# ---------------------------------------------------------------------------- view and panel

def test_panel_runs_the_sweep_and_serves_a_repeat_from_the_cache(module_cache, monkeypatch):
    monkeypatch.setitem(PenaltyStudy.PROFILES, "quick", TINY)
    panel = widgets.ControlPanel(PenaltyStudy, penalty_view, profile="quick", live_keys=("loss",))
    assert {"lambdas", "seeds", "epochs"} <= set(panel.controls)
    assert panel.study() == PenaltyStudy.for_profile("quick")  # defaults = the baseline run
    run_panel(panel, lambdas="0, 0.5", seeds="5", epochs=1)  # new settings: three cold runs
    res = panel.last_result
    assert res.config.lambdas == (0.0, 0.5) and res.config.seeds == (5,) and res.config.epochs == 1
    assert set(res.results["arm"]) == {"bp", "dfa", "dfa λ=0.5"} and set(res.results["epoch"]) == {0, 1}
    assert len(res.figures) == 2 and isinstance(res.audit, Results) and res.audit is res.extra
    mimes = output_mimes(panel.output)
    assert mimes.count("image/png") >= 2 and "text/html" in mimes
    html = html_outputs(panel.output)
    assert any("dfa λ=0.5" in h and "h_L_vs_bp" in h for h in html)
    assert res.from_cache == 0 and res.units == 3
    panel.run_button.click()
    assert panel.last_result.from_cache == panel.last_result.units == 3
    panel.controls["lambdas"].value = "zero"
    panel.run_button.click()
    assert isinstance(panel.last_error, ValueError) and "lambdas" in str(panel.last_error)


def test_view_table_has_one_row_per_arm_with_mean_ci_text(module_cache):
    study = PenaltyStudy.for_profile("quick", lambdas=(0.0,), **{**TINY, "seeds": (3, 4)})
    res = penalty_view(study)
    assert res.units == 4
    t = res.table
    assert list(t["arm"]) == ["bp", "dfa"] and list(t["n"]) == [2, 2]
    assert t["test_acc_text"].str.contains("±").all()
    assert math.isnan(t.set_index("arm").loc["bp", "z_score"])
    assert any("synthetic" in n for n in res.notes)


def test_view_with_every_run_diverged_returns_and_names_them(module_cache):
    study = PenaltyStudy.for_profile("quick", lambdas=(0.0, 1.0), lr=1e6, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "Data has no positive values" on a log axis
        res = penalty_view(study)  # no "Data cannot be log-scaled"
    runs = res.audit.runs
    assert set(runs["status"]) == {"diverged"} and set(runs["verdict"]) == {"DIVERGED"}
    notes = [n for n in res.notes if n.startswith("Diverged runs")]
    assert len(notes) == 1
    for arm in ("bp", "dfa", "dfa λ=1"):
        assert f"{arm} (seed 3)" in notes[0]
    assert len(res.figures) == 2
    assert all(not ax.lines for fig in res.figures for ax in fig.axes)  # nothing to draw, nothing drawn
    t = res.table.set_index("arm")
    assert list(t.index) == ["bp", "dfa", "dfa λ=1"] and (t["test_acc_text"] == "n/a").all()
    assert (t["verdicts"] == "DIVERGED ×1").all()


def test_view_leaves_a_diverged_run_out_of_the_plots(module_cache, monkeypatch):
    diverge(monkeypatch, "dfa λ=1")
    res = penalty_view(PenaltyStudy.for_profile("quick", lambdas=(0.0, 1.0), **TINY))
    status = res.audit.runs.set_index("arm")["status"]
    assert status.to_dict() == {"bp": "ok", "dfa": "ok", "dfa λ=1": "diverged"}
    assert any(n.startswith("Diverged runs") and "dfa λ=1 (seed 3)" in n for n in res.notes)
    assert_not_drawn(res.figures, "dfa λ=1")
    curves = res.figures[0].axes[0]
    assert [ln.get_label() for ln in curves.lines] == ["bp", "dfa"]
    assert res.table.set_index("arm").loc["dfa λ=1", "test_acc_text"] == "n/a"
