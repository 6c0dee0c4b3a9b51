"""Direct feedback alignment: feedback matrices, the output-error capture, block-error taps.

``dfa`` (Nøkland 2016, as biotorch implements it): in the backward of every ``dfa`` layer the
input gradient is ``e @ B_dfa`` (Linear; a transposed convolution for Conv2d), where ``e`` is
``dL/d(model output)``; autograd applies ``f'`` on the way to the layer below, whose update is
the published ``((e B^T) * f'(a))^T x``. ``e`` must be known *during* the backward, so after the
forward and before ``loss.backward()`` call :func:`capture_output_error`::

    out = model(x)
    capture_output_error(model, out)          # records dL/d(out) before any layer's backward
    loss_fn(out, y).backward()

Call :func:`initialize_dfa_targets` once (or ``convert(..., dfa_target_dim=...)``) to draw the
matrices ``B_dfa`` ``(target_dim, in_features)`` (conv: ``(target_dim, C_in, kh, kw)``).

``dfa_ungated`` (seed 000): the layer's backward is BP's; after it, :func:`apply_dfa_update` or
:func:`fa_study.feedback.feedback_step` overwrites the weight gradient with
``(e B_dfa^T)^T x`` (``B_dfa`` ``(out, target_dim)``), not gated by any ``f'``; the output layer
gets ``B_dfa = I`` by default. It reads ``e`` from :func:`capture_output_error` too, or from an
explicit ``feedback_step(model, e=...)``.

``dfa_block``: every ``LocalLinear(method="dfa_block")`` inside block ``l`` receives the error
at that block's output (whatever gradient reached it: BP's, or a block-level rule's credit
signal) through ``B_dfa_block`` ``(out, d_block)``, averaged over rows.
:func:`initialize_dfa_block_targets` draws the matrices and installs a forward hook on each
block that records the gradient at its output during ``loss.backward()``, so
``feedback_step(model)`` needs no argument; :func:`apply_dfa_block_update` takes an explicit
error instead.

A layer called several times in one forward keeps only its last input for the post-backward
rules (and a block only its last output's gradient).
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import check_float, check_int
from .base import LocalRuleMixin
from .strategies import DFA_INIT_STD, DFABlock, OutputError, UngatedDFA


def _layers(model: nn.Module, kind: type) -> list[LocalRuleMixin]:
    return [m for m in model.modules()
            if isinstance(m, LocalRuleMixin) and isinstance(m.strategy, kind)]


def _error_layers(model: nn.Module) -> list[tuple[str, LocalRuleMixin]]:
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, LocalRuleMixin) and m.strategy.needs_output_error]


def share_output_error(model: nn.Module) -> OutputError | None:
    """Give every layer of ``model`` that needs the output error one shared holder."""
    layers = _error_layers(model)
    if not layers:
        return None
    holder = OutputError()
    for _, layer in layers:
        layer._output_error = holder
    return holder


def capture_output_error(model: nn.Module, output: torch.Tensor):
    """Record ``dL/d output`` for the model's layers that need it (``dfa``, ``dfa_ungated``).

    Call after the forward and before ``loss.backward()``: a tensor hook on ``output`` stores
    its gradient in the holder shared by those layers before any of their backwards runs (the
    gradient of a tensor is complete before the function that produced it runs backward).
    Each layer accepts only an error captured after its own forward, so a forgotten call is a
    RuntimeError in the backward, never a stale error. Harmless for models without such
    layers (it does nothing and returns None); otherwise returns the hook's handle.
    """
    layers = _error_layers(model)
    if not layers:
        return None
    if not isinstance(output, torch.Tensor) or not output.requires_grad:
        raise ValueError("capture_output_error needs the model's output tensor with gradients "
                         "(the forward must run with gradients enabled)")
    holders = list({id(m._output_error): m._output_error for _, m in layers}.values())
    stamps = [(h, h.new_capture()) for h in holders]

    def record(grad: torch.Tensor) -> None:
        for h, k in stamps:
            h.record(k, grad)

    return output.register_hook(record)


@torch.no_grad()
def initialize_dfa_targets(model: nn.Module, target_dim: int,
                           init_std: float | None = DFA_INIT_STD,
                           generator: torch.Generator | None = None,
                           output_layer: str | None = "auto") -> dict[str, str]:
    """Draw the direct feedback matrices ``B_dfa ~ N(0, init_std^2)`` of every ``dfa`` and
    ``dfa_ungated`` layer, for an output error of size ``target_dim``.

    * ``dfa``: ``B_dfa`` ``(target_dim, in_features)`` (conv: ``(target_dim, C_in, kh, kw)``),
      carrying the error to the layer's *input*. The output layer needs no special matrix (its
      weight gradient is BP's already); ``output_layer`` concerns only ``dfa_ungated``.
    * ``dfa_ungated``: ``B_dfa`` ``(out, target_dim)``. ``output_layer``: the layer that
      produces the model's output receives the error itself (``B_dfa = I``, so its update is its
      exact BP gradient), as in Nøkland's DFA; a random mixing of the error there can point its
      update uphill. ``"auto"`` picks the last ``dfa_ungated`` layer in registration order whose
      ``out_features == target_dim``; a module name picks that layer; ``None`` gives every layer
      a random matrix (the reference code).

    ``init_std``: default the reference's 0.02; ``None``: the RMS of each layer's weight.
    Draws are float32 on the CPU from ``generator`` (moved to the layers' devices). Call once
    after building the model and moving it to its device; the layers then share one
    output-error holder. Returns ``{layer name: "identity" or "random"}``.
    """
    check_int("target_dim", target_dim, 1)
    check_float("init_std", init_std, 0.0, low_open=True, none_ok=True,
                none_means="the RMS of each layer's weight")
    named = [(n, m) for n, m in model.named_modules()
             if isinstance(m, LocalRuleMixin) and m.strategy.takes_target]
    ungated = [(n, m) for n, m in named if isinstance(m.strategy, UngatedDFA)]
    if output_layer == "auto":
        fits = [n for n, m in ungated if m.out_features == target_dim]
        output_layer = fits[-1] if fits else None
    elif output_layer is not None:
        names = [n for n, _ in ungated]
        if output_layer not in names:
            raise ValueError(f"output_layer {output_layer!r} is not a 'dfa_ungated' layer of the "
                             f"model; allowed values: 'auto', None"
                             f"{''.join(', ' + repr(n) for n in names)}")
    kinds = {name: layer.strategy.init_target(layer, target_dim, init_std, generator,
                                              identity=name == output_layer)
             for name, layer in named}
    share_output_error(model)
    return kinds


def apply_dfa_update(model: nn.Module, e: torch.Tensor) -> int:
    """Overwrite every ``dfa_ungated`` layer's weight/bias gradient with its projection of
    ``e`` ``(..., target_dim)``. Call after ``loss.backward()``; returns the number of layers.
    (``dfa`` layers need nothing after the backward.)"""
    layers = _layers(model, UngatedDFA)
    for layer in layers:
        layer.strategy.apply(layer, e)
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
    check_int("d_block", d_block, 1)
    init_std = check_float("init_std", init_std, 0.0, low_open=True)
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
        for m in _layers(block, DFABlock):
            m._block_tap = tap
            owner[id(m)] = i
    assignment: dict[str, int | None] = {}
    for name, m in model.named_modules():
        if isinstance(m, LocalRuleMixin) and isinstance(m.strategy, DFABlock):
            if id(m) not in owner:
                m._block_tap = None
            m.strategy.init_block_target(m, d_block if id(m) in owner else None, init_std,
                                         generator)
            assignment[name] = owner.get(id(m))
    return assignment


def apply_dfa_block_update(block: nn.Module, block_output_error: torch.Tensor) -> int:
    """Overwrite the gradients of every ``dfa_block`` layer in ``block`` from an explicit block
    output error ``(..., d_block)``: ``grad_W = (err B_dfa_block^T)^T x / N``. Returns the
    number of layers."""
    layers = _layers(block, DFABlock)
    for layer in layers:
        layer.strategy.apply(layer, block_output_error)
    return len(layers)


def clear_block_errors(model: nn.Module) -> None:
    """Forget the block errors recorded by the taps (after they have been used)."""
    for m in model.modules():
        for h in m._forward_hooks.values():
            if isinstance(h, BlockErrorTap):
                h.error = None
