"""The three-diagnostic audit of a trained classifier (reference ``003``, ``FAProtocol``).

The audit asks three questions of a trained network on an evaluation batch:

* **D1, scale stability**: does the residual stream explode? Fires when the largest per-block
  growth ``max_l ||h_{l+1}|| / ||h_l||`` exceeds ``d1_threshold`` (50).
* **D2, reference validity**: is the BP gradient the cosines are measured against still
  resolvable? Fires when ``||g_L||`` at the deepest hidden state is below ``d2_factor * d2_eps``
  (10 * 1e-8, ten times the reference's cosine clamp).
* **D3, depth utility**: do the trained blocks beat random frozen ones? Fires when the test
  accuracy is below the frozen-blocks baseline plus ``d3_margin_pp`` (2) percentage points.

Norms are the median over the batch of the per-sample L2 norm of the pooled state (the row
itself for MLPs, the class token for ViTs, the global average pool for conv nets). The hidden
states are read by :mod:`fa_study.diagnostics.taps` (any ``nn.Module``) and ``g_l`` through the
BP twin (:mod:`fa_study.diagnostics.twin`); the report names both. (The reference rebuilt the
chain by hand and got ``g_l`` wrong for blocks with and without an internal skip.)

**Beyond the reference.** D1 compares consecutive states, so growth that happens before h_0
(in the embedding) or spread evenly over many blocks never fires it. Given the same network at
initialisation (``initial=``), the report also carries ``||h_l|| / ||h_l at init||`` for every
state, h_0 included (``init_ratio``). It is not part of the verdict, which keeps the
reference's definition.

The verdict is ``PASS`` or ``FAIL(...)`` naming every diagnostic that fires; *Mode 1* (D1 and
D2 together) is carried as ``mode1``.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ..config import check_batch
from .signals import bp_reference, eval_mode, prepare

D1_THRESHOLD = 50.0  # 003: D1 fires when a block grows the stream by more than this factor
D2_EPS = 1e-8  # 003: the cosine clamp the reference gradient must clear
D2_FACTOR = 10.0  # 003: D2 fires when ||g_L|| < D2_FACTOR * D2_EPS
D2_FLOOR = D2_FACTOR * D2_EPS  # = 1e-7 on the 128-sample eval batch
D3_MARGIN_PP = 2.0  # 003: D3 fires when accuracy < frozen-blocks accuracy + 2 percentage points
PROTOCOL_EVAL = 128  # the D2 floor was calibrated on batches of 128 (||g|| scales as 1/N)


def fired_flags(d1: bool, d2: bool, d3: bool | None) -> tuple[str, ...]:
    """The names of the diagnostics that fire, in order; ``d3=None`` (not evaluated) never fires."""
    return tuple(name for name, fires in (("D1", d1), ("D2", d2), ("D3", d3)) if fires)


def verdict_from_flags(d1: bool, d2: bool, d3: bool | None) -> str:
    """``"PASS"`` when no diagnostic fires, else ``"FAIL(D1+D3)"`` etc. naming those that do."""
    flags = fired_flags(d1, d2, d3)
    return "PASS" if not flags else f"FAIL({'+'.join(flags)})"


LIST_FIELDS = ("flags", "hidden_norms", "growth", "grad_norms", "hidden_read", "unvouched",
               "init_ratio")


@dataclass(frozen=True)
class AuditReport:
    """The outcome of :func:`audit`. Norm lists run over hidden states h_0..h_L."""

    verdict: str  # "PASS" or "FAIL(D1+D2+D3)" naming the diagnostics that fire
    flags: tuple[str, ...]  # the diagnostics that fire, e.g. ("D1", "D2")
    mode1: bool  # D1 and D2 both fire: scale blow-up with a collapsed reference
    test_acc: float  # accuracy used for D3, in [0, 1]
    test_acc_source: str  # "given" or "eval batch"
    n_eval: int  # evaluation batch size (||g|| scales as 1/n_eval)
    hidden_norms: tuple[float, ...]  # median ||pool(h_l)||
    growth: tuple[float, ...]  # ||h_{l+1}|| / ||h_l|| for each block
    max_growth: float  # D1's statistic (1.0 without blocks)
    d1_threshold: float
    d1: bool
    grad_norms: tuple[float, ...]  # median ||pool(g_l)||
    g_L: float  # D2's statistic
    d2_floor: float  # d2_factor * d2_eps
    d2: bool
    frozen_acc: float | None  # frozen-blocks baseline accuracy; None: D3 not evaluated
    depth_margin: float | None  # test_acc - frozen_acc
    d3_margin: float  # required margin as a fraction (2 pp -> 0.02)
    d3: bool | None  # None when not evaluated
    hidden_read: tuple[str, ...] = ()  # what was read as h_0..h_L, e.g. "output of blocks.0"
    hidden_how: str = ""  # how the hidden states were found
    twin: str = ""  # the network g_l was taken on (the BP twin), and what it could not vouch for
    unvouched: tuple[str, ...] = ()  # modules with a backward of their own left in the twin
    init_ratio: tuple[float, ...] = ()  # beyond the reference: ||h_l|| / ||h_l at init||

    @property
    def d3_evaluated(self) -> bool:
        return self.d3 is not None

    def summary(self) -> str:
        """A few lines a researcher can read at a glance."""
        fire = lambda f: "FIRES" if f else "quiet"  # noqa: E731
        lines = [
            f"Verdict: {self.verdict}" + ("   [Mode 1: D1 and D2 together]" if self.mode1 else ""),
            f"Test accuracy: {self.test_acc:.4f} ({self.test_acc_source}); eval batch N = {self.n_eval}",
            f"D1 scale stability:   max block growth {self.max_growth:.3g}x "
            f"(threshold {self.d1_threshold:g}x) -> {fire(self.d1)}",
            f"D2 reference validity: ||g_L|| = {self.g_L:.2e} (floor {self.d2_floor:.0e}) -> {fire(self.d2)}",
        ]
        if self.d3 is None:
            lines.append("D3 depth utility:     not evaluated (no frozen-blocks baseline accuracy "
                         "given); the verdict rests on D1 and D2 only")
        else:
            lines.append(f"D3 depth utility:     margin over frozen blocks "
                         f"{100 * self.depth_margin:+.1f} pp (frozen {self.frozen_acc:.4f}, needs "
                         f"{100 * self.d3_margin:+.1f} pp) -> {fire(self.d3)}")
        top = len(self.hidden_norms) - 1
        lines += [f"||h_l||, l = 0..{top}: " + ", ".join(f"{v:.3g}" for v in self.hidden_norms),
                  f"||g_l||, l = 0..{top}: " + ", ".join(f"{v:.2e}" for v in self.grad_norms)]
        if self.init_ratio:
            k = int(np.argmax(self.init_ratio))
            ratios = ", ".join(f"{v:.3g}" for v in self.init_ratio)
            lines.append(f"Beyond the reference (not in the verdict): ||h_l|| / ||h_l at init|| = "
                         f"{ratios}; largest {self.init_ratio[k]:.3g}x at h_{k}")
        if self.hidden_read:
            lines.append(f"Hidden states read ({self.hidden_how}): " + "; ".join(
                f"h_{l} = {text}" for l, text in enumerate(self.hidden_read)))
        if self.twin:
            lines.append(f"BP reference taken on: {self.twin}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict:
        """Plain Python values (lists for the per-layer norms), ready for JSON or a DataFrame row."""
        out = asdict(self)
        for key in LIST_FIELDS:
            out[key] = list(out[key])
        out["d3_evaluated"] = self.d3_evaluated
        return out

    @property
    def max_init_ratio(self) -> float:
        """The largest ``||h_l|| / ||h_l at init||`` (NaN when no initial network was given)."""
        return max(self.init_ratio) if self.init_ratio else math.nan

    def to_frame(self) -> pd.DataFrame:
        """One row per hidden state: ``layer``, ``module`` (what was read), ``h_norm``,
        ``growth`` (from the previous layer; NaN at h_0), ``g_norm``, ``init_ratio`` (NaN
        without an initial network), and the ``verdict`` repeated for concatenating runs."""
        n = len(self.hidden_norms)
        return pd.DataFrame({
            "layer": np.arange(n),
            "module": list(self.hidden_read) if len(self.hidden_read) == n else [""] * n,
            "h_norm": self.hidden_norms,
            "growth": [math.nan, *self.growth],
            "g_norm": self.grad_norms,
            "init_ratio": list(self.init_ratio) if len(self.init_ratio) == n else [math.nan] * n,
            "verdict": [self.verdict] * n,
        })


def audit(model: nn.Module, x_eval: torch.Tensor, y_eval: torch.Tensor, *,
          frozen_acc: float | None = None, test_acc: float | None = None,
          hidden=None, pool="auto", twin=None, initial: nn.Module | Sequence[float] | None = None,
          d1_threshold: float = D1_THRESHOLD, d2_eps: float = D2_EPS, d2_factor: float = D2_FACTOR,
          d3_margin_pp: float = D3_MARGIN_PP) -> AuditReport:
    """Run D1, D2 and D3 on any trained classifier and return an :class:`AuditReport`::

        report = audit(model, x_eval, y_eval, frozen_acc=0.41)
        print(report)

    ``model``: any ``nn.Module`` mapping a batch to logits ``(batch, classes)``; ``x_eval``: an
    evaluation batch it accepts (the reference uses 128 test samples); ``y_eval``: ``(batch,)``
    int64 labels. ``frozen_acc``: the frozen-blocks baseline's test accuracy in [0, 1]
    (:func:`fa_study.train.frozen_baseline` trains it for any network); without it D3 is not
    evaluated. ``test_acc``: the model's test accuracy in [0, 1]; without it, the accuracy on
    the evaluation batch. ``hidden``, ``pool``: where ``h_0 .. h_L`` are
    (:func:`fa_study.diagnostics.find_hidden_states`; found automatically for the package's
    models, the reference's layout, ``blocks`` / ``layers`` containers and torchvision's ResNet
    and ViT). ``twin``: the network to take BP's gradient on (default :func:`bp_twin`).
    ``initial``: the same network at initialisation (or its ``||h_l||`` on this batch) for the
    growth-since-initialisation reading. The model runs in eval mode; each module's mode is
    restored after.
    """
    for name, value in (("d1_threshold", d1_threshold), ("d2_eps", d2_eps), ("d2_factor", d2_factor)):
        if isinstance(value, bool) or not (isinstance(value, numbers.Real) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    _check_accuracies(frozen_acc=frozen_acc, test_acc=test_acc)
    check_batch(x_eval, y_eval)
    states, tw = prepare(model, x_eval, hidden=hidden, pool=pool, twin=twin)
    with eval_mode(model):
        hiddens, grads, logits = bp_reference(model, x_eval, y_eval, hidden=states, twin=tw)
        h_norms, g_norms = states.norms(hiddens), states.norms(grads)
    source = "eval batch" if test_acc is None else "given"
    if test_acc is None:
        test_acc = (logits.argmax(-1) == y_eval).double().mean()
    growth = [h_norms[i + 1] / max(h_norms[i], 1e-12) for i in range(len(h_norms) - 1)]
    max_growth = max(growth) if growth else 1.0
    d1, d2_floor = bool(max_growth > d1_threshold), float(d2_factor * d2_eps)
    d2 = bool(g_norms[-1] < d2_floor)
    report = AuditReport(
        verdict=verdict_from_flags(d1, d2, None), flags=fired_flags(d1, d2, None), mode1=d1 and d2,
        test_acc=float(test_acc), test_acc_source=source, n_eval=int(x_eval.shape[0]),
        hidden_norms=tuple(h_norms), growth=tuple(growth), max_growth=float(max_growth),
        d1_threshold=float(d1_threshold), d1=d1, grad_norms=tuple(g_norms), g_L=float(g_norms[-1]),
        d2_floor=d2_floor, d2=d2, frozen_acc=None, depth_margin=None, d3_margin=d3_margin_pp / 100.0, d3=None,
        hidden_read=tuple(states.labels()), hidden_how=getattr(states, "how", "the model's blocks"),
        twin=tw.describe(), unvouched=tuple(tw.unvouched),
        init_ratio=tuple(_init_ratio(initial, h_norms, states, x_eval)))
    return with_baseline(report, frozen_acc, d3_margin_pp)


def _check_accuracies(**values) -> None:
    """Accuracies are fractions in [0, 1]: a percentage (35.0) is refused, not silently read."""
    for name, value in values.items():
        if value is not None and not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} is an accuracy in [0, 1], got {value!r} "
                             "(pass a fraction, not a percentage)")


def _init_ratio(initial, h_norms: list[float], states, x: torch.Tensor) -> list[float]:
    if initial is None:
        return []
    if isinstance(initial, nn.Module):
        with torch.no_grad(), eval_mode(initial):
            _, init_h = states.run(initial, x)
            init = states.norms([h.detach() for h in init_h])
    else:
        init = [float(v) for v in initial]
    if len(init) != len(h_norms):
        raise ValueError(f"initial gives {len(init)} hidden-state norms but the model has "
                         f"{len(h_norms)} hidden states (h_0..h_L); pass the same network at "
                         "initialisation")
    return growth_since_init(h_norms, init)


def growth_since_init(h_norms: Sequence[float], init_norms: Sequence[float]) -> list[float]:
    """``||h_l|| / ||h_l at init||`` per state (the reading D1 cannot make: see the module doc)."""
    return [float(h) / max(float(h0), 1e-12) for h, h0 in zip(h_norms, init_norms)]


def decide_d3(test_acc: float, frozen_acc: float | None, d3_margin_pp: float = D3_MARGIN_PP
              ) -> tuple[float | None, bool | None]:
    """D3, decided here only: ``(depth margin test_acc - frozen_acc, fires)``; ``(None, None)``
    (not evaluated) without a frozen-blocks accuracy (None or NaN). Accuracies are fractions in
    [0, 1]: a percentage (35.0) is refused, as by :func:`audit`, instead of silently firing D3."""
    if frozen_acc is None or not math.isfinite(float(frozen_acc)):
        return None, None
    _check_accuracies(frozen_acc=frozen_acc, test_acc=test_acc)
    margin = float(test_acc) - float(frozen_acc)
    return margin, bool(margin < d3_margin_pp / 100.0)


def with_baseline(report: AuditReport, frozen_acc: float | None,
                  d3_margin_pp: float = D3_MARGIN_PP) -> AuditReport:
    """``report`` with D3 (and the verdict) decided against the frozen-blocks accuracy."""
    margin, d3 = decide_d3(report.test_acc, frozen_acc, d3_margin_pp)
    return replace(report, frozen_acc=None if d3 is None else float(frozen_acc), depth_margin=margin,
                   d3_margin=d3_margin_pp / 100.0, d3=d3, flags=fired_flags(report.d1, report.d2, d3),
                   verdict=verdict_from_flags(report.d1, report.d2, d3))


def report_from_dict(values: dict) -> AuditReport:
    """The :class:`AuditReport` whose :meth:`AuditReport.to_dict` gave ``values`` (results caches
    hold data, not objects)."""
    names = {f.name for f in fields(AuditReport)}
    kw = {k: v for k, v in values.items() if k in names}
    for key in LIST_FIELDS:
        if key in kw:
            kw[key] = tuple(kw[key])
    return AuditReport(**kw)
