"""Dispatch of units of work: cached ones served, the others spread over the machine's cores.

:func:`run_units` serves the units already in the results cache (:mod:`fa_study.cache`) and
computes the others, each written to the cache as soon as it finishes, so an interrupted call
loses only the units in flight. With ``n_jobs=None`` (the default everywhere) the units to
compute run in ``min(units, core budget)`` worker processes (joblib's reusable loky executor:
a second call finds its workers warm), each unit with one torch thread
(:func:`fa_study.cache.one_cpu_thread`), so a parallel run equals a sequential one bit for bit.
One unit to compute runs in this process.

The core budget is ``$FA_STUDY_CORES`` if set, else the cores this process may use; ``make
study`` gives each of its concurrent notebooks an equal share, so notebooks at once never
oversubscribe the machine. ``$FA_STUDY_JOBS`` overrides ``n_jobs=None`` everywhere
(``FA_STUDY_JOBS=1``: everything in turn, in this process). Inside
``joblib.parallel_backend("dask")`` the units run on a dask cluster.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from . import cache
from .cache import ResultsCache, one_cpu_thread, spec_json, spec_label, unit_name

CORES_ENV = "FA_STUDY_CORES"
JOBS_ENV = "FA_STUDY_JOBS"


@dataclass(frozen=True)
class CacheStats:
    """What :func:`run_units` did, one count per spec (``hits + computed + recomputed`` is the
    number of specs): ``hits`` served from the cache (also a unit a worker found written
    meanwhile); ``computed`` had no entry, or one written by other code (another fingerprint);
    ``recomputed`` had a damaged or foreign entry, replaced; ``notes`` plain-language remarks
    for a status line. ``str(stats)`` is a one-line summary."""

    hits: int = 0
    computed: int = 0
    recomputed: int = 0
    notes: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.hits + self.computed + self.recomputed

    def __str__(self) -> str:
        done = ((self.computed, "computed"), (self.recomputed, "recomputed (bad cache entries)"))
        return ", ".join([f"{self.hits}/{self.total} from the cache", *(f"{n} {w}" for n, w in done if n)])


def _env_count(name: str, what: str) -> int | None:
    """The positive int in ``$name`` (None when unset or empty); ValueError naming it otherwise."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"${name} must be a positive integer ({what}), got {text!r}")
    return int(text)


def core_budget() -> int:
    """The cores the units of this process may keep busy: ``$FA_STUDY_CORES``, else the cores
    this process may run on (its CPU affinity where the platform says, else ``os.cpu_count``)."""
    affinity = getattr(os, "sched_getaffinity", None)  # not on every platform
    return (_env_count(CORES_ENV, "the cores the units of this process may use")
            or (len(affinity(0)) if affinity else os.cpu_count() or 1))


def check_n_jobs(n_jobs) -> int | None:
    """``n_jobs``: None (the core budget), a positive int (units run at once) or -1 (all cores)."""
    from .config import _is_int

    if n_jobs is not None and (not _is_int(n_jobs) or not (n_jobs >= 1 or n_jobs == -1)):
        raise ValueError(f"n_jobs must be a positive integer (units run at once) or -1 (all cores; "
                         f"with a dask backend: all workers), or None (the core budget: ${CORES_ENV}, "
                         f"else the cores here), got {n_jobs!r}")
    return None if n_jobs is None else int(n_jobs)


def workers_for(n_jobs, todo: int) -> int:
    """Processes for ``todo`` units: ``n_jobs`` as given, else ``$FA_STUDY_JOBS``, else
    ``min(todo, core budget)``; 1 means in this process."""
    n_jobs = check_n_jobs(n_jobs)
    if n_jobs is None:
        n_jobs = _env_count(JOBS_ENV, "units run at once") or core_budget()
    return 1 if todo <= 1 or n_jobs == 1 else (n_jobs if n_jobs == -1 else min(n_jobs, todo))


def caller_settings() -> dict[str, str]:
    """The caller's ``$FA_STUDY_*`` settings (data, device, profile, ...), for its workers."""
    return {k: v for k, v in os.environ.items() if k.startswith("FA_STUDY_")}


def use_settings(settings: dict[str, str]) -> None:
    """Make this worker's ``$FA_STUDY_*`` exactly the caller's (``caller_settings()`` there): a reused
    worker was started with the environment of an earlier call."""
    for key in [k for k in os.environ if k.startswith("FA_STUDY_") and k not in settings]:
        del os.environ[key]
    os.environ.update(settings)


def compute_unit(unit_fn: Callable, spec, fingerprint: str, root: str | None, unit: str, spec_text: str):
    """Run one unit on a worker: served if another process wrote it meanwhile, else computed
    and written to the shared cache at ``root``. Returns ``(spec_text, payload, status, note)``
    with status ``"hit"``, ``"stored"``, ``"unstored"`` (the caller then stores it) or ``"other
    code"`` (the worker's fa_study source differs, e.g. edited since the caller imported it: the
    caller computes the unit itself). The worker already has the caller's ``$FA_STUDY_*``
    settings (:func:`as_finished`)."""
    if cache.code_fingerprint() != fingerprint:  # the caller computes it with the code its key names
        return spec_text, None, "other code", ""
    results = ResultsCache(root, quiet=True) if root is not None else None
    if results is not None:
        found = results.load(unit, spec_text, fingerprint)
        if found.status == "hit":
            return spec_text, found.payload, "hit", ""
    with one_cpu_thread():
        payload = unit_fn(spec, fingerprint)
    if results is None or not results.writable:
        return spec_text, payload, "unstored", ""
    note = results.store(unit, spec_text, fingerprint, payload)
    if note.startswith(cache.KEPT_IN_MEMORY):  # this worker cannot write: the caller stores it
        return spec_text, payload, "unstored", ""
    return spec_text, payload, "stored", note


class _Sweep:
    """The bookkeeping of one :func:`run_units` call: which specs are served, which computed,
    the payloads in spec order, the counts, the notes and the progress."""

    def __init__(self, unit_fn: Callable, specs: list, progress: Callable | None):
        self.cache, self.fp, self.unit = ResultsCache(), cache.code_fingerprint(), unit_name(unit_fn)
        self.specs, self.progress = specs, progress
        self.positions: dict[str, list[int]] = {}
        for i, text in enumerate(spec_json(s) for s in specs):
            self.positions.setdefault(text, []).append(i)
        self.out: list = [None] * len(specs)
        self.counts = {"hits": 0, "computed": 0, "recomputed": 0}
        self.notes: list[str] = [self.cache.note] if self.cache.note else []
        self.kind: dict[str, str] = {}

    def spec(self, text: str):
        return self.specs[self.positions[text][0]]

    def serve_cached(self) -> list[str]:
        """Serve every spec found in the cache; the canonical texts of the others, in order."""
        todo, stale = [], 0
        for text in self.positions:
            found = self.cache.load(self.unit, text, self.fp)
            if found.status == "hit":
                self.finish(text, found.payload, "hits")
                continue
            todo.append(text)
            self.kind[text] = "recomputed" if found.status == "bad" else "computed"
            if found.status == "bad":
                self.notes.append(f"unit {spec_label(self.spec(text))}: {found.note}, recomputed")
            stale += found.status == "stale"
        if stale:
            self.notes.append(f"{stale} unit(s) had been cached by other code (another fa_study "
                              "version or edited source): recomputed")
        return todo

    def finish(self, text: str, payload, how: str) -> None:
        for j, i in enumerate(self.positions[text]):
            self.out[i] = payload if j == 0 else copy.deepcopy(payload)
            self.counts[how] += 1
            if self.progress:
                self.progress(sum(self.counts.values()), len(self.specs), how == "hits")

    def keep(self, text: str, payload, status: str, note: str) -> None:
        """A computed (or, from a worker, possibly served) unit: stored unless a worker did."""
        if status == "unstored":
            note = self.cache.store(self.unit, text, self.fp, payload)
        if note:
            self.notes.append(f"unit {spec_label(self.spec(text))}: {note}")
        self.finish(text, payload, "hits" if status == "hit" else self.kind[text])

    def stats(self) -> CacheStats:
        return CacheStats(**self.counts, notes=self.notes)


def _registries() -> dict[str, tuple[dict, Callable]]:
    """Each registry: its table and how an entry of it is registered again (through the
    registry's own function, which also rebuilds what it derives from the table)."""
    from . import models
    from .rules import base

    return {"rules": (base.RULES, lambda name, cls: base.register(cls, replace=True)),
            "architectures": (models.ARCHITECTURES, lambda name, a: models.register_arch(name, **vars(a)))}


def registered_in_main() -> list[tuple[str, str, object]]:
    """``(registry, name, entry)`` for the rules and architectures the caller registered in its
    ``__main__`` (a notebook or a script): a fresh worker knows only the package's own, so they
    travel with the tasks (cloudpickle sends such classes by value)."""
    return [(reg, name, entry) for reg, (table, _) in _registries().items() for name, entry in table.items()
            if getattr(getattr(entry, "cls", entry), "__module__", None) == "__main__"]


def _call_as(settings: dict[str, str], registered: list, index: int, fn: Callable, args: tuple):
    use_settings(settings)
    registries = _registries()
    for reg, name, entry in registered:
        registries[reg][1](name, entry)
    return index, fn(*args)


def as_finished(fn: Callable, tasks: Sequence[tuple], workers: int) -> Iterator[tuple[int, object]]:
    """``(i, fn(*tasks[i]))`` for every task, computed by ``workers`` joblib processes (loky's
    reusable pool, or the active backend) with this process's ``$FA_STUDY_*`` settings and the
    rules and architectures its ``__main__`` registered (:func:`registered_in_main`), in the
    order the tasks finish (in order where the backend cannot say). ``fn`` and the tasks must
    pickle (cloudpickle: closures do)."""
    from joblib import Parallel, delayed
    from joblib.parallel import get_active_backend

    env = caller_settings()
    backend, _ = get_active_backend()
    mode = "generator_unordered" if getattr(backend, "supports_return_generator", False) else "list"
    extra = registered_in_main()
    jobs = (delayed(_call_as)(env, extra, i, fn, tuple(t)) for i, t in enumerate(tasks))
    yield from Parallel(n_jobs=workers, batch_size=1, return_as=mode)(jobs)


def _in_workers(sweep: _Sweep, unit_fn: Callable, todo: list[str], workers: int,
                replay: Callable | None) -> list[str]:
    """Compute ``todo`` in worker processes (:func:`as_finished`), keeping each unit as it
    finishes; returns the units the workers refused (they run other code)."""
    root = str(sweep.cache.root) if sweep.cache.writable else None
    tasks = [(unit_fn, sweep.spec(t), sweep.fp, root, sweep.unit, t) for t in todo]
    refused = []
    for _, (text, payload, status, note) in as_finished(compute_unit, tasks, workers):
        if status == "other code":
            refused.append(text)
            continue
        sweep.keep(text, payload, status, note)
        if replay is not None:
            replay(sweep.spec(text), payload)
    return refused


def run_units(unit_fn: Callable, specs: Sequence, *, callback: Callable | None = None,
              n_jobs: int | None = None, progress: Callable[[int, int, bool], None] | None = None,
              replay: Callable | None = None) -> tuple[list, CacheStats]:
    """Run ``unit_fn(spec, fingerprint, callback=...)`` for every spec, each result cached.

    Returns the payloads (in the order of ``specs``) and a :class:`CacheStats`. Units already
    in the cache are served; identical specs are computed once; the others are computed under
    :func:`~fa_study.cache.one_cpu_thread`, in :func:`workers_for` processes. In this process
    the live ``callback`` sees every unit's records; a unit computed by a worker is handed
    with its payload to ``replay(spec, payload)`` when it finishes (e.g. to redraw a live plot
    with its history). ``progress(done, total, from_cache)`` is called after each unit, as it
    finishes. Workers write their unit to the cache directory this process resolved (on a
    dask cluster it must be a shared file system). Nothing is printed: problems go to
    ``stats.notes`` (and a :class:`~fa_study.cache.CacheWarning` for a cache that cannot be
    written or an old pickle cache).
    """
    check_n_jobs(n_jobs)  # before the cache is read
    sweep = _Sweep(unit_fn, list(specs), progress)
    todo = sweep.serve_cached()
    workers = workers_for(n_jobs, len(todo))
    if workers != 1:
        todo = _in_workers(sweep, unit_fn, todo, workers, replay)
        if todo:
            sweep.notes.append(f"{len(todo)} unit(s) computed in this process: the worker processes "
                               "run other fa_study code (the source was edited since it was imported)")
    for text in todo:
        with one_cpu_thread():
            payload = unit_fn(sweep.spec(text), sweep.fp, callback=callback)
        sweep.keep(text, payload, "unstored", "")
    return sweep.out, sweep.stats()
