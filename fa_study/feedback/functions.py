"""Autograd Function: ordinary forward, a backward whose input gradient is not BP's.

:class:`FeedbackFn` computes ``F.linear`` (``conf=None``) or ``F.conv2d`` (``conf = (stride,
padding, dilation, groups)``) and exactly BP's weight and bias gradients from the ``grad_out``
it receives; only the gradient passed to the input differs:

* ``linear_with_feedback`` / ``conv2d_with_feedback``: through a feedback ``B`` of W's shape in
  place of W. ``feedback=None`` selects sign symmetry, ``B = sign(W) * ||W||_F /
  sqrt(numel(W))``, computed in the backward from the current W.
* with ``project`` (the local layers' direct feedback): ``grad_x = project(x, grad_out)``, a
  callable the layer's rule supplies (DFA: a projection of the output error, which ignores
  ``grad_out``).

Gradients are computed only for inputs that need them (``ctx.needs_input_grad``), and the
backward casts its operands to the incoming gradient's dtype so the Function works under
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


def conv_backward(grad_out, x, kernel, bias_sizes, conf, mask):
    """``aten.convolution_backward`` of a conv2d with ``conf = [stride, padding, dilation,
    groups]`` (lists), its operands cast to ``grad_out``'s dtype. With ``mask=[True, False,
    False]`` its first entry is the transposed convolution of ``grad_out`` with ``kernel`` onto
    ``x``'s shape (what ``torch.nn.grad.conv2d_input`` computes)."""
    dt = grad_out.dtype
    stride, padding, dilation, groups = conf
    return torch.ops.aten.convolution_backward(grad_out, x.to(dt), kernel.to(dt), bias_sizes, stride,
                                               padding, dilation, False, [0, 0], groups, mask)


class FeedbackFn(Function):
    """``y = x W^T + b`` (x ``(..., in)``; ``conf=None``) or ``F.conv2d`` (``conf``; ``padding``
    a pair of ints: the module pads the input itself for string paddings and non-zero padding
    modes) whose input gradient is ``project(x, grad_out)``, or without ``project`` the
    transposed map with ``feedback`` (W's shape; ``None``: sign symmetry) in place of W."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, project, conf):  # type: ignore[override]
        ctx.save_for_backward(x, weight, feedback)
        ctx.project, ctx.conf = project, conf
        ctx.bias_sizes = None if bias is None else [bias.shape[0]]
        return F.linear(x, weight, bias) if conf is None else F.conv2d(x, weight, bias, *conf)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, feedback = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.bias_sizes is not None
        conf, dt = ctx.conf, grad_out.dtype
        xd = x if conf is None else x.to(dt)  # cast once for both convolution backwards
        grad_x = grad_w = grad_b = None
        if need_x and ctx.project is not None:
            grad_x = ctx.project(x, grad_out)
        elif need_x:
            B = sign_feedback(weight) if feedback is None else feedback
            grad_x = grad_out @ B.to(dt) if conf is None else \
                conv_backward(grad_out, xd, B, None, conf, [True, False, False])[0]
        if conf is None:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            grad_w = g2.t() @ x.reshape(-1, x.shape[-1]).to(dt) if need_w else None
            grad_b = g2.sum(dim=0) if need_b else None
        elif need_w or need_b:
            _, grad_w, grad_b = conv_backward(grad_out, xd, weight, ctx.bias_sizes if need_b else None,
                                               conf, [False, need_w, need_b])
        return grad_x, grad_w, grad_b, None, None, None


def conv_conf(stride, padding, dilation, groups) -> tuple:
    """The ``conf`` of :class:`FeedbackFn` for a convolution's options."""
    return list(stride), list(padding), list(dilation), int(groups)


def linear_with_feedback(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         feedback: torch.Tensor | None) -> torch.Tensor:
    """Linear map of ``x`` ``(..., in)`` -> ``(..., out)`` whose input gradient uses ``feedback``
    ``(out, in)`` (``None``: sign symmetry). Weight and bias gradients are BP's."""
    return FeedbackFn.apply(x, weight, bias, feedback, None, None)


def conv2d_with_feedback(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         feedback: torch.Tensor | None, stride, padding, dilation,
                         groups: int) -> torch.Tensor:
    """2-d convolution of ``x`` ``(batch, C_in, H, W)`` whose input gradient uses ``feedback``
    (W's shape; ``None``: sign symmetry). Weight and bias gradients are BP's."""
    return FeedbackFn.apply(x, weight, bias, feedback, None, conv_conf(stride, padding, dilation, groups))
