"""Every reading of a trained classifier, in one place, for any ``nn.Module``.

A reading looks at a network through two things, found once per call:

* its **hidden states** ``h_0 .. h_L``, captured by forward hooks
  (:func:`find_hidden_states`: automatic for the package's models, the reference's layout,
  ``blocks`` / ``layers`` containers and torchvision's ResNet and ViT; otherwise named with
  ``hidden=[...]``), and
* its **BP twin** (:func:`bp_twin`): the same weights with every layer that runs a backward of
  its own put back on plain BP, so ``g_l = dL/dh_l`` is always plain BP's gradient.

The readings:

==========================  ===================================================================
:func:`audit`               D1 / D2 / D3 and the verdict (reference 003's ``FAProtocol``)
:func:`direction_quality`   per state, cos(credit, g_l) and both magnitudes (reference 004)
:func:`fresh_feedback_null` the trained feedback against freshly drawn feedback (package rules)
:func:`update_alignment`    per weight, the update the network's rule applies against BP's
:func:`feedback_angles`     per layer, the angle between its feedback matrix B and W
:func:`bp_reference`        ``(h_l, g_l, logits)`` through the twin
:func:`model_credit`        what the network's own backward delivers at each ``h_l``
==========================  ===================================================================

Two lines audit a network the package did not build::

    from fa_study.diagnostics import audit
    print(audit(model, x_eval, y_eval, frozen_acc=0.41))
"""
from .audit import (D1_THRESHOLD, D2_EPS, D2_FACTOR, D2_FLOOR, D3_MARGIN_PP, PROTOCOL_EVAL,  # noqa: F401
                    AuditReport, audit, decide_d3, fired_flags, growth_since_init, report_from_dict,
                    verdict_from_flags, with_baseline)
from .direction import (COMPARES, DIRECTION_EVAL, HEALTHY_G, MEDIOCRE_COS, NULL_SEED, POOR_COS, READINGS,  # noqa: F401
                        credit_cosines, direction_quality, direction_reading, fresh_feedback_null,
                        read_direction_quality)
from .signals import (COSINE_EPS, bp_reference, buffers_preserved, eval_mode, hidden_gradients, model_credit,  # noqa: F401
                      per_sample_cosine, prepare)
from .taps import BlockStates, HiddenStates, HookedStates, Tap, find_hidden_states  # noqa: F401
from .twin import Twin, bp_twin  # noqa: F401
from .updates import feedback_angles, feedback_matrix, update_alignment  # noqa: F401

# every name imported above (the submodules themselves are not part of the interface)
__all__ = [n for n, v in dict(globals()).items() if not n.startswith("_") and type(v).__name__ != "module"]
