"""Spread over seeds in the plots: runs below three seeds, clipped t-bands from three on."""
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import LineCollection, PolyCollection  # noqa: E402

from fa_study import plots  # noqa: E402
from fa_study.stats import aggregate, mean_ci  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _curves(values_by_seed: dict, column: str = "test_acc", arm: str = "fa") -> pd.DataFrame:
    """One row per seed and epoch: ``{seed: [value at epoch 0, 1, ...]}``."""
    return pd.DataFrame([{"arm": arm, "seed": s, "epoch": e, column: v}
                         for s, vs in values_by_seed.items() for e, v in enumerate(vs)])


def _bands(ax) -> list[np.ndarray]:
    """The vertices of every filled band (``fill_between``) on ``ax``."""
    return [p.vertices for c in ax.collections if isinstance(c, PolyCollection) for p in c.get_paths()]


def _runs(ax) -> list[LineCollection]:
    return [c for c in ax.collections if isinstance(c, LineCollection)]


# ---------------------------------------------------------------------------- the ranges

def test_each_quantity_has_its_range_where_it_is_declared():
    assert plots.bounds_of("test_acc") == plots.ACCURACY == (0.0, 1.0)
    for cos in ("cos_mean", "cos_3", "cos_", "deep_cos", "fb_align_2", "rho_0", "deep_fb_align"):
        assert plots.bounds_of(cos) == plots.COSINE == (-1.0, 1.0), cos
    for norm in ("h_norm_", "h_norm_4", "g_norm_median", "a_norm_median", "h_L_norm", "alpha_1", "align_0"):
        assert plots.bounds_of(norm) == (0.0, math.inf), norm
    assert plots.bounds_of("update_angle_1") == plots.bounds_of("angle_0") == (0.0, 180.0)
    assert plots.bounds_of("z_score") == (-math.inf, math.inf)  # not declared: unbounded
    assert plots.bounds_of("test_acc", (0.2, None)) == (0.2, math.inf)  # a caller's bounds= win


def test_mean_ci_clips_to_the_bounds_it_is_given():
    v = [0.02, 0.9]
    m, lo, hi = mean_ci(v)
    assert lo < 0 and hi > 1  # two seeds: t = 12.7, the raw interval leaves [0, 1]
    m2, lo2, hi2 = mean_ci(v, bounds=(0.0, 1.0))
    assert (m2, lo2, hi2) == (m, 0.0, 1.0)


def test_aggregate_of_no_rows_gives_the_columns():
    t = aggregate(pd.DataFrame(), "arm", ["test_acc"])
    assert t.empty and list(t.columns) == ["arm", "n", "n_rows", "test_acc", "test_acc_ci", "test_acc_text",
                                           "test_acc_n"]


# ---------------------------------------------------------------------------- curves

def test_two_seeds_draw_the_runs_not_a_band():
    # notebook 02's quick profile: two seeds, one near chance -> a t-band would reach below 0
    df = _curves({42: [0.1, 0.12, 0.15], 1: [0.1, 0.45, 0.6]})
    ax = plots.plot_curves(df, "epoch", "test_acc", hue="arm", logy=False)
    assert not _bands(ax)
    runs = _runs(ax)
    assert len(runs) == 1 and len(runs[0].get_segments()) == 2  # one thin line per seed
    assert sorted(seg[-1, 1] for seg in runs[0].get_segments()) == [0.15, 0.6]
    assert [ln.get_label() for ln in ax.lines] == ["fa"]  # the mean, labelled; the runs are not
    assert ax.lines[0].get_ydata()[-1] == pytest.approx(0.375)


def test_three_seeds_draw_a_band_that_never_leaves_the_accuracy_range():
    df = _curves({0: [0.10, 0.02, 0.99], 1: [0.12, 0.60, 1.00], 2: [0.11, 0.05, 0.40]})
    raw = [mean_ci(df.loc[df["epoch"] == e, "test_acc"]) for e in range(3)]
    assert raw[1][1] < 0 and raw[2][2] > 1  # the unclipped t-intervals leave [0, 1]
    ax = plots.plot_curves(df, "epoch", "test_acc", hue="arm", logy=False)
    bands = _bands(ax)
    assert bands and not _runs(ax)
    y = np.concatenate([b[:, 1] for b in bands])
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert y.min() == 0.0 and y.max() == 1.0  # clipped exactly at the range, not dropped


def test_a_cosine_band_stays_within_minus_one_and_one():
    df = _curves({0: [0.9, -0.95], 1: [0.1, 0.2], 2: [-0.5, 0.99]}, column="cos_mean")
    ax = plots.plot_curves(df, "epoch", "cos_mean", hue="arm", logy=False)
    y = np.concatenate([b[:, 1] for b in _bands(ax)])
    assert y.min() >= -1.0 and y.max() <= 1.0


def test_a_norm_band_on_a_log_axis_stays_above_zero():
    df = _curves({0: [1.0, 1e-3], 1: [2.0, 5.0], 2: [50.0, 1e3]}, column="h_norm_")
    assert mean_ci(df.loc[df["epoch"] == 1, "h_norm_"])[1] < 0  # the raw interval reaches below 0
    ax = plots.plot_curves(df, "epoch", "h_norm_", hue="arm", logy=True)
    assert ax.get_yscale() == "log"
    y = np.concatenate([b[:, 1] for b in _bands(ax)])
    assert y.min() > 0  # cut at the lowest run where the interval reaches 0
    assert y.min() == pytest.approx(1e-3)


def test_bounds_argument_overrides_the_declared_range():
    df = _curves({0: [0.5, 0.5], 1: [0.6, 0.9], 2: [0.55, 0.1]}, column="score")
    ax = plots.plot_curves(df, "epoch", "score", hue="arm", logy=False, bounds=(0.2, 0.8))
    y = np.concatenate([b[:, 1] for b in _bands(ax)])
    assert y.min() >= 0.2 and y.max() <= 0.8


def test_ci_false_draws_only_the_mean():
    df = _curves({0: [0.1, 0.2], 1: [0.3, 0.4]})
    ax = plots.plot_curves(df, "epoch", "test_acc", hue="arm", logy=False, ci=False)
    assert not _bands(ax) and not _runs(ax) and len(ax.lines) == 1


def test_per_layer_profile_keeps_the_seeds_apart():
    wide = pd.DataFrame({"arm": ["fa", "fa"], "seed": [0, 1], "cos_0": [0.1, 0.3], "cos_1": [0.5, 0.9]})
    ax = plots.plot_layers(wide, "cos_", hue="arm", logy=False)
    assert len(_runs(ax)) == 1 and len(_runs(ax)[0].get_segments()) == 2 and not _bands(ax)


def test_the_tour_draws_its_arms_with_the_same_rules():
    from fa_study.experiments import feedback_tour as ft

    two = _curves({0: [0.1, 0.2], 1: [0.3, 0.6]})
    three = _curves({0: [0.0, 0.02], 1: [0.4, 0.99], 2: [0.1, 1.0]})
    for frame, band in ((two, False), (three, True)):
        fig, ax = plt.subplots()
        ft._draw_arms(ax, frame, "epoch", "test_acc", {"fa": ("#E69F00", "-")})
        assert bool(_bands(ax)) is band and bool(_runs(ax)) is not band
        if band:
            y = np.concatenate([b[:, 1] for b in _bands(ax)])
            assert y.min() >= 0.0 and y.max() <= 1.0


# ---------------------------------------------------------------------------- bars

def _errorbar_extent(ax) -> tuple[float, float]:
    segs = [s for c in ax.collections if isinstance(c, LineCollection) for s in c.get_segments()]
    y = np.concatenate([s[:, 1] for s in segs])
    return float(y.min()), float(y.max())


def test_bars_show_each_run_below_three_seeds_and_a_clipped_interval_from_three():
    runs = pd.DataFrame({"arm": ["fa", "fa", "dfa", "dfa", "dfa"], "test_acc": [0.05, 0.9, 0.02, 0.97, 0.5]})
    table = aggregate(runs, "arm", ["test_acc"])
    assert (table["test_acc"] - table["test_acc_ci"] < 0).all()  # both raw intervals reach below 0
    ax = plots.plot_bars(table, "test_acc", group="arm", err="test_acc_ci", n="n", points=runs)
    # error bars only on dfa (three seeds), cut at [0, 1]; every run a dot on its bar
    lo, hi = _errorbar_extent(ax)
    assert lo == 0.0 and hi == 1.0
    segs = [s for c in ax.collections if isinstance(c, LineCollection) for s in c.get_segments()]
    assert {round(float(s[0, 0])) for s in segs} == {1}  # the dfa bar only
    dots = [ln for ln in ax.lines if ln.get_marker() == "o"]
    assert sorted(v for ln in dots for v in ln.get_ydata()) == sorted(runs["test_acc"])


def test_bars_without_counts_still_clip_their_error_bars():
    table = pd.DataFrame({"arm": ["a"], "cos_mean": [0.95], "cos_mean_ci": [0.2]})
    ax = plots.plot_bars(table, "cos_mean", group="arm", err="cos_mean_ci")
    lo, hi = _errorbar_extent(ax)
    assert lo == pytest.approx(0.75) and hi == 1.0
    assert plots.clipped_yerr([0.95], [0.2], plots.COSINE)[:, 0] == pytest.approx([0.2, 0.05])


# ---------------------------------------------------------------------------- failed runs

def test_failed_runs_are_named_under_a_figure_and_an_empty_source_is_left_out():
    runs = pd.DataFrame({"arm": ["bp", "fa"], "seed": [0, 0], "model": ["resmlp"] * 2,
                         "status": ["ok", "error"], "error": ["", "RuntimeError: boom"],
                         "data_source": ["synthetic", ""]})
    fig, _ = plt.subplots()
    text = plots.annotate_failures(fig, runs)
    assert text == "failed, not drawn: fa (seed 0): RuntimeError: boom"
    plots.annotate_source(fig, runs["data_source"].tolist())
    texts = [t.get_text() for t in fig.texts]
    assert text in texts and any(t.startswith("data: synthetic  (stand-in") for t in texts)
    assert plots.annotate_failures(fig, runs.iloc[:1]) == ""  # none failed: nothing written


# ---------------------------------------------------------------------------- the helpers' axes and colours

def test_plot_helpers_take_and_return_an_axis():
    df = pd.DataFrame({"epoch": [0, 1, 0, 1], "v": [1.0, 1e4, 2.0, 2e4], "arm": ["bp", "bp", "fa", "fa"],
                       "g_0": [1e-3, 1e-3, 1e-4, 1e-4], "g_1": [1e-1, 1e-1, 1e-2, 1e-2]})
    fig, ax = plt.subplots()
    assert plots.plot_curves(df, "epoch", "v", hue="arm", ax=ax) is ax
    assert ax.get_yscale() == "log"  # four decades -> log axis chosen automatically
    assert ax.lines[0].get_color().lower() == plots.RULE_COLOURS["bp"].lower()
    ax2 = plots.plot_layers(df, "g_", hue="arm")
    assert ax2.get_yscale() == "log" and len(ax2.lines) == 2
    with pytest.raises(ValueError, match="no columns named"):
        plots.plot_layers(df, "h_")


def test_plot_curves_with_colours_fixes_order_colour_style_and_draws_the_mean():
    df = pd.DataFrame({"arm": ["a", "a", "b", "b", "c", "c"], "seed": [0, 1] * 3,
                       "epoch": [1] * 6, "v": [1.0, 3.0, 10.0, 10.0, 5.0, 5.0]})
    ax = plots.plot_curves(df, "epoch", "v", hue="arm", logy=False,
                           colours={"b": "#111111", "a": "#222222"}, styles={"a": ":"})
    assert [ln.get_label() for ln in ax.lines] == ["b", "a"]  # the mapping's order; "c" left out
    assert [ln.get_color() for ln in ax.lines] == ["#111111", "#222222"]
    assert ax.lines[1].get_linestyle() == ":" and ax.lines[0].get_linestyle() == "-"
    assert ax.lines[1].get_ydata()[0] == 2.0  # mean over the two seeds of "a"


def test_live_plot_redraws_every_n_steps_and_is_silent_in_quick():
    seen = []
    live = plots.LivePlot(["loss", "alignment"], every=3, sink=seen.append, profile="default", group="arm",
                          min_seconds=0.0)
    for step in range(1, 8):
        live({"step": step, "loss": 1.0 / step, "alignment": [0.5, 0.4], "arm": "fa"})
    assert len(seen) == 2 and live.redraws == 2
    live({"step": 1, "loss": 1.0, "alignment": [0.5, 0.4], "arm": "bp"})  # new arm: fresh history
    assert len(live.history) == 1
    quiet = plots.LivePlot(["loss"], every=1, sink=seen.append, profile="quick")
    quiet({"step": 1, "loss": 1.0})
    assert len(seen) == 3 and not quiet.history


def test_the_live_plot_redraws_at_most_once_per_min_seconds():
    """A burst of records (a worker's unit replayed) redraws once; the next redraw waits until
    ``min_seconds`` have passed on the plot's clock; a finished group's last state is drawn when
    the next group starts, whatever the clock says."""
    now = [0.0]
    seen = []
    live = plots.LivePlot(["loss"], every=2, sink=seen.append, profile="default", group="arm",
                          min_seconds=1.0, clock=lambda: now[0])
    for step in range(1, 11):  # five redraws due, all at t = 0
        live({"step": step, "loss": 1.0 / step, "arm": "fa"})
    assert live.redraws == 1
    now[0] = 0.5
    live({"step": 11, "loss": 0.1, "arm": "fa"})
    live({"step": 12, "loss": 0.1, "arm": "fa"})  # due by count, not by time
    assert live.redraws == 1
    live({"step": 1, "loss": 1.0, "arm": "bp"})  # new group: the finished one's last state
    assert live.redraws == 2 and len(seen[-1].axes[0].lines[0].get_xdata()) == 12
    now[0] = 1.4
    live({"step": 2, "loss": 0.9, "arm": "bp"})  # due by count, not by time (drawn at 0.5)
    assert live.redraws == 2
    now[0] = 1.5
    live({"step": 3, "loss": 0.8, "arm": "bp"})
    live({"step": 4, "loss": 0.7, "arm": "bp"})  # due by count and by time
    assert live.redraws == 3 and len(seen) == 3


def test_a_run_replayed_from_a_worker_ends_drawn_whatever_the_redraw_limit():
    """runs._replay hands a worker's finished run to the live callback as one burst of its
    per-epoch records (step, arm, loss from train_loss) and then draws: a LivePlot that limits
    redraws to one an hour still shows the whole curve; a plain function just gets the records."""
    import types

    from fa_study.runs import _replay

    history = pd.DataFrame({"epoch": range(6), "train_loss": [2.0, 1.5, 1.1, 0.9, 0.8, 0.7]})
    spec = types.SimpleNamespace(label="fa")
    seen = []
    live = plots.LivePlot(["loss"], every=2, sink=seen.append, profile="default", group="arm",
                          min_seconds=3600.0)
    live({"step": 0, "loss": 3.0, "arm": "bp"})
    live({"step": 1, "loss": 2.0, "arm": "bp"})  # drawn: the hour starts now
    _replay(live)(spec, {"history": history})
    assert live.redraws == 3  # bp's last state when fa began, then fa's whole curve
    line = seen[-1].axes[0].lines[0]
    assert list(line.get_xdata()) == list(range(6))
    assert list(line.get_ydata()) == history["train_loss"].tolist()
    got = []
    _replay(got.append)(spec, {"history": history})
    assert [(r["step"], r["arm"], r["loss"]) for r in got] == [(e, "fa", l) for e, l in
                                                              zip(range(6), history["train_loss"])]
