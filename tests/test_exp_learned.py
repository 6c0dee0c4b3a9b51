"""The learned-feedback study (notebook 05): config checks, tidy cached results, the panel."""
import dataclasses

import matplotlib
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from fa_study import widgets  # noqa: E402
from fa_study.experiments.learned import (LearnedStudy, _callback_every, learned_summary,  # noqa: E402
                                          learned_view, run_learned)

TINY = dict(epochs=1, n_train=256, n_test=128, d=16, num_blocks=2, seeds=(3,))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: a second thread only adds synchronisation (slow on a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("bad,match", [
    (dict(rules=("fa", "kp")), "unknown rule 'kp'; allowed values: 'fa', 'grape_fa'"),
    (dict(rules=()), "rules must name at least one"),
    (dict(dataset="imagenet"), "unknown dataset 'imagenet'"),
    (dict(stiefel_probe="weights"), "unknown stiefel_probe 'weights'; allowed values: 'node', 'bp'"),
    (dict(rank=11), "rank must be at most 10"),
    (dict(rank=12, d=8), "rank must be at most"),
    (dict(seeds=()), "seeds must be a non-empty tuple of integers"),
    (dict(grape_eta_B=-0.1), "grape_eta_B must be a finite number >= 0"),
    (dict(stiefel_tau=1.0), r"stiefel_tau must be a number in \[0, 1\)"),
    (dict(num_blocks=0), "num_blocks must be an integer >= 1"),
    (dict(n_train=0), "n_train must be None or a positive integer"),
])
def test_config_rejects_bad_values_with_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        LearnedStudy.for_profile("quick", **bad)


def test_profiles_units_and_cache_keys():
    with pytest.raises(ValueError, match="unknown setting"):
        LearnedStudy.for_profile("quick", eta_B=0.1)
    assert LearnedStudy.for_profile("paper").seeds == (42, 123, 456)
    study = LearnedStudy.for_profile("quick", rules=("dfa", "grape_fa"), seeds=(1, 2))
    # the references are always run, in reading order
    assert study.arms() == ["bp", "grape_fa", "dfa", "frozen"]
    assert len(study.units()) == 8
    # a rule's unit carries only its own options: changing Stiefel's step keeps fa's cache entry
    other = dataclasses.replace(study, stiefel_eta_B=0.5, rank=3)
    assert other.unit("dfa", 1) == study.unit("dfa", 1)
    assert other.unit("stiefel_dfa", 1) != study.unit("stiefel_dfa", 1)
    assert dict(study.unit("grape_fa", 1).options) == {"eta_B": 0.1, "n_probe": 32}


def test_callback_period_lands_on_every_epoch_end():
    assert _callback_every(24, live=False) == 24
    assert _callback_every(24, live=True) == 12
    assert _callback_every(31, live=True) == 31  # prime: once per epoch
    assert _callback_every(100, live=True) == 20
    assert _callback_every(3, live=True) == 3


def test_run_learned_is_tidy_with_feedback_readouts_and_cached(cache):
    study = LearnedStudy.for_profile("quick", rules=("grape_fa", "stiefel_dfa"), **TINY)
    res = run_learned(study)
    assert res.attrs["units"] == 4 and res.attrs["from_cache"] == 0
    assert set(res["arm"]) == {"bp", "grape_fa", "stiefel_dfa", "frozen"}
    assert set(res["epoch"]) == {0, 1} and set(res["seed"]) == {3}
    need = {"data_source", "test_acc", "cos_0", "cos_2", "deep_cos", "fb_align_0", "alpha_0", "rho_2",
            "deep_fb_align", "status", "eta_B"}
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
    assert again.attrs["from_cache"] == 4
    pd.testing.assert_frame_equal(res, again)
    table = learned_summary(res)
    assert list(table["arm"]) == ["bp", "grape_fa", "stiefel_dfa", "frozen"]
    assert {"test_acc_text", "deep_cos_text"} <= set(table.columns)


def _mimes(output):
    return [k for o in output.outputs for k in o.get("data", {})]


def test_panel_run_renders_figures_and_table_and_second_run_is_cached(cache):
    panel = widgets.ControlPanel(LearnedStudy, learned_view, profile="quick")
    assert panel.study() == LearnedStudy.for_profile("quick")  # defaults = the baseline run
    assert {"rules", "grape_eta_B", "stiefel_eta_B", "rank", "stiefel_probe", "seeds"} <= set(panel.controls)
    panel.defaults = dataclasses.replace(panel.defaults, n_train=256, n_test=128)  # not a control
    panel.controls["rules"].value = ("stiefel_dfa",)
    panel.controls["epochs"].value = 1
    panel.controls["d"].value = 16
    panel.controls["num_blocks"].value = 2
    panel.controls["rank"].value = 4
    panel.controls["seeds"].value = "5"
    panel.run_button.click()
    assert panel.last_error is None, panel.last_error
    res = panel.last_result
    assert res.config.rules == ("stiefel_dfa",) and res.config.rank == 4 and res.config.seeds == (5,)
    assert set(res.results["arm"]) == {"bp", "stiefel_dfa", "frozen"}
    assert (res.results.loc[res.results["arm"] == "stiefel_dfa", "rank"] == 4).all()
    assert len(res.figures) == 3  # alignment, accuracy, Stiefel gains
    mimes = _mimes(panel.output)
    assert mimes.count("image/png") == 3 and "text/html" in mimes
    html = [o["data"]["text/html"] for o in panel.output.outputs if "text/html" in o.get("data", {})]
    assert any("stiefel_dfa" in h and "test_acc" in h and "deep_cos" in h for h in html)
    assert res.from_cache == 0
    panel.run_button.click()
    assert panel.last_result.from_cache == panel.last_result.units == 3
    assert "3/3 runs from the cache" in panel.status.value
