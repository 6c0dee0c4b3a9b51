"""``LocalLinear``: an ``nn.Linear`` whose backward is chosen by ``method``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LocalRuleMixin
from .functions import linear_with_feedback
from .options import METHODS, RuleOptions


class LocalLinear(LocalRuleMixin, nn.Linear):
    """Drop-in for ``nn.Linear`` (an instance of it) for inputs ``(..., in_features)``.

    The forward is always ``x W^T + b``; ``method`` (one of :data:`METHODS`) picks the
    learning rule:

    * ``bp``: plain ``F.linear``, identical to ``nn.Linear`` in outputs and gradients.
    * ``fa``: ``grad_x = grad_out . B`` with a fixed B ``(out, in)``; W's and b's gradients are
      BP's; B gets no gradient. ``fa_grape=True`` aligns B to W by forward probes (GrAPE).
    * ``sign_sym``: ``grad_x = grad_out . sign(W) ||W||_F / sqrt(numel W)``.
    * ``kolen_pollack`` / ``weight_mirror``: the ``fa`` backward, with B learned after each
      backward (by W's own gradient / by the response to injected noise).
    * ``dfa``: ordinary forward and backward (layers upstream get BP gradients) with the input
      cached; after ``loss.backward()`` the weight/bias gradients are overwritten with the
      projection of the output error through ``B_dfa`` ``(out, target_dim)``.
    * ``dfa_block``: the same with the error at the output of the layer's block, through
      ``B_dfa_block`` ``(out, d_block)``, averaged over rows.

    The weights start as ``nn.Linear``'s (Kaiming-uniform, bias ``U(+-1/sqrt(in))``). B is
    drawn with ``fa_init_mode`` at scale ``init_std``, by default the RMS of W (see
    :class:`RuleOptions`). The rule options are documented on :class:`RuleOptions`; the
    post-backward update is :func:`fa_study.feedback.feedback_step`. Under ``torch.no_grad``
    every method runs plain ``F.linear`` and caches nothing.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 method: str = "bp", *, init_std: float | None = None,
                 fa_init_mode: str = "gaussian", fa_sparse_k: int | None = None,
                 fa_grape: bool = False, grape_n_probe: int = 32,
                 grape_normalize_columns: bool = False, lr_b: float = 0.01,
                 b_decay: float | None = None, mirror_sigma: float = 1.0, mirror_n: int = 64,
                 generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        options = RuleOptions(init_std=init_std, fa_init_mode=fa_init_mode,
                              fa_sparse_k=fa_sparse_k, fa_grape=fa_grape,
                              grape_n_probe=grape_n_probe,
                              grape_normalize_columns=grape_normalize_columns, lr_b=lr_b,
                              b_decay=b_decay, mirror_sigma=mirror_sigma, mirror_n=mirror_n)
        self._setup_rule(method, METHODS, options, generator)

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str, options: RuleOptions | None = None,
                    generator: torch.Generator | None = None) -> "LocalLinear":
        """A LocalLinear that *shares* ``linear``'s weight and bias Parameters (so its outputs
        are identical and any tying is kept), with B drawn for ``method``."""
        new = cls.__new__(cls)
        # Build the shell on the meta device: no allocation and no draw from the RNG for
        # weights that are replaced at once.
        nn.Linear.__init__(new, linear.in_features, linear.out_features,
                           linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new._setup_rule(method, METHODS, options or RuleOptions(), generator)
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_features)`` -> ``(..., out_features)``."""
        m = self.method
        if m == "bp" or not torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        if m in ("dfa", "dfa_block"):
            self._cache_input(x)
            return F.linear(x, self.weight, self.bias)
        return linear_with_feedback(x, self.weight, self.bias,
                                    None if m == "sign_sym" else self.B)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self.rule_repr()}"
