"""The FA/DFA audit (notebooks 02-04): train rules on block models, audit every run.

One unit of work (:class:`AuditUnit`) trains one rule on one architecture with one seed
(:func:`fa_study.train.train`) and reads the trained network with the protocol:
the three diagnostics' raw values (:func:`fa_study.protocol.audit`, D3 is decided later against
the frozen-blocks baseline of the same architecture), per-layer direction quality
(:func:`fa_study.protocol.direction_quality`) and, for rules with random feedback, the
fresh-feedback null (:func:`fa_study.protocol.fresh_feedback_null`). Units are cached on disk
(:func:`fa_study.experiments.core.run_units`), so sweeps resume and reruns are instant.

:func:`run_audit` runs a whole :class:`AuditStudy` (rules x architectures x seeds, with the
frozen baseline added automatically) and returns an :class:`AuditResults` holding tidy
frames: ``history`` (one row per run and epoch), ``runs`` (one row per run, with the verdict),
``layers`` (one row per run and hidden state) and ``null`` (one row per run with a null).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd
import torch

from ..config import check_choice, get_device, seed_everything
from .core import profile_config, run_units

AUDIT_RULES: tuple[str, ...] = ("bp", "fa", "dfa", "frozen", "shallow")
DATASETS: tuple[str, ...] = ("cifar10", "cifar100")
PROTOCOL_EVAL = 128  # the D2 floor was calibrated on batches of 128 (||g|| scales as 1/N)
DIRECTION_EVAL = 1024  # 004 read direction quality on 1,024 test samples


@dataclass(frozen=True)
class AuditUnit:
    """One training run and its audit; the unit that is cached."""

    method: str = "dfa"  # one of AUDIT_RULES
    arch: str = "resmlp"  # one of fa_study.models.ARCHS
    d: int | None = None  # width (None: the reference's for the architecture)
    num_blocks: int | None = None  # depth (None: the reference's)
    penalty: float = 0.0  # residual-branch penalty lambda (fa and dfa only)
    dataset: str = "cifar10"  # cifar10 or cifar100 (synthetic stand-ins offline)
    n_train: int | None = None  # training subset (None: the whole split)
    n_test: int | None = None  # test subset (None: the whole split)
    epochs: int = 10  # passes over the training subset
    batch_size: int = 128  # as the reference
    lr: float = 1e-3  # AdamW, as the reference
    weight_decay: float = 0.01  # AdamW, as the reference
    grad_clip: float | None = None  # per-block gradient-norm clip (004 used 1.0 with the penalty)
    augment: bool = False  # batched random crop + flip (the reference used it on real CIFAR)
    seed: int = 42  # model init, feedback draw and batch order
    null_draws: int = 0  # fresh feedback draws for the null (0: skip)


def audit_unit(u: AuditUnit, fingerprint: str, callback: Callable | None = None) -> dict:
    """Train and audit one run. Returns ``{"history", "run", "layers", "null"}`` (frames)."""
    from .. import data
    from ..methods import build_method
    from ..models import build_model
    from ..protocol import audit, direction_quality, fresh_feedback_null
    from ..train import TrainConfig, train

    dev = get_device()
    train_ds = data.load(u.dataset, "train", n=u.n_train, device=dev)
    test_ds = data.load(u.dataset, "test", n=u.n_test, device=dev)
    seed_everything(u.seed)
    options = {"penalty": u.penalty} if u.method in ("fa", "dfa") else {}
    method = build_method(u.method, **options)
    model_kw = dict(d=u.d, num_blocks=u.num_blocks, num_classes=train_ds.num_classes,
                    input_shape=tuple(train_ds.x.shape[1:]))
    model_kw.update(method.model_kwargs())  # shallow: no blocks
    model = build_model(u.arch, **model_kw).to(dev)
    cfg = TrainConfig(epochs=u.epochs, batch_size=u.batch_size, lr=u.lr, weight_decay=u.weight_decay,
                      grad_clip=u.grad_clip, augment=u.augment, seed=u.seed, eval_batch=PROTOCOL_EVAL)
    label = arm_label(u)

    def relay(step: int, record: dict) -> None:
        callback({**record, "step": step, "arm": label, "loss": record.get("train_loss")})

    history = train(model, method, train_ds, test_ds, cfg, callback=relay if callback else None,
                    callback_every=20)
    history["arm"] = label
    history["seed"] = u.seed
    history["penalty"] = u.penalty
    last = history.iloc[-1]
    run = {**dataclasses.asdict(u), "arm": label, "data_source": train_ds.source,
           "status": last["status"], "test_acc": float(last["test_acc"]), "code": fingerprint}
    layers = pd.DataFrame()
    null = pd.DataFrame()
    if last["status"] == "ok":
        x_eval, y_eval = test_ds.x[:PROTOCOL_EVAL], test_ds.y[:PROTOCOL_EVAL]
        rep = audit(model, x_eval, y_eval, test_acc=float(last["test_acc"]))
        run.update(max_growth=rep.max_growth, g_L=rep.g_L, d1=rep.d1, d2=rep.d2,
                   h_L=rep.hidden_norms[-1], h_0=rep.hidden_norms[0])
        n_dq = min(DIRECTION_EVAL, len(test_ds))
        x_dq, y_dq = test_ds.x[:n_dq], test_ds.y[:n_dq]
        if u.method not in ("frozen", "shallow") and model.num_blocks > 0:
            layers = direction_quality(model, method, x_dq, y_dq)
            layers = layers.assign(arm=label, seed=u.seed, method=u.method, penalty=u.penalty, arch=u.arch)
        if u.null_draws and u.method in ("fa", "dfa"):
            nd = fresh_feedback_null(model, method, x_dq, y_dq, n_draws=u.null_draws,
                                     generator=torch.Generator().manual_seed(10_000 + u.seed))
            null = pd.DataFrame([{"arm": label, "seed": u.seed, "arch": u.arch, "penalty": u.penalty,
                                  **{k: v for k, v in nd.items() if not isinstance(v, (list, tuple, dict))}}])
    else:
        run.update(max_growth=math.nan, g_L=math.nan, d1=None, d2=None, h_L=math.nan, h_0=math.nan)
    return {"history": history, "run": pd.DataFrame([run]), "layers": layers, "null": null}


def arm_label(u: AuditUnit) -> str:
    """``dfa``, ``dfa λ=0.01``, ...: the name plots and tables use for a run's rule."""
    return u.method if not u.penalty else f"{u.method} λ={u.penalty:g}"


@dataclass
class AuditResults:
    """Tidy results of an audit: per epoch, per run, per layer, per null."""

    history: pd.DataFrame
    runs: pd.DataFrame
    layers: pd.DataFrame
    null: pd.DataFrame
    from_cache: int = 0
    units: int = 0
    attrs: dict = field(default_factory=dict)


def run_audit_units(units: list[AuditUnit], *, callback: Callable | None = None, n_jobs: int = 1,
                    progress: Callable | None = None, d3_margin_pp: float = 2.0) -> AuditResults:
    """Run the units (cached) and decide D3 and the verdict of every run against the mean
    frozen-blocks accuracy of its (architecture, dataset, width, depth) over seeds."""
    from ..protocol import verdict_from_flags

    outs, hits = run_units(audit_unit, units, callback=callback, n_jobs=n_jobs, progress=progress)
    cat = lambda key: pd.concat([o[key] for o in outs if len(o[key])], ignore_index=True) \
        if any(len(o[key]) for o in outs) else pd.DataFrame()
    history, runs, layers, null = cat("history"), cat("run"), cat("layers"), cat("null")
    # the baseline of a run: frozen runs of the same architecture, data and size, mean over seeds
    keys = runs[["arch", "dataset", "d", "num_blocks"]].itertuples(index=False)
    group = pd.Series(["|".join(map(str, k)) for k in keys], index=runs.index)
    frozen = runs.loc[runs["method"] == "frozen", "test_acc"].groupby(group).mean()
    runs["frozen_acc"] = group.map(frozen).astype(float)
    runs["depth_margin_pp"] = 100 * (runs["test_acc"] - runs["frozen_acc"])
    verdicts, d3s = [], []
    for r in runs.itertuples():
        if r.status != "ok":
            verdicts.append("DIVERGED")
            d3s.append(None)
            continue
        d3 = None if (math.isnan(r.frozen_acc) or r.method in ("frozen", "shallow")) \
            else bool(r.depth_margin_pp < d3_margin_pp)
        d3s.append(d3)
        verdicts.append(verdict_from_flags(bool(r.d1), bool(r.d2), d3))
    runs["d3"] = d3s
    runs["verdict"] = verdicts
    return AuditResults(history, runs, layers, null, hits, len(units))


@dataclass(frozen=True)
class AuditStudy:
    """BP / FA / DFA against the frozen-blocks baseline, audited by the three diagnostics."""

    rules: tuple = ("bp", "fa", "dfa")  # learning rules audited (frozen baseline added for D3)
    archs: tuple = ("resmlp",)  # architectures; the paper profile adds vit and resnet
    seeds: tuple = (42,)  # one run per rule, architecture and seed
    dataset: str = "cifar10"  # cifar100 is the reference's appendix
    d: int | None = None  # width (None: the reference's per architecture)
    num_blocks: int | None = None  # depth (None: the reference's)
    penalty: float = 0.0  # residual-branch penalty for fa and dfa (0: vanilla)
    epochs: int = 10  # passes over the training subset (reference: 100, 60 for ViT)
    lr: float = 1e-3  # AdamW learning rate, as the reference
    n_train: int | None = None  # training subset (None: the whole split)
    n_test: int | None = None  # test subset (None: the whole split)
    augment: bool = False  # batched crop + flip
    null_draws: int = 0  # fresh-feedback draws per fa/dfa run (0: skip the null)

    PROFILES = {
        "quick": dict(epochs=5, n_train=4000, n_test=1000, d=64, seeds=(42,)),
        "default": dict(epochs=10, n_train=10000, n_test=2000, seeds=(42,)),
        "paper": dict(epochs=100, n_train=None, n_test=None, seeds=(42, 123, 456),
                      archs=("resmlp", "vit", "resnet"), augment=True, null_draws=20),
    }
    CONTROLS = {
        "rules": ("bp", "fa", "dfa"), "archs": ("resmlp", "vit", "resnet"), "seeds": "seeds",
        "dataset": DATASETS, "penalty": (0.0, 0.05, 0.001), "epochs": (1, 100, 1),
        "lr": ("log", 1e-4, 1e-2),
    }

    def __post_init__(self):
        from ..models import ARCHS

        if not self.rules or not self.archs or not self.seeds:
            raise ValueError("rules, archs and seeds must each hold at least one value")
        for r in self.rules:
            check_choice("rule", r, AUDIT_RULES)
        for a in self.archs:
            check_choice("arch", a, ARCHS)
        check_choice("dataset", self.dataset, DATASETS)
        if not (isinstance(self.penalty, (int, float)) and self.penalty >= 0 and math.isfinite(self.penalty)):
            raise ValueError(f"penalty must be a finite number >= 0, got {self.penalty!r}")

    @classmethod
    def for_profile(cls, profile: str | None = None, **overrides) -> "AuditStudy":
        return profile_config(cls, profile, overrides)

    def epochs_for(self, arch: str) -> int:
        """The reference trained ViT for 60 % of the epochs (60 of 100)."""
        return max(1, round(self.epochs * 0.6)) if arch == "vit" and self.epochs >= 50 else self.epochs

    def unit(self, method: str, arch: str, seed: int, penalty: float | None = None) -> AuditUnit:
        pen = self.penalty if penalty is None else penalty
        return AuditUnit(method=method, arch=arch, d=self.d, num_blocks=self.num_blocks,
                         penalty=pen if method in ("fa", "dfa") else 0.0, dataset=self.dataset,
                         n_train=self.n_train, n_test=self.n_test, epochs=self.epochs_for(arch),
                         lr=self.lr, augment=self.augment, seed=seed,
                         null_draws=self.null_draws if method in ("fa", "dfa") else 0)

    def units(self) -> list[AuditUnit]:
        rules = list(self.rules) + (["frozen"] if "frozen" not in self.rules else [])
        return [self.unit(m, a, s) for a in self.archs for s in self.seeds for m in rules]


def run_audit(study: AuditStudy | None = None, *, profile: str | None = None,
              callback: Callable | None = None, n_jobs: int = 1, progress: Callable | None = None,
              **overrides) -> AuditResults:
    """Run every rule, architecture and seed of ``study`` plus the frozen baseline; see
    :class:`AuditResults`."""
    study = dataclasses.replace(study, **overrides) if study else AuditStudy.for_profile(profile, **overrides)
    return run_audit_units(study.units(), callback=callback, n_jobs=n_jobs, progress=progress)
