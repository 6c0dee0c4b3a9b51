"""Shared machinery of the studies: caching, dispatch, profile configs, results.

Each study has a frozen dataclass config whose defaults carry a comment each, profile-dependent
defaults (:meth:`for_profile`), a ``run_*`` function returning a tidy DataFrame (one row per
arm, seed and epoch; every config field and the ``data_source`` as columns), and a ``*_view``
function that runs it and draws the study's figures and results table. The view is what a
notebook cell and a widget panel both call (the panel's Run button is a thin wrapper).

Every (arm, seed) unit of work is cached on disk with ``joblib.Memory`` (under
``$FA_STUDY_CACHE``), keyed by its config and a fingerprint of the package's code, so a rerun
with the same settings is instant, a slider moved back costs nothing, and an interrupted sweep
recomputes only the units that had not finished. Units are dispatched through
``joblib.Parallel`` (``n_jobs``), so a dask or ray joblib backend runs them on a cluster
unchanged::

    from joblib import parallel_backend
    with parallel_backend("dask"):
        run_ra(RAStudy(seeds=(1, 2, 3)), n_jobs=-1)
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib.pyplot as plt
import pandas as pd

from .. import __version__
from ..config import cache_dir, check_choice, get_device, get_profile

# --------------------------------------------------------------------------------------------
# Caching and dispatch shared by every study
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Package version plus a hash of the package's source, so results computed by other code
    are never served from the cache."""
    h = hashlib.sha1(__version__.encode())
    for path in sorted(Path(__file__).parents[1].rglob("*.py")):
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


_MEMORIES: dict[str, Any] = {}


def memory():
    """The on-disk ``joblib.Memory`` at ``$FA_STUDY_CACHE/joblib`` (re-read on every call, so
    tests and notebooks may point it elsewhere)."""
    from joblib import Memory

    location = str(cache_dir() / "joblib")
    if location not in _MEMORIES:
        _MEMORIES[location] = Memory(location, verbose=0)
    return _MEMORIES[location]


def cached(fn: Callable) -> Callable:
    """``fn(config, fingerprint, callback=None)`` cached on disk, ignoring the callback."""
    return memory().cache(fn, ignore=["callback"])


def run_units(unit_fn: Callable, configs: Sequence, *, callback: Callable | None = None,
              n_jobs: int = 1, progress: Callable[[int, int, bool], None] | None = None
              ) -> tuple[list[pd.DataFrame], int]:
    """Run ``unit_fn(config, fingerprint, callback=...)`` for every config, each result cached.

    Returns the list of result frames (in the order of ``configs``) and how many came from the
    cache. With ``n_jobs != 1`` the uncached units run through ``joblib.Parallel`` (the live
    ``callback`` is then not called: the workers are other processes). Each unit is written
    to the cache as soon as it finishes, so an interrupted call loses only the units in flight.
    ``progress(done, total, from_cache)`` is called after each unit.
    """
    fp = code_fingerprint()
    fn = cached(unit_fn)
    hits = [fn.check_call_in_cache(c, fp) for c in configs]
    out: list[pd.DataFrame | None] = [None] * len(configs)
    todo = [i for i, h in enumerate(hits) if not h]
    done = 0
    for i, h in enumerate(hits):
        if h:
            out[i] = fn(configs[i], fp)
            done += 1
            if progress:
                progress(done, len(configs), True)
    if n_jobs == 1 or len(todo) <= 1:
        for i in todo:
            with one_cpu_thread():
                out[i] = fn(configs[i], fp, callback=callback)
            done += 1
            if progress:
                progress(done, len(configs), False)
    else:
        from joblib import Parallel, delayed

        results = Parallel(n_jobs=n_jobs)(delayed(fn)(configs[i], fp) for i in todo)
        for i, r in zip(todo, results):
            out[i] = r
        if progress:
            progress(len(configs), len(configs), False)
    return [o for o in out if o is not None], sum(hits)


def clear_cache() -> None:
    """Forget every cached result (under the current ``$FA_STUDY_CACHE``)."""
    memory().clear(warn=False)


def config_columns(cfg) -> dict:
    """The config's fields as flat column values (tuples joined to strings)."""
    cols = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        cols[f.name] = ",".join(map(str, v)) if isinstance(v, tuple) else v
    return cols


def profile_config(cls, profile: str | None, overrides: dict):
    """``cls`` with the profile's defaults, then ``overrides``; unknown names are rejected."""
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ValueError(f"unknown setting(s) {bad} for {cls.__name__}; allowed: {sorted(names)}")
    base = dict(cls.PROFILES[get_profile(profile)])
    base.update(overrides)
    return cls(**base)


@dataclass
class StudyResult:
    """What a ``*_view`` returns: the tidy results, a summary table and the figure(s)."""

    config: Any
    results: pd.DataFrame  # tidy: one row per arm, seed and epoch
    table: pd.DataFrame  # one row per arm: the numbers a reader compares
    figures: list = field(default_factory=list)  # matplotlib Figures, drawn and closed
    from_cache: int = 0  # how many (arm, seed) units were served from the cache
    units: int = 0  # how many (arm, seed) units the call needed
    notes: list = field(default_factory=list)  # plain-language remarks (stand-in data, divergence)
    extra: Any = None  # the study's own richer results object, if any (e.g. AuditResults)

    def show(self) -> None:
        """Display figures, notes and table (in a notebook)."""
        from IPython.display import display

        from ..plots import figure_png

        for fig in self.figures:
            display(figure_png(fig))
        for note in self.notes:
            print(note)
        display(self.table)


def sources_note(results: pd.DataFrame) -> list[str]:
    notes = []
    sources = sorted(set(results.get("data_source", pd.Series(dtype=str)).dropna()))
    if any(s != "torchvision" for s in sources):
        notes.append(f"Data source: {', '.join(sources)} — a stand-in, not the real dataset; "
                     "see the notebook's prose for what it can and cannot show.")
    if "status" in results and (results["status"] == "diverged").any():
        bad = results.loc[results["status"] == "diverged", ["arm", "seed"]].drop_duplicates()
        notes.append("Diverged runs (stopped and marked; the others went on): "
                     + ", ".join(f"{a} (seed {s})" for a, s in bad.itertuples(index=False)))
    return notes


