"""SmallResNet: conv stem, BatchNorm basic blocks at fixed width and resolution, pool, head."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import BlockModel, check_sizes


class BasicBlock(nn.Module):
    """Post-activation basic block ``relu(h + bn2(conv2(relu(bn1(conv1 h)))))``, ``(batch, d, H, W)``."""

    def __init__(self, d: int):
        super().__init__()
        self.conv1 = nn.Conv2d(d, d, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(d)
        self.conv2 = nn.Conv2d(d, d, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(h)))))
        return F.relu(h + out)


class SmallResNet(BlockModel):
    """Small CIFAR ResNet without downsampling.

    ``h_0 = relu(bn(conv3x3(x)))`` ``(batch, d, H, W)``; ``h_{l+1} = block_l(h_l)``; the readout
    is global average pooling and a linear head (no final norm).

    The block's final ReLU sits after the skip, so its update is not ``h + f(h)``: the branch is
    *defined* as ``f_l(h) = step(l, h) - h`` (the block's net change), which keeps
    ``step == h + branch`` exactly for local losses and penalties.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: output classes.
        d: channels of the stem and every block.
        num_blocks: L (0 gives the shallow baseline: stem -> pool -> head).
    """

    arch = "resnet"
    embed_modules = ("stem_conv", "stem_bn")

    def __init__(self, input_shape=(3, 32, 32), num_classes: int = 10, d: int = 64,
                 num_blocks: int = 4):
        d, num_blocks = check_sizes(d, num_blocks)
        super().__init__(input_shape, num_classes, d)
        self.stem_conv = nn.Conv2d(self.input_shape[0], d, kernel_size=3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(d)
        self.blocks = nn.ModuleList([BasicBlock(d) for _ in range(num_blocks)])
        self.out_head = nn.Linear(d, self.num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` -> ``h_0`` ``(batch, d, H, W)``."""
        return F.relu(self.stem_bn(self.stem_conv(self.as_images(x))))

    def pool(self, h: torch.Tensor) -> torch.Tensor:
        """Global average pool ``(batch, d, H, W) -> (batch, d)``."""
        return h.mean(dim=(2, 3))

    def broadcast(self, a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``(batch, d)`` -> ``(batch, d, H, W)``: the same signal at every pixel."""
        return a[:, :, None, None].expand_as(like)
