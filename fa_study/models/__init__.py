"""Models behind one block interface (see :class:`BlockModel`).

``build_model(arch, ...)`` builds any of them by name:

========  ==============  =====================================  ====================
arch      class           hidden state ``h_l``                   defaults (d, L)
========  ==============  =====================================  ====================
resmlp    ResidualMLP     ``(batch, d)``                         256, 4
vit       ViTMini         ``(batch, tokens, d)``, cls first      128, 4 (4 heads)
resnet    SmallResNet     ``(batch, d, H, W)``                   64, 4
========  ==============  =====================================  ====================
"""
from __future__ import annotations

from ..config import check_choice
from .base import BlockModel
from .resmlp import ResidualMLP
from .resnet import SmallResNet
from .vit import ViTMini

ARCHS: tuple[str, ...] = ("resmlp", "vit", "resnet")
_CLASSES = {"resmlp": ResidualMLP, "vit": ViTMini, "resnet": SmallResNet}
DEFAULTS: dict[str, dict[str, int]] = {  # the reference study's sizes
    "resmlp": {"d": 256, "num_blocks": 4},
    "vit": {"d": 128, "num_blocks": 4},
    "resnet": {"d": 64, "num_blocks": 4},
}


def build_model(arch: str, *, input_shape=(3, 32, 32), num_classes: int = 10, d: int | None = None,
                num_blocks: int | None = None, **kw) -> BlockModel:
    """Build ``arch`` (one of :data:`ARCHS`) with width ``d`` and ``num_blocks`` blocks.

    ``None`` means the reference default (see :data:`DEFAULTS`); other keywords go to the class
    (e.g. ``residual=False`` or ``activation="identity"`` for ResidualMLP, ``heads`` for ViTMini).
    Parameters are drawn from torch's global generator: seed first for reproducible models.
    """
    check_choice("arch", arch, ARCHS)
    defaults = DEFAULTS[arch]
    d = defaults["d"] if d is None else d
    num_blocks = defaults["num_blocks"] if num_blocks is None else num_blocks
    return _CLASSES[arch](tuple(input_shape), num_classes, d, num_blocks, **kw)


__all__ = ["ARCHS", "DEFAULTS", "BlockModel", "ResidualMLP", "SmallResNet", "ViTMini", "build_model"]
