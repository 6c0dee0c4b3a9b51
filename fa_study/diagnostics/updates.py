"""Per weight: the update a network's own backward applies against BP's gradient, and the
angle between a layer's feedback matrix and its weight.

* :func:`update_alignment`: on one batch, each weight's update from the model's own backward
  (or from a package rule's ``fill_grads``) against BP's gradient through the BP twin: cosine
  and norms. It runs on a copy, so neither the model, its ``.grad`` nor its feedback change.
* :func:`feedback_angles`: for every layer holding a feedback matrix the package can find (its
  own ``LocalLinear`` / ``LocalConv2d``, or a foreign layer with a second tensor of W's shape,
  such as biotorch's ``weight_backward``), the angle between B and W and ``||B|| / ||W||``.

Neither ever returns an empty table: a model with nothing to read is a ``ValueError``.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_batch
from .signals import buffers_preserved, sync_modes
from .twin import Twin, bp_twin

UPDATE_COLUMNS = ("param", "cos_update_bp", "update_norm", "bp_grad_norm", "angle_BW_deg",
                  "norm_ratio_BW", "by_construction")
FEEDBACK_NAMES = ("weight_backward", "feedback", "B", "weight_fa", "backward_weight")  # looked at first


def feedback_matrix(layer: nn.Module) -> tuple[str, torch.Tensor] | None:
    """``(attribute, B)`` of a layer's feedback matrix, or None.

    The package's local layers answer themselves (``feedback_matrix()``; None for direct
    rules); for any other layer, a parameter, buffer or tensor attribute other than ``weight``
    with W's shape (names in :data:`FEEDBACK_NAMES` first)."""
    if callable(getattr(layer, "feedback_matrix", None)):
        B = layer.feedback_matrix()
        return None if B is None else ("feedback_matrix()", B)
    W = getattr(layer, "weight", None)
    if not isinstance(W, torch.Tensor) or W.dim() < 2:
        return None
    tensors = dict([*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)])
    tensors.update({n: t for n, t in vars(layer).items() if isinstance(t, torch.Tensor)})
    names = [n for n in FEEDBACK_NAMES if n in tensors] + sorted(set(tensors) - set(FEEDBACK_NAMES))
    for n in names:
        t = tensors[n]
        if n != "weight" and t is not W and isinstance(t, torch.Tensor) and t.shape == W.shape:
            return n, t
    return None


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten().to(a.device)
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else math.nan


def feedback_angles(model: nn.Module) -> pd.DataFrame:
    """One row per layer with a feedback matrix: ``layer``, ``type``, ``feedback`` (where B was
    found), ``param`` (the weight's name), ``angle_BW_deg`` (angle between B and W, degrees),
    ``norm_ratio_BW`` (``||B||_F / ||W||_F``). ValueError when no layer holds one."""
    rows = []
    for name, m in model.named_modules():
        found = feedback_matrix(m)
        if found is None:
            continue
        where, B = found
        W = m.weight
        c = cosine(B, W)
        rows.append({"layer": name, "type": type(m).__name__, "feedback": where,
                     "param": f"{name}.weight" if name else "weight",
                     "angle_BW_deg": math.degrees(math.acos(max(-1.0, min(1.0, c)))) if c == c else math.nan,
                     "norm_ratio_BW": float(B.detach().double().norm() / W.detach().double().norm())})
    if not rows:
        raise ValueError(f"no layer of {type(model).__name__} holds a feedback matrix fa_study can "
                         "find (a fa_study local layer, or a tensor of W's shape beside a layer's "
                         "weight, e.g. 'weight_backward'); for a direct rule (DFA) use "
                         "update_alignment and direction_quality instead")
    return pd.DataFrame(rows)


def own_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rule=None,
               loss_fn: Callable = F.cross_entropy) -> nn.Module:
    """A copy of ``model`` whose ``.grad`` holds the update its learning rule applies on
    ``(x, y)``: ``rule.fill_grads`` for a package rule, else the model's own backward of
    ``loss_fn(model(x), y)`` (with the package's output-error capture and post-backward feedback
    step where its layers need them)."""
    from ..feedback import capture_output_error, feedback_step, has_feedback_step, needs_output_error

    if rule is not None:
        net, rule_copy = copy.deepcopy((model, rule))
        for p in net.parameters():
            p.grad = None
        rule_copy.fill_grads(net, x, y)
        return net
    net = copy.deepcopy(model)
    net.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out = net(x)
        if needs_output_error(net):
            capture_output_error(net, out)
        loss_fn(out, y).backward()
    if has_feedback_step(net):
        feedback_step(net)
    return net


def update_alignment(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rule=None, *,
                     loss_fn: Callable = F.cross_entropy, twin: nn.Module | Twin | None = None
                     ) -> pd.DataFrame:
    """Per weight, how the update the network's learning rule applies on ``(x, y)`` compares
    with BP's gradient on the same batch.

    ``rule``: a package rule (its ``fill_grads`` on a copy); ``None`` (default): the model's own
    backward, whatever layers it holds. BP's gradient is autograd of ``loss_fn`` through the BP
    twin (:func:`bp_twin`, or ``twin=``). Both passes see the same random state (dropout masks)
    and run in the model's current mode; the global RNG is left as it was.

    Rows: every trainable weight with two or more dimensions present in the twin, in model
    order. Columns: ``param``, ``cos_update_bp`` (1 = BP's direction), ``update_norm``,
    ``bp_grad_norm``, ``angle_BW_deg`` and ``norm_ratio_BW`` (its layer's feedback matrix
    against W, before the step; NaN where none is found), ``by_construction``: True when the
    model's own backward was compared with itself (no layer runs a backward of its own, so the
    twin is the model and a cosine of 1 is no finding). ValueError when no weight is read.
    """
    check_batch(x, y)
    tw = twin if isinstance(twin, Twin) else bp_twin(model, x, twin=twin)
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    # each pass in a fork of the random state: both see the same (dropout masks), and the
    # global state is left as it was
    with torch.random.fork_rng(devices=devices):
        net = own_update(model, x, y, rule, loss_fn)
    with torch.random.fork_rng(devices=devices):
        bp = tw.model
        sync_modes(model, bp)
        params = {n: p for n, p in bp.named_parameters() if p.requires_grad}
        with torch.enable_grad(), buffers_preserved(model):
            grads = torch.autograd.grad(loss_fn(bp(x), y), list(params.values()), allow_unused=True)
    bp_grads = dict(zip(params, grads))
    same = rule is None and tw.model is model  # BP's backward compared with itself
    try:
        angles = {r.param: (r.angle_BW_deg, r.norm_ratio_BW)
                  for r in feedback_angles(model).itertuples(index=False)}
    except ValueError:
        angles = {}
    rows = []
    for name, p in net.named_parameters():
        if p.dim() < 2 or not p.requires_grad or name not in bp_grads:
            continue
        u, g = p.grad, bp_grads[name]
        cos, un, gn = (math.nan,) * 3 if u is None or g is None else \
            (cosine(u, g), float(u.double().norm()), float(g.double().norm()))
        a, r = angles.get(name, (math.nan, math.nan))
        rows.append({"param": name, "cos_update_bp": cos, "update_norm": un, "bp_grad_norm": gn,
                     "angle_BW_deg": a, "norm_ratio_BW": r, "by_construction": same})
    if not rows:
        raise ValueError(f"{type(model).__name__} has no trainable weight (2+ dimensions) that its BP "
                         "twin also holds: nothing to compare")
    return pd.DataFrame(rows, columns=list(UPDATE_COLUMNS))
