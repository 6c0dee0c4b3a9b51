"""Swap the ``nn.Linear`` / ``nn.Conv2d`` of any model for local layers, in place, with a report.

:func:`swap_layers` is the mechanism behind :func:`fa_study.rules.convert`: it walks the model,
replaces each plain Linear / Conv2d by what ``make`` returns (a LocalLinear / LocalConv2d that
shares the old layer's Parameters) and reports every module it converted, left alone, or kept
on BP. Left alone: ``nn.MultiheadAttention`` with its children (it uses its weights
functionally, so a replaced ``out_proj`` would be bypassed), subclasses of Linear / Conv2d
(their forward may differ), lazy and parametrized layers, and layers with forward hooks.
"""
from __future__ import annotations

from typing import Callable

import pandas as pd
from torch import nn
from torch.nn.utils import parametrize

from .layers import LocalLayer

REPORT_COLUMNS = ("name", "type", "action", "method", "reason")
MHA_REASON = ("nn.MultiheadAttention reads in_proj_weight and out_proj.weight functionally; a "
              "replaced out_proj would be bypassed silently, so the module stays on BP")


def unconvertible(module: nn.Module) -> str | None:
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


def visible_layers(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the plain Linear / Conv2d that :func:`swap_layers` would replace, in
    module order (works on a model on the meta device); ``prefix``: the name of ``model``."""
    if isinstance(model, nn.MultiheadAttention):
        return []
    if isinstance(model, (nn.Linear, nn.Conv2d)) and unconvertible(model) is None:
        return [(prefix, model)]
    return [layer for n, child in model.named_children()
            for layer in visible_layers(child, f"{prefix}.{n}" if prefix else n)]


class _Swapper:
    """One walk of :func:`swap_layers`: the rows of its report and the modules already seen."""

    def __init__(self, make: Callable[[nn.Module], nn.Module | None]):
        self.make, self.rows = make, []
        self.done: dict[int, tuple[nn.Module, str]] = {}
        self.seen: set[int] = set()

    def row(self, name: str, module: nn.Module, action: str, method, reason: str) -> None:
        self.rows.append({"name": name or "<model>", "type": type(module).__name__,
                          "action": action, "method": method, "reason": reason})

    def layer(self, name: str, module: nn.Module) -> nn.Module | None:
        why = unconvertible(module)
        if why is not None:
            self.row(name, module, "skipped", None, why)
            return None
        new = self.make(module)
        if new is None:
            self.row(name, module, "kept_bp", None, "the rule leaves this layer type on BP")
            return None
        self.done[id(module)] = (new, name or "<model>")
        self.row(name, module, "converted", new.method, f"-> {type(new).__name__}")
        return new

    def visit(self, name: str, module: nn.Module) -> nn.Module | None:
        if id(module) in self.done:
            new, first = self.done[id(module)]
            self.row(name, module, "converted", new.method, f"same module as {first}")
            return new
        if isinstance(module, nn.MultiheadAttention):
            self.row(name, module, "skipped", None, MHA_REASON)
            for sub, m in module.named_modules():
                if sub and isinstance(m, (nn.Linear, nn.Conv2d)):
                    self.row(f"{name}.{sub}" if name else sub, m, "skipped", None,
                             "inside nn.MultiheadAttention")
            return None
        if isinstance(module, LocalLayer):
            self.row(name, module, "skipped", module.method, "already a local layer")
            return None
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            return self.layer(name, module)
        if id(module) in self.seen:
            return None  # a container reached twice: its children were handled the first time
        self.seen.add(id(module))
        if any(True for _ in module.parameters(recurse=False)):
            self.row(name, module, "kept_bp", None, "not a Linear/Conv2d; trained by BP")
        # _modules, not named_children(): the latter hides a module's second occurrence
        for child_name, child in list(module._modules.items()):
            if child is not None:
                new = self.visit(f"{name}.{child_name}" if name else child_name, child)
                if new is not None:
                    setattr(module, child_name, new)
        return None


def swap_layers(model: nn.Module, make: Callable[[nn.Module], nn.Module | None]
                ) -> tuple[nn.Module, pd.DataFrame]:
    """Replace every convertible ``nn.Linear`` / ``nn.Conv2d`` by ``make(module)`` (None keeps
    it), in place; a module reached twice is replaced by the same new layer (tying survives).
    Returns ``(model, report)``: one row per layer converted, module left alone and other module
    holding parameters, columns ``name, type, action, method, reason``."""
    walk = _Swapper(make)
    root = walk.visit("", model)
    return (model if root is None else root), pd.DataFrame(walk.rows, columns=list(REPORT_COLUMNS))
