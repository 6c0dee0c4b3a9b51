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

from ..config import MAX_BLOCKS, MAX_WIDTH, check_choice, check_float, check_int, check_seeds
from ..data import DATASETS
from ..diagnostics import D2_FLOOR
from ..rules import BP_REFERENCE, RULES, get_rule
from ..runs import Results, RunSpec
from ..stats import aggregate, mean_ci
from .audit import audit_spec
from .core import Study, StudyResult, finished, resolve_study


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
# Parsing and validation shared with notebook 04's study
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
        raise ValueError("lambdas must hold at least one penalty weight >= 0 (e.g. '0, 1e-2')")
    return tuple(sorted(set(lams)))


def check_run_settings(study) -> None:
    """The settings notebooks 03 and 04 share, checked with errors naming field and allowed values."""
    from ..models import MODEL_NAMES

    check_choice("rule (a rule that takes the residual-branch penalty)", study.rule, penalised_rules())
    check_choice("arch", study.arch, MODEL_NAMES)
    check_choice("dataset", study.dataset, DATASETS)
    object.__setattr__(study, "seeds", check_seeds("seeds", study.seeds))
    check_int("epochs", study.epochs, 1)
    if not isinstance(study.augment, bool):
        raise ValueError(f"augment must be True or False, got {study.augment!r}")
    check_int("null_draws", study.null_draws, 0)
    if study.null_draws == 1:
        raise ValueError("null_draws must be 0 (no null) or >= 2 (the null reports a standard deviation)")
    for name in ("d", "num_blocks", "n_train", "n_test"):
        check_int(name, getattr(study, name), 1, none_ok=True, none_means="the reference's / the whole split")
    check_int("d", study.d, 1, MAX_WIDTH, none_ok=True, none_means="the reference's width",
              bound="fa_study.config.MAX_WIDTH")
    check_int("num_blocks", study.num_blocks, 1, MAX_BLOCKS, none_ok=True, none_means="the reference's depth",
              bound="fa_study.config.MAX_BLOCKS")
    check_float("lr", study.lr, 0.0, low_open=True)
    check_float("grad_clip", study.grad_clip, 0.0, low_open=True, none_ok=True, none_means="no clipping")


def study_spec(study, rule: str, seed: int, penalty: float = 0.0) -> RunSpec:
    """One run of ``study`` (a PenaltyStudy or a DirectionStudy) through :func:`audit_spec`, so
    equal settings hit the same cache entry as notebook 02's."""
    options = {"penalty": float(penalty)} if get_rule(rule).takes_penalty and penalty else {}
    return audit_spec(rule, study.arch, seed, options=options, d=study.d, num_blocks=study.num_blocks,
                      dataset=study.dataset, n_train=study.n_train, n_test=study.n_test,
                      epochs=study.epochs, lr=study.lr, grad_clip=study.grad_clip, augment=study.augment,
                      null_draws=study.null_draws)


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PenaltyStudy(Study):
    """DFA with the residual-branch penalty λ·||f_l(h_l)||² for several λ, against BP."""

    lambdas: tuple = (0.0, 1e-4, 1e-2)  # penalty weights swept, 0 = vanilla (003); text "0, 1e-2" is parsed
    rule: str = "dfa"  # the penalised rule: dfa as 003 (any rule with takes_penalty: fa, oracle, ...)
    seeds: tuple = (42, 123, 456)  # one run per λ and seed, plus one BP run per seed (003's seeds)
    arch: str = "resmlp"  # 003: the pre-LayerNorm ResidualMLP (vit, resnet also take the penalty)
    d: int | None = None  # width (None: the reference's, 256 for resmlp)
    num_blocks: int | None = None  # depth (None: the reference's, 4 for resmlp)
    dataset: str = "cifar10"  # cifar10 / cifar100 (synthetic offline); fashion_mnist: the real-data check
    epochs: int = 30  # 003's sweep trained 30 epochs
    lr: float = 1e-3  # AdamW with cosine decay, as 003
    grad_clip: float | None = None  # per-block gradient clip; 003's sweep did not clip (004 did)
    augment: bool = False  # random crop + flip of every training batch (003 on real CIFAR: yes)
    n_train: int | None = None  # training subset (None: the whole split)
    n_test: int | None = None  # test subset (None: the whole split); 1,024 of it for direction quality
    null_draws: int = 20  # fresh feedback draws per penalised-rule run (003: 20); 0 skips the null

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

    def __post_init__(self):
        if isinstance(self.lambdas, (tuple, list, str)) and not (
                self.lambdas.strip() if isinstance(self.lambdas, str) else self.lambdas):
            raise ValueError(f"lambdas must hold at least one non-negative penalty weight λ, e.g. "
                             f"(0.0, 0.01) or the text '0, 1e-2'; got {self.lambdas!r}")
        object.__setattr__(self, "lambdas", parse_lambdas(self.lambdas))
        check_run_settings(self)
        self.specs()  # every run validated before any training

    def spec(self, rule: str, seed: int, penalty: float = 0.0) -> RunSpec:
        """One run: ``rule`` ("bp" or the study's rule) with ``penalty`` and ``seed``."""
        check_choice("rule", rule, ("bp", self.rule))
        return study_spec(self, rule, seed, penalty)

    def specs(self) -> list[RunSpec]:
        """Per seed: BP, then the rule at every λ."""
        return [s for seed in self.seeds
                for s in [self.spec("bp", seed)] + [self.spec(self.rule, seed, lam) for lam in self.lambdas]]

    def arms(self) -> list[str]:
        """Arm labels in plotting order (BP first, then λ ascending)."""
        return list(dict.fromkeys(s.label for s in self.specs()))


def run_penalty(study: PenaltyStudy | None = None, *, profile: str | None = None,
                callback: Callable | None = None, n_jobs: int = 1, progress: Callable | None = None,
                **overrides) -> Results:
    """Train BP and the rule at every λ for every seed (cached) and audit each run; see
    :class:`fa_study.runs.Results` (``history`` per epoch with ``penalty``, ``h_norm_<l>``,
    ``g_norm_<l>``, ``cos_<l>``; ``runs`` with the D1/D2 values; ``null`` per penalised run)."""
    study = resolve_study(PenaltyStudy, study, profile, overrides)
    return study.run(callback=callback, n_jobs=n_jobs, progress=progress)


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
    if len(res.null):
        out = out.merge(res.null[["arm", "seed", *null_cols]], on=["arm", "seed"], how="left")
    else:
        out = out.assign(**{c: math.nan for c in null_cols})
    return out


def penalty_summary(res: Results, order: list[str] | None = None) -> pd.DataFrame:
    """One row per arm: mean ± 95 % CI over seeds of accuracy, ``||h_L||``, its ratio to BP,
    ``||g_L||``, the D1 growth and the null (training deep cosine, fresh mean, z), the
    verdicts seen, ``status`` and ``error`` (the messages of its runs that raised)."""
    from .core import run_status

    runs = penalty_runs(res)
    cols = ["test_acc", "h_L", "h_L_vs_bp", "g_L", "max_growth", "training_deep_cos",
            "fresh_deep_mean", "z_score"]
    table = aggregate(runs, "arm", cols)
    lam = runs.groupby("arm", sort=False)["penalty"].first()
    verdicts = runs.groupby("arm", sort=False)["verdict"].agg(
        lambda v: ", ".join(f"{k} ×{n}" for k, n in v.value_counts().items()))
    table.insert(1, "penalty", table["arm"].map(lam))
    table["verdicts"] = table["arm"].map(verdicts)
    status = run_status(runs, "arm").set_index("arm")
    table["status"] = table["arm"].map(status["status"])
    table["error"] = table["arm"].map(status["error"])
    if order:
        rank = {a: i for i, a in enumerate(order)}
        table = table.sort_values("arm", key=lambda s: s.map(rank)).reset_index(drop=True)
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


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9)
    ax.set_axis_off()


def _null_panel(ax, runs: pd.DataFrame, colours: dict[str, str]) -> None:
    """Training-feedback deep cosine (dots per seed, bar = mean) against fresh draws (mean ± 2 sd,
    cut at [-1, 1])."""
    from ..plots import COSINE, clipped_yerr

    arms = [a for a in colours if a in set(runs.loc[runs["training_deep_cos"].notna(), "arm"])]
    if not arms:
        ax.text(0.5, 0.5, "no fresh-feedback null (null_draws = 0)", ha="center", va="center",
                transform=ax.transAxes, fontsize=9)
        ax.set_axis_off()
        return
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
    runs = runs[runs["status"] == "ok"]
    if not np.isfinite(runs["h_L"].to_numpy(dtype=float)).any():
        _no_data(ax, "no run finished: nothing to draw")
        return
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
    ax.set_yscale("log")
    ax.set_xlabel("penalty λ")
    ax.set_ylabel("final median ||h_L||")
    ax.set_title("dose response: the stream at the end of training", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)


@dataclass
class PenaltyResult(StudyResult):
    """:class:`StudyResult` plus the audit frames (``audit.runs``, ``audit.null``, ...)."""

    audit: Results | None = None


def penalty_view(study: PenaltyStudy | None = None, *, profile: str | None = None,
                 live: Callable | None = None, progress: Callable | None = None,
                 **overrides) -> PenaltyResult:
    """Run the sweep and draw it: per-epoch ``||h_L||``, ``||g_L||`` (log scales) and test
    accuracy per λ with BP for scale; the final ``||h_L||`` against λ; and the fresh-feedback
    null per penalised-rule arm. Runs that diverged or failed are left out of the plots and
    named in the notes. The notebook's baseline run and its panel's callback."""
    from .. import plots

    study = resolve_study(PenaltyStudy, study, profile, overrides)
    res = study.run(callback=live, progress=progress)
    specs = study.specs()
    L = specs[0].model.num_blocks
    hist = finished(res.history)
    colours = arm_colours(specs)
    styles = {"bp": "--"}
    sources = res.runs["data_source"].dropna().unique().tolist()

    fig1, axes = plt.subplots(1, 3, figsize=(13.5, 3.7))
    if len(hist):
        curves = dict(hue="arm", colours=colours, styles=styles)
        plots.plot_curves(hist, "epoch", f"h_norm_{L}", ax=axes[0], logy=True, **curves)
        plots.plot_curves(hist, "epoch", f"g_norm_{L}", ax=axes[1], logy=True, **curves)
        axes[1].axhline(D2_FLOOR, color="k", ls=":", lw=1, label=f"D2 floor {D2_FLOOR:g}")
        plots.plot_curves(hist, "epoch", "test_acc", ax=axes[2], logy=False, **curves)
        for ax in axes:
            ax.legend(fontsize=8, frameon=False)
    else:
        for ax in axes:
            _no_data(ax, "no run finished: nothing to draw")
    axes[0].set(title=f"residual stream ||h_{L}|| (median, 128 test images)", ylabel=f"||h_{L}||")
    axes[1].set(title=f"BP reference gradient ||g_{L}|| (median)", ylabel=f"||g_{L}||")
    axes[2].set(title="test accuracy", ylabel="accuracy")
    plots.annotate_source(fig1, sources)
    plots.annotate_failures(fig1, res.runs)
    fig1.tight_layout(rect=(0, 0.04, 1, 1))
    plt.close(fig1)

    runs = penalty_runs(res)
    fig2, axes2 = plt.subplots(1, 2, figsize=(11, 3.7))
    _dose_panel(axes2[0], runs, colours)
    _null_panel(axes2[1], runs[runs["status"] == "ok"], colours)
    plots.annotate_source(fig2, sources)
    plots.annotate_failures(fig2, res.runs)
    fig2.tight_layout(rect=(0, 0.04, 1, 1))
    plt.close(fig2)

    table = penalty_summary(res, order=study.arms())
    out = PenaltyResult.of(study, res, res.history, table, [fig1, fig2])
    out.audit = res
    return out
