"""Images per second: fa_study's in-memory iterator with batched augmentation against a
torchvision DataLoader(num_workers=2) with PIL RandomCrop(32, padding=4), RandomHorizontalFlip,
ToTensor and Normalize, over the same CIFAR-shaped uint8 data, both measured in this run.

    python benchmarks/bench_data.py [--n 10000] [--batch 128] [--epochs 2]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from fa_study import data

from reference_pipeline import MEAN, STD, PILCifar  # benchmarks/, on the path when run as a script


def time_epochs(make_iter, epochs: int) -> float:
    """Images per second over ``epochs`` full passes, after one warm-up pass."""
    n = 0
    for xb, _ in make_iter():  # warm-up: worker start, allocator, caches
        pass
    start = time.perf_counter()
    for _ in range(epochs):
        for xb, _ in make_iter():
            n += xb.shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    a = p.parse_args()
    if a.quick:
        a.n, a.epochs = 2000, 1
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(a.n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=a.n)

    x = data.normalize(torch.from_numpy(u8).permute(0, 3, 1, 2).contiguous(), MEAN, STD)
    y = torch.from_numpy(labels)
    pad_value = tuple(-m / s for m, s in zip(MEAN, STD))
    ours_it = data.BatchIterator(x, y, a.batch, shuffle=True, augment=True, pad_value=pad_value, seed=0)
    ours = time_epochs(lambda: ours_it, a.epochs)

    loader = DataLoader(PILCifar(u8, labels), batch_size=a.batch, shuffle=True, num_workers=2,
                        persistent_workers=True)
    ref = time_epochs(lambda: loader, a.epochs)

    print(f"CIFAR-shaped data, n={a.n}, batch={a.batch}, {a.epochs} epochs after warm-up, "
          f"torch threads={torch.get_num_threads()}")
    print(f"{'pipeline':<58}{'images/s':>12}")
    print(f"{'fa_study BatchIterator (batched crop+flip, in memory)':<58}{ours:>12,.0f}")
    print(f"{'DataLoader(num_workers=2) + PIL RandomCrop/Flip/ToTensor/Normalize':<58}{ref:>12,.0f}")
    print(f"ratio (ours / DataLoader): {ours / ref:.1f}x")


if __name__ == "__main__":
    main()
