"""Does a rule's credit point along BP's gradient? Direction quality and the fresh-feedback null.

Both compare, at every hidden state, a credit signal ``a_l`` with the BP reference ``g_l``
(:func:`fa_study.diagnostics.bp_reference`). The credit is either a package rule's
(``rule.credit_at``) or, for a network trained by anything else, what the network's own
backward delivers (:func:`fa_study.diagnostics.model_credit`), so a researcher's own rule is
read the same way as the package's.

Layer pairing: ``a_l`` is compared with ``g_l`` at the same hidden state, so block ``l``'s
signal ``a_{l+1}`` (it drives ``f_l``, hence ``h_{l+1}``) meets the gradient at the block's
OUTPUT. References 003 (null) and 004 (direction test) paired ``e B_l^T`` with ``g_l``, the
gradient at block ``l``'s INPUT, one state too low; 003's deep set "layers 1..L-1" is our
``1..L``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..config import check_choice
from .signals import (COSINE_EPS, bp_reference, check_signals, eval_mode, model_credit, per_sample_cosine,
                      prepare)
from .taps import HiddenStates

DIRECTION_EVAL = 1024  # 004 read direction quality on 1,024 test samples
HEALTHY_G = 1e-7  # 004: the BP reference is resolvable above this median ||g||
POOR_COS = 0.05  # 004: |cos| below this is poor direction quality
MEDIOCRE_COS = 0.20  # 004: |cos| below this (and >= POOR_COS) is mediocre
NULL_SEED = 0x5EED_F4E5  # default seed of the fresh draws: unlike the small seeds used for setup()
NOT_MEASURED = "n/a"  # direction_reading of a cosine that was not measured
BY_CONSTRUCTION = "by construction"  # the reading of BP's backward compared with itself: no finding
READINGS: tuple[str, ...] = ("reference unhealthy", "poor", "mediocre", "reasonable")  # direction_reading's
COMPARES: tuple[str, ...] = ("summed", "full", "pooled")


def compared(states: HiddenStates, t: torch.Tensor, compare: str) -> torch.Tensor:
    """``t`` as compared: summed over positions, pooled, or whole."""
    if compare == "summed":
        return states.position_sum(t)
    if compare == "pooled":
        return states.pool(t)
    return t


def credit_cosines(states: HiddenStates, credit: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   eps: float = COSINE_EPS, compare: str = "summed") -> list[float]:
    """Per hidden state, the mean over the batch of ``cos(a_l, g_l)`` (float64, floor ``eps``).

    ``compare="summed"`` (default) compares both summed over positions: for ViTMini, FA's
    top-layer credit (exactly the cls-token gradient, broadcast over tokens) then reads 1, not
    1/sqrt(65) as a comparison of whole token tensors would. ``"full"`` compares the whole
    tensors, ``"pooled"`` the pooled vectors (003's cls token / average pool).
    """
    check_choice("compare", compare, COMPARES)
    return [float(per_sample_cosine(compared(states, a, compare).double(),
                                    compared(states, g, compare).double(), eps).mean())
            for a, g in zip(credit, grads)]


def rule_credit(model: nn.Module, rule, x: torch.Tensor, y: torch.Tensor, states: HiddenStates,
                hiddens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The credit ``[a_0 .. a_L]`` of ``rule`` (None: the model's own backward), checked against
    the hidden states and detached."""
    if rule is None:
        credit, name = model_credit(model, x, y, hidden=states), "the model's own backward"
    else:
        # a duck-typed rule without credit_at is read through the block interface's credit
        at = getattr(rule, "credit_at", None)
        credit = list(at(model, x, y, states) if at is not None else rule.credit(model, x, y))
        name = getattr(rule, "name", type(rule).__name__)
    check_signals(name, credit, hiddens)
    return [a.detach() for a in credit]


def _check_layers(layers: Sequence[int] | None, num_blocks: int) -> list[int]:
    if layers is None:
        # "deep" as in the reference's fresh-B null: every hidden state except the embedding.
        layers = list(range(1, num_blocks + 1)) or [0]
    layers = [int(l) for l in layers]
    if not layers or any(not 0 <= l <= num_blocks for l in layers):
        raise ValueError(f"layers must be a non-empty list of indices in 0..{num_blocks}, got {layers}")
    return layers


def fresh_feedback_null(model: nn.Module, rule, x: torch.Tensor, y: torch.Tensor,
                        n_draws: int = 20, generator: torch.Generator | None = None, *,
                        layers: Sequence[int] | None = None, eps: float = COSINE_EPS,
                        compare: str = "summed", hidden=None, pool="auto", twin=None) -> dict:
    """Is the trained network aligned with *its* feedback, or would any feedback do as well?

    Computes the deep-layer cosine between ``rule``'s credit and the BP gradient (mean over
    ``layers`` of the batch cosine; default every hidden state but h_0) with the training
    feedback, then with ``n_draws`` copies ``rule.fresh(generator)`` holding freshly drawn
    feedback. A training cosine many standard deviations above the fresh ones means the
    network adapted to the feedback it was trained with. ``rule`` must be one of the package's
    rules with random feedback (``type(rule).has_random_feedback``).

    Layer pairing: ``a_l`` against ``g_l`` at the same hidden state (see the module doc).

    ``x``: an evaluation batch; ``y``: ``(batch,)`` int64 labels; ``generator``: CPU generator
    for the fresh draws (default: seeded with :data:`NULL_SEED`); it must not be seeded like
    the one given to ``rule.setup``, or the first draw would be the training feedback itself
    (raises ``ValueError``). ``hidden``, ``pool``, ``twin``: as in
    :func:`fa_study.diagnostics.audit`. Runs in eval mode.

    Returns a dict: ``training_deep_cos``, ``fresh_deep_mean``, ``fresh_deep_std`` (ddof=1),
    ``fresh_deep_cos`` (list), ``z_score`` (training minus fresh mean, in fresh std),
    ``training_layer_cos`` (list over ``layers``), ``layers``, ``n_draws``.
    """
    _check_null(rule, n_draws)
    gen = generator if generator is not None else torch.Generator().manual_seed(NULL_SEED)
    states, tw = prepare(model, x, hidden=hidden, pool=pool, twin=twin)
    layers = _check_layers(layers, states.num_states - 1)
    with eval_mode(model):
        hiddens, grads, _ = bp_reference(model, x, y, hidden=states, twin=tw)
        trained = rule_credit(model, rule, x, y, states, hiddens)
        train_layer = _layer_cosines(states, grads, trained, layers, eps, compare)
        fresh = []
        for draw in range(n_draws):
            redrawn = _fresh_credit(model, rule, gen, x, y, states, hiddens, trained, draw)
            fresh.append(float(np.mean(_layer_cosines(states, grads, redrawn, layers, eps, compare))))
    train = float(np.mean(train_layer))
    mean, std = float(np.mean(fresh)), float(np.std(fresh, ddof=1))
    return {"training_deep_cos": train, "fresh_deep_mean": mean, "fresh_deep_std": std,
            "fresh_deep_cos": fresh, "z_score": _z_score(train, mean, std),
            "training_layer_cos": train_layer, "layers": layers, "n_draws": n_draws}


def _check_null(rule, n_draws) -> None:
    """The null needs at least two draws and a package rule with random feedback to redraw."""
    if isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws < 2:
        raise ValueError(f"n_draws must be an integer >= 2 (a standard deviation is reported), "
                         f"got {n_draws!r}")
    if rule is None or not hasattr(rule, "fresh"):
        raise ValueError("the fresh-feedback null redraws a package rule's feedback: pass the rule "
                         "the network was trained with (e.g. build_rule('dfa') after training)")
    if not getattr(type(rule), "has_random_feedback", callable(getattr(rule, "fresh", None))):
        raise ValueError(f"rule {getattr(rule, 'name', rule)!r} has no random feedback to redraw "
                         "(has_random_feedback is False): the fresh-feedback null does not apply to it")


def _fresh_credit(model, rule, gen, x, y, states, hiddens, trained, draw: int) -> list[torch.Tensor]:
    """The credit with freshly drawn feedback (draw number ``draw``); refused when it is the
    training credit itself, since a null that contains the training feedback is biased towards it."""
    redrawn = rule_credit(model, rule.fresh(gen), x, y, states, hiddens)
    if all(torch.equal(a, b) for a, b in zip(redrawn, trained)):
        raise ValueError(
            f"fresh draw {draw} gave exactly the training credit signals: either the rule "
            f"({getattr(rule, 'name', rule)!r}) has no random feedback in use on this model, "
            "or the generator was seeded like the one given to rule.setup(); pass a "
            "differently seeded generator")
    return redrawn


def _layer_cosines(states, grads, credit, layers, eps, compare) -> list[float]:
    return credit_cosines(states, [credit[l] for l in layers], [grads[l] for l in layers], eps, compare)


def _z_score(value: float, mean: float, std: float) -> float:
    if std > 0:
        return (value - mean) / std
    return 0.0 if value == mean else math.copysign(math.inf, value - mean)


def direction_reading(cos_mean: float, g_norm: float, *, healthy_g: float = HEALTHY_G,
                      poor: float = POOR_COS, mediocre: float = MEDIOCRE_COS) -> str:
    """004's pre-registered reading of one layer: ``"reference unhealthy"`` when
    ``g_norm <= healthy_g``, else ``"poor"`` (|cos| < poor), ``"mediocre"`` (|cos| < mediocre)
    or ``"reasonable"``; ``"n/a"`` when what it needs was not measured (NaN: no finished run)."""
    if math.isnan(g_norm) or (g_norm > healthy_g and math.isnan(cos_mean)):
        return NOT_MEASURED
    if not g_norm > healthy_g:
        return READINGS[0]
    return READINGS[1] if abs(cos_mean) < poor else READINGS[2] if abs(cos_mean) < mediocre else READINGS[3]


def direction_quality(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rule=None, *,
                      eps: float = COSINE_EPS, compare: str = "summed", hidden=None, pool="auto",
                      twin=None) -> pd.DataFrame:
    """Per hidden state, how well the credit ``a_l`` points along the BP gradient ``g_l``.

    ``rule``: a package rule whose credit is read (``rule.credit_at``); ``None`` (default) reads
    what the model's own backward delivers at ``h_l``, so any network is read, whatever trained
    it. Per-sample cosine ``<a_l, g_l> / (||a_l|| ||g_l||)`` with the floor ``eps`` (1e-30: the
    true cosine even when ``||g_l||`` is 1e-12, where the usual 1e-8 clamp reads ~0), and the
    median magnitudes of both signals (per-sample norms of the compared vectors). ``compare``:
    as in :func:`credit_cosines`. ``x``, ``y``: an evaluation batch (004 used 1024 test
    samples). ``hidden``, ``pool``, ``twin``: as in :func:`fa_study.diagnostics.audit`. Runs in
    eval mode. Layer pairing: ``a_l`` against ``g_l`` at the same hidden state (see the module
    doc; notebook 04 says what 004's pairing one state lower changes).

    Returns a DataFrame, one row per hidden state 0..L: ``layer``, ``module`` (what was read),
    ``cos_mean``, ``cos_std``, ``cos_median``, ``g_norm_median``, ``a_norm_median``,
    ``reading`` (:func:`direction_reading`; ``"by construction"`` where ``by_construction``),
    ``method``, ``n_eval``, ``by_construction`` (True when the model's own backward was read and
    the twin is the model itself: the credit *is* ``g_l``, so a cosine of 1 is no finding).
    """
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    check_choice("compare", compare, COMPARES)
    states, tw = prepare(model, x, hidden=hidden, pool=pool, twin=twin)
    with eval_mode(model):
        _, grads, _ = bp_reference(model, x, y, hidden=states, twin=tw)
        credit = rule_credit(model, rule, x, y, states, grads)
    labels = states.labels()
    by_construction = rule is None and tw.model is model
    rows = []
    for l, (a, g) in enumerate(zip(credit, grads)):
        a, g = compared(states, a, compare).double(), compared(states, g, compare).double()
        cos = per_sample_cosine(a, g, eps)
        g_norm = float(torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1).median())
        a_norm = float(torch.linalg.vector_norm(a.reshape(a.shape[0], -1), dim=1).median())
        cos_mean = float(cos.mean())
        rows.append({
            "layer": l,
            "module": labels[l],
            "cos_mean": cos_mean,
            "cos_std": float(cos.std()) if cos.numel() > 1 else 0.0,
            "cos_median": float(cos.median()),
            "g_norm_median": g_norm,
            "a_norm_median": a_norm,
            "reading": BY_CONSTRUCTION if by_construction else direction_reading(cos_mean, g_norm),
        })
    table = pd.DataFrame(rows)
    table["method"] = "own backward" if rule is None else getattr(rule, "name", type(rule).__name__)
    table["n_eval"] = int(x.shape[0])
    table["by_construction"] = by_construction
    return table


_VERDICTS = {
    "reference unhealthy": "WARNING: the BP gradient is at or below {healthy:.0e}; the reference "
                           "is not healthy, so this cosine says nothing about direction quality.",
    "poor": "Direction quality is POOR even with a healthy reference (|cos| < {poor:g}).",
    "mediocre": "Direction quality is MEDIOCRE with a healthy reference ({poor:g} <= |cos| < {mediocre:g}).",
    "reasonable": "Direction quality is REASONABLE with a healthy reference (|cos| >= {mediocre:g}); "
                  "a gap to BP must come from something else.",
    NOT_MEASURED: "NOT MEASURED: the cosine or the BP gradient's norm is NaN (no finished run).",
    BY_CONSTRUCTION: "NO FINDING: the credit read is BP's own backward, compared with itself "
                     "(by_construction), so its cosine is 1 by construction; read a rule's credit "
                     "(rule=...) or a network whose layers run a backward of their own.",
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
    kind = BY_CONSTRUCTION if row.get("by_construction", False) else direction_reading(
        row["cos_mean"], row["g_norm_median"], healthy_g=healthy_g, poor=poor, mediocre=mediocre)
    head = (f"layer {layer}: cos(a, g) = {row['cos_mean']:+.4f}, ||g|| = {row['g_norm_median']:.2e}, "
            f"||a|| = {row['a_norm_median']:.2e} -> ")
    return head + _VERDICTS[kind].format(healthy=healthy_g, poor=poor, mediocre=mediocre)
