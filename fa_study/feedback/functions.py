"""Autograd Functions: ordinary forward, a backward whose input gradient is not BP's.

Every Function here computes exactly BP's weight and bias gradients from the ``grad_out`` it
receives; only the gradient passed to the input differs:

* ``linear_with_feedback`` / ``conv2d_with_feedback``: through a feedback ``B`` of W's shape in
  place of W. ``feedback=None`` selects sign symmetry, ``B = sign(W) * ||W||_F /
  sqrt(numel(W))``, computed in the backward from the current W.
* ``linear_with_direct_feedback`` / ``conv2d_with_direct_feedback``: ``grad_x = project(x,
  grad_out)``, a callable the layer's rule supplies (DFA: a projection of the output error,
  which ignores ``grad_out``).

Gradients are computed only for inputs that need them (``ctx.needs_input_grad``), and the
backward casts its operands to the incoming gradient's dtype so the Functions work under
autocast as BP's kernels do.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd import Function


def sign_feedback(weight: torch.Tensor) -> torch.Tensor:
    """Sign-symmetric feedback ``sign(W) * ||W||_F / sqrt(numel(W))``, same shape as W.

    The rescaling gives ``||B||_F == ||W||_F`` (for W without zero entries), avoiding the
    blow-up of the plain sign matrix.
    """
    return torch.sign(weight) * (weight.norm() / math.sqrt(weight.numel()))


def _resolve(weight: torch.Tensor, feedback: torch.Tensor | None) -> torch.Tensor:
    return sign_feedback(weight) if feedback is None else feedback


def _linear_param_grads(ctx, x: torch.Tensor, grad_out: torch.Tensor):
    """BP's weight and bias gradients of ``y = x W^T + b`` (each only when needed)."""
    need_w, need_b = ctx.needs_input_grad[1:3]
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    grad_w = g2.t() @ x.reshape(-1, x.shape[-1]).to(grad_out.dtype) if need_w else None
    grad_b = g2.sum(dim=0) if need_b and ctx.has_bias else None
    return grad_w, grad_b


class LinearFeedbackFn(Function):
    """``y = x W^T + b`` with ``grad_x = grad_y B``; x is ``(..., in)``, W and B ``(out, in)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback):  # type: ignore[override]
        ctx.save_for_backward(x, weight, feedback)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, feedback = ctx.saved_tensors
        grad_x = grad_out @ _resolve(weight, feedback).to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        return (grad_x, *_linear_param_grads(ctx, x, grad_out), None)


class Conv2dFeedbackFn(Function):
    """``F.conv2d`` whose input gradient is the transposed convolution with B instead of W.

    ``padding`` must be a pair of ints: the module pads the input itself for string paddings
    and non-zero padding modes.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, stride, padding, dilation, groups):  # type: ignore[override]
        ctx.save_for_backward(x, weight, feedback)
        ctx.conf = (list(stride), list(padding), list(dilation), int(groups))
        ctx.bias_sizes = None if bias is None else [bias.shape[0]]
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, feedback = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.bias_sizes is not None
        dt = grad_out.dtype
        xd = x.to(dt)
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, xd, _resolve(weight, feedback).to(dt), None, stride, padding,
                dilation, False, [0, 0], groups, [True, False, False])[0]
        if need_w or need_b:
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_out, xd, weight.to(dt), ctx.bias_sizes if need_b else None, stride,
                padding, dilation, False, [0, 0], groups, [False, need_w, need_b])
        return grad_x, grad_w, grad_b, None, None, None, None, None


class LinearDirectFn(Function):
    """``y = x W^T + b`` with ``grad_x = project(x, grad_out)``; BP's weight and bias gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, project):  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.has_bias = bias is not None
        ctx.project = project
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        grad_x = ctx.project(x, grad_out) if ctx.needs_input_grad[0] else None
        return (grad_x, *_linear_param_grads(ctx, x, grad_out), None)


class Conv2dDirectFn(Function):
    """``F.conv2d`` with ``grad_x = project(x, grad_out)``; BP's weight and bias gradients.
    ``padding`` must be a pair of ints (the module pads string paddings / padding modes)."""

    @staticmethod
    def forward(ctx, x, weight, bias, project, stride, padding, dilation, groups):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.conf = (list(stride), list(padding), list(dilation), int(groups))
        ctx.bias_sizes = None if bias is None else [bias.shape[0]]
        ctx.project = project
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.bias_sizes is not None
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = ctx.project(x, grad_out)
        if need_w or need_b:
            dt = grad_out.dtype
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_out, x.to(dt), weight.to(dt), ctx.bias_sizes if need_b else None, stride,
                padding, dilation, False, [0, 0], groups, [False, need_w, need_b])
        return grad_x, grad_w, grad_b, None, None, None, None, None


def conv2d_input_grad(x: torch.Tensor, kernel: torch.Tensor, grad_out: torch.Tensor, stride,
                      padding, dilation, groups: int = 1) -> torch.Tensor:
    """The transposed convolution of ``grad_out`` with ``kernel`` onto ``x``'s shape (what
    ``torch.nn.grad.conv2d_input`` computes), in ``grad_out``'s dtype."""
    dt = grad_out.dtype
    return torch.ops.aten.convolution_backward(
        grad_out, x.to(dt), kernel.to(dt), None, list(stride), list(padding), list(dilation),
        False, [0, 0], int(groups), [True, False, False])[0]


def linear_with_direct_feedback(x: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor | None, project) -> torch.Tensor:
    """Linear map of ``x`` ``(..., in)`` whose input gradient is ``project(x, grad_out)``."""
    return LinearDirectFn.apply(x, weight, bias, project)


def conv2d_with_direct_feedback(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                project, stride, padding, dilation, groups: int) -> torch.Tensor:
    """2-d convolution whose input gradient is ``project(x, grad_out)`` (``x`` as padded)."""
    return Conv2dDirectFn.apply(x, weight, bias, project, stride, padding, dilation, groups)


def linear_with_feedback(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         feedback: torch.Tensor | None) -> torch.Tensor:
    """Linear map of ``x`` ``(..., in)`` -> ``(..., out)`` whose input gradient uses ``feedback``
    ``(out, in)`` (``None``: sign symmetry). Weight and bias gradients are BP's."""
    return LinearFeedbackFn.apply(x, weight, bias, feedback)


def conv2d_with_feedback(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         feedback: torch.Tensor | None, stride, padding, dilation,
                         groups: int) -> torch.Tensor:
    """2-d convolution of ``x`` ``(batch, C_in, H, W)`` whose input gradient uses ``feedback``
    (W's shape; ``None``: sign symmetry). Weight and bias gradients are BP's."""
    return Conv2dFeedbackFn.apply(x, weight, bias, feedback, stride, padding, dilation, groups)
