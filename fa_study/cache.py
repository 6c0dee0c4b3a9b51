"""The results cache: data on disk, never code.

A study is a list of *units of work* (one training run each, dispatched by
:func:`fa_study.units.run_units`). A unit is described by a *spec*, a frozen dataclass whose
fields are frozen dataclasses, tuples, dicts with str keys, None, bool, int, float or str. A
*unit function* ``fn(spec, fingerprint, callback=None)`` returns a *payload*: a pandas
DataFrame, or a dict (str keys) whose values are DataFrames or JSON values (dict with str keys,
list, tuple, str, int, float, bool, None; NaN and infinities allowed).

One file per entry (``$FA_STUDY_CACHE``, see :func:`fa_study.config.cache_dir`)::

    results/<unit function, module.qualname>/<sha256 of the spec's canonical JSON>.json
        line 1: the header -- format, unit, spec (canonical JSON), code fingerprint, fa_study
                version, creation time (UTC), size and sha256 of the payload text
        line 2: the payload as JSON (DataFrames column by column with their dtypes and index)

The guarantees:

* **Nothing is unpickled.** An entry is read with :mod:`json` only, and its payload parsed only
  after its size and sha256 matched the header. Nothing else in the cache is opened; an old
  ``joblib/`` pickle cache is ignored with a :class:`CacheWarning`.
* **Exact.** Floats by ``repr`` (bit for bit, NaN and infinities too), frames with their dtypes
  (int64, float64, bool, nullable ``Int64``/``boolean``, ``str``, categorical, ``object``
  cells as their exact Python values) and their index; ``.attrs`` are not stored. Every entry
  is read back and compared with the computed payload before it is published; a payload that
  cannot be stored exactly is returned, not cached, with a note.
* **A bad entry is recomputed, never served, never an exception.** Missing: computed. Written
  by other code (the :func:`code_fingerprint` differs): computed again. Truncated or altered,
  a header that is not JSON or incomplete, an entry of another run (its spec differs), a
  symbolic link in place of ``results/``, the unit directory or the entry, something that is
  not a regular file, an entry over :data:`PAYLOAD_MAX_BYTES`: recomputed and replaced, with a
  note. Each path component is checked with ``lstat``, and the entry opened
  ``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat`` before anything is read, so a link is
  never followed and a pipe never hangs a read.
* **Atomic.** An entry is written to a uniquely named temporary file next to it and published
  with one ``os.replace``: readers see a whole entry or none, and two processes computing the
  same spec leave one valid entry. A link in place of a directory written into is removed (the
  link, never its target) and replaced by a real directory; a directory that resolves outside
  the cache root is never written into (the result is then kept in memory).
* **Never in the way.** A cache directory that cannot be written (read-only, or
  ``$FA_STUDY_CACHE`` names a file) is warned about once; new results are kept in memory for
  the rest of the process and every call says so in its notes.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import threading
import uuid
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__
from .config import CACHE_ENV, NotRegularFile, cache_dir, file_kind, get_device, open_regular

FORMAT = "fa_study.results/2"
RESULTS = "results"
_TMP_PREFIX = ".tmp-"
# An entry holds one run's tables (the studies' largest are a few MB): over 1 GiB it is refused
# before it is read, and a result that large is returned but not cached.
PAYLOAD_MAX_BYTES = 1 << 30
# how a note from ResultsCache.store starts when the disk refused the entry (a worker then
# hands the result to its caller to store)
KEPT_IN_MEMORY = "result kept in memory only"


class CacheWarning(UserWarning):
    """A problem with the results cache the user should know about (an old pickle cache, a
    cache directory that cannot be written)."""


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
    each op costs more in synchronisation than it saves (a quick-profile study took 121 s with
    2 threads and 18 s with 1 on a busy 2-core machine). Parallelism belongs across units
    (:func:`fa_study.units.run_units`). One thread also makes CPU results independent of the
    machine's core count, so units run in worker processes equal a sequential run bit for bit.
    CUDA is unaffected."""
    import torch

    if get_device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- spec keys ---------------------------------------------------------------------------------

def spec_json(spec) -> str:
    """The canonical JSON of ``spec``: class name and fields, keys sorted, no spaces, floats
    written as ``repr`` (exact: ``1e-4`` and ``0.0001`` give the same text), NaN as ``NaN``.
    ``1`` and ``1.0``, ``True`` and ``1``, a tuple and a dict are told apart. ``TypeError`` for
    anything that is not a frozen dataclass of the allowed types."""
    if not (dataclasses.is_dataclass(spec) and not isinstance(spec, type)):
        raise TypeError(f"a spec must be a frozen dataclass instance, got {type(spec).__name__} "
                        f"({spec!r})")
    return json.dumps(_enc(spec, type(spec).__name__, spec=True), sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True, allow_nan=True)


def spec_key(spec) -> str:
    """The sha256 (hex) of :func:`spec_json`: the name of the spec's cache entry."""
    return _sha256(spec_json(spec).encode())


def spec_label(spec, width: int = 90) -> str:
    """A short readable name of a spec for notes: its class and the fields that differ from
    their defaults, e.g. ``AuditUnit(method='fa', seed=3)``."""
    fields = [(f.name, getattr(spec, f.name), f.default) for f in dataclasses.fields(spec)]
    parts = [f"{name}={v!r}" for name, v, default in fields
             if default is dataclasses.MISSING or _enc(v, "", spec=True) != _enc(default, "", spec=True)]
    text = f"{type(spec).__name__}({', '.join(parts)})"
    return text if len(text) <= width else text[:width - 1] + "…"


def unit_name(fn: Callable) -> str:
    """The directory name of a unit function's entries: ``module.qualname``."""
    name = f"{getattr(fn, '__module__', None) or 'unknown'}.{getattr(fn, '__qualname__', repr(fn))}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:200]


# -- payload encoding: JSON, exactly ---------------------------------------------------------

_SCALARS = ((np.bool_, bool), ((int, np.integer), int), ((float, np.floating), float))


class _Unstorable(TypeError):
    """The value cannot be stored (or be a spec's key) exactly; the message says why."""


def _enc(value, path: str, spec: bool = False):
    """``value`` as JSON data exactly as written (floats by ``repr``, NaN and infinities too),
    every type told apart: tuples, DataFrames and frozen dataclasses tagged; ``spec``: a
    spec's field (lists refused: a spec is immutable). Scalars are None, bool, str, int and
    float, numpy's as Python's; json writes floats with repr(), the shortest exact text."""
    if value is None or isinstance(value, (bool, str)):
        return value
    for types, cast in _SCALARS:
        if isinstance(value, types):
            return cast(value)
    if isinstance(value, pd.DataFrame):
        return {"__frame__": _frame_enc(value, path)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if not type(value).__dataclass_params__.frozen:
            raise _Unstorable(f"{path} is a {type(value).__name__}, a dataclass that is not frozen; "
                              "specs must be frozen dataclasses")
        fields = {f.name: _enc(getattr(value, f.name), f"{path}.{f.name}", spec)
                  for f in dataclasses.fields(value)}
        return {"__class__": type(value).__qualname__, "fields": fields}
    if isinstance(value, tuple) or (isinstance(value, list) and not spec):
        items = [_enc(v, f"{path}[{i}]", spec) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value) or set(value) & {"__tuple__", "__frame__", "__class__"}:
            raise _Unstorable(f"{path} is a dict with non-str keys or reserved ones: {list(value)!r}"[:300])
        return {k: _enc(v, f"{path}[{k!r}]", spec) for k, v in value.items()}
    raise _Unstorable(f"{path} is of type {type(value).__name__} ({value!r}); allowed: frozen "
                      "dataclasses (specs), DataFrames (payloads), tuples, lists (payloads), dicts "
                      "with str keys, None, bool, int, float, str"[:300])


def _dec(value):
    if isinstance(value, list):
        return [_dec(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_dec(v) for v in value["__tuple__"])
        if set(value) == {"__frame__"}:
            return _frame_dec(value["__frame__"])
        return {k: _dec(v) for k, v in value.items()}
    return value


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=True, allow_nan=True, separators=(",", ":"))


def _series_enc(values: pd.Series | pd.Index, what: str) -> dict:
    """A column (or the index): its dtype (with a categorical's categories) and its cells."""
    dtype = values.dtype
    out = {"name": _enc(values.name, what), "dtype": str(dtype),
           "values": [None if v is pd.NA else _enc(v, what) for v in values.tolist()]}
    if isinstance(dtype, pd.CategoricalDtype):
        out.update(categories=_enc(dtype.categories.tolist(), what), ordered=bool(dtype.ordered))
    return out


def _series_dec(item: dict, index=None):
    dtype = item["dtype"]
    if "categories" in item:
        dtype = pd.CategoricalDtype(item["categories"], item["ordered"])
    values = _dec(item["values"])
    if index is None:
        return pd.Index(values, dtype=dtype, name=_dec(item["name"]))
    if dtype == "object":  # cells kept as they are (a list cell stays one cell)
        cells = np.empty(len(values), dtype=object)
        cells[:] = values
        values = cells
    return pd.Series(values, dtype=dtype, index=index)


def _frame_enc(df: pd.DataFrame, what: str) -> dict:
    if df.columns.has_duplicates or any(isinstance(i, pd.MultiIndex) for i in (df.columns, df.index)):
        raise _Unstorable(f"{what} has duplicate column names or a MultiIndex")
    return {"index": _series_enc(df.index, what),
            "columns": [_series_enc(df.iloc[:, i].rename(df.columns[i]), f"{what}[{df.columns[i]!r}]")
                        for i in range(df.shape[1])]}


def _frame_dec(item: dict) -> pd.DataFrame:
    df = pd.DataFrame(index=_series_dec(item["index"]))
    for i, col in enumerate(item["columns"]):
        df.insert(i, _dec(col["name"]), _series_dec(col, df.index))
    return df


def _encode(payload) -> bytes:
    """The payload as JSON text (a DataFrame, or a dict of DataFrames and JSON values)."""
    if not isinstance(payload, (pd.DataFrame, dict)):
        raise _Unstorable(f"the payload is a {type(payload).__name__}; a unit must return a "
                          "DataFrame or a dict of DataFrames and JSON values")
    data = _dumps(_enc(payload, "payload")).encode()
    if len(data) > PAYLOAD_MAX_BYTES:
        raise _Unstorable(f"it would take {len(data):,} bytes, more than a cache entry may hold "
                          f"({PAYLOAD_MAX_BYTES:,})")
    return data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- files: regular files only, never through a link ------------------------------------------

class _Fault(Exception):
    """What makes an entry bad; the message completes "cache ..." in a note."""


def _read_fd(fd: int, limit: int) -> bytes:
    """At most ``limit`` bytes from ``fd`` (fewer at the end of the file)."""
    chunks = []
    while limit > 0 and (data := os.read(fd, min(limit, 1 << 24))):
        chunks.append(data)
        limit -= len(data)
    return b"".join(chunks)


def _read_regular(path: Path, label: str, limit: int) -> bytes:
    """The bytes of the regular file ``path`` (``label`` names it in a note). A link, pipe,
    socket, device or directory is a :class:`_Fault` (checked with ``lstat``, then again by the
    ``O_NOFOLLOW | O_NONBLOCK`` open and ``fstat``: :func:`fa_study.config.open_regular`),
    never read; so is a file over ``limit`` bytes, of which nothing is read (and of a file, at
    most its size plus one byte)."""
    try:
        fd = open_regular(path, follow=False)
    except NotRegularFile as exc:
        raise _Fault(f"{label} is {exc.kind}") from None
    try:
        size = os.fstat(fd).st_size
        data = b"" if size > limit else _read_fd(fd, size + 1)  # + 1: to see the end
    finally:
        os.close(fd)
    if size > limit or len(data) > limit:
        raise _Fault(f"{label} is larger ({max(size, len(data)):,} bytes) than a cache entry "
                     f"may be ({limit:,} bytes)")
    return data


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` and write ``data``. ``path`` must not exist: ``O_CREAT | O_EXCL``
    refuses a link (even a dangling one) in its place, so nothing is written through it."""
    with open(path, "xb") as fh:
        fh.write(data)


def _is_real_dir(path: Path) -> bool:
    """``path`` is a directory, not a link to one (the link is never followed)."""
    return not os.path.islink(path) and os.path.isdir(path)


def _parse_entry(raw: bytes, unit: str, spec_text: str) -> tuple[dict, bytes]:
    """The header and the payload text of an entry file, the payload's size and sha256 checked
    against the header before it is parsed; a :class:`_Fault` for anything else."""
    head, _, body = raw.partition(b"\n")
    try:
        man = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _Fault("entry header is not JSON") from None
    required = {"format": str, "unit": str, "spec": str, "fingerprint": str, "sha256": str, "bytes": int}
    if not isinstance(man, dict) or any(type(man.get(k)) is not t for k, t in required.items()) \
            or man["format"] != FORMAT or man["bytes"] < 0:
        raise _Fault("entry header is incomplete or of another format")
    if man["spec"] != spec_text or man["unit"] != unit:
        raise _Fault("entry belongs to another run (its header's spec differs from this unit's)")
    if len(body) != man["bytes"]:
        what = "truncated" if len(body) < man["bytes"] else "altered"
        raise _Fault(f"entry {what} ({len(body):,} of {man['bytes']:,} bytes)")
    if _sha256(body) != man["sha256"]:
        raise _Fault("entry altered (sha256 differs from its header)")
    return man, body


@dataclass(frozen=True)
class Lookup:
    """The outcome of :meth:`ResultsCache.load`: ``status`` ``"hit"`` (``payload`` set),
    ``"missing"``, ``"stale"`` (written by other code) or ``"bad"`` (``note`` says what)."""

    status: str
    payload: Any = None
    note: str = ""


_MEMORY: dict[tuple[str, str, str], tuple[str, bytes]] = {}  # in-memory fallback entries
_MEMORY_LOCK = threading.Lock()
_WARNED: set[tuple[str, str]] = set()


def _warn_once(kind: str, where: str, message: str) -> None:
    if (kind, where) not in _WARNED:
        _WARNED.add((kind, where))
        warnings.warn(message, CacheWarning, stacklevel=3)


class ResultsCache:
    """The results under ``root`` (default :func:`fa_study.config.cache_dir`, i.e.
    ``$FA_STUDY_CACHE``); see the module docstring for the layout and the guarantees.

    ``writable`` is False when the directory cannot be written; new entries then live in
    memory for the rest of the process and ``note`` says why (warned once unless ``quiet``)."""

    def __init__(self, root: str | os.PathLike | None = None, *, quiet: bool = False):
        self.root = Path(root).expanduser().resolve() if root is not None else cache_dir()
        self.results = self.root / RESULTS
        self.writable, self.note = True, ""
        try:
            if self.root.exists() and not self.root.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a directory")
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f"{_TMP_PREFIX}probe-{os.getpid()}-{uuid.uuid4().hex}"
            _write_new(probe, b"")
            probe.unlink()
        except OSError as exc:
            self.writable = False
            self.note = (f"the results cache {CACHE_ENV}={self.root} cannot be written "
                         f"({exc.strerror or exc}); new results are kept in memory for this session "
                         f"only — set {CACHE_ENV} to a writable directory to keep them")
            if not quiet:
                _warn_once("readonly", str(self.root), self.note)
        legacy = self.root / "joblib"
        if not quiet and legacy.is_dir():
            _warn_once("pickle", str(legacy), (
                f"{legacy} holds an old joblib (pickle) results cache; it is ignored and never "
                "unpickled. Delete it (or call fa_study.cache.clear_cache()) to silence this."))

    def entry_path(self, unit: str, spec_text: str) -> Path:
        return self.results / unit / f"{_sha256(spec_text.encode())}.json"

    def entries(self, unit: str | None = None) -> list[Path]:
        """The entry files (of one unit function, or all); links are not followed."""
        if not _is_real_dir(self.results):
            return []
        units = [self.results / unit] if unit else list(self.results.iterdir())
        return [p for u in units if _is_real_dir(u) for p in sorted(u.glob("[!.]*.json"))
                if stat.S_ISREG(os.lstat(p).st_mode)]

    def load(self, unit: str, spec_text: str, fingerprint: str) -> Lookup:
        """The entry of the spec whose canonical JSON is ``spec_text`` (in memory first); a bad
        entry is a ``"bad"`` lookup with a note, never an exception."""
        with _MEMORY_LOCK:
            mem = _MEMORY.get((str(self.root), unit, spec_text))
        if mem is not None and mem[0] == fingerprint:  # a fresh copy, never the cache's own
            return Lookup("hit", _dec(json.loads(mem[1])))
        return self._load_file(self.entry_path(unit, spec_text), unit, spec_text, fingerprint)

    def _load_file(self, path: Path, unit: str, spec_text: str, fingerprint: str) -> Lookup:
        rel = path.relative_to(self.results)
        try:
            for i, label in ((0, "directory results/"), (1, f"unit directory results/{rel.parts[0]}")):
                mode = os.lstat(self.results.joinpath(*rel.parts[:i])).st_mode
                if not stat.S_ISDIR(mode):
                    raise _Fault(f"{label} is {file_kind(mode)}")
            man, body = _parse_entry(_read_regular(path, f"entry results/{rel}", PAYLOAD_MAX_BYTES),
                                     unit, spec_text)
            if man["fingerprint"] != fingerprint:
                return Lookup("stale")
            return Lookup("hit", _dec(json.loads(body.decode("utf-8"))))
        except (FileNotFoundError, NotADirectoryError):  # no entry (or no cache directory)
            return Lookup("missing")
        except _Fault as exc:
            return Lookup("bad", note=f"cache {exc}"[:300])
        except OSError as exc:
            return Lookup("bad", note=f"cache entry unreadable ({exc.strerror or exc})")
        except Exception as exc:  # noqa: BLE001 - any parse failure means: recompute
            return Lookup("bad", note=f"cache payload unreadable ({type(exc).__name__}: {exc})"[:300])

    def store(self, unit: str, spec_text: str, fingerprint: str, payload) -> str:
        """Write the entry (atomically); returns a note if it could not be stored on disk
        (then it is kept in memory, or not at all when it cannot be stored exactly)."""
        try:
            body = _encode(payload)
        except _Unstorable as exc:
            return f"result not cached: {exc}"
        if not self.writable:
            self.remember(unit, spec_text, fingerprint, body)
            return ""
        final = self.entry_path(unit, spec_text)
        tmp = final.with_name(f"{_TMP_PREFIX}{final.name[:16]}-{os.getpid()}-{uuid.uuid4().hex}.json")
        head = {"format": FORMAT, "unit": unit, "spec": spec_text, "fingerprint": fingerprint,
                "fa_study_version": __version__, "sha256": _sha256(body), "bytes": len(body),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for d in (self.results, final.parent):
                self._real_dir(d)
            _write_new(tmp, _dumps(head).encode() + b"\n" + body)
            back = self._load_file(tmp, unit, spec_text, fingerprint)
            if back.status != "hit" or _encode(back.payload) != body:  # e.g. a dtype not kept
                tmp.unlink()
                return "result not cached: it does not survive storage exactly"
            if _is_real_dir(final):  # not an entry of ours (entries are files)
                shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)  # a link in its place is replaced, never followed
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            self.remember(unit, spec_text, fingerprint, body)
            return f"{KEPT_IN_MEMORY}: writing {final.parent} failed ({exc.strerror or exc})"
        return ""

    def _inside(self, path: Path, root_ok: bool = False) -> bool:
        real, root = os.path.realpath(path), str(self.root)
        return real.startswith(root.rstrip(os.sep) + os.sep) or (root_ok and real == root)

    def _real_dir(self, path: Path) -> None:
        """Make ``path`` a real directory inside the root: created if missing, a link in its
        place removed (the link, never its target); ``OSError`` if it or its parent resolves
        outside the root (nothing is then written)."""
        if self._inside(path.parent, root_ok=True):
            if os.path.islink(path):
                os.unlink(path)
            path.mkdir(exist_ok=True)
        if not (self._inside(path) and _is_real_dir(path)):
            raise OSError(errno.EXDEV, f"{path} resolves to {os.path.realpath(path)}, outside the "
                                       f"cache root {self.root}; nothing is written there")

    def remember(self, unit: str, spec_text: str, fingerprint: str, body: bytes) -> None:
        """Keep the payload's text in memory (the fallback for a cache that cannot be written)."""
        with _MEMORY_LOCK:
            _MEMORY[(str(self.root), unit, spec_text)] = (fingerprint, body)

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
