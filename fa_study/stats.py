"""Aggregation over seeds: mean with a 95 % Student-t confidence interval."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as _st


def mean_ci(values, level: float = 0.95, bounds: tuple[float, float] | None = None
            ) -> tuple[float, float, float]:
    """``(mean, low, high)`` of the finite ``values``; the interval is the Student-t interval
    of the mean (``nan`` bounds with fewer than two finite values). ``bounds=(low, high)``, the
    range the quantity can take (e.g. ``(0, 1)`` for an accuracy), clips the interval to it: with
    two values the t-factor is 12.7, and the raw interval of an accuracy reaches below 0."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (math.nan, math.nan, math.nan)
    m = float(v.mean())
    if v.size < 2:
        return (m, math.nan, math.nan)
    half = float(_st.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    lo, hi = m - half, m + half
    if bounds is not None:
        lo, hi = max(lo, float(bounds[0])), min(hi, float(bounds[1]))
    return (m, lo, hi)


def aggregate(df: pd.DataFrame, by, columns, level: float = 0.95) -> pd.DataFrame:
    """One row per group of ``by``: for each of ``columns`` its mean over the finite values, CI
    half-width (``<c>_ci``), a ``<c>_text`` column reading ``mean ± ci`` and the number of finite
    values ``<c>_n``; ``n`` is the number of finite values of the first column (the quantity a
    table leads with: a diverged run's NaN does not count), ``n_rows`` the group's rows."""
    by = [by] if isinstance(by, str) else list(by)
    columns = list(columns)
    if df.empty or any(k not in df for k in by):  # no rows (every run failed): the columns alone
        return pd.DataFrame(columns=[*by, "n", "n_rows",
                                     *[f"{c}{s}" for c in columns for s in ("", "_ci", "_text", "_n")]])
    rows = []
    for key, sub in df.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        finite = {c: int(np.isfinite(pd.to_numeric(sub[c], errors="coerce").to_numpy(dtype=float)).sum())
                  for c in columns}
        row = {**dict(zip(by, key)), "n": finite[columns[0]] if columns else int(len(sub)),
               "n_rows": int(len(sub))}
        for c in columns:
            m, lo, hi = mean_ci(sub[c].to_numpy(dtype=float), level)
            half = (hi - lo) / 2 if math.isfinite(lo) else math.nan
            row.update({c: m, f"{c}_ci": half, f"{c}_text": format_mean_ci(m, half), f"{c}_n": finite[c]})
        rows.append(row)
    return pd.DataFrame(rows)


def format_mean_ci(mean: float, half: float) -> str:
    """``'0.4123 ± 0.0100'``, or the mean alone when there is no interval."""
    if not math.isfinite(mean):
        return "n/a"
    digits = 4 if abs(mean) < 10 else 1
    if not math.isfinite(half):
        return f"{mean:.{digits}g}" if abs(mean) < 1e-3 else f"{mean:.{digits}f}"
    if abs(mean) < 1e-3:
        return f"{mean:.3g} ± {half:.2g}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"
