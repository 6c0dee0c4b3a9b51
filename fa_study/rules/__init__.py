"""Every learning rule of the package, in one registry.

``RULES`` maps names to :class:`Method` classes; ``build_rule(name, **options)`` builds one,
checking the options against those the class declares (``RULES[name].OPTIONS``) and naming
the allowed ones on error. A rule you write yourself (a subclass of :class:`Method`, or of
:class:`BlockLocal` for a block-local rule: supply ``signals`` and, if its feedback learns,
``learn``) joins the registry with :func:`register` and is then trained, audited and offered
in the control panels like any other (notebook 06).

Families (``RULES[name].family``): ``bp``; ``baseline`` (frozen, shallow); ``block`` (fa, dfa,
oracle); ``learned`` (grape_fa, stiefel_dfa); ``layer`` (the layer-level rules of
:mod:`fa_study.feedback` on a converted model); ``ra`` (reciprocal alignment on
:class:`fa_study.models.MatrixMLP`). :func:`rule_table` lists them with what each supports.

Which rules train a network the package did not build is asked of the class
(:attr:`Method.needs_blocks`, :meth:`Method.check_trainable`): bp, frozen and the layer rules
(except layer_dfa_block) train any classifier ``nn.Module``; the block-local, learned-block and
RA rules need the package's block interface (or MatrixMLP) and refuse other networks at setup.
"""
from __future__ import annotations

import pandas as pd

from ..config import check_choice
from .base import (BlockLocal, CreditContext, Method, Option, backward_local, local_forward,
                   local_surrogate, output_error, rms_normalise, surrogate_output_grads)
from .block import BP, DFA, FA, Frozen, Oracle, Shallow
from .layer import (BatchRandomSign, FixedRandomSign, KolenPollack, LayerDFA, LayerDFABlock,
                    LayerFA, LayerGrAPE, LayerRule, SignSymmetry, WeightMirror)
from .learned import GrAPEFA, StiefelDFA
from .ra import RACombined, RAFixed, RAReconstruction, RAReverse, RARule

RULES: dict[str, type[Method]] = {}


def register(cls: type[Method], *, replace: bool = False) -> type[Method]:
    """Add a rule class to :data:`RULES` under ``cls.name`` (usable as a class decorator).

    Refuses a class that is not a :class:`Method`, has no name, or whose name is taken by
    another class (unless ``replace``: re-running a notebook cell that defines the rule).
    """
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"register() takes a subclass of fa_study.rules.Method, got {cls!r}")
    if not cls.name or not isinstance(cls.name, str):
        raise ValueError(f"{cls.__name__} needs a class attribute name = '...' (its registry key)")
    have = RULES.get(cls.name)
    if have is not None and have is not cls and not (replace or have.__qualname__ == cls.__qualname__):
        raise ValueError(f"a rule named {cls.name!r} is already registered ({have.__module__}."
                         f"{have.__qualname__}); pick another name or pass replace=True")
    RULES[cls.name] = cls
    return cls


for _cls in (BP, Frozen, Shallow, FA, DFA, Oracle, GrAPEFA, StiefelDFA, LayerFA, SignSymmetry,
             FixedRandomSign, BatchRandomSign, LayerGrAPE, KolenPollack, WeightMirror, LayerDFA,
             LayerDFABlock, RAFixed, RAReverse, RAReconstruction, RACombined):
    register(_cls)


# the names studies select result rows by: BP (the reference every rule is read against) and the
# rule D3 compares accuracies with (the one class declaring ``is_d3_baseline``)
BP_REFERENCE: str = BP.name
D3_BASELINE: str = next(n for n, c in RULES.items() if c.is_d3_baseline)


def get_rule(name: str) -> type[Method]:
    """The class registered as ``name`` (ValueError listing the registered names otherwise)."""
    check_choice("rule", name, tuple(RULES))
    return RULES[name]


def build_rule(name: str, **options) -> Method:
    """Build the rule ``name`` with ``options`` (checked against ``RULES[name].OPTIONS``)."""
    return get_rule(name)(**options)


def rule_table(archs: tuple[str, ...] = ("resmlp", "vit", "resnet")) -> pd.DataFrame:
    """One row per registered rule: family, summary, its options, the flags the package asks
    of it (``any_model``: it trains any classifier ``nn.Module``, not only the package's block
    models), and whether it trains each of ``archs``."""
    rows = []
    for name, cls in RULES.items():
        row = {"rule": name, "family": cls.family, "summary": cls.summary,
               "options": ", ".join(cls.OPTIONS) or "-", "penalty": cls.takes_penalty,
               "random_feedback": cls.has_random_feedback, "learns_feedback": cls.learns_feedback,
               "baseline": cls.is_baseline, "any_model": not cls.needs_blocks}
        row.update({a: cls.supports(a) for a in archs})
        rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["RULES", "BP_REFERENCE", "D3_BASELINE", "register", "get_rule", "build_rule", "rule_table", "Method", "BlockLocal",
           "CreditContext", "Option", "LayerRule", "RARule", "BP", "Frozen", "Shallow", "FA", "DFA",
           "Oracle", "GrAPEFA", "StiefelDFA", "local_forward", "backward_local", "local_surrogate",
           "surrogate_output_grads", "output_error", "rms_normalise"]
