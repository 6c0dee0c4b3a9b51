"""The mechanism of the layer-level rules: local layers, their autograd Functions, feedback
initialisations and updates, the errors direct feedback reads, and Stiefel feedback.

The rules themselves (which backward, which options, which update after it) are classes of
:mod:`fa_study.rules.layer`; :func:`fa_study.rules.convert` puts any model's ``nn.Linear`` /
``nn.Conv2d`` on one of them. Training a converted model is the ordinary loop plus two calls
that do nothing for rules that do not need them::

    from fa_study.feedback import capture_output_error, feedback_step
    from fa_study.rules import convert

    model, report = convert(model, "layer_dfa", num_classes=10)
    ...
    out = model(x)
    capture_output_error(model, out)      # after the forward, before backward: records dL/d out
    loss = loss_fn(out, y); loss.backward()
    feedback_step(model)                  # every rule's post-backward update
    optimizer.step(); optimizer.zero_grad()

Conventions: B has W's shape ``(out, in)`` (conv: ``(C_out, C_in/groups, kh, kw)``) and the
backward computes ``grad_x = grad_out . B``, so ``B == W`` reproduces BP and "B -> W" is the
"B -> W^T" of the papers for a B stored as the backward's matrix. A gated ``layer_dfa`` layer's
``B_dfa`` ``(target_dim, in)`` instead maps the output error to the layer's *input*: it is the
feedback of the layer below.
"""
from .convert import swap_layers, visible_layers
from .dfa import BlockErrorTap, capture_output_error
from .functions import conv2d_with_feedback, linear_with_feedback, sign_feedback
from .inits import FA_INIT_MODES, init_feedback
from .layers import LocalConv2d, LocalLayer, LocalLinear
from .learned import grape_step, kolen_pollack_step, probe_jacobian, weight_mirror_step
from .step import feedback_step, has_feedback_step, local_layers, needs_output_error
from .stiefel import StiefelExpander, StiefelFeedback, row_orthonormal

__all__ = [
    "FA_INIT_MODES", "LocalLinear", "LocalConv2d", "LocalLayer", "swap_layers", "visible_layers",
    "linear_with_feedback", "conv2d_with_feedback", "sign_feedback", "init_feedback",
    "feedback_step", "has_feedback_step", "needs_output_error", "capture_output_error",
    "local_layers", "BlockErrorTap", "grape_step", "probe_jacobian", "kolen_pollack_step",
    "weight_mirror_step", "StiefelFeedback", "StiefelExpander", "row_orthonormal",
]
