"""Direct feedback alignment helpers: feedback matrices, block-error taps, gradient overwrites.

``dfa``: every ``LocalLinear(method="dfa")`` receives the output error ``e`` (``dL/d output``,
``(..., target_dim)``) through its own random ``B_dfa`` ``(out, target_dim)``:
``grad_W = (e B_dfa^T)^T x``; the output layer gets ``B_dfa = I`` (its BP gradient). Call :func:`initialize_dfa_targets` once, then after each
``loss.backward()`` either :func:`apply_dfa_update` or the general
:func:`fa_study.feedback.feedback_step` with ``e=``.

``dfa_block``: every ``LocalLinear(method="dfa_block")`` inside block ``l`` receives the error
at that block's output (whatever gradient reached it: BP's, or a block-level rule's credit
signal) through ``B_dfa_block`` ``(out, d_block)``, averaged over rows.
:func:`initialize_dfa_block_targets` draws the matrices and installs a forward hook on each
block that records the gradient at its output during ``loss.backward()``, so
``feedback_step(model)`` needs no argument; :func:`apply_dfa_block_update` takes an explicit
error instead.

A layer called several times in one forward keeps only its last input (and a block only its
last output's gradient).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import LocalRuleMixin

DFA_INIT_STD = 0.02  # the reference's scale for the direct feedback matrices


def _layers(model: nn.Module, method: str) -> list[LocalRuleMixin]:
    return [m for m in model.modules() if isinstance(m, LocalRuleMixin) and m.method == method]


def _draw(rows: int, cols: int, init_std: float, generator: torch.Generator | None,
          like: torch.Tensor) -> torch.Tensor:
    # Drawn on the CPU so one seed gives the same matrices on every device.
    return (torch.randn(rows, cols, generator=generator) * init_std).to(like.device, like.dtype)


@torch.no_grad()
def initialize_dfa_targets(model: nn.Module, target_dim: int, init_std: float = DFA_INIT_STD,
                           generator: torch.Generator | None = None,
                           output_layer: str | None = "auto") -> dict[str, str]:
    """Give every ``dfa`` layer a ``B_dfa ~ N(0, init_std^2)`` of shape ``(out, target_dim)``.

    output_layer: the layer that produces the model's output receives the error itself
        (``B_dfa = I``, so its update is its exact BP gradient), as in Nokland's DFA; a random
        mixing of the error there can point its update uphill. ``"auto"`` picks the last
        ``dfa`` layer in registration order whose ``out_features == target_dim``; a module name
        picks that layer; ``None`` gives every layer a random matrix (the reference code).

    Call once after building the model and moving it to its device. Returns
    ``{layer name: "identity" or "random"}``.
    """
    if target_dim < 1:
        raise ValueError(f"target_dim must be >= 1, got {target_dim!r}")
    named = [(n, m) for n, m in model.named_modules()
             if isinstance(m, LocalRuleMixin) and m.method == "dfa"]
    if output_layer == "auto":
        fits = [n for n, m in named if m.out_features == target_dim]
        output_layer = fits[-1] if fits else None
    elif output_layer is not None:
        names = [n for n, _ in named]
        if output_layer not in names:
            raise ValueError(f"output_layer {output_layer!r} is not a 'dfa' layer of the model; "
                             f"allowed values: 'auto', None, {', '.join(map(repr, names))}")
    kinds: dict[str, str] = {}
    for name, layer in named:
        if name == output_layer:
            if layer.out_features != target_dim:
                raise ValueError(f"output_layer {name!r} has {layer.out_features} outputs, "
                                 f"not target_dim={target_dim}")
            layer.B_dfa = torch.eye(target_dim, device=layer.weight.device,
                                    dtype=layer.weight.dtype)
            kinds[name] = "identity"
        else:
            layer.B_dfa = _draw(layer.out_features, target_dim, init_std, generator,
                                layer.weight)
            kinds[name] = "random"
    return kinds


def apply_dfa_update(model: nn.Module, e: torch.Tensor) -> int:
    """Overwrite every ``dfa`` layer's weight/bias gradient with its projection of ``e``
    ``(..., target_dim)``. Call after ``loss.backward()``; returns the number of layers."""
    layers = _layers(model, "dfa")
    for layer in layers:
        layer.dfa_compute_grad(e)
    return len(layers)


class BlockErrorTap:
    """Forward hook on a block that records ``dL/d(block output)`` during the backward."""

    def __init__(self, index: int):
        self.index = index
        self.error: torch.Tensor | None = None

    def __call__(self, module: nn.Module, inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._capture)

    def _capture(self, grad: torch.Tensor) -> None:
        self.error = grad.detach()

    def __deepcopy__(self, memo) -> "BlockErrorTap":
        # A copied model gets its own tap (shared between its block hook and its layers via
        # memo), never the original's recorded error.
        new = BlockErrorTap(self.index)
        memo[id(self)] = new
        return new


def _remove_taps(block: nn.Module) -> None:
    hooks = block._forward_hooks
    for key in [k for k, h in hooks.items() if isinstance(h, BlockErrorTap)]:
        del hooks[key]


@torch.no_grad()
def initialize_dfa_block_targets(model: nn.Module, d_block: int, blocks=None,
                                 init_std: float = DFA_INIT_STD,
                                 generator: torch.Generator | None = None) -> dict[str, int | None]:
    """Give every ``dfa_block`` layer a ``B_dfa_block ~ N(0, init_std^2)`` ``(out, d_block)`` and
    tap each block's output gradient.

    ``blocks``: the blocks (an iterable of modules), default ``model.blocks``. A ``dfa_block``
    layer outside every block (an embedding projection, the head) has no block error; it keeps
    the BP gradient of its ordinary backward. Returns ``{layer name: block index or None}``.
    Calling it again replaces the matrices and the taps.
    """
    if d_block < 1:
        raise ValueError(f"d_block must be >= 1, got {d_block!r}")
    if blocks is None:
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise ValueError("the model has no .blocks; pass blocks= (the block modules)")
    blocks = list(blocks)
    owner: dict[int, int] = {}
    for i, block in enumerate(blocks):
        _remove_taps(block)
        tap = BlockErrorTap(i)
        block.register_forward_hook(tap)
        for m in block.modules():
            if isinstance(m, LocalRuleMixin) and m.method == "dfa_block":
                m._block_tap = tap
                owner[id(m)] = i
    assignment: dict[str, int | None] = {}
    for name, m in model.named_modules():
        if isinstance(m, LocalRuleMixin) and m.method == "dfa_block":
            m._dfa_block_assigned = True
            if id(m) in owner:
                m.B_dfa_block = _draw(m.out_features, d_block, init_std, generator, m.weight)
            else:
                m._block_tap = None
                m.B_dfa_block = None
            assignment[name] = owner.get(id(m))
    return assignment


def apply_dfa_block_update(block: nn.Module, block_output_error: torch.Tensor) -> int:
    """Overwrite the gradients of every ``dfa_block`` layer in ``block`` from an explicit block
    output error ``(..., d_block)``: ``grad_W = (err B_dfa_block^T)^T x / N``. Returns the
    number of layers."""
    layers = _layers(block, "dfa_block")
    for layer in layers:
        layer.dfa_block_compute_grad(block_output_error)
    return len(layers)


def clear_block_errors(model: nn.Module) -> None:
    """Forget the block errors recorded by the taps (after they have been used)."""
    for m in model.modules():
        for h in m._forward_hooks.values():
            if isinstance(h, BlockErrorTap):
                h.error = None
