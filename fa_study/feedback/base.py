"""What every local layer shares: its rule, its feedback matrices, its post-backward update.

:class:`LocalRuleMixin` is mixed into ``LocalLinear`` (an ``nn.Linear``) and ``LocalConv2d``
(an ``nn.Conv2d``). It owns

* ``method`` and ``rule`` (:class:`~fa_study.feedback.options.RuleOptions`);
* ``B``: the stored feedback matrix, W's shape, for ``fa``, ``kolen_pollack`` and
  ``weight_mirror`` (a buffer, so no optimizer ever steps it and ``.to()`` moves it);
* ``B_dfa`` ``(out, target_dim)`` and ``B_dfa_block`` ``(out, d_block)`` for the direct rules;
* :meth:`feedback_step`, the one post-backward call (the model-level
  :func:`fa_study.feedback.feedback_step` calls it on every local layer).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import check_choice
from .functions import sign_feedback
from .inits import init_feedback, weight_rms
from .learned import grape_align_step, kolen_pollack_step, weight_mirror_step
from .options import STORED_B_METHODS, RuleOptions, check_decay


def _match_rows(delta: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pair the rows of a projected error ``(*lead_e, out)`` with those of an input ``(*lead_x, in)``.

    Equal leading shapes pair row by row. When the input has extra trailing positions (tokens:
    x ``(batch, T, in)`` with a per-sample error ``(batch, out)``), every position of a sample
    receives the sample's error, which is the same as pairing the error with the input summed
    over those positions. Returns ``(delta (N, out), x (N, in), positions per row)``.
    """
    lead_e, lead_x = delta.shape[:-1], x.shape[:-1]
    if lead_e == lead_x:
        return delta.reshape(-1, delta.shape[-1]), x.reshape(-1, x.shape[-1]), 1
    if len(lead_e) < len(lead_x) and lead_x[:len(lead_e)] == lead_e:
        xs = x.reshape(*lead_e, -1, x.shape[-1])
        reps = xs.shape[-2]
        return delta.reshape(-1, delta.shape[-1]), xs.sum(dim=-2).reshape(-1, x.shape[-1]), reps
    raise ValueError(
        f"error of shape {tuple(delta.shape[:-1])} + (dim,) does not match the layer input "
        f"{tuple(x.shape)}: its leading dimensions must equal the input's or be a prefix of them")


def _write_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """Overwrite ``param.grad`` (the direct rules replace the BP gradient, they do not add)."""
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.copy_(grad)


class LocalRuleMixin:
    """Rule state and post-backward update shared by the local layers (mixed into an nn.Module)."""

    method: str
    rule: RuleOptions
    weight: nn.Parameter
    bias: nn.Parameter | None

    # -- set-up -----------------------------------------------------------------------------

    def _setup_rule(self, method: str, allowed: tuple[str, ...], options: RuleOptions,
                    generator: torch.Generator | None) -> None:
        check_choice(f"{type(self).__name__} method", method, allowed)
        options.validate(method)
        self.method = method
        self.rule = options
        self.register_buffer("B", None)
        self.register_buffer("B_dfa", None)
        self.register_buffer("B_dfa_block", None)
        self._cached_input: torch.Tensor | None = None
        self._block_tap = None
        self._dfa_block_assigned = False
        if method in STORED_B_METHODS:
            self.reset_feedback(generator=generator)

    @property
    def fan_in(self) -> int:
        return math.prod(self.weight.shape[1:])

    @torch.no_grad()
    def reset_feedback(self, generator: torch.Generator | None = None,
                       init_std: float | None = None) -> None:
        """Draw a fresh B (W's shape) with the layer's init mode.

        The scale is ``init_std``, else ``rule.init_std``, else the RMS of the current weight
        (``nn.Linear``'s init std ``1/sqrt(3 fan_in)`` if the weight is all zeros), so a converted
        trained layer gets a B of its own weight's magnitude.
        """
        std = init_std if init_std is not None else self.rule.init_std
        if std is None:
            std = weight_rms(self.weight) or 1.0 / math.sqrt(3.0 * self.fan_in)
        self.B = init_feedback(self.weight.shape, self.rule.fa_init_mode, std,
                               self.rule.fa_sparse_k, generator,
                               device=self.weight.device, dtype=self.weight.dtype)

    @torch.no_grad()
    def set_feedback(self, B: torch.Tensor) -> None:
        """Replace the stored feedback matrix by a copy of ``B`` (W's shape)."""
        if self.method not in STORED_B_METHODS:
            raise ValueError(f"method {self.method!r} stores no B; set_feedback needs one of "
                             f"{', '.join(STORED_B_METHODS)}")
        if tuple(B.shape) != tuple(self.weight.shape):
            raise ValueError(f"B must have the weight's shape {tuple(self.weight.shape)}, "
                             f"got {tuple(B.shape)}")
        self.B = B.detach().to(device=self.weight.device, dtype=self.weight.dtype).clone()

    def feedback_matrix(self) -> torch.Tensor | None:
        """The matrix the backward uses in place of W (W's shape), or ``None`` for the direct
        rules (``dfa``, ``dfa_block``), whose feedback does not pass through this layer."""
        if self.method == "bp":
            return self.weight.detach()
        if self.method == "sign_sym":
            return sign_feedback(self.weight.detach())
        if self.method in STORED_B_METHODS:
            return self.B
        return None

    def _cache_input(self, x: torch.Tensor) -> None:
        # Only a forward that can be followed by a backward needs the input later; an
        # evaluation pass under no_grad must not pin activations in memory.
        if torch.is_grad_enabled():
            self._cached_input = x.detach()

    def _take_cached_input(self, call: str) -> torch.Tensor:
        x = self._cached_input
        if x is None:
            raise RuntimeError(
                f"{call}: this {self.method!r} layer has no cached input; run the model's "
                "forward with gradients enabled (and loss.backward()) before calling it")
        self._cached_input = None
        return x

    # -- the post-backward update -------------------------------------------------------------

    @torch.no_grad()
    def feedback_step(self, *, e: torch.Tensor | None = None, lr_b: float | None = None,
                      decay: float | None = None,
                      generator: torch.Generator | None = None) -> bool:
        """Apply this layer's post-backward update; return whether the rule has one.

        Call after ``loss.backward()`` and before ``optimizer.step()``:

        * ``dfa``: overwrite the weight/bias gradients with the projection of ``e``
          (``dL/d output``, ``(..., target_dim)``);
        * ``dfa_block``: the same with the error captured at the output of the layer's block;
        * ``kolen_pollack`` / ``weight_mirror`` / ``fa`` with ``fa_grape``: update B.

        ``lr_b`` and ``decay`` override ``rule.lr_b`` and ``rule.b_decay`` for this call.
        """
        check_decay(decay)
        lr = self.rule.lr_b if lr_b is None else float(lr_b)
        dec = self.rule.b_decay if decay is None else decay
        m = self.method
        if m == "kolen_pollack":
            if self.weight.grad is None:
                raise RuntimeError("kolen_pollack layer has no weight gradient: call "
                                   "loss.backward() before feedback_step")
            kolen_pollack_step(self.B, self.weight.grad, lr, dec or 0.0)
        elif m == "weight_mirror":
            weight_mirror_step(self.B, self.weight, lr, dec, self.rule.mirror_sigma,
                               self.rule.mirror_n, generator)
        elif m == "fa" and self.rule.fa_grape:
            grape_align_step(self.B, self.weight, lr, self.rule.grape_n_probe,
                             self.rule.grape_normalize_columns, generator)
        elif m == "dfa":
            if e is None:
                raise RuntimeError(
                    "a 'dfa' layer needs the output error: pass e=dL/d(output) to feedback_step "
                    "(e.g. call out.retain_grad() before loss.backward() and pass e=out.grad)")
            self.dfa_compute_grad(e)
        elif m == "dfa_block":
            if not self._dfa_block_assigned:
                raise RuntimeError("dfa_block feedback is not set up: call "
                                   "fa_study.feedback.initialize_dfa_block_targets(model, "
                                   "d_block) once after building the model")
            if self._block_tap is None:
                return False  # outside every block: keeps the BP gradient of its forward
            err = self._block_tap.error
            if err is None:
                raise RuntimeError(
                    f"no gradient reached the output of block {self._block_tap.index}: call "
                    "loss.backward() (with the block's output in the graph) before feedback_step")
            self.dfa_block_compute_grad(err)
        else:
            return False
        return True

    @torch.no_grad()
    def dfa_compute_grad(self, e: torch.Tensor) -> None:
        """DFA: overwrite grads with ``delta = e B_dfa^T``; ``grad_W = sum_n delta_n x_n^T``,
        ``grad_b = sum_n delta_n`` (a sum: ``e`` already carries the loss's batch mean)."""
        if self.method != "dfa":
            raise ValueError(f"dfa_compute_grad needs method='dfa', this layer runs {self.method!r}")
        if self.B_dfa is None:
            raise RuntimeError("DFA feedback matrices do not exist yet: call "
                               "fa_study.feedback.initialize_dfa_targets(model, target_dim) first")
        if e.shape[-1] != self.B_dfa.shape[1]:
            raise ValueError(f"e has last dimension {e.shape[-1]} but B_dfa was made for "
                             f"target_dim={self.B_dfa.shape[1]}")
        x = self._take_cached_input("apply_dfa_update")
        delta = e.detach().to(self.B_dfa.dtype) @ self.B_dfa.t()
        self._write_projection_grads(delta, x, mean=False)

    @torch.no_grad()
    def dfa_block_compute_grad(self, block_error: torch.Tensor) -> None:
        """DFA within a block: ``delta = err B_dfa_block^T``; grads are batch means over the
        ``N`` rows of the error (the reference's normalisation): ``grad_W = delta^T x / N``."""
        if self.method != "dfa_block":
            raise ValueError("dfa_block_compute_grad needs method='dfa_block', this layer runs "
                             f"{self.method!r}")
        if self.B_dfa_block is None:
            raise RuntimeError("dfa_block feedback matrices do not exist yet: call "
                               "fa_study.feedback.initialize_dfa_block_targets(model, d_block)")
        if block_error.shape[-1] != self.B_dfa_block.shape[1]:
            raise ValueError(f"block error has last dimension {block_error.shape[-1]} but "
                             f"B_dfa_block was made for d_block={self.B_dfa_block.shape[1]}")
        x = self._take_cached_input("apply_dfa_block_update")
        delta = block_error.detach().to(self.B_dfa_block.dtype) @ self.B_dfa_block.t()
        self._write_projection_grads(delta, x, mean=True)

    def _write_projection_grads(self, delta: torch.Tensor, x: torch.Tensor, mean: bool) -> None:
        d2, x2, reps = _match_rows(delta, x.to(delta.dtype))
        gw = d2.t() @ x2
        gb = d2.sum(dim=0) * reps if reps != 1 else d2.sum(dim=0)
        if mean:  # over every position, as if the error had been repeated along them
            n = max(d2.shape[0] * reps, 1)
            gw = gw / n
            gb = gb / n
        _write_grad(self.weight, gw)
        if self.bias is not None:
            _write_grad(self.bias, gb)

    def rule_repr(self) -> str:
        extra = ", grape" if self.method == "fa" and self.rule.fa_grape else ""
        return f"method={self.method}{extra}"
