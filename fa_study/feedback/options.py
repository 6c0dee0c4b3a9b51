"""The per-layer options that tune the learning rules, validated when they are built.

Every local layer (``LocalLinear``, ``LocalConv2d``) carries one :class:`RuleOptions` (on its
strategy, see :mod:`fa_study.feedback.strategies`); the rule names and their classes live in
:mod:`fa_study.feedback.strategies`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..config import MAX_NOISE_SAMPLES, MAX_PROBES, check_bool, check_choice, check_float, check_int

FA_INIT_MODES: tuple[str, ...] = ("gaussian", "orthogonal", "ortho_he", "sparse")


def check_decay(decay, what: str = "b_decay") -> float | None:
    """A per-step multiplicative decay: a finite number in [0, 1), or None (the rule's default)."""
    return check_float(what, decay, 0.0, 1.0, high_open=True, none_ok=True,
                       none_means="the rule's default")


def check_lr_b(lr_b, what: str = "lr_b") -> float | None:
    """A step size of a feedback update: a finite number >= 0 (None: the layer's own)."""
    return check_float(what, lr_b, 0.0, none_ok=True, none_means="the layer's lr_b")


@dataclass(frozen=True, init=False)
class RuleOptions:
    """Per-layer settings of the feedback rules (each ignored by the rules that do not use it;
    a switch that turns a behaviour on, ``fa_grape``, is refused by a rule without it).

    Build it from keyword options, ``RuleOptions(lr_b=0.1, fa_init_mode="sparse")``: an unknown
    name, a value of the wrong type (a string, a bool for a number, a fraction for a count) or
    outside its range (NaN, infinities) is a ``ValueError`` naming the option, the value and
    what is allowed.

    init_std: scale of a random feedback matrix (std of a Gaussian B; of M for ``frsf`` /
        ``brsf``). ``None`` (default) means the root-mean-square of the layer's weight at the
        moment B is drawn, so that ``||B||_F ~= ||W||_F`` for a fresh layer *and* for a trained
        layer converted in place; the reference's fixed 0.02 only suits its own weight init.
    fa_init_mode: one of :data:`FA_INIT_MODES` (``fa``, ``kolen_pollack``, ``weight_mirror``
        and ``frsf``'s fixed M).
    fa_sparse_k: non-zeros per row for ``sparse`` (default ``max(1, fan_in // 16)``).
    fa_grape: with ``fa`` only, move B toward the forward-probed Jacobian after each backward.
    grape_n_probe: probes per GrAPE step (at most :data:`fa_study.config.MAX_PROBES`).
    grape_normalize_columns: renormalise B's columns after each GrAPE step (GrAPE paper, Eq. 6).
    grape_scale_free: the GrAPE step of :func:`fa_study.feedback.grape_step`: True (default)
        closes the fraction ``lr_b`` of the angle per step whatever B's size; False is the
        reference's plain gradient step ``B -= lr_b d(1 - cos)/dB``.
    lr_b: step size of the B update (GrAPE, Kolen-Pollack, weight mirror).
    b_decay: multiplicative decay of B per step. ``None``: 0 for Kolen-Pollack, and
        ``lr_b * mirror_sigma**2`` for the weight mirror, which makes W itself the mirror's
        fixed point (see :func:`fa_study.feedback.learned.weight_mirror_step`).
    mirror_sigma: std of the noise injected by the weight mirror.
    mirror_n: noise samples per weight-mirror step (at most
        :data:`fa_study.config.MAX_NOISE_SAMPLES`).
    """

    init_std: float | None = None
    fa_init_mode: str = "gaussian"
    fa_sparse_k: int | None = None
    fa_grape: bool = False
    grape_n_probe: int = 32
    grape_normalize_columns: bool = False
    grape_scale_free: bool = True
    lr_b: float = 0.01
    b_decay: float | None = None
    mirror_sigma: float = 1.0
    mirror_n: int = 64

    def __init__(self, **options):
        unknown = sorted(set(options) - set(RULE_OPTION_NAMES))
        if unknown:
            raise ValueError(f"unknown feedback option(s) {', '.join(map(repr, unknown))}; "
                             f"allowed options: {', '.join(RULE_OPTION_NAMES)}")
        values = {f.name: options.get(f.name, f.default) for f in fields(type(self))}
        check_choice("fa_init_mode", values["fa_init_mode"], FA_INIT_MODES)
        checked = {
            "init_std": check_float("init_std", values["init_std"], 0.0, low_open=True,
                                    none_ok=True, none_means="the RMS of the layer's weight"),
            "fa_init_mode": values["fa_init_mode"],
            "fa_sparse_k": check_int("fa_sparse_k", values["fa_sparse_k"], 1, none_ok=True,
                                     none_means="max(1, fan_in // 16)"),
            "fa_grape": check_bool("fa_grape", values["fa_grape"]),
            "grape_n_probe": check_int("grape_n_probe", values["grape_n_probe"], 1, MAX_PROBES,
                                       bound="fa_study.config.MAX_PROBES"),
            "grape_normalize_columns": check_bool("grape_normalize_columns",
                                                  values["grape_normalize_columns"]),
            "grape_scale_free": check_bool("grape_scale_free", values["grape_scale_free"]),
            "lr_b": check_float("lr_b", values["lr_b"], 0.0),
            "b_decay": check_decay(values["b_decay"]),
            "mirror_sigma": check_float("mirror_sigma", values["mirror_sigma"], 0.0,
                                        low_open=True),
            "mirror_n": check_int("mirror_n", values["mirror_n"], 1, MAX_NOISE_SAMPLES,
                                  bound="fa_study.config.MAX_NOISE_SAMPLES"),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def validate(self, method: str) -> None:
        """Raise ``ValueError`` if ``method`` is not a rule name or cannot use these options
        (a switch such as ``fa_grape`` set for a rule without it)."""
        from .strategies import rule_class  # the name -> class table

        rule_class(method).check_options(self)


RULE_OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(RuleOptions))


def make_options(options: dict) -> RuleOptions:
    """:class:`RuleOptions` from a dict of keyword options (unknown keys are a ValueError)."""
    return RuleOptions(**options)
