"""The classic torchvision input pipeline the benchmarks measure fa_study against.

One PIL image per sample, ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``ToTensor``
and ``Normalize`` run per sample in ``DataLoader`` worker processes: what ``003`` used.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from fa_study import data

MEAN, STD = data.SPECS["cifar10"].mean, data.SPECS["cifar10"].std


class PILCifar(Dataset):
    """CIFAR-shaped uint8 images ``(N, 32, 32, 3)`` served as PIL images through the transforms."""

    def __init__(self, u8_nhwc: np.ndarray, labels: np.ndarray):
        self.x, self.y = u8_nhwc, labels
        self.tf = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.tf(Image.fromarray(self.x[i])), int(self.y[i])
