"""Alignment read-outs for any converted model, one row per local layer.

* :func:`feedback_alignment`: the angle between the feedback matrix B and W, and ``||B||/||W||``
  (what the backward uses instead of W, and how far it is from W).
* :func:`update_alignment`: the more telling one: the cosine between the weight update the rule
  actually applies on a batch (``.grad`` after its backward *and* its post-backward update) and
  BP's gradient on the same batch, from a BP twin of the model with the same weights.

Both return pandas DataFrames and synchronise with the device once.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import pandas as pd
import torch
from torch import nn

from .dfa import capture_output_error
from .step import feedback_step, local_layers, needs_output_error
from .strategies import Backprop

_NAN = float("nan")


def _cos(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    """Cosine of two same-shape tensors as a float64 0-d tensor (NaN if either is missing/zero)."""
    if a is None or b is None:
        return torch.tensor(_NAN, dtype=torch.float64)
    a = a.detach().double().flatten()
    b = b.detach().double().flatten().to(a.device)
    den = a.norm() * b.norm()
    return torch.where(den > 0, a @ b / den.clamp_min(1e-300), torch.full_like(den, _NAN))


def _norm(a: torch.Tensor | None) -> torch.Tensor:
    if a is None:
        return torch.tensor(_NAN, dtype=torch.float64)
    return a.detach().double().norm()


def _to_floats(values: list[torch.Tensor]) -> list[float]:
    if not values:
        return []
    # Stack on the device the values live on, so a column costs one transfer.
    dev = next((v.device for v in values if v.device.type != "cpu"), torch.device("cpu"))
    return torch.stack([v.to(dev) for v in values]).tolist()


def bp_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every local layer switched to ``bp`` and no gradients:
    the same network trained by backpropagation."""
    twin = copy.deepcopy(model)
    for _, layer in local_layers(twin):
        layer.strategy = Backprop(Backprop.restrict(layer.rule))
    twin.zero_grad(set_to_none=True)
    return twin


def feedback_alignment(model: nn.Module) -> pd.DataFrame:
    """Per local layer: ``angle_BW_deg`` (angle between the feedback matrix and W, degrees) and
    ``norm_ratio_BW`` (``||B||_F / ||W||_F``), B being :meth:`feedback_matrix` (for ``brsf`` the
    latest draw); NaN for the direct rules (``dfa``, ``dfa_ungated``, ``dfa_block``), whose
    feedback does not pass through a W-shaped matrix."""
    layers = local_layers(model)
    coss, ratios = [], []
    for _, layer in layers:
        B = layer.feedback_matrix()
        coss.append(_cos(B, layer.weight))
        ratios.append(_norm(B) / _norm(layer.weight) if B is not None
                      else torch.tensor(_NAN, dtype=torch.float64))
    cos_vals, ratio_vals = _to_floats(coss), _to_floats(ratios)
    return pd.DataFrame({
        "layer": [n for n, _ in layers],
        "type": [type(m).__name__ for _, m in layers],
        "method": [m.method for _, m in layers],
        "angle_BW_deg": [math.degrees(math.acos(max(-1.0, min(1.0, c)))) if c == c else _NAN
                         for c in cos_vals],
        "norm_ratio_BW": ratio_vals,
    })


def update_alignment(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     x: torch.Tensor, y: torch.Tensor, **step_kwargs) -> pd.DataFrame:
    """Cosine between each local layer's applied weight update and BP's gradient on ``(x, y)``.

    ``loss_fn(model(x), y)`` must return a scalar. The rule runs on a deep copy (forward,
    :func:`capture_output_error` when a layer needs the output error, backward,
    :func:`feedback_step` with ``**step_kwargs``); BP runs on :func:`bp_twin`. Both passes see
    the same random state (dropout masks), the global RNG is left as it was, and ``model`` is
    not modified (neither its weights, its B, nor its ``.grad``; a ``brsf`` redraw happens on
    the copy).

    Columns: ``layer, type, method, cos_update_bp`` (1 = the rule applies BP's direction),
    ``update_norm, bp_grad_norm, angle_BW_deg, norm_ratio_BW`` (the latter two as in
    :func:`feedback_alignment`, before the step).
    """
    rule = copy.deepcopy(model)
    rule.zero_grad(set_to_none=True)
    bp = bp_twin(model)
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        cpu_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
        out = rule(x)
        if needs_output_error(rule):
            capture_output_error(rule, out)
        loss_fn(out, y).backward()
        feedback_step(rule, **step_kwargs)
        torch.set_rng_state(cpu_state)
        for d, s in zip(devices, cuda_states):
            torch.cuda.set_rng_state(s, d)
        loss_fn(bp(x), y).backward()

    layers = local_layers(rule)
    bp_layers = local_layers(bp)
    cos = [_cos(lr.weight.grad, lb.weight.grad) for (_, lr), (_, lb) in zip(layers, bp_layers)]
    un = [_norm(lr.weight.grad) for _, lr in layers]
    bn = [_norm(lb.weight.grad) for _, lb in bp_layers]
    table = feedback_alignment(model)
    table.insert(3, "cos_update_bp", _to_floats(cos))
    table.insert(4, "update_norm", _to_floats(un))
    table.insert(5, "bp_grad_norm", _to_floats(bn))
    return table
