"""The one post-backward call a trainer makes, for every layer rule: :func:`feedback_step`."""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from .dfa import clear_block_errors
from .layers import LocalLayer


def local_layers(model: nn.Module) -> list[tuple[str, LocalLayer]]:
    """``(name, layer)`` for every LocalLinear / LocalConv2d in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LocalLayer)]


def needs_output_error(model: nn.Module) -> bool:
    """Whether a layer of ``model`` needs the output error (gated ``layer_dfa``): then call
    :func:`fa_study.feedback.capture_output_error` after each forward, before the backward
    (calling it anyway is harmless)."""
    return any(m.rule.needs_output_error for _, m in local_layers(model))


def has_feedback_step(model: nn.Module) -> bool:
    """Whether any layer of ``model`` has a post-backward update (a trainer may skip the call
    otherwise; calling it anyway is harmless)."""
    return any(m.rule.has_after_backward for _, m in local_layers(model))


@torch.no_grad()
def feedback_step(model: nn.Module, *, e: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> dict[str, int]:
    """Apply every local layer's post-backward update. Call after ``loss.backward()`` and
    before ``optimizer.step()``, whatever the rules are::

        out = model(x)
        capture_output_error(model, out)        # does nothing unless a layer needs e
        loss = loss_fn(out, y); loss.backward()
        feedback_step(model)
        optimizer.step(); optimizer.zero_grad()

    ``e``: the output error ``(..., target_dim)`` for the rules that read it after the backward
    (default: the captured one); ``generator`` drives the noise of the weight mirror and the
    GrAPE probes (on the model's device). Returns how many layers each rule updated, e.g.
    ``{"kolen_pollack": 3}``.
    """
    counts: Counter[str] = Counter()
    for _, layer in local_layers(model):
        if layer.rule.after_backward(layer, e=e, generator=generator):
            counts[layer.method] += 1
    clear_block_errors(model)
    return dict(counts)
