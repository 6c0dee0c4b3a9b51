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
:meth:`AuditResults.report` gives the protocol report (:class:`fa_study.protocol.AuditReport`)
of any run, D3 included.

:func:`audit_view` (notebook 02) runs a study and draws accuracy against the frozen baseline,
the per-layer ``||h_l||``, ``||g_l||`` and ``cos(a_l, g_l)``, and the training curves; its table
(:func:`verdict_table`) has one row per rule and architecture with the verdict(s).

Architectures are named as in the reference's ``run_all.sh``: ``resmlp`` (d=256, L=4),
``resmlp_d512_L2`` (the same ResidualMLP at d=512, L=2: :data:`ARCH_VARIANTS`), ``vit`` and
``resnet``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import matplotlib.pyplot as plt
import pandas as pd
import torch

from ..config import check_choice, get_device, seed_everything
from .core import StudyResult, profile_config, run_units, sources_note

AUDIT_RULES: tuple[str, ...] = ("bp", "fa", "dfa", "frozen", "shallow")
DATASETS: tuple[str, ...] = ("cifar10", "cifar100")
PROTOCOL_EVAL = 128  # the D2 floor was calibrated on batches of 128 (||g|| scales as 1/N)
DIRECTION_EVAL = 1024  # 004 read direction quality on 1,024 test samples
# Named sizes of a base architecture, as the reference's run_all.sh names them: the name fixes
# the width and depth (whatever the study's d and num_blocks say).
ARCH_VARIANTS: dict[str, tuple[str, int, int]] = {"resmlp_d512_L2": ("resmlp", 512, 2)}
AUDIT_ARCHS: tuple[str, ...] = ("resmlp", "resmlp_d512_L2", "vit", "resnet")  # names a study takes
RULE_ORDER: tuple[str, ...] = ("bp", "fa", "dfa", "frozen", "shallow")  # tables and legends


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
    report = None  # the protocol report without D3 (decided against the frozen baseline later)
    if last["status"] == "ok":
        x_eval, y_eval = test_ds.x[:PROTOCOL_EVAL], test_ds.y[:PROTOCOL_EVAL]
        rep = audit(model, x_eval, y_eval, test_acc=float(last["test_acc"]))
        report = rep
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
    return {"history": history, "run": pd.DataFrame([run]), "layers": layers, "null": null,
            "report": report}


def arm_label(u: AuditUnit) -> str:
    """``dfa``, ``dfa λ=0.01``, ...: the name plots and tables use for a run's rule."""
    return u.method if not u.penalty else f"{u.method} λ={u.penalty:g}"


def arch_name(u: AuditUnit) -> str:
    """The architecture's name as the study knows it: ``resmlp_d512_L2`` for a ResidualMLP at
    d=512, L=2 (:data:`ARCH_VARIANTS`), else the base name (``resmlp``, ``vit``, ``resnet``)."""
    for name, (base, d, blocks) in ARCH_VARIANTS.items():
        if u.arch == base and u.d == d and u.num_blocks == blocks:
            return name
    return u.arch


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
    reports: list = field(default_factory=list)  # AuditReport (D3 decided) or None, per runs row

    def report(self, arm: str, seed: int, arch: str | None = None):
        """The protocol report (:class:`fa_study.protocol.AuditReport`, D3 decided against the
        frozen baseline) of the run of ``arm`` (e.g. ``"dfa"``), ``seed`` and, when the results
        hold several, ``arch`` (an ``arch_name`` such as ``"resmlp_d512_L2"``). ``print`` it for
        the reference's report layout."""
        if not self.reports:
            raise RuntimeError("these results hold no protocol reports; build them with "
                               "run_audit() or run_audit_units()")
        names = self.runs["arch_name"] if "arch_name" in self.runs else self.runs["arch"]
        mask = (self.runs["arm"] == arm) & (self.runs["seed"] == seed)
        if arch is not None:
            mask &= names == arch
        rows = list(self.runs.index[mask])
        if len(rows) != 1:
            have = sorted(set(zip(names, self.runs["arm"], self.runs["seed"])))
            why = "no run" if not rows else f"{len(rows)} runs (pass arch=)"
            raise ValueError(f"{why} for arm={arm!r}, seed={seed!r}, arch={arch!r}; runs held "
                             f"(arch, arm, seed): {have}")
        rep = self.reports[self.runs.index.get_loc(rows[0])]
        if rep is None:
            raise ValueError(f"the run arm={arm!r}, seed={seed!r} diverged: it has no report")
        return rep


def run_audit_units(units: list[AuditUnit], *, callback: Callable | None = None, n_jobs: int = 1,
                    progress: Callable | None = None, d3_margin_pp: float = 2.0) -> AuditResults:
    """Run the units (cached) and decide D3 and the verdict of every run against the mean
    frozen-blocks accuracy of its (architecture, dataset, width, depth) over seeds."""
    from ..protocol import verdict_from_flags

    outs, stats = run_units(audit_unit, units, callback=callback, n_jobs=n_jobs, progress=progress)
    for o, u in zip(outs, units):
        for key in ("history", "run", "layers", "null"):
            if len(o[key]) and "arch_name" not in o[key]:
                o[key]["arch_name"] = arch_name(u)
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
    reports = [_with_d3(o.get("report"), r.frozen_acc, d3, d3_margin_pp)
               for o, r, d3 in zip(outs, runs.itertuples(), d3s)]
    return AuditResults(history, runs, layers, null, stats.hits, len(units), reports=reports)


def _with_d3(rep, frozen_acc: float, d3: bool | None, d3_margin_pp: float):
    """The unit's report (D3 not evaluated) with D3 decided as :func:`run_audit_units` did."""
    from ..protocol import fired_flags, verdict_from_flags

    if rep is None or d3 is None:
        return rep
    flags = fired_flags(rep.d1, rep.d2, d3)
    return dataclasses.replace(rep, frozen_acc=float(frozen_acc), depth_margin=rep.test_acc - frozen_acc,
                               d3_margin=d3_margin_pp / 100.0, d3=d3, flags=flags,
                               verdict=verdict_from_flags(rep.d1, rep.d2, d3))


@dataclass(frozen=True)
class AuditStudy:
    """BP / FA / DFA against the frozen-blocks baseline, audited by the three diagnostics."""

    rules: tuple = ("bp", "fa", "dfa")  # learning rules audited (frozen baseline added for D3)
    archs: tuple = ("resmlp",)  # architectures (AUDIT_ARCHS); the paper profile runs all four
    seeds: tuple = (42,)  # one run per rule, architecture and seed
    dataset: str = "cifar10"  # cifar100 is the reference's appendix
    d: int | None = None  # width (None: the reference's per architecture; named variants keep theirs)
    num_blocks: int | None = None  # depth (None: the reference's; named variants keep theirs)
    penalty: float = 0.0  # residual-branch penalty for fa and dfa (0: vanilla)
    epochs: int = 10  # passes over the training subset (reference: 100, 60 for ViT)
    lr: float = 1e-3  # AdamW learning rate, as the reference
    n_train: int | None = None  # training subset (None: the whole split)
    n_test: int | None = None  # test subset (None: the whole split)
    augment: bool = False  # batched crop + flip
    null_draws: int = 0  # fresh-feedback draws per fa/dfa run (0: skip the null)

    # The paper profile is the reference's run_all.sh inventory: ResidualMLP d=256 L=4 and
    # d=512 L=2, ViTMini (60 % of the epochs), SmallResNet; 3 seeds, 100 epochs, crop + flip.
    # (run_all.sh used seeds 1, 2, 5 for d=512 L=2; here every architecture shares the seeds.)
    # CIFAR-100 (the appendix) is the same study with dataset="cifar100", archs=("resmlp",).
    PROFILES = {
        "quick": dict(epochs=5, n_train=4000, n_test=1000, d=64, seeds=(42, 1), null_draws=10),
        "default": dict(epochs=10, n_train=10000, n_test=2000, seeds=(42,), null_draws=10),
        "paper": dict(epochs=100, n_train=None, n_test=None, seeds=(42, 123, 456),
                      archs=("resmlp", "resmlp_d512_L2", "vit", "resnet"), augment=True, null_draws=20),
    }
    CONTROLS = {
        "rules": ("bp", "fa", "dfa"), "archs": ("resmlp", "resmlp_d512_L2", "vit", "resnet"),
        "seeds": "seeds", "dataset": DATASETS, "penalty": (0.0, 0.05, 0.001), "epochs": (1, 100, 1),
        "lr": ("log", 1e-4, 1e-2),
    }

    def __post_init__(self):
        for name in ("rules", "archs", "seeds"):
            if not isinstance(getattr(self, name), tuple) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty tuple, got {getattr(self, name)!r}")
        for r in self.rules:
            check_choice("rule", r, AUDIT_RULES)
        for a in self.archs:
            check_choice("arch", a, AUDIT_ARCHS)
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int):
                raise ValueError(f"seeds must be integers, got {s!r} in {self.seeds!r}")
        check_choice("dataset", self.dataset, DATASETS)
        if not (isinstance(self.penalty, (int, float)) and self.penalty >= 0 and math.isfinite(self.penalty)):
            raise ValueError(f"penalty must be a finite number >= 0, got {self.penalty!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (
                self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        for name, low in (("epochs", 1), ("d", 1), ("num_blocks", 0), ("n_train", 1), ("n_test", 1),
                          ("null_draws", 0)):
            v = getattr(self, name)
            if v is None and name not in ("epochs", "null_draws"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                allowed = f"an integer >= {low}" + ("" if name in ("epochs", "null_draws") else " or None")
                raise ValueError(f"{name} must be {allowed}, got {v!r}")
        if self.null_draws == 1:
            raise ValueError("null_draws must be 0 (no null) or >= 2 (the null reports a standard "
                             "deviation), got 1")

    @classmethod
    def for_profile(cls, profile: str | None = None, **overrides) -> "AuditStudy":
        """The profile's defaults (``$FA_STUDY_PROFILE`` when ``profile`` is None), then overrides."""
        return profile_config(cls, profile, overrides)

    def epochs_for(self, arch: str) -> int:
        """The reference trained ViT for 60 % of the epochs (60 of 100)."""
        return max(1, round(self.epochs * 0.6)) if arch == "vit" and self.epochs >= 50 else self.epochs

    def unit(self, method: str, arch: str, seed: int, penalty: float | None = None) -> AuditUnit:
        """The run of ``method`` on ``arch`` (a name of :data:`AUDIT_ARCHS`) with ``seed``."""
        pen = self.penalty if penalty is None else penalty
        base, d, blocks = ARCH_VARIANTS.get(arch, (arch, self.d, self.num_blocks))
        return AuditUnit(method=method, arch=base, d=d, num_blocks=blocks,
                         penalty=pen if method in ("fa", "dfa") else 0.0, dataset=self.dataset,
                         n_train=self.n_train, n_test=self.n_test, epochs=self.epochs_for(base),
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


# --------------------------------------------------------------------------------------------
# The view of notebook 02: figures and the verdict table
# --------------------------------------------------------------------------------------------

def _ordered(frame: pd.DataFrame, archs: list[str]) -> pd.DataFrame:
    """Rows sorted by architecture (study order) then rule (:data:`RULE_ORDER`), then seed."""
    arch_rank = {a: i for i, a in enumerate(archs)}
    rule_rank = {r: i for i, r in enumerate(RULE_ORDER)}
    key = frame.assign(_a=frame["arch_name"].map(arch_rank).fillna(len(arch_rank)),
                       _r=frame["method"].map(rule_rank).fillna(len(rule_rank)),
                       _p=frame.get("penalty", 0.0))
    return key.sort_values(["_a", "_r", "_p", "seed"], kind="stable").drop(columns=["_a", "_r", "_p"])


def _verdicts_text(verdicts: pd.Series) -> str:
    """``FAIL(D3)`` when every seed agrees, else ``FAIL(D3) 2/3, PASS 1/3``."""
    counts = verdicts.value_counts()
    if len(counts) == 1:
        return str(counts.index[0])
    return ", ".join(f"{v} {c}/{len(verdicts)}" for v, c in counts.items())


def verdict_table(results: AuditResults) -> pd.DataFrame:
    """One row per architecture and rule (frozen baseline included): test accuracy, margin over
    the frozen baseline in percentage points, D1's max block growth, D2's ``||g_L||`` (each
    mean ± 95 % CI over seeds, as ``*_text`` columns next to the raw numbers), how many runs each
    diagnostic fired in, and the verdict(s). The frozen rows read ``baseline``."""
    from ..stats import aggregate, format_mean_ci

    runs = results.runs
    if runs.empty:
        raise ValueError("the results hold no runs")
    archs = list(dict.fromkeys(runs["arch_name"]))
    runs = _ordered(runs, archs)
    ok = runs[runs["status"] == "ok"]
    cols = ["test_acc", "depth_margin_pp", "max_growth", "g_L", "h_L"]
    table = aggregate(runs, ["arch_name", "arm"], cols)
    rows = []
    for row in table.to_dict("records"):
        sub = runs[(runs["arch_name"] == row["arch_name"]) & (runs["arm"] == row["arm"])]
        sub_ok = ok[(ok["arch_name"] == row["arch_name"]) & (ok["arm"] == row["arm"])]
        frozen = (sub["method"] == "frozen").all()
        m, half = row["depth_margin_pp"], row["depth_margin_pp_ci"]
        row["depth_margin_pp_text"] = "—" if frozen else (
            "n/a" if not math.isfinite(m) else f"{m:+.1f}" + (f" ± {half:.1f}" if math.isfinite(half) else ""))
        row["max_growth_text"] = format_mean_ci(row["max_growth"], row["max_growth_ci"])
        for flag in ("d1", "d2", "d3"):
            fired = sum(bool(v) for v in sub_ok[flag] if v is not None and v == v)
            row[f"{flag}_fired"] = "—" if (flag == "d3" and frozen) else f"{fired}/{len(sub_ok)}"
        row["verdict"] = "baseline" if frozen else _verdicts_text(sub["verdict"])
        row["diverged"] = int((sub["status"] != "ok").sum())
        row["data_source"] = ", ".join(sorted(sub["data_source"].dropna().unique()))
        rows.append(row)
    out = pd.DataFrame(rows).rename(columns={"arch_name": "arch", "arm": "rule"})
    text = [f"{c}_text" for c in cols]
    raw = [c for c in cols] + [f"{c}_ci" for c in cols]
    return out[["arch", "rule", "n", *text, "d1_fired", "d2_fired", "d3_fired", "verdict", "diverged",
                "data_source", *raw]]


def _last_epochs(history: pd.DataFrame) -> pd.DataFrame:
    keys = ["arch_name", "arm", "seed"]
    return history[history["epoch"] == history.groupby(keys)["epoch"].transform("max")]


def _layer_long(frame: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """Columns ``<prefix>0..<prefix>L`` as rows: ``arm``, ``seed``, ``layer``, ``<prefix>``."""
    from ..plots import layer_columns

    cols = layer_columns(frame, prefix)
    long = frame.melt(id_vars=["arm", "seed"], value_vars=[c for c, _ in cols], var_name="_col",
                      value_name=prefix)
    long["layer"] = long["_col"].map(dict(cols))
    return long.drop(columns="_col").dropna(subset=[prefix])


def _log_profile(frame: pd.DataFrame, x: str, y: str, *, ax, title: str, ylabel: str):
    """Mean over seeds per rule on a log axis, with each seed as a thin line: a linear-scale
    confidence band of a few seeds reaches below zero and says nothing on a log axis."""
    from .. import plots

    plots.plot_curves(frame, x, y, hue="arm", ax=ax, logy=True, ci=False, title=title, ylabel=ylabel)
    for i, (arm, sub) in enumerate(frame.groupby("arm", sort=False)):
        if sub["seed"].nunique() < 2:
            continue
        for _, one in sub.groupby("seed"):
            one = one.sort_values(x)
            ax.plot(one[x], one[y], color=plots.colour(arm, i), lw=0.7, alpha=0.45)
    return ax


def audit_figures(results: AuditResults) -> list:
    """The three figures of notebook 02 (matplotlib Figures, closed):

    1. test accuracy per rule (bars: mean, error bars: 95 % CI over seeds) against the frozen
       blocks' accuracy (dashed line), one panel per architecture;
    2. per layer at the end of training: ``||h_l||`` and ``||g_l||`` (median per-sample norms of
       the pooled hidden state and BP gradient on the 128-sample eval batch, log scales) and
       ``cos(a_l, g_l)`` (mean per-sample cosine of the rule's credit with the BP gradient on up
       to 1,024 test samples), one row per architecture;
    3. training curves: test accuracy, training loss and ``||h_L||`` (log) per epoch.
    """
    from .. import plots

    runs, history, layers = results.runs, results.history, results.layers
    archs = list(dict.fromkeys(runs["arch_name"]))
    sources = sorted(runs["data_source"].dropna().unique())
    figs = []

    # 1. accuracy against the frozen baseline
    fig, axes = plt.subplots(1, len(archs), figsize=(max(5.6, 4.6 * len(archs)), 3.6), squeeze=False)
    table = verdict_table(results)
    for ax, arch in zip(axes[0], archs):
        t = table[(table["arch"] == arch) & (table["rule"] != "frozen")]
        frozen = table.loc[(table["arch"] == arch) & (table["rule"] == "frozen"), "test_acc"]
        ref = float(frozen.iloc[0]) if len(frozen) else None
        plots.plot_bars(t.assign(test_acc_ci=t["test_acc_ci"].fillna(0.0)), "test_acc", group="rule",
                        ax=ax, err="test_acc_ci", reference=ref, reference_label="frozen blocks",
                        ylabel="test accuracy", title=f"{arch}: accuracy vs frozen blocks")
        if ref is not None:
            ax.axhline(ref + 0.02, color="k", ls=":", lw=0.8, label="frozen + 2 pp (D3)")
            ax.legend(fontsize=7, frameon=False, loc="upper right")
        ax.set_xticks(range(len(t)), [f"{r}\n{v}" for r, v in zip(t["rule"], t["verdict"])], fontsize=8)
        ax.set_ylim(0, 1.08)
    figs.append(fig)

    # 2. per-layer profile at the end of training
    last = _last_epochs(history)
    fig, axes = plt.subplots(len(archs), 3, figsize=(13.5, 3.4 * len(archs)), squeeze=False)
    for row, arch in zip(axes, archs):
        sub = last[last["arch_name"] == arch]
        _log_profile(_layer_long(sub, "h_norm_"), "layer", "h_norm_", ax=row[0],
                     title=f"{arch}: ‖h_l‖ (D1 reads its growth)", ylabel="median ‖h_l‖")
        _log_profile(_layer_long(sub, "g_norm_"), "layer", "g_norm_", ax=row[1],
                     title=f"{arch}: ‖g_l‖ = ‖dL/dh_l‖ (D2 reads l = L)", ylabel="median ‖g_l‖")
        row[1].axhline(1e-7, color="#D55E00", ls=":", lw=1, label="D2 floor 1e-7")
        row[1].legend(fontsize=8, frameon=False)
        lay = layers[layers["arch_name"] == arch] if len(layers) else layers
        if len(lay):
            plots.plot_curves(lay, "layer", "cos_mean", hue="arm", ax=row[2], logy=False,
                              title=f"{arch}: cos(a_l, g_l) per layer", ylabel="mean cosine")
            row[2].axhline(0, color="k", lw=0.8, ls=":")
            row[2].set_ylim(-0.3, 1.05)
        else:
            row[2].set_axis_off()
        for ax in row:
            ax.set_xlabel("hidden state l (0 = embedding)")
    figs.append(fig)

    # 3. training curves
    hist = history.copy()
    top = hist["num_blocks"].astype(int)
    hist["h_L_norm"] = [row[f"h_norm_{L}"] for row, L in zip(hist.to_dict("records"), top)]
    fig, axes = plt.subplots(len(archs), 3, figsize=(13.5, 3.2 * len(archs)), squeeze=False)
    for row, arch in zip(axes, archs):
        sub = hist[hist["arch_name"] == arch]
        plots.plot_curves(sub, "epoch", "test_acc", hue="arm", ax=row[0], logy=False,
                          title=f"{arch}: test accuracy")
        plots.plot_curves(sub[sub["epoch"] > 0], "epoch", "train_loss", hue="arm", ax=row[1],
                          logy=False, title=f"{arch}: training loss")
        _log_profile(sub, "epoch", "h_L_norm", ax=row[2], title=f"{arch}: ‖h_L‖ over training",
                     ylabel="median ‖h_L‖")
    figs.append(fig)

    for fig in figs:
        plots.annotate_source(fig, sources)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        plt.close(fig)
    return figs


def audit_view(study: AuditStudy | None = None, *, profile: str | None = None,
               live: Callable | None = None, progress: Callable | None = None,
               **overrides) -> StudyResult:
    """Run the audit of ``study`` (default: the profile's) and draw :func:`audit_figures`.

    The baseline run notebook 02 shows and the callback of its control panel. Returns a
    :class:`~fa_study.experiments.core.StudyResult` whose ``results`` is
    :attr:`AuditResults.runs` (one row per run, with the verdict), whose ``table`` is
    :func:`verdict_table`, and whose ``extra`` is the whole :class:`AuditResults` (history,
    per-layer direction quality, null, protocol reports).
    """
    study = dataclasses.replace(study, **overrides) if study else AuditStudy.for_profile(profile, **overrides)
    res = run_audit(study, callback=live, progress=progress)
    res.attrs["study"] = study
    figs = audit_figures(res)
    return StudyResult(study, res.runs, verdict_table(res), figs, res.from_cache, res.units,
                       sources_note(res.runs), extra=res)
