"""``LocalLinear``: an ``nn.Linear`` whose backward is chosen by its rule strategy."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LocalRuleMixin, check_features
from .functions import linear_with_direct_feedback, linear_with_feedback
from .options import RuleOptions
from .strategies import METHODS


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


class LocalLinear(LocalRuleMixin, nn.Linear):
    """Drop-in for ``nn.Linear`` (an instance of it) for inputs ``(..., in_features)``.

    The forward is always ``x W^T + b``; ``method`` (one of :data:`METHODS`) picks the
    learning rule (see the rules table of :mod:`fa_study.feedback` and the strategy classes of
    :mod:`fa_study.feedback.strategies`):

    * ``bp``: plain ``F.linear``, identical to ``nn.Linear`` in outputs and gradients.
    * ``fa``: ``grad_x = grad_out . B`` with a fixed B ``(out, in)``; W's and b's gradients are
      BP's; B gets no gradient. ``fa_grape=True`` aligns B to W by forward probes (GrAPE).
    * ``sign_sym``: ``grad_x = grad_out . sign(W) ||W||_F / sqrt(numel W)``.
    * ``frsf`` / ``brsf``: ``grad_x = grad_out . (|M| * sign(W))``, M fixed / redrawn every batch.
    * ``kolen_pollack`` / ``weight_mirror``: the ``fa`` backward, with B learned after each
      backward (by W's own gradient / by the response to injected noise).
    * ``dfa``: ``grad_x = e . B_dfa`` (``B_dfa`` ``(target_dim, in)``) from the output error
      ``e`` recorded by :func:`fa_study.feedback.capture_output_error`; W's and b's gradients
      are autograd's from the grad_out the layer receives (Nøkland's DFA).
    * ``dfa_ungated``: seed 000's form: an ordinary backward, then the weight/bias gradients
      overwritten with ``(e B_dfa^T)^T x`` (``B_dfa`` ``(out, target_dim)``).
    * ``dfa_block``: the same with the error at the output of the layer's block, through
      ``B_dfa_block`` ``(out, d_block)``, averaged over rows.

    The weights start as ``nn.Linear``'s (Kaiming-uniform, bias ``U(+-1/sqrt(in))``). Random
    feedback is drawn from ``generator`` with the rule options (``**rule_options``: the fields
    of :class:`RuleOptions`, e.g. ``fa_init_mode``, ``init_std``, ``lr_b``). Under
    ``torch.no_grad`` every method runs plain ``F.linear`` and caches nothing.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 method: str = "bp", *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 **rule_options):
        check_features("LocalLinear", in_features=in_features, out_features=out_features)
        options = RuleOptions(**rule_options)
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._setup_rule(method, METHODS, options, generator)

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str, options: RuleOptions | None = None,
                    generator: torch.Generator | None = None) -> "LocalLinear":
        """A LocalLinear that *shares* ``linear``'s weight and bias Parameters (so its outputs
        are identical and any tying is kept), with its feedback drawn for ``method``."""
        check_features("LocalLinear", in_features=linear.in_features,
                       out_features=linear.out_features)
        new = cls.__new__(cls)
        # Build the shell on the meta device: no allocation and no draw from the RNG for
        # weights that are replaced at once.
        nn.Linear.__init__(new, linear.in_features, linear.out_features,
                           linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new._setup_rule(method, METHODS, options, generator)
        new.train(linear.training)
        return new

    # -- geometry used by the strategies ------------------------------------------------------

    def _plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _feedback_forward(self, x: torch.Tensor, B: torch.Tensor | None) -> torch.Tensor:
        return linear_with_feedback(x, self.weight, self.bias, B)

    def _direct_forward(self, x: torch.Tensor, error) -> torch.Tensor:
        def project(xs: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
            e, B = error()
            return project_error_linear(e, B, xs, grad_out.dtype)

        return linear_with_direct_feedback(x, self.weight, self.bias, project)

    def _direct_feedback_shape(self, target_dim: int) -> tuple[int, ...]:
        return (target_dim, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_features)`` -> ``(..., out_features)``."""
        return LocalRuleMixin.forward(self, x)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self.rule_repr()}"
