"""``convert``: put every ``nn.Linear`` / ``nn.Conv2d`` of a model on a local learning rule."""
from __future__ import annotations

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import parametrize

from .base import LocalRuleMixin
from .conv import LocalConv2d
from .dfa import initialize_dfa_block_targets, initialize_dfa_targets, share_output_error
from .linear import LocalLinear
from .options import RuleOptions
from .strategies import CONV_METHODS, METHODS, rule_class

REPORT_COLUMNS = ("name", "type", "action", "method", "reason")
MHA_REASON = ("nn.MultiheadAttention reads in_proj_weight and out_proj.weight functionally; a "
              "replaced out_proj would be bypassed silently, so the module stays on BP")


def _row(name: str, module: nn.Module, action: str, method: str | None, reason: str) -> dict:
    return {"name": name or "<model>", "type": type(module).__name__, "action": action,
            "method": method, "reason": reason}


def _unconvertible(module: nn.Module) -> str | None:
    """Why an ``nn.Linear`` / ``nn.Conv2d`` cannot be swapped safely, or None."""
    if isinstance(module.weight, nn.parameter.UninitializedParameter):
        return "lazy module not initialised yet; run one forward before converting"
    if parametrize.is_parametrized(module) or not isinstance(module.weight, nn.Parameter):
        return "parametrized weight (weight or spectral norm); left on BP"
    if type(module) not in (nn.Linear, nn.Conv2d):
        return (f"subclass of {'nn.Linear' if isinstance(module, nn.Linear) else 'nn.Conv2d'} "
                "with possibly its own forward; left as it is")
    if module._forward_hooks or module._forward_pre_hooks:
        return "has forward hooks, which a replacement would drop; left on BP"
    return None


def convert(model: nn.Module, method: str, *, conv_method: str | None = None,
            generator: torch.Generator | None = None, dfa_target_dim: int | None = None,
            dfa_block_dim: int | None = None, blocks=None, dfa_output_layer: str | None = "auto",
            **rule_options) -> tuple[nn.Module, pd.DataFrame]:
    """Replace every ``nn.Linear`` by a ``LocalLinear`` and every ``nn.Conv2d`` by a
    ``LocalConv2d`` running ``method``, in place; return ``(model, report)``.

    The new layers *share* the old layers' weight and bias Parameters, so outputs are
    unchanged, weight tying survives and an optimizer built before the call stays valid. Other
    modules (LayerNorm, BatchNorm, Embedding, ...) stay on BP. Left alone and reported:
    ``nn.MultiheadAttention`` with its children (it uses its weights functionally), subclasses
    of Linear/Conv2d (their forward may differ), lazy and parametrized layers, and layers
    with forward hooks (the hooks would be dropped).

    method: one of :data:`METHODS`.
    conv_method: rule for the convolutions, one of :data:`CONV_METHODS`; default ``method``.
        Required when ``method`` has no convolutional form (``dfa_ungated``, ``dfa_block``) and
        the model has a Conv2d: pass ``conv_method="bp"`` to keep them on BP knowingly.
        Switches the convolutions' rule cannot run (``fa_grape`` for a non-``fa`` conv rule)
        are turned off for them.
    generator: CPU generator for every B drawn (default: the global RNG).
    dfa_target_dim / dfa_block_dim, blocks, dfa_output_layer: when given, call
        :func:`initialize_dfa_targets` (with ``output_layer=dfa_output_layer``) /
        :func:`initialize_dfa_block_targets` on the converted model.
    **rule_options: :class:`RuleOptions` fields (``init_std``, ``fa_init_mode``, ``fa_grape``,
        ``lr_b``, ``b_decay``, ``mirror_sigma``, ...); an unknown one is a ValueError listing
        them.

    The converted layers that need the output error (``dfa``, ``dfa_ungated``) share one
    holder, filled by :func:`fa_study.feedback.capture_output_error`.

    report: a DataFrame with one row per converted layer, per module left alone and per other
    module holding parameters (``action`` = ``converted`` / ``skipped`` / ``kept_bp``), with
    columns ``name, type, action, method, reason``.
    """
    rule = rule_class(method, METHODS, "method")
    if conv_method is not None:
        rule_class(conv_method, CONV_METHODS, "conv_method")
    options = RuleOptions(**rule_options)
    rule.check_options(options)
    conv_rule = conv_method or (method if rule.has_conv_form else None)
    conv_options = rule_class(conv_rule).restrict(options) if conv_rule is not None else None

    # Check before touching anything, so a refused call leaves the model as it was.
    if conv_rule is None and any(type(m) is nn.Conv2d for m in _visible_modules(model)):
        raise ValueError(f"method {method!r} has no Conv2d form and the model has Conv2d "
                         f"layers: pass conv_method= one of {', '.join(map(repr, CONV_METHODS))} "
                         "(conv_method='bp' keeps them on BP)")

    rows: list[dict] = []
    done: dict[int, tuple[nn.Module, str]] = {}
    seen: set[int] = set()

    def swap(name: str, module: nn.Module) -> nn.Module | None:
        if id(module) in done:
            new, first = done[id(module)]
            rows.append(_row(name, module, "converted", new.method, f"same module as {first}"))
            return new
        if isinstance(module, nn.MultiheadAttention):
            rows.append(_row(name, module, "skipped", None, MHA_REASON))
            for sub, m in module.named_modules():
                if sub and isinstance(m, (nn.Linear, nn.Conv2d)):
                    rows.append(_row(f"{name}.{sub}" if name else sub, m, "skipped", None,
                                     "inside nn.MultiheadAttention"))
            return None
        if isinstance(module, LocalRuleMixin):
            rows.append(_row(name, module, "skipped", module.method, "already a local layer"))
            return None
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            why = _unconvertible(module)
            if why is not None:
                rows.append(_row(name, module, "skipped", None, why))
                return None
            if isinstance(module, nn.Linear):
                new = LocalLinear.from_linear(module, method, options, generator)
            else:
                new = LocalConv2d.from_conv(module, conv_rule, conv_options, generator)
            done[id(module)] = (new, name or "<model>")
            rows.append(_row(name, module, "converted", new.method,
                             f"-> {type(new).__name__}"))
            return new
        if id(module) in seen:
            return None  # a container reached twice: its children were handled the first time
        seen.add(id(module))
        if any(True for _ in module.parameters(recurse=False)):
            rows.append(_row(name, module, "kept_bp", None, "not a Linear/Conv2d; trained by BP"))
        # _modules, not named_children(): the latter hides a module's second occurrence.
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            new = swap(f"{name}.{child_name}" if name else child_name, child)
            if new is not None:
                setattr(module, child_name, new)
        return None

    root = swap("", model)
    if root is not None:
        model = root
    share_output_error(model)
    if dfa_target_dim is not None:
        initialize_dfa_targets(model, dfa_target_dim, generator=generator,
                               output_layer=dfa_output_layer)
    if dfa_block_dim is not None:
        initialize_dfa_block_targets(model, dfa_block_dim, blocks=blocks, generator=generator)
    return model, pd.DataFrame(rows, columns=list(REPORT_COLUMNS))


def _visible_modules(model: nn.Module):
    """Modules ``convert`` would look at (everything outside MultiheadAttention)."""
    stack = [model]
    while stack:
        m = stack.pop()
        yield m
        if not isinstance(m, nn.MultiheadAttention):
            stack.extend(m.children())
