"""The results cache and the dispatch of units of work: data on disk, never code.

A study is a list of *units of work* (one training run each). A unit is described by a *spec*,
a frozen dataclass whose fields are frozen dataclasses, tuples, dicts with str keys, None,
bool, int, float or str. A *unit function* ``fn(spec, fingerprint, callback=None)`` returns a
*payload*: a pandas DataFrame, or a dict (str keys) whose values are DataFrames or JSON values
(dict with str keys, list, tuple, str, int, float, bool, None; NaN and infinities allowed).

:func:`run_units` serves the units already in the cache and computes the others (through
``joblib.Parallel`` when ``n_jobs != 1``, so ``with joblib.parallel_backend("dask"):`` runs them
on a dask cluster), writing each as soon as it finishes.

On-disk layout (``$FA_STUDY_CACHE``, see :func:`fa_study.config.cache_dir`)::

    results/<unit function, module.qualname>/<sha256 of the spec's canonical JSON>/
        manifest.json      spec (canonical JSON), unit, code fingerprint, fa_study version,
                           creation time (UTC), payload layout, sha256 and size of each file
        frame-0.parquet    one Parquet file per DataFrame (pyarrow)
        values.json        the payload's JSON values, if any

Nothing is ever unpickled: the manifest and ``values.json`` are read with :mod:`json`, the
frames with pyarrow (>= 14.0.1, which never unpickles extension types), and only after each
file's sha256 matched the manifest. Frames keep their dtypes (int64, float64 bit for bit,
bool, nullable ``Int64``/``boolean``, ``str``, categorical, their index); ``object`` columns
(e.g. a ``d1`` column of True/False/None) are stored cell by cell as JSON text and restored
with the exact Python values. A DataFrame's ``.attrs`` are **not** stored. Every entry is read
back and compared with the computed payload before it is published; a payload that cannot be
stored exactly (a value outside the contract, a MultiIndex on the columns, ...) is returned
but not cached, with a note.

What happens with a bad entry (never an exception, never served):

* missing: computed (``stats.computed``);
* written by other code (its fingerprint differs): computed again and replaced
  (``stats.computed``, one summary note) -- the normal consequence of editing the package;
* truncated or altered file (size or sha256 differs from the manifest), manifest not JSON or
  incomplete, an unreadable payload, an entry of another run (the manifest's spec or unit is
  not this one, e.g. a directory copied over): recomputed and replaced (``stats.recomputed``,
  one note each);
* a symbolic link anywhere on an entry's path (``results/`` itself, the unit directory, the
  entry directory, a file in it, pointing outside the cache or inside it), a payload file or
  manifest that is not a regular file (a named pipe, socket, device or directory), a manifest
  over :data:`MANIFEST_MAX_BYTES`, a payload file whose size (``fstat``, before anything is
  read) differs from the manifest's or that the manifest declares larger than
  :data:`PAYLOAD_MAX_BYTES`: recomputed and replaced by a real directory of regular files
  (``stats.recomputed``, one note each). A link is never followed (files are opened with
  ``O_NOFOLLOW | O_NONBLOCK`` below directories opened one by one without following links, and
  checked with ``fstat``), so a pipe never hangs a read, and at most the declared size plus one
  byte is read of a payload file;
* a pickle (``*.pkl``, an old ``joblib/`` cache, any file starting with the pickle opcode)
  inside the cache: never opened, ignored with a :class:`CacheWarning`.

Every directory written into (``results/``, the unit directory, the temporary entry) is
checked to resolve inside the resolved cache root; a link in place of one is removed (the link,
never what it points at) and replaced by a real directory, and a write that would land outside
is refused with a note (the result is then kept in memory).

Writers build an entry in a uniquely named temporary directory next to it and publish it with
one ``os.replace``; readers therefore see a whole entry or none, and two processes computing
the same spec at once leave one valid entry.

If the cache directory cannot be written (read-only, or ``$FA_STUDY_CACHE`` names a file),
:class:`ResultsCache` warns once with the variable and the path and keeps new results in
memory for the rest of the process (entries already on a readable disk are still served), so
a notebook keeps working; each :func:`run_units` call also says so in ``stats.notes``.
"""
from __future__ import annotations

import copy
import dataclasses
import errno
import hashlib
import io
import json
import os
import re
import shutil
import stat
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from . import __version__
from .config import CACHE_ENV, cache_dir, check_int, get_device

FORMAT = "fa_study.results/1"
MANIFEST = "manifest.json"
VALUES = "values.json"
RESULTS = "results"
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
_STALE_TMP_S = 3600.0  # leftovers of killed writers older than this are removed
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}$")
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".pt", ".pth", ".npy", ".npz", ".dill")
# A manifest holds one spec (canonical JSON, a few KiB at most) and one line per payload file;
# the largest the studies write is under 10 KiB. Anything over 1 MiB is not a manifest of ours
# and is refused before it is read.
MANIFEST_MAX_BYTES = 1 << 20
# A payload file holds one result table (Parquet) or the result's JSON values; the studies'
# largest is a few MB. A manifest declaring more than 1 GiB for a file is refused before the
# file is read, and a result with a larger file is returned but not cached.
PAYLOAD_MAX_BYTES = 1 << 30
_READ_CHUNK = 1 << 24
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_READ_FLAGS = os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC | _O_BINARY
# Directories are walked with file descriptors (openat) where the platform has them, so that no
# component can be swapped for a link between the check and the use.
_DIR_FD = bool(_O_DIRECTORY) and os.open in os.supports_dir_fd and os.stat in os.supports_dir_fd \
    and os.scandir in os.supports_fd


class CacheWarning(UserWarning):
    """A problem with the results cache the user should know about (a planted pickle, a cache
    directory that cannot be written)."""


# --------------------------------------------------------------------------------------------
# Fingerprint and threads
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Package version plus a hash of the package's source, so results computed by other code
    are never served from the cache."""
    h = hashlib.sha1(__version__.encode())
    for path in sorted(Path(__file__).resolve().parent.rglob("*.py")):
        h.update(path.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"


@contextmanager
def one_cpu_thread(device=None):
    """Run with one intra-op torch thread on the CPU, restoring the setting afterwards.

    The studies' networks are small (widths up to 512, batches of 128): split across threads,
    each op costs more in synchronisation than it saves, and on a shared machine the threads
    spin against other processes (a quick-profile study took 121 s with 2 threads and 18 s
    with 1 on a busy 2-core machine). Parallelism belongs across units (``n_jobs``). One
    thread also makes CPU results independent of the machine's core count. CUDA is unaffected.
    """
    import torch

    dev = get_device(device)
    if dev.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Spec keys
# --------------------------------------------------------------------------------------------


_NOT_SCALAR = object()


def _scalar(value):
    """A JSON scalar (None, bool, str, int, float; numpy's as Python's), else ``_NOT_SCALAR``.
    Floats are written by json with repr(): the shortest text that reads back exactly."""
    import numpy as np

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return _NOT_SCALAR


def _canon(value, path: str):
    """``value`` as plain JSON data, every type told apart (dataclass, dict, tuple)."""
    out = _scalar(value)
    if out is not _NOT_SCALAR:
        return out
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if not type(value).__dataclass_params__.frozen:
            raise TypeError(f"spec field {path} is a {type(value).__name__}, a dataclass that is "
                            "not frozen; specs must be frozen dataclasses")
        return {"__class__": type(value).__qualname__,
                "fields": {f.name: _canon(getattr(value, f.name), f"{path}.{f.name}")
                           for f in dataclasses.fields(value)}}
    if isinstance(value, tuple):
        return [_canon(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise TypeError(f"spec field {path} is a dict with non-str keys {bad!r}")
        return {"__dict__": {k: _canon(v, f"{path}[{k!r}]") for k, v in value.items()}}
    raise TypeError(f"spec field {path} is a {type(value).__name__} ({value!r}); specs may hold "
                    "frozen dataclasses, tuples, dicts with str keys, None, bool, int, float, str")


def spec_json(spec) -> str:
    """The canonical JSON of ``spec``: class name and fields, keys sorted, no spaces, floats
    written as ``repr`` (exact: ``1e-4`` and ``0.0001`` give the same text), NaN as ``NaN``.
    ``1`` and ``1.0``, ``True`` and ``1``, a tuple and a dict are told apart. ``TypeError`` for
    anything that is not a frozen dataclass of the allowed types."""
    if not (dataclasses.is_dataclass(spec) and not isinstance(spec, type)):
        raise TypeError(f"a spec must be a frozen dataclass instance, got {type(spec).__name__} "
                        f"({spec!r})")
    return json.dumps(_canon(spec, type(spec).__name__), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True, allow_nan=True)


def spec_key(spec) -> str:
    """The sha256 (hex) of :func:`spec_json`: the name of the spec's cache entry."""
    return hashlib.sha256(spec_json(spec).encode()).hexdigest()


def spec_label(spec, width: int = 90) -> str:
    """A short readable name of a spec for notes: its class and the fields that differ from
    their defaults, e.g. ``AuditUnit(method='fa', seed=3)``."""
    parts = []
    for f in dataclasses.fields(spec):
        v = getattr(spec, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        try:
            same = default is not dataclasses.MISSING and bool(v == default) and type(v) is type(default)
        except Exception:  # noqa: BLE001 - odd __eq__: show the field
            same = False
        if not same:
            parts.append(f"{f.name}={v!r}")
    text = f"{type(spec).__name__}({', '.join(parts)})"
    return text if len(text) <= width else text[:width - 1] + "…"


def unit_name(fn: Callable) -> str:
    """The directory name of a unit function's entries: ``module.qualname``."""
    name = f"{getattr(fn, '__module__', None) or 'unknown'}.{getattr(fn, '__qualname__', repr(fn))}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:200]


# --------------------------------------------------------------------------------------------
# Payload encoding: Parquet for frames, JSON for the rest
# --------------------------------------------------------------------------------------------


class _Unstorable(Exception):
    """The payload cannot be stored exactly (the message says why)."""


def _enc(value, path: str):
    """A JSON value exactly as written; tuples tagged so that they come back as tuples."""
    out = _scalar(value)
    if out is not _NOT_SCALAR:
        return out
    if isinstance(value, tuple):
        return {"__tuple__": [_enc(v, f"{path}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_enc(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value) or "__tuple__" in value:
            raise _Unstorable(f"{path} is a dict with non-str (or reserved '__tuple__') keys")
        return {k: _enc(v, f"{path}[{k!r}]") for k, v in value.items()}
    raise _Unstorable(f"{path} is of type {type(value).__name__}, not a JSON value")


def _dec(value):
    if isinstance(value, list):
        return [_dec(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"} and isinstance(value["__tuple__"], list):
            return tuple(_dec(v) for v in value["__tuple__"])
        return {k: _dec(v) for k, v in value.items()}
    return value


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=True, allow_nan=True, separators=(",", ":"))


def _frame_bytes(df: pd.DataFrame, what: str) -> tuple[bytes, list[int]]:
    """Parquet bytes of ``df`` (object columns as JSON text) and the positions of those columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if df.columns.has_duplicates:
        raise _Unstorable(f"{what} has duplicate column names")
    if isinstance(df.columns, pd.MultiIndex):
        raise _Unstorable(f"{what} has MultiIndex columns")
    out = df.copy(deep=False)
    out.attrs = {}
    json_cols = []
    for pos in range(df.shape[1]):
        col = df.iloc[:, pos]
        if col.dtype == object:
            cells = [_dumps(_enc(v, f"{what}[{df.columns[pos]!r}]")) for v in col]
            out.isetitem(pos, pd.Series(cells, index=df.index, dtype=object))
            json_cols.append(pos)
    try:
        table = pa.Table.from_pandas(out, preserve_index=None)
        buf = io.BytesIO()
        pq.write_table(table, buf)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise _Unstorable(f"{what} cannot be written as Parquet ({exc})") from None
    return buf.getvalue(), json_cols


def _frame_from_bytes(data: bytes, json_cols: list[int]) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    df = pq.read_table(pa.BufferReader(data)).to_pandas()
    df.attrs = {}
    for pos in json_cols:
        cells = [_dec(json.loads(v)) for v in df.iloc[:, pos]]
        df.isetitem(pos, pd.Series(cells, index=df.index, dtype=object))
    return df


def _same_payload(a, b) -> str | None:
    """None if the payloads are exactly equal, else what differs."""
    if isinstance(a, pd.DataFrame):
        try:
            pd.testing.assert_frame_equal(a, b, check_exact=True)
        except AssertionError as exc:
            return str(exc).strip().splitlines()[0]
        return None
    if set(a) != set(b):
        return "keys differ"
    for k in a:
        if isinstance(a[k], pd.DataFrame):
            why = _same_payload(a[k], b[k])
            if why:
                return f"{k!r}: {why}"
        elif _dumps(_enc(a[k], k)) != _dumps(_enc(b[k], k)) or type(a[k]) is not type(b[k]):
            return f"{k!r} differs"
    return None


def _copy_payload(payload):
    if isinstance(payload, pd.DataFrame):
        return payload.copy(deep=True)
    return {k: (v.copy(deep=True) if isinstance(v, pd.DataFrame) else copy.deepcopy(v))
            for k, v in payload.items()}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Fault(Exception):
    """Something in the cache that is not what the cache writes (a link, a named pipe, a file
    larger than declared); the message completes "cache ..." in a note."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


class _Dir:
    """A directory of the cache reached without following any link: an open descriptor where
    the platform has ``openat`` (else its path, each component checked with ``lstat``)."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd

    def __enter__(self) -> "_Dir":
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def lstat(self, name: str) -> os.stat_result:
        if self.fd is not None:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        return os.lstat(self.path / name)

    def open(self, name: str, flags: int) -> int:
        if self.fd is not None:
            return os.open(name, flags, dir_fd=self.fd)
        return os.open(self.path / name, flags)

    def scandir(self):
        return os.scandir(self.fd if self.fd is not None else self.path)

    def child(self, name: str, label: str) -> "_Dir":
        """The subdirectory ``name``; :class:`_Fault` if it is a link or not a directory,
        ``FileNotFoundError`` if it is not there."""
        st = self.lstat(name)
        if not stat.S_ISDIR(st.st_mode):
            raise _Fault(f"{label} is {_kind(st.st_mode)}")
        if self.fd is None:
            return _Dir(self.path / name, None)
        try:
            fd = os.open(name, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped for a link meanwhile
                raise _Fault(f"{label} is a symbolic link or not a directory") from None
            raise
        return _Dir(self.path / name, fd)

    def open_regular(self, name: str) -> tuple[int, os.stat_result]:
        """A descriptor of the regular file ``name`` and its ``fstat``: never through a link,
        never a pipe, socket or device (opened non-blocking, so a pipe cannot hang the open)."""
        st = self.lstat(name)
        if not stat.S_ISREG(st.st_mode):
            raise _Fault(f"file {name} is {_kind(st.st_mode)}")
        try:
            fd = self.open(name, _READ_FLAGS)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _Fault(f"file {name} is a symbolic link") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise _Fault(f"file {name} is {_kind(st.st_mode)}")
        return fd, st


def _open_dir(path: Path) -> _Dir:
    """``path`` itself (the resolved cache root) opened as a directory."""
    if not _DIR_FD:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(path))
        return _Dir(path, None)
    return _Dir(path, os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC))


def _is_real_dir(path: Path) -> bool:
    """``path`` is a directory, not a link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _read_fd(fd: int, limit: int) -> bytes:
    """At most ``limit`` bytes from ``fd`` (fewer at the end of the file)."""
    chunks, left = [], limit
    while left > 0:
        data = os.read(fd, min(left, _READ_CHUNK))
        if not data:
            break
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist: never written through a link) and write ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY,
                 0o666)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _looks_pickled(d: _Dir, name: str) -> bool:
    """Whether the regular file ``name`` of ``d`` is a pickle (by its suffix, else its first two
    bytes); links, pipes and devices are not opened."""
    if Path(name).suffix.lower() in _PICKLE_SUFFIXES:
        return True
    try:
        fd, _ = d.open_regular(name)
    except (OSError, _Fault):
        return False
    try:
        head = _read_fd(fd, 2)
    except OSError:
        return False
    finally:
        os.close(fd)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # pickle PROTO opcode


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lookup:
    """The outcome of :meth:`ResultsCache.load`.

    ``status``: ``"hit"`` (``payload`` set), ``"missing"``, ``"stale"`` (written by other code)
    or ``"bad"`` (damaged or foreign; ``note`` says what)."""

    status: str
    payload: Any = None
    note: str = ""


_MEMORY: dict[tuple[str, str, str], tuple[str, str, Any]] = {}  # in-memory fallback entries
_MEMORY_LOCK = threading.Lock()
_WARNED: set[tuple[str, str]] = set()


def _warn_once(kind: str, where: str, message: str) -> None:
    if (kind, where) not in _WARNED:
        _WARNED.add((kind, where))
        warnings.warn(message, CacheWarning, stacklevel=3)


class ResultsCache:
    """The results under ``root`` (default :func:`fa_study.config.cache_dir`, i.e.
    ``$FA_STUDY_CACHE``); see the module docstring for the layout and the faults.

    ``writable`` is False when the directory cannot be written; new entries then live in
    memory for the rest of the process and ``note`` says why (warned once unless
    ``quiet``, e.g. on a dask worker whose results the caller stores itself)."""

    def __init__(self, root: str | os.PathLike | None = None, *, quiet: bool = False):
        self.root = Path(root).expanduser().resolve() if root is not None else cache_dir()
        self.results = self.root / RESULTS
        self.writable = True
        self.note = ""
        try:
            if self.root.exists() and not self.root.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a directory")
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.path.islink(self.results):
                self.results.mkdir(exist_ok=True)
            # a link in place of results/ is never written through: the probe goes to the root,
            # and storing an entry replaces the link with a real directory
            where = self.results if _is_real_dir(self.results) else self.root
            probe = where / f"{_TMP_PREFIX}probe-{os.getpid()}-{uuid.uuid4().hex}"
            _write_new(probe, b"")
            probe.unlink()
        except OSError as exc:
            self.writable = False
            why = exc.strerror or str(exc)
            self.note = (f"the results cache {CACHE_ENV}={self.root} cannot be written ({why}); "
                         "new results are kept in memory for this session only — set "
                         f"{CACHE_ENV} to a writable directory to keep them")
            if not quiet:
                _warn_once("readonly", str(self.root), self.note)
        if not quiet:
            self._warn_planted_pickles()

    # -- inspection ------------------------------------------------------------------------

    def entry_dir(self, unit: str, digest: str) -> Path:
        return self.results / unit / digest

    def entries(self, unit: str | None = None) -> list[Path]:
        """The published entry directories (of one unit function, or all); links are not
        followed (an entry behind a link is not an entry)."""
        if not _is_real_dir(self.results):
            return []
        units = [self.results / unit] if unit else [p for p in self.results.iterdir()
                                                    if _is_real_dir(p)]
        out = []
        for u in units:
            if _is_real_dir(u):
                out += sorted(p for p in u.iterdir()
                              if _is_real_dir(p) and not p.name.startswith("."))
        return out

    def _open_chain(self, d: Path) -> _Dir:
        """The directory ``d`` under the root, opened component by component from the root
        without following a link: :class:`_Fault` naming the first component that is a link or
        not a directory, ``FileNotFoundError`` if one is missing."""
        try:
            parts = d.relative_to(self.root).parts
        except ValueError:
            raise _Fault(f"directory {d} is outside the cache root {self.root}") from None
        labels = ["directory results/", "unit directory results/{}", "entry directory results/{}"]
        try:
            cur = _open_dir(self.root)
        except OSError as exc:  # no cache directory (or a file in its place): no entries
            raise FileNotFoundError(errno.ENOENT, f"no cache directory ({exc.strerror or exc})",
                                    str(self.root)) from None
        try:
            for i, part in enumerate(parts):
                label = labels[min(i, 2)].format("/".join(parts[1:i + 1]))
                nxt = cur.child(part, label)
                cur.__exit__()
                cur = nxt
        except BaseException:
            cur.__exit__()
            raise
        return cur

    def _warn_planted_pickles(self) -> None:
        legacy = self.root / "joblib"
        if legacy.is_dir():
            _warn_once("pickle", str(legacy), (
                f"{legacy} holds an old joblib (pickle) results cache; it is ignored and never "
                "unpickled. Delete it (or call fa_study.cache.clear_cache()) to silence this."))
        for d in (self.root, self.results):
            try:
                with self._open_chain(d) as dh, dh.scandir() as it:
                    names = [e.name for e in it if e.is_file(follow_symlinks=False)]
                    pickled = [n for n in names if _looks_pickled(dh, n)]
            except (OSError, _Fault):
                continue
            for name in pickled:
                p = d / name
                _warn_once("pickle", str(p), f"{p} looks like a pickle; the results cache "
                           "ignores it and never unpickles it. Delete it if you did not put it there.")

    def _scan_unit_dir(self, unit: str) -> None:
        """Warn about pickles among the entries and remove leftovers of killed writers (never
        through a link: a unit directory that is a link is left to :meth:`store`)."""
        d = self.results / unit
        try:
            dh = self._open_chain(d)
        except (OSError, _Fault):
            return
        now = time.time()
        with dh:
            try:
                items = list(dh.scandir())
            except OSError:
                return
            for e in items:
                try:
                    if e.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
                        st = e.stat(follow_symlinks=False)
                        if self.writable and now - st.st_mtime > _STALE_TMP_S:
                            if stat.S_ISDIR(st.st_mode):
                                shutil.rmtree(d / e.name, ignore_errors=True)
                            else:  # a link or a file: removed itself, never its target
                                os.unlink(d / e.name)
                    elif e.is_file(follow_symlinks=False) and _looks_pickled(dh, e.name):
                        p = d / e.name
                        _warn_once("pickle", str(p), f"{p} looks like a pickle; the results cache "
                                   "ignores it and never unpickles it.")
                except OSError:
                    continue

    # -- reading ---------------------------------------------------------------------------

    def load(self, unit: str, spec_text: str, fingerprint: str) -> Lookup:
        """The entry of the spec whose canonical JSON is ``spec_text``, checked against the
        manifest (spec, unit, fingerprint, size and sha256 of every file) before anything is
        parsed. Only regular files inside the root are read, never through a link."""
        digest = _sha256(spec_text.encode())
        with _MEMORY_LOCK:
            mem = _MEMORY.get((str(self.root), unit, digest))
        if mem is not None and mem[0] == spec_text and mem[1] == fingerprint:
            return Lookup("hit", _copy_payload(mem[2]))
        return self._load_dir(self.entry_dir(unit, digest), unit, spec_text, fingerprint)

    def _load_dir(self, d: Path, unit: str, spec_text: str, fingerprint: str) -> Lookup:
        try:
            dh = self._open_chain(d)
        except FileNotFoundError:
            return Lookup("missing")
        except _Fault as exc:
            return Lookup("bad", note=f"cache {exc}")
        except OSError as exc:
            return Lookup("bad", note=f"cache entry unreadable ({exc.strerror or exc})")
        with dh:
            try:
                return self._load_open(dh, unit, spec_text, fingerprint)
            except _Fault as exc:
                return Lookup("bad", note=f"cache {exc}")

    def _load_open(self, dh: _Dir, unit: str, spec_text: str, fingerprint: str) -> Lookup:
        try:
            with dh.scandir() as it:
                items = [(e.name, e.is_symlink(), e.is_file(follow_symlinks=False)) for e in it]
        except OSError as exc:
            return Lookup("bad", note=f"cache entry unreadable ({exc.strerror or exc})")
        links = sorted(name for name, link, _ in items if link)
        if links:
            return Lookup("bad", note=f"cache entry holds a symbolic link ({', '.join(links)[:200]})")
        for name, _, regular in items:  # our files start with "{" or "PAR1": a pickle here was planted
            if regular and name != MANIFEST and _looks_pickled(dh, name):
                p = dh.path / name
                _warn_once("pickle", str(p), f"{p} looks like a pickle planted in a results cache "
                           "entry; it is ignored and never unpickled.")
        try:
            fd, st = dh.open_regular(MANIFEST)
        except FileNotFoundError:
            return Lookup("bad", note="cache entry has no manifest")
        except OSError as exc:
            return Lookup("bad", note=f"cache manifest unreadable ({exc.strerror or exc})")
        try:
            if st.st_size > MANIFEST_MAX_BYTES:
                return Lookup("bad", note=f"cache manifest is larger ({st.st_size:,} bytes) than "
                                          f"a manifest may be ({MANIFEST_MAX_BYTES:,} bytes)")
            raw = _read_fd(fd, MANIFEST_MAX_BYTES + 1)
        except OSError as exc:
            return Lookup("bad", note=f"cache manifest unreadable ({exc.strerror or exc})")
        finally:
            os.close(fd)
        if len(raw) > MANIFEST_MAX_BYTES:  # it grew after the fstat
            return Lookup("bad", note=f"cache manifest is larger than a manifest may be "
                                      f"({MANIFEST_MAX_BYTES:,} bytes)")
        try:
            man = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return Lookup("bad", note="cache manifest is not JSON")
        required = {"format": str, "unit": str, "spec": str, "fingerprint": str,
                    "payload": dict, "files": dict}
        if not isinstance(man, dict) or any(not isinstance(man.get(k), t) for k, t in required.items()) \
                or man["format"] != FORMAT:
            return Lookup("bad", note="cache manifest is incomplete or of another format")
        if man["spec"] != spec_text or man["unit"] != unit:
            return Lookup("bad", note="cache entry belongs to another run (its manifest's spec "
                                      "differs from this unit's)")
        if man["fingerprint"] != fingerprint:
            return Lookup("stale")
        blobs: dict[str, bytes] = {}
        for name, info in man["files"].items():
            if not (isinstance(name, str) and _SAFE_NAME.match(name) and name != MANIFEST
                    and isinstance(info, dict) and isinstance(info.get("sha256"), str)
                    and isinstance(info.get("bytes"), int) and not isinstance(info["bytes"], bool)
                    and 0 <= info["bytes"]):
                return Lookup("bad", note="cache manifest lists a malformed file entry")
            declared = info["bytes"]
            if declared > PAYLOAD_MAX_BYTES:
                return Lookup("bad", note=f"cache manifest declares {declared:,} bytes for {name}, "
                                          f"more than a cache file may hold ({PAYLOAD_MAX_BYTES:,})")
            try:
                fd, st = dh.open_regular(name)
            except FileNotFoundError:
                return Lookup("bad", note=f"cache entry lacks its file {name}")
            except OSError as exc:
                return Lookup("bad", note=f"cache file {name} unreadable ({exc.strerror or exc})")
            try:
                size = st.st_size  # compared with the manifest before anything is read
                if size > declared:
                    return Lookup("bad", note=f"cache entry altered ({name}: {size:,} bytes, the "
                                              f"manifest says {declared:,})")
                data = b"" if size < declared else _read_fd(fd, declared + 1)
            except OSError as exc:
                return Lookup("bad", note=f"cache file {name} unreadable ({exc.strerror or exc})")
            finally:
                os.close(fd)
            if size < declared or len(data) < declared:
                have = size if size < declared else len(data)
                return Lookup("bad", note=f"cache entry truncated ({name}: {have} of "
                                          f"{declared} bytes)")
            if len(data) != declared or _sha256(data) != info["sha256"]:
                return Lookup("bad", note=f"cache entry altered ({name}: sha256 differs from "
                                          "the manifest)")
            blobs[name] = data
        try:
            payload = self._decode(man["payload"], blobs)
        except Exception as exc:  # noqa: BLE001 - any parse failure means: recompute
            return Lookup("bad", note=f"cache payload unreadable ({type(exc).__name__}: {exc})"[:300])
        return Lookup("hit", payload)

    @staticmethod
    def _decode(layout: dict, blobs: dict[str, bytes]):
        def frame(item):
            cols = item.get("json_columns", [])
            if not (isinstance(cols, list) and all(isinstance(c, int) for c in cols)):
                raise ValueError("bad json_columns")
            return _frame_from_bytes(blobs[item["file"]], cols)

        if layout.get("type") == "frame":
            return frame(layout)
        if layout.get("type") != "dict" or not isinstance(layout.get("keys"), list):
            raise ValueError("unknown payload layout")
        values = _dec(json.loads(blobs[VALUES].decode("utf-8"))) if VALUES in blobs else {}
        out = {}
        for item in layout["keys"]:
            key = item["key"]
            out[key] = frame(item) if item["type"] == "frame" else values[key]
        return out

    # -- writing ---------------------------------------------------------------------------

    def _encode(self, payload) -> tuple[dict, dict[str, bytes]]:
        blobs: dict[str, bytes] = {}
        if isinstance(payload, pd.DataFrame):
            data, cols = _frame_bytes(payload, "the payload")
            blobs["frame-0.parquet"] = data
            return {"type": "frame", "file": "frame-0.parquet", "json_columns": cols}, blobs
        if not isinstance(payload, dict):
            raise _Unstorable(f"the payload is a {type(payload).__name__}; a unit must return a "
                              "DataFrame or a dict of DataFrames and JSON values")
        keys, values = [], {}
        for key, value in payload.items():
            if not isinstance(key, str):
                raise _Unstorable(f"payload key {key!r} is not a str")
            if isinstance(value, pd.DataFrame):
                name = f"frame-{len(blobs)}.parquet"
                blobs[name], cols = _frame_bytes(value, f"payload[{key!r}]")
                keys.append({"key": key, "type": "frame", "file": name, "json_columns": cols})
            else:
                values[key] = _enc(value, f"payload[{key!r}]")
                keys.append({"key": key, "type": "value"})
        if values:
            blobs[VALUES] = _dumps(values).encode()
        return {"type": "dict", "keys": keys}, blobs

    def _encode_checked(self, payload) -> tuple[dict, dict[str, bytes]]:
        layout, blobs = self._encode(payload)
        for name, data in blobs.items():
            if len(data) > PAYLOAD_MAX_BYTES:
                raise _Unstorable(f"its file {name} would take {len(data):,} bytes, more than a "
                                  f"cache file may hold ({PAYLOAD_MAX_BYTES:,})")
        return layout, blobs

    def store(self, unit: str, spec_text: str, fingerprint: str, payload) -> str:
        """Write the entry (atomically); returns a note if it could not be stored on disk
        (then it is kept in memory, or not at all when it cannot be stored exactly)."""
        try:
            layout, blobs = self._encode_checked(payload)
        except _Unstorable as exc:
            return f"result not cached: {exc}"
        if not self.writable:
            self.remember(unit, spec_text, fingerprint, payload)
            return ""
        digest = _sha256(spec_text.encode())
        unit_dir = self.results / unit
        tmp = unit_dir / f"{_TMP_PREFIX}{digest[:16]}-{os.getpid()}-{uuid.uuid4().hex}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._real_dir(self.results)
            self._real_dir(unit_dir)
            tmp.mkdir()
            self._check_inside(tmp)
            for name, data in blobs.items():
                _write_new(tmp / name, data)
            manifest = {
                "format": FORMAT, "unit": unit, "spec": spec_text, "spec_sha256": digest,
                "fingerprint": fingerprint, "fa_study_version": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "payload": layout,
                "files": {n: {"sha256": _sha256(b), "bytes": len(b)} for n, b in blobs.items()},
            }
            _write_new(tmp / MANIFEST, (json.dumps(manifest, indent=1, allow_nan=True) + "\n").encode())
            back = self._load_dir(tmp, unit, spec_text, fingerprint)
            why = "it does not read back" if back.status != "hit" else _same_payload(payload, back.payload)
            if why:
                shutil.rmtree(tmp, ignore_errors=True)
                return f"result not cached: it does not survive storage exactly ({why})"[:300]
            self._publish(tmp, unit_dir / digest, unit, spec_text, fingerprint)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            self.remember(unit, spec_text, fingerprint, payload)
            return f"result kept in memory only: writing {unit_dir} failed ({exc.strerror or exc})"
        return ""

    def _check_inside(self, path: Path, *, root_ok: bool = False) -> None:
        """Refuse (``OSError``) a directory written into whose resolved path is not inside the
        resolved cache root (or the root itself, with ``root_ok``)."""
        real, root = os.path.realpath(path), str(self.root)
        if not (real.startswith(root if root.endswith(os.sep) else root + os.sep)
                or (root_ok and real == root)):
            raise OSError(errno.EXDEV, f"{path} resolves to {real}, outside the cache root "
                                       f"{self.root}; nothing is written there")

    def _real_dir(self, path: Path) -> None:
        """Make ``path`` (a directory of the cache) a real directory: created if missing, a
        symbolic link in its place removed (the link itself, never what it points at) and
        replaced; ``OSError`` if it is something else or does not resolve inside the root."""
        self._check_inside(path.parent, root_ok=True)
        for _ in range(5):
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                try:
                    path.mkdir()
                except FileExistsError:
                    continue  # another writer made it meanwhile: check what it made
                mode = stat.S_IFDIR
            if stat.S_ISLNK(mode):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                continue
            if not stat.S_ISDIR(mode):
                raise OSError(errno.ENOTDIR, f"{path} is {_kind(mode)}, not a directory")
            self._check_inside(path)
            return
        raise OSError(errno.ELOOP, f"{path} kept being replaced by a link")

    def _publish(self, tmp: Path, final: Path, unit: str, spec_text: str, fingerprint: str) -> None:
        """``os.replace`` the finished ``tmp`` onto ``final``; a valid entry that another
        writer published meanwhile is kept, a bad or stale one moved aside first."""
        for _ in range(3):
            try:
                os.replace(tmp, final)
                return
            except OSError:
                if not (final.exists() or final.is_symlink()):
                    continue  # it vanished meanwhile: try again
            if self._load_dir(final, unit, spec_text, fingerprint).status == "hit":
                shutil.rmtree(tmp, ignore_errors=True)  # another writer won with the same data
                return
            aside = final.parent / f"{_OLD_PREFIX}{final.name[:16]}-{os.getpid()}-{uuid.uuid4().hex}"
            try:
                os.replace(final, aside)
            except FileNotFoundError:
                continue
            if aside.is_dir() and not aside.is_symlink():
                shutil.rmtree(aside, ignore_errors=True)
            else:
                aside.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # lost every race: someone else's entry stands

    def remember(self, unit: str, spec_text: str, fingerprint: str, payload) -> None:
        """Keep the payload in memory (the fallback for a cache that cannot be written)."""
        with _MEMORY_LOCK:
            _MEMORY[(str(self.root), unit, _sha256(spec_text.encode()))] = (
                spec_text, fingerprint, _copy_payload(payload))

    def clear(self) -> None:
        """Remove every entry (and an old ``joblib/`` cache) under this root, and forget the
        in-memory ones."""
        with _MEMORY_LOCK:
            for k in [k for k in _MEMORY if k[0] == str(self.root)]:
                del _MEMORY[k]
        for d in (self.results, self.root / "joblib"):
            if os.path.islink(d):  # the link goes, never what it points at
                d.unlink(missing_ok=True)
            elif d.is_dir():
                shutil.rmtree(d, ignore_errors=True)


def clear_cache() -> None:
    """Forget every cached result (under the current ``$FA_STUDY_CACHE``, and in memory)."""
    ResultsCache(quiet=True).clear()


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheStats:
    """What :func:`run_units` did, one count per spec (``hits + computed + recomputed`` is the
    number of specs):

    * ``hits``: served from the cache (including a unit a worker found already written);
    * ``computed``: no entry, or one written by other code (another fingerprint), so computed;
    * ``recomputed``: an entry was there but damaged (truncated, altered, unreadable manifest,
      a symbolic link, a file that is not a regular file, an oversized file) or belonged to
      another run, so computed again and replaced;
    * ``notes``: plain-language remarks for a status line, e.g. ``"unit AuditUnit(seed=3):
      cache entry truncated (...), recomputed"`` or that the cache is kept in memory.

    ``str(stats)`` is a one-line summary."""

    hits: int = 0
    computed: int = 0
    recomputed: int = 0
    notes: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.hits + self.computed + self.recomputed

    def __str__(self) -> str:
        text = f"{self.hits}/{self.total} from the cache"
        if self.computed:
            text += f", {self.computed} computed"
        if self.recomputed:
            text += f", {self.recomputed} recomputed (bad cache entries)"
        return text


def _compute_unit(unit_fn: Callable, spec, fingerprint: str, root: str | None, unit: str,
                  spec_text: str):
    """Run one unit on a worker: served if another process wrote it meanwhile, else computed
    and written to the shared cache at ``root``. Returns ``(spec_text, payload, status, note)``
    with status ``"hit"``, ``"stored"`` or ``"unstored"`` (the caller then stores it)."""
    here = code_fingerprint()
    if here != fingerprint:
        raise RuntimeError(f"this worker runs other fa_study code (fingerprint {here}) than the "
                           f"caller ({fingerprint}); install the same version on every worker")
    cache = ResultsCache(root, quiet=True) if root is not None else None
    if cache is not None:
        found = cache.load(unit, spec_text, fingerprint)
        if found.status == "hit":
            return spec_text, found.payload, "hit", ""
    with one_cpu_thread():
        payload = unit_fn(spec, fingerprint)
    if cache is None or not cache.writable:
        return spec_text, payload, "unstored", ""
    note = cache.store(unit, spec_text, fingerprint, payload)
    if note.startswith("result kept in memory"):  # this worker cannot write: the caller stores it
        return spec_text, payload, "unstored", ""
    return spec_text, payload, "stored", note


def _generator_ok() -> bool:
    try:
        from joblib.parallel import get_active_backend

        backend, _ = get_active_backend()
        return bool(getattr(backend, "supports_return_generator", False))
    except Exception:  # noqa: BLE001 - an old or odd joblib: return a list
        return False


def run_units(unit_fn: Callable, specs: Sequence, *, callback: Callable | None = None,
              n_jobs: int = 1, progress: Callable[[int, int, bool], None] | None = None
              ) -> tuple[list, CacheStats]:
    """Run ``unit_fn(spec, fingerprint, callback=...)`` for every spec, each result cached.

    Returns the payloads (in the order of ``specs``) and a :class:`CacheStats`
    (``stats.hits`` served from the cache; ``stats.notes`` for the status line). Units already
    in the cache are served; the others are computed, on the CPU under
    :func:`one_cpu_thread`. With ``n_jobs != 1`` and more than one unit to compute they run
    through ``joblib.Parallel(n_jobs, batch_size=1)`` -- inside
    ``joblib.parallel_backend("dask")`` on a dask cluster -- and the live ``callback`` is not
    called (the workers are other processes); each worker writes its unit to the cache
    directory this process resolved (it must be the same path on the workers: a shared file
    system). Every unit is written as soon as it finishes, so an interrupted call loses only
    the units in flight. ``progress(done, total, from_cache)`` is called after each unit.
    Identical specs are computed once. Nothing is printed: problems go to ``stats.notes``
    (and a :class:`CacheWarning` for a planted pickle or a cache that cannot be written).
    """
    specs = list(specs)
    if n_jobs is not None:
        check_int("n_jobs", n_jobs)
    fp = code_fingerprint()
    cache = ResultsCache()
    unit = unit_name(unit_fn)
    cache._scan_unit_dir(unit)
    texts = [spec_json(s) for s in specs]
    first: dict[str, int] = {}
    for i, t in enumerate(texts):
        first.setdefault(t, i)
    positions: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        positions.setdefault(t, []).append(i)

    total = len(specs)
    out: list = [None] * total
    counts = {"hits": 0, "computed": 0, "recomputed": 0}
    notes: list[str] = [cache.note] if cache.note else []
    kind: dict[str, str] = {}
    stale = 0
    done = 0

    def finish(text: str, payload, from_cache: bool, how: str) -> None:
        nonlocal done
        for j, i in enumerate(positions[text]):
            out[i] = payload if j == 0 else _copy_payload(payload)
            counts[how] += 1
            done += 1
            if progress:
                progress(done, total, from_cache)

    todo: list[str] = []
    for text, i in first.items():
        found = cache.load(unit, text, fp)
        if found.status == "hit":
            finish(text, found.payload, True, "hits")
            continue
        todo.append(text)
        kind[text] = "recomputed" if found.status == "bad" else "computed"
        if found.status == "bad":
            notes.append(f"unit {spec_label(specs[i])}: {found.note}, recomputed")
        stale += found.status == "stale"
    if stale:
        notes.append(f"{stale} unit(s) had been cached by other code (another fa_study version "
                     "or edited source): recomputed")

    def keep(text: str, payload, status: str, note: str) -> None:
        if status == "unstored":
            note = cache.store(unit, text, fp, payload)
        if note:
            notes.append(f"unit {spec_label(specs[first[text]])}: {note}")
        finish(text, payload, status == "hit", "hits" if status == "hit" else kind[text])

    if n_jobs == 1 or len(todo) <= 1:
        for text in todo:
            with one_cpu_thread():
                payload = unit_fn(specs[first[text]], fp, callback=callback)
            keep(text, payload, "unstored", "")
    else:
        from joblib import Parallel, delayed

        root = str(cache.root) if cache.writable else None
        jobs = (delayed(_compute_unit)(unit_fn, specs[first[t]], fp, root, unit, t) for t in todo)
        mode = "generator_unordered" if _generator_ok() else "list"
        for text, payload, status, note in Parallel(n_jobs=n_jobs, batch_size=1, return_as=mode)(jobs):
            keep(text, payload, status, note)
    return out, CacheStats(counts["hits"], counts["computed"], counts["recomputed"], notes)

