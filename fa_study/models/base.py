"""The block interface every model implements.

Hidden-state indexing (shared by methods, trainer and diagnostics)::

    h_0 = embed(x);   h_{l+1} = step(l, h_l)  for l = 0..L-1;   logits = readout(h_L)

``step`` is the whole update of block ``l`` (skip included), so no caller ever guesses
whether a block adds its own skip; ``branch`` is the residual branch ``f_l(h_l)`` that local
losses and penalties act on. Diagnostics differentiate through exactly these calls, so the
BP reference gradient is right for every architecture by construction.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..config import MAX_BLOCKS, MAX_WIDTH, check_int


class BlockModel(nn.Module):
    """Base class: embedding, a ModuleList of blocks, a readout.

    Subclasses set ``self.blocks`` (an ``nn.ModuleList``), ``self.out_head`` (and optionally
    ``self.out_ln``, the final norm), :attr:`embed_modules` and :attr:`residual`, and implement
    :meth:`embed`; they override :meth:`step` / :meth:`step_and_branch`, :meth:`pool` and
    :meth:`broadcast` where the defaults (blocks on hidden states ``(batch, d)``) do not fit.

    Attributes:
        arch: the architecture name used by :func:`fa_study.models.build_model`.
        width: the hidden width ``d`` (features per position).
        input_shape: ``(C, H, W)`` of one input image.
        num_classes: number of output classes.
    """

    arch: str = "block"
    embed_modules: tuple[str, ...] = ()  # the attributes holding the embedding's parameters
    residual: bool = False  # block l computes the branch f_l, and h_{l+1} = h_l + f_l(h_l)

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int):
        super().__init__()
        if len(tuple(input_shape)) != 3 or any(int(s) < 1 for s in input_shape):
            raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape!r}")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes!r}")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.width = check_width(width)

    # ---- sizes --------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """L, the number of blocks."""
        return len(self.blocks)

    @property
    def input_dim(self) -> int:
        """C*H*W, the flat input size."""
        return math.prod(self.input_shape)

    # ---- input handling -----------------------------------------------------------------

    def as_images(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(batch, C, H, W)`` from images or flat inputs ``(batch, C*H*W)`` (a view)."""
        if x.dim() == 2 and x.shape[1] == self.input_dim:
            return x.reshape(x.shape[0], *self.input_shape)
        if x.dim() == 4 and tuple(x.shape[1:]) == self.input_shape:
            return x
        raise ValueError(f"{type(self).__name__} expects inputs shaped (batch, {self.input_dim}) or "
                         f"(batch, {', '.join(map(str, self.input_shape))}); got {tuple(x.shape)}")

    def as_flat(self, x: torch.Tensor) -> torch.Tensor:
        """Flat inputs ``(batch, C*H*W)`` from images or flat inputs (a view when possible)."""
        return self.as_images(x).reshape(x.shape[0], self.input_dim)

    # ---- the block interface ------------------------------------------------------------

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (images or flat) -> ``h_0``."""
        raise NotImplementedError

    def step(self, l: int, h: torch.Tensor) -> torch.Tensor:
        """``h_{l+1}`` from ``h_l``: the whole update of block ``l``, skip included. Default:
        ``h + blocks[l](h)`` when :attr:`residual`, else ``blocks[l](h)``."""
        out = self.blocks[l](h)
        return h + out if self.residual else out

    def branch(self, l: int, h: torch.Tensor) -> torch.Tensor:
        """The residual branch ``f_l(h_l)``.

        For residual blocks ``h + f(h)`` it is the block's own output ``f(h)``. For blocks
        whose update is not ``h + f`` (SmallResNet's post-activation ReLU, the plain MLPs) it
        is *defined* as the block's net change ``step(l, h) - h``.
        """
        return self.step_and_branch(l, h)[1]

    def step_and_branch(self, l: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h_{l+1}, f_l(h_l))`` from one evaluation of block ``l`` (local rules use both)."""
        if self.residual:
            f = self.blocks[l](h)
            return h + f, f
        h_next = self.step(l, h)
        return h_next, h_next - h

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        """The per-sample vector ``(batch, d)`` of a hidden state, used for norms and readout
        (default: ``h`` itself, for hidden states ``(batch, d)``)."""
        return h

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Pooled vector ``(batch, d)`` -> logits ``(batch, num_classes)``: ``out_head`` after
        ``out_ln`` (the final norm) when the model has one."""
        norm = getattr(self, "out_ln", None)
        return self.out_head(z if norm is None else norm(z))

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """``h_L`` -> logits ``(batch, num_classes)``: pooling, final norm, head."""
        return self.classify(self.pool(h))

    def broadcast(self, a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Expand a per-sample signal ``(batch, d)`` over the positions of ``like`` (a view;
        default for hidden states ``(batch, d)``)."""
        return a.expand_as(like)

    def positions(self, h: torch.Tensor) -> int:
        """Positions per sample of a hidden state (1 for MLPs, tokens, or H*W)."""
        return h[0].numel() // self.width

    def forward(self, x: torch.Tensor, return_hidden: bool = False):
        """Logits ``(batch, num_classes)``, or ``(logits, [h_0, ..., h_L])`` with ``return_hidden``."""
        h = self.embed(x)
        hiddens = [h]
        for l in range(self.num_blocks):
            h = self.step(l, h)
            hiddens.append(h)
        logits = self.readout(h)
        return (logits, hiddens) if return_hidden else logits

    # ---- parameter groups ---------------------------------------------------------------

    def _parameters_of(self, names: tuple[str, ...]) -> list[nn.Parameter]:
        """The Parameters of the named attributes (modules or Parameters); a name the model does
        not have is a ValueError (a misspelt ``embed_modules`` would leave parameters untrained)."""
        missing = [n for n in names if not hasattr(self, n)]
        if missing:
            children = [n for n, _ in self.named_children()]
            raise ValueError(f"{type(self).__name__} has no attribute {missing[0]!r} (named in its "
                             f"embed_modules or as its head); its modules: {children}")
        parts = [getattr(self, n) for n in names]
        return [p for m in parts for p in ([m] if isinstance(m, nn.Parameter) else m.parameters())]

    def embed_parameters(self) -> list[nn.Parameter]:
        """Parameters of the embedding (the attributes named in :attr:`embed_modules`)."""
        return self._parameters_of(self.embed_modules)

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the readout: ``out_ln`` (when the model has one) and ``out_head``."""
        return self._parameters_of(("out_ln", "out_head") if hasattr(self, "out_ln") else ("out_head",))

    def block_parameters(self, l: int) -> list[nn.Parameter]:
        """Parameters of block ``l``."""
        if not 0 <= l < self.num_blocks:
            raise ValueError(f"block index must be in 0..{self.num_blocks - 1}, got {l}")
        return list(self.blocks[l].parameters())

    def extra_repr(self) -> str:
        return (f"arch={self.arch!r}, d={self.width}, L={self.num_blocks}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes}")


def check_width(value) -> int:
    """The width ``d``: a positive integer at most :data:`fa_study.config.MAX_WIDTH`."""
    return check_int("d", value, 1, MAX_WIDTH, bound="fa_study.config.MAX_WIDTH")


def check_sizes(d, num_blocks) -> tuple[int, int]:
    """The width ``d`` (:func:`check_width`) and the depth ``num_blocks``, an integer in
    ``[0, MAX_BLOCKS]``, as ints, checked in that order."""
    d = check_width(d)
    return d, check_int("num_blocks", num_blocks, 0, MAX_BLOCKS, bound="fa_study.config.MAX_BLOCKS")
