"""The errors direct feedback reads: the model's output error and the error at a block's output.

``layer_dfa`` (Nøkland 2016, as biotorch implements it) projects ``e = dL/d(model output)``
to a layer's input *during* the backward, so ``e`` must be recorded before any layer's backward
runs: after the forward and before ``loss.backward()`` call :func:`capture_output_error`::

    out = model(x)
    capture_output_error(model, out)          # records dL/d(out) before any layer's backward
    loss_fn(out, y).backward()

``layer_dfa_block`` reads the error at the output of each layer's block: :func:`tap_blocks`
installs a forward hook on each block that records that gradient during the backward.
:func:`write_projection_grads` is the post-backward overwrite both ungated forms share. A layer
called several times in one forward keeps only its last input (and a block only its last
output's gradient).
"""
from __future__ import annotations

import torch
from torch import nn


class OutputError:
    """Holder of ``dL/d(model output)``, shared by the layers of a model that need it.

    Every capture is numbered (``captures``) and the recorded error remembers its capture; a
    layer notes ``captures`` at its forward, so it accepts only an error captured *after* its
    forward, never a stale one from an earlier batch.
    """

    def __init__(self):
        self.error: torch.Tensor | None = None
        self.captures = 0
        self.error_capture = 0

    def record(self, capture: int, grad: torch.Tensor) -> None:
        self.error = grad.detach()
        self.error_capture = capture

    def get(self, since: int | None, who: str) -> torch.Tensor:
        """The error captured after the forward that noted ``since``, or RuntimeError."""
        if since is None or self.error is None or self.error_capture <= since:
            raise RuntimeError(
                f"{who} needs the output error dL/d(output) of this batch: call "
                "fa_study.feedback.capture_output_error(model, output) after the forward and "
                "before loss.backward() (with the output in the loss's graph)")
        return self.error

    def __deepcopy__(self, memo) -> "OutputError":
        # a copied model gets its own empty holder (shared by its layers via memo)
        new = OutputError()
        memo[id(self)] = new
        return new


def _error_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if getattr(getattr(m, "rule", None), "needs_output_error", False)
            and hasattr(m, "_output_error")]


def share_output_error(model: nn.Module) -> OutputError | None:
    """Give every layer of ``model`` that needs the output error one shared holder."""
    layers = _error_layers(model)
    holder = OutputError() if layers else None
    for layer in layers:
        layer._output_error = holder
    return holder


def capture_output_error(model: nn.Module, output: torch.Tensor):
    """Record ``dL/d output`` for the model's layers that need it (``layer_dfa``).

    A tensor hook on ``output`` stores its gradient in the holder shared by those layers
    before any of their backwards runs (a tensor's gradient is complete before the function
    that produced it runs backward). A forgotten call is a RuntimeError in the backward, never
    a stale error. Does nothing (returns None) for a model without such layers; otherwise
    returns the hook's handle.
    """
    layers = _error_layers(model)
    if not layers:
        return None
    if not isinstance(output, torch.Tensor) or not output.requires_grad:
        raise ValueError("capture_output_error needs the model's output tensor with gradients "
                         "(the forward must run with gradients enabled)")
    holders = list({id(m._output_error): m._output_error for m in layers}.values())
    for h in holders:
        h.captures += 1
    stamps = [(h, h.captures) for h in holders]

    def record(grad: torch.Tensor) -> None:
        for h, k in stamps:
            h.record(k, grad)

    return output.register_hook(record)


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
        # a copied model gets its own tap (shared by its block hook and its layers via memo)
        new = BlockErrorTap(self.index)
        memo[id(self)] = new
        return new


def tap_blocks(blocks) -> dict[int, BlockErrorTap]:
    """Install (or replace) a :class:`BlockErrorTap` on every block; ``{id(module): tap}`` for
    every module inside a block, so a layer finds the tap of its own block."""
    owner: dict[int, BlockErrorTap] = {}
    for i, block in enumerate(blocks):
        hooks = block._forward_hooks
        for key in [k for k, h in hooks.items() if isinstance(h, BlockErrorTap)]:
            del hooks[key]
        tap = BlockErrorTap(i)
        block.register_forward_hook(tap)
        owner.update({id(m): tap for m in block.modules()})
    return owner


def clear_block_errors(model: nn.Module) -> None:
    """Forget the block errors recorded by the taps (after they have been used)."""
    for m in model.modules():
        for h in m._forward_hooks.values():
            if isinstance(h, BlockErrorTap):
                h.error = None


def _match_rows(delta: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pair the rows of a projected error ``(*lead_e, out)`` with an input ``(*lead_x, in)``.

    Equal leading shapes pair row by row. When the input has extra trailing positions (tokens:
    x ``(batch, T, in)`` with a per-sample error ``(batch, out)``), every position of a sample
    receives the sample's error: the same as pairing the error with the input summed over those
    positions. Returns ``(delta (N, out), x (N, in), positions per row)``.
    """
    lead_e, lead_x = delta.shape[:-1], x.shape[:-1]
    if lead_e == lead_x:
        return delta.reshape(-1, delta.shape[-1]), x.reshape(-1, x.shape[-1]), 1
    if len(lead_e) < len(lead_x) and lead_x[:len(lead_e)] == lead_e:
        xs = x.reshape(*lead_e, -1, x.shape[-1])
        return delta.reshape(-1, delta.shape[-1]), xs.sum(dim=-2).reshape(-1, x.shape[-1]), xs.shape[-2]
    raise ValueError(
        f"error of shape {tuple(delta.shape[:-1])} + (dim,) does not match the layer input "
        f"{tuple(x.shape)}: its leading dimensions must equal the input's or be a prefix of them")


def _write_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.copy_(grad)


@torch.no_grad()
def write_projection_grads(layer: nn.Module, signal: torch.Tensor, M: torch.Tensor, *,
                           mean: bool) -> None:
    """Overwrite ``layer``'s weight and bias gradients by ``delta = signal M^T`` paired with the
    layer's cached input: ``grad_W = delta^T x``, ``grad_b = sum delta`` (divided by the number
    of rows when ``mean``). ``signal`` ``(..., k)``, ``M`` ``(out, k)``."""
    if signal.shape[-1] != M.shape[1]:
        raise ValueError(f"the error has last dimension {signal.shape[-1]} but the layer's "
                         f"feedback matrix {tuple(M.shape)} was drawn for {M.shape[1]}")
    x, _ = layer._take_cached_input()
    d2, x2, reps = _match_rows(signal.detach().to(M.dtype) @ M.t(), x.to(M.dtype))
    gw, gb = d2.t() @ x2, d2.sum(dim=0) * reps
    if mean:  # over every position, as if the error had been repeated along them
        n = max(d2.shape[0] * reps, 1)
        gw, gb = gw / n, gb / n
    _write_grad(layer.weight, gw)
    if layer.bias is not None:
        _write_grad(layer.bias, gb)
