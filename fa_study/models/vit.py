"""ViT-Mini: 4x4 patches, a cls token, pre-LN transformer blocks, terminal LN on the cls token."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import MAX_HEADS, MAX_MLP_RATIO, MAX_TOKENS, check_float, check_int
from .base import BlockModel, check_sizes


class TransformerBlock(nn.Module):
    """Pre-LN transformer block on ``(batch, tokens, d)``: ``x = x + attn(LN1 x); x = x + mlp(LN2 x)``.

    Calling the module returns the block's whole change ``f(h) = attn + mlp`` (the branch), like
    the residual MLP's blocks; the model adds the skip, so ``step(l, h) = h + f(h)`` and hooks
    on the block see the branch.
    """

    def __init__(self, d: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        hidden = int(d * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.ln1(h)
        attn, _ = self.attn(z, z, z, need_weights=False)
        return attn + self.mlp(self.ln2(h + attn))


class ViTMini(BlockModel):
    """Minimal vision transformer.

    ``h_0`` ``(batch, 1 + (H/p)(W/p), d)``: conv patch embedding, a learned cls token in front,
    learned position embeddings. ``h_{l+1} = h_l + f_l(h_l)``. The readout takes the cls token,
    applies the terminal LN and the linear head.

    Args:
        input_shape: ``(C, H, W)``; H and W must be multiples of ``patch_size``.
        num_classes: output classes.
        d: model width.
        num_blocks: L (0 gives the shallow baseline).
        heads: attention heads (must divide ``d``).
        patch_size: side of the square patches.
        mlp_ratio: hidden width of each block's MLP relative to ``d``.
    """

    arch = "vit"
    embed_modules = ("patch_embed", "cls_token", "pos_embed")
    residual = True

    def __init__(self, input_shape=(3, 32, 32), num_classes: int = 10, d: int = 128,
                 num_blocks: int = 4, *, heads: int = 4, patch_size: int = 4,
                 mlp_ratio: float = 4.0):
        d, num_blocks = check_sizes(d, num_blocks)
        heads = check_int("heads", heads, 1, MAX_HEADS, bound="fa_study.config.MAX_HEADS")
        patch_size = check_int("patch_size", patch_size, 1)
        mlp_ratio = check_float("mlp_ratio", mlp_ratio, 0.0, low_open=True)
        if mlp_ratio > MAX_MLP_RATIO:
            raise ValueError(f"mlp_ratio must be a finite number > 0 and <= {MAX_MLP_RATIO:g} "
                             f"(fa_study.config.MAX_MLP_RATIO), got {mlp_ratio!r}")
        if int(d * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio:g} gives the blocks' MLP int(d * mlp_ratio) = 0 "
                             f"hidden units at d={d}; use mlp_ratio >= {1 / d:g}")
        super().__init__(input_shape, num_classes, d)
        c, hgt, wid = self.input_shape
        if hgt % patch_size or wid % patch_size:
            raise ValueError(f"image size {hgt}x{wid} must be a multiple of patch_size={patch_size}")
        if d % heads:
            raise ValueError(f"d={d} must be divisible by heads={heads}; allowed heads for d={d}: "
                             + ", ".join(str(h) for h in range(1, min(d, MAX_HEADS) + 1) if d % h == 0))
        tokens = 1 + (hgt // patch_size) * (wid // patch_size)
        if tokens > MAX_TOKENS:
            raise ValueError(f"patch_size={patch_size} on {hgt}x{wid} images gives {tokens} tokens, more "
                             f"than {MAX_TOKENS} (fa_study.config.MAX_TOKENS: attention memory grows "
                             f"with tokens^2); use a larger patch_size")
        self.heads, self.patch_size = heads, patch_size
        self.num_tokens = tokens
        self.patch_embed = nn.Conv2d(c, d, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, d))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList([TransformerBlock(d, heads, mlp_ratio) for _ in range(num_blocks)])
        self.out_ln = nn.LayerNorm(d)
        self.out_head = nn.Linear(d, self.num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` -> tokens ``(batch, tokens, d)``, cls token first."""
        p = self.patch_embed(self.as_images(x)).flatten(2).transpose(1, 2)  # (batch, patches, d)
        cls = self.cls_token.expand(p.shape[0], -1, -1)
        return torch.cat([cls, p], dim=1) + self.pos_embed

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        """The cls token ``(batch, d)``."""
        return h[:, 0]

    def broadcast(self, a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``(batch, d)`` -> ``(batch, tokens, d)``: the same signal at every token."""
        return a.unsqueeze(1).expand_as(like)
