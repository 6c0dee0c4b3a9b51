"""Notebook 07: audit a network the package did not build, trained by a plain PyTorch loop.

Everything a user brings is here, written as a user writes it, so the notebook holds no
mechanism:

* **the networks**: the reference's :class:`ViTMini` (pre-LN :class:`TransformerBlock` s that
  add their own skip, a class token, a terminal LayerNorm) and :class:`SmallResNet`
  (post-activation ``BasicBlock`` s, ``relu(x + f(x))``), reference 003's modules (same
  layers, names and computation) with only the image size and the widths as arguments; and two
  torchvision models built without weights (``resnet18`` and a small ``VisionTransformer``).
  :func:`build_network` makes one.
* **the training loop**: :func:`train_plain`, an ordinary PyTorch loop (AdamW, cross-entropy,
  random mini-batches) with the two calls that ``fa_study.rules.convert`` asks of a loop
  (``capture_output_error`` after the forward, ``feedback_step`` after the backward; both do
  nothing for rules that do not need them). It does not use ``fa_study.train``.
* **the readings**: each trained network is read by :mod:`fa_study.diagnostics` exactly as a
  user would read theirs -- ``audit`` (verdict, D1 / D2 / D3, per-layer norms),
  ``direction_quality`` (the model's own backward credit against BP's gradient, per hidden
  state) and ``update_alignment`` (per weight, the update the model's own backward applies
  against BP's gradient through the BP twin).

:class:`OwnNetworkStudy` holds the settings (profiles and the panel's ranges);
:func:`run_own_network` trains and reads every network x rule; :func:`own_network_view` also
draws -- it is the control panel's callback and the notebook's baseline run. Runs are not
cached: the point is the trained ``nn.Module`` the reader audits, and each run takes seconds.

D3 (depth utility) needs the test accuracy of the same network with its blocks frozen at their
random initialisation: the view trains that baseline with :func:`fa_study.train.frozen_baseline`
when the package has it (``frozen=True``), otherwise D3 is "not evaluated" and said so.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import check_choice, check_int, get_device, seed_everything, stream_generator
from ..fields import boolean, choice, int_range, option, positive, positive_int
from ..fields import seed as seed_check
from ..models.resnet import BasicBlock
from ..rules import BP_REFERENCE, converting_rules
from ..runs import replay_live
from .core import Study, StudyResult, names, one_cpu_thread, resolve_study

NETWORKS: tuple[str, ...] = ("vit_mini", "torchvision_vit", "small_resnet", "resnet18")


def own_rules() -> tuple[str, ...]:
    """BP (the plain network) and every registered layer rule that converts each of
    :data:`NETWORKS` (:func:`fa_study.rules.converting_rules`), read when asked: a rule
    registered later counts."""
    convert_all = set.intersection(*(set(converting_rules(_meta_network(n))) for n in NETWORKS))
    return (BP_REFERENCE,) + tuple(r for r in converting_rules() if r in convert_all)


DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist", "cifar10")
# where the audit finds each network's hidden states (fa_study.diagnostics.find_hidden_states)
EXPECTED_CONTAINER: dict[str, str] = {"vit_mini": "blocks", "small_resnet": "blocks",
                                      "torchvision_vit": "encoder.layers", "resnet18": "ResNet stages"}


def documented_states(network: str, depth: int) -> list[str]:
    """What the audit is documented to read as ``h_0 .. h_L`` on ``network`` (its report's
    ``hidden_read``). The reference layout's blocks and torchvision's encoder layers return the
    whole update ``h + f(h)``: ``h_0`` is the first block's input and ``h_l`` block ``l-1``'s
    output; resnet18's states are the input of ``layer1`` and the outputs of its four stages."""
    check_choice("network", network, NETWORKS)
    if network == "resnet18":
        return ["input of layer1"] + [f"output of layer{i}" for i in range(1, 5)]
    prefix = "encoder.layers.encoder_layer_" if network == "torchvision_vit" else "blocks."
    return [f"input of {prefix}0"] + [f"output of {prefix}{l}" for l in range(depth)]


# --------------------------------------------------------------------------------------------
# The user's networks, as reference 003 writes them (models/vit_mini.py, models/small_resnet.py)
# --------------------------------------------------------------------------------------------

class TransformerBlock(nn.Module):
    """Pre-LN transformer block: x = x + attn(LN(x)); x = x + mlp(LN(x))."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(d_model)
        mlp_hidden = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_hidden, d_model), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_norm = self.ln1(x)
        x = x + self.attn(x_norm, x_norm, x_norm, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ViTMini(nn.Module):
    """Minimal Vision Transformer: patch embedding, a learned cls token, pre-LN blocks and a
    terminal LayerNorm before the head."""

    def __init__(self, image_size: int = 32, patch_size: int = 4, in_channels: int = 3,
                 num_classes: int = 10, d_model: int = 128, n_heads: int = 4, num_blocks: int = 4,
                 mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        assert image_size % patch_size == 0
        self.n_tokens = (image_size // patch_size) ** 2 + 1  # +1 for cls token
        self.image_size, self.in_channels = image_size, in_channels
        # patch embedding via Conv2d (equivalent to flatten + linear)
        self.patch_embed = nn.Conv2d(in_channels, d_model, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.n_tokens, d_model))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        block = lambda: TransformerBlock(d_model, n_heads, mlp_ratio, dropout)  # noqa: E731
        self.blocks = nn.ModuleList([block() for _ in range(num_blocks)])
        self.out_ln = nn.LayerNorm(d_model)  # terminal LN
        self.out_head = nn.Linear(d_model, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # flat input
            x = x.view(x.size(0), self.in_channels, self.image_size, self.image_size)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, n_patches, d)
        return torch.cat([self.cls_token.expand(x.size(0), -1, -1), x], dim=1) + self.pos_embed

    def forward(self, x: torch.Tensor, return_hidden: bool = False):
        hiddens = [self.embed(x)]
        for block in self.blocks:
            hiddens.append(block(hiddens[-1]))
        logits = self.out_head(self.out_ln(hiddens[-1][:, 0]))  # the cls token, normalised
        return (logits, hiddens) if return_hidden else logits


class SmallResNet(nn.Module):
    """Small ResNet: 3x3 conv stem + BN + ReLU, ``num_blocks`` post-activation BasicBlocks
    (``relu(x + BN(W2 relu(BN(W1 x))))``: a plain ``nn.Module``, the same layers, names and
    computation in the reference and :mod:`fa_study.models.resnet`) at one width and resolution,
    global average pool, linear head."""

    def __init__(self, d_hidden: int = 64, num_classes: int = 10, num_blocks: int = 4):
        super().__init__()
        self.stem_conv = nn.Conv2d(3, d_hidden, kernel_size=3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(d_hidden)
        self.blocks = nn.ModuleList([BasicBlock(d_hidden) for _ in range(num_blocks)])
        self.out_head = nn.Linear(d_hidden, num_classes)

    def embed(self, x):
        return F.relu(self.stem_bn(self.stem_conv(x)))

    def forward(self, x, return_hidden=False):
        hiddens = [self.embed(x)]
        for block in self.blocks:
            hiddens.append(block(hiddens[-1]))
        logits = self.out_head(F.adaptive_avg_pool2d(hiddens[-1], 1).flatten(1))
        return (logits, hiddens) if return_hidden else logits


def patch_size_for(image_size: int) -> int:
    """The ViTs' patch: 7 on 28x28 images (16 patches), 8 on 32x32 (16 patches)."""
    for p in (7, 8, 4):
        if image_size % p == 0:
            return p
    raise ValueError(f"no patch size (7, 8 or 4) divides the image size {image_size}")


def build_network(name: str, *, image_size: int = 28, num_classes: int = 10, width: int = 64,
                  depth: int = 4) -> nn.Module:
    """One of :data:`NETWORKS` for 3-channel ``image_size`` x ``image_size`` images.

    ``vit_mini``: :class:`ViTMini` (``d_model=width``, ``num_blocks=depth``, 4 heads, MLP ratio
    2, patches of 7 on 28x28); ``small_resnet``: :class:`SmallResNet` (``d_hidden=width``,
    ``num_blocks=depth``); ``torchvision_vit``: ``torchvision.models.VisionTransformer``
    (``hidden_dim=width``, ``num_layers=depth``, 4 heads, ``mlp_dim=2*width``);
    ``resnet18``: ``torchvision.models.resnet18(weights=None, num_classes=...)`` (width and depth
    are its own). Nothing is downloaded."""
    check_choice("network", name, NETWORKS)
    check_int("width", width, 4)
    check_int("depth", depth, 1)
    heads = 4 if width % 4 == 0 else 1
    if name == "vit_mini":
        return ViTMini(image_size=image_size, patch_size=patch_size_for(image_size), in_channels=3,
                       num_classes=num_classes, d_model=width, n_heads=heads, num_blocks=depth,
                       mlp_ratio=2.0)
    if name == "small_resnet":
        return SmallResNet(d_hidden=width, num_classes=num_classes, num_blocks=depth)
    import torchvision

    if name == "resnet18":
        return torchvision.models.resnet18(weights=None, num_classes=num_classes)
    return torchvision.models.VisionTransformer(
        image_size=image_size, patch_size=patch_size_for(image_size), num_layers=depth,
        num_heads=heads, hidden_dim=width, mlp_dim=2 * width, num_classes=num_classes)


@functools.lru_cache(maxsize=None)
def _meta_network(name: str) -> nn.Module:
    """``name`` at its default sizes on the meta device: what its layers are, nothing allocated."""
    with torch.device("meta"):
        return build_network(name)


# --------------------------------------------------------------------------------------------
# The user's training loop: plain PyTorch (fa_study's trainer is not used)
# --------------------------------------------------------------------------------------------

def train_plain(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 200,
                batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                log: Callable | None = None) -> list[float]:
    """Train ``model`` on ``(x, y)`` with a plain loop, written as a user would: AdamW,
    cross-entropy, ``steps`` random mini-batches. Returns the training loss of every step.

    The two ``fa_study.feedback`` calls are what ``convert`` asks of any loop; they do nothing
    for a plain (BP) model. ``log(step, loss)``, when given, is called after every step."""
    from fa_study.feedback import capture_output_error, feedback_step

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    batches = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=batches).to(x.device)
        out = model(x[idx])
        capture_output_error(model, out)  # dfa: records dL/d(out) for the layers' backward
        loss = F.cross_entropy(out, y[idx])
        optimizer.zero_grad()
        loss.backward()
        feedback_step(model)  # kolen_pollack / weight_mirror: update the feedback weights
        optimizer.step()
        losses.append(loss.item())
        if log is not None:
            log(step, losses[-1])
    return losses


# --------------------------------------------------------------------------------------------
# The study: settings, one run per network x rule, readings
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OwnNetworkStudy(Study):
    """Networks the package did not build, trained by :func:`train_plain` under BP (the plain
    network) and under the feedback rules (through ``fa_study.rules.convert``), then read."""

    networks: tuple = option(("vit_mini", "torchvision_vit"), names(NETWORKS), "which networks (NETWORKS)")
    rules: tuple = option(("bp", "layer_fa"), names(own_rules),
                          "bp: the plain network; others through convert(model, rule)")
    dataset: str = option("mnist", choice(*DATASETS),
                          "mnist / fashion_mnist (repeated to 3 channels) or cifar10")
    width: int = option(64, int_range(4), "ViTMini d_model, torchvision ViT hidden_dim, SmallResNet d_hidden")
    depth: int = option(4, positive_int, "blocks (ViTMini, SmallResNet) or encoder layers (torchvision ViT)")
    steps: int = option(300, positive_int, "optimizer steps of the plain loop")
    batch_size: int = option(64, int_range(2), "mini-batch size")
    lr: float = option(1e-3, positive, "AdamW learning rate (weight decay 0.01)")
    n_train: int | None = option(10000, int_range(2, none_ok=True, none_means="the whole split"),
                                 "class-balanced training subset (None: the whole split)")
    n_test: int = option(1000, int_range(2), "test samples for the accuracy")
    n_eval: int = option(128, int_range(2),
                         "the audit's evaluation batch (the D2 floor was calibrated on 128)")
    n_direction: int = option(512, int_range(2), "test samples for direction quality (004 used 1,024)")
    seed: int = option(0, seed_check, "seeds the initial weights, the feedback weights and the batches")
    frozen: bool = option(True, boolean,
                          "train the frozen-blocks baseline for D3 (when fa_study.train has it)")

    PROFILES = {
        "quick": dict(width=32, depth=4, steps=120, n_train=4000, n_test=1000, n_direction=256),
        "default": dict(),
        # the reference's ViTMini width (128), longer training on the whole training set
        "paper": dict(width=128, depth=4, steps=2000, batch_size=128, n_train=None, n_test=10000,
                      n_direction=1024),
    }
    CONTROLS = {"networks": NETWORKS, "rules": "rules", "dataset": DATASETS,
                "width": (8, 256, 8), "depth": (1, 8, 1), "steps": (10, 2000, 10),
                "lr": ("log", 1e-4, 1e-2), "seed": (0, 99, 1)}

    @classmethod
    def rule_choices(cls) -> tuple[str, ...]:
        return own_rules()

    def check(self) -> None:
        """Nothing across fields (the rules offered convert every network; its runs are not
        specs: they train here, uncached)."""

    def arms(self) -> list[tuple[str, str]]:
        """``(network, rule)`` in the order they are trained."""
        return [(n, r) for n in self.networks for r in self.rules]


@dataclass
class OwnRun:
    """One trained network and its readings."""

    network: str
    rule: str
    model: nn.Module  # the trained network (converted layers included)
    losses: list  # training loss per step
    test_acc: float
    report: object  # fa_study.diagnostics.AuditReport
    direction: pd.DataFrame  # direction_quality(model, x, y): one row per hidden state
    updates: pd.DataFrame  # update_alignment(model, x, y): one row per weight
    conversion: pd.DataFrame | None  # convert's report (None for bp: the plain network)
    seconds: float  # training time

    @property
    def head(self) -> str:
        """The output layer's weight: the last weight of the update table (model order)."""
        return str(self.updates["param"].iloc[-1])

    def hidden_updates(self) -> pd.DataFrame:
        """The update-alignment rows of every weight below the output layer."""
        return self.updates[self.updates["param"] != self.head]


@dataclass
class OwnNetworkRuns:
    """Everything :func:`run_own_network` trained and read."""

    study: OwnNetworkStudy
    runs: dict  # (network, rule) -> OwnRun
    x_eval: torch.Tensor  # the audit's batch: the first n_eval test samples (3 channels)
    y_eval: torch.Tensor
    x_direction: torch.Tensor  # the first n_direction test samples
    y_direction: torch.Tensor
    x_batch: torch.Tensor  # one training batch for update alignment
    y_batch: torch.Tensor
    data_source: str
    frozen_acc: dict = field(default_factory=dict)  # network -> frozen-blocks accuracy (D3)
    d3_note: str = ""

    def model(self, network: str, rule: str) -> nn.Module:
        return self.runs[network, rule].model

    def __getitem__(self, key) -> OwnRun:
        return self.runs[key]

    def table(self) -> pd.DataFrame:
        """One row per network x rule: accuracy, verdict, D1 / D2 statistics, direction quality
        and update alignment summarised, training time."""
        rows = []
        for (network, rule), r in self.runs.items():
            rep = r.report
            hidden = r.hidden_updates()["cos_update_bp"]
            rows.append({
                "network": network, "rule": rule, "steps": len(r.losses),
                "final_loss": float(np.mean(r.losses[-10:])), "test_acc": r.test_acc,
                "frozen_acc": rep.frozen_acc, "verdict": rep.verdict,
                "max_growth": rep.max_growth, "g_L": rep.g_L,
                "dq_cos_min": float(r.direction["cos_mean"].min()),
                "dq_cos_mean": float(r.direction["cos_mean"].mean()),
                "update_cos_hidden_min": float(hidden.min()) if len(hidden) else math.nan,
                "update_cos_hidden_median": float(hidden.median()) if len(hidden) else math.nan,
                "update_cos_head": float(r.updates["cos_update_bp"].iloc[-1]),
                "train_s": r.seconds, "data_source": self.data_source,
            })
        return pd.DataFrame(rows)


def _build(study: OwnNetworkStudy, network: str, train_ds) -> nn.Module:
    """``network`` at the study's width and depth for ``train_ds``'s images, seeded by the study
    (the same initial weights in every run and baseline), on the data's device."""
    seed_everything(study.seed)
    return build_network(network, image_size=int(train_ds.x.shape[-1]), num_classes=int(train_ds.num_classes),
                         width=study.width, depth=study.depth).to(train_ds.x.device)


def read_network(model: nn.Module, x_eval, y_eval, x_direction, y_direction, x_batch, y_batch, *,
                 frozen_acc: float | None = None, test_acc: float | None = None):
    """The three readings of a trained network: ``(audit report, direction quality, update
    alignment)``. The audit and direction quality run in eval mode; the update alignment in
    train mode on a training batch (the update a training step applies). ``test_acc``: the
    accuracy D3 compares with ``frozen_acc`` (default: the audit batch's)."""
    from ..diagnostics import audit, direction_quality, update_alignment

    report = audit(model, x_eval, y_eval, frozen_acc=frozen_acc, test_acc=test_acc)
    direction = direction_quality(model, x_direction, y_direction)
    was = model.training
    model.train()
    try:
        updates = update_alignment(model, x_batch, y_batch)
    finally:
        model.train(was)
    return report, direction, updates


def _datasets(study: OwnNetworkStudy):
    """The 3-channel training and test sets of the study (the same tensors in every process):
    class-balanced subsets of ``n_train`` / ``n_test`` images, capped at the split's size (the
    offline stand-ins are smaller than the real splits); grey images ``(N, 1, H, W)`` repeated
    over three channels, colour images as they are."""
    from ..data import load

    out = []
    for split, n in (("train", study.n_train), ("test", study.n_test)):
        ds = load(study.dataset, split, device=get_device(), verbose=False)
        ds = ds if n is None or n >= len(ds) else ds.subset(n)
        out.append(ds if ds.x.shape[1] == 3 else dataclasses.replace(
            ds, x=ds.x.expand(-1, 3, -1, -1).contiguous(), mean=ds.mean * 3, std=ds.std * 3))
    return tuple(out)


def _readings_data(study: OwnNetworkStudy, train_ds, test_ds) -> dict:
    """The batches every run is read on: the first test samples (audit, direction quality) and
    one seeded training batch (update alignment)."""
    x, y, xt, yt = train_ds.x, train_ds.y, test_ds.x, test_ds.y
    n_eval, n_dir = min(study.n_eval, len(yt)), min(study.n_direction, len(yt))
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(study.seed + 1))
    idx = idx[:study.batch_size].to(x.device)
    return dict(x_eval=xt[:n_eval], y_eval=yt[:n_eval], x_direction=xt[:n_dir], y_direction=yt[:n_dir],
                x_batch=x[idx], y_batch=y[idx])


def _arm(study: OwnNetworkStudy, network: str, rule: str, frozen_acc: float | None,
         live: Callable | None = None) -> OwnRun:
    """One unit (in this process or a worker's): build ``network`` (seeded), convert it to ``rule``
    unless ``bp``, train it with :func:`train_plain` and read it; ``live`` receives every step's
    record."""
    from ..rules import convert
    from ..train import evaluate

    log = None if live is None else functools.partial(_live, live, network, rule)
    train_ds, test_ds = _datasets(study)
    probe = _readings_data(study, train_ds, test_ds)
    with one_cpu_thread(train_ds.x.device):
        model, conversion = _build(study, network, train_ds), None
        if rule != BP_REFERENCE:  # BP trains the network as it is, unconverted
            model, conversion = convert(model, rule, generator=stream_generator(study.seed, "feedback"),
                                        num_classes=int(train_ds.num_classes))
        start = time.perf_counter()
        losses = train_plain(model, train_ds.x, train_ds.y, steps=study.steps, batch_size=study.batch_size,
                             lr=study.lr, seed=study.seed, log=log)
        seconds = time.perf_counter() - start
        acc = evaluate(model, test_ds.x, test_ds.y, batch_size=500)[1]  # test accuracy, eval mode
        report, direction, updates = read_network(model, *probe.values(), frozen_acc=frozen_acc,
                                                  test_acc=acc)
    return OwnRun(network, rule, model, losses, acc, report, direction, updates, conversion, seconds)


def _frozen(study: OwnNetworkStudy, network: str) -> float | None:
    """One unit: the test accuracy of ``network``'s frozen-blocks baseline (D3; None when it
    diverged). The baseline starts from the very weights the trained networks start from (the
    same seed); the modules between h_0 and h_L stay at that initialisation and the rest trains
    by BP (:func:`fa_study.train.frozen_baseline`, as :func:`frozen_config` says)."""
    from ..train import frozen_baseline

    train_ds, test_ds = _datasets(study)
    cfg, n = frozen_config(study, len(train_ds))
    base_ds = train_ds.subset(n, seed=study.seed) if n < len(train_ds) else train_ds
    with one_cpu_thread(train_ds.x.device):
        acc = frozen_baseline(_build(study, network, train_ds), base_ds, test_ds, cfg)
    return float(acc) if math.isfinite(acc) else None


def _live_record(network: str, rule: str, step: int, loss: float) -> dict:
    """One step's record for the live callback: ``step``, ``arm`` (``"network:rule"``), ``loss``."""
    return {"step": step, "arm": f"{network}:{rule}", "loss": loss}


def _live(live: Callable, network: str, rule: str, step: int, loss: float) -> None:
    live(_live_record(network, rule, step, loss))


def _spread(fn: Callable, tasks: list[tuple]):
    """``(task, fn(*task))`` for every task, over the core budget (:func:`fa_study.units.workers_for`),
    as each finishes; one worker: in order, here, each computed when the caller asks for it."""
    from ..units import as_finished, workers_for

    workers = workers_for(None, len(tasks))
    if workers == 1:
        return ((task, fn(*task)) for task in tasks)
    return ((tasks[i], result) for i, result in as_finished(fn, tasks, workers))


def run_own_network(study: OwnNetworkStudy | None = None, *, profile: str | None = None,
                    live: Callable | None = None, progress: Callable | None = None,
                    **overrides) -> OwnNetworkRuns:
    """Train every network x rule of the study with :func:`train_plain` and read each with
    ``fa_study.diagnostics`` (see the module doc). The frozen baselines, then the runs, spread
    over the core budget as the studies' units do (one torch thread each; the same results in
    any order). ``live(record)`` receives ``step``, ``arm`` (``"network:rule"``) and ``loss``:
    every step for a run trained in this process, the whole curve when a worker's run is done;
    ``progress(done, total, from_cache)`` after every run."""
    from ..units import workers_for

    study = resolve_study(OwnNetworkStudy, study, profile, overrides)
    train_ds, test_ds = _datasets(study)
    out = OwnNetworkRuns(study, {}, **_readings_data(study, train_ds, test_ds), data_source=train_ds.source,
                         d3_note=frozen_note(study, len(train_ds), len(test_ds)))
    if study.frozen:
        baselines = _spread(_frozen, [(study, n) for n in study.networks])
        out.frozen_acc.update((network, acc) for (_, network), acc in baselines)
    arms = study.arms()
    here = workers_for(None, len(arms)) == 1
    tasks = [(study, n, r, out.frozen_acc.get(n), live if here else None) for n, r in arms]
    for (_, network, rule, *_), run in _spread(_arm, tasks):
        if live is not None and not here:  # a worker's run: its curve once it is done
            replay_live(live, (_live_record(network, rule, s, loss) for s, loss in enumerate(run.losses)))
        out.runs[network, rule] = run
        if progress is not None:
            progress(len(out.runs), len(arms), False)
    out.runs = {arm: out.runs[arm] for arm in arms}  # the study's order, whatever finished first
    return out


def frozen_config(study: OwnNetworkStudy, n_train: int) -> tuple[object, int]:
    """``(TrainConfig, n)`` of the frozen-blocks baseline: the plain loop's optimizer (AdamW,
    weight decay 0.01, constant learning rate) and batch size, for about as many steps as the
    trained networks took: ``epochs`` passes over a subset of ``n`` training images with
    ``epochs * n`` = ``steps * batch_size`` (``n`` capped at the training set)."""
    from ..train import TrainConfig

    total = study.steps * study.batch_size
    epochs = max(1, math.ceil(total / max(n_train, 1)))
    n = min(n_train, math.ceil(total / epochs))
    return TrainConfig(epochs=epochs, batch_size=study.batch_size, lr=study.lr, weight_decay=0.01,
                       schedule="constant", eval_batch=study.n_eval, seed=study.seed), n


def frozen_note(study: OwnNetworkStudy, n_train: int, n_test: int) -> str:
    """How D3 is decided for the study (the frozen-blocks baseline, or why there is none)."""
    if not study.frozen:
        return "D3 not evaluated: the frozen-blocks baseline was switched off (frozen=False)."
    cfg, n = frozen_config(study, n_train)
    return (f"D3 against the frozen-blocks baseline: the same initial network with the modules "
            f"between h_0 and h_L frozen, the rest trained by BP for {cfg.epochs} epoch(s) of "
            f"{n} images (fa_study.train.frozen_baseline); accuracy on {n_test} test "
            f"images.")


# --------------------------------------------------------------------------------------------
# The view: figures and table (the control panel's callback)
# --------------------------------------------------------------------------------------------

def short_name(param: str) -> str:
    """A weight's name as a tick label: ``.weight`` dropped, torchvision's long prefixes shortened
    (``encoder.layers.encoder_layer_2.self_attention.in_proj`` -> ``L2.attn.in_proj``)."""
    name = param.removesuffix(".weight").replace("encoder.layers.encoder_layer_", "L")
    return name.replace("self_attention", "attn").replace("encoder.", "").replace("blocks.", "b")


def figures(res: OwnNetworkRuns) -> list:
    """One row per network: training loss, ``||h_l||`` and ``||g_l||`` (log), the model's own
    credit against BP's gradient per hidden state, and per weight the update against BP's
    gradient (input side left, the output layer last)."""
    from .. import plots

    networks = res.study.networks
    fig, axes = plt.subplots(len(networks), 4, figsize=(16, 3.5 * len(networks)), squeeze=False)
    for row, network in zip(axes, networks):
        runs = [res.runs[network, rule] for rule in res.study.rules]
        for i, r in enumerate(runs):
            c = plots.colour(r.rule, i)
            loss = pd.Series(r.losses).rolling(10, min_periods=1).mean()
            row[0].plot(np.arange(len(loss)), loss, color=c, lw=1.2, label=f"{r.rule} (acc {r.test_acc:.2f})")
            L = len(r.report.hidden_norms)
            row[1].plot(range(L), r.report.hidden_norms, color=c, marker="o", lw=1.2,
                        label=f"{r.rule} ||h_l||")
            row[1].plot(range(L), r.report.grad_norms, color=c, marker="s", ls="--", lw=1,
                        label=f"{r.rule} ||g_l||")
            row[2].plot(r.direction["layer"], r.direction["cos_mean"], color=c, marker="o", lw=1.2,
                        label=r.rule)
            row[3].plot(range(len(r.updates)), r.updates["cos_update_bp"], color=c, marker="o", ms=3,
                        lw=1.0, label=r.rule)
        row[0].set(title=f"{network}: training loss (10-step mean)", xlabel="step", ylabel="loss")
        row[1].set_yscale("log")
        row[1].set(title="||h_l|| (o) and BP's ||g_l|| (s), median", xlabel="hidden state l")
        row[2].set(title="cos(own credit, BP gradient) at h_l", xlabel="hidden state l")
        names = [short_name(p) for p in runs[0].updates["param"]]
        row[3].set_xticks(range(len(names)), names, rotation=80, fontsize=6)
        row[3].set(title="cos(update, BP gradient) per weight")
        for ax, frames, col in ((row[2], [r.direction for r in runs], "cos_mean"),
                                (row[3], [r.updates for r in runs], "cos_update_bp")):
            ax.axhline(0, color="k", lw=0.8, ls=":")
            ax.set_ylim(min([-0.25] + [float(f[col].min()) - 0.05 for f in frames]), 1.05)
        for ax in row[1:3]:
            ax.set_xticks(range(len(runs[0].report.hidden_norms)))
        for ax in row:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, frameon=True, framealpha=0.8, loc="best")
    return [plots.finish(fig, sources=[res.data_source], bottom=0.03)]


def own_network_notes(res: OwnNetworkRuns) -> list[str]:
    """Plain-language remarks: the data, what was read as h_l, D3."""
    notes = []
    if res.data_source != "torchvision":
        notes.append(f"Data: {res.study.dataset} stand-in ({res.data_source}), not the real dataset.")
    first = {n: res.runs[n, res.study.rules[0]] for n in res.study.networks}  # each network's first run
    notes += [f"{n}: h_l read as " + "; ".join(f"h_{l} = {t}" for l, t in enumerate(r.report.hidden_read))
              for n, r in first.items()]
    return notes + [res.d3_note]


def own_network_view(study: OwnNetworkStudy | None = None, *, profile: str | None = None,
                     live: Callable | None = None, progress: Callable | None = None,
                     **overrides) -> StudyResult:
    """Train, read and draw (:func:`run_own_network`, :func:`figures`); the result's ``extra``
    is the :class:`OwnNetworkRuns` (trained models, reports, tables). With no argument: the
    profile's baseline run."""
    res = run_own_network(study, profile=profile, live=live, progress=progress, **overrides)
    table = res.table()
    # units=0: nothing is cached here, so the panel says "done", not "0/4 runs from the cache"
    return StudyResult(res.study, table, table, figures(res), 0, 0,
                       own_network_notes(res), res)

