"""Shared machinery of the studies: caching, dispatch, profile configs, results.

Each study has a frozen dataclass config whose defaults carry a comment each, profile-dependent
defaults (:meth:`for_profile`), a ``run_*`` function returning a tidy DataFrame (one row per
arm, seed and epoch; every config field and the ``data_source`` as columns), and a ``*_view``
function that runs it and draws the study's figures and results table. The view is what a
notebook cell and a widget panel both call (the panel's Run button is a thin wrapper).

Every (arm, seed) unit of work is cached on disk by :mod:`fa_study.cache` (Parquet and JSON
under ``$FA_STUDY_CACHE/results``, never pickles), keyed by its config and a fingerprint of the
package's code, so a rerun with the same settings is instant, a slider moved back costs
nothing, and an interrupted sweep recomputes only the units that had not finished. Units are
dispatched through ``joblib.Parallel`` (``n_jobs``), so a dask or ray joblib backend runs them
on a cluster unchanged::

    from joblib import parallel_backend
    with parallel_backend("dask"):
        run_ra(RAStudy(seeds=(1, 2, 3)), n_jobs=-1)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

# Caching and dispatch shared by every study live in fa_study.cache (data on disk, never code).
from ..cache import (CacheStats, ResultsCache, clear_cache, code_fingerprint,  # noqa: F401
                     one_cpu_thread, run_units, spec_key)
from ..config import check_choice, get_profile


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


