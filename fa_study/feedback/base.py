"""What every local layer shares: its rule strategy, its feedback state, its post-backward update.

:class:`LocalRuleMixin` is mixed into ``LocalLinear`` (an ``nn.Linear``) and ``LocalConv2d``
(an ``nn.Conv2d``). It holds

* ``strategy``: the rule, a :class:`~fa_study.feedback.strategies.LayerStrategy` built from the
  rule's name; ``method`` (its name, read-only) and ``rule`` (its
  :class:`~fa_study.feedback.options.RuleOptions`) are views of it;
* the rule's buffers (``B`` for ``fa`` / ``kolen_pollack`` / ``weight_mirror``, ``B_abs`` for
  ``frsf`` / ``brsf``, ``B_dfa`` for ``dfa`` / ``dfa_ungated``, ``B_dfa_block``), so no optimizer
  ever steps them and ``.to()``, ``state_dict`` and ``deepcopy`` carry them; the slots of the
  other rules exist and are None;
* :meth:`feedback_step`, the one post-backward call (the model-level
  :func:`fa_study.feedback.feedback_step` calls it on every local layer).

Every rule decision is delegated to the strategy; the layer classes supply the geometry
(``_plain_forward``, ``_feedback_forward``, ``_direct_forward``, ``_direct_feedback_shape``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import check_int
from .options import RuleOptions, check_decay, check_lr_b
from .strategies import FEEDBACK_BUFFERS, RULES, LayerStrategy, make_strategy


class LocalRuleMixin:
    """Rule strategy and feedback state shared by the local layers (mixed into an nn.Module)."""

    strategy: LayerStrategy
    weight: nn.Parameter
    bias: nn.Parameter | None

    # -- set-up -----------------------------------------------------------------------------

    def _setup_rule(self, method: str, allowed: tuple[str, ...], options: RuleOptions | None,
                    generator: torch.Generator | None) -> None:
        self.strategy = make_strategy(method, options, allowed, f"{type(self).__name__} method")
        for name in FEEDBACK_BUFFERS:  # unused slots stay None (and out of the state_dict)
            self.register_buffer(name, None)
        self._cached_input: torch.Tensor | None = None
        self._cached_stamp: int | None = None
        self.strategy.setup(self, generator)

    @property
    def method(self) -> str:
        """The rule's name (read-only; a report label)."""
        return self.strategy.name

    @property
    def rule(self) -> RuleOptions:
        """The rule's options."""
        return self.strategy.options

    @property
    def fan_in(self) -> int:
        return math.prod(self.weight.shape[1:])

    # -- feedback state -----------------------------------------------------------------------

    @property
    def has_random_feedback(self) -> bool:
        """Whether the layer holds random feedback that :meth:`reset_feedback` redraws (B,
        ``|M|``, ``B_dfa`` once drawn, ...); False for ``bp`` and ``sign_sym``."""
        return self.strategy.has_random_feedback(self)

    def reset_feedback(self, generator: torch.Generator | None = None,
                       init_std: float | None = None) -> bool:
        """Redraw the layer's random feedback (the fresh-feedback null); return whether there
        was any to redraw (False for ``bp``, ``sign_sym`` and undrawn direct matrices).

        The scale is ``init_std``, else the rule's: for the W-shaped feedback ``rule.init_std``,
        else the RMS of the *current* weight (so a trained layer gets a B of its own weight's
        magnitude); for ``B_dfa`` / ``B_dfa_block`` the scale they were drawn with.
        """
        return self.strategy.reset(self, generator, init_std)

    @torch.no_grad()
    def set_feedback(self, B: torch.Tensor) -> None:
        """Replace the stored feedback matrix by a copy of ``B`` (W's shape)."""
        if not self.strategy.stores_b:
            stored = [n for n, c in RULES.items() if c.stores_b]
            raise ValueError(f"method {self.method!r} stores no B; set_feedback needs one of "
                             f"{', '.join(map(repr, stored))}")
        if tuple(B.shape) != tuple(self.weight.shape):
            raise ValueError(f"B must have the weight's shape {tuple(self.weight.shape)}, "
                             f"got {tuple(B.shape)}")
        self.B = B.detach().to(device=self.weight.device, dtype=self.weight.dtype).clone()

    def feedback_matrix(self) -> torch.Tensor | None:
        """The matrix the backward uses in place of W (W's shape), or ``None`` for the direct
        rules (``dfa``, ``dfa_ungated``, ``dfa_block``), whose feedback does not pass through
        a W-shaped matrix."""
        return self.strategy.feedback_matrix(self)

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under no_grad every rule is the plain layer: nothing is cached, nothing redrawn.
        if not torch.is_grad_enabled():
            return self._plain_forward(x)
        return self.strategy.forward(self, x)

    def _cache_input(self, x: torch.Tensor) -> None:
        """Keep the input (and the output-error capture count) for a post-backward update."""
        self._cached_input = x.detach()
        holder = getattr(self, "_output_error", None)
        self._cached_stamp = None if holder is None else holder.captures

    def _take_cached_input(self, call: str) -> tuple[torch.Tensor, int | None]:
        x = self._cached_input
        if x is None:
            raise RuntimeError(
                f"{call}: this {self.method!r} layer has no cached input; run the model's "
                "forward with gradients enabled (and loss.backward()) before calling it")
        self._cached_input = None
        return x, self._cached_stamp

    # -- the post-backward update -------------------------------------------------------------

    @torch.no_grad()
    def feedback_step(self, *, e: torch.Tensor | None = None, lr_b: float | None = None,
                      decay: float | None = None,
                      generator: torch.Generator | None = None) -> bool:
        """Apply this layer's post-backward update; return whether the rule has one.

        Call after ``loss.backward()`` and before ``optimizer.step()``:

        * ``dfa_ungated``: overwrite the weight/bias gradients with the projection of ``e``
          (``dL/d output``, ``(..., target_dim)``; default: the error recorded by
          :func:`fa_study.feedback.capture_output_error`);
        * ``dfa_block``: the same with the error captured at the output of the layer's block;
        * ``kolen_pollack`` / ``weight_mirror`` / ``fa`` with ``fa_grape``: update B.

        ``lr_b`` and ``decay`` override ``rule.lr_b`` and ``rule.b_decay`` for this call.
        """
        lr_b = check_lr_b(lr_b)
        decay = check_decay(decay, "decay")
        return self.strategy.step(self, e=e, lr_b=lr_b, decay=decay, generator=generator)

    def rule_repr(self) -> str:
        return self.strategy.describe()


def check_features(layer_type: str, **sizes) -> None:
    """Layer sizes must be integers >= 1 (a zero-sized layer has no fan-in to scale B by)."""
    for name, value in sizes.items():
        check_int(f"{layer_type} {name}", value, 1)

