"""The three-diagnostic audit of a trained model, the fresh-feedback null and direction quality.

The audit (reference ``003``, ``protocol/fa_protocol.py``) asks three questions of a trained
network on an evaluation batch:

* **D1, scale stability**: does the residual stream explode? Fires when the largest per-block
  growth ``max_l ||h_{l+1}|| / ||h_l||`` exceeds ``d1_threshold`` (50).
* **D2, reference validity**: is the BP gradient the cosines are measured against still
  resolvable? Fires when ``||g_L||`` at the deepest hidden state is below ``d2_factor * d2_eps``
  (10 * 1e-8, ten times the cosine clamp): below it every cosine with the BP gradient is an
  artefact of the clamp.
* **D3, depth utility**: do the trained blocks beat random frozen ones? Fires when the test
  accuracy is below the frozen-blocks baseline plus ``d3_margin_pp`` (2) percentage points.

Norms are the median over the batch of the per-sample L2 norm of ``model.pool(h)`` (the row
itself for MLPs, the cls token for ViTs, the global average pool for conv nets).

The verdict is ``PASS`` or ``FAIL(...)`` naming every diagnostic that fires, as the reference
code computes it. The reference README also names *Mode 1*: D1 and D2 firing together (the
stream blows up while the reference gradient collapses); the report carries it as ``mode1``.

The BP reference gradient ``g_l = dL/dh_l`` (mean cross-entropy) is taken by autograd through
the model's own ``embed``, ``step`` and ``readout`` (:func:`bp_reference`), so it is the
gradient of the network that was trained, for every architecture. (The reference rebuilt the
chain by hand and got it wrong for blocks with and without an internal skip.)

Because ``L`` is a batch mean, ``||g_l||`` scales as 1/N with the evaluation batch size N; the
reference calibrated the D2 floor and the direction-quality health line on N = 128 (audit)
and N = 1024 (direction quality). Reports record N.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import check_choice
from .metrics import per_sample_cosine

D1_THRESHOLD = 50.0  # 003: D1 fires when a block grows the stream by more than this factor
D2_EPS = 1e-8  # 003: the cosine clamp the reference gradient must clear
D2_FACTOR = 10.0  # 003: D2 fires when ||g_L|| < D2_FACTOR * D2_EPS
D2_FLOOR = D2_FACTOR * D2_EPS  # = 1e-7 on the 128-sample eval batch
D3_MARGIN_PP = 2.0  # 003: D3 fires when accuracy < frozen-blocks accuracy + 2 percentage points
PROTOCOL_EVAL = 128  # the D2 floor was calibrated on batches of 128 (||g|| scales as 1/N)
DIRECTION_EVAL = 1024  # 004 read direction quality on 1,024 test samples
COSINE_EPS = 1e-30  # per-layer cosines: small enough to show the true cosine when ||g|| is tiny
DIRECTION_EPS = COSINE_EPS  # direction quality's cosine floor
HEALTHY_G = 1e-7  # 004: the BP reference is resolvable above this median ||g||
POOR_COS = 0.05  # 004: |cos| below this is poor direction quality
MEDIOCRE_COS = 0.20  # 004: |cos| below this (and >= POOR_COS) is mediocre
NULL_SEED = 0x5EED_F4E5  # default seed of the fresh draws: unlike the small seeds used for setup()
READINGS: tuple[str, ...] = ("reference unhealthy", "poor", "mediocre", "reasonable")


# --------------------------------------------------------------------------- helpers

@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; afterwards restore each module's own flag.

    Restoring per module (not ``model.train()``) keeps, e.g., BatchNorm inside frozen blocks in
    eval mode when a frozen-blocks baseline is being trained.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was_training in flags:
            m.training = was_training


@contextmanager
def buffers_preserved(model: nn.Module) -> Iterator[None]:
    """Restore every buffer afterwards when any module is training, so a diagnostic forward
    never moves BatchNorm running statistics."""
    if not any(m.training for m in model.modules()):
        yield
        return
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name in saved:
                    buf.copy_(saved[name])


def _check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    if y.dim() != 1 or y.dtype != torch.long:
        raise ValueError(f"labels y must be a (batch,) int64 tensor, got shape {tuple(y.shape)} "
                         f"dtype {y.dtype}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}; pass matching batches")
    if x.shape[0] < 1:
        raise ValueError("the evaluation batch is empty")


def pooled_norms(model: nn.Module, tensors: Sequence[torch.Tensor]) -> list[float]:
    """Median over the batch of the per-sample L2 norm of ``model.pool(t)``, for each tensor.

    ``tensors``: hidden states or gradients shaped like ``h_l``. Returns Python floats.
    """
    with torch.no_grad():
        meds = [torch.linalg.vector_norm(model.pool(t), dim=-1).median() for t in tensors]
        return [float(v) for v in torch.stack(meds).double().cpu()] if meds else []


# --------------------------------------------------------------------------- BP reference

def bp_reference(model: nn.Module, x: torch.Tensor,
                 y: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The BP reference at every hidden state, through the model's own block interface.

    One forward ``h_0 = model.embed(x)``, ``h_{l+1} = model.step(l, h_l)``,
    ``logits = model.readout(h_L)``; ``L`` = mean cross-entropy over the batch;
    ``g_l = torch.autograd.grad(L, h_l)``.

    ``x``: a batch of inputs the model accepts; ``y``: ``(batch,)`` int64 labels.
    Returns ``(hiddens, grads, logits)``: ``[h_0..h_L]`` and ``[g_0..g_L]`` each shaped like
    ``h_l`` (``(batch, d)``, ``(batch, tokens, d)`` or ``(batch, d, H, W)``), and logits
    ``(batch, classes)``; all detached.

    For a model converted to layer-level rules (it holds ``LocalLinear`` / ``LocalConv2d``),
    autograd through the model itself would give the rule's own signal, not BP's: the reference
    is then taken on its BP twin (:func:`fa_study.feedback.bp_twin`, the same weights with every
    local layer on BP), so it is always the gradient of the trained network as plain BP would
    compute it.

    The model stays in whatever mode it is in (use :func:`eval_mode` for BatchNorm models);
    no parameter ``.grad`` is touched, and BatchNorm running statistics are restored if the
    forward ran in train mode. Works inside ``torch.no_grad()``.
    """
    from .feedback import bp_twin, local_layers

    return hidden_gradients(bp_twin(model) if local_layers(model) else model, x, y)


def hidden_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                     on_logits=None) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """``(hiddens, dCE/dh_l, logits)`` by autograd through the model *as it is* (for a converted
    model: through its rules' own backward); ``on_logits(logits)`` is called before the backward
    (a direct rule captures the output error there). BatchNorm statistics are restored; no
    ``.grad`` is touched. :func:`bp_reference` is this on the plain-BP network."""
    _check_batch(x, y)
    with torch.enable_grad(), buffers_preserved(model):
        h = model.embed(x)
        if not h.requires_grad:  # embedding frozen (or no parameters): start the graph here
            h = h.detach().requires_grad_(True)
        hiddens = [h]
        for l in range(model.num_blocks):
            h = model.step(l, h)
            hiddens.append(h)
        logits = model.readout(h)
        if on_logits is not None:
            on_logits(logits)
        grads = torch.autograd.grad(F.cross_entropy(logits, y), hiddens)
    return ([t.detach() for t in hiddens], [g.detach() for g in grads], logits.detach())


# --------------------------------------------------------------------------- audit

def fired_flags(d1: bool, d2: bool, d3: bool | None) -> tuple[str, ...]:
    """The names of the diagnostics that fire, in order; ``d3=None`` (not evaluated) never fires."""
    return tuple(name for name, fires in (("D1", d1), ("D2", d2), ("D3", d3)) if fires)


def verdict_from_flags(d1: bool, d2: bool, d3: bool | None) -> str:
    """``"PASS"`` when no diagnostic fires, else ``"FAIL(D1+D3)"`` etc. naming those that do."""
    flags = fired_flags(d1, d2, d3)
    return "PASS" if not flags else f"FAIL({'+'.join(flags)})"


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
        norms = ", ".join(f"{v:.3g}" for v in self.hidden_norms)
        grads = ", ".join(f"{v:.2e}" for v in self.grad_norms)
        lines.append(f"||h_l||, l = 0..{len(self.hidden_norms) - 1}: {norms}")
        lines.append(f"||g_l||, l = 0..{len(self.grad_norms) - 1}: {grads}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict:
        """Plain Python values (lists for the per-layer norms), ready for JSON or a DataFrame row."""
        out = asdict(self)
        for key in ("flags", "hidden_norms", "growth", "grad_norms"):
            out[key] = list(out[key])
        out["d3_evaluated"] = self.d3_evaluated
        return out

    def to_frame(self) -> pd.DataFrame:
        """One row per hidden state: ``layer``, ``h_norm``, ``growth`` (from the previous
        layer; NaN at h_0), ``g_norm``, and the ``verdict`` repeated for concatenating runs."""
        n = len(self.hidden_norms)
        return pd.DataFrame({
            "layer": np.arange(n),
            "h_norm": self.hidden_norms,
            "growth": [math.nan, *self.growth],
            "g_norm": self.grad_norms,
            "verdict": [self.verdict] * n,
        })


def audit(model: nn.Module, x_eval: torch.Tensor, y_eval: torch.Tensor, *,
          frozen_acc: float | None = None, test_acc: float | None = None,
          d1_threshold: float = D1_THRESHOLD, d2_eps: float = D2_EPS, d2_factor: float = D2_FACTOR,
          d3_margin_pp: float = D3_MARGIN_PP) -> AuditReport:
    """Run diagnostics D1, D2 and D3 on a trained model and return an :class:`AuditReport`.

    ``x_eval``: an evaluation batch the model accepts (the reference uses 128 test samples);
    ``y_eval``: ``(batch,)`` int64 labels. ``frozen_acc``: the frozen-blocks baseline's test
    accuracy in [0, 1]; without it D3 is not evaluated. ``test_acc``: the model's test
    accuracy in [0, 1]; without it, the accuracy on the evaluation batch. Thresholds as in the
    module docstring. The model runs in eval mode and each module's mode is restored after.
    """
    for name, value in (("d1_threshold", d1_threshold), ("d2_eps", d2_eps),
                        ("d2_factor", d2_factor)):
        if isinstance(value, bool) or not (isinstance(value, numbers.Real) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    for name, value in (("frozen_acc", frozen_acc), ("test_acc", test_acc)):
        if value is not None and not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} is an accuracy in [0, 1], got {value!r} "
                             "(pass a fraction, not a percentage)")
    _check_batch(x_eval, y_eval)

    with eval_mode(model):
        hiddens, grads, logits = bp_reference(model, x_eval, y_eval)
        h_norms = pooled_norms(model, hiddens)
        g_norms = pooled_norms(model, grads)

    if test_acc is None:
        test_acc = float((logits.argmax(-1) == y_eval).double().mean())
        source = "eval batch"
    else:
        test_acc, source = float(test_acc), "given"

    growth = [h_norms[i + 1] / max(h_norms[i], 1e-12) for i in range(len(h_norms) - 1)]
    max_growth = max(growth) if growth else 1.0
    d1 = bool(max_growth > d1_threshold)
    d2_floor = float(d2_factor * d2_eps)
    g_L = g_norms[-1]
    d2 = bool(g_L < d2_floor)
    d3_margin = d3_margin_pp / 100.0
    depth_margin, d3 = decide_d3(test_acc, frozen_acc, d3_margin_pp)

    return AuditReport(
        verdict=verdict_from_flags(d1, d2, d3), flags=fired_flags(d1, d2, d3), mode1=d1 and d2,
        test_acc=test_acc, test_acc_source=source, n_eval=int(x_eval.shape[0]),
        hidden_norms=tuple(h_norms), growth=tuple(growth), max_growth=float(max_growth),
        d1_threshold=float(d1_threshold), d1=d1, grad_norms=tuple(g_norms), g_L=float(g_L),
        d2_floor=d2_floor, d2=d2, frozen_acc=None if frozen_acc is None else float(frozen_acc),
        depth_margin=depth_margin, d3_margin=d3_margin, d3=d3)


def decide_d3(test_acc: float, frozen_acc: float | None, d3_margin_pp: float = D3_MARGIN_PP
              ) -> tuple[float | None, bool | None]:
    """D3, decided here only: ``(depth margin test_acc - frozen_acc, fires)``; ``(None, None)``
    (not evaluated) without a frozen-blocks accuracy (None or NaN). Accuracies are fractions in
    [0, 1]: a percentage (35.0) is refused, as by :func:`audit`, instead of silently firing D3."""
    if frozen_acc is None or not math.isfinite(float(frozen_acc)):
        return None, None
    for name, value in (("frozen_acc", frozen_acc), ("test_acc", test_acc)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} is an accuracy in [0, 1], got {value!r} "
                             "(pass a fraction, not a percentage)")
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
    for key in ("flags", "hidden_norms", "growth", "grad_norms"):
        kw[key] = tuple(kw[key])
    return AuditReport(**kw)


# --------------------------------------------------------------------------- credit vs BP

def position_sum(model: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``(batch, d)``: ``t`` summed over the positions of a hidden state, i.e. the adjoint of
    ``model.broadcast`` (the identity for MLPs; the sum over tokens for ViTMini, over pixels for
    SmallResNet). For a gradient it is the gradient along a position-constant direction: what a
    ``(batch, d)`` credit signal broadcast over positions can express."""
    if t.dim() == 2:
        return t
    with torch.enable_grad():
        v = torch.zeros(t.shape[0], model.width, device=t.device, dtype=t.dtype, requires_grad=True)
        out, = torch.autograd.grad((model.broadcast(v, t) * t.detach()).sum(), v)
    return out


COMPARES: tuple[str, ...] = ("summed", "full", "pooled")


def _compared(model: nn.Module, t: torch.Tensor, compare: str) -> torch.Tensor:
    if compare == "summed":
        return position_sum(model, t)
    if compare == "pooled":
        return model.pool(t)
    return t


def credit_cosines(model: nn.Module, credit: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   eps: float = COSINE_EPS, compare: str = "summed") -> list[float]:
    """Per hidden state, the mean over the batch of ``cos(a_l, g_l)`` (float64, floor ``eps``).

    ``compare="summed"`` (default) compares both summed over positions (:func:`position_sum`):
    for ViTMini, FA's top-layer credit (exactly the cls-token gradient, broadcast over tokens)
    then reads 1, not 1/sqrt(65) as a comparison of whole token tensors would. ``"full"``
    compares the whole tensors, ``"pooled"`` the pooled vectors (003's cls token / average pool).
    """
    check_choice("compare", compare, COMPARES)
    return [float(per_sample_cosine(_compared(model, a, compare).double(),
                                    _compared(model, g, compare).double(), eps).mean())
            for a, g in zip(credit, grads)]



def _credit(model: nn.Module, method, x: torch.Tensor, y: torch.Tensor,
            hiddens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``method.credit`` with its output checked against the hidden states."""
    with buffers_preserved(model):
        credit = list(method.credit(model, x, y))
    name = getattr(method, "name", type(method).__name__)
    if len(credit) != len(hiddens):
        raise ValueError(f"method {name!r}: credit() returned {len(credit)} signals; expected "
                         f"{len(hiddens)} (a_0..a_L, one per hidden state)")
    for l, (a, h) in enumerate(zip(credit, hiddens)):
        if tuple(a.shape) != tuple(h.shape):
            raise ValueError(f"method {name!r}: credit signal a_{l} has shape {tuple(a.shape)}, "
                             f"but h_{l} has shape {tuple(h.shape)}")
    return [a.detach() for a in credit]


def _layer_cosines(model, grads, credit, layers, eps, compare) -> list[float]:
    cos = credit_cosines(model, [credit[l] for l in layers], [grads[l] for l in layers], eps, compare)
    return cos


def _check_layers(layers: Sequence[int] | None, num_blocks: int) -> list[int]:
    if layers is None:
        # "deep" as in the reference's fresh-B null: every hidden state except the embedding.
        layers = list(range(1, num_blocks + 1)) or [0]
    layers = [int(l) for l in layers]
    if not layers or any(not 0 <= l <= num_blocks for l in layers):
        raise ValueError(f"layers must be a non-empty list of indices in 0..{num_blocks}, got {layers}")
    return layers


def fresh_feedback_null(model: nn.Module, method, x: torch.Tensor, y: torch.Tensor,
                        n_draws: int = 20, generator: torch.Generator | None = None, *,
                        layers: Sequence[int] | None = None, eps: float = DIRECTION_EPS,
                        compare: str = "summed") -> dict:
    """Is the trained network aligned with *its* feedback, or would any feedback do as well?

    Computes the deep-layer cosine between ``method.credit`` and the BP gradient (mean over
    ``layers`` of the batch cosine; default every hidden state but h_0) with the training
    feedback, then with ``n_draws`` copies ``method.fresh(generator)`` holding freshly drawn
    feedback. A training cosine many standard deviations above the fresh ones means the
    network adapted to the feedback it was trained with.

    ``x``: an evaluation batch; ``y``: ``(batch,)`` int64 labels; ``generator``: CPU generator
    for the fresh draws (default: seeded with :data:`NULL_SEED`, so the null is reproducible);
    it must not be seeded like the one given to ``method.setup``, or the first draw would be
    the training feedback itself (raises ``ValueError``). ``eps``: cosine
    floor (the true cosine by default, as in :func:`direction_quality`); ``compare``: as in
    :func:`credit_cosines` (default: both signals summed over positions). Runs in eval mode.

    Layer pairing: ``a_l`` is compared with ``g_l`` at the same hidden state, so block ``l``'s
    signal ``a_{l+1}`` (it drives ``f_l``, hence ``h_{l+1}``) meets the gradient at the block's
    OUTPUT. Reference 003's null (and 004's direction test) paired ``e B_l^T`` with ``g_l``, the
    gradient at block ``l``'s INPUT, one state too low; its deep set "layers 1..L-1" is our
    ``1..L``. For rules whose feedback cannot be redrawn the null is refused: ask
    ``type(rule).has_random_feedback``.

    Returns a dict: ``training_deep_cos``, ``fresh_deep_mean``, ``fresh_deep_std`` (ddof=1),
    ``fresh_deep_cos`` (list), ``z_score`` (training minus fresh mean, in fresh std),
    ``training_layer_cos`` (list over ``layers``), ``layers``, ``n_draws``.
    """
    if isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws < 2:
        raise ValueError(f"n_draws must be an integer >= 2 (a standard deviation is reported), "
                         f"got {n_draws!r}")
    if not getattr(type(method), "has_random_feedback", callable(getattr(method, "fresh", None))):
        raise ValueError(f"rule {getattr(method, 'name', method)!r} has no random feedback to redraw "
                         "(has_random_feedback is False): the fresh-feedback null does not apply to it")
    layers = _check_layers(layers, model.num_blocks)
    gen = generator if generator is not None else torch.Generator().manual_seed(NULL_SEED)
    with eval_mode(model):
        hiddens, grads, _ = bp_reference(model, x, y)
        trained_credit = _credit(model, method, x, y, hiddens)
        train_layer = _layer_cosines(model, grads, trained_credit, layers, eps, compare)
        fresh = []
        for draw in range(n_draws):
            redrawn = _credit(model, method.fresh(gen), x, y, hiddens)
            if all(torch.equal(a, b) for a, b in zip(redrawn, trained_credit)):
                # A null that contains the training feedback itself is biased towards it.
                raise ValueError(
                    f"fresh draw {draw} gave exactly the training credit signals: either the rule "
                    f"({getattr(method, 'name', method)!r}) has no random feedback to redraw (bp "
                    "has no fresh-feedback null), or the generator was seeded like the one given "
                    "to method.setup(); pass a differently seeded generator")
            fresh.append(float(np.mean(_layer_cosines(model, grads, redrawn, layers, eps, compare))))
    train = float(np.mean(train_layer))
    mean, std = float(np.mean(fresh)), float(np.std(fresh, ddof=1))
    return {
        "training_deep_cos": train,
        "fresh_deep_mean": mean,
        "fresh_deep_std": std,
        "fresh_deep_cos": fresh,
        "z_score": _z_score(train, mean, std),
        "training_layer_cos": train_layer,
        "layers": layers,
        "n_draws": n_draws,
    }


def _z_score(value: float, mean: float, std: float) -> float:
    if std > 0:
        return (value - mean) / std
    return 0.0 if value == mean else math.copysign(math.inf, value - mean)


def direction_reading(cos_mean: float, g_norm: float, *, healthy_g: float = HEALTHY_G,
                      poor: float = POOR_COS, mediocre: float = MEDIOCRE_COS) -> str:
    """004's pre-registered reading of one layer: ``"reference unhealthy"`` when
    ``g_norm <= healthy_g``, else ``"poor"`` (|cos| < poor), ``"mediocre"`` (|cos| < mediocre)
    or ``"reasonable"``."""
    if not g_norm > healthy_g:
        return "reference unhealthy"
    if abs(cos_mean) < poor:
        return "poor"
    if abs(cos_mean) < mediocre:
        return "mediocre"
    return "reasonable"


def direction_quality(model: nn.Module, method, x: torch.Tensor, y: torch.Tensor,
                      eps: float = DIRECTION_EPS, *, compare: str = "summed") -> pd.DataFrame:
    """Per hidden state, how well the rule's credit ``a_l`` points along the BP gradient ``g_l``.

    Per-sample cosine ``<a_l, g_l> / (||a_l|| ||g_l||)`` with the floor ``eps`` (1e-30: the
    true cosine even when ``||g_l||`` is 1e-12, where the usual 1e-8 clamp reads ~0), and the
    median magnitudes of both signals (per-sample norms of the compared vectors). ``compare``:
    as in :func:`credit_cosines` (default: both summed over positions; for MLPs all choices
    agree). ``x``, ``y``: an evaluation batch (004 used 1024 test samples). Runs in eval mode.

    Layer pairing: ``a_l`` against ``g_l`` at the same hidden state (block ``l``'s signal against
    the gradient at the block's output). 004 compared ``e B_l^T`` with ``g_l`` at block ``l``'s
    input instead (see :func:`fresh_feedback_null`); notebook 04 says what that changes.

    Returns a DataFrame, one row per layer 0..L: ``layer``, ``cos_mean``, ``cos_std``,
    ``cos_median``, ``g_norm_median``, ``a_norm_median``, ``reading``
    (:func:`direction_reading`), ``method``, ``n_eval``.
    """
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    with eval_mode(model):
        hiddens, grads, _ = bp_reference(model, x, y)
        credit = _credit(model, method, x, y, hiddens)
        rows = []
        check_choice("compare", compare, COMPARES)
        for l, (a, g) in enumerate(zip(credit, grads)):
            a, g = _compared(model, a, compare).double(), _compared(model, g, compare).double()
            cos = per_sample_cosine(a, g, eps)
            g_norm = float(torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1).median())
            a_norm = float(torch.linalg.vector_norm(a.reshape(a.shape[0], -1), dim=1).median())
            cos_mean = float(cos.mean())
            rows.append({
                "layer": l,
                "cos_mean": cos_mean,
                "cos_std": float(cos.std()) if cos.numel() > 1 else 0.0,
                "cos_median": float(cos.median()),
                "g_norm_median": g_norm,
                "a_norm_median": a_norm,
                "reading": direction_reading(cos_mean, g_norm),
            })
    table = pd.DataFrame(rows)
    table["method"] = getattr(method, "name", type(method).__name__)
    table["n_eval"] = int(x.shape[0])
    return table


_VERDICTS = {
    "reference unhealthy": "WARNING: the BP gradient is at or below {healthy:.0e}; the reference "
                           "is not healthy, so this cosine says nothing about direction quality.",
    "poor": "Direction quality is POOR even with a healthy reference (|cos| < {poor:g}).",
    "mediocre": "Direction quality is MEDIOCRE with a healthy reference ({poor:g} <= |cos| < {mediocre:g}).",
    "reasonable": "Direction quality is REASONABLE with a healthy reference (|cos| >= {mediocre:g}); "
                  "a gap to BP must come from something else.",
}


def read_direction_quality(table: pd.DataFrame, layer: int | None = None, *,
                           healthy_g: float = HEALTHY_G, poor: float = POOR_COS,
                           mediocre: float = MEDIOCRE_COS) -> str:
    """004's pre-registered reading of a :func:`direction_quality` table, as a sentence.

    ``layer``: the hidden state to read; default the middle one, ``L // 2`` (004 read layer 2
    of a 4-block network). Thresholds as in :func:`direction_reading`.
    """
    if table.empty or "layer" not in table:
        raise ValueError("table must be the DataFrame returned by direction_quality()")
    last = int(table["layer"].max())
    layer = last // 2 if layer is None else int(layer)
    rows = table[table["layer"] == layer]
    if rows.empty:
        raise ValueError(f"layer must be one of 0..{last}, got {layer}")
    row = rows.iloc[0]
    kind = direction_reading(row["cos_mean"], row["g_norm_median"], healthy_g=healthy_g,
                             poor=poor, mediocre=mediocre)
    head = (f"layer {layer}: cos(a, g) = {row['cos_mean']:+.4f}, ||g|| = {row['g_norm_median']:.2e}, "
            f"||a|| = {row['a_norm_median']:.2e} -> ")
    return head + _VERDICTS[kind].format(healthy=healthy_g, poor=poor, mediocre=mediocre)


# --------------------------------------------------------------------------- applied updates

def update_alignment(model: nn.Module, rule, x: torch.Tensor, y: torch.Tensor) -> pd.DataFrame:
    """Per weight matrix, how the update a rule applies on ``(x, y)`` compares with BP's gradient.

    The rule runs ``fill_grads`` on a copy of the model and of itself (so neither the model, its
    gradients nor the rule's feedback state change); BP's gradient is autograd of the mean
    cross-entropy through the network as plain BP computes it (the BP twin of a converted
    model). Rows: every trainable parameter with two or more dimensions, in model order.
    Columns: ``param``, ``cos_update_bp`` (1 = the rule applies BP's direction), ``update_norm``,
    ``bp_grad_norm``, and for layers converted to a layer-level rule ``angle_BW_deg`` and
    ``norm_ratio_BW`` (the feedback matrix against W; NaN elsewhere).
    """
    import copy

    from .feedback import bp_twin, feedback_alignment, local_layers

    _check_batch(x, y)
    rule_model, rule_copy = copy.deepcopy((model, rule))
    for p in rule_model.parameters():
        p.grad = None
    rule_copy.fill_grads(rule_model, x, y)
    bp = bp_twin(model) if local_layers(model) else copy.deepcopy(model)
    bp.train(model.training)
    for p in bp.parameters():
        p.grad = None
    with torch.enable_grad():
        params = [p for p in bp.parameters() if p.requires_grad]
        grads = torch.autograd.grad(F.cross_entropy(bp(x), y), params, allow_unused=True)
    bp_grads = {id(p): g for p, g in zip(params, grads)}
    angles = {}
    if local_layers(model):
        table = feedback_alignment(model)
        angles = {f"{r.layer}.weight": (r.angle_BW_deg, r.norm_ratio_BW) for r in table.itertuples(index=False)}
    rows = []
    for (name, p_rule), p_bp in zip(rule_model.named_parameters(), bp.parameters()):
        if p_rule.dim() < 2 or not p_rule.requires_grad:
            continue
        u, g = p_rule.grad, bp_grads.get(id(p_bp))
        if u is None or g is None:
            cos, un, gn = math.nan, math.nan, math.nan
        else:
            u64, g64 = u.double().flatten(), g.double().flatten()
            den = float(u64.norm() * g64.norm())
            cos = float(u64 @ g64) / den if den > 0 else math.nan
            un, gn = float(u64.norm()), float(g64.norm())
        a, r = angles.get(name, (math.nan, math.nan))
        rows.append({"param": name, "cos_update_bp": cos, "update_norm": un, "bp_grad_norm": gn,
                     "angle_BW_deg": a, "norm_ratio_BW": r})
    return pd.DataFrame(rows, columns=["param", "cos_update_bp", "update_norm", "bp_grad_norm",
                                       "angle_BW_deg", "norm_ratio_BW"])
