"""Models behind one block interface (see :class:`BlockModel`).

``build_model(arch, ...)`` builds any of them by name:

==========  ==============  =====================================  ====================
arch        class           hidden state ``h_l``                   defaults (d, L)
==========  ==============  =====================================  ====================
resmlp      ResidualMLP     ``(batch, d)``                         256, 4
vit         ViTMini         ``(batch, tokens, d)``, cls first      128, 4 (4 heads)
resnet      SmallResNet     ``(batch, d, H, W)``                   64, 4
mlp         MLP             ``(batch, d)`` (no skip)               256, 1
matrix_mlp  MatrixMLP       ``(batch, d)`` (explicit matrices)     256, 2
==========  ==============  =====================================  ====================

The first three are the audit's architectures (reference 003); ``mlp`` is notebook 00's model
for the layer-level rules and ``matrix_mlp`` the explicit-matrix MLP of reciprocal alignment
(reference 001). All accept images ``(batch, C, H, W)`` of any size (ViTMini: H and W multiples
of its patch size, e.g. 1x28x28 with patches of 4 or 7) or flat inputs ``(batch, C*H*W)``.

Named variants (:data:`VARIANTS`), as the reference's ``run_all.sh`` names them, fix the width
and the depth: ``resmlp_d512_L2`` is the ResidualMLP at d=512, L=2.
"""
from __future__ import annotations

from ..config import check_choice
from .base import BlockModel
from .mlp import MLP, MatrixMLP
from .resmlp import ResidualMLP
from .resnet import SmallResNet
from .vit import ViTMini

ARCHS: tuple[str, ...] = ("resmlp", "vit", "resnet", "mlp", "matrix_mlp")
AUDIT_ARCHS: tuple[str, ...] = ("resmlp", "vit", "resnet")  # the reference study's architectures
_CLASSES = {"resmlp": ResidualMLP, "vit": ViTMini, "resnet": SmallResNet, "mlp": MLP,
            "matrix_mlp": MatrixMLP}
DEFAULTS: dict[str, dict[str, int]] = {  # the reference study's sizes
    "resmlp": {"d": 256, "num_blocks": 4},
    "vit": {"d": 128, "num_blocks": 4},
    "resnet": {"d": 64, "num_blocks": 4},
    "mlp": {"d": 256, "num_blocks": 1},
    "matrix_mlp": {"d": 256, "num_blocks": 2},
}
VARIANTS: dict[str, tuple[str, int, int]] = {"resmlp_d512_L2": ("resmlp", 512, 2)}
MODEL_NAMES: tuple[str, ...] = ARCHS + tuple(VARIANTS)


def resolve(name: str, d: int | None = None, num_blocks: int | None = None) -> tuple[str, int | None, int | None]:
    """``(arch, d, num_blocks)`` of a model name (an arch or a named variant, which fixes both)."""
    check_choice("model", name, MODEL_NAMES)
    if name in VARIANTS:
        return VARIANTS[name]
    return name, d, num_blocks


def display_name(arch: str, d: int | None, num_blocks: int | None) -> str:
    """The name a table shows: the variant's name when the sizes match one, else the arch."""
    for name, spec in VARIANTS.items():
        if spec == (arch, d, num_blocks):
            return name
    return arch


def build_model(arch: str, *, input_shape=(3, 32, 32), num_classes: int = 10, d: int | None = None,
                num_blocks: int | None = None, **kw) -> BlockModel:
    """Build ``arch`` (one of :data:`ARCHS`, or a name of :data:`VARIANTS`) with width ``d`` and
    ``num_blocks`` blocks.

    ``None`` means the reference default (see :data:`DEFAULTS`); other keywords go to the class
    (e.g. ``residual=False`` or ``activation="identity"`` for ResidualMLP, ``heads`` for ViTMini,
    ``activation`` for MLP and MatrixMLP, ``ln`` for MatrixMLP). Parameters are drawn from
    torch's global generator: seed first for reproducible models.
    """
    arch, d, num_blocks = resolve(arch, d, num_blocks)
    defaults = DEFAULTS[arch]
    d = defaults["d"] if d is None else d
    num_blocks = defaults["num_blocks"] if num_blocks is None else num_blocks
    return _CLASSES[arch](tuple(input_shape), num_classes, d, num_blocks, **kw)


__all__ = ["ARCHS", "AUDIT_ARCHS", "DEFAULTS", "VARIANTS", "MODEL_NAMES", "BlockModel", "MLP",
           "MatrixMLP", "ResidualMLP", "SmallResNet", "ViTMini", "build_model", "resolve",
           "display_name"]
