"""Every learning rule of the package, in one registry.

``RULES`` maps names to :class:`Method` classes; ``build_rule(name, **options)`` builds one,
checking the options against those the class declares (``RULES[name].OPTIONS``) and naming
the allowed ones on error. A rule you write yourself (a subclass of :class:`Method`, or of
:class:`BlockLocal` for a block-local rule: supply ``signals`` and, if its feedback learns,
``learn``) joins the registry with :func:`register` and is then trained, audited and offered
in the control panels like any other (notebook 06).

Families (``RULES[name].family``): ``bp``; ``baseline`` (frozen, shallow); ``block`` (fa, dfa,
oracle); ``learned`` (grape_fa, stiefel_dfa); ``layer`` (:mod:`fa_study.rules.layer`: each
converts a model's ``nn.Linear`` / ``nn.Conv2d``, see :func:`convert`); ``ra`` (reciprocal
alignment on :class:`fa_study.models.MatrixMLP`). :func:`rule_table` lists them with what each
supports.

Which networks a rule trains is asked of the rule, about the network (:meth:`Method.fits`;
:meth:`Method.supports` for a registered architecture): bp, frozen and the layer rules (except
layer_dfa_block) train any classifier ``nn.Module``; the block-local, learned-block and RA rules
need the package's block interface (or MatrixMLP's matrices) and refuse other networks at setup.
"""
from __future__ import annotations

import pandas as pd

from ..models import audit_archs
from .base import (RULES, BlockLocal, CreditContext, Method, Option, backward_local, build_rule,
                   get_rule, local_forward, local_surrogate, output_error, register, rms_normalise,
                   surrogate_output_grads)
from .block import BP, DFA, FA, Frozen, Oracle, Shallow
from .layer import LAYER_RULES, LayerRule, convert, converting_rules
from .learned import GrAPEFA, StiefelDFA
from .ra import RACombined, RAFixed, RAReconstruction, RAReverse, RARule

for _cls in (BP, Frozen, Shallow, FA, DFA, Oracle, GrAPEFA, StiefelDFA, *LAYER_RULES, RAFixed,
             RAReverse, RAReconstruction, RACombined):
    register(_cls)


# the names studies select result rows by: BP (the reference every rule is read against) and the
# rule D3 compares accuracies with (the one class declaring ``is_d3_baseline``)
BP_REFERENCE: str = BP.name
D3_BASELINE: str = next(n for n, c in RULES.items() if c.is_d3_baseline)


def rule_table(archs: tuple[str, ...] | None = None) -> pd.DataFrame:
    """One row per registered rule: family, summary, its options, the flags the package asks
    of it (``any_model``: it trains any classifier ``nn.Module``, not only the package's block
    models), and whether it trains each of ``archs`` (default: the audited architectures)."""
    archs = audit_archs() if archs is None else archs
    return pd.DataFrame([{"rule": name, "family": cls.family, "summary": cls.summary,
                          "options": ", ".join(cls.OPTIONS) or "-", "penalty": cls.takes_penalty,
                          "random_feedback": cls.has_random_feedback,
                          "learns_feedback": cls.learns_feedback, "baseline": cls.is_baseline,
                          "any_model": not cls.needs_blocks, **{a: cls.supports(a) for a in archs}}
                         for name, cls in RULES.items()])


__all__ = ["RULES", "BP_REFERENCE", "D3_BASELINE", "register", "get_rule", "build_rule", "rule_table",
           "convert", "converting_rules", "LAYER_RULES", "Method", "BlockLocal",
           "CreditContext", "Option", "LayerRule", "RARule", "BP", "Frozen", "Shallow", "FA", "DFA",
           "Oracle", "GrAPEFA", "StiefelDFA", "local_forward", "backward_local", "local_surrogate",
           "surrogate_output_grads", "output_error", "rms_normalise"]
