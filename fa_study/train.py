"""One training loop for every learning rule; the history comes back as a pandas DataFrame.

``train(model, method, train_ds, test_ds, cfg)`` trains ``model`` in place with ``method``
(:class:`fa_study.methods.Method`) and one AdamW built from ``method.param_groups(model)``.
The loop never synchronises with the host inside an epoch (loss and correct counts accumulate
on the device and are read once per epoch), except every ``cfg.log_every`` steps for the
divergence check and, when given, every ``callback_every`` steps for the live-plot callback.

History: one row per epoch, epoch 0 being the model before training. Columns::

    epoch, train_loss, train_acc, test_acc,
    h_norm_0..h_norm_L   median ||pool(h_l)|| on the eval batch
    g_norm_0..g_norm_L   median ||pool(g_l)|| of the BP reference g_l = dCE/dh_l (for a model
                         with layer-level rules, computed on its BP twin)
    cos_0..cos_L         mean over the eval batch of cos(a_l, g_l) over the flattened tensors,
                         a_l = method.credit(...); eps 1e-30 so tiny ||g|| still shows the cosine
    status               "ok", or "diverged" on the row of the epoch whose loss was non-finite
    diverged_epoch       that epoch on every row of a diverged run, else <NA>
    method, <method options>, arch, d, num_blocks, dataset, data_source, <TrainConfig fields>

The eval batch is the first ``cfg.eval_batch`` test samples; per-layer diagnostics run in eval
mode. Per-epoch wall times are in ``history.attrs["epoch_seconds"]`` and this process's CPU
times in ``history.attrs["epoch_cpu_seconds"]`` (the latter barely depends on other load on the
machine); both are kept out of the columns so that two runs with the same seed give identical
frames on the CPU.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import BatchIterator, Dataset
from .methods import Method, bp_gradients

COSINE_EPS = 1e-30  # small enough that cos(a, g) is the true cosine even when ||g|| is ~1e-20


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; defaults are the reference study's."""

    epochs: int = 10  # passes over the training set
    batch_size: int = 128  # the reference's batch size
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.01  # AdamW decoupled weight decay (all parameters, as the reference)
    cosine: bool = True  # cosine annealing of the lr to 0 over `epochs`, stepped once per epoch
    grad_clip: float | None = None  # max gradient norm of each block separately (004 used 1.0)
    augment: bool = False  # random 4-pixel crop + horizontal flip of every training batch
    eval_batch: int = 128  # first test samples used for the per-layer diagnostics
    seed: int = 0  # seeds the feedback draw (when the method is not set up) and the batch order
    log_every: int = 50  # steps between divergence checks (one host sync each); 0: per epoch only

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch", "seed", "log_every"):
            value = getattr(self, name)
            low = 1 if name in ("batch_size", "eval_batch") else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {low}, got {value!r}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
                    or not math.isfinite(value):
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {value!r}")
        clip = self.grad_clip
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                                 or not clip > 0 or not math.isfinite(clip)):
            raise ValueError(f"TrainConfig.grad_clip must be None or a finite number > 0, got {clip!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Callback = Callable[[int, dict], None]


def train(model: nn.Module, method: Method, train_ds: Dataset, test_ds: Dataset,
          cfg: TrainConfig = TrainConfig(), *, progress: bool = False,
          callback: Callback | None = None, callback_every: int = 50) -> pd.DataFrame:
    """Train ``model`` in place with ``method``; return the per-epoch history (see module doc).

    Args:
        model: a :class:`~fa_study.models.BlockModel` on the datasets' device.
        method: the learning rule; set up here (from ``cfg.seed``) unless ``method.ready``.
        train_ds, test_ds: in-memory datasets (``fa_study.data.load``).
        cfg: the training settings.
        progress: show a tqdm progress bar.
        callback: called as ``callback(step, record)`` every ``callback_every`` optimiser steps
            with ``record = {"epoch", "step", "train_loss", "train_acc", "lr"}`` (running means of
            the current epoch); it synchronises with the host, so only when set.

    A non-finite training loss stops the run: the history ends with a row marked
    ``status="diverged"`` (its test accuracy and diagnostics NaN) and no exception is raised.
    """
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if callback is not None and (isinstance(callback_every, bool) or not isinstance(callback_every, int)
                                 or callback_every < 1):
        raise ValueError(f"callback_every must be a positive integer, got {callback_every!r}")
    device = _model_device(model)
    for what, ds in (("train_ds", train_ds), ("test_ds", test_ds)):
        if ds.x.device != device:
            raise ValueError(f"{what} is on {ds.x.device} but the model is on {device}; "
                             f"load the data with device={str(device)!r} or move it with .to()")
    if not method.ready:
        method.setup(model, train_ds.num_classes, torch.Generator().manual_seed(cfg.seed))
    groups = method.param_groups(model)
    opt = make_optimizer(groups, cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1)) if cfg.cosine else None
    clip_groups = [g["params"] for g in opt.param_groups if g.get("clip")] if cfg.grad_clip else []
    batches = BatchIterator.from_dataset(train_ds, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                         augment=cfg.augment)
    n_eval = min(cfg.eval_batch, len(test_ds))
    x_eval, y_eval = test_ds.x[:n_eval], test_ds.y[:n_eval]
    constants = _config_columns(model, method, train_ds, cfg)

    rows: list[dict[str, Any]] = []
    seconds: list[float] = []
    cpu_seconds: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    # epoch 0: the initial model; train columns from an evaluation pass over (part of) the
    # training set, since no training step has happened yet
    n_probe = min(len(train_ds), len(test_ds))
    loss0, acc0 = evaluate(model, train_ds.x[:n_probe], train_ds.y[:n_probe])
    rows.append(_epoch_row(0, loss0, acc0, model, method, test_ds, x_eval, y_eval))
    seconds.append(time.perf_counter() - start)
    cpu_seconds.append(time.process_time() - cpu_start)

    bar = _progress_bar(progress, cfg.epochs * len(batches))
    step, diverged_epoch = 0, None
    try:
        for epoch in range(1, cfg.epochs + 1):
            start, cpu_start = time.perf_counter(), time.process_time()
            model.train()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            seen, finite = 0, True
            for xb, yb in batches:
                loss, logits = method.fill_grads(model, xb, yb)
                if clip_groups:
                    clip_block_gradients(clip_groups, cfg.grad_clip)
                opt.step()
                step += 1
                seen += yb.shape[0]
                loss_sum += loss.detach() * yb.shape[0]
                correct += (logits.argmax(dim=-1) == yb).sum()
                bar.update(1)
                if callback is not None and step % callback_every == 0:
                    callback(step, {"epoch": epoch, "step": step,
                                    "train_loss": float(loss_sum / seen),
                                    "train_acc": float(correct) / seen,
                                    "lr": opt.param_groups[0]["lr"]})
                if cfg.log_every and step % cfg.log_every == 0 and not torch.isfinite(loss_sum):
                    finite = False
                    break
            if sched is not None:
                sched.step()
            train_loss = float(loss_sum / max(seen, 1))
            train_acc = float(correct) / max(seen, 1)
            if not finite or not math.isfinite(train_loss):
                diverged_epoch = epoch
                rows.append(_diverged_row(epoch, train_loss, train_acc, model.num_blocks))
                seconds.append(time.perf_counter() - start)
                cpu_seconds.append(time.process_time() - cpu_start)
                break
            rows.append(_epoch_row(epoch, train_loss, train_acc, model, method, test_ds, x_eval, y_eval))
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
            bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{train_acc:.3f}",
                            test=f"{rows[-1]['test_acc']:.3f}", refresh=False)
    finally:
        bar.close()
        model.train()

    history = pd.DataFrame(rows)
    history["diverged_epoch"] = pd.array([diverged_epoch] * len(history), dtype="Int64")
    for key, value in constants.items():
        history[key] = [value] * len(history)
    history.attrs["status"] = "diverged" if diverged_epoch is not None else "ok"
    history.attrs["epoch_seconds"] = seconds
    history.attrs["epoch_cpu_seconds"] = cpu_seconds
    return history


def make_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.AdamW:
    """One AdamW over the method's parameter groups.

    The fused kernel is used where torch has one for the parameters' device (CPU and CUDA): on
    the CPU it steps ResidualMLP d=256 ~10x faster than the default multi-tensor loop, which
    would otherwise cost as much as the forward and backward together.
    """
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def clip_block_gradients(groups: list[list[nn.Parameter]], max_norm: float) -> None:
    """Clip the gradient norm of each group (one per block) separately to ``max_norm``.

    As the reference (004) clips each block's parameters on their own; the embedding and the
    head are not clipped. No host synchronisation.
    """
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


def layer_diagnostics(model: nn.Module, method: Method, x: torch.Tensor, y: torch.Tensor
                      ) -> dict[str, float]:
    """``h_norm_l``, ``g_norm_l`` and ``cos_l`` for l = 0..L on one batch, in eval mode."""
    from .metrics import batch_cosine

    was_training = model.training
    model.eval()
    try:
        hiddens, grads, _ = _bp_reference()(_bp_version(model), x, y)
        credit = method.credit(model, x, y)
    finally:
        model.train(was_training)
    out: dict[str, float] = {}
    for l, (h, g, a) in enumerate(zip(hiddens, grads, credit)):
        out[f"h_norm_{l}"] = float(model.pool(h).norm(dim=-1).median())
        out[f"g_norm_{l}"] = float(model.pool(g).norm(dim=-1).median())
        # float64 so ||a|| ||g|| does not underflow before the eps
        out[f"cos_{l}"] = batch_cosine(a.double(), g.double(), eps=COSINE_EPS)
    return out


def _bp_version(model: nn.Module) -> nn.Module:
    """``model`` itself, or for a model with layer-level rules its BP twin (same weights, every
    local layer on ``bp``): autograd through local layers would give the rule's signal, not BP's."""
    from .feedback import bp_twin, local_layers

    return bp_twin(model) if local_layers(model) else model


def _bp_reference():
    """``fa_study.protocol.bp_reference`` when the protocol is there, else the same maths here."""
    try:
        from .protocol import bp_reference
    except ImportError:
        return bp_gradients
    return bp_reference


def _epoch_row(epoch: int, train_loss: float, train_acc: float, model: nn.Module, method: Method,
               test_ds: Dataset, x_eval: torch.Tensor, y_eval: torch.Tensor) -> dict[str, Any]:
    _, test_acc = evaluate(model, test_ds.x, test_ds.y)
    row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "test_acc": test_acc}
    row.update(layer_diagnostics(model, method, x_eval, y_eval))
    row["status"] = "ok"
    return row


def _diverged_row(epoch: int, train_loss: float, train_acc: float, num_blocks: int) -> dict[str, Any]:
    nan = float("nan")
    row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "test_acc": nan}
    for prefix in ("h_norm", "g_norm", "cos"):
        row.update({f"{prefix}_{l}": nan for l in range(num_blocks + 1)})
    row["status"] = "diverged"
    return row


def _config_columns(model: nn.Module, method: Method, train_ds: Dataset, cfg: TrainConfig
                    ) -> dict[str, Any]:
    cols: dict[str, Any] = {"method": method.name}
    cols.update(method.options())
    cols.update({"arch": getattr(model, "arch", type(model).__name__),
                 "d": getattr(model, "width", None),
                 "num_blocks": getattr(model, "num_blocks", None),
                 "dataset": train_ds.name, "data_source": train_ds.source})
    cols.update({f.name: getattr(cfg, f.name) for f in fields(cfg)})
    return cols


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ValueError("the model has no parameters to train") from None


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(progress: bool, total: int):
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", leave=False)
