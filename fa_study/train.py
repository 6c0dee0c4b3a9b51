"""The one training loop of the package; the history comes back as a pandas DataFrame.

``train(model, rule, train_ds, test_ds, cfg)`` trains ``model`` in place with any rule of
:mod:`fa_study.rules` and one optimizer (AdamW or SGD with momentum) built from
``rule.param_groups(model)``. ``model`` is any classifier ``nn.Module`` (a batch to logits):
the package's block models train with every rule; a network you wrote (a plain CNN, the
reference's embed / blocks / out_ln / out_head layout, a torchvision model) trains with the
rules that do not need blocks (``bp``, ``frozen`` and the layer rules, which convert its
``nn.Linear`` / ``nn.Conv2d``); the others refuse it at setup, naming what it lacks.
:func:`frozen_baseline` trains the frozen-blocks baseline D3 compares with for any network.

The loop never synchronises with the host inside an epoch (loss
and correct counts accumulate on the device and are read once per epoch), except every
``cfg.log_every`` steps for the divergence check and, when given, at the callback and probe
steps.

History: one row per epoch, epoch 0 being the model before training. The per-layer columns
are read at the hidden states ``h_0 .. h_L`` of :func:`fa_study.diagnostics.find_hidden_states`
(found automatically for the package's models, ``blocks`` / ``layers`` containers and ResNet
stages, or named with ``train(..., hidden=[...])``); for a network whose hidden states cannot be
found they are left out, with a UserWarning and a line in ``history.attrs["notes"]``
(``history.attrs["hidden_states"]`` says what was read). Columns::

    epoch, train_loss, train_acc, test_acc,
    h_norm_0..h_norm_L   median ||pool(h_l)|| on the eval batch
    g_norm_0..g_norm_L   median ||pool(g_l)|| of the BP reference g_l = dCE/dh_l, always the
                         gradient of the network as plain BP computes it (for a model converted
                         to layer-level rules: its BP twin; fa_study.diagnostics.bp_reference)
    cos_0..cos_L         fa_study.diagnostics.credit_cosines: mean over the eval batch of
                         cos(a_l, g_l), both summed over positions (a_l = rule.credit(...))
    <rule.state()>       e.g. probe_cos_<l> (grape_fa), alpha_<l> (stiefel_dfa), rev_loss (ra_*)
    <feedback quality>   rule.feedback_quality(...) per epoch when cfg.feedback_quality
    status               "ok", or "diverged" on the row of the epoch where the run blew up
    diverged_epoch       that epoch on every row of a diverged run, else <NA>
    diverged_reason      what the blow-up criterion saw (empty when ok)
    rule, <rule options>, arch, d, num_blocks, dataset, data_source, <TrainConfig fields>

**Blow-up criterion** (explicit and configurable): a run has diverged when the mean training
loss over the last ``cfg.log_every`` steps (checked every ``log_every`` steps and at the end of
every epoch) is not finite or exceeds ``cfg.max_loss`` (default 1e3: the cross-entropy of a
uniform guess is ln C, below 5 for 100 classes, so 1e3 is far beyond anything a working run
reaches and well before float32 overflows), or when the eval batch's hidden-state or gradient norms
are not finite (a stream that overflowed). The run then stops: the history ends with a row marked
``status="diverged"`` (its test accuracy and diagnostics NaN) and no exception is raised.

Probes: ``probe(step, model, rule) -> dict`` is called at step 0, every ``probe_every`` steps and
at the last step; its records (with ``step``, ``epoch`` as a fraction and ``train_loss``, the
mean since the previous probe) come back as ``history.attrs["probes"]`` (a DataFrame). Notebook
00 reads per-layer update alignment this way.

The eval batch is the first ``cfg.eval_batch`` test samples; per-layer diagnostics run in eval
mode. Per-epoch wall times are in ``history.attrs["epoch_seconds"]``, this process's CPU times in
``history.attrs["epoch_cpu_seconds"]``; both are kept out of the columns so that two runs with
the same seed give identical frames on the CPU.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any, Callable

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MAX_BATCH_SIZE, check_int, stream_generator
from .data import BatchIterator, Dataset
from .diagnostics import (bp_twin, buffers_preserved, credit_cosines, eval_mode, find_hidden_states,
                          hidden_gradients, prepare)
from .diagnostics.signals import sync_modes
from .diagnostics.taps import POOLS
from .fields import Checked, boolean, choice, float_range, int_range, nonnegative, option, positive, seed
from .models.base import BlockModel
from .rules import D3_BASELINE, Method, get_rule
from .rules.base import model_dtype

OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")
SCHEDULES: tuple[str, ...] = ("cosine", "constant")


_BATCH = int_range(1, MAX_BATCH_SIZE, bound="fa_study.config.MAX_BATCH_SIZE")
_CLIP = float_range(0.0, low_open=True, none_ok=True, none_means="no clipping")


@dataclass(frozen=True)
class TrainConfig(Checked):
    """Training settings; defaults are the reference study's (003)."""

    epochs: int = option(10, int_range(0), "passes over the training set")
    batch_size: int = option(128, _BATCH, "the reference's batch size")
    optimizer: str = option("adamw", choice(*OPTIMIZERS), '"adamw" (003) or "sgd" (with momentum: 00, RA)')
    lr: float = option(1e-3, positive, "learning rate of the forward weights")
    momentum: float = option(0.9, float_range(0.0, 1.0, high_open=True), "SGD momentum (AdamW ignores it)")
    weight_decay: float = option(0.01, nonnegative, "AdamW's decoupled decay (003), or SGD's L2 term")
    schedule: str = option("cosine", choice(*SCHEDULES), '"cosine" (to 0 over the epochs), "constant"')
    grad_clip: float | None = option(None, _CLIP, "max gradient norm of each block separately (004 used 1.0)")
    augment: bool = option(False, boolean, "random 4-pixel crop + horizontal flip of every training batch")
    eval_batch: int = option(128, _BATCH, "first test samples used for the per-layer diagnostics")
    seed: int = option(0, seed, "seeds the feedback draw (a rule not set up yet) and the batch order")
    log_every: int = option(50, int_range(1), "steps between divergence checks (one host sync each)")
    max_loss: float = option(1e3, positive, "blow-up criterion: a mean loss above it (or not finite)")
    feedback_quality: bool = option(False, boolean, "also record rule.feedback_quality() every epoch")

    # errors name the setting TrainConfig.<field>; values are kept as given (normalising lr=1
    # to 1.0 would change the run's cache key)
    FIELD_PREFIX = "TrainConfig."
    KEEP_VALUES = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Callback = Callable[[int, dict], None]
Probe = Callable[[int, nn.Module, Method], dict]


def check_data(model: nn.Module, train_ds: Dataset, test_ds: Dataset) -> None:
    """Everything about the data that would otherwise fail mid-training, as a ValueError now.

    Each dataset must hold at least one sample, as many labels as images, images ``x`` of the
    model's floating dtype on the model's device with finite values only (a NaN or an infinity
    would make the loss non-finite, and the run would be reported as diverged as if the rule
    had failed), and integer labels ``y`` (other integer dtypes than int64 are converted by
    :func:`train`) in ``[0, num_classes)``.

    The class count is the model's ``num_classes`` (the package's models). For a network without
    one it is the data's: both datasets must have the same number of classes, and the network's
    logits (one forward of two training samples in eval mode) one column per class.
    """
    device, dtype = model_device(model), model_dtype(model)
    n_classes = getattr(model, "num_classes", None)
    built = n_classes is not None
    for what, ds in (("train_ds", train_ds), ("test_ds", test_ds)):
        _check_tensors(what, ds, device, dtype)
        n_classes = ds.num_classes if n_classes is None else n_classes  # no num_classes: the data's
        _check_labels(what, ds, n_classes, built)
    if not built:
        check_logits(model, train_ds.x[:2], n_classes)


def _check_tensors(what: str, ds: Dataset, device: torch.device, dtype: torch.dtype) -> None:
    """Sample counts, device, dtypes and finite inputs of one dataset (see :func:`check_data`)."""
    n_x, n_y = int(ds.x.shape[0]), int(ds.y.shape[0])
    if n_x != n_y:
        raise ValueError(f"{what} holds {n_x} samples in x but {n_y} labels in y; x (N, ...) and "
                         f"y (N,) must hold the same number N of samples (one label per image)")
    if n_y == 0:
        raise ValueError(f"{what} is empty (0 samples); it needs at least one sample: load it with "
                         f"n=None (the whole split) or n >= 1 (a subset)")
    if ds.x.device != device:
        raise ValueError(f"{what} is on {ds.x.device} but the model is on {device}; "
                         f"load the data with device={str(device)!r} or move it with .to()")
    if not ds.x.dtype.is_floating_point:
        raise ValueError(f"{what}.x has dtype {ds.x.dtype}; images must be floating point, "
                         f"normalised as fa_study.data.load gives them ({dtype}, the model's "
                         f"dtype): convert with fa_study.data.normalize(x_uint8, mean, std)")
    if ds.x.dtype != dtype:
        raise ValueError(f"{what}.x has dtype {ds.x.dtype} but the model's parameters are {dtype}; "
                         f"allowed: x of the model's dtype. Convert the data (x.to({dtype})) or the "
                         f"model (model.to({ds.x.dtype}))")
    if ds.y.dtype.is_floating_point or ds.y.dtype.is_complex or ds.y.dtype == torch.bool \
            or ds.y.dim() != 1:
        raise ValueError(f"{what}.y has dtype {ds.y.dtype} and shape {tuple(ds.y.shape)}; labels "
                         f"must be a 1-d integer tensor (int64) of class indices")
    # one summing pass (isfinite takes several): a sum of finite inputs is finite unless it
    # overflows, and then the exact count decides
    bad = 0 if torch.isfinite(ds.x.sum()) else int((~torch.isfinite(ds.x)).sum())
    if bad:
        raise ValueError(f"{what} has {bad} non-finite values in x (NaN or infinity); every input "
                         f"must be finite: training on them makes the loss non-finite (the run "
                         f"would read as diverged). Drop those samples or replace the values "
                         f"(e.g. torch.nan_to_num)")


def _check_labels(what: str, ds: Dataset, n_classes: int, built: bool) -> None:
    """The class count and the label range of one dataset (see :func:`check_data`)."""
    if ds.num_classes != n_classes:
        if built:
            raise ValueError(f"{what} has {ds.num_classes} classes but the model was built for "
                             f"num_classes={n_classes}; build it with num_classes={ds.num_classes}")
        raise ValueError(f"{what} has {ds.num_classes} classes but train_ds has {n_classes}; "
                         "train and evaluate on datasets with the same classes")
    lo, hi = (int(v) for v in torch.aminmax(ds.y))
    if lo < 0 or hi >= n_classes:
        whose = "the model's num_classes" if built else "the datasets' num_classes"
        raise ValueError(f"{what} has labels in [{lo}, {hi}], outside [0, {n_classes}) ({whose})")

def long_labels(ds: Dataset) -> Dataset:
    """``ds`` with int64 labels (cross-entropy's dtype): other integer labels are converted, a
    lossless copy of ``y`` only; ``ds`` itself when they are int64 already."""
    return ds if ds.y.dtype == torch.int64 else Dataset(
        ds.name, ds.split, ds.x, ds.y.to(torch.int64), ds.source, ds.num_classes, ds.mean, ds.std)


@torch.no_grad()
def check_logits(model: nn.Module, x: torch.Tensor, n_classes: int) -> None:
    """ValueError unless ``model`` maps ``x`` to logits ``(batch, n_classes)`` (one forward in
    eval mode; every module's mode and every buffer as they were)."""
    kind = type(model).__name__
    with eval_mode(model), buffers_preserved(model):
        out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{kind} must map a batch to logits (batch, classes); its forward returned "
                         f"{got}. Wrap it in a module whose forward returns the logits tensor")
    if out.shape[1] != n_classes:
        raise ValueError(f"{kind} maps a batch to logits with {out.shape[1]} columns but the data has "
                         f"{n_classes} classes; give its last layer {n_classes} outputs")


def train(model: nn.Module, rule: Method, train_ds: Dataset, test_ds: Dataset,
          cfg: TrainConfig = TrainConfig(), *, hidden=None, pool="auto", progress: bool = False,
          callback: Callback | None = None, callback_every: int = 50,
          probe: Probe | None = None, probe_every: int = 0) -> pd.DataFrame:
    """Train ``model`` in place with ``rule``; return the per-epoch history (see module doc).

    Args:
        model: any classifier ``nn.Module`` mapping a batch to logits ``(batch, classes)``, on
            the datasets' device: a :class:`~fa_study.models.BlockModel` for every rule, any
            other network for the rules that do not need blocks (``bp``, ``frozen`` and the
            layer rules: ``not RULES[name].needs_blocks``; the others refuse it at setup).
        rule: the learning rule; set up here (from ``cfg.seed``) unless ``rule.ready``.
        train_ds, test_ds: in-memory datasets (``fa_study.data.load``).
        cfg: the training settings.
        hidden, pool: where the hidden states ``h_0 .. h_L`` of the per-layer columns are
            (:func:`fa_study.diagnostics.find_hidden_states`): found automatically for the
            package's models, block containers named ``blocks`` / ``layers`` and ResNet stages;
            otherwise name them, ``hidden=["features.2", "features.5", "fc1"]``. When they cannot
            be found, training goes on without the columns (a UserWarning, and a line in
            ``history.attrs["notes"]``). ``frozen`` freezes the modules between ``h_0`` and ``h_L``.
        progress: show a tqdm progress bar.
        callback: called as ``callback(step, record)`` every ``callback_every`` optimiser steps
            with ``record = {"epoch", "step", "train_loss", "train_acc", "lr"}`` (running means of
            the current epoch).
        probe, probe_every: see the module doc.
    """
    _check_call(rule, cfg, pool, callback, callback_every, probe, probe_every)
    check_data(model, train_ds, test_ds)
    train_ds, test_ds = long_labels(train_ds), long_labels(test_ds)
    rule.check_trainable(model)
    if rule.ready:  # set up before: its state must fit this model and data (the rule says how)
        rule.check_model(model, train_ds.num_classes)
    from tqdm.auto import tqdm

    loop = _Loop(model, rule, train_ds, test_ds, cfg, hidden, pool, callback, callback_every, probe,
                 probe_every)
    loop.bar = tqdm(total=cfg.epochs * len(loop.batches), unit="step", leave=False, disable=not progress)
    reason = ""
    try:
        for epoch in range(1, cfg.epochs + 1):
            reason = loop.run_epoch(epoch)
            if reason:
                break
    finally:
        loop.bar.close()
        model.train()
    return loop.history(len(loop.rows) - 1 if reason else None, reason)


def frozen_baseline(model: nn.Module, train_ds: Dataset, test_ds: Dataset,
                    cfg: TrainConfig = TrainConfig(), *, hidden=None, pool="auto") -> float:
    """The frozen-blocks baseline D3 compares with, for any network: its test accuracy.

    Trains a deep copy of ``model`` with the D3 baseline rule (``frozen``): the modules between
    ``h_0`` and ``h_L`` (:meth:`fa_study.diagnostics.HiddenStates.block_modules`; found as
    :func:`train` finds them, or between the states named with ``hidden=[...]``) keep their
    initialisation (``requires_grad=False``, BatchNorm pinned to eval mode), everything else
    trains by BP with the settings ``cfg``. ``model`` itself is not touched. A network whose
    layers run a backward of their own (converted to a layer rule) is trained through its BP
    twin (:func:`fa_study.diagnostics.bp_twin`), so the rest really trains by BP.

    Pass the network **at initialisation**: the untrained network, or a copy taken before
    training (``init = copy.deepcopy(model)`` before ``train(model, ...)``). A trained network
    would give the accuracy of its trained blocks frozen, not of random ones::

        init = copy.deepcopy(model)
        train(model, rule, train_ds, test_ds, cfg)
        report = audit(model, x, y, frozen_acc=frozen_baseline(init, train_ds, test_ds, cfg))

    Returns the test accuracy in [0, 1] after ``cfg.epochs`` epochs; NaN when the baseline run
    diverged (:func:`fa_study.diagnostics.decide_d3` then leaves D3 not evaluated).
    """
    net = bp_twin(copy.deepcopy(model)).model
    history = train(net, get_rule(D3_BASELINE)(), train_ds, test_ds, cfg, hidden=hidden, pool=pool)
    return float(history["test_acc"].iloc[-1])


# --------------------------------------------------------------------------------------------
# The steps of train()
# --------------------------------------------------------------------------------------------

def _check_call(rule, cfg, pool, callback, callback_every, probe, probe_every) -> None:
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if not isinstance(rule, Method):
        raise ValueError(f"rule must be a fa_study.rules.Method (e.g. build_rule('dfa')), got "
                         f"{type(rule).__name__}")
    if not (callable(pool) or (isinstance(pool, str) and pool in POOLS)):
        raise ValueError(f"pool must be one of {', '.join(POOLS)} or a callable, got {pool!r}")
    for name, given, every in (("callback_every", callback, callback_every),
                               ("probe_every", probe, probe_every)):
        if given is not None:
            check_int(name, every, 1)


def _find_states(model: nn.Module, x: torch.Tensor, hidden, pool) -> tuple[Any, list[str]]:
    """``(HiddenStates, [])``, or ``(None, [note])`` with a UserWarning when a network's hidden
    states cannot be found automatically (states named with ``hidden`` that do not exist are an
    error)."""
    try:
        return find_hidden_states(model, x, hidden=hidden, pool=pool), []
    except ValueError as err:
        if hidden is not None or isinstance(model, BlockModel):
            raise
        note = (f"no per-layer columns (h_norm_l, g_norm_l, cos_l) for {type(model).__name__}; training "
                f"went on without them. To record them, pass train(..., hidden=[...]). {err}")
        warnings.warn(note, UserWarning, stacklevel=4)
        return None, [note]


class _Loop:
    """What one call of :func:`train` carries from step to step, and the steps themselves."""

    def __init__(self, model: nn.Module, rule: Method, train_ds: Dataset, test_ds: Dataset, cfg: TrainConfig,
                 hidden, pool, callback: Callback | None, callback_every: int, probe: Probe | None,
                 probe_every: int) -> None:
        """Find the hidden states, set the rule up, build the optimizer, schedule and batches; then
        epoch 0, the initial model, whose train columns come from an evaluation pass over (part
        of) the training set, since no training step has happened yet."""
        self.model, self.rule, self.cfg, self.train_ds, self.test_ds = model, rule, cfg, train_ds, test_ds
        n_eval = min(cfg.eval_batch, len(test_ds))
        self.x_eval, self.y_eval = test_ds.x[:n_eval], test_ds.y[:n_eval]
        # the HiddenStates of the per-layer columns; None: left out (see notes)
        self.states, self.notes = _find_states(model, self.x_eval, hidden, pool)
        if not rule.ready:
            # the feedback's own stream: never the one that initialised the weights (see stream_generator)
            kw = {"hidden": self.states} if rule.takes_hidden_states else {}
            feedback_stream = stream_generator(cfg.seed, "feedback")
            rule.setup(model, train_ds.num_classes, feedback_stream, train_cfg=cfg, **kw)
        groups = rule.param_groups(model)
        self.opt = make_optimizer(groups, cfg)
        self.sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(cfg.epochs, 1))
                      if cfg.schedule == "cosine" else None)
        self.clip_groups = [g["params"] for g in groups if g.get("clip")] if cfg.grad_clip else []
        self.batches = BatchIterator.from_dataset(train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                                  augment=cfg.augment)
        self.device = model_device(model)
        # the history's rows, each epoch's wall and CPU seconds, the probes' records
        self.rows, self.seconds, self.cpu_seconds, self.probes = [], [], [], []
        self.step, self.probe_count = 0, 0
        # the run's constant columns: rule, model, data, training settings
        arch = getattr(model, "arch", type(model).__name__)
        self.columns = {"rule": rule.name, **rule.options(), "arch": arch,
                        "d": getattr(model, "width", None), "num_blocks": getattr(model, "num_blocks", None),
                        "dataset": train_ds.name, "data_source": train_ds.source,
                        **{f.name: getattr(cfg, f.name) for f in fields(cfg)}}
        self.callback, self.callback_every = callback, callback_every
        self.probe, self.probe_every = probe, probe_every
        start, cpu_start = time.perf_counter(), time.process_time()
        n = min(len(self.train_ds), len(self.test_ds))
        self.rows.append(self.epoch_row(0, *evaluate(self.model, self.train_ds.x[:n], self.train_ds.y[:n])))
        self.seconds.append(time.perf_counter() - start)
        self.cpu_seconds.append(time.process_time() - cpu_start)
        self.probe_sum = torch.zeros((), device=self.device)
        if self.probe is not None:
            self.probes.append(self.probe_row(0, 0.0, math.nan))

    def run_epoch(self, epoch: int) -> str:
        """One epoch and its history row; returns the blow-up reason (``""`` when fine)."""
        start, cpu_start = time.perf_counter(), time.process_time()
        train_loss, train_acc, reason = self.train_steps(epoch)
        if self.sched is not None:
            self.sched.step()
        if not reason:
            row = self.epoch_row(epoch, train_loss, train_acc)
            bad = [k for k in row if k.startswith(("h_norm_", "g_norm_")) and not math.isfinite(row[k])]
            reason = f"non-finite {bad[0]} on the eval batch" if bad else ""
        if reason:  # the row of a blow-up: the train columns, every other column NaN
            row = {**{k: math.nan for k in self.rows[0] if k not in ("epoch", "status")}, "epoch": epoch,
                   "train_loss": train_loss, "train_acc": train_acc, "status": "diverged"}
        self.rows.append(row)
        self.seconds.append(time.perf_counter() - start)
        self.cpu_seconds.append(time.process_time() - cpu_start)
        if not reason:
            self.bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{train_acc:.3f}",
                                 test=f"{row['test_acc']:.3f}", refresh=False)
        return reason

    def train_steps(self, epoch: int) -> tuple[float, float, str]:
        """The optimiser steps of one epoch: ``(train_loss, train_acc, blow-up reason)``."""
        model, cfg = self.model, self.cfg
        model.train()
        zero = torch.zeros((), device=self.device)
        loss_sum, since_sum, correct = zero.clone(), zero.clone(), zero.long()
        seen = since = 0
        reason = ""
        for xb, yb in self.batches:
            loss, logits = self.rule.fill_grads(model, xb, yb)
            if self.clip_groups:
                clip_block_gradients(self.clip_groups, cfg.grad_clip)
            self.opt.step()
            self.step, nb = self.step + 1, yb.shape[0]
            seen, since, weighted = seen + nb, since + nb, loss.detach() * nb
            loss_sum += weighted
            since_sum += weighted
            correct += (logits.argmax(dim=-1) == yb).sum()
            self.bar.update(1)
            if self.probe is not None:  # the probe, when due, with the mean loss since the last one
                self.probe_sum += weighted
                self.probe_count += nb
                if self.step % self.probe_every == 0 or self.step == cfg.epochs * len(self.batches):
                    mean = float(self.probe_sum) / self.probe_count
                    self.probes.append(self.probe_row(self.step, self.step / len(self.batches), mean))
                    self.probe_sum, self.probe_count = zero.clone(), 0
            if self.callback is not None and self.step % self.callback_every == 0:
                record = {"epoch": epoch, "step": self.step, "train_loss": float(loss_sum / seen),
                          "train_acc": float(correct) / seen, "lr": self.opt.param_groups[0]["lr"]}
                self.callback(self.step, record)
            if self.step % cfg.log_every == 0:
                reason, since_sum, since = blow_up(float(since_sum) / since, cfg.max_loss), zero.clone(), 0
                if reason:
                    break
        train_loss, train_acc = float(loss_sum / max(seen, 1)), float(correct) / max(seen, 1)
        if not reason and since:
            reason = blow_up(float(since_sum) / since, cfg.max_loss)
        return train_loss, train_acc, reason or blow_up(train_loss, cfg.max_loss)

    def epoch_row(self, epoch: int, train_loss: float, train_acc: float) -> dict[str, Any]:
        model, rule = self.model, self.rule
        _, test_acc = evaluate(model, self.test_ds.x, self.test_ds.y)
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "test_acc": test_acc}
        if self.states is not None:
            row.update(layer_diagnostics(model, rule, self.x_eval, self.y_eval, hidden=self.states))
        row.update(rule.state())
        if self.cfg.feedback_quality:
            row.update(rule.feedback_quality(model, self.x_eval, self.y_eval))
        row["status"] = "ok"
        return row

    def probe_row(self, step: int, epoch: float, loss: float) -> dict:
        row = self.probe(step, self.model, self.rule) or {}
        return {"step": step, "epoch": epoch, "train_loss": loss, **row}

    def history(self, diverged_epoch: int | None, reason: str) -> pd.DataFrame:
        """The rows as a frame, with the divergence and the run's constant columns."""
        history = pd.DataFrame(self.rows)
        history["diverged_epoch"] = pd.array([diverged_epoch] * len(history), dtype="Int64")
        history["diverged_reason"] = reason if diverged_epoch is not None else ""
        for key, value in self.columns.items():
            history[key] = [value] * len(history)
        history.attrs.update(status="diverged" if diverged_epoch is not None else "ok",
                             epoch_seconds=self.seconds, epoch_cpu_seconds=self.cpu_seconds,
                             probes=pd.DataFrame(self.probes), notes=list(self.notes),
                             hidden_states=self.states.labels() if self.states is not None else [])
        return history


def blow_up(loss: float, max_loss: float) -> str:
    """The blow-up criterion on a mean training loss: ``""`` when fine, else what it saw."""
    if not math.isfinite(loss):
        return f"training loss not finite ({loss})"
    if loss > max_loss:
        return f"training loss {loss:.3g} above max_loss={max_loss:g}"
    return ""


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """One optimizer over the rule's parameter groups: AdamW or SGD with momentum, each the fused
    kernel where torch has one for the parameters' device (on the CPU AdamW's is ~10x faster than
    the multi-tensor loop for ResidualMLP d=256, SGD's 2x faster than its per-tensor loop for
    the feedback tour's MLP, whose multi-tensor loop is slower still). The fused kernels apply
    the same update, rounded in another order.

    Groups that differ only in their ``name`` and ``clip`` marks are stepped as one group: the
    same update for every parameter (both optimizers update each tensor on its own), one kernel
    call and one pass of the optimizer's Python per step instead of one per block.
    """
    groups = merge_groups(groups)
    if not groups:
        raise ValueError("the rule leaves no parameter to train (every parameter is frozen)")
    if cfg.optimizer == "sgd":
        make = partial(torch.optim.SGD, groups, lr=cfg.lr, momentum=cfg.momentum,
                       weight_decay=cfg.weight_decay)
    else:
        make = partial(torch.optim.AdamW, groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    try:
        return make(fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return make()


def merge_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``groups`` with those of equal settings (every key but ``params``, ``name``, ``clip``)
    joined, in order of first appearance, each keeping its parameters' order."""
    merged: dict[str, dict[str, Any]] = {}
    for g in groups:
        settings = {k: v for k, v in g.items() if k not in ("params", "name", "clip")}
        into = merged.setdefault(repr(sorted(settings.items())), {**settings, "params": []})
        into["params"].extend(g["params"])
    return [g for g in merged.values() if g["params"]]


def clip_block_gradients(groups: list[list[nn.Parameter]], max_norm: float) -> None:
    """Clip the gradient norm of each group (one per block) separately to ``max_norm``, as the
    reference (004) does; the embedding and the head are not clipped. No host sync."""
    for params in groups:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


# --------------------------------------------------------------------------------------------
# Evaluation and per-layer diagnostics
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000
             ) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` on ``x``, ``y`` ``(N,)`` in eval mode.

    The model's mode is restored afterwards; one host sync at the end.
    """
    was_training = model.training
    model.eval()
    try:
        loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
        correct = torch.zeros((), dtype=torch.long, device=x.device)
        for start in range(0, x.shape[0], batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            logits = model(xb)
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
            correct += (logits.argmax(dim=-1) == yb).sum()
    finally:
        model.train(was_training)
    n = max(int(x.shape[0]), 1)
    return float(loss_sum) / n, float(correct) / n


def layer_diagnostics(model: nn.Module, rule: Method, x: torch.Tensor, y: torch.Tensor,
                      hidden=None) -> dict[str, float]:
    """``h_norm_l``, ``g_norm_l`` and ``cos_l`` for l = 0..L on one batch, in eval mode (the
    definitions of :func:`fa_study.diagnostics.bp_reference` and
    :func:`fa_study.diagnostics.credit_cosines`)."""
    states, twin = prepare(model, x, hidden=hidden)
    with eval_mode(model):
        sync_modes(model, twin.model)
        hiddens, grads, _ = hidden_gradients(twin.model, x, y, states)
        credit = rule.credit_at(model, x, y, states)
        h_norms, g_norms = states.norms(hiddens), states.norms(grads)
        cos = credit_cosines(states, credit, grads)
    return {f"{name}_{l}": value for l, values in enumerate(zip(h_norms, g_norms, cos))
            for name, value in zip(("h_norm", "g_norm", "cos"), values)}


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ValueError("the model has no parameters to train") from None

