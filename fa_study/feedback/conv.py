"""``LocalConv2d``: an ``nn.Conv2d`` whose input gradient is chosen by its rule strategy."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LocalRuleMixin, check_features
from .functions import conv2d_input_grad, conv2d_with_direct_feedback, conv2d_with_feedback
from .options import RuleOptions
from .strategies import CONV_METHODS


def project_error_conv(e: torch.Tensor, B: torch.Tensor, x: torch.Tensor,
                       grad_out: torch.Tensor, stride, padding, dilation) -> torch.Tensor:
    """DFA's input gradient of a convolution: ``e`` ``(N, K)`` broadcast over the output
    positions ``(N, K, H_out, W_out)``, transposed-convolved with ``B`` ``(K, C_in, kh, kw)``
    (groups 1) onto ``x``'s shape ``(N, C_in, H, W)``."""
    if e.dim() == 1:
        e = e.unsqueeze(0)  # an unbatched input
    n, k = grad_out.shape[0], B.shape[0]
    if e.dim() != 2 or e.shape[0] != n:
        raise ValueError(f"a 'dfa' convolution needs the output error as (batch, target_dim) = "
                         f"({n}, {k}), got {tuple(e.shape)}")
    E = e.to(device=grad_out.device, dtype=grad_out.dtype)[:, :, None, None]
    E = E.expand(n, k, *grad_out.shape[2:]).contiguous()
    return conv2d_input_grad(x, B, E, stride, padding, dilation, 1)


class LocalConv2d(LocalRuleMixin, nn.Conv2d):
    """Drop-in for ``nn.Conv2d`` (an instance of it); ``method`` is one of :data:`CONV_METHODS`.

    The forward is the ordinary convolution of ``(batch, C_in, H, W)``. For ``fa``,
    ``kolen_pollack`` and ``weight_mirror`` the input gradient is the transposed convolution of
    ``grad_out`` with a feedback kernel B of W's shape ``(C_out, C_in/groups, kh, kw)``; for
    ``sign_sym`` with ``sign(W) ||W||_F / sqrt(numel W)``; for ``frsf`` / ``brsf`` with
    ``|M| * sign(W)``. For ``dfa`` it is the transposed convolution of the output error
    broadcast over the output positions with ``B_dfa`` ``(target_dim, C_in, kh, kw)`` (see
    :class:`~fa_study.feedback.strategies.DirectFeedbackAlignment`). Weight and bias gradients
    are autograd's from the received grad_out. B's learned updates act on the kernel's
    ``(C_out, fan_in)`` patch map. All of ``nn.Conv2d``'s options work (strides, dilation,
    groups, ``padding='same'``, non-zero padding modes). ``**rule_options``: the fields of
    :class:`RuleOptions`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 method: str = "bp", *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 **rule_options):
        check_features("LocalConv2d", in_channels=in_channels, out_channels=out_channels)
        options = RuleOptions(**rule_options)
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding,
                           dilation, groups, bias, padding_mode, device=device, dtype=dtype)
        self._setup_rule(method, CONV_METHODS, options, generator)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, method: str, options: RuleOptions | None = None,
                  generator: torch.Generator | None = None) -> "LocalConv2d":
        """A LocalConv2d sharing ``conv``'s weight and bias Parameters, with its feedback drawn
        for ``method``."""
        check_features("LocalConv2d", in_channels=conv.in_channels,
                       out_channels=conv.out_channels)
        new = cls.__new__(cls)
        nn.Conv2d.__init__(new, conv.in_channels, conv.out_channels, conv.kernel_size,
                           conv.stride, conv.padding, conv.dilation, conv.groups,
                           conv.bias is not None, conv.padding_mode, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        new._setup_rule(method, CONV_METHODS, options, generator)
        new.train(conv.training)
        return new

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

    # -- geometry used by the strategies ------------------------------------------------------

    def _plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight, self.bias)

    def _feedback_forward(self, x: torch.Tensor, B: torch.Tensor | None) -> torch.Tensor:
        unbatched = x.dim() == 3  # nn.Conv2d accepts (C_in, H, W) too
        xp, padding = self._explicit_padding(x.unsqueeze(0) if unbatched else x)
        out = conv2d_with_feedback(xp, self.weight, self.bias, B, self.stride, padding,
                                   self.dilation, self.groups)
        return out.squeeze(0) if unbatched else out

    def _direct_forward(self, x: torch.Tensor, error) -> torch.Tensor:
        unbatched = x.dim() == 3
        xp, padding = self._explicit_padding(x.unsqueeze(0) if unbatched else x)
        stride, dilation = self.stride, self.dilation

        def project(xs: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
            e, B = error()
            return project_error_conv(e, B, xs, grad_out, stride, padding, dilation)

        out = conv2d_with_direct_feedback(xp, self.weight, self.bias, project, stride, padding,
                                          dilation, self.groups)
        return out.squeeze(0) if unbatched else out

    def _direct_feedback_shape(self, target_dim: int) -> tuple[int, ...]:
        return (target_dim, self.in_channels, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, C_in, H, W)`` -> ``(batch, C_out, H', W')``."""
        return LocalRuleMixin.forward(self, x)

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self.rule_repr()}"
