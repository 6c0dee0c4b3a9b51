"""Layer-level learning rules: LocalLinear / LocalConv2d, DFA, GrAPE, Kolen-Pollack, weight
mirrors, Stiefel feedback, a model converter and alignment read-outs.

Training any converted model takes ONE extra call after ``loss.backward()``::

    from fa_study.feedback import convert, feedback_step

    model, report = convert(model, "kolen_pollack")      # any rule in METHODS
    ...
    out = model(x); out.retain_grad()                    # retain_grad is only needed for 'dfa'
    loss = loss_fn(out, y); loss.backward()
    feedback_step(model, e=out.grad)                     # every rule's post-backward update
    optimizer.step(); optimizer.zero_grad()

:func:`feedback_step` overwrites the gradients of ``dfa`` / ``dfa_block`` layers and updates
the learned feedback of ``kolen_pollack``, ``weight_mirror`` and GrAPE layers; for ``bp``,
``fa`` and ``sign_sym`` it does nothing, so a generic trainer can always call it
(:func:`has_feedback_step` / :func:`needs_output_error` tell whether it matters and whether
``e`` is needed). ``dfa`` layers additionally need :func:`initialize_dfa_targets` once (or
``convert(..., dfa_target_dim=...)``); ``dfa_block`` layers :func:`initialize_dfa_block_targets`
(or ``convert(..., dfa_block_dim=...)``).

Rules (``method``), all with BP's weight and bias gradients unless stated:

=================  =========================================================================
``bp``             plain backpropagation (``nn.Linear`` / ``nn.Conv2d`` exactly)
``fa``             input gradient through a fixed random B (W's shape); ``fa_grape=True``
                   aligns B to W from forward probes (GrAPE)
``sign_sym``       input gradient through ``sign(W) ||W||_F / sqrt(numel W)``
``kolen_pollack``  ``fa`` whose B receives W's gradient (plus decay): B -> W
``weight_mirror``  ``fa`` whose B learns from the layer's response to injected noise: B -> W
``dfa``            weight gradient ``(e B_dfa^T)^T x`` from the output error (Linear only)
``dfa_block``      weight gradient from the error at the block output (Linear only)
=================  =========================================================================

Conventions: B has W's shape ``(out, in)`` (conv: ``(C_out, C_in/groups, kh, kw)``) and the
backward computes ``grad_x = grad_out . B``, so ``B == W`` reproduces BP and "B -> W" is the
issue's "B -> W^T" for a B stored as the backward's matrix.
"""
from .base import LocalRuleMixin
from .conv import LocalConv2d
from .convert import convert
from .dfa import (
    BlockErrorTap,
    apply_dfa_block_update,
    apply_dfa_update,
    initialize_dfa_block_targets,
    initialize_dfa_targets,
)
from .functions import conv2d_with_feedback, linear_with_feedback, sign_feedback
from .inits import init_feedback
from .learned import grape_align_step, kolen_pollack_step, weight_mirror_step
from .linear import LocalLinear
from .options import CONV_METHODS, FA_INIT_MODES, METHODS, RuleOptions
from .readouts import bp_twin, feedback_alignment, update_alignment
from .step import feedback_step, has_feedback_step, local_layers, needs_output_error
from .stiefel import StiefelExpander, StiefelFeedback, row_orthonormal

__all__ = [
    "METHODS", "CONV_METHODS", "FA_INIT_MODES", "RuleOptions",
    "LocalLinear", "LocalConv2d", "LocalRuleMixin",
    "linear_with_feedback", "conv2d_with_feedback", "sign_feedback", "init_feedback",
    "feedback_step", "has_feedback_step", "needs_output_error", "local_layers",
    "initialize_dfa_targets", "apply_dfa_update", "initialize_dfa_block_targets",
    "apply_dfa_block_update", "BlockErrorTap",
    "grape_align_step", "kolen_pollack_step", "weight_mirror_step",
    "convert",
    "feedback_alignment", "update_alignment", "bp_twin",
    "StiefelFeedback", "StiefelExpander", "row_orthonormal",
]
