"""Learned against fixed feedback (notebook 05): does feedback that learns from forward-only
signals bring the credit closer to BP's, and does that buy accuracy?

Rules compared on ResidualMLP (one cached run per rule and seed):
``fa`` and ``dfa`` (fixed random feedback), ``grape_fa`` and ``stiefel_dfa`` (the same credit
paths with feedback learned from JVPs / node perturbation, :mod:`fa_study.rules.learned`),
optionally ``oracle`` (the same block-local training with the exact gradient as credit), and
the references ``bp`` and ``frozen`` (always run). Each unit trains with
:func:`fa_study.train.train`, which adds, per epoch, the feedback's distance to its exact target
(each rule's ``feedback_quality``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import matplotlib.pyplot as plt
import pandas as pd

from ..config import MAX_BLOCKS, MAX_WIDTH
from ..fields import choice, int_range, option, positive, positive_int
from ..fields import seeds as seed_tuple
from ..rules import D3_BASELINE, RULES
from ..runs import DataSpec, ModelSpec, ReadSpec, Results, RunSpec
from ..train import TrainConfig
from .core import (SUBSET, Study, StudyResult, finished, last_epoch, layer_long, model_names, names, one_of,
                   resolve_study, rule_names, unchecked)

RULES_COMPARED: tuple[str, ...] = ("fa", "grape_fa", "dfa", "stiefel_dfa", "oracle")
REFERENCES: tuple[str, ...] = ("bp", "frozen")  # run with every study: the accuracy references
ORDER: tuple[str, ...] = ("bp", "oracle", "fa", "grape_fa", "dfa", "stiefel_dfa", "frozen")
DATASETS: tuple[str, ...] = ("cifar10", "mnist", "fashion_mnist")
PROBES: tuple[str, ...] = ("node", "bp")
EVAL = 128  # eval-batch size of the per-layer cosines and the feedback read-outs (as notebook 02)
# study setting -> (rule, option): the per-rule settings the panel exposes
RULE_SETTINGS: dict[str, tuple[str, str]] = {
    "grape_eta_B": ("grape_fa", "eta_B"), "grape_n_probe": ("grape_fa", "n_probe"),
    "stiefel_eta_B": ("stiefel_dfa", "eta_B"), "rank": ("stiefel_dfa", "rank"),
    "stiefel_probe": ("stiefel_dfa", "probe"), "stiefel_tau": ("stiefel_dfa", "tau"),
}


@dataclass(frozen=True)
class LearnedStudy(Study):
    """Fixed random feedback (fa, dfa) against feedback learned from forward-only signals."""

    rules: tuple = option(RULES_COMPARED, names(rule_names), "compared (bp and frozen are always added)")
    seeds: tuple = option((42,), seed_tuple, "one run per rule and seed; several give confidence bands")
    dataset: str = option("cifar10", choice(*DATASETS), "the setting of notebooks 02-04 (a stand-in offline)")
    arch: str = option("resmlp", one_of(model_names), "the model (vit, resnet train with every rule too)")
    d: int = option(64, int_range(1, MAX_WIDTH, bound="fa_study.config.MAX_WIDTH"),
                    "width (the reference's is 256: the paper profile)")
    num_blocks: int = option(4, int_range(1, MAX_BLOCKS, bound="fa_study.config.MAX_BLOCKS"),
                             "depth L, as the reference")
    epochs: int = option(5, positive_int, "passes over the training subset")
    lr: float = option(1e-3, positive, "AdamW learning rate, as the reference")
    n_train: int | None = option(4000, SUBSET, "training subset (None: the whole split)")
    n_test: int | None = option(1000, SUBSET, "test subset (None: the whole split)")
    # the per-rule settings are checked by their rule, and only when the rule is run (check())
    grape_eta_B: float = option(0.1, unchecked,
                                "GrAPE: fraction of the angle between B_l and J_hat_l closed per step")
    grape_n_probe: int | None = option(32, unchecked,
                                       "GrAPE: probed samples per step (the paper's 32; None: batch)")
    stiefel_eta_B: float = option(0.1, unchecked, "Stiefel: scale-free Riemannian step of U_l")
    rank: int = option(10, unchecked, "Stiefel: compressed error dimension r (at most the number of classes)")
    stiefel_probe: str = option("node", unchecked, "Stiefel's g_hat: node perturbation, or bp (the oracle)")
    stiefel_tau: float = option(0.95, unchecked,
                                "Stiefel: EMA factor of the cross-covariance (noise averaging)")

    PROFILES = {
        "quick": dict(epochs=4, n_train=3000, n_test=1000, d=64, seeds=(42,)),
        "default": dict(epochs=8, n_train=8000, n_test=2000, d=128, seeds=(42,)),
        "paper": dict(epochs=100, n_train=None, n_test=None, d=256, seeds=(42, 123, 456)),
    }
    CROSS_CHECK = {
        "quick": dict(epochs=3, n_train=3000, n_test=1000, seeds=(42,)),
        "default": dict(epochs=2, n_train=None, n_test=None, d=64, seeds=(42,)),
        "paper": dict(epochs=30, n_train=None, n_test=None),
    }
    CONTROLS = {
        "rules": "rules", "seeds": "seeds", "dataset": DATASETS, "d": (16, 512, 16),
        "num_blocks": (1, 12, 1), "epochs": (1, 100, 1), "lr": ("log", 1e-4, 1e-2),
        "grape_eta_B": ("log", 1e-3, 1.0), "stiefel_eta_B": ("log", 1e-3, 1.0),
        "rank": (1, 10, 1), "stiefel_probe": PROBES, "stiefel_tau": (0.0, 0.99, 0.01),
    }

    @classmethod
    def rule_choices(cls) -> tuple[str, ...]:
        """Registered block rules that are not baselines (the panel's choices)."""
        return tuple(n for n, c in RULES.items() if c.family in ("block", "learned") and not c.is_baseline)

    def check(self) -> None:
        for rule in self.arms():
            opts = self.rule_options(rule)
            RULES[rule].check_options(opts)
            if "rank" in opts and opts["rank"] > min(self.d, 10):
                raise ValueError(f"rank must be at most min(d={self.d}, 10 classes) for {rule}, "
                                 f"got {opts['rank']}")
        self.specs()

    def rule_options(self, rule: str) -> dict:
        """The options of ``rule`` this study sets (:data:`RULE_SETTINGS`; only those, so other
        rules' settings do not touch its cache entry)."""
        return {opt: getattr(self, name) for name, (r, opt) in RULE_SETTINGS.items() if r == rule}

    def arms(self) -> list[str]:
        """The rules run: the chosen ones plus the references, in reading order."""
        chosen = set(self.rules) | set(REFERENCES)
        return [r for r in ORDER if r in chosen] + [r for r in self.rules if r not in ORDER]

    def spec(self, rule: str, seed: int) -> RunSpec:
        return RunSpec(rule=rule, options=self.rule_options(rule),
                       model=ModelSpec(self.arch, self.d, self.num_blocks),
                       data=DataSpec(self.dataset, self.n_train, self.n_test),
                       train=TrainConfig(epochs=self.epochs, lr=self.lr, eval_batch=EVAL, seed=seed,
                                         feedback_quality=True),
                       seed=seed, read=ReadSpec(audit=False, direction=False))

    def specs(self) -> list[RunSpec]:
        return [self.spec(r, s) for s in self.seeds for r in self.arms()]


def run_learned(study: LearnedStudy | None = None, *, profile: str | None = None,
                callback: Callable | None = None, n_jobs: int | None = None, progress: Callable | None = None,
                **overrides) -> Results:
    """Train every rule (plus bp and frozen) and seed of ``study``. ``Results.history`` has one
    row per arm, seed and epoch (0 = before training) with the trainer's columns, the feedback
    read-outs of each rule's ``feedback_quality`` (``fb_align_<l>``; ``alpha_<l>``, ``rho_<l>``
    for stiefel_dfa; NaN for rules without them), ``deep_cos`` (the mean of ``cos_0 ..
    cos_{L-1}``: every state below the top block's output) and ``deep_fb_align``."""
    study = resolve_study(LearnedStudy, study, profile, overrides)
    res = study.run(callback=callback, n_jobs=n_jobs, progress=progress)
    df = res.history
    if len(df):
        L = study.specs()[0].model.num_blocks
        df["deep_cos"] = df[[f"cos_{l}" for l in range(L)]].mean(axis=1)
        fb = [f"fb_align_{l}" for l in range(L) if f"fb_align_{l}" in df.columns]
        df["deep_fb_align"] = df[fb].mean(axis=1) if fb else math.nan
    return res


def learned_summary(results: pd.DataFrame, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per arm at the last epoch: test accuracy, deep-layer cosine with BP and feedback
    alignment (mean ± 95 % CI over seeds), ``status`` and ``error``. The cosine of bp, oracle and
    frozen is BP's own gradient (1 by definition; left out for frozen, whose blocks do not learn).
    With ``runs`` (``Results.runs``) an arm whose runs all raised -- no history -- is a row too,
    reading n/a with its error."""
    from ..stats import aggregate
    from .core import with_run_status

    cols = ["test_acc", "deep_cos", "deep_fb_align"]
    last = last_epoch(results).copy()
    if len(last) and "rule" in last:
        last = last.assign(**{c: math.nan for c in cols if c not in last})
        last.loc[last["rule"].map(lambda r: RULES[r].is_baseline), "deep_cos"] = math.nan
    table = aggregate(last, "arm", cols)
    if runs is None and len(last) and "status" in last:
        runs = last[[k for k in ("arm", "seed", "status") if k in last]]
    table = with_run_status(table, runs)
    order = {a: i for i, a in enumerate(ORDER)}
    table = table.sort_values("arm", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    return table[["arm", "n", "status", "error"] + [f"{c}_text" for c in cols] + cols
                 + [f"{c}_ci" for c in cols]]


def learned_view(study: LearnedStudy | None = None, *, profile: str | None = None,
                 live: Callable | None = None, progress: Callable | None = None,
                 **overrides) -> StudyResult:
    """Run the study and draw (1) alignment to BP over training: the deep-layer cosine per
    epoch, the per-layer cosine at the end and the feedback's alignment with its target;
    (2) accuracy per epoch and at the end against the bp and frozen references; (3) for
    stiefel_dfa, its gains alpha_l and subspace alignment rho_l over training. Diverged and
    failed runs are left out of the plots; the table has a row for each, with its error."""
    from .. import plots

    study = resolve_study(LearnedStudy, study, profile, overrides)
    results = run_learned(study, callback=live, progress=progress)
    ok = finished(results.history)  # diverged runs are left out of the plots (the table and notes name them)
    table = learned_summary(results.history, results.runs)
    figs = [_alignment_figure(ok), _accuracy_figure(ok, table, study.epochs), _gains_figure(ok)]
    figs = [plots.finish(fig, results.runs) for fig in figs if fig is not None]
    return StudyResult.of(study, results, results.history, table, figs)


def _alignment_figure(ok: pd.DataFrame):
    """Deep-layer cosine per epoch, per-layer cosine at the end, feedback against its target."""
    from .. import plots

    learners = ok[ok["rule"].map(lambda r: RULES[r].has_random_feedback)] if len(ok) else ok
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    if len(learners):
        plots.plot_curves(learners, "epoch", "deep_cos", hue="arm", ax=axes[0], logy=False,
                          title="alignment to BP: mean cos(a_l, g_l), l < L", ylabel="cosine")
        last = last_epoch(ok)
        plots.plot_layers(last[last["arm"].isin(learners["arm"].unique())], "cos_", hue="arm",
                          ax=axes[1], logy=False, title="cos(a_l, g_l) per hidden state, at the end",
                          ylabel="cosine")
        axes[1].set_xlabel("hidden state l (L = top)")
        fb = learners.dropna(subset=["deep_fb_align"]) if "deep_fb_align" in learners else learners.iloc[:0]
        if len(fb):
            plots.plot_curves(fb, "epoch", "deep_fb_align", hue="arm", ax=axes[2], logy=False,
                              title="feedback vs its target (mean over l < L)", ylabel="cosine")
    for ax in axes:
        ax.axhline(0, color="k", lw=0.6, ls=":")
        ax.set_ylim(min(-0.2, ax.get_ylim()[0]), 1.05)
    return fig


def _accuracy_figure(ok: pd.DataFrame, table: pd.DataFrame, epochs: int):
    """Accuracy per epoch, and at the end against the bp and frozen references."""
    from .. import plots

    fig, axes = plt.subplots(1, 2, figsize=(11.5, 3.8), gridspec_kw={"width_ratios": [1.4, 1]})
    if not len(ok):
        for ax in axes:
            plots.no_data(ax)
        return fig
    plots.plot_curves(ok, "epoch", "test_acc", hue="arm", ax=axes[0], logy=False,
                      title="test accuracy over training", ylabel="test accuracy")
    frozen = table.loc[(table["arm"] == D3_BASELINE) & table["test_acc"].notna(), "test_acc"]
    plots.plot_bars(table, "test_acc", group="arm", err="test_acc_ci", ax=axes[1], n="n",
                    points=last_epoch(ok), reference=float(frozen.iloc[0]) if len(frozen) else None,
                    reference_label="frozen blocks", ylabel="test accuracy",
                    title=f"at the end (epoch {epochs})")
    axes[1].set_xticks(range(len(table)), [a if s == "ok" else f"{a}\n({s})" for a, s in
                                           zip(table["arm"], table["status"])])
    axes[1].tick_params(axis="x", labelsize=7, rotation=30)
    return fig


def _gains_figure(ok: pd.DataFrame):
    """For the rules with learned gains (stiefel_dfa): ρ_l and α_l over training; None without."""
    from .. import plots

    gains = [c for c in ok.columns if c.startswith("alpha_")]  # recorded by rules with learned gains
    st = ok.dropna(subset=gains, how="all") if gains else ok.iloc[:0]
    if not len(st):
        return None
    who = ", ".join(st["arm"].unique())
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    plots.plot_curves(_per_layer(st, "rho_"), "epoch", "rho_", hue="layer", ax=axes[0], logy=False,
                      title=f"{who}: ρ_l = ⟨U_l, E[g_l cᵀ]⟩ / (‖·‖√r)", ylabel="ρ_l")
    plots.plot_curves(_per_layer(st, "alpha_"), "epoch", "alpha_", hue="layer", ax=axes[1], logy=True,
                      title=f"{who}: gains α_l", ylabel="α_l")
    return fig


def _per_layer(df: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """Long form of ``<prefix><l>`` columns: one row per (seed, epoch, layer), layer as text."""
    long = layer_long(df, prefix, ("seed", "epoch"))
    return long.assign(layer=[f"h_{l}" for l in long["layer"]])
