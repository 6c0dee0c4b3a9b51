"""Layer-level learning rules: LocalLinear / LocalConv2d, DFA, GrAPE, Kolen-Pollack, weight
mirrors, sign-concordant feedback, Stiefel feedback, a model converter and alignment read-outs.

Training any converted model is the ordinary loop plus two calls that do nothing for rules
that do not need them::

    from fa_study.feedback import capture_output_error, convert, feedback_step

    model, report = convert(model, "dfa", dfa_target_dim=10)   # any rule in METHODS
    ...
    out = model(x)
    capture_output_error(model, out)      # after the forward, before backward: records dL/d out
    loss = loss_fn(out, y); loss.backward()
    feedback_step(model)                  # every rule's post-backward update
    optimizer.step(); optimizer.zero_grad()

:func:`capture_output_error` matters for ``dfa`` and ``dfa_ungated`` (their layers need the
output error during / after the backward); :func:`feedback_step` updates the learned feedback
of ``kolen_pollack``, ``weight_mirror`` and GrAPE layers and overwrites the gradients of
``dfa_ungated`` / ``dfa_block`` layers. :func:`needs_output_error` / :func:`has_feedback_step`
tell whether a model needs either, so a generic trainer can call them always or skip them.
``dfa`` / ``dfa_ungated`` layers need :func:`initialize_dfa_targets` once (or
``convert(..., dfa_target_dim=...)``); ``dfa_block`` layers :func:`initialize_dfa_block_targets`
(or ``convert(..., dfa_block_dim=...)``).

Rules (``method``), with autograd's weight and bias gradients from the ``grad_out`` each layer
receives unless stated; "Conv" says whether ``LocalConv2d`` runs it:

=================  ====  ===================================================================
``bp``             Conv  plain backpropagation (``nn.Linear`` / ``nn.Conv2d`` exactly)
``fa``             Conv  input gradient through a fixed random B (W's shape); ``fa_grape=True``
                         aligns B to W from forward probes (GrAPE, :func:`grape_step`)
``sign_sym``       Conv  input gradient through ``sign(W) ||W||_F / sqrt(numel W)`` (seed 000)
``frsf``           Conv  input gradient through ``|M| * sign(W)``, M drawn once and fixed
                         (Liao et al. 2016; biotorch's name)
``brsf``           Conv  input gradient through ``|M_t| * sign(W)``, M_t redrawn every batch
``dfa``            Conv  Nøkland's DFA: input gradient ``e @ B_dfa`` from the output error
                         e (conv: transposed conv of e broadcast over positions), so the layer
                         below updates by ``((e B^T) * f'(a))^T x``; needs
                         :func:`capture_output_error`
``dfa_ungated``          seed 000's DFA: weight gradient overwritten by ``(e B_dfa^T)^T x``
                         after the backward, not gated by ``f'`` (Linear only)
``dfa_block``            weight gradient from the error at the block output (Linear only)
``kolen_pollack``  Conv  ``fa`` whose B receives W's gradient (plus decay): B -> W
``weight_mirror``  Conv  ``fa`` whose B learns from the layer's response to injected noise
=================  ====  ===================================================================

Each rule is a strategy class (:mod:`fa_study.feedback.strategies`) held by the layer as
``layer.strategy``; :data:`RULES` maps the names above to them. Options are the fields of
:class:`RuleOptions`, validated on construction (an unknown name or a bad value is a
``ValueError`` naming it). Random feedback is redrawn with ``layer.reset_feedback(generator=)``
where ``layer.has_random_feedback``.

Conventions: B has W's shape ``(out, in)`` (conv: ``(C_out, C_in/groups, kh, kw)``) and the
backward computes ``grad_x = grad_out . B``, so ``B == W`` reproduces BP and "B -> W" is the
issue's "B -> W^T" for a B stored as the backward's matrix. A ``dfa`` layer's ``B_dfa``
``(target_dim, in)`` instead maps the output error to the layer's *input*: it is the feedback
of the layer below.
"""
from .base import LocalRuleMixin
from .conv import LocalConv2d
from .convert import convert
from .dfa import (
    BlockErrorTap,
    apply_dfa_block_update,
    apply_dfa_update,
    capture_output_error,
    initialize_dfa_block_targets,
    initialize_dfa_targets,
)
from .functions import conv2d_with_feedback, linear_with_feedback, sign_feedback
from .inits import init_feedback
from .learned import grape_step, kolen_pollack_step, probe_jacobian, weight_mirror_step
from .linear import LocalLinear
from .options import FA_INIT_MODES, RuleOptions
from .step import feedback_step, has_feedback_step, local_layers, needs_output_error
from .stiefel import StiefelExpander, StiefelFeedback, row_orthonormal
from .strategies import CONV_METHODS, METHODS, RULES, LayerStrategy, make_strategy

__all__ = [
    "METHODS", "CONV_METHODS", "FA_INIT_MODES", "RuleOptions", "RULES", "LayerStrategy",
    "make_strategy",
    "LocalLinear", "LocalConv2d", "LocalRuleMixin",
    "linear_with_feedback", "conv2d_with_feedback", "sign_feedback", "init_feedback",
    "feedback_step", "has_feedback_step", "needs_output_error", "capture_output_error",
    "local_layers",
    "initialize_dfa_targets", "apply_dfa_update", "initialize_dfa_block_targets",
    "apply_dfa_block_update", "BlockErrorTap",
    "grape_step", "probe_jacobian", "kolen_pollack_step", "weight_mirror_step",
    "convert",
    "StiefelFeedback", "StiefelExpander", "row_orthonormal",
]
