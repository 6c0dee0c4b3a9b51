"""The two signals every reading compares, taken at the hidden states ``h_0 .. h_L``.

* :func:`bp_reference`: ``g_l = dL/dh_l`` by autograd through the BP twin
  (:func:`fa_study.diagnostics.bp_twin`): the gradient plain backpropagation computes for the
  trained weights, for any architecture, because it differentiates the model's own forward.
* :func:`model_credit`: what the model's *own* backward delivers at ``h_l`` (a feedback
  layer's ``grad_out . B``, a DFA projection, or BP's gradient for a plain model).

``L`` is the mean cross-entropy over the batch, so ``||g_l||`` scales as 1/N with the batch
size N; reports record N.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_batch
from .modes import buffers_preserved, eval_mode  # noqa: F401 - part of this module's API
from .taps import HiddenStates, find_hidden_states
from .twin import Twin, bp_twin

COSINE_EPS = 1e-30  # every cosine's floor: the true cosine even when ||g|| is 1e-12


def per_sample_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """``(batch,)``: ``<a_i, b_i> / max(||a_i|| ||b_i||, eps)`` over all features of sample i.

    ``a``, ``b``: ``(batch, ...)`` of equal shapes. ``eps = 1e-8`` is the reference's clamp,
    which shrinks the cosine towards 0 once ``||a|| ||b||`` falls below it (diagnostic D2
    exists because of it); the default reads the true cosine."""
    if a.shape != b.shape or a.dim() < 2:
        raise ValueError(f"per_sample_cosine: expected two (batch, ...) tensors of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    fa, fb = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    norms = torch.linalg.vector_norm(fa, dim=1) * torch.linalg.vector_norm(fb, dim=1)
    return (fa * fb).sum(dim=1) / norms.clamp_min(eps)


def sync_modes(model: nn.Module, other: nn.Module) -> None:
    """Give every module of ``other`` the train/eval flag of the module of ``model`` with the
    same name (a twin copy runs in the mode the model is in)."""
    if other is model:
        return
    flags = {n: m.training for n, m in model.named_modules()}
    for n, m in other.named_modules():
        if n in flags:
            m.training = flags[n]


def hidden_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hidden: HiddenStates, *,
                     on_logits: Callable[[torch.Tensor], None] | None = None
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """``([h_0..h_L], [dCE/dh_l], logits)`` by autograd through ``model`` *as it is* (its own
    backward), all detached. ``on_logits(logits)`` runs before the backward (a DFA layer
    captures the output error there). No ``.grad`` is touched; BatchNorm statistics are
    restored."""
    check_batch(x, y)
    with torch.enable_grad(), buffers_preserved(model):
        logits, hiddens = hidden.run(model, x)
        labels = hidden.labels()
        for l, h in enumerate(hiddens):
            if not h.requires_grad:
                raise ValueError(f"h_{l} ({labels[l]}) has no gradient: it does not depend on the "
                                 "input through differentiable operations; name another module")
        if on_logits is not None:
            on_logits(logits)
        grads = torch.autograd.grad(F.cross_entropy(logits, y), hiddens, allow_unused=True)
    grads = [torch.zeros_like(h) if g is None else g for g, h in zip(grads, hiddens)]
    return [t.detach() for t in hiddens], [g.detach() for g in grads], logits.detach()


def prepare(model: nn.Module, x: torch.Tensor, *, hidden=None, pool="auto",
            twin: nn.Module | Twin | None = None) -> tuple[HiddenStates, Twin]:
    """The hidden states and the BP twin every reading of ``model`` uses (found once)."""
    states = find_hidden_states(model, x, hidden=hidden, pool=pool)
    tw = twin if isinstance(twin, Twin) else bp_twin(model, x, twin=twin)
    return states, tw


def bp_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, hidden=None,
                 pool="auto", twin: nn.Module | Twin | None = None
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The BP reference at every hidden state: ``(hiddens, grads, logits)``, detached.

    ``g_l = torch.autograd.grad(mean CE, h_l)`` through the BP twin, in the mode the model is
    in (use :func:`eval_mode` for BatchNorm models). ``x``: a batch the model accepts; ``y``:
    ``(batch,)`` int64 labels; ``hidden``, ``pool``: see
    :func:`fa_study.diagnostics.find_hidden_states`; ``twin``: a module of your own, or a
    :class:`Twin` from :func:`prepare`. Shapes: ``h_l`` and ``g_l`` as the state
    (``(batch, d)``, ``(batch, T, d)``, ``(batch, C, H, W)``), logits ``(batch, classes)``.
    """
    states, tw = prepare(model, x, hidden=hidden, pool=pool, twin=twin)
    sync_modes(model, tw.model)
    return hidden_gradients(tw.model, x, y, states)


def model_credit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, hidden=None,
                 pool="auto") -> list[torch.Tensor]:
    """``[a_0 .. a_L]``: what the model's own backward delivers at each hidden state (the
    output error is captured for the package's DFA layers), each shaped like ``h_l``."""
    from ..feedback import capture_output_error, needs_output_error

    states = find_hidden_states(model, x, hidden=hidden, pool=pool)
    on_logits = (lambda logits: capture_output_error(model, logits)) if needs_output_error(model) else None
    return hidden_gradients(model, x, y, states, on_logits=on_logits)[1]


def check_signals(name: str, credit: Sequence[torch.Tensor], hiddens: Sequence[torch.Tensor]) -> None:
    """ValueError when a rule's credit does not match the hidden states in number or shape."""
    if len(credit) != len(hiddens):
        raise ValueError(f"rule {name!r}: credit returned {len(credit)} signals; expected "
                         f"{len(hiddens)} (a_0..a_L, one per hidden state)")
    for l, (a, h) in enumerate(zip(credit, hiddens)):
        if tuple(a.shape) != tuple(h.shape):
            raise ValueError(f"rule {name!r}: credit signal a_{l} has shape {tuple(a.shape)}, "
                             f"but h_{l} has shape {tuple(h.shape)}")
