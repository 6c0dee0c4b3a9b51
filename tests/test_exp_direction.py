"""Notebook 04's study: direction quality of vanilla against penalised DFA (config, reading, panel)."""
import math

import numpy as np
import pandas as pd
import pytest
from study_helpers import assert_not_drawn, diverge, html_outputs, output_mimes, run_panel

from fa_study import runs as runs_mod
from fa_study import widgets
from fa_study.experiments.direction import (DirectionStudy, direction_readings,
                                            direction_view, reading_sentences, run_direction)
from fa_study.experiments.penalty import PenaltyStudy
from fa_study.runs import Results

# tiny runs: 2 epochs of 384 synthetic-CIFAR images on a d=16 ResidualMLP
TINY = dict(d=16, epochs=2, n_train=384, n_test=128, null_draws=3, seeds=(3,))


# ---------------------------------------------------------------------------- config

def test_study_rejects_bad_values_with_clear_errors():
    with pytest.raises(ValueError, match="lam"):
        DirectionStudy(lam=0.0)  # the penalised arm needs a penalty
    with pytest.raises(ValueError, match="lam"):
        DirectionStudy(lam=float("nan"))
    with pytest.raises(ValueError, match="'fa', 'dfa'"):
        DirectionStudy(rule="grape")
    with pytest.raises(ValueError, match="grad_clip"):
        DirectionStudy(grad_clip=-1.0)
    with pytest.raises(ValueError, match="read_layer"):
        DirectionStudy(read_layer=-1)
    with pytest.raises(ValueError, match="seeds"):
        DirectionStudy(seeds=("a",))
    with pytest.raises(ValueError, match="must not repeat a seed"):
        DirectionStudy(seeds=(1, 2, 1))
    with pytest.raises(ValueError, match="unknown setting"):
        DirectionStudy.for_profile("quick", lambda_=0.01)
    paper = DirectionStudy.for_profile("paper")
    assert (paper.epochs, paper.lam, paper.grad_clip) == (100, 1e-2, 1.0)  # 004's settings
    assert DirectionStudy(**TINY).layer == 2 and DirectionStudy(read_layer=4, **TINY).layer == 4


def test_a_layer_the_model_lacks_is_refused_before_anything_trains(cache, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a run was started")

    monkeypatch.setattr(runs_mod, "execute", no_training)
    with pytest.raises(ValueError, match=r"read_layer must be one of 0\.\.4 .*got 99"):
        DirectionStudy(read_layer=99, **TINY)
    with pytest.raises(ValueError, match=r"read_layer must be one of 0\.\.2"):
        DirectionStudy(read_layer=3, **{**TINY, "num_blocks": 2})
    with pytest.raises(ValueError, match="read_layer"):
        direction_view(DirectionStudy.for_profile("quick", **TINY), read_layer=9)
    assert not cache.exists() or not any((cache / "results").glob("*/*.json"))


def test_specs_pair_vanilla_and_penalised_and_match_notebook_03():
    study = DirectionStudy(**TINY)
    specs = study.specs()
    assert [(s.rule, dict(s.options).get("penalty", 0.0), s.train.grad_clip) for s in specs] == \
        [("dfa", 0.0, 1.0), ("dfa", 0.01, 1.0)]
    assert study.arms() == ["dfa", "dfa λ=0.01"] == [s.label for s in specs]
    assert all(s.read.null_draws == 3 for s in specs)
    # without clipping the runs are notebook 03's vanilla and λ = 1e-2 runs (shared cache entries)
    sweep = PenaltyStudy(lambdas=(0.0, 0.01), **TINY)
    assert set(DirectionStudy(grad_clip=None, **TINY).specs()) <= set(sweep.specs())


# ---------------------------------------------------------------------------- reading

def _layers(cos_by_seed, g_by_seed, arm="dfa λ=0.01"):
    rows = []
    for seed, (cos, g) in enumerate(zip(cos_by_seed, g_by_seed)):
        for layer, (c, gn) in enumerate(zip(cos, g)):
            rows.append({"arm": arm, "seed": seed, "penalty": 0.01, "layer": layer, "cos_mean": c,
                         "cos_std": 0.1, "g_norm_median": gn, "a_norm_median": 2.0,
                         "reading": "poor" if abs(c) < 0.05 else "mediocre"})
    return pd.DataFrame(rows)


def test_readings_apply_the_preregistered_thresholds_to_the_seed_means():
    # layer 0: healthy, mean 0.30 -> reasonable; layer 1: mean 0.04 -> poor although one seed is
    # mediocre; layer 2: mean 0.10 -> mediocre; layer 3: ||g|| = 1e-8 -> reference unhealthy
    lay = _layers([[0.3, -0.02, 0.1, 0.3], [0.3, 0.10, 0.1, 0.3]], [[1e-4] * 3 + [1e-8]] * 2)
    t = direction_readings(lay)
    assert list(t["reading"]) == ["reasonable", "poor", "mediocre", "reference unhealthy"]
    assert t.loc[1, "cos_mean"] == pytest.approx(0.04) and t.loc[1, "n"] == 2
    assert t.loc[1, "seed_readings"] in ("poor ×1, mediocre ×1", "mediocre ×1, poor ×1")
    half = 12.706204736174707 * np.std([-0.02, 0.10], ddof=1) / math.sqrt(2)  # t(0.975, 1)
    assert t.loc[1, "cos_ci"] == pytest.approx(half)
    text = reading_sentences(t, layer=1)["dfa λ=0.01"]
    assert "POOR" in text and "layer 1" in text
    assert "not healthy" in reading_sentences(t, layer=3)["dfa λ=0.01"]


# ---------------------------------------------------------------------------- runs, view, panel

def test_run_direction_returns_tidy_per_layer_results(module_cache):
    res = run_direction(DirectionStudy.for_profile("quick", **TINY))
    assert isinstance(res, Results) and res.units == 2 and res.from_cache == 0
    lay = res.layers
    assert {"arm", "rule", "seed", "penalty", "layer", "cos_mean", "cos_std", "g_norm_median",
            "a_norm_median", "reading"} <= set(lay.columns)
    assert sorted(set(lay["layer"])) == [0, 1, 2, 3, 4] and set(lay["arm"]) == {"dfa", "dfa λ=0.01"}
    assert (lay["g_norm_median"] > 0).all() and lay["cos_mean"].between(-1, 1).all()
    assert res.history["data_source"].notna().all() and "data_source" in res.runs
    assert set(res.history["grad_clip"]) == {1.0}
    assert set(res.null["arm"]) == {"dfa", "dfa λ=0.01"}


def test_panel_reads_new_settings_and_serves_a_repeat_from_the_cache(module_cache, monkeypatch):
    monkeypatch.setitem(DirectionStudy.PROFILES, "quick", TINY)
    panel = widgets.ControlPanel(DirectionStudy, direction_view, profile="quick", live_keys=("loss",))
    assert {"lam", "seeds", "epochs", "grad_clip"} <= set(panel.controls)
    assert panel.study() == DirectionStudy.for_profile("quick")  # defaults = the baseline run
    run_panel(panel, lam=0.1, seeds="5", epochs=1, grad_clip=0.5)
    res = panel.last_result
    cfg = res.config
    assert cfg.lam == pytest.approx(0.1) and cfg.seeds == (5,) and cfg.epochs == 1 and cfg.grad_clip == 0.5
    assert res.from_cache == 0 and res.units == 2
    assert set(res.readings["arm"]) == set(cfg.arms()) and len(res.readings) == 10
    t = res.table.set_index("arm")
    assert list(t.index) == cfg.arms() and (t["layer"] == 2).all()  # read at L // 2, as 004
    assert set(t["reading"]) <= {"reference unhealthy", "poor", "mediocre", "reasonable"}
    mimes = output_mimes(panel.output)
    assert "image/png" in mimes and "text/html" in mimes
    html = html_outputs(panel.output)
    assert any(cfg.arms()[1] in h and "cos_at_layer" in h for h in html)
    notes = "".join(o.get("text", "") for o in panel.output.outputs)
    assert "layer 2: cos(a, g)" in notes  # 004's verdict sentence for each arm
    panel.run_button.click()
    assert panel.last_result.from_cache == panel.last_result.units == 2


def test_view_draws_one_figure(module_cache):
    res = direction_view(DirectionStudy.for_profile("quick", **TINY))
    assert res.units == 2 and res.from_cache == 2  # the runs of test_run_direction
    assert len(res.figures) == 1 and len(res.figures[0].axes) == 3
    assert res.figures[0].axes[1].get_yscale() == "log" and res.figures[0].axes[2].get_yscale() == "log"
    assert isinstance(res.audit, Results) and set(res.readings["arm"]) == {"dfa", "dfa λ=0.01"}


def test_view_with_every_run_diverged_says_so(module_cache):
    res = direction_view(DirectionStudy.for_profile("quick", lr=1e6, **TINY))
    assert set(res.audit.runs["status"]) == {"diverged"}
    assert res.figures == [] and res.readings.empty
    # the table still has a row per arm: nothing read, and why
    t = res.table.set_index("arm")
    assert list(t.index) == ["dfa", "dfa λ=0.01"] and (t["status"] == "diverged").all()
    assert (t["reading"] == "n/a").all() and (t["n"] == 0).all() and (t["error"] == "").all()
    assert "No run finished: nothing to read." in res.notes
    assert any(n.startswith("Diverged runs") and "dfa λ=0.01 (seed 3)" in n for n in res.notes)


def test_view_leaves_a_diverged_run_out_of_the_plots(module_cache, monkeypatch):
    diverge(monkeypatch, "dfa")
    res = direction_view(DirectionStudy.for_profile("quick", **TINY))
    assert res.audit.runs.set_index("arm")["status"].to_dict() == {"dfa": "diverged", "dfa λ=0.01": "ok"}
    assert_not_drawn(res.figures, "dfa")
    t = res.table.set_index("arm")
    assert t.loc["dfa", "reading"] == "n/a" and t.loc["dfa λ=0.01", "reading"] != "n/a"
