"""``LocalConv2d``: an ``nn.Conv2d`` whose input gradient uses a feedback kernel."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LocalRuleMixin
from .functions import conv2d_with_feedback
from .options import CONV_METHODS, RuleOptions


class LocalConv2d(LocalRuleMixin, nn.Conv2d):
    """Drop-in for ``nn.Conv2d`` (an instance of it); ``method`` is one of :data:`CONV_METHODS`.

    The forward is the ordinary convolution of ``(batch, C_in, H, W)``. For ``fa``,
    ``kolen_pollack`` and ``weight_mirror`` the input gradient is the transposed convolution of
    ``grad_out`` with a feedback kernel B of W's shape ``(C_out, C_in/groups, kh, kw)``; for
    ``sign_sym`` with ``sign(W) ||W||_F / sqrt(numel W)``. Weight and bias gradients are BP's.
    B's learned updates act on the kernel's ``(C_out, fan_in)`` patch map. All of
    ``nn.Conv2d``'s options work (strides, dilation, groups, ``padding='same'``, non-zero
    padding modes).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 method: str = "bp", *, init_std: float | None = None,
                 fa_init_mode: str = "gaussian", fa_sparse_k: int | None = None,
                 fa_grape: bool = False, grape_n_probe: int = 32,
                 grape_normalize_columns: bool = False, lr_b: float = 0.01,
                 b_decay: float | None = None, mirror_sigma: float = 1.0, mirror_n: int = 64,
                 generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding,
                           dilation, groups, bias, padding_mode, device=device, dtype=dtype)
        options = RuleOptions(init_std=init_std, fa_init_mode=fa_init_mode,
                              fa_sparse_k=fa_sparse_k, fa_grape=fa_grape,
                              grape_n_probe=grape_n_probe,
                              grape_normalize_columns=grape_normalize_columns, lr_b=lr_b,
                              b_decay=b_decay, mirror_sigma=mirror_sigma, mirror_n=mirror_n)
        self._setup_rule(method, CONV_METHODS, options, generator)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, method: str, options: RuleOptions | None = None,
                  generator: torch.Generator | None = None) -> "LocalConv2d":
        """A LocalConv2d sharing ``conv``'s weight and bias Parameters, with B drawn for ``method``."""
        new = cls.__new__(cls)
        nn.Conv2d.__init__(new, conv.in_channels, conv.out_channels, conv.kernel_size,
                           conv.stride, conv.padding, conv.dilation, conv.groups,
                           conv.bias is not None, conv.padding_mode, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        new._setup_rule(method, CONV_METHODS, options or RuleOptions(), generator)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, C_in, H, W)`` -> ``(batch, C_out, H', W')``."""
        if self.method == "bp" or not torch.is_grad_enabled():
            return self._conv_forward(x, self.weight, self.bias)
        unbatched = x.dim() == 3  # nn.Conv2d accepts (C_in, H, W) too
        xp, padding = self._explicit_padding(x.unsqueeze(0) if unbatched else x)
        out = conv2d_with_feedback(xp, self.weight, self.bias,
                                   None if self.method == "sign_sym" else self.B,
                                   self.stride, padding, self.dilation, self.groups)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self.rule_repr()}"
