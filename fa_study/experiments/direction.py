"""Direction quality (notebook 04): does DFA's credit point along the BP gradient?

Reference ``004``: train the ResidualMLP with vanilla DFA and with the residual-branch penalty
(λ = 1e-2, both with each block's gradient clipped at 1.0), then on 1,024 test samples compare,
per hidden state, the rule's credit signal ``a_l`` with the BP gradient ``g_l = dL/dh_l``: the
per-sample cosine (floor 1e-30, so a tiny ``||g||`` still gives the true cosine) and the median
magnitudes of both signals. Its pre-registered reading (:func:`fa_study.diagnostics.direction_reading`):
the reference is *unhealthy* when ``||g|| <= 1e-7``; otherwise ``|cos| < 0.05`` is *poor*,
``< 0.20`` *mediocre*, anything above *reasonable*. 004 predicted poor (~0.01-0.05) for the
penalised network: a second failure mode of DFA, separable from the scale blow-up.

Runs are :class:`fa_study.runs.RunSpec` s built like notebook 02's (cached; every trained rule
run carries its direction quality); with the same settings as notebook 03's vanilla and λ runs
(there: no clipping) they are shared.

Layer pairing: the package compares ``a_l`` with ``g_l`` at the same hidden state, so block
``l``'s signal meets the gradient at the block's output (the state its surrogate moves). 004
compared ``e B_l^T`` with ``g_l`` at block ``l``'s input (one state lower, and ``h_0`` and
``h_1`` both with ``B_0``); notebook 04 shows what that changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import matplotlib.pyplot as plt
import pandas as pd

from ..fields import int_range, option, positive, positive_int
from ..runs import ModelSpec, Results, RunSpec
from ..stats import aggregate, format_mean_ci, mean_ci
from .core import StudyResult, labelled, resolve_study, study_runner
from .penalty import FASHION_CHECK, GRAD_CLIP, PenalisedRuns, PenaltyStudy, arm_colours


@dataclass(frozen=True)
class DirectionStudy(PenalisedRuns):
    """Vanilla against penalised DFA: per-layer cosine of the credit with BP, and both magnitudes."""

    epochs: int = option(100, positive_int, "004 trained 100 epochs")
    grad_clip: float | None = option(1.0, GRAD_CLIP,
                                     "004 clipped each block's gradient norm at 1.0 in both arms")
    lam: float = option(1e-2, labelled("lam (the penalised arm's λ; the vanilla arm is always run)",
                                       positive),
                        "penalty λ of the penalised arm (004: 1e-2, \"the first value we validated\")")
    read_layer: int | None = option(None, int_range(0, none_ok=True, none_means="L // 2, 004's layer 2"),
                                    "hidden state the reading is stated for (None: L // 2, 004's layer 2)")

    # notebook 03's: the reference width and learning rate, 10 epochs of 4k images (quick) or 10k
    # (default); the paper profile trains 100 epochs, as 004
    PROFILES = {**PenaltyStudy.PROFILES, "paper": {**PenaltyStudy.PROFILES["paper"], "epochs": 100}}
    CROSS_CHECK = FASHION_CHECK  # notebook 03's
    CONTROLS = {"lam": ("log", 1e-4, 1e-1), "seeds": "seeds", "epochs": (1, 100, 1),
                "grad_clip": (0.1, 5.0, 0.1)}

    def check(self) -> None:
        L = ModelSpec(self.arch, self.d, self.num_blocks).num_blocks
        if self.read_layer is not None and self.read_layer > L:
            raise ValueError(f"read_layer must be one of 0..{L} (the hidden states of a {self.arch} "
                             f"with {L} blocks) or None, got {self.read_layer}")
        self.specs()

    @property
    def layer(self) -> int:
        """The hidden state the reading is stated for."""
        L = ModelSpec(self.arch, self.d, self.num_blocks).num_blocks
        return L // 2 if self.read_layer is None else self.read_layer

    def spec(self, seed: int, penalised: bool) -> RunSpec:
        """One run: the rule with λ = ``lam`` (``penalised``) or 0."""
        return self.run_spec(self.rule, seed, self.lam if penalised else 0.0)

    def specs(self) -> list[RunSpec]:
        return [self.spec(s, p) for s in self.seeds for p in (False, True)]

    def arms(self) -> list[str]:
        """``[vanilla label, penalised label]``, e.g. ``["dfa", "dfa λ=0.01"]``."""
        return [self.spec(self.seeds[0], p).label for p in (False, True)]


run_direction = study_runner(DirectionStudy, "run_direction", """Train the vanilla and penalised rule for
    every seed (cached) and audit each run; ``layers`` holds the direction quality, one row per run and hidden
    state (``arm``, ``seed``, ``penalty``, ``layer``, ``cos_mean``, ``cos_std``, ``cos_median``,
    ``g_norm_median``, ``a_norm_median``, ``reading``, ``n_eval``).""")


# --------------------------------------------------------------------------------------------
# Reading the result
# --------------------------------------------------------------------------------------------

def direction_readings(layers: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """One row per arm and hidden state: the cosine (mean ± 95 % CI over seeds of the per-run
    batch mean), the mean within-batch standard deviation, the mean median magnitudes ``||g||``
    and ``||a||``, the pre-registered reading of the seed means (``reading``) and how each seed
    read (``seed_readings``, e.g. ``"poor ×2, mediocre ×1"``)."""
    from ..diagnostics import direction_reading

    rows = []
    for (arm, layer), sub in layers.groupby(["arm", "layer"], sort=False):
        m, lo, hi = mean_ci(sub["cos_mean"].to_numpy(dtype=float))
        half = (hi - lo) / 2 if math.isfinite(lo) else math.nan
        g, a = float(sub["g_norm_median"].mean()), float(sub["a_norm_median"].mean())
        counts = sub["reading"].value_counts()
        rows.append({"arm": arm, "penalty": float(sub["penalty"].iloc[0]), "layer": int(layer),
                     "n": len(sub), "cos": format_mean_ci(m, half), "cos_mean": m, "cos_ci": half,
                     "cos_sample_std": float(sub["cos_std"].mean()), "g_norm": g, "a_norm": a,
                     "reading": direction_reading(m, g),
                     "seed_readings": ", ".join(f"{k} ×{n}" for k, n in counts.items())})
    table = pd.DataFrame(rows)
    if order and len(table):
        rank = {a: i for i, a in enumerate(order)}
        table = table.sort_values(["arm", "layer"], key=lambda s: s.map(rank) if s.name == "arm" else s)
    return table.reset_index(drop=True)


def reading_sentences(readings: pd.DataFrame, layer: int | None = None) -> dict[str, str]:
    """Per arm, 004's verdict sentence (:func:`fa_study.diagnostics.read_direction_quality`) on the
    seed means at ``layer`` (None: L // 2)."""
    from ..diagnostics import read_direction_quality

    table = readings.rename(columns={"g_norm": "g_norm_median", "a_norm": "a_norm_median"})
    return {arm: read_direction_quality(sub, layer) for arm, sub in table.groupby("arm", sort=False)}


def direction_summary(res: Results, layer: int, order: list[str] | None = None) -> pd.DataFrame:
    """One row per arm: mean ± 95 % CI over seeds of the test accuracy, the cosine at ``layer``,
    the mean |cosine| over the deep hidden states h_2..h_L (h_0 and h_1 are both driven by the
    first feedback matrix, see notebook 04), ``||g||`` and ``||a||`` at ``layer``, the null's
    z-score; and the reading of the seed means at ``layer``."""
    from ..diagnostics import direction_reading
    from .core import with_run_status

    cols = ["test_acc", "cos_at_layer", "deep_abs_cos", "g_at_layer", "a_at_layer", "z_score"]
    runs = res.runs.set_index(["arm", "seed"])
    lay = res.layers
    if len(lay) and "layer" in lay:
        at = lay[lay["layer"] == layer].set_index(["arm", "seed"])
        deep = lay[lay["layer"] >= min(2, int(lay["layer"].max()))] \
            .assign(abs_cos=lambda t: t["cos_mean"].abs()).groupby(["arm", "seed"])["abs_cos"].mean()
        per_run = pd.DataFrame({
            "test_acc": runs["test_acc"],
            "cos_at_layer": at["cos_mean"],
            "deep_abs_cos": deep,
            "g_at_layer": at["g_norm_median"],
            "a_at_layer": at["a_norm_median"],
        })
    else:  # no run finished: every run is a row with its accuracy (NaN) and nothing else
        per_run = pd.DataFrame({"test_acc": runs["test_acc"]}).assign(
            **{c: math.nan for c in cols if c not in ("test_acc", "z_score")})
    per_run["z_score"] = res.null.set_index(["arm", "seed"])["z_score"] if len(res.null) else math.nan
    per_run = per_run.reset_index()
    table = aggregate(per_run, "arm", cols)
    table["reading"] = [direction_reading(c, g) for c, g in zip(table["cos_at_layer"], table["g_at_layer"])]
    table.insert(1, "layer", layer)
    table = with_run_status(table, res.runs, order=order)
    return table[["arm", "layer", "n", "status", "error"] + [f"{c}_text" for c in cols] + ["reading"] + cols]


def _plain_log_labels(ax) -> None:
    """Plain tick labels on a log axis that spans less than a decade (``||a||`` stays ~2-5)."""
    import matplotlib.ticker as mt

    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo < 10:
        ax.yaxis.set_major_formatter(mt.FormatStrFormatter("%.3g"))
        ax.yaxis.set_minor_formatter(mt.FormatStrFormatter("%.3g"))


def direction_view(study: DirectionStudy | None = None, *, profile: str | None = None,
                   live: Callable | None = None, progress: Callable | None = None,
                   **overrides) -> StudyResult:
    """Run vanilla and penalised DFA and draw, per hidden state: the cosine of the credit with BP
    (mean over seeds with a 95 % band; error bars: the mean within-batch standard deviation), and
    the median magnitudes ``||g||`` and ``||a||`` on log scales; the table reads each arm at
    ``read_layer`` with 004's pre-registered thresholds, the notes state the verdict."""
    from .. import plots

    study = resolve_study(DirectionStudy, study, profile, overrides)
    res = study.run(callback=live, progress=progress)
    order, layer = study.arms(), study.layer
    table = direction_summary(res, layer, order)
    if res.layers.empty:  # every run diverged or failed: the table still has a row per arm, with its status
        readings, figs, notes = pd.DataFrame(), [], ["No run finished: nothing to read."]
    else:
        readings = direction_readings(res.layers, order)
        figs = [plots.finish(_direction_figure(res.layers, readings, arm_colours(study.specs())), res.runs,
                             res.history["data_source"].dropna().unique().tolist())]
        notes = [f"{arm}: {text}" for arm, text in reading_sentences(readings, layer).items()]
    out = StudyResult.of(study, res, res.history, table, figs, notes)
    out.readings = readings
    return out


def _direction_figure(lay: pd.DataFrame, readings: pd.DataFrame, colours: dict[str, str]):
    """Per hidden state: the cosine of the credit with BP (error bars: the mean within-batch
    standard deviation), and the median magnitudes ``||g||`` and ``||a||`` on log scales."""
    from .. import plots
    from ..diagnostics import HEALTHY_G, MEDIOCRE_COS, POOR_COS

    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.7))
    plots.plot_curves(lay, "layer", "cos_mean", hue="arm", ax=axes[0], logy=False, colours=colours)
    for i, (arm, c) in enumerate(colours.items()):
        sub = readings[readings["arm"] == arm]
        axes[0].errorbar(sub["layer"] + (i - 0.5) * 0.08, sub["cos_mean"], fmt="none", ecolor=c, alpha=0.5,
                         capsize=2, lw=1,
                         yerr=plots.clipped_yerr(sub["cos_mean"], sub["cos_sample_std"], plots.COSINE))
    for t, ls in ((POOR_COS, ":"), (MEDIOCRE_COS, "--")):
        for sign in (1, -1):
            axes[0].axhline(sign * t, color="#777777", ls=ls, lw=0.8)
    axes[0].axhline(0, color="k", lw=0.8)
    axes[0].set(title="cos(a_l, g_l): credit vs BP gradient", ylabel="cosine (bars: sample sd)")
    plots.plot_curves(lay, "layer", "g_norm_median", hue="arm", ax=axes[1], logy=True, colours=colours)
    axes[1].axhline(HEALTHY_G, color="k", ls=":", lw=1, label="healthy above 1e-7")
    axes[1].set(title="||g_l||: BP reference gradient (median)", ylabel="||g_l||")
    plots.plot_curves(lay, "layer", "a_norm_median", hue="arm", ax=axes[2], logy=True, colours=colours)
    _plain_log_labels(axes[2])
    axes[2].set(title="||a_l||: the rule's credit signal (median)", ylabel="||a_l||")
    for ax in axes:
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_xlabel("hidden state l")
        ax.legend(fontsize=8, frameon=False)
    return fig
