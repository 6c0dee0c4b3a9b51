"""Profiles, device choice, seeding and on-disk locations.

Locations: :func:`data_roots` (the data search path: ``$FA_STUDY_DATA``, several roots joined
by ``os.pathsep``, then the known roots), :func:`cache_dir` (results, ``$FA_STUDY_CACHE``) and
:func:`tensor_cache_dir` (the loader's tensor cache, ``$FA_STUDY_TENSOR_CACHE`` or
``<cache_dir>/tensors``). Files there are opened by :func:`open_regular` (regular files only:
a pipe, socket, device or directory is never read nor waited on).

One switch selects how much work every notebook and experiment does:

* ``quick``   -- seconds per notebook on a 2-core CPU; used by CI and nbval.
* ``default`` -- minutes on a laptop CPU; real datasets when present.
* ``paper``   -- the reference study's settings (epochs, seeds, architectures); meant for a GPU.

The profile is read from the ``FA_STUDY_PROFILE`` environment variable (default ``default``)
unless passed explicitly.
"""
from __future__ import annotations

import errno
import math
import numbers
import operator
import os
import random
import stat
from pathlib import Path

import numpy as np
import torch

PROFILES: tuple[str, ...] = ("quick", "default", "paper")
DEFAULT_PROFILE = "default"
PROFILE_ENV = "FA_STUDY_PROFILE"
DEVICE_ENV = "FA_STUDY_DEVICE"
DATA_ENV = "FA_STUDY_DATA"
CACHE_ENV = "FA_STUDY_CACHE"
OFFLINE_ENV = "FA_STUDY_OFFLINE"
TENSOR_CACHE_ENV = "FA_STUDY_TENSOR_CACHE"
KNOWN_ROOTS_ENV = "FA_STUDY_DATA_KNOWN"  # "0": search only the given roots, not KNOWN_DATA_ROOTS
# Searched after $FA_STUDY_DATA / ``root``: Debian's dataset-fashion-mnist, then ./data.
KNOWN_DATA_ROOTS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist", "data")
# Known roots that are searched but never downloaded into (system package folders).
SEARCH_ONLY_DATA_ROOTS: tuple[str, ...] = ("/usr/share/datasets/fashion-mnist",)


# --------------------------------------------------------------------------------------------
# Upper bounds on the sizes that set memory. Each is checked where the value is first accepted
# (the spec, the model class, the rule's options), before anything is allocated, so a typo
# (d=10**6, n_noise=10**12) is a ValueError naming the setting instead of a request for
# terabytes at run time. Each bound sits well above anything the reference study or the
# notebooks use; raise it here (and only here) for a bigger machine.
# --------------------------------------------------------------------------------------------

# Seeds: torch.manual_seed and numpy's SeedSequence take integers in [0, 2**64); the package
# adds small offsets to seeds (the null's generator uses 10_000 + seed), so 2**63 keeps every
# derived seed in range. Negative seeds are refused (SeedSequence rejects them).
SEED_LIMIT = 2**63  # seeds must satisfy 0 <= seed < SEED_LIMIT
# Width d (features per position / channels): 8x the widest model of the reference
# (resmlp_d512_L2); one d x d float32 matrix at this width is 64 MiB, and a ResidualMLP block
# holds two (four times that with gradients and AdamW's two moments).
MAX_WIDTH = 4096
# Depth L (num_blocks): 64x the reference's 4 blocks. Each block holds at least one d x d
# matrix and one hidden state per sample, and the audit reads one row per hidden state.
MAX_BLOCKS = 256
# Trainable parameters of one model: 2**30 float32 parameters are 4 GiB, 16 GiB with their
# gradients and AdamW's two moments -- the most one accelerator holds with room left for the
# activations. Checked on the meta device (shapes only) before a model is allocated.
MAX_PARAMETERS = 2**30
# Attention heads (ViTMini): ViT-Huge uses 16; 64 leaves 4x margin. The attention scores
# held for the backward are batch x heads x tokens^2 floats per block.
MAX_HEADS = 64
# Tokens per image (ViTMini: 1 + (H/p)(W/p)): patch_size=1 on a 32x32 image, the finest
# tokenisation of the package's largest images. Attention scores grow with tokens^2: at this
# bound, batch 128 and 4 heads they are 2 GiB per block.
MAX_TOKENS = 1 + 32 * 32
# Hidden width of ViTMini's MLP relative to d: the reference uses 4; 16 leaves 4x margin
# (the MLP's two matrices hold 2 * mlp_ratio * d^2 parameters).
MAX_MLP_RATIO = 16.0
# Batch sizes (training, eval batch, probe batch): at least the largest split the loader
# serves (60,000 MNIST / Fashion-MNIST images), so full-batch training stays possible; a batch
# larger than every split would never be filled.
MAX_BATCH_SIZE = 65536
# Noise samples per weight-mirror step (n_noise / mirror_n): 128x the default 64. Each layer
# draws n x fan_in floats per step (100 MB for CIFAR's 3,072 inputs at this bound).
MAX_NOISE_SAMPLES = 8192
# Probes per step of GrAPE (n_probe / grape_n_probe) and of Stiefel-DFA's node perturbation:
# 256x GrAPE's 32. Each layer draws n x fan_in probe floats per step.
MAX_PROBES = 8192


def check_choice(what: str, value, allowed) -> None:
    """Raise ``ValueError`` naming ``what``, the bad ``value`` and the allowed values."""
    allowed = tuple(allowed)
    if value not in allowed:
        listed = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"unknown {what} {value!r}; allowed values: {listed}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _refuse(what: str, value, rng: str, none_ok: bool, none_means: str):
    """The ValueError of a check: ``what``, the allowed range (and None when allowed), the value."""
    if none_ok:
        rng += " or None" + (f" ({none_means})" if none_means else "")
    return ValueError(f"{what} must be {rng}, got {value!r}")


def check_int(what: str, value, low: int | None = None, high: int | None = None, *,
              none_ok: bool = False, none_means: str = "", bound: str = "") -> int | None:
    """``value`` as an int, or ``ValueError`` naming ``what``, the value and the allowed range.

    ``low`` / ``high`` are inclusive bounds; ``none_ok`` accepts ``None`` (returned as is), and
    ``none_means`` says what None stands for in the message (e.g. "the whole split"); ``bound``
    says where ``high`` comes from (e.g. "fa_study.config.MAX_WIDTH"): a value of the wrong type
    or below ``low`` reads as without it, one above it names the bound and where it comes from.
    """
    if value is None and none_ok:
        return None
    limit = None if bound else high
    if not _is_int(value) or (low is not None and value < low) or (limit is not None and value > limit):
        rng = {(True, True): f"an integer in [{low}, {limit}]", (True, False): f"an integer >= {low}",
               (False, True): f"an integer <= {limit}", (False, False): "an integer"}
        raise _refuse(what, value, rng[low is not None, limit is not None], none_ok, none_means)
    if bound and high is not None and value > high:
        rng = f"an integer in [{low}, {high}]" if low is not None else f"an integer <= {high}"
        raise _refuse(what, value, f"{rng} ({high}: {bound})", none_ok, none_means)
    return int(value)


_COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def check_float(what: str, value, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False, none_ok: bool = False,
                none_means: str = "") -> float | None:
    """``value`` as a finite float within bounds, or ``ValueError`` naming ``what``, the value
    and what is allowed. ``low_open`` / ``high_open`` exclude the bound itself (``low=0,
    low_open=True``: strictly positive). Strings, bools, NaN and infinities are refused."""
    if value is None and none_ok:
        return None
    bounds = [(op, v) for op, v in ((">" if low_open else ">=", low), ("<" if high_open else "<=", high))
              if v is not None]
    if not (_is_real(value) and math.isfinite(float(value))
            and all(_COMPARE[op](float(value), v) for op, v in bounds)):
        rng = " ".join(["a finite number", " and ".join(f"{op} {v:g}" for op, v in bounds)]).strip()
        raise _refuse(what, value, rng, none_ok, none_means)
    return float(value)


def check_bool(what: str, value) -> bool:
    """``value`` if it is True or False, else ``ValueError`` naming ``what``."""
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be True or False, got {value!r}")
    return value


def check_seed(what: str, value) -> int:
    """``value`` as a seed of the random generators (an integer, ``0 <= seed < 2**63``), or
    ``ValueError`` naming ``what``, the value and the allowed range."""
    if not _is_int(value) or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{what} must be an integer in [0, 2**63 - 1] (the range of torch's and "
                         f"numpy's generators), got {value!r}")
    return int(value)


def check_seeds(what: str, seeds) -> tuple[int, ...]:
    """A non-empty tuple of distinct integer seeds (an int is one seed); duplicates are refused
    because they would count one run twice (n = 2 and a confidence interval of 0)."""
    seeds = (seeds,) if _is_int(seeds) else tuple(seeds) if hasattr(seeds, "__iter__") else seeds
    if not isinstance(seeds, tuple) or not seeds or not all(_is_int(s) for s in seeds):
        raise ValueError(f"{what} must be a non-empty tuple of distinct integers (e.g. (42, 123)), "
                         f"got {seeds!r}")
    for s in seeds:
        check_seed(f"every seed in {what}", s)
    dup = sorted({int(s) for s in seeds if seeds.count(s) > 1})
    if dup:
        raise ValueError(f"{what} must not repeat a seed (a repeated seed is the same run counted "
                         f"twice); repeated: {dup} in {seeds!r}")
    return tuple(int(s) for s in seeds)


def check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    """A non-empty batch ``x`` of ``(batch, ...)`` with ``(batch,)`` int64 labels ``y``: the one
    check a training step and an audit make of what they are handed."""
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"the batch is empty (x has shape {tuple(x.shape)}); every batch needs at "
                         "least one sample")
    if y.dim() != 1 or y.dtype != torch.long:
        raise ValueError(f"labels y must be a (batch,) int64 tensor, got shape {tuple(y.shape)} "
                         f"dtype {y.dtype}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"labels y must be (batch,) = ({x.shape[0]},): x has {x.shape[0]} samples "
                         f"but y has {y.shape[0]}; pass matching batches")


def get_profile(profile: str | None = None) -> str:
    """The active profile: ``profile`` if given, else ``$FA_STUDY_PROFILE``, else ``default``.

    A bad value raises ``ValueError`` naming where it came from (the argument or the
    environment variable), the value and the allowed profiles.
    """
    what, name = (("profile", profile) if profile is not None else
                  (f"profile (from ${PROFILE_ENV})", os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE))
    if not isinstance(name, str):
        raise ValueError(f"{what} must be a string; got {name!r} ({type(name).__name__}); "
                         f"allowed values: {', '.join(map(repr, PROFILES))}")
    check_choice(what, name := name.strip().lower(), PROFILES)
    return name


DEVICE_FORMS = "'cpu', 'cuda', 'cuda:N', 'mps'"


def get_device(device: str | torch.device | None = None) -> torch.device:
    """The compute device: ``device`` if given, else ``$FA_STUDY_DEVICE``, else CUDA when available.

    Asking for a device this machine does not have (CUDA without CUDA, ``cuda:N`` beyond the
    GPUs present, MPS without MPS) raises ``ValueError`` at once rather than failing later; a
    bad ``$FA_STUDY_DEVICE`` is reported as coming from that variable.
    """
    what = "device"
    if device is None and os.environ.get(DEVICE_ENV, "").strip():
        what, device = f"device (from ${DEVICE_ENV})", os.environ[DEVICE_ENV].strip()
    elif device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise ValueError(f"{what} must be a string or torch.device, got {device!r}; "
                         f"allowed values: {DEVICE_FORMS}")
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"unknown {what} {device!r}; allowed values: {DEVICE_FORMS}") from exc
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown {what} {str(device)!r} (type {dev.type!r}); allowed values: "
                         f"{DEVICE_FORMS}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} {str(dev)!r} was requested but CUDA is not available on this "
                         f"machine; use 'cpu'")
    count = torch.cuda.device_count() if dev.type == "cuda" else 0
    if dev.type == "cuda" and dev.index is not None and dev.index >= count:
        raise ValueError(f"{what} {str(dev)!r} was requested but this machine has {count} CUDA "
                         f"device(s); allowed: " + ", ".join(f"'cuda:{i}'" for i in range(count)))
    if dev.type == "mps" and not torch.backends.mps.is_available():
        alt = "'cuda' or 'cpu'" if torch.cuda.is_available() else "'cpu'"
        raise ValueError(f"{what} {str(dev)!r} was requested but MPS (Apple GPU) is not "
                         f"available on this machine; use {alt}")
    return dev


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA) and return a CPU generator seeded likewise.

    Two CPU runs after the same call are bitwise identical: the package draws all randomness
    from these generators and uses no multi-threaded non-deterministic kernels on the CPU.
    """
    seed = check_seed("seed", seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)


STREAMS: dict[str, int] = {"feedback": 0xFB, "noise": 0xFB + 1, "null": 0x5EED}


def stream_generator(seed: int, stream: str = "feedback",
                     device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one purpose (``stream``: feedback draws, feedback noise, the null),
    independent of the weights' stream that :func:`seed_everything` seeds with the same seed.

    Seeding B's generator with the weight seed itself would make B and W share their random
    numbers: a Gaussian B drawn from the stream whose uniforms initialised W is correlated with W
    (angles of 110 degrees at "random" initialisation). The seed is therefore mixed with the
    stream's tag first (numpy's SeedSequence).
    """
    check_choice("stream", stream, tuple(STREAMS))
    seed = check_seed("seed", seed)
    mixed = int(np.random.SeedSequence([int(seed), STREAMS[stream]]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(mixed)


def is_offline() -> bool:
    """True when ``$FA_STUDY_OFFLINE`` asks never to try a download."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _as_paths(what: str, value) -> list[Path]:
    """One path or a sequence of paths (a string may hold several, separated by os.pathsep)."""
    items = (value.split(os.pathsep) if isinstance(value, str)
             else [value] if isinstance(value, os.PathLike) else value)
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{what} must be a path, a list of paths or None, got {value!r}")
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise ValueError(f"{what} must be a path, a list of paths or None; {item!r} in "
                             f"{value!r} is not a path")
    return [Path(os.fspath(item)).expanduser().resolve() for item in items if str(os.fspath(item)).strip()]


def data_roots(root: str | os.PathLike | list | tuple | None = None, *,
               known: bool | None = None) -> list[Path]:
    """The data search path, in the order the loader looks.

    First ``root`` (one path or a list; a string may hold several joined by ``os.pathsep``),
    or, when ``root`` is None, the entries of ``$FA_STUDY_DATA`` (joined by ``os.pathsep``);
    then, unless ``known`` is False (default: ``$FA_STUDY_DATA_KNOWN``, on unless ``0``), the
    known locations :data:`KNOWN_DATA_ROOTS` (Debian's Fashion-MNIST folder, ``./data``).
    Paths are resolved; duplicates are dropped. The roots need not exist or be writable.
    """
    given = _as_paths("root", root) if root is not None else _as_paths(
        f"${DATA_ENV}", os.environ.get(DATA_ENV, ""))
    if known is None:  # on unless $FA_STUDY_DATA_KNOWN is 0, false, no or off
        known = os.environ.get(KNOWN_ROOTS_ENV, "").strip().lower() not in ("0", "false", "no", "off")
    check_bool("known", known)
    if known:
        given += [Path(p).expanduser().resolve() for p in KNOWN_DATA_ROOTS]
    return list(dict.fromkeys(given))


def data_dir(root: str | os.PathLike | None = None) -> Path:
    """The first data root: ``root`` (its first entry), else the first entry of
    ``$FA_STUDY_DATA``, else ``./data``. Kept for compatibility; the loader searches the whole
    :func:`data_roots` path."""
    first = data_roots(root, known=False)
    return first[0] if first else Path("data").expanduser().resolve()


def cache_dir() -> Path:
    """Where experiment results are cached: ``$FA_STUDY_CACHE``, else ``./.fa_study_cache``."""
    return Path(os.environ.get(CACHE_ENV) or ".fa_study_cache").expanduser().resolve()


def tensor_cache_dir() -> Path:
    """Where the loader caches datasets as uint8 tensors: ``$FA_STUDY_TENSOR_CACHE``, else
    ``<cache_dir()>/tensors``. Never next to the data files (data roots may be read-only)."""
    env = os.environ.get(TENSOR_CACHE_ENV, "").strip()
    return Path(env).expanduser().resolve() if env else cache_dir() / "tensors"


_FILE_KINDS = {stat.S_IFLNK: "a symbolic link", stat.S_IFDIR: "a directory", stat.S_IFIFO: "a named pipe",
               stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}
_READ_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_BINARY", 0))


def file_kind(mode: int) -> str:
    """What a file whose ``st_mode`` is ``mode`` is, in words ("a named pipe"), for messages."""
    return _FILE_KINDS.get(stat.S_IFMT(mode), "not a regular file")


class NotRegularFile(OSError):
    """A path that is not a regular file; ``kind`` says what it is (:func:`file_kind`)."""

    def __init__(self, mode: int):
        self.kind = file_kind(mode)
        super().__init__(f"it is {self.kind}, not a regular file")


def open_regular(path: str | os.PathLike, follow: bool = True) -> int:
    """A read-only descriptor of ``path`` if it is a regular file, else :class:`NotRegularFile`.

    Opened non-blocking and checked with ``fstat``, so a pipe, socket, device or directory is
    never read nor waited on. ``follow=False`` refuses a symbolic link too: ``path`` is checked
    with ``lstat`` first (anything but a regular file is not even opened), then opened with
    ``O_NOFOLLOW`` (a link swapped in since the check is refused by the open itself)."""
    if not follow and not stat.S_ISREG(mode := os.lstat(path).st_mode):
        raise NotRegularFile(mode)
    try:
        fd = os.open(path, _READ_FLAGS | (0 if follow else getattr(os, "O_NOFOLLOW", 0)))
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise NotRegularFile(stat.S_IFLNK) from None
        raise
    if not stat.S_ISREG(mode := os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFile(mode)
    return fd
