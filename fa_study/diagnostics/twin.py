"""The BP twin: the same network, every layer on plain backpropagation.

A diagnostic's reference gradient ``g_l = dL/dh_l`` must be the one plain BP computes for the
trained weights. A network trained by a feedback rule often runs its own backward: the
package's ``LocalLinear`` / ``LocalConv2d``, or another library's feedback layers (subclasses of
``nn.Linear`` / ``nn.Conv2d`` whose forward calls an ``autograd.Function`` of their own).
:func:`bp_twin` builds the network BP would differentiate:

* the model itself, when every layer is a plain torch layer and its graph holds no custom
  ``autograd.Function``;
* otherwise a copy that *shares* every parameter and buffer with the model, in which every
  subclass of ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` that overrides the forward is
  replaced by the plain layer holding the same weight and bias.

A custom ``autograd.Function`` still in the twin's graph (a module the package cannot vouch
for) is named in :attr:`Twin.unvouched`, and every report shows it; pass ``twin=`` your own
module to any reading when you know better. The twin's logits are checked against the model's
on the probe batch: a replaced layer whose forward was not the plain layer's is an error.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .modes import eval_mode
from .taps import _logits

PLAIN_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
TWIN_RTOL = 1e-4  # the twin's logits must match the model's to this relative tolerance


@dataclass
class Twin:
    """A BP twin and what was done to build it."""

    model: nn.Module  # the network plain BP differentiates
    replaced: tuple[str, ...] = ()  # "name (Type)" of every layer put on plain BP
    unvouched: tuple[str, ...] = ()  # modules / Functions with a backward of their own left in
    given: bool = False  # passed by the user
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.given:
            text = "the twin passed by the user"
        elif not self.replaced:
            text = "the model itself (plain torch layers only)"
        else:
            shown = ", ".join(self.replaced[:6]) + (f", ... ({len(self.replaced) - 6} more)"
                                                    if len(self.replaced) > 6 else "")
            text = f"a copy with {len(self.replaced)} layer(s) on plain BP: {shown}"
        if self.unvouched:
            text += ("; NOT vouched for (custom backward left in the twin): "
                     + ", ".join(self.unvouched))
        return text


def _plain_base(m: nn.Module) -> type[nn.Module] | None:
    """The plain torch layer ``m`` subclasses while overriding its forward, or None."""
    for base in PLAIN_LAYERS:
        if isinstance(m, base) and type(m) is not base:
            own = type(m).forward is not base.forward
            if base is not nn.Linear:
                own = own or type(m)._conv_forward is not base._conv_forward
            return base if own else None
    return None


def _plain_copy(m: nn.Module, base: type[nn.Module]) -> nn.Module:
    """A plain ``base`` layer holding ``m``'s weight and bias (the same tensors)."""
    has_bias = getattr(m, "bias", None) is not None
    if base is nn.Linear:
        new = nn.Linear(m.in_features, m.out_features, bias=has_bias, device="meta")
    else:
        new = base(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                   dilation=m.dilation, groups=m.groups, bias=has_bias, padding_mode=m.padding_mode,
                   device="meta")
    for key in ("weight", "bias") if has_bias else ("weight",):
        value = getattr(m, key)
        if not isinstance(value, nn.Parameter):  # a layer keeping its weight as a plain tensor: keep it so
            delattr(new, key)
        setattr(new, key, value)
    new.train(m.training)
    return new


def _custom_nodes(logits: torch.Tensor) -> list:
    """Every custom ``autograd.Function`` node in the graph of ``logits``."""
    seen, stack, found = set(), [logits.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            found.append(node)
        stack.extend(n for n, _ in node.next_functions)
    return found


def _unvouched(model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the modules (else the Functions) whose custom backward is in ``model``'s graph."""
    owner: dict[int, str] = {}
    handles = []
    for name, m in model.named_modules():
        def hook(mod, args, out, name=name):
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                owner.setdefault(id(out.grad_fn), name)
        handles.append(m.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            out = model(x.detach().requires_grad_(x.is_floating_point()))
            if not isinstance(out, torch.Tensor):
                # This is the first forward most readings run: a forward returning a tuple was
                # an AttributeError on ``tuple.grad_fn`` here; raise the readings' ValueError
                # (a tensor of another shape is left to the reading, whose loss_fn may take it).
                _logits(out, model)
            nodes = _custom_nodes(out)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(f"{owner[id(n)]} ({type(n).__name__})" if owner.get(id(n)) else type(n).__name__
                              for n in nodes))


def bp_twin(model: nn.Module, x: torch.Tensor | None = None, *, twin: nn.Module | None = None) -> Twin:
    """The :class:`Twin` of ``model`` (see the module doc).

    ``x``: a batch the model accepts; with it the twin's graph is searched for custom
    backward nodes and its logits are checked against the model's (two samples, eval mode).
    ``twin``: a module of your own to use as the BP network (it is not checked).
    """

    if twin is not None:
        if not isinstance(twin, nn.Module):
            raise ValueError(f"twin must be an nn.Module (the network plain BP differentiates), "
                             f"got {type(twin).__name__}")
        return Twin(twin, given=True)
    swaps = [(name, m, base) for name, m in model.named_modules() if (base := _plain_base(m)) is not None]
    if swaps:
        # share every parameter and buffer: the twin reads the trained weights, never copies
        memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        net = copy.deepcopy(model, memo)
        for name, m, base in swaps:
            parent_name, _, attr = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, attr, _plain_copy(net.get_submodule(name), base))
    else:
        net = model
    result = Twin(net, tuple(f"{n} ({type(m).__name__})" for n, m, _ in swaps))
    if x is None:
        return result
    probe = x[:2]
    with eval_mode(model), eval_mode(net):
        result.unvouched = tuple(_unvouched(net, probe))
        if swaps:
            with torch.no_grad():
                a, b = model(probe), net(probe)
            scale = float(a.abs().max().clamp_min(1)) if isinstance(a, torch.Tensor) else 1.0
            if isinstance(a, torch.Tensor) and not torch.allclose(a, b, rtol=TWIN_RTOL,
                                                                  atol=TWIN_RTOL * scale):
                raise ValueError(
                    "the BP twin computes other logits than the model (max |difference| "
                    f"{float((a - b).abs().max()):.3g}): a replaced layer's forward is not the plain "
                    f"layer's ({', '.join(result.replaced)}); pass twin= a module of your own")
    return result
