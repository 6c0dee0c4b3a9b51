"""The one post-backward call a trainer makes, for every rule: :func:`feedback_step`."""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from .base import LocalRuleMixin
from .dfa import clear_block_errors
from .options import check_decay, check_lr_b


def local_layers(model: nn.Module) -> list[tuple[str, LocalRuleMixin]]:
    """``(name, layer)`` for every LocalLinear / LocalConv2d in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LocalRuleMixin)]


def needs_output_error(model: nn.Module) -> bool:
    """Whether a layer of ``model`` needs the output error (``dfa``, ``dfa_ungated``): then
    call :func:`fa_study.feedback.capture_output_error` after each forward, before the
    backward (calling it anyway is harmless)."""
    return any(m.strategy.needs_output_error for _, m in local_layers(model))


def has_feedback_step(model: nn.Module) -> bool:
    """Whether any layer of ``model`` has a post-backward update (a trainer may skip the call
    otherwise; calling it anyway is harmless)."""
    return any(m.strategy.has_step for _, m in local_layers(model))


@torch.no_grad()
def feedback_step(model: nn.Module, *, e: torch.Tensor | None = None, lr_b: float | None = None,
                  decay: float | None = None,
                  generator: torch.Generator | None = None) -> dict[str, int]:
    """Apply every local layer's post-backward update. Call after ``loss.backward()`` and
    before ``optimizer.step()``, whatever the rules are::

        out = model(x)
        capture_output_error(model, out)        # does nothing unless a layer needs e
        loss = loss_fn(out, y); loss.backward()
        feedback_step(model)
        optimizer.step(); optimizer.zero_grad()

    * ``dfa_ungated``: weight/bias gradients overwritten with the projection of the output
      error (the captured one, or ``e`` ``(..., target_dim)`` when given);
    * ``dfa_block``: the same from the error recorded at the layer's block output;
    * ``kolen_pollack``, ``weight_mirror``, ``fa`` + GrAPE: B updated;
    * ``bp``, ``fa``, ``sign_sym``, ``frsf``, ``brsf``, ``dfa``: nothing to do (``dfa``'s
      work happens in the backward).

    ``lr_b`` / ``decay`` override every layer's ``rule.lr_b`` / ``rule.b_decay`` for this call;
    ``generator`` drives the noise of the weight mirror and GrAPE (it must live on the model's
    device). Returns how many layers each rule updated, e.g. ``{"kolen_pollack": 3}``.
    """
    lr_b = check_lr_b(lr_b)
    decay = check_decay(decay, "decay")
    counts: Counter[str] = Counter()
    for _, layer in local_layers(model):
        if layer.strategy.step(layer, e=e, lr_b=lr_b, decay=decay, generator=generator):
            counts[layer.strategy.label] += 1
    clear_block_errors(model)
    return dict(counts)
