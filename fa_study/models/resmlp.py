"""Pre-LayerNorm residual MLP: embed -> L blocks ``h + W2 GELU(W1 LN(h))`` -> LN -> head."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import check_bool, check_choice, check_float
from .base import BlockModel, check_sizes
from .mlp import activate

ACTIVATIONS: tuple[str, ...] = ("gelu", "relu", "identity")


class ResidualBranch(nn.Module):
    """The branch ``f(h) = W2 act(W1 LN(h))`` of one block; ``(batch, d) -> (batch, d)``.

    ``W2`` starts small (normal, std ``w2_std``) with zero bias so each block begins near the
    identity map, as in the reference.
    """

    def __init__(self, d: int, w2_std: float = 0.01, activation: str = "gelu", norm: bool = True):
        super().__init__()
        check_choice("activation", activation, ACTIVATIONS)
        self.ln = nn.LayerNorm(d) if norm else nn.Identity()
        self.w1 = nn.Linear(d, d)
        self.w2 = nn.Linear(d, d)
        self.activation = activation
        nn.init.normal_(self.w2.weight, std=w2_std)
        nn.init.zeros_(self.w2.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w2(activate(self.w1(self.ln(h)), self.activation))


class ResidualMLP(BlockModel):
    """Deep residual MLP on flattened inputs.

    ``h_0 = W_e x`` ``(batch, d)``; ``h_{l+1} = h_l + f_l(h_l)`` (or ``f_l(h_l)`` with
    ``residual=False``); logits ``= head(LN(h_L))`` (terminal LN, switchable for tests).

    Args:
        input_shape: ``(C, H, W)`` of one input; inputs may also come flat ``(batch, C*H*W)``.
        num_classes: output classes.
        d: hidden width.
        num_blocks: L (0 gives the shallow baseline: embed -> LN -> head).
        residual: add the skip (``False`` gives a plain stack of the same blocks).
        w2_std: init std of each block's second linear (small: blocks start near identity).
        activation: ``"gelu"`` (reference), ``"relu"`` or ``"identity"`` (a linear model, for tests).
        block_norm: the pre-LN inside each block.
        final_norm: the terminal LN before the head.
    """

    arch = "resmlp"
    embed_modules = ("embed_linear",)

    def __init__(self, input_shape=(3, 32, 32), num_classes: int = 10, d: int = 256,
                 num_blocks: int = 4, *, residual: bool = True, w2_std: float = 0.01,
                 activation: str = "gelu", block_norm: bool = True, final_norm: bool = True):
        d, num_blocks = check_sizes(d, num_blocks)
        # every option checked here, also those only the blocks read (num_blocks=0 has none)
        check_bool("residual", residual)
        w2_std = check_float("w2_std", w2_std, 0.0)
        check_choice("activation", activation, ACTIVATIONS)
        check_bool("block_norm", block_norm)
        check_bool("final_norm", final_norm)
        super().__init__(input_shape, num_classes, d)
        self.residual = residual
        self.embed_linear = nn.Linear(self.input_dim, d)
        self.blocks = nn.ModuleList([ResidualBranch(d, w2_std, activation, block_norm)
                                     for _ in range(num_blocks)])
        self.out_ln = nn.LayerNorm(d) if final_norm else nn.Identity()
        self.out_head = nn.Linear(d, self.num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` -> ``h_0`` ``(batch, d)``."""
        return self.embed_linear(self.as_flat(x))

    def step_and_branch(self, l: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The branch ``f_l(h)`` ``(batch, d)`` is the block's own output (the whole update when
        not residual)."""
        f = self.blocks[l](h)
        return (h + f if self.residual else f), f
