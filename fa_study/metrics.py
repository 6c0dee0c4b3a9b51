"""Credit-assignment metrics: how good is a credit signal ``a_l`` at a hidden state ``h_l``?

Every function compares a rule's credit signal with the loss it is meant to reduce, in one of
the ways the reference study (``003``, ``metrics/credit_metrics.py``) defines:

==========================  ==================================================================
``batch_cosine``            cosine between ``a_l`` and a reference (usually the BP gradient
                            ``g_l``), per sample over the flattened features, then the mean
``offline_bp_cosine``       ``batch_cosine(a_l, g_l)``: the study's offline BP cosine Gamma_l
``perturbation_correlation`` rho_l: Pearson correlation between the first-order prediction
                            ``<a_l, eps v>`` and the true loss change for random directions v
``nudging_test``            Delta_l: loss change when ``h_l`` moves a small step against
                            ``a_l / rms(a_l)`` (negative means the signal points downhill)
``feature_drift``           ``||W_final - W_init||_F / ||W_init||_F`` per parameter
``bridge_residual``         R_l: mean |V(h_l) - soft-min_k V_bar(h_{l+1}^k)| for value networks
==========================  ==================================================================

Tensors may be ``(batch, d)`` (MLP), ``(batch, tokens, d)`` (ViT) or ``(batch, C, H, W)``
(ResNet): everything is flattened per sample. ``tail_loss_fn`` builds the per-sample loss as
a function of ``h_l`` for any model with the block interface (``step``, ``readout``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import pearsonr

# The reference's cosine clamp (torch.nn.functional.cosine_similarity's default eps).
COSINE_EPS = 1e-8
# The reference's rms floor when a credit signal is normalised before use.
RMS_EPS = 1e-6

LossFn = Callable[[torch.Tensor], torch.Tensor]


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``(batch, ...)`` -> ``(batch, features)``."""
    return t.reshape(t.shape[0], -1)


def _check_same_shape(what: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}; "
                         "pass two tensors shaped like the same hidden state")
    if a.dim() < 2:
        raise ValueError(f"{what}: expected (batch, ...) tensors, got shape {tuple(a.shape)}")


def per_sample_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """Cosine between ``a[i]`` and ``b[i]`` over all features of sample i.

    ``a``, ``b``: ``(batch, ...)`` with equal shapes. Returns ``(batch,)`` on their device,
    ``<a_i, b_i> / max(||a_i|| ||b_i||, eps)``. With the default ``eps = 1e-8`` this is the
    reference's clamp, which shrinks the cosine towards 0 once ``||a|| ||b||`` falls below
    ``eps`` (diagnostic D2 exists because of it); pass ``eps=1e-30`` for the true cosine.
    """
    _check_same_shape("per_sample_cosine", a, b)
    fa, fb = _flat(a), _flat(b)
    dot = (fa * fb).sum(dim=1)
    norms = torch.linalg.vector_norm(fa, dim=1) * torch.linalg.vector_norm(fb, dim=1)
    return dot / norms.clamp_min(eps)


def batch_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = COSINE_EPS) -> float:
    """Mean over the batch of the per-sample cosine between ``a`` and ``b`` (see
    :func:`per_sample_cosine`). ``a``, ``b``: ``(batch, ...)``. Returns a Python float."""
    return float(per_sample_cosine(a, b, eps).mean().item())


def offline_bp_cosine(a: torch.Tensor, bp_grad: torch.Tensor, eps: float = COSINE_EPS) -> float:
    """The offline BP cosine Gamma_l: :func:`batch_cosine` of a credit signal ``a`` and the
    BP gradient ``bp_grad`` at the same hidden state, both ``(batch, ...)``."""
    return batch_cosine(a, bp_grad, eps)


def tail_loss_fn(model: nn.Module, layer: int, y: torch.Tensor) -> LossFn:
    """The per-sample cross-entropy as a function of ``h_layer``, through the model's own
    ``step(layer..L-1)`` and ``readout``.

    ``y``: ``(batch,)`` labels. The returned function maps ``h`` ``(n, ...)`` to ``(n,)``
    losses, where ``n`` is ``batch`` or a multiple of it (the labels are tiled, so M perturbed
    copies of the batch can go through in one call). Call it in the mode you want to measure:
    BatchNorm in train mode mixes samples, so use ``model.eval()`` for conv models.
    """
    num_blocks = int(model.num_blocks)
    if not 0 <= layer <= num_blocks:
        raise ValueError(f"layer must be in 0..{num_blocks} (hidden states h_0..h_L), got {layer}")

    def loss_fn(h: torch.Tensor) -> torch.Tensor:
        n = h.shape[0]
        if n % y.shape[0] != 0:
            raise ValueError(f"tail loss: got {n} samples, not a multiple of the {y.shape[0]} labels")
        labels = y.repeat(n // y.shape[0])
        for l in range(layer, num_blocks):
            h = model.step(l, h)
        return F.cross_entropy(model.readout(h), labels, reduction="none")

    return loss_fn


def _unit_directions(shape: torch.Size, num: int, generator: torch.Generator | None,
                     like: torch.Tensor) -> torch.Tensor:
    """``num`` random directions per sample, each of unit norm over the sample's features:
    ``(num, *shape)``. Drawn on the CPU generator (reproducible across devices), then moved."""
    v = torch.randn((num, *shape), generator=generator, dtype=like.dtype)
    flat = v.reshape(num, shape[0], -1)
    flat = flat / (torch.linalg.vector_norm(flat, dim=-1, keepdim=True) + 1e-12)
    return flat.reshape(num, *shape).to(like.device)


@torch.no_grad()
def perturbation_correlation(h: torch.Tensor, a: torch.Tensor, loss_fn: LossFn, *,
                             epsilon: float = 1e-3, num_directions: int = 32,
                             generator: torch.Generator | None = None,
                             vectorize: bool = True) -> float:
    """Local perturbation correlation rho_l.

    For ``num_directions`` random unit directions ``v`` per sample, compare the change the
    credit signal predicts, ``<a_i, epsilon v_i>``, with the true change
    ``loss_fn(h + epsilon v)_i - loss_fn(h)_i``; rho is the Pearson correlation over all
    ``batch * num_directions`` pairs (scipy.stats.pearsonr). rho near 1 means ``a`` is (a
    positive multiple of) the local gradient; near 0 means it carries no information.

    ``h``, ``a``: ``(batch, ...)``; ``loss_fn``: ``h -> (batch,)`` per-sample loss, e.g.
    :func:`tail_loss_fn`. With ``vectorize`` all perturbed copies go through ``loss_fn`` in one
    call of ``batch * num_directions`` samples (``loss_fn`` must accept that, as
    ``tail_loss_fn``'s does); otherwise one call per direction. ``generator``: a CPU
    ``torch.Generator`` for reproducible directions. Returns 0.0, as the reference does, when
    either side has (numerically) no variance.
    """
    _check_same_shape("perturbation_correlation", h, a)
    if num_directions < 2:
        raise ValueError(f"num_directions must be at least 2, got {num_directions}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    batch = h.shape[0]
    v = _unit_directions(h.shape, num_directions, generator, h)  # (M, batch, ...)
    base = loss_fn(h).reshape(batch)
    # Predicted change: first-order Taylor term with the credit signal as the gradient.
    pred = epsilon * (_flat(a).unsqueeze(0) * v.reshape(num_directions, batch, -1)).sum(-1)
    if vectorize:
        perturbed = (h.unsqueeze(0) + epsilon * v).reshape(num_directions * batch, *h.shape[1:])
        true = loss_fn(perturbed).reshape(num_directions, batch) - base.unsqueeze(0)
    else:
        true = torch.stack([loss_fn(h + epsilon * v[m]).reshape(batch) - base
                            for m in range(num_directions)])
    pred_np = pred.double().cpu().numpy().ravel()
    true_np = true.double().cpu().numpy().ravel()
    if not (np.isfinite(pred_np).all() and np.isfinite(true_np).all()):
        raise ValueError("perturbation_correlation: non-finite loss or credit signal; "
                         "the model or the signal has diverged")
    if pred_np.std() < 1e-12 or true_np.std() < 1e-12:
        return 0.0
    return float(pearsonr(pred_np, true_np)[0])


@torch.no_grad()
def nudging_test(h: torch.Tensor, a: torch.Tensor, loss_fn: LossFn, *, eta: float = 0.01,
                 rms_eps: float = RMS_EPS) -> float:
    """Nudging test Delta_l: the mean loss change when ``h`` moves against the credit signal,
    ``h - eta * a / (rms(a) + rms_eps)`` (rms over each sample's features).

    ``h``, ``a``: ``(batch, ...)``; ``loss_fn``: ``h -> (batch,)`` per-sample loss or a
    scalar. Negative means that following the signal lowers the loss, as the true gradient
    does for a small enough ``eta``.
    """
    _check_same_shape("nudging_test", h, a)
    fa = _flat(a)
    rms = fa.pow(2).mean(dim=1, keepdim=True).sqrt() + rms_eps
    nudged = h - eta * (fa / rms).reshape(h.shape)
    return float((loss_fn(nudged) - loss_fn(h)).mean().item())


def parameter_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every named parameter, for :func:`feature_drift` later."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _as_params(what: str, params: Mapping[str, torch.Tensor] | nn.Module) -> Mapping[str, torch.Tensor]:
    if isinstance(params, nn.Module):
        return {name: p.detach() for name, p in params.named_parameters()}
    if isinstance(params, Mapping):
        return params
    raise ValueError(f"{what} must be a dict of name -> tensor or an nn.Module, "
                     f"got {type(params).__name__}")


def feature_drift(init: Mapping[str, torch.Tensor] | nn.Module,
                  final: Mapping[str, torch.Tensor] | nn.Module, *,
                  min_norm: float = 1e-8) -> dict[str, float]:
    """Relative drift of each parameter, ``||W_final - W_init||_F / ||W_init||_F``.

    ``init``, ``final``: dicts of name -> tensor (e.g. :func:`parameter_snapshot`) or modules.
    Only names present in both are reported; parameters whose initial norm is at most
    ``min_norm`` (zero-initialised biases) are skipped, as in the reference, since their
    relative drift is undefined.
    """
    p0, p1 = _as_params("init", init), _as_params("final", final)
    drifts: dict[str, float] = {}
    for name, w0 in p0.items():
        if name not in p1:
            continue
        w1 = p1[name]
        if w0.shape != w1.shape:
            raise ValueError(f"feature_drift: parameter {name!r} changed shape, "
                             f"{tuple(w0.shape)} -> {tuple(w1.shape)}")
        w0d, w1d = w0.detach().double(), w1.detach().to(w0.device).double()
        norm0 = float(torch.linalg.vector_norm(w0d))
        if norm0 > min_norm:
            drifts[name] = float(torch.linalg.vector_norm(w1d - w0d)) / norm0
    return drifts


@torch.no_grad()
def bridge_residual(value_net: Callable[..., torch.Tensor],
                    target_value_net: Callable[..., torch.Tensor],
                    h: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                    h_next_samples: Sequence[torch.Tensor] | torch.Tensor,
                    t_next: torch.Tensor, lam: float = 0.1) -> float:
    """Bridge residual R_l of a learned value function.

    ``V = value_net(h, t, s)`` ``(batch,)`` should equal the soft-min over K noisy next states
    of the target network, ``-lam * log(mean_k exp(-V_bar(h_next_k, t_next, s) / lam))``.
    Returns the batch mean of ``|V - target|``.

    ``h``: ``(batch, d)``; ``t``, ``t_next``: ``(batch,)``; ``s``: ``(batch, s_dim)``;
    ``h_next_samples``: K tensors ``(batch, d)`` or one ``(K, batch, d)`` tensor;
    ``lam``: the soft-min temperature (> 0).
    """
    if not lam > 0:
        raise ValueError(f"lam (soft-min temperature) must be positive, got {lam}")
    samples = list(h_next_samples)
    if not samples:
        raise ValueError("h_next_samples is empty; pass at least one next-state sample")
    v_now = value_net(h, t, s).reshape(-1)
    v_next = torch.stack([target_value_net(hn, t_next, s).reshape(-1) for hn in samples], dim=-1)
    k = v_next.shape[-1]
    # log-mean-exp for the soft-min, stable for any scale of V.
    target = -lam * (torch.logsumexp(-v_next / lam, dim=-1) - math.log(k))
    return float((v_now - target).abs().mean().item())
