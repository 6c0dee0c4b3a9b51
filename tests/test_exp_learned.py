"""The learned-feedback study (notebook 05): config checks, tidy cached results, the panel."""
import dataclasses

import matplotlib
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from study_helpers import assert_not_drawn, diverge, html_outputs, output_mimes, run_panel  # noqa: E402

from fa_study import widgets  # noqa: E402
from fa_study.experiments.learned import LearnedStudy, learned_summary, learned_view, run_learned  # noqa: E402
from fa_study.runs import Results  # noqa: E402

TINY = dict(epochs=1, n_train=256, n_test=128, d=16, num_blocks=2, seeds=(3,))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: a second thread only adds synchronisation (slow on a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("bad,match", [
    (dict(rules=("fa", "kp")), "unknown rule 'kp'; allowed values: 'bp', 'frozen'"),
    (dict(rules=()), "rules must be a non-empty tuple"),
    (dict(rules=("ra_fa",)), "rule 'ra_fa' cannot train a 'resmlp' model"),
    (dict(dataset="imagenet"), "unknown dataset 'imagenet'"),
    # the per-rule settings are checked by their rule (named by the rule's option)
    (dict(stiefel_probe="weights"), "unknown probe 'weights'; allowed values: 'node', 'bp'"),
    (dict(rank=11), r"rank must be at most min\(d=64, 10 classes\) for stiefel_dfa, got 11"),
    (dict(rank=12, d=8), "rank must be at most"),
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(seeds=()), "seeds must be a non-empty tuple of distinct integers"),
    (dict(seeds=(3, 3)), "must not repeat a seed"),
    (dict(grape_eta_B=-0.1), "eta_B must be a finite number >= 0"),
    (dict(stiefel_tau=1.0), "tau must be a finite number >= 0 and < 1"),
    (dict(num_blocks=0), "num_blocks must be an integer >= 1"),
    (dict(n_train=0), "n_train must be an integer >= 1 or None"),
])
def test_config_rejects_bad_values_with_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        LearnedStudy.for_profile("quick", **bad)


def test_rule_settings_are_checked_only_for_the_rules_selected():
    # rank is Stiefel's: without stiefel_dfa it is not checked against d (nor at all)
    study = LearnedStudy.for_profile("quick", rules=("fa", "dfa"), rank=50, d=16)
    assert study.arms() == ["bp", "fa", "dfa", "frozen"]
    assert LearnedStudy.for_profile("quick", rules=("fa",), rank=0, stiefel_probe="weights").rules == ("fa",)
    assert LearnedStudy.for_profile("quick", rules=("dfa", "grape_fa"), grape_eta_B=0.3, stiefel_tau=2.0)
    with pytest.raises(ValueError, match="rank must be at most min"):
        LearnedStudy.for_profile("quick", rules=("fa", "stiefel_dfa"), rank=50, d=16)
    with pytest.raises(ValueError, match="eta_B"):
        LearnedStudy.for_profile("quick", rules=("grape_fa",), grape_eta_B=-1.0)


def test_profiles_specs_and_cache_keys():
    with pytest.raises(ValueError, match="unknown setting"):
        LearnedStudy.for_profile("quick", eta_B=0.1)
    assert LearnedStudy.for_profile("paper").seeds == (42, 123, 456)
    study = LearnedStudy.for_profile("quick", rules=("dfa", "grape_fa"), seeds=(1, 2))
    # the references are always run, in reading order
    assert study.arms() == ["bp", "grape_fa", "dfa", "frozen"]
    assert len(study.specs()) == 8 and [s.label for s in study.specs()[:4]] == study.arms()
    # a rule's spec carries only its own options: changing Stiefel's step keeps fa's cache entry
    other = dataclasses.replace(study, stiefel_eta_B=0.5, rank=3)
    assert other.spec("dfa", 1) == study.spec("dfa", 1)
    assert other.spec("stiefel_dfa", 1) != study.spec("stiefel_dfa", 1)
    assert dict(other.spec("stiefel_dfa", 1).options) == {"eta_B": 0.5, "rank": 3}
    # options equal to the rule's defaults are left out of the key (GrAPE's 0.1 and 32)
    assert study.spec("grape_fa", 1).options == ()
    assert dict(dataclasses.replace(study, grape_eta_B=0.2).spec("grape_fa", 1).options) == {"eta_B": 0.2}
    s = study.spec("dfa", 1)
    assert s.train.feedback_quality and not s.read.audit and not s.read.direction
    assert (s.model.arch, s.model.d, s.model.num_blocks) == ("resmlp", 64, 4)


def test_run_learned_is_tidy_with_feedback_readouts_and_cached(cache):
    study = LearnedStudy.for_profile("quick", rules=("grape_fa", "stiefel_dfa"), **TINY)
    results = run_learned(study)
    assert isinstance(results, Results) and results.units == 4 and results.from_cache == 0
    res = results.history
    assert set(res["arm"]) == {"bp", "grape_fa", "stiefel_dfa", "frozen"}
    assert set(res["epoch"]) == {0, 1} and set(res["seed"]) == {3}
    need = {"data_source", "test_acc", "cos_0", "cos_2", "deep_cos", "fb_align_0", "alpha_0", "rho_2",
            "deep_fb_align", "status", "eta_B", "rule", "model"}
    assert need <= set(res.columns)
    assert res["data_source"].notna().all()
    # the read-outs exist exactly where they are defined
    grape = res[res["arm"] == "grape_fa"]
    assert grape["fb_align_1"].notna().all() and grape["alpha_0"].isna().all()
    stiefel = res[res["arm"] == "stiefel_dfa"]
    assert stiefel[["alpha_0", "alpha_2", "rho_0", "fb_align_2"]].notna().all().all()
    assert res.loc[res["arm"] == "bp", "deep_cos"].eq(1.0).all()
    # deep_cos is the mean of the cosines below the top state
    row = grape.iloc[-1]
    assert row["deep_cos"] == pytest.approx((row["cos_0"] + row["cos_1"]) / 2)
    again = run_learned(study)
    assert again.from_cache == 4
    pd.testing.assert_frame_equal(res, again.history)
    table = learned_summary(res)
    assert list(table["arm"]) == ["bp", "grape_fa", "stiefel_dfa", "frozen"]
    assert {"test_acc_text", "deep_cos_text"} <= set(table.columns)
    assert table.set_index("arm")["deep_cos_text"]["frozen"] == "n/a"  # its blocks do not learn


def test_panel_run_renders_figures_and_table_and_second_run_is_cached(cache):
    panel = widgets.ControlPanel(LearnedStudy, learned_view, profile="quick")
    assert panel.study() == LearnedStudy.for_profile("quick")  # defaults = the baseline run
    assert {"rules", "grape_eta_B", "stiefel_eta_B", "rank", "stiefel_probe", "seeds"} <= set(panel.controls)
    assert set(panel.controls["rules"].options) == set(LearnedStudy.rule_choices())
    panel.defaults = dataclasses.replace(panel.defaults, n_train=256, n_test=128)  # not a control
    run_panel(panel, rules=("stiefel_dfa",), epochs=1, d=16, num_blocks=2, rank=4, seeds="5")
    res = panel.last_result
    assert res.config.rules == ("stiefel_dfa",) and res.config.rank == 4 and res.config.seeds == (5,)
    assert set(res.results["arm"]) == {"bp", "stiefel_dfa", "frozen"}
    assert (res.results.loc[res.results["arm"] == "stiefel_dfa", "rank"] == 4).all()
    assert len(res.figures) == 3  # alignment, accuracy, Stiefel gains
    mimes = output_mimes(panel.output)
    assert mimes.count("image/png") == 3 and "text/html" in mimes
    html = html_outputs(panel.output)
    assert any("stiefel_dfa" in h and "test_acc" in h and "deep_cos" in h for h in html)
    assert res.from_cache == 0
    panel.run_button.click()
    assert panel.last_result.from_cache == panel.last_result.units == 3
    assert "3/3 runs from the cache" in panel.status.value


def test_view_leaves_a_diverged_run_out_of_the_plots(cache, monkeypatch):
    diverge(monkeypatch, "stiefel_dfa")
    out = learned_view(LearnedStudy.for_profile("quick", rules=("dfa", "stiefel_dfa"), **TINY))
    status = out.extra.runs.set_index("arm")["status"].to_dict()
    assert status == {"bp": "ok", "dfa": "ok", "stiefel_dfa": "diverged", "frozen": "ok"}
    assert any(n.startswith("Diverged runs") and "stiefel_dfa (seed 3)" in n for n in out.notes)
    assert len(out.figures) == 2  # no Stiefel gains of a run that blew up
    assert_not_drawn(out.figures, "stiefel_dfa")
    t = out.table.set_index("arm")
    assert t.loc["stiefel_dfa", "test_acc_text"] == "n/a" and t.loc["dfa", "test_acc_text"] != "n/a"
