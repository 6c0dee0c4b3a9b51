"""What every study shares: the profile switch, the study base, the view's result, tidy helpers.

A study is a frozen dataclass whose defaults carry a comment each, whose ``PROFILES`` give the
``quick`` / ``default`` / ``paper`` settings (:meth:`Study.for_profile`) and whose ``CONTROLS``
give the control panel's ranges. :meth:`Study.specs` lists its runs as
:class:`fa_study.runs.RunSpec` s; :meth:`Study.run` runs them through the results cache
(:func:`fa_study.runs.run_specs`) and returns :class:`fa_study.runs.Results`. Each study module
adds a summary table, its figures and a ``*_view`` function that runs and draws -- what a
notebook cell and a control panel both call.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

from ..cache import clear_cache, code_fingerprint, one_cpu_thread  # noqa: F401
from ..units import run_units  # noqa: F401
from ..config import MAX_BLOCKS, MAX_WIDTH, check_choice, check_int, get_profile
from ..fields import Checked, int_range
from ..models import model_names  # noqa: F401  (the studies' check of a model name)
from ..plots import layer_long  # noqa: F401  (the studies' long form of per-layer columns)
from ..runs import Results, run_notes, run_specs

# --------------------------------------------------------------------------------------------
# Checks the studies declare their fields with (fa_study.fields.option)
# --------------------------------------------------------------------------------------------


def _allowed(allowed) -> tuple:
    return tuple(allowed() if callable(allowed) else allowed)


def one_of(allowed, what: str | None = None):
    """A check accepting one of ``allowed`` (a tuple, or a function giving one when checked, so
    a rule or model registered later counts); the message names ``what`` (default: the field)."""
    def check(name, value):
        check_choice(what or name, value, _allowed(allowed))
        return value
    return check


def names(allowed):
    """A check accepting a non-empty tuple of distinct names of ``allowed`` (as :func:`one_of`);
    a bad name is reported under the singular (``rules`` -> ``unknown rule 'x'``)."""
    def check(name, value):
        options = _allowed(allowed)
        if not isinstance(value, tuple) or not value:
            raise ValueError(f"{name} must be a non-empty tuple of {', '.join(map(repr, options))}, "
                             f"got {value!r}")
        for v in value:
            check_choice(name[:-1], v, options)
        if len(set(value)) != len(value):
            raise ValueError(f"{name} must not repeat a name, got {value!r}")
        return value
    return check


def unchecked(name, value):
    """No check here: the value is checked elsewhere (by the rule that takes it, when it runs)."""
    return value


def labelled(label: str, check):
    """``check`` with its message naming ``label`` instead of the field."""
    return lambda name, value: check(label, value)


def null_count(name, value) -> int:
    """0 (no null) or at least 2 fresh feedback draws (the null reports a standard deviation)."""
    check_int(name, value, 0)
    if value == 1:
        raise ValueError(f"{name} must be 0 (no null) or >= 2 (the null reports a standard deviation), got 1")
    return value


SUBSET = int_range(1, none_ok=True, none_means="the whole split")
WIDTH = int_range(1, MAX_WIDTH, none_ok=True, none_means="the reference's width",
                  bound="fa_study.config.MAX_WIDTH")


def depth(low: int = 1):
    """A check of a depth ``num_blocks`` in ``[low, MAX_BLOCKS]`` or None (the reference's)."""
    return int_range(low, MAX_BLOCKS, none_ok=True, none_means="the reference's depth",
                     bound="fa_study.config.MAX_BLOCKS")


def rule_names() -> tuple[str, ...]:
    from ..rules import RULES

    return tuple(RULES)


def profile_config(cls, profile: str | None, overrides: dict):
    """``cls`` with the profile's defaults, then ``overrides``; unknown names are rejected."""
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ValueError(f"unknown setting(s) {bad} for {cls.__name__}; allowed: {sorted(names)}")
    base = dict(cls.PROFILES[get_profile(profile)])
    base.update(overrides)
    return cls(**base)


class Study(Checked):
    """Base of the study configs (declared fields, :class:`fa_study.fields.Checked`):
    ``for_profile``, ``specs`` (abstract), ``run``; :meth:`check` builds every spec, so a bad
    setting is refused before any training."""

    PROFILES: dict = {}
    CONTROLS: dict = {}
    # profile -> settings of the real-data cross-check (the same study on real Fashion-MNIST,
    # where CIFAR is only the synthetic stand-in); see cross_check()
    CROSS_CHECK: dict = {}

    @classmethod
    def rule_choices(cls) -> tuple[str, ...]:
        """The registered rules the study's ``rules`` field may hold (the panel's choices)."""
        return rule_names()

    @classmethod
    def for_profile(cls, profile: str | None = None, **overrides):
        """The profile's defaults (``$FA_STUDY_PROFILE`` when ``profile`` is None), then overrides."""
        return profile_config(cls, profile, overrides)

    def specs(self) -> list:
        """Every run of the study, as :class:`fa_study.runs.RunSpec` s."""
        raise NotImplementedError

    def check(self) -> None:
        self.specs()  # every run validated now (rule x architecture, options), before any training

    def cross_check(self, profile: str | None = None):
        """The same study on real Fashion-MNIST (1x28x28, 10 classes) with the profile's
        cross-check settings (:attr:`CROSS_CHECK`): the real-data check of notebooks 02-05, whose
        CIFAR is only a synthetic stand-in offline. Offline without Fashion-MNIST it runs on that
        dataset's stand-in, and its results say so (``data_source``)."""
        overrides = dict(self.CROSS_CHECK.get(get_profile(profile), {}))
        return dataclasses.replace(self, dataset="fashion_mnist", **overrides)

    def run(self, *, callback: Callable | None = None, n_jobs: int | None = None,
            progress: Callable | None = None) -> Results:
        """Run (or serve from the cache) every spec; see :class:`fa_study.runs.Results`."""
        res = run_specs(self.specs(), callback=callback, n_jobs=n_jobs, progress=progress)
        res.attrs["study"] = self
        return res


def resolve_study(cls, study, profile: str | None, overrides: dict):
    """The study a ``run_*`` / ``*_view`` function works on: ``study`` with ``overrides``, or the
    profile's defaults with them."""
    if study is None:
        return cls.for_profile(profile, **overrides)
    if not isinstance(study, cls):
        raise ValueError(f"study must be a {cls.__name__}, got {type(study).__name__}")
    return dataclasses.replace(study, **overrides) if overrides else study


@dataclass
class StudyResult:
    """What a ``*_view`` returns: the tidy results, a summary table and the figure(s)."""

    config: Any
    results: pd.DataFrame  # tidy: one row per run and epoch (or record)
    table: pd.DataFrame  # one row per arm: the numbers a reader compares
    figures: list = field(default_factory=list)  # matplotlib Figures, drawn and closed
    from_cache: int = 0  # how many runs were served from the cache
    units: int = 0  # how many runs the call needed
    notes: list = field(default_factory=list)  # plain-language remarks (stand-in data, divergence)
    extra: Any = None  # the study's Results (history, runs, layers, null, probes, reports)
    cache_notes: list = field(default_factory=list)  # cache entries that were bad and recomputed
    readings: Any = None  # a study's further table (notebook 04: direction_readings, per arm and layer)

    @property
    def audit(self) -> Any:
        """The study's :class:`fa_study.runs.Results` (``extra``): runs, history, layers, null."""
        return self.extra

    @classmethod
    def of(cls, config, res: Results, results: pd.DataFrame, table: pd.DataFrame, figures: list,
           notes: list | None = None) -> "StudyResult":
        cache_notes = list(getattr(res.cache, "notes", []) or [])
        return cls(config, results, table, figures, res.from_cache, res.units,
                   run_notes(res.runs) + list(notes or []), res, cache_notes)

    def show(self) -> None:
        """Display figures, notes and table (in a notebook)."""
        from IPython.display import display

        from ..plots import figure_png

        for fig in self.figures:
            display(figure_png(fig))
        for note in self.notes:
            print(note)
        display(self.table)


# --------------------------------------------------------------------------------------------
# Tidy helpers shared by the studies
# --------------------------------------------------------------------------------------------

RUN_KEYS: tuple[str, ...] = ("model", "arm", "seed")


def last_epoch(frame: pd.DataFrame, keys: tuple[str, ...] = RUN_KEYS, by: str = "epoch") -> pd.DataFrame:
    """The last row (largest ``by``) of every run; a diverged run's last row is its NaN row."""
    keys = [k for k in keys if k in frame]
    if frame.empty:
        return frame
    last = frame.groupby(keys)[by].transform("max")
    return frame[frame[by] == last].reset_index(drop=True)


def finished(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of runs that finished (status "ok"): what plots draw (diverged runs have NaN rows
    and no legend entry)."""
    if "status" not in frame or frame.empty:
        return frame
    keys = [k for k in RUN_KEYS if k in frame]
    bad = frame.loc[frame["status"] != "ok", keys].drop_duplicates()
    if bad.empty:
        return frame
    return frame[frame.merge(bad.assign(_bad=True), on=keys, how="left")["_bad"].isna().to_numpy()]


# --------------------------------------------------------------------------------------------
# Failed runs in summaries: a unit that raised is a row of the table, never a KeyError
# --------------------------------------------------------------------------------------------

def run_status(runs: pd.DataFrame | None, by=("arm",)) -> pd.DataFrame:
    """One row per group of ``by`` in ``runs`` (a ``Results.runs`` frame; order of first
    appearance): ``status`` -- ``"ok"`` when every run finished, else the statuses met
    (``"diverged"``, ``"error"``, ``"error, ok"``) -- and ``error``, the messages of its runs that
    raised (``"seed 42: RuntimeError: ..."``, joined by ``"; "``; ``""`` when none did)."""
    by = [by] if isinstance(by, str) else list(by)
    if runs is None or not len(runs) or any(k not in runs for k in by):
        return pd.DataFrame(columns=[*by, "status", "error"])
    rows = []
    for key, sub in runs.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        status = sub["status"] if "status" in sub else pd.Series("ok", index=sub.index)
        errors = sub[status == "error"]
        text = "; ".join(f"seed {r.get('seed', '?')}: {r.get('error', '') or 'error'}"
                         for r in errors.to_dict("records"))
        rows.append({**dict(zip(by, key)),
                     "status": "ok" if (status == "ok").all() else ", ".join(sorted(set(status))),
                     "error": text})
    return pd.DataFrame(rows)


def with_run_status(table: pd.DataFrame, runs: pd.DataFrame | None, by=("arm",), *,
                    order: list | None = None) -> pd.DataFrame:
    """``table`` (one row per group of ``by``) with the ``status`` and ``error`` columns of
    :func:`run_status`, and a row for every group of ``runs`` the table lacks -- a unit whose every
    run failed has no history to summarise: its row reads ``n/a``, ``n`` 0, its status and its
    error. Rows in ``order`` (values of the first key of ``by``), else in the order of ``runs``
    (the specs'); the table's own columns stay where they were, ``status`` and ``error`` follow
    the leading keys and counts unless the table already has them."""
    by = [by] if isinstance(by, str) else list(by)
    status = run_status(runs, by)
    table = table.copy()
    have = set(map(tuple, table[by].astype(object).to_numpy().tolist())) if len(table) and \
        all(k in table for k in by) else set()
    fill = [_failed_row(table.columns, {k: r[k] for k in by}) for r in status.to_dict("records")
            if tuple(r[k] for k in by) not in have]
    if fill:
        table = pd.concat([table, pd.DataFrame(fill)], ignore_index=True) if len(table) else \
            pd.DataFrame(fill, columns=list(dict.fromkeys([*table.columns, *by])))
    if len(status):
        lookup = status.set_index(by)
        keys = pd.MultiIndex.from_frame(table[by]) if len(by) > 1 else pd.Index(table[by[0]])
        for col in ("status", "error"):
            values = lookup[col].reindex(keys).to_numpy()
            if col in table:  # the table's own reading (e.g. the tour's) where runs say nothing
                values = [v if isinstance(v, str) else old for v, old in zip(values, table[col])]
            table[col] = [v if isinstance(v, str) else ("" if col == "error" else "ok") for v in values]
    else:
        for col, default in (("status", "ok"), ("error", "")):
            if col not in table:
                table[col] = default
    rank_keys = list(order) if order is not None else list(dict.fromkeys(status[by[0]]))
    if rank_keys and len(table):
        rank = {k: i for i, k in enumerate(rank_keys)}
        table = table.sort_values(by[0], key=lambda s: s.map(rank).fillna(len(rank)), kind="stable")
    lead = [c for c in table.columns if c in by or c in ("n", "n_rows", "diverged")]
    rest = [c for c in table.columns if c not in lead and c not in ("status", "error")]
    return table[lead + ["status", "error"] + rest].reset_index(drop=True).infer_objects()


def _failed_row(columns, keys: dict) -> dict:
    """The summary row of a group whose every run failed: ``n/a`` texts, counts 0, NaN numbers."""
    row = {c: "n/a" if c.endswith("_text") else 0 if c in ("n", "n_rows") or c.endswith("_n") else math.nan
           for c in columns}
    return {**row, **keys}


def study_runner(cls, name: str, doc: str) -> Callable[..., Results]:
    """The function ``name`` (``run_*``) of ``cls``'s module, as help() and pickle find it: the
    study given (or the profile's) with ``overrides``, every spec run or served from the cache
    (:meth:`Study.run`)."""
    def run(study=None, *, profile: str | None = None, callback: Callable | None = None,
            n_jobs: int | None = None, progress: Callable | None = None, **overrides) -> Results:
        return resolve_study(cls, study, profile, overrides).run(callback=callback, n_jobs=n_jobs,
                                                                   progress=progress)
    run.__doc__, run.__name__, run.__qualname__, run.__module__ = doc, name, name, cls.__module__
    return run


def placeholder_figure(text: str = "No run finished: nothing to draw.", runs: pd.DataFrame | None = None):
    """A small closed figure saying why there is nothing to draw, and naming every run that
    failed (raised) with its error, one a line."""
    import matplotlib.pyplot as plt

    from .. import plots

    lines = [text] + [f"{name}: {error[:120]}" for name, error in plots.failed_runs(runs)]
    fig, ax = plt.subplots(figsize=(8, 0.8 + 0.25 * len(lines)))
    plots.no_data(ax, "\n".join(lines))
    plt.close(fig)
    return fig
