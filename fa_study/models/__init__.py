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

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from ..config import MAX_PARAMETERS, check_choice
from .base import BlockModel
from .mlp import MLP, MatrixMLP
from .resmlp import ResidualMLP
from .resnet import SmallResNet
from .vit import ViTMini



@dataclass(frozen=True)
class Architecture:
    """One registered architecture: its class, the reference's sizes, and whether the
    reference study audits it (D1-D3 on CIFAR)."""

    cls: type
    d: int
    num_blocks: int
    audited: bool = False
    long_run_share: float = 1.0  # share of a long (>= 50 epochs) audit it trains, as the reference


ARCHITECTURES: dict[str, Architecture] = {}


VARIANTS: dict[str, tuple[str, int, int]] = {"resmlp_d512_L2": ("resmlp", 512, 2)}
DEFAULTS: dict[str, dict[str, int]] = {}  # the reference study's sizes, per registered arch


def arch_names() -> tuple[str, ...]:
    """The registered architectures (read when asked: one registered later counts)."""
    return tuple(ARCHITECTURES)


def audit_archs() -> tuple[str, ...]:
    """The registered architectures the reference study audits (D1-D3 on CIFAR)."""
    return tuple(n for n, a in ARCHITECTURES.items() if a.audited)


def audit_models() -> tuple[str, ...]:
    """What an audit offers: the audited architectures and their named variants."""
    return tuple(n for a in audit_archs() for n in (a, *(v for v, s in VARIANTS.items() if s[0] == a)))


def model_names() -> tuple[str, ...]:
    """Every name a model can be built by: the architectures and the named variants."""
    return arch_names() + tuple(VARIANTS)


def register_arch(name: str, cls: type, *, d: int, num_blocks: int, audited: bool = False,
                  long_run_share: float = 1.0) -> None:
    """Register an architecture under ``name``: the one place a new model is added (``cls``
    takes ``(input_shape, num_classes, d, num_blocks, **options)``). What it supports is asked of
    its model (each rule's ``fits``), never listed; the lists of names are read from the registry
    when asked (:func:`arch_names`, :func:`model_names`, ...), so a model registered after import
    (e.g. in a notebook) is built, checked and run like the package's own."""
    ARCHITECTURES[name] = Architecture(cls, d, num_blocks, audited, long_run_share)
    DEFAULTS[name] = {"d": d, "num_blocks": num_blocks}


register_arch("resmlp", ResidualMLP, d=256, num_blocks=4, audited=True)
register_arch("vit", ViTMini, d=128, num_blocks=4, audited=True, long_run_share=0.6)  # run_all.sh: 60 of 100
register_arch("resnet", SmallResNet, d=64, num_blocks=4, audited=True)
register_arch("mlp", MLP, d=256, num_blocks=1)
register_arch("matrix_mlp", MatrixMLP, d=256, num_blocks=2)


def resolve(name: str, d: int | None = None,
            num_blocks: int | None = None) -> tuple[str, int | None, int | None]:
    """``(arch, d, num_blocks)`` of a model name (an arch or a named variant, which fixes both)."""
    check_choice("model", name, model_names())
    return VARIANTS.get(name, (name, d, num_blocks))


def display_name(arch: str, d: int | None, num_blocks: int | None) -> str:
    """The name a table shows: the variant's name when the sizes match one, else the arch."""
    return next((name for name, spec in VARIANTS.items() if spec == (arch, d, num_blocks)), arch)


# the arguments every model class takes positionally; everything else is a keyword option
_CORE_ARGUMENTS: tuple[str, ...] = ("input_shape", "num_classes", "d", "num_blocks")


def model_options(arch: str) -> dict[str, Any]:
    """The keyword options of ``arch``'s class (beyond input_shape, num_classes, d and
    num_blocks) with their defaults, read from the class's signature: the one list of them."""
    arch, _, _ = resolve(arch)
    sig = inspect.signature(ARCHITECTURES[arch].cls.__init__)
    return {n: p.default for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY}


def check_model_options(arch: str, options: dict) -> None:
    """ValueError naming the option and the allowed ones when ``options`` holds a name the class
    of ``arch`` does not take (its values are checked by the class itself)."""
    arch, _, _ = resolve(arch)
    allowed = model_options(arch)
    for name in options:
        if name in _CORE_ARGUMENTS:
            raise ValueError(f"{name!r} is not a model option of {arch!r}: it is an argument of its "
                             f"own (ModelSpec(arch, d, num_blocks) / build_model(arch, {name}=...))")
        if name not in allowed:
            listed = ", ".join(f"{k!r} (default {v!r})" for k, v in allowed.items()) or "none"
            raise ValueError(f"model {arch!r} ({ARCHITECTURES[arch].cls.__name__}) has no option {name!r}; "
                             f"allowed options: {listed}")


def _sizes(arch: str, d: int | None, num_blocks: int | None) -> tuple[str, int, int]:
    arch, d, num_blocks = resolve(arch, d, num_blocks)
    a = ARCHITECTURES[arch]
    return arch, a.d if d is None else d, a.num_blocks if num_blocks is None else num_blocks


@functools.lru_cache(maxsize=512)
def _meta(arch: str, input_shape: tuple, num_classes: int, d: int, num_blocks: int,
          options: tuple) -> BlockModel:
    try:
        with torch.device("meta"):  # shapes only: nothing allocated, no random numbers drawn
            return ARCHITECTURES[arch].cls(input_shape, num_classes, d, num_blocks, **dict(options))
    except TypeError as exc:  # a value of a type the class's arithmetic cannot take
        raise ValueError(f"model {arch!r} cannot be built with d={d!r}, num_blocks={num_blocks!r}, "
                         f"options {dict(options)!r}: {exc}") from None


def _neutral_shape(arch: str, kw: dict) -> tuple[int, int, int]:
    """The smallest input every check of the class accepts when no data is known yet: one
    channel and, for a patch model, one patch."""
    patch = kw.get("patch_size", model_options(arch).get("patch_size", 1))
    return (1, patch, patch) if isinstance(patch, int) and not isinstance(patch, bool) and patch >= 1 \
        else (1, 1, 1)


def meta_model(arch: str, *, input_shape=None, num_classes: int = 2, d: int | None = None,
               num_blocks: int | None = None, **kw) -> BlockModel:
    """The model :func:`build_model` would build, on the meta device (shapes only: nothing is
    allocated and no random number drawn), after every check :func:`build_model` makes
    (:func:`check_model`). ``input_shape=None``: the smallest input the class accepts (for
    checks made before the data is known). Do not modify it: equal calls share one object."""
    arch, d, num_blocks = _sizes(arch, d, num_blocks)
    check_model_options(arch, kw)
    neutral = input_shape is None
    if neutral:
        input_shape = _neutral_shape(arch, kw)
    try:
        shape = tuple(input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}") from None
    args = (arch, shape, num_classes, d, num_blocks, tuple(sorted(kw.items())))
    try:
        model = _meta(*args)
    except TypeError:  # an unhashable value (_meta turns the class's TypeErrors into ValueErrors)
        model = _meta.__wrapped__(*args)
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMETERS:
        where = (f"even on the smallest input {shape} (before the data is known)" if neutral
                 else f"input_shape={shape}, num_classes={num_classes}")
        raise ValueError(f"model {arch!r} with d={d}, num_blocks={num_blocks}, {where} "
                         f"would hold {count:,} parameters, more than "
                         f"{MAX_PARAMETERS:,} (fa_study.config.MAX_PARAMETERS: 4 bytes each, x4 with "
                         f"gradients and AdamW's moments); use a smaller d, num_blocks or input")
    return model


def check_model(arch: str, *, input_shape=(3, 32, 32), num_classes: int = 10, d: int | None = None,
                num_blocks: int | None = None, **kw) -> int:
    """Everything :func:`build_model` would refuse, as a ValueError, without allocating: the
    option names (:func:`check_model_options`), every check of the class (the model is built on
    the meta device, which holds shapes only) and at most :data:`fa_study.config.MAX_PARAMETERS`
    parameters. Returns the parameter count."""
    model = meta_model(arch, input_shape=input_shape, num_classes=num_classes, d=d,
                       num_blocks=num_blocks, **kw)
    return sum(p.numel() for p in model.parameters())


def build_model(arch: str, *, input_shape=(3, 32, 32), num_classes: int = 10, d: int | None = None,
                num_blocks: int | None = None, **kw) -> BlockModel:
    """Build ``arch`` (one of :func:`arch_names`, or a name of :data:`VARIANTS`) with width ``d`` and
    ``num_blocks`` blocks.

    ``None`` means the reference default (see :data:`DEFAULTS`); other keywords go to the class
    (e.g. ``residual=False`` or ``activation="identity"`` for ResidualMLP, ``heads`` for ViTMini,
    ``activation`` for MLP and MatrixMLP, ``ln`` for MatrixMLP; :func:`model_options` lists them).
    Everything is checked before anything is allocated (:func:`check_model`): an unknown option or
    a bad value is a ValueError naming it. Parameters are drawn from torch's global generator:
    seed first for reproducible models.
    """
    arch, d, num_blocks = _sizes(arch, d, num_blocks)
    check_model(arch, input_shape=input_shape, num_classes=num_classes, d=d, num_blocks=num_blocks, **kw)
    return ARCHITECTURES[arch].cls(tuple(input_shape), num_classes, d, num_blocks, **kw)


__all__ = ["arch_names", "audit_archs", "audit_models", "ARCHITECTURES", "Architecture", "register_arch",
           "DEFAULTS", "VARIANTS", "model_names", "BlockModel", "MLP",
           "MatrixMLP", "ResidualMLP", "SmallResNet", "ViTMini", "build_model", "resolve",
           "display_name", "model_options", "check_model_options", "check_model", "meta_model"]
