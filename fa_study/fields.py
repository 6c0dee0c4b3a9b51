"""Declared options, one way for rules, run specs, studies and configs.

A setting is declared once with its default, the check that validates (and normalises) a
value, and a line of documentation: :class:`Option`. A rule lists its options in
``Method.OPTIONS = {"lr_b": Option(0.05, positive, "...")}``; a dataclass (a study, a run spec,
a training config) declares a field with :func:`option` and inherits :class:`Checked`, whose
``__post_init__`` runs every declared check and then the class's cross-field :meth:`Checked.check`.
A check is ``check(name, value) -> value`` and raises ``ValueError`` naming the setting, the
value and what is allowed (the ``check_*`` primitives of :mod:`fa_study.config`).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from .config import check_bool, check_choice, check_float, check_int, check_seed, check_seeds

Check = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Option:
    """One declared setting: its default, its check and a line of documentation."""

    default: Any
    check: Check
    doc: str = ""

    def field(self) -> Any:
        """This option as a dataclass field (mutable defaults are copied per instance)."""
        meta = {"check": self.check, "doc": self.doc}
        if isinstance(self.default, (list, dict, set)):
            default = self.default
            return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
        return dataclasses.field(default=self.default, metadata=meta)


def option(default: Any, check: Check, doc: str = "") -> Any:
    """A dataclass field declared as an :class:`Option`: ``lr: float = option(0.1, positive)``."""
    return Option(default, check, doc).field()


def check_fields(obj, prefix: str = "", keep: bool = False) -> None:
    """Run the declared check of every field of the dataclass ``obj`` (frozen or not), naming
    it ``prefix + name`` in errors and storing the normalised value (unless ``keep``)."""
    for f in dataclasses.fields(obj):
        check = f.metadata.get("check")
        if check is not None:
            value = check(prefix + f.name, getattr(obj, f.name))
            if not keep:
                object.__setattr__(obj, f.name, value)


class Checked:
    """Base of a dataclass whose fields are checked when it is built: the declared checks, then
    :meth:`check` for what involves several fields. A subclass may set ``FIELD_PREFIX`` (how
    errors name its fields, e.g. ``"TrainConfig."``) and ``KEEP_VALUES`` (store the values as
    given, not as the checks normalise them)."""

    FIELD_PREFIX: ClassVar[str] = ""
    KEEP_VALUES: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_fields(self, self.FIELD_PREFIX, self.KEEP_VALUES)
        self.check()

    def check(self) -> None:
        """Cross-field checks (override); the single fields are checked already."""


def field_docs(cls) -> dict[str, str]:
    """``{name: doc}`` of a dataclass's declared fields (for tables and widgets)."""
    return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}


# -- the usual checks -------------------------------------------------------------------------

def choice(*allowed: str) -> Check:
    """A check accepting one of ``allowed`` (its ``.allowed`` lists them for widgets)."""
    def check(name: str, value) -> str:
        check_choice(name, value, allowed)
        return value
    check.allowed = allowed  # type: ignore[attr-defined]
    return check


def int_range(low: int | None = None, high: int | None = None, **kw) -> Check:
    """A check accepting an int in ``[low, high]`` (keywords as :func:`fa_study.config.check_int`)."""
    return functools.partial(check_int, low=low, high=high, **kw)


def float_range(low: float | None = None, high: float | None = None, **kw) -> Check:
    """A check accepting a finite number in ``[low, high]`` (keywords as
    :func:`fa_study.config.check_float`)."""
    return functools.partial(check_float, low=low, high=high, **kw)


nonnegative = float_range(0.0)
positive = float_range(0.0, low_open=True)
fraction = float_range(0.0, 1.0)  # a number in [0, 1]
fraction_open = float_range(0.0, 1.0, high_open=True)  # a number in [0, 1)
positive_or_none = float_range(0.0, low_open=True, none_ok=True, none_means="derived")
positive_int = int_range(1)
positive_int_or_none = int_range(1, none_ok=True, none_means="the whole batch")
boolean, seed, seeds = check_bool, check_seed, check_seeds
