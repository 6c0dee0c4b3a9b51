"""The three-diagnostic audit (notebook 02): rules x architectures x seeds against frozen blocks.

Every run is a :class:`fa_study.runs.RunSpec` built by :func:`audit_spec` -- the one place
notebooks 02-05 derive a run from their settings, so equal settings share a cache entry --
trained by :func:`fa_study.train.train` and read by the protocol: the three diagnostics
(:func:`fa_study.diagnostics.audit`; D3 decided by :func:`fa_study.diagnostics.with_baseline` against
the frozen-blocks run of the same model, data and training), per-layer direction quality and,
for rules with random feedback, the fresh-feedback null. :class:`AuditStudy` adds the frozen
baseline to every architecture automatically.

:func:`audit_view` (notebook 02) draws accuracy against the frozen baseline, the per-layer
``||h_l||``, ``||g_l||`` and ``cos(a_l, g_l)``, and the training curves; its table
(:func:`verdict_table`) has one row per model and rule with the verdict(s).

**Beyond the reference (not in the verdict).** D1 reads block-to-block growth only, so growth
in the embedding's output ``h_0``, or spread over several blocks, never fires it. Every run also
records ``||h_l|| / ||h_l at init||`` (:data:`fa_study.runs.INIT_RATIO_COLUMNS`: at ``h_0``, at
``h_L``, the largest), shown next to D1's ``max_growth`` in :func:`verdict_table`, always
labelled as going beyond the reference (:data:`BEYOND_REFERENCE`). :meth:`AuditStudy.blind_spot`
is a small run (DFA on real Fashion-MNIST) where D1 stays quiet while ``||h_L||`` grows more than
1000x since initialisation; :func:`blind_spot_view` shows it (:func:`init_growth_table`,
:func:`blind_spot_figure`).

Models are named as in the reference's ``run_all.sh``: ``resmlp`` (d=256, L=4),
``resmlp_d512_L2`` (the same ResidualMLP at d=512, L=2), ``vit`` and ``resnet``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import matplotlib.pyplot as plt
import pandas as pd

from ..config import get_profile
from ..data import DATASETS
from ..diagnostics import D2_FLOOR, D3_MARGIN_PP, PROTOCOL_EVAL
from ..fields import boolean, choice, nonnegative, option, positive, positive_int
from ..fields import seeds as seed_tuple
from ..models import ARCHITECTURES, audit_archs, audit_models, resolve
from ..rules import BP_REFERENCE, D3_BASELINE, RULES, get_rule
from ..runs import INIT_RATIO_COLUMNS, DataSpec, ModelSpec, ReadSpec, Results, RunSpec
from ..train import TrainConfig
from .core import (SUBSET, WIDTH, Study, StudyResult, depth, finished, last_epoch, layer_long, model_names,
                   names, null_count, resolve_study, rule_names, study_runner)

RULE_ORDER: tuple[str, ...] = ("bp", "oracle", "fa", "grape_fa", "dfa", "stiefel_dfa", "frozen", "shallow")
# The label every table, figure and note carries next to the growth since initialisation.
BEYOND_REFERENCE = ("Beyond the reference (not in the verdict): h0_init_ratio, hL_init_ratio and "
                    "max_init_ratio are ||h_l|| over the same network's ||h_l|| at initialisation "
                    "(at h_0, at h_L, the largest over h_0..h_L); D1 (max_growth) reads only "
                    "block-to-block ratios, so it never sees growth at h_0 (the embedding) and "
                    "sees only one factor of growth spread over blocks.")


def audit_spec(rule: str, model: str, seed: int, *, options: dict | None = None, d: int | None = None,
               num_blocks: int | None = None, dataset: str = "cifar10", n_train: int | None = None,
               n_test: int | None = None, epochs: int = 10, lr: float = 1e-3,
               grad_clip: float | None = None, augment: bool = False, null_draws: int = 0) -> RunSpec:
    """The run of ``rule`` (with ``options``) on ``model`` (a name of :func:`~fa_study.models.audit_models` or
    any arch; a named variant fixes d and L) with ``seed``, trained as the reference (AdamW, cosine,
    batch 128) and read with the protocol's eval batches; the fresh-feedback null only for rules
    with random feedback in use on that model (:meth:`Method.null_applies`). The one place
    notebooks 02-05 build a run."""
    cls, model_spec = get_rule(rule), ModelSpec(model, d, num_blocks)
    return RunSpec(rule=rule, options=options or {},
                   model=model_spec,
                   data=DataSpec(dataset, n_train, n_test),
                   train=TrainConfig(epochs=epochs, lr=lr, grad_clip=grad_clip, augment=augment,
                                     eval_batch=PROTOCOL_EVAL, seed=seed),
                   seed=seed,
                   read=ReadSpec(null_draws=null_draws if cls.null_applies(model_spec.num_blocks) else 0))


def audit_rules() -> tuple[str, ...]:
    """Registered rules that train the audit's architectures (for the panel's choices)."""
    return tuple(n for n, c in RULES.items() if all(c.supports(a) for a in audit_archs()))


@dataclass(frozen=True)
class AuditStudy(Study):
    """BP / FA / DFA (or any rule) against the frozen-blocks baseline, audited by D1-D3."""

    rules: tuple = option(("bp", "fa", "dfa"), names(rule_names),
                          "learning rules audited (frozen baseline added for D3)")
    archs: tuple = option(("resmlp",), names(model_names),
                          "models (audit_models() or any arch); the paper profile runs all four")
    seeds: tuple = option((42,), seed_tuple, "one run per rule, model and seed")
    dataset: str = option("cifar10", choice(*DATASETS),
                          "cifar100 is the reference's appendix; fashion_mnist the real-data check")
    d: int | None = option(None, WIDTH, "width (None: the reference's; named variants keep theirs)")
    num_blocks: int | None = option(None, depth(0),
                                    "depth (None: the reference's; named variants keep theirs)")
    penalty: float = option(0.0, nonnegative, "residual-branch penalty λ of the rules taking one (0: none)")
    epochs: int = option(10, positive_int, "passes over the training subset (ViT: 60 % when >= 50)")
    n_train: int | None = option(None, SUBSET, "training subset (None: the whole split)")
    n_test: int | None = option(None, SUBSET, "test subset (None: the whole split)")
    lr: float = option(1e-3, positive, "AdamW learning rate, as the reference")
    augment: bool = option(False, boolean, "batched random crop + flip (the reference used it on real CIFAR)")
    null_draws: int = option(0, null_count, "fresh feedback draws per run with random feedback (0: no null)")

    # The paper profile is the reference's run_all.sh inventory: ResidualMLP d=256 L=4 and
    # d=512 L=2, ViTMini (60 % of the epochs), SmallResNet; 3 seeds, 100 epochs, crop + flip.
    PROFILES = {
        "quick": dict(epochs=5, n_train=4000, n_test=1000, d=64, seeds=(42, 1), null_draws=10),
        "default": dict(epochs=10, n_train=10000, n_test=2000, seeds=(42,), null_draws=10),
        "paper": dict(epochs=100, n_train=None, n_test=None, seeds=(42, 123, 456),
                      archs=audit_models(), augment=True, null_draws=20),
    }
    # Fashion-MNIST: the whole split when the real files are there (60,000 images)
    CROSS_CHECK = {
        "quick": dict(epochs=3, n_train=4000, n_test=1000, archs=("resmlp",), seeds=(42,)),
        "default": dict(epochs=3, n_train=None, n_test=None, archs=("resmlp",), seeds=(42,), null_draws=10),
        "paper": dict(epochs=30, n_train=None, n_test=None, augment=False),
    }
    # The D1 blind spot (beyond the reference): BP and block DFA on the reference ResidualMLP
    # (d=256, L=4), 12,000 Fashion-MNIST images, 3 epochs, lr 1e-3. Measured on the real data
    # (CPU, seeds 0, 2, 3, 42, 123, 456): DFA's ||h_L|| ends 1,600-2,500x its value at
    # initialisation while its largest block growth is 18-23x (D1 quiet); with 15,000 images
    # the block growth reaches 31-44x, with 20,000 it passes 50 (D1 fires). The same runs in
    # every profile (one cache entry; about 10-20 s on one CPU core), three seeds in `paper`.
    BLIND_SPOT = {
        "quick": dict(rules=("bp", "dfa"), archs=("resmlp",), seeds=(42,), dataset="fashion_mnist",
                      d=None, num_blocks=None, penalty=0.0, epochs=3, n_train=12000, n_test=1000,
                      lr=1e-3, augment=False, null_draws=0),
    }
    BLIND_SPOT["default"] = dict(BLIND_SPOT["quick"])
    BLIND_SPOT["paper"] = dict(BLIND_SPOT["quick"], seeds=(42, 123, 456))
    CONTROLS = {
        "rules": "rules", "archs": audit_models, "seeds": "seeds", "dataset": DATASETS,
        "penalty": (0.0, 0.05, 0.001), "epochs": (1, 100, 1), "lr": ("log", 1e-4, 1e-2),
    }

    @classmethod
    def rule_choices(cls) -> tuple[str, ...]:
        """The registered rules this study can run (the panel's choices; a registered rule of
        your own appears here too)."""
        return audit_rules()

    def blind_spot(self, profile: str | None = None) -> "AuditStudy":
        """The run that shows D1's blind spot (:attr:`BLIND_SPOT` of the profile): BP and block
        DFA (plus the frozen baseline) on the reference ResidualMLP and 12,000 Fashion-MNIST
        images for 3 epochs. On the real data DFA's ``||h_L||`` grows more than 1000x since
        initialisation while no block grows the stream 50x; offline without Fashion-MNIST it runs
        on the stand-in, and its results say so (``data_source``)."""
        return dataclasses.replace(self, **self.BLIND_SPOT[get_profile(profile)])

    def epochs_for(self, model: str) -> int:
        """The epochs of ``model``: a share of long runs where the reference trained it shorter
        (ViTMini: 60 of 100; the architecture's ``long_run_share``)."""
        share = ARCHITECTURES[resolve(model)[0]].long_run_share
        return max(1, round(self.epochs * share)) if share != 1.0 and self.epochs >= 50 else self.epochs

    def spec(self, rule: str, model: str, seed: int) -> RunSpec:
        """The run of ``rule`` on ``model`` with ``seed`` (the penalty for rules that take one)."""
        options = {"penalty": self.penalty} if get_rule(rule).takes_penalty and self.penalty else {}
        return audit_spec(rule, model, seed, options=options, d=self.d, num_blocks=self.num_blocks,
                          dataset=self.dataset, n_train=self.n_train, n_test=self.n_test,
                          epochs=self.epochs_for(model), lr=self.lr, augment=self.augment,
                          null_draws=self.null_draws)

    def specs(self) -> list[RunSpec]:
        rules = list(self.rules) + ([D3_BASELINE] if D3_BASELINE not in self.rules else [])
        return [self.spec(r, a, s) for a in self.archs for s in self.seeds for r in rules]


run_audit = study_runner(AuditStudy, "run_audit", """Run every rule, model and seed of the study (default: the
    profile's, with ``overrides``) plus the frozen baseline; see :class:`fa_study.runs.Results`.""")


# --------------------------------------------------------------------------------------------
# The view of notebook 02: figures and the verdict table
# --------------------------------------------------------------------------------------------

def _ordered(frame: pd.DataFrame, archs: list[str]) -> pd.DataFrame:
    """Rows sorted by architecture (study order) then rule (:data:`RULE_ORDER`), then seed."""
    arch_rank = {a: i for i, a in enumerate(archs)}
    rule_rank = {r: i for i, r in enumerate(RULE_ORDER)}
    key = frame.assign(_a=frame["model"].map(arch_rank).fillna(len(arch_rank)),
                       _r=frame["rule"].map(rule_rank).fillna(len(rule_rank)),
                       _p=frame.get("penalty", 0.0))
    return key.sort_values(["_a", "_r", "_p", "seed"], kind="stable").drop(columns=["_a", "_r", "_p"])


def _verdicts_text(verdicts: pd.Series) -> str:
    """``FAIL(D3)`` when every seed agrees, else ``FAIL(D3) 2/3, PASS 1/3``."""
    counts = verdicts.value_counts()
    if len(counts) == 1:
        return str(counts.index[0])
    return ", ".join(f"{v} {c}/{len(verdicts)}" for v, c in counts.items())


def verdict_table(results: Results) -> pd.DataFrame:
    """One row per architecture and rule (frozen baseline included): test accuracy, margin over
    the frozen baseline in percentage points, D1's max block growth and, next to it and beyond
    the reference (not in the verdict; :data:`BEYOND_REFERENCE`), the growth since
    initialisation at ``h_0`` and the largest over ``h_0..h_L`` (``h0_init_ratio``,
    ``max_init_ratio``), D2's ``||g_L||`` and ``||h_L||`` (each mean ± 95 % CI over seeds, as
    ``*_text`` columns next to the raw numbers), how many runs each diagnostic fired in, and the
    verdict(s). The frozen rows read ``baseline``."""
    from ..stats import aggregate, format_mean_ci

    runs = results.runs
    if runs.empty:
        raise ValueError("the results hold no runs")
    archs = list(dict.fromkeys(runs["model"]))
    runs = _ordered(runs, archs).assign(**{c: math.nan for c in INIT_RATIO_COLUMNS if c not in runs})
    cols = ["test_acc", "depth_margin_pp", "max_growth", "h0_init_ratio", "max_init_ratio", "g_L", "h_L"]
    table = aggregate(runs, ["model", "arm"], cols)
    rows = []
    for row in table.to_dict("records"):
        sub = runs[(runs["model"] == row["model"]) & (runs["arm"] == row["arm"])]
        sub_ok = sub[sub["status"] == "ok"]
        frozen = sub["rule"].map(lambda r: get_rule(r).is_baseline).all()
        m, half = row["depth_margin_pp"], row["depth_margin_pp_ci"]
        spread = f" ± {half:.1f}" if math.isfinite(half) else ""
        row["depth_margin_pp_text"] = "—" if frozen else f"{m:+.1f}{spread}" if math.isfinite(m) else "n/a"
        row["max_growth_text"] = format_mean_ci(row["max_growth"], row["max_growth_ci"])
        for flag in ("d1", "d2", "d3"):
            fired = sum(bool(v) for v in sub_ok[flag] if v is not None and v == v)
            row[f"{flag}_fired"] = "—" if (flag == "d3" and frozen) else f"{fired}/{len(sub_ok)}"
        row["verdict"] = "baseline" if frozen else _verdicts_text(sub["verdict"])
        row["diverged"] = int((sub["status"] != "ok").sum())
        row["data_source"] = ", ".join(s for s in sorted(sub["data_source"].dropna().unique()) if s)
        failed = sub[sub["status"] == "error"]
        row["error"] = "; ".join(f"seed {r['seed']}: {r.get('error', '') or 'error'}"
                                 for r in failed.to_dict("records"))
        rows.append(row)
    out = pd.DataFrame(rows).rename(columns={"model": "arch", "arm": "rule"})
    return out[["arch", "rule", "n", "n_rows", *(f"{c}_text" for c in cols), "d1_fired", "d2_fired",
                "d3_fired", "verdict", "diverged", "error", "data_source", *cols, *(f"{c}_ci" for c in cols)]]


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


def audit_figures(results: Results) -> list:
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

    archs = list(dict.fromkeys(results.runs["model"]))
    history = finished(results.history) if "model" in results.history else \
        results.history.iloc[:0].assign(model=[])
    figs = [_accuracy_figure(results, archs),
            _per_arch(archs, last_epoch(history), _layer_row, results.layers),
            _per_arch(archs, _with_top_norm(history), _curves_row)]
    return [plots.finish(fig, results.runs, bottom=0.03) for fig in figs]


def _accuracy_figure(results: Results, archs: list[str]):
    """Accuracy against the frozen baseline: one bar per rule (mean), a dot per seed, the 95 % CI
    from three seeds on; a rule whose runs failed or diverged reads so under its bar."""
    from .. import plots

    fig, axes = plt.subplots(1, len(archs), figsize=(max(5.6, 4.6 * len(archs)), 3.6), squeeze=False)
    table = verdict_table(results)
    done = results.runs[results.runs["status"] == "ok"]
    for ax, arch in zip(axes[0], archs):
        t = table[(table["arch"] == arch) & (table["verdict"] != "baseline")]
        frozen = table.loc[(table["arch"] == arch) & (table["rule"] == D3_BASELINE), "test_acc"].dropna()
        ref = float(frozen.iloc[0]) if len(frozen) else None
        mine = done[done["model"] == arch]  # the table's "rule" column holds the arm labels
        points = pd.DataFrame({"rule": mine["arm"], "test_acc": mine["test_acc"]})
        plots.plot_bars(t.assign(test_acc_ci=t["test_acc_ci"].fillna(0.0)), "test_acc", group="rule",
                        ax=ax, err="test_acc_ci", n="n", points=points,
                        reference=ref, reference_label="frozen blocks",
                        ylabel="test accuracy", title=f"{arch}: accuracy vs frozen blocks")
        if ref is not None:
            ax.axhline(ref + D3_MARGIN_PP / 100, color="k", ls=":", lw=0.8,
                       label=f"frozen + {D3_MARGIN_PP:g} pp (D3)")
            ax.legend(fontsize=7, frameon=False, loc="upper right")
        ax.set_xticks(range(len(t)), [f"{r}\n{v}" for r, v in zip(t["rule"], t["verdict"])], fontsize=8)
        ax.set_ylim(0, 1.08)
    return fig


def _per_arch(archs: list[str], frame: pd.DataFrame, draw: Callable, *args):
    """One row of three panels per architecture, drawn by ``draw(row, arch, its rows, *args)``;
    an architecture with no finished run says so."""
    from .. import plots

    fig, axes = plt.subplots(len(archs), 3, figsize=(13.5, 3.3 * len(archs)), squeeze=False)
    for row, arch in zip(axes, archs):
        sub = frame[frame["model"] == arch]
        if sub.empty:
            for ax in row:
                plots.no_data(ax, f"{arch}: no run finished, nothing to draw")
        else:
            draw(row, arch, sub, *args)
    return fig


def _layer_row(row, arch: str, last: pd.DataFrame, layers: pd.DataFrame) -> None:
    """Per layer at the end of training: ``||h_l||``, ``||g_l||`` and ``cos(a_l, g_l)``."""
    from .. import plots

    _log_profile(layer_long(last, "h_norm_"), "layer", "h_norm_", ax=row[0],
                 title=f"{arch}: ‖h_l‖ (D1 reads its growth)", ylabel="median ‖h_l‖")
    _log_profile(layer_long(last, "g_norm_"), "layer", "g_norm_", ax=row[1],
                 title=f"{arch}: ‖g_l‖ = ‖dL/dh_l‖ (D2 reads l = L)", ylabel="median ‖g_l‖")
    row[1].axhline(D2_FLOOR, color="#D55E00", ls=":", lw=1, label=f"D2 floor {D2_FLOOR:g}")
    row[1].legend(fontsize=8, frameon=False)
    lay = layers[layers["model"] == arch] if len(layers) and "model" in layers else layers.iloc[:0]
    if len(lay):
        plots.plot_curves(lay, "layer", "cos_mean", hue="arm", ax=row[2], logy=False,
                          title=f"{arch}: cos(a_l, g_l) per layer", ylabel="mean cosine")
        row[2].axhline(0, color="k", lw=0.8, ls=":")
        row[2].set_ylim(-0.3, 1.05)
    else:
        row[2].set_axis_off()
    for ax in row:
        ax.set_xlabel("hidden state l (0 = embedding)")


def _with_top_norm(history: pd.DataFrame) -> pd.DataFrame:
    """``history`` with ``h_L_norm``, the median ``||h_L||`` of each row's own depth L."""
    hist = history.copy()
    if len(hist):
        top = hist["num_blocks"].astype(int)
        hist["h_L_norm"] = [row[f"h_norm_{L}"] for row, L in zip(hist.to_dict("records"), top)]
    return hist


def _curves_row(row, arch: str, sub: pd.DataFrame) -> None:
    """Training curves: test accuracy, training loss and ``||h_L||`` (log) per epoch."""
    from .. import plots

    plots.plot_curves(sub, "epoch", "test_acc", hue="arm", ax=row[0], logy=False,
                      title=f"{arch}: test accuracy")
    plots.plot_curves(sub[sub["epoch"] > 0], "epoch", "train_loss", hue="arm", ax=row[1],
                      logy=False, title=f"{arch}: training loss")
    _log_profile(sub, "epoch", "h_L_norm", ax=row[2], title=f"{arch}: ‖h_L‖ over training",
                 ylabel="median ‖h_L‖")


def audit_view(study: AuditStudy | None = None, *, profile: str | None = None,
               live: Callable | None = None, progress: Callable | None = None,
               **overrides) -> StudyResult:
    """Run the audit of ``study`` (default: the profile's) and draw :func:`audit_figures`.

    The baseline run notebook 02 shows and the callback of its control panel. Returns a
    :class:`~fa_study.experiments.core.StudyResult` whose ``results`` is ``Results.runs`` (one
    row per run, with the verdict), whose ``table`` is :func:`verdict_table`, and whose ``extra``
    is the whole :class:`fa_study.runs.Results`.
    """
    study = resolve_study(AuditStudy, study, profile, overrides)
    res = study.run(callback=live, progress=progress)
    return StudyResult.of(study, res, res.runs, verdict_table(res), audit_figures(res),
                          notes=[BEYOND_REFERENCE])


# --------------------------------------------------------------------------------------------
# Beyond the reference: growth since initialisation, and D1's blind spot
# --------------------------------------------------------------------------------------------

_LAYER_COLUMNS = ["model", "arm", "rule", "seed", "layer", "h_norm", "init_ratio", "growth"]


def _audited(runs: pd.DataFrame) -> pd.Series:
    """Which runs have a growth since initialisation to read (finished and audited)."""
    if "max_init_ratio" not in runs:
        return pd.Series(False, index=runs.index)
    return (runs["status"] == "ok") & runs["max_init_ratio"].notna()


def init_growth_layers(results: Results) -> pd.DataFrame:
    """Per hidden state of every audited run (beyond the reference): ``model``, ``arm``,
    ``rule``, ``seed``, ``layer`` (0 = the embedding's output h_0), ``h_norm``, ``init_ratio``
    (``||h_l|| / ||h_l at init||``) and ``growth`` (``||h_l|| / ||h_{l-1}||``, what D1 reads;
    NaN at h_0, which no block-to-block ratio sees)."""
    frames = []
    for r, rep in zip(results.runs.to_dict("records"), results.reports):
        if rep is None:
            continue
        frames.append(rep.to_frame().drop(columns=["module", "verdict"]).assign(
            model=r["model"], arm=r["arm"], rule=r["rule"], seed=r["seed"]))
    if not frames:
        raise ValueError("no audited run in the results (every run diverged, failed or was not audited)")
    return pd.concat(frames, ignore_index=True)[_LAYER_COLUMNS]


def init_growth_table(results: Results) -> pd.DataFrame:
    """One row per audited run: D1's reading next to the growth since initialisation (beyond
    the reference, not in the verdict).

    ``max_growth`` and ``d1`` (D1: the largest block-to-block growth and whether it passes 50x),
    ``h0_init_ratio``, ``hL_init_ratio``, ``max_init_ratio`` (``||h_l|| / ||h_l at init||`` at
    h_0, at h_L, the largest), ``hL_vs_bp`` (``||h_L||`` over BP's, same model and seed; NaN
    without a BP run), ``h0_share`` (the part of the growth since initialisation at h_L that is
    already there at h_0, on a log scale: ``log h0_init_ratio / log hL_init_ratio``) and
    ``d1_share`` (the part D1's statistic covers: ``log max_growth / log hL_init_ratio``; both NaN
    when ``hL_init_ratio <= 1``), ``d1_blind`` (D1 quiet while ``hL_init_ratio`` > 1000), the
    verdict and the data source. Since every block starts near the identity,
    ``hL_init_ratio`` is about ``h0_init_ratio`` times the product of the block growths, of which
    D1 reads only the largest factor."""
    ok = results.runs[_audited(results.runs)]
    if ok.empty:
        raise ValueError("no audited run with a growth since initialisation in the results")
    bp = ok[ok["rule"] == BP_REFERENCE].set_index(["model", "seed"])["h_L"]
    rows = []
    for r in ok.to_dict("records"):
        hL = float(r["hL_init_ratio"])
        log_hL = math.log(hL) if hL > 1 else math.nan
        rows.append({
            "model": r["model"], "arm": r["arm"], "rule": r["rule"], "seed": r["seed"],
            "max_growth": float(r["max_growth"]), "d1": bool(r["d1"]),
            "h0_init_ratio": float(r["h0_init_ratio"]), "hL_init_ratio": hL,
            "max_init_ratio": float(r["max_init_ratio"]),
            "hL_vs_bp": float(r["h_L"]) / float(bp.get((r["model"], r["seed"]), math.nan)),
            "h0_share": math.log(float(r["h0_init_ratio"])) / log_hL,
            "d1_share": math.log(float(r["max_growth"])) / log_hL,
            "d1_blind": (not bool(r["d1"])) and hL > 1000.0,
            "verdict": "baseline" if get_rule(r["rule"]).is_baseline else r["verdict"],
            "data_source": r["data_source"],
        })
    return pd.DataFrame(rows)


def blind_spot_figure(results: Results, model: str | None = None):
    """Two panels for ``model`` (default: the first), one bar per rule (geometric mean over
    seeds), log scales (matplotlib Figure, closed):

    1. beyond the reference: ``||h_l|| / ||h_l at init||`` for h_0..h_L (h_0: the embedding's
       output), with a dotted line at 1000x;
    2. what D1 reads: ``||h_l|| / ||h_{l-1}||`` for each block l = 1..L, with D1's threshold
       (50x) dashed.
    """
    import numpy as np

    from .. import plots
    from ..diagnostics import D1_THRESHOLD

    lay = init_growth_layers(results)
    model = model or lay["model"].iloc[0]
    lay = lay[lay["model"] == model]
    order = {r: i for i, r in enumerate(RULE_ORDER)}
    geo = lambda s: float(np.exp(np.log(s.astype(float)).mean()))  # noqa: E731
    mean = (lay.groupby(["arm", "rule", "layer"], sort=False)[["init_ratio", "growth"]]
            .agg(lambda s: geo(s) if s.notna().all() else math.nan).reset_index())
    mean = mean.sort_values(["rule", "layer"], key=lambda c: c.map(order) if c.name == "rule" else c,
                            kind="stable")
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 3.6))
    plots.plot_grouped_bars(mean, "layer", "init_ratio", hue="arm", ax=axes[0], logy=True,
                            reference=1000.0, reference_label="1000x", reference_style=":",
                            tick_format="h_{}", xlabel="hidden state (h_0 = embedding output)",
                            ylabel="‖h_l‖ / ‖h_l at init‖",
                            title=f"{model}: growth since init (beyond the reference)")
    blocks = mean[mean["layer"] > 0]
    plots.plot_grouped_bars(blocks, "layer", "growth", hue="arm", ax=axes[1], logy=True,
                            reference=D1_THRESHOLD, reference_label=f"D1 threshold {D1_THRESHOLD:g}x",
                            tick_format="h_{}", xlabel="block output (growth from the state before)",
                            ylabel="‖h_l‖ / ‖h_(l-1)‖",
                            title=f"{model}: block-to-block growth (what D1 reads)")
    # one log scale for both panels, so the two readings compare by eye
    values = np.concatenate([mean["init_ratio"].dropna().to_numpy(float),
                             blocks["growth"].dropna().to_numpy(float), [1.0, 2 * D1_THRESHOLD]])
    values = values[values > 0]
    for ax in axes:
        ax.set_ylim(0.5 * values.min(), 2.0 * values.max())
    return plots.finish(fig, results.runs, bottom=0.03)


def blind_spot_view(study: AuditStudy | None = None, *, profile: str | None = None,
                    progress: Callable | None = None, **overrides) -> StudyResult:
    """Run the D1 blind-spot study (default: :meth:`AuditStudy.blind_spot` of the profile) and
    draw :func:`blind_spot_figure`. The :class:`~fa_study.experiments.core.StudyResult`'s
    ``results`` are the per-layer readings (:func:`init_growth_layers`), its ``table``
    :func:`init_growth_table`, its ``extra`` the whole :class:`fa_study.runs.Results`."""
    from .core import placeholder_figure

    run_row = ["model", "arm", "rule", "seed", "verdict", "data_source", "status", "error"]
    if study is None:
        study = AuditStudy.for_profile(profile).blind_spot(profile)
    study = resolve_study(AuditStudy, study, profile, overrides)
    res = study.run(progress=progress)
    read = _audited(res.runs)
    if read.any():
        layers, table, figs = init_growth_layers(res), init_growth_table(res), [blind_spot_figure(res)]
        table = table.assign(status="ok", error="")
    else:  # every run failed or diverged: nothing to read or draw
        layers, table = pd.DataFrame(columns=_LAYER_COLUMNS), pd.DataFrame(columns=run_row)
        figs = [placeholder_figure("No run was audited: nothing to draw.", res.runs)]
    rest = res.runs[~read]  # runs without a reading (diverged, failed) are rows too, with status and error
    if len(rest):
        extra = rest.reindex(columns=run_row).fillna({"error": ""})
        table = pd.concat([table, extra], ignore_index=True) if len(table) else extra.reset_index(drop=True)
    return StudyResult.of(study, res, layers, table, figs, notes=[BEYOND_REFERENCE])
