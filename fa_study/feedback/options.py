"""The learning rules' names and the per-layer options that tune them.

Every local layer (``LocalLinear``, ``LocalConv2d``) carries one :class:`RuleOptions`; the
model-level :func:`fa_study.feedback.feedback_step` reads it, so a trainer never needs to know
which rule a layer runs.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..config import check_choice

# Rules a LocalLinear can run. "fa", "kolen_pollack" and "weight_mirror" share one backward
# (grad_x = grad_out . B); they differ only in how B changes after each backward.
METHODS: tuple[str, ...] = (
    "bp", "fa", "sign_sym", "dfa", "dfa_block", "kolen_pollack", "weight_mirror",
)
# Rules a LocalConv2d can run: the direct-projection rules would need one feedback matrix per
# output position, which no reference defines.
CONV_METHODS: tuple[str, ...] = ("bp", "fa", "sign_sym", "kolen_pollack", "weight_mirror")
# Rules whose backward uses a stored feedback matrix B of W's shape.
STORED_B_METHODS: tuple[str, ...] = ("fa", "kolen_pollack", "weight_mirror")
FA_INIT_MODES: tuple[str, ...] = ("gaussian", "orthogonal", "ortho_he", "sparse")


@dataclass(frozen=True)
class RuleOptions:
    """Per-layer settings of the feedback rules (each ignored by the rules that do not use it).

    init_std: std of a Gaussian B (and the scale of the other init modes). ``None`` (default)
        means the root-mean-square of the layer's weight at the moment B is drawn, so that
        ``||B||_F ~= ||W||_F`` for a fresh layer *and* for a trained layer converted in place;
        the reference's fixed 0.02 only suits its own weight init. Pass a number to reproduce it.
    fa_init_mode: one of :data:`FA_INIT_MODES`.
    fa_sparse_k: non-zeros per row for ``sparse`` (default ``max(1, fan_in // 16)``).
    fa_grape: with ``fa`` only, move B toward the forward-probed Jacobian after each backward.
    grape_n_probe: probes per GrAPE step.
    grape_normalize_columns: renormalise B's columns after each GrAPE step (GrAPE paper, Eq. 6).
    lr_b: step size of the B update (GrAPE, Kolen-Pollack, weight mirror).
    b_decay: multiplicative decay of B per step. ``None``: 0 for Kolen-Pollack, and
        ``lr_b * mirror_sigma**2`` for the weight mirror, which makes W itself the mirror's
        fixed point (see :func:`fa_study.feedback.learned.weight_mirror_step`).
    mirror_sigma: std of the noise injected by the weight mirror.
    mirror_n: noise samples per weight-mirror step.
    """

    init_std: float | None = None
    fa_init_mode: str = "gaussian"
    fa_sparse_k: int | None = None
    fa_grape: bool = False
    grape_n_probe: int = 32
    grape_normalize_columns: bool = False
    lr_b: float = 0.01
    b_decay: float | None = None
    mirror_sigma: float = 1.0
    mirror_n: int = 64

    def validate(self, method: str) -> None:
        """Raise ``ValueError`` for a bad value or an option that ``method`` cannot use."""
        check_choice("fa_init_mode", self.fa_init_mode, FA_INIT_MODES)
        if self.fa_grape and method != "fa":
            raise ValueError(f"fa_grape=True needs method='fa', got method={method!r}")
        if self.init_std is not None and not self.init_std > 0:
            raise ValueError(f"init_std must be positive or None, got {self.init_std!r}")
        if self.fa_sparse_k is not None and self.fa_sparse_k < 1:
            raise ValueError(f"fa_sparse_k must be >= 1 or None, got {self.fa_sparse_k!r}")
        for name in ("grape_n_probe", "mirror_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not self.lr_b >= 0:
            raise ValueError(f"lr_b must be >= 0, got {self.lr_b!r}")
        if not self.mirror_sigma > 0:
            raise ValueError(f"mirror_sigma must be > 0, got {self.mirror_sigma!r}")
        check_decay(self.b_decay)


def check_decay(decay: float | None) -> None:
    """A per-step multiplicative decay must lie in [0, 1)."""
    if decay is not None and not 0.0 <= decay < 1.0:
        raise ValueError(f"b_decay must lie in [0, 1), got {decay!r}")


RULE_OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(RuleOptions))


def make_options(options: dict) -> RuleOptions:
    """Build :class:`RuleOptions` from keyword options, naming any unknown key."""
    unknown = sorted(set(options) - set(RULE_OPTION_NAMES))
    if unknown:
        raise ValueError(
            f"unknown feedback option(s) {unknown}; allowed: {', '.join(RULE_OPTION_NAMES)}")
    return RuleOptions(**options)
