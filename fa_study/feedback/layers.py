"""``LocalLinear`` and ``LocalConv2d``: an ``nn.Linear`` / ``nn.Conv2d`` whose backward is its rule's.

A local layer holds ``rule``, an instance of a layer rule of :mod:`fa_study.rules.layer`, and
asks it everything: how the input gradient is formed (``rule.layer_forward``), which feedback
buffers exist (``rule.layer_buffers``: ``B``, ``B_abs``, ``B_dfa``, ...), how they are drawn and
redrawn (``rule.init_layer`` / ``rule.redraw``) and what happens after the backward
(``rule.after_backward``). The layer supplies the geometry the rules use:
``_plain_forward(x)``, ``_feedback_forward(x, B)`` (``B=None``: sign symmetry, computed in the
backward), ``_direct_forward(x, error)`` and ``_direct_feedback_shape(target_dim)``.

The buffers live in the layer, so no optimizer steps them and ``.to()``, ``state_dict`` and
``deepcopy`` carry them. Under ``torch.no_grad`` every rule is the plain layer: nothing is
cached, nothing redrawn. Build them with :func:`fa_study.rules.convert` (which shares the old
layer's Parameters) or directly, ``LocalLinear(4, 3, rule=build_rule("layer_fa"))``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_int
from .functions import FeedbackFn, conv_backward, conv_conf


class LocalLayer:
    """What LocalLinear and LocalConv2d share: the rule, its buffers, the cached input."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    @property
    def method(self) -> str:
        """The rule's name (a report label)."""
        return self.rule.name

    @property
    def fan_in(self) -> int:
        return math.prod(self.weight.shape[1:])

    @property
    def has_random_feedback(self) -> bool:
        """Whether the layer holds random feedback that :meth:`reset_feedback` redraws."""
        return self.rule.layer_has_random_feedback(self)

    def reset_feedback(self, generator: torch.Generator | None = None,
                       init_std: float | None = None) -> bool:
        """Redraw the layer's random feedback (the fresh-feedback null); return whether there
        was any. The scale is ``init_std``, else the rule's (for a W-shaped B: the RMS of the
        *current* weight unless the rule fixes it)."""
        return self.rule.redraw(self, generator, init_std)

    def feedback_matrix(self) -> torch.Tensor | None:
        """The matrix the backward uses in place of W (W's shape), or None for the direct rules,
        whose feedback does not pass through a W-shaped matrix."""
        return self.rule.feedback_matrix(self)

    @torch.no_grad()
    def set_feedback(self, B: torch.Tensor) -> None:
        """Replace the stored feedback matrix by a copy of ``B`` (W's shape)."""
        if not self.rule.stores_b:
            raise ValueError(f"rule {self.method!r} stores no B of W's shape; set_feedback needs "
                             "a rule whose stores_b is True, e.g. layer_fa")
        if tuple(B.shape) != tuple(self.weight.shape):
            raise ValueError(f"B must have the weight's shape {tuple(self.weight.shape)}, "
                             f"got {tuple(B.shape)}")
        self.B = B.detach().to(device=self.weight.device, dtype=self.weight.dtype).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self._plain_forward(x)
        return self.rule.layer_forward(self, x)

    def _cache_input(self, x: torch.Tensor) -> None:
        """Keep the input (and the output-error capture count) for a post-backward update."""
        self._cached_input = x.detach()
        holder = getattr(self, "_output_error", None)
        self._cached_stamp = None if holder is None else holder.captures

    def _take_cached_input(self) -> tuple[torch.Tensor, int | None]:
        x = self._cached_input
        if x is None:
            raise RuntimeError(
                f"this {self.method!r} layer has no cached input: run the model's forward with "
                "gradients enabled and loss.backward() before fa_study.feedback.feedback_step")
        self._cached_input = None
        return x, self._cached_stamp

    @torch.no_grad()
    def feedback_step(self, *, e: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> bool:
        """This layer's post-backward update (after ``loss.backward()``, before the optimizer's
        step); return whether the rule has one. ``e``: the output error ``(..., target_dim)``
        for a rule that reads it, default the one recorded by ``capture_output_error``."""
        return self.rule.after_backward(self, e=e, generator=generator)

    def _build(self, args: tuple, rule, generator: torch.Generator | None,
               old: nn.Module | None = None, **kwargs) -> None:
        """The nn layer's ``__init__(*args, **kwargs)`` after checking its two sizes (integers
        >= 1: a zero-sized layer has no fan-in to scale B by), ``old``'s Parameters shared when
        given, then ``rule``'s buffers, drawn from ``generator``."""
        for name, value in zip(self._size_names, args[:2]):
            check_int(f"{type(self).__name__} {name}", value, 1)
        super(LocalLayer, self).__init__(*args, **kwargs)  # nn.Linear / nn.Conv2d
        if old is not None:
            self.weight, self.bias = old.weight, old.bias
            self.train(old.training)
        if not callable(getattr(rule, "layer_forward", None)):
            raise ValueError(f"{type(self).__name__} needs a layer rule (an instance of a class "
                             f"of fa_study.rules.layer, e.g. build_rule('layer_fa')), got {rule!r}")
        if isinstance(self, nn.Conv2d) and not rule.has_conv_form:
            raise ValueError(f"rule {rule.name!r} has no Conv2d form; a convolution can run a rule "
                             "whose has_conv_form is True, or stay an nn.Conv2d (BP)")
        self.rule = rule
        for name in rule.layer_buffers:  # None until drawn (and out of the state_dict until then)
            self.register_buffer(name, None)
        self._cached_input: torch.Tensor | None = None
        self._cached_stamp: int | None = None
        rule.init_layer(self, generator)

    @classmethod
    def _sharing(cls, old: nn.Module, args: tuple, rule, generator: torch.Generator | None):
        new = cls.__new__(cls)
        # the shell is built on the meta device: nothing allocated or drawn for weights replaced at once
        new._build(args, rule, generator, old, device="meta")
        return new

    def _direct_forward(self, x: torch.Tensor, error) -> torch.Tensor:
        return self._feedback_forward(x, None, error)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rule={self.rule!r}"


def project_error_linear(e: torch.Tensor, B: torch.Tensor, x: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor:
    """``e @ B`` broadcast to the input's shape: ``e`` ``(*lead_e, K)``, ``B`` ``(K, in)``,
    ``x`` ``(*lead_e, *extra, in)``; every extra position (a token) gets its sample's error."""
    lead_e, lead_x = tuple(e.shape[:-1]), tuple(x.shape[:-1])
    if lead_x[:len(lead_e)] != lead_e:
        raise ValueError(f"the output error {tuple(e.shape)} does not match the layer input "
                         f"{tuple(x.shape)}: its leading dimensions must equal the input's or "
                         "be a prefix of them")
    g = e.to(device=x.device, dtype=dtype) @ B.to(dtype)
    g = g.reshape(*lead_e, *([1] * (len(lead_x) - len(lead_e))), g.shape[-1])
    return g.expand(x.shape).contiguous()


class LocalLinear(LocalLayer, nn.Linear):
    """Drop-in for ``nn.Linear`` (an instance of it) for inputs ``(..., in_features)`` ->
    ``(..., out_features)``; the forward is always ``x W^T + b``, the backward the rule's.
    Weights start as ``nn.Linear``'s; the rule's feedback is drawn from ``generator``."""

    _size_names = ("in_features", "out_features")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rule,
                 generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        self._build((in_features, out_features, bias), rule, generator, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rule,
                    generator: torch.Generator | None = None) -> "LocalLinear":
        """A LocalLinear that *shares* ``linear``'s weight and bias Parameters (same outputs,
        tying kept), with ``rule``'s feedback drawn for it."""
        return cls._sharing(linear, (linear.in_features, linear.out_features, linear.bias is not None),
                            rule, generator)

    def _plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _feedback_forward(self, x: torch.Tensor, B: torch.Tensor | None, error=None) -> torch.Tensor:
        """Through feedback ``B`` (None: sign symmetry), or with ``error`` the direct projection."""
        project = None if error is None else (lambda xs, g: project_error_linear(*error(), xs, g.dtype))
        return FeedbackFn.apply(x, self.weight, self.bias, B, project, None)

    def _direct_feedback_shape(self, target_dim: int) -> tuple[int, ...]:
        return (target_dim, self.in_features)


def project_error_conv(e: torch.Tensor, B: torch.Tensor, x: torch.Tensor,
                       grad_out: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """DFA's input gradient of a convolution: ``e`` ``(N, K)`` broadcast over the output
    positions ``(N, K, H_out, W_out)``, transposed-convolved with ``B`` ``(K, C_in, kh, kw)``
    (groups 1) onto ``x``'s shape ``(N, C_in, H, W)``."""
    if e.dim() == 1:
        e = e.unsqueeze(0)  # an unbatched input
    n, k = grad_out.shape[0], B.shape[0]
    if e.dim() != 2 or e.shape[0] != n:
        raise ValueError(f"a direct-feedback convolution needs the output error as (batch, "
                         f"target_dim) = ({n}, {k}), got {tuple(e.shape)}")
    E = e.to(device=grad_out.device, dtype=grad_out.dtype)[:, :, None, None]
    E = E.expand(n, k, *grad_out.shape[2:]).contiguous()
    return conv_backward(E, x, B, None, conv_conf(stride, padding, dilation, 1), [True, False, False])[0]


class LocalConv2d(LocalLayer, nn.Conv2d):
    """Drop-in for ``nn.Conv2d`` (an instance of it) for ``(batch, C_in, H, W)``. The input
    gradient is the transposed convolution of ``grad_out`` with the rule's kernel of W's shape
    ``(C_out, C_in/groups, kh, kw)``, or, for direct feedback, of the output error broadcast
    over the output positions with ``B_dfa`` ``(target_dim, C_in, kh, kw)``. Weight and bias
    gradients are autograd's; every option of ``nn.Conv2d`` works (strides, dilation, groups,
    ``padding='same'``, non-zero padding modes)."""

    _size_names = ("in_channels", "out_channels")

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 rule, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        self._build((in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                     padding_mode), rule, generator, device=device, dtype=dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rule,
                  generator: torch.Generator | None = None) -> "LocalConv2d":
        """A LocalConv2d sharing ``conv``'s weight and bias Parameters, with ``rule``'s feedback."""
        return cls._sharing(conv, (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                   conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                                   conv.padding_mode), rule, generator)

    def _explicit_padding(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The input padded as ``nn.Conv2d`` would, and the symmetric int padding left to apply."""
        rp = self._reversed_padding_repeated_twice  # (left_w, right_w, top_h, bottom_h)
        if self.padding_mode != "zeros":
            return F.pad(x, rp, mode=self.padding_mode), (0, 0)
        if isinstance(self.padding, str):
            if rp[0] == rp[1] and rp[2] == rp[3]:
                return x, (rp[2], rp[0])
            return F.pad(x, rp), (0, 0)  # 'same' with an even kernel pads asymmetrically
        return x, tuple(self.padding)

    def _plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight, self.bias)

    def _feedback_forward(self, x: torch.Tensor, B: torch.Tensor | None, error=None) -> torch.Tensor:
        """Through feedback ``B`` (None: sign symmetry), or with ``error`` the direct projection."""
        unbatched = x.dim() == 3  # nn.Conv2d accepts (C_in, H, W) too
        xp, padding = self._explicit_padding(x.unsqueeze(0) if unbatched else x)
        conf = conv_conf(self.stride, padding, self.dilation, self.groups)
        project = None if error is None else (lambda xs, g: project_error_conv(*error(), xs, g, *conf[:3]))
        out = FeedbackFn.apply(xp, self.weight, self.bias, B, project, conf)
        return out.squeeze(0) if unbatched else out

    def _direct_feedback_shape(self, target_dim: int) -> tuple[int, ...]:
        return (target_dim, self.in_channels, *self.kernel_size)
