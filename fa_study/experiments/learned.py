"""Learned against fixed feedback (notebook 05): does feedback that learns from forward-only
signals bring the credit closer to BP's, and does that buy accuracy?

Rules compared on ResidualMLP (one cached unit per rule and seed, :func:`_learned_unit`):
``fa`` and ``dfa`` (fixed random feedback), ``grape_fa`` and ``stiefel_dfa`` (the same credit
paths with feedback learned from JVPs / node perturbation, :mod:`fa_study.learned_feedback`),
optionally ``oracle`` (the same block-local training with the exact gradient as credit), and
the references ``bp`` and ``frozen`` (always run). Each unit trains with
:func:`fa_study.train.train` and adds, per epoch, the feedback's distance to its exact target
(:func:`fa_study.learned_feedback.feedback_quality`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import matplotlib.pyplot as plt
import pandas as pd
import torch

from .. import plots as _plots
from ..config import check_choice, get_device, seed_everything
from .core import one_cpu_thread, StudyResult, profile_config, run_units, sources_note

# the learned rules wear their family's colour in every figure (setdefault: never overrides)
_plots.RULE_COLOURS.setdefault("grape_fa", _plots.RULE_COLOURS["grape"])
_plots.RULE_COLOURS.setdefault("stiefel_dfa", _plots.RULE_COLOURS["stiefel"])
_plots.RULE_COLOURS.setdefault("oracle", _plots.PALETTE[2])

RULES: tuple[str, ...] = ("fa", "grape_fa", "dfa", "stiefel_dfa", "oracle")
REFERENCES: tuple[str, ...] = ("bp", "frozen")  # run with every study: the accuracy references
ORDER: tuple[str, ...] = ("bp", "oracle", "fa", "grape_fa", "dfa", "stiefel_dfa", "frozen")
DATASETS: tuple[str, ...] = ("cifar10", "mnist")
PROBES: tuple[str, ...] = ("node", "bp")
EVAL = 128  # eval-batch size of the per-layer cosines and the feedback read-outs (as notebook 02)


@dataclass(frozen=True)
class LearnedUnit:
    """One training run: a rule, a seed and everything that changes its result (cached)."""

    rule: str = "grape_fa"  # one of RULES + REFERENCES
    seed: int = 42  # model init, feedback draw, probes and batch order
    dataset: str = "cifar10"  # cifar10 (synthetic stand-in offline) or mnist
    d: int = 64  # ResidualMLP width
    num_blocks: int = 4  # ResidualMLP depth L
    n_train: int | None = 4000  # training subset (None: the whole split)
    n_test: int | None = 1000  # test subset (None: the whole split)
    epochs: int = 5  # passes over the training subset
    batch_size: int = 128  # as the reference
    lr: float = 1e-3  # AdamW, as the reference
    options: tuple = ()  # the rule's own options as sorted (name, value) pairs


@dataclass(frozen=True)
class LearnedStudy:
    """Fixed random feedback (fa, dfa) against feedback learned from forward-only signals."""

    rules: tuple = ("fa", "grape_fa", "dfa", "stiefel_dfa", "oracle")  # compared (bp, frozen added)
    seeds: tuple = (42,)  # one run per rule and seed; several give confidence bands
    dataset: str = "cifar10"  # the setting of notebooks 02-04 (a synthetic stand-in offline)
    d: int = 64  # ResidualMLP width (the reference's is 256: the paper profile)
    num_blocks: int = 4  # ResidualMLP depth L, as the reference
    epochs: int = 5  # passes over the training subset
    lr: float = 1e-3  # AdamW learning rate, as the reference
    n_train: int | None = 4000  # training subset (None: the whole split)
    n_test: int | None = 1000  # test subset (None: the whole split)
    grape_eta_B: float = 0.1  # GrAPE: fraction of the angle between B_l and J_hat_l closed per step
    grape_n_probe: int | None = 32  # GrAPE: probed samples per step (the paper's 32; None: batch)
    stiefel_eta_B: float = 0.1  # Stiefel: scale-free Riemannian step of U_l
    rank: int = 10  # Stiefel: compressed error dimension r (at most the number of classes)
    stiefel_probe: str = "node"  # Stiefel's g_hat: node perturbation, or "bp" (the oracle)
    stiefel_tau: float = 0.95  # Stiefel: EMA factor of the cross-covariance (noise averaging)

    PROFILES = {
        "quick": dict(epochs=4, n_train=3000, n_test=1000, d=64, seeds=(42,)),
        "default": dict(epochs=8, n_train=8000, n_test=2000, d=128, seeds=(42,)),
        "paper": dict(epochs=100, n_train=None, n_test=None, d=256, seeds=(42, 123, 456)),
    }
    CONTROLS = {
        "rules": RULES, "seeds": "seeds", "dataset": DATASETS, "d": (16, 512, 16),
        "num_blocks": (1, 12, 1), "epochs": (1, 100, 1), "lr": ("log", 1e-4, 1e-2),
        "grape_eta_B": ("log", 1e-3, 1.0), "stiefel_eta_B": ("log", 1e-3, 1.0),
        "rank": (1, 10, 1), "stiefel_probe": PROBES, "stiefel_tau": (0.0, 0.99, 0.01),
    }

    def __post_init__(self):
        if not self.rules:
            raise ValueError(f"rules must name at least one of {RULES}")
        for r in self.rules:
            check_choice("rule", r, RULES)
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty tuple of integers, got {self.seeds!r}")
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("stiefel_probe", self.stiefel_probe, PROBES)
        for name, low in (("d", 1), ("num_blocks", 1), ("epochs", 1), ("rank", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        for name in ("n_train", "n_test", "grape_n_probe"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be None or a positive integer, got {v!r}")
        for name in ("lr", "grape_eta_B", "stiefel_eta_B"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.rank > 10:
            raise ValueError(f"rank must be at most 10 (the compressor maps the 10-class error to "
                             f"r dims), got {self.rank}")
        if self.rank > self.d:
            raise ValueError(f"rank must be at most the width d={self.d}, got {self.rank}")
        if not (isinstance(self.stiefel_tau, (int, float)) and 0.0 <= self.stiefel_tau < 1.0):
            raise ValueError(f"stiefel_tau must be a number in [0, 1), got {self.stiefel_tau!r}")

    @classmethod
    def for_profile(cls, profile: str | None = None, **overrides) -> "LearnedStudy":
        """The profile's defaults (``$FA_STUDY_PROFILE`` when ``profile`` is None), then overrides."""
        return profile_config(cls, profile, overrides)

    def rule_options(self, rule: str) -> dict:
        """The options of ``rule`` that this study sets (only those: other rules' settings do
        not touch its cache entry)."""
        if rule == "grape_fa":
            return {"eta_B": float(self.grape_eta_B), "n_probe": self.grape_n_probe}
        if rule == "stiefel_dfa":
            return {"eta_B": float(self.stiefel_eta_B), "rank": self.rank,
                    "probe": self.stiefel_probe, "tau": float(self.stiefel_tau)}
        return {}

    def unit(self, rule: str, seed: int) -> LearnedUnit:
        return LearnedUnit(rule=rule, seed=seed, dataset=self.dataset, d=self.d,
                           num_blocks=self.num_blocks, n_train=self.n_train, n_test=self.n_test,
                           epochs=self.epochs, lr=float(self.lr),
                           options=tuple(sorted(self.rule_options(rule).items())))

    def arms(self) -> list[str]:
        """The rules run: the chosen ones plus the references, in reading order."""
        chosen = set(self.rules) | set(REFERENCES)
        return [r for r in ORDER if r in chosen]

    def units(self) -> list[LearnedUnit]:
        return [self.unit(r, s) for s in self.seeds for r in self.arms()]


def _callback_every(steps_per_epoch: int, live: bool) -> int:
    """Callback period that lands on every epoch's last step: once per epoch without a live
    plot, else the largest divisor of the epoch length between 5 and 20 (per epoch if none)."""
    if live:
        for k in range(min(20, steps_per_epoch), 4, -1):
            if steps_per_epoch % k == 0:
                return k
    return steps_per_epoch


def _learned_unit(u: LearnedUnit, fingerprint: str, callback: Callable | None = None) -> pd.DataFrame:
    """Train one rule (cached by :func:`run_units`); per-epoch history plus feedback read-outs."""
    with one_cpu_thread(get_device()):
        return _train_unit(u, fingerprint, callback)


def _train_unit(u: LearnedUnit, fingerprint: str, callback: Callable | None) -> pd.DataFrame:
    """The body of :func:`_learned_unit`: load, build, set up, train, attach the read-outs."""
    from .. import data
    from ..data import BatchIterator
    from ..learned_feedback import build_learned_method, feedback_quality
    from ..models import build_model
    from ..train import TrainConfig, train

    dev = get_device()
    train_ds = data.load(u.dataset, "train", n=u.n_train, device=dev)
    test_ds = data.load(u.dataset, "test", n=u.n_test, device=dev)
    seed_everything(u.seed)
    method = build_learned_method(u.rule, **dict(u.options))
    model = build_model("resmlp", d=u.d, num_blocks=u.num_blocks, num_classes=train_ds.num_classes,
                        input_shape=tuple(train_ds.x.shape[1:])).to(dev)
    cfg = TrainConfig(epochs=u.epochs, batch_size=u.batch_size, lr=u.lr, seed=u.seed, eval_batch=EVAL)
    # set up here exactly as train() would, so the feedback can be read before the first step
    method.setup(model, train_ds.num_classes, torch.Generator().manual_seed(cfg.seed))
    x_eval, y_eval = test_ds.x[:EVAL], test_ds.y[:EVAL]
    quality = {0: feedback_quality(method, model, x_eval, y_eval)}
    steps_per_epoch = len(BatchIterator.from_dataset(train_ds, cfg.batch_size))

    def relay(step: int, record: dict) -> None:
        if step % steps_per_epoch == 0:  # the epoch's last step: the model its row evaluates
            quality[record["epoch"]] = feedback_quality(method, model, x_eval, y_eval)
        if callback is not None:
            callback({**record, "arm": u.rule, "loss": record["train_loss"]})

    history = train(model, method, train_ds, test_ds, cfg, callback=relay,
                    callback_every=_callback_every(steps_per_epoch, callback is not None))
    q = pd.DataFrame.from_dict(quality, orient="index")
    if len(q.columns):
        history = history.merge(q, left_on="epoch", right_index=True, how="left")
    history["arm"] = u.rule
    history["seed"] = u.seed
    history["code"] = fingerprint
    return history


def run_learned(study: LearnedStudy | None = None, *, profile: str | None = None,
                callback: Callable | None = None, n_jobs: int = 1, progress: Callable | None = None,
                **overrides) -> pd.DataFrame:
    """Train every rule (plus bp and frozen) and seed of ``study``; the tidy per-epoch log.

    One row per arm, seed and epoch (0 = before training) with the trainer's columns
    (``test_acc``, ``cos_<l>``, ``h_norm_<l>``, ``g_norm_<l>``, ``data_source``, ...), the
    feedback read-outs of :func:`fa_study.learned_feedback.feedback_quality` (``fb_align_<l>``;
    ``alpha_<l>``, ``rho_<l>`` for stiefel_dfa; NaN for rules without them) and ``deep_cos``,
    the mean of ``cos_0 .. cos_{L-1}`` (every state below the top block's output).
    """
    study = dataclasses.replace(study, **overrides) if study else LearnedStudy.for_profile(profile, **overrides)
    units = study.units()
    frames, stats = run_units(_learned_unit, units, callback=callback, n_jobs=n_jobs, progress=progress)
    df = pd.concat(frames, ignore_index=True)
    df["deep_cos"] = df[[f"cos_{l}" for l in range(study.num_blocks)]].mean(axis=1)
    fb = [f"fb_align_{l}" for l in range(study.num_blocks) if f"fb_align_{l}" in df.columns]
    df["deep_fb_align"] = df[fb].mean(axis=1) if fb else math.nan
    df.attrs["from_cache"] = stats.hits
    df.attrs["units"] = len(units)
    return df


def learned_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Per arm at the last epoch: test accuracy, deep-layer cosine with BP and feedback
    alignment (mean ± 95 % CI over seeds). The cosine of bp, oracle and frozen is BP's own
    gradient (1 by definition; left out for frozen, whose blocks do not learn)."""
    from ..stats import aggregate

    last = results[results["epoch"] == results.groupby(["arm", "seed"])["epoch"].transform("max")].copy()
    last.loc[last["arm"] == "frozen", "deep_cos"] = math.nan
    cols = ["test_acc", "deep_cos", "deep_fb_align"]
    table = aggregate(last, "arm", cols)
    order = {a: i for i, a in enumerate(ORDER)}
    table = table.sort_values("arm", key=lambda s: s.map(order)).reset_index(drop=True)
    return table[["arm", "n"] + [f"{c}_text" for c in cols] + cols + [f"{c}_ci" for c in cols]]


def learned_view(study: LearnedStudy | None = None, *, profile: str | None = None,
                 live: Callable | None = None, progress: Callable | None = None,
                 **overrides) -> StudyResult:
    """Run the study and draw (1) alignment to BP over training: the deep-layer cosine per
    epoch, the per-layer cosine at the end and the feedback's alignment with its target;
    (2) accuracy per epoch and at the end against the bp and frozen references; (3) for
    stiefel_dfa, its gains alpha_l and subspace alignment rho_l over training."""
    from .. import plots

    study = dataclasses.replace(study, **overrides) if study else LearnedStudy.for_profile(profile, **overrides)
    res = run_learned(study, callback=live, progress=progress)
    sources = res["data_source"].unique().tolist()
    learners = res[~res["arm"].isin(("bp", "frozen", "oracle"))]
    last = res[res["epoch"] == res.groupby(["arm", "seed"])["epoch"].transform("max")]
    figs = []

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    if len(learners):
        plots.plot_curves(learners, "epoch", "deep_cos", hue="arm", ax=axes[0], logy=False,
                          title="alignment to BP: mean cos(a_l, g_l), l < L", ylabel="cosine")
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
    plots.annotate_source(fig, sources)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    plt.close(fig)
    figs.append(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11.5, 3.8), gridspec_kw={"width_ratios": [1.4, 1]})
    plots.plot_curves(res, "epoch", "test_acc", hue="arm", ax=axes[0], logy=False,
                      title="test accuracy over training", ylabel="test accuracy")
    table = learned_summary(res)
    frozen = table.loc[table["arm"] == "frozen", "test_acc"]
    plots.plot_bars(table, "test_acc", group="arm", err="test_acc_ci", ax=axes[1],
                    reference=float(frozen.iloc[0]) if len(frozen) else None,
                    reference_label="frozen blocks", ylabel="test accuracy",
                    title=f"at the end (epoch {study.epochs})")
    axes[1].tick_params(axis="x", labelsize=7, rotation=30)
    plots.annotate_source(fig, sources)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    plt.close(fig)
    figs.append(fig)

    st = res[res["arm"] == "stiefel_dfa"]
    if len(st) and any(c.startswith("alpha_") for c in st.columns):
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
        long = _per_layer(st, "rho_")
        plots.plot_curves(long, "epoch", "rho_", hue="layer", ax=axes[0], logy=False,
                          title="stiefel_dfa: ρ_l = ⟨U_l, E[g_l cᵀ]⟩ / (‖·‖√r)", ylabel="ρ_l")
        long = _per_layer(st, "alpha_")
        plots.plot_curves(long, "epoch", "alpha_", hue="layer", ax=axes[1], logy=True,
                          title="stiefel_dfa: gains α_l", ylabel="α_l")
        plots.annotate_source(fig, sources)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        plt.close(fig)
        figs.append(fig)
    return StudyResult(study, res, table, figs, res.attrs.get("from_cache", 0),
                       res.attrs.get("units", 0), sources_note(res))


def _per_layer(df: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """Long form of ``<prefix><l>`` columns: one row per (seed, epoch, layer), layer as text."""
    from ..plots import layer_columns

    cols = layer_columns(df, prefix)
    long = df.melt(id_vars=["seed", "epoch"], value_vars=[c for c, _ in cols], var_name="_c",
                   value_name=prefix)
    long["layer"] = long["_c"].map({c: f"h_{l}" for c, l in cols})
    return long.dropna(subset=[prefix])
