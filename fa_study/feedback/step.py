"""The one post-backward call a trainer makes, for every rule: :func:`feedback_step`."""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from .base import LocalRuleMixin
from .dfa import clear_block_errors
from .options import check_decay


def local_layers(model: nn.Module) -> list[tuple[str, LocalRuleMixin]]:
    """``(name, layer)`` for every LocalLinear / LocalConv2d in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LocalRuleMixin)]


def needs_output_error(model: nn.Module) -> bool:
    """Whether :func:`feedback_step` needs ``e=`` (the model has a ``dfa`` layer)."""
    return any(m.method == "dfa" for _, m in local_layers(model))


def has_feedback_step(model: nn.Module) -> bool:
    """Whether any layer of ``model`` has a post-backward update (a trainer may skip the call
    otherwise; calling it anyway is harmless)."""
    return any(
        m.method in ("dfa", "dfa_block", "kolen_pollack", "weight_mirror")
        or (m.method == "fa" and m.rule.fa_grape)
        for _, m in local_layers(model))


@torch.no_grad()
def feedback_step(model: nn.Module, *, e: torch.Tensor | None = None, lr_b: float | None = None,
                  decay: float | None = None,
                  generator: torch.Generator | None = None) -> dict[str, int]:
    """Apply every local layer's post-backward update. Call after ``loss.backward()`` and
    before ``optimizer.step()``, whatever the rules are::

        out = model(x); out.retain_grad()          # retain_grad only needed for 'dfa'
        loss = loss_fn(out, y); loss.backward()
        feedback_step(model, e=out.grad)           # e may be None when no layer runs 'dfa'
        optimizer.step(); optimizer.zero_grad()

    * ``dfa``: weight/bias gradients overwritten with the projection of ``e`` ``(..., target_dim)``;
    * ``dfa_block``: the same from the error recorded at the layer's block output;
    * ``kolen_pollack``, ``weight_mirror``, ``fa`` + GrAPE: B updated;
    * ``bp``, ``fa``, ``sign_sym``: nothing to do.

    ``lr_b`` / ``decay`` override every layer's ``rule.lr_b`` / ``rule.b_decay`` for this call;
    ``generator`` drives the noise of the weight mirror and GrAPE (it must live on the model's
    device). Returns how many layers each rule updated, e.g. ``{"kolen_pollack": 3}``.
    """
    check_decay(decay)
    counts: Counter[str] = Counter()
    for _, layer in local_layers(model):
        if layer.feedback_step(e=e, lr_b=lr_b, decay=decay, generator=generator):
            counts[layer.method + ("+grape" if layer.method == "fa" else "")] += 1
    clear_block_errors(model)
    return dict(counts)
