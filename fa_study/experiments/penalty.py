"""The residual-branch penalty sweep (notebook 03): does ``λ·||f_l(h_l)||²`` contain DFA's stream?

Reference ``003`` (``reproduce/penalty_sweep.py``): DFA on the ResidualMLP with the local
surrogate of every block augmented by ``λ·||f_l(h_l)||²`` (the batch mean of per-sample squared
norms of the residual branch), for λ ∈ {0, 1e-4, 1e-2}; per epoch the median ``||h_L||`` and
``||g_L||`` (the BP reference gradient at the deepest hidden state) on 128 test samples and the
accuracy; and the fresh-feedback null on the penalised checkpoint (is the trained network aligned
with *its* feedback, or would any random feedback give the same cosine with BP?).

Every (rule, λ, seed) run is a :class:`fa_study.runs.RunSpec` built by
:func:`fa_study.experiments.audit.audit_spec`, so a run that notebook 02 or 04 already trained
with the same settings is served from the cache. A BP run per seed gives the scale of a healthy network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..config import check_choice
from ..data import DATASETS
from ..diagnostics import D2_FLOOR
from ..fields import boolean, choice, float_range, option, positive, positive_int
from ..fields import seeds as seed_tuple
from ..rules import BP_REFERENCE, RULES, get_rule
from ..runs import Results, RunSpec
from ..stats import aggregate, mean_ci
from .audit import audit_spec
from .core import (SUBSET, WIDTH, Study, StudyResult, depth, finished, model_names, null_count, one_of,
                   resolve_study, study_runner)

# Fashion-MNIST cross-check of notebooks 03 and 04: the whole split when the real files are there
FASHION_CHECK = {
    "quick": dict(epochs=3, n_train=4000, n_test=1000, seeds=(42,), null_draws=10),
    "default": dict(epochs=3, n_train=None, n_test=None, seeds=(42,), null_draws=10),
    "paper": dict(epochs=30, n_train=None, n_test=None, augment=False),
}


def penalised_rules() -> tuple[str, ...]:
    """Registered rules that take the residual-branch penalty (``takes_penalty``)."""
    return tuple(n for n, c in RULES.items() if c.takes_penalty)


# --------------------------------------------------------------------------------------------
# The settings shared with notebook 04's study, and the study
# --------------------------------------------------------------------------------------------

def parse_lambdas(value: str | Iterable[float]) -> tuple[float, ...]:
    """``"0, 1e-4, 1e-2"`` (or a sequence of numbers) -> ``(0.0, 0.0001, 0.01)``, sorted, without
    repeats. Every value must be a finite number >= 0; anything else is a ValueError."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.replace(";", ",").split(",") if p.strip()]
    else:
        try:
            parts = list(value)
        except TypeError:
            parts = [value]
    lams = []
    for p in parts:
        try:
            lam = float(p) if not isinstance(p, bool) else math.nan
        except (TypeError, ValueError):
            lam = math.nan
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lambdas must be comma-separated numbers >= 0 (e.g. '0, 1e-4, 1e-2'); "
                             f"got {value!r}")
        lams.append(lam)
    if not lams:
        raise ValueError(f"lambdas must hold at least one non-negative penalty weight λ, e.g. "
                         f"(0.0, 0.01) or the text '0, 1e-2'; got {value!r}")
    return tuple(sorted(set(lams)))


GRAD_CLIP = float_range(0.0, low_open=True, none_ok=True, none_means="no clipping")


@dataclass(frozen=True)
class PenalisedRuns(Study):
    """The settings notebooks 03 and 04 share: one rule (and BP) on one model, trained as
    notebook 02's runs (:func:`audit_spec`, so equal settings share a cache entry)."""

    rule: str = option("dfa", one_of(penalised_rules, "rule (a rule that takes the residual-branch penalty)"),
                       "the penalised rule: dfa as 003 / 004 (any rule with takes_penalty: fa, oracle, ...)")
    seeds: tuple = option((42, 123, 456), seed_tuple, "one run per arm and seed (the reference's seeds)")
    arch: str = option("resmlp", one_of(model_names),
                       "003 / 004: the pre-LayerNorm ResidualMLP (vit, resnet also take the penalty)")
    d: int | None = option(None, WIDTH, "width (None: the reference's, 256 for resmlp)")
    num_blocks: int | None = option(None, depth(), "depth (None: the reference's, 4 for resmlp)")
    dataset: str = option("cifar10", choice(*DATASETS),
                          "cifar10 / cifar100 (synthetic offline); fashion_mnist: the real-data check")
    epochs: int = option(30, positive_int, "003's sweep trained 30 epochs")
    lr: float = option(1e-3, positive, "AdamW with cosine decay, as the reference")
    grad_clip: float | None = option(None, GRAD_CLIP,
                                     "per-block gradient clip; 003's sweep did not clip (004 did)")
    augment: bool = option(False, boolean,
                           "random crop + flip of every training batch (the reference on real CIFAR)")
    n_train: int | None = option(None, SUBSET, "training subset (None: the whole split)")
    n_test: int | None = option(None, SUBSET,
                                "test subset (None: the whole split); 1,024 of it for direction quality")
    null_draws: int = option(20, null_count,
                             "fresh feedback draws per penalised-rule run (003: 20); 0 skips the null")

    def run_spec(self, rule: str, seed: int, penalty: float = 0.0) -> RunSpec:
        """One run through :func:`audit_spec`, so equal settings hit notebook 02's cache entry."""
        options = {"penalty": float(penalty)} if get_rule(rule).takes_penalty and penalty else {}
        return audit_spec(rule, self.arch, seed, options=options, d=self.d, num_blocks=self.num_blocks,
                          dataset=self.dataset, n_train=self.n_train, n_test=self.n_test, epochs=self.epochs,
                          lr=self.lr, grad_clip=self.grad_clip, augment=self.augment,
                          null_draws=self.null_draws)


@dataclass(frozen=True)
class PenaltyStudy(PenalisedRuns):
    """DFA with the residual-branch penalty λ·||f_l(h_l)||² for several λ, against BP."""

    lambdas: tuple = option((0.0, 1e-4, 1e-2), lambda _, v: parse_lambdas(v),
                            "penalty weights swept, 0 = vanilla (003); text \"0, 1e-2\" is parsed")

    PROFILES = {
        # 10 epochs of 4k images at the reference width and learning rate: where vanilla DFA's
        # stream has already left BP's by orders of magnitude on the stand-in.
        "quick": dict(epochs=10, n_train=4000, n_test=1000, seeds=(42,)),
        "default": dict(epochs=10, n_train=10000, n_test=2000, seeds=(42, 123, 456)),
        "paper": dict(epochs=30, n_train=None, n_test=None, seeds=(42, 123, 456), augment=True),
    }
    # the cross-check's vanilla DFA and BP runs are notebook 02's cross-check runs (same settings)
    CROSS_CHECK = FASHION_CHECK
    CONTROLS = {"lambdas": "seeds",  # a comma-separated text box, parsed by parse_lambdas
                "seeds": "seeds", "epochs": (1, 60, 1)}

    def spec(self, rule: str, seed: int, penalty: float = 0.0) -> RunSpec:
        """One run: ``rule`` ("bp" or the study's rule) with ``penalty`` and ``seed``."""
        check_choice("rule", rule, ("bp", self.rule))
        return self.run_spec(rule, seed, penalty)

    def specs(self) -> list[RunSpec]:
        """Per seed: BP, then the rule at every λ."""
        return [s for seed in self.seeds
                for s in [self.spec("bp", seed)] + [self.spec(self.rule, seed, lam) for lam in self.lambdas]]

    def arms(self) -> list[str]:
        """Arm labels in plotting order (BP first, then λ ascending)."""
        return list(dict.fromkeys(s.label for s in self.specs()))


run_penalty = study_runner(PenaltyStudy, "run_penalty", """Train BP and the rule at every λ for every
    seed (cached) and audit each run; see :class:`fa_study.runs.Results` (``history`` per epoch
    with ``penalty``, ``h_norm_<l>``, ``g_norm_<l>``, ``cos_<l>``; ``runs`` with the D1/D2
    values; ``null`` per penalised run).""")


# --------------------------------------------------------------------------------------------
# Summary and figures
# --------------------------------------------------------------------------------------------

def penalty_runs(res: Results) -> pd.DataFrame:
    """One row per run: ``arm``, ``seed``, ``penalty``, ``rule``, ``test_acc``, ``h_L`` and
    ``g_L`` (medians on the 128-sample eval batch), ``h_L_vs_bp`` (``h_L`` over the BP run's of the
    same seed), ``max_growth`` (D1's statistic), ``verdict`` (D1/D2 only: no frozen baseline
    here) and, where a null was drawn, ``training_deep_cos``, ``fresh_deep_mean``,
    ``fresh_deep_std``, ``z_score``."""
    runs = res.runs.copy()
    bp = runs.loc[runs["rule"] == BP_REFERENCE].set_index("seed")["h_L"]
    runs["h_L_vs_bp"] = runs["h_L"] / runs["seed"].map(bp).astype(float)
    if "error" not in runs:
        runs["error"] = ""
    cols = ["arm", "seed", "penalty", "rule", "status", "error", "test_acc", "h_L", "h_L_vs_bp", "g_L",
            "max_growth", "d1", "d2", "verdict", "data_source"]
    out = runs[cols]
    null_cols = ["training_deep_cos", "fresh_deep_mean", "fresh_deep_std", "z_score"]
    return out.merge(res.null[["arm", "seed", *null_cols]], on=["arm", "seed"], how="left") if len(res.null) \
        else out.assign(**{c: math.nan for c in null_cols})


def penalty_summary(res: Results, order: list[str] | None = None) -> pd.DataFrame:
    """One row per arm: mean ± 95 % CI over seeds of accuracy, ``||h_L||``, its ratio to BP,
    ``||g_L||``, the D1 growth and the null (training deep cosine, fresh mean, z), the
    verdicts seen, ``status`` and ``error`` (the messages of its runs that raised)."""
    from .core import with_run_status

    runs = penalty_runs(res)
    cols = ["test_acc", "h_L", "h_L_vs_bp", "g_L", "max_growth", "training_deep_cos",
            "fresh_deep_mean", "z_score"]
    table = aggregate(runs, "arm", cols)
    lam = runs.groupby("arm", sort=False)["penalty"].first()
    verdicts = runs.groupby("arm", sort=False)["verdict"].agg(
        lambda v: ", ".join(f"{k} ×{n}" for k, n in v.value_counts().items()))
    table.insert(1, "penalty", table["arm"].map(lam))
    table["verdicts"] = table["arm"].map(verdicts)
    table = with_run_status(table, runs, order=order)
    return table[["arm", "penalty", "n", "status", "error"] + [f"{c}_text" for c in cols] + ["verdicts"]
                 + cols]


def arm_colours(specs: list[RunSpec]) -> dict[str, str]:
    """Colour per arm label, in the order the specs list them: BP and the unpenalised rules in
    their usual colours; penalised arms, from the largest λ down, in colours no rule uses (so
    λ = 1e-2 has the same colour in notebooks 03 and 04). Read from the specs, never the labels."""
    from ..plots import PALETTE, colour

    spare = [PALETTE[2], PALETTE[4], PALETTE[5], PALETTE[7], PALETTE[6], PALETTE[1]]
    penalty, rule = {}, {}
    for s in specs:
        penalty.setdefault(s.label, float(dict(s.options).get("penalty", 0.0)))
        rule.setdefault(s.label, s.rule)
    penalised = sorted((a for a, p in penalty.items() if p > 0), key=lambda a: -penalty[a])
    fixed = {a: colour(rule[a], i) for i, a in enumerate(penalty) if penalty[a] == 0}
    fixed.update({a: spare[i % len(spare)] for i, a in enumerate(penalised)})
    return {a: fixed[a] for a in penalty}  # keep the specs' order for legends


def _null_panel(ax, runs: pd.DataFrame, colours: dict[str, str]) -> None:
    """Training-feedback deep cosine (dots per seed, bar = mean) against fresh draws (mean ± 2 sd,
    cut at [-1, 1])."""
    from ..plots import COSINE, clipped_yerr, no_data

    arms = [a for a in colours if a in set(runs.loc[runs["training_deep_cos"].notna(), "arm"])]
    if not arms:
        return no_data(ax, "no fresh-feedback null (null_draws = 0)")
    for i, arm in enumerate(arms):
        sub = runs[(runs["arm"] == arm) & runs["training_deep_cos"].notna()]
        c = colours[arm]
        ax.bar(i, sub["training_deep_cos"].mean(), width=0.55, color=c, alpha=0.35)
        ax.plot(np.full(len(sub), i) + np.linspace(-0.12, 0.12, len(sub)), sub["training_deep_cos"],
                "o", color=c, ms=4)
        fresh, spread = sub["fresh_deep_mean"].mean(), 2 * sub["fresh_deep_std"].mean()
        ax.errorbar(i + 0.38, fresh, yerr=clipped_yerr([fresh], [spread], COSINE), fmt="s",
                    color="#555555", ms=4, capsize=3,
                    label="fresh feedback, mean ± 2 sd" if i == 0 else None)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(arms)), arms, fontsize=8)
    ax.set_ylabel("deep-layer cos(a, g)")
    ax.set_title("fresh-feedback null: trained with vs fresh B", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3, axis="y")


def _dose_panel(ax, runs: pd.DataFrame, colours: dict[str, str]) -> None:
    """Final ||h_L|| against λ (symlog axis: λ = 0 sits at 0), BP's level as a dashed band."""
    from ..plots import no_data

    runs = runs[runs["status"] == "ok"]
    if not np.isfinite(runs["h_L"].to_numpy(dtype=float)).any():
        return no_data(ax)
    rule = runs[runs["rule"] != BP_REFERENCE].sort_values("penalty")
    stats = rule.groupby("penalty")["h_L"].apply(lambda s: mean_ci(s.to_numpy(dtype=float)))
    lams = stats.index.to_numpy(dtype=float)
    ax.plot(lams, [m for m, _, _ in stats], color="#555555", lw=1, zorder=1)
    for arm, sub in rule.groupby("arm", sort=False):
        ax.plot(sub["penalty"], sub["h_L"], "o", color=colours.get(arm, "#555555"), ms=5, label=arm)
    bp = runs.loc[runs["rule"] == BP_REFERENCE, "h_L"].to_numpy(dtype=float)
    if np.isfinite(bp).any():
        ax.axhline(np.nanmean(bp), color=colours.get("bp", "#0072B2"), ls="--", lw=1.2, label="bp")
    positive = lams[lams > 0]
    linthresh = positive.min() if positive.size else 1e-4
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_xlim(left=-0.3 * linthresh)  # no negative penalties: λ = 0 at the left edge
    ax.set(yscale="log", xlabel="penalty λ", ylabel="final median ||h_L||")
    ax.set_title("dose response: the stream at the end of training", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)


def penalty_view(study: PenaltyStudy | None = None, *, profile: str | None = None,
                 live: Callable | None = None, progress: Callable | None = None,
                 **overrides) -> StudyResult:
    """Run the sweep and draw it: per-epoch ``||h_L||``, ``||g_L||`` (log scales) and test
    accuracy per λ with BP for scale; the final ``||h_L||`` against λ; and the fresh-feedback
    null per penalised-rule arm. Runs that diverged or failed are left out of the plots and
    named in the notes. The notebook's baseline run and its panel's callback."""
    from .. import plots

    study = resolve_study(PenaltyStudy, study, profile, overrides)
    res = study.run(callback=live, progress=progress)
    colours = arm_colours(study.specs())
    runs = penalty_runs(res)
    fig2, axes2 = plt.subplots(1, 2, figsize=(11, 3.7))
    _dose_panel(axes2[0], runs, colours)
    _null_panel(axes2[1], runs[runs["status"] == "ok"], colours)
    figs = [plots.finish(f, res.runs) for f in (_curves_figure(study, res, colours), fig2)]
    return StudyResult.of(study, res, res.history, penalty_summary(res, order=study.arms()), figs)


def _curves_figure(study: PenaltyStudy, res: Results, colours: dict[str, str]):
    """Per epoch ``||h_L||``, ``||g_L||`` (log scales) and test accuracy per arm."""
    from .. import plots

    L = study.specs()[0].model.num_blocks
    hist = finished(res.history)
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.7))
    if len(hist):
        curves = dict(hue="arm", colours=colours, styles={"bp": "--"})
        plots.plot_curves(hist, "epoch", f"h_norm_{L}", ax=axes[0], logy=True, **curves)
        plots.plot_curves(hist, "epoch", f"g_norm_{L}", ax=axes[1], logy=True, **curves)
        axes[1].axhline(D2_FLOOR, color="k", ls=":", lw=1, label=f"D2 floor {D2_FLOOR:g}")
        plots.plot_curves(hist, "epoch", "test_acc", ax=axes[2], logy=False, **curves)
        for ax in axes:
            ax.legend(fontsize=8, frameon=False)
    else:
        for ax in axes:
            plots.no_data(ax)
    axes[0].set(title=f"residual stream ||h_{L}|| (median, 128 test images)", ylabel=f"||h_{L}||")
    axes[1].set(title=f"BP reference gradient ||g_{L}|| (median)", ylabel=f"||g_{L}||")
    axes[2].set(title="test accuracy", ylabel="accuracy")
    return fig
