"""Plot helpers: each takes ``ax=None``, draws, and returns the axis.

Colours come from the Okabe-Ito palette (safe for the common colour-vision deficiencies) and
are assigned to learning rules consistently across notebooks. Values that span decades
(hidden-state and gradient norms) go on log axes. :class:`LivePlot` redraws a figure every N
steps during training and is silent in the ``quick`` profile.

Spread over seeds: with at least :data:`MIN_RUNS_FOR_BAND` runs a line is their mean with a
95 % Student-t band; with fewer (two seeds give a t-factor of 12.7) the runs themselves are
drawn, one thin line each, next to the mean. A band or error bar never leaves the range of its
quantity (:data:`BOUNDS`: accuracies in [0, 1], cosines in [-1, 1], norms above 0 on a log axis).
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Mapping, Sequence

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
from matplotlib.collections import LineCollection
import numpy as np
import pandas as pd

from .config import get_profile
from .stats import mean_ci

# Okabe & Ito (2008): distinguishable under protanopia, deuteranopia and tritanopia.
PALETTE: tuple[str, ...] = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7",
                            "#56B4E9", "#F0E442", "#000000")
# Fixed colours for the rules the notebooks compare, so BP is the same blue everywhere.
RULE_COLOURS: dict[str, str] = {
    "bp": PALETTE[0], "fa": PALETTE[1], "dfa": PALETTE[3], "frozen": "#7F7F7F", "shallow": "#BBBBBB",
    "oracle": PALETTE[2], "grape_fa": PALETTE[4], "stiefel_dfa": PALETTE[5], "ra_fa": PALETTE[1],
    "ra_rev": PALETTE[2], "ra_recon": PALETTE[4], "ra_comb": PALETTE[5], "layer_fa": PALETTE[1],
    "sign_sym": PALETTE[2], "frsf": "#117733", "brsf": "#88CCEE", "layer_grape": PALETTE[4],
    "kolen_pollack": PALETTE[6], "weight_mirror": PALETTE[7], "layer_dfa": PALETTE[3],
    "layer_dfa_block": "#AA4499", "grape": PALETTE[4], "stiefel": PALETTE[5],
}
LINESTYLES: tuple = ("-", "--", ":", "-.")

# The range of every quantity the studies plot, (low, high): confidence bands and error bars are
# clipped to it. Looked up by exact column name, then by the longest prefix (per-layer columns
# ``cos_3`` and their long form ``cos_``); a column not listed is unbounded. On a log axis a band
# whose lower edge reaches 0 (a norm's range starts there) is cut at the lowest run instead.
ACCURACY: tuple[float, float] = (0.0, 1.0)
COSINE: tuple[float, float] = (-1.0, 1.0)
NONNEGATIVE: tuple[float, float] = (0.0, math.inf)  # norms, ratios of norms, gains, losses
DEGREES: tuple[float, float] = (0.0, 180.0)  # angles between matrices or updates
BOUNDS: dict[str, tuple[float, float]] = {
    **dict.fromkeys(("test_acc", "train_acc", "frozen_acc", "acc"), ACCURACY),
    # cosines (credit vs BP gradient, update vs BP update, feedback vs its target, ρ of Stiefel)
    **dict.fromkeys(("cos_", "cos_mean", "cos_median", "cos_hidden", "cos_output", "cos_at_layer", "deep_cos",
                     "fb_align_", "deep_fb_align", "training_deep_cos", "fresh_deep_mean", "rho_",
                     "cos_update_bp"), COSINE), "deep_abs_cos": (0.0, 1.0),
    # norms and other non-negative quantities (log axes)
    **dict.fromkeys(("h_norm_", "g_norm_", "a_norm_", "h_L_norm", "g_norm_median", "a_norm_median", "h_L",
                     "g_L", "h_0", "h_L_vs_bp", "max_growth", "growth", "init_ratio", "h0_init_ratio",
                     "hL_init_ratio", "max_init_ratio", "alpha_", "align_", "ratio_", "mean_alignment",
                     "train_loss", "loss", "rev_loss", "recon_loss"), NONNEGATIVE),
    **dict.fromkeys(("angle_", "update_angle_", "mean_update_angle", "mean_angle_B_WT"), DEGREES),  # degrees
}
UNBOUNDED: tuple[float, float] = (-math.inf, math.inf)
MIN_RUNS_FOR_BAND = 3  # fewer runs at a point: draw the runs, not a t-interval


def bounds_of(column, bounds: tuple[float, float] | None = None) -> tuple[float, float]:
    """The range of ``column``: ``bounds`` when given, else :data:`BOUNDS` by exact name, else by
    the longest prefix that is a key (``"cos_3"`` -> ``"cos_"``), else unbounded."""
    if bounds is not None:
        lo, hi = bounds
        return (-math.inf if lo is None else float(lo), math.inf if hi is None else float(hi))
    if not isinstance(column, str):
        return UNBOUNDED
    if column in BOUNDS:
        return BOUNDS[column]
    return next((BOUNDS[key] for key in sorted(BOUNDS, key=len, reverse=True)
                 if key.endswith("_") and column.startswith(key)), UNBOUNDED)


def clipped_yerr(values, err, bounds: tuple[float, float]) -> np.ndarray:
    """``(2, n)`` asymmetric error-bar lengths: ``values ± err`` cut at ``bounds`` (NaN -> 0)."""
    v = np.asarray(values, dtype=float)
    e = np.nan_to_num(np.asarray(err, dtype=float), nan=0.0)
    lo, hi = np.clip(v - e, *bounds), np.clip(v + e, *bounds)
    return np.nan_to_num(np.vstack([v - lo, hi - v]), nan=0.0).clip(min=0.0)


def spread(sub: pd.DataFrame, x: str, y: str, bounds: tuple[float, float] | None = None, *,
           log: bool = False, level: float = 0.95) -> pd.DataFrame:
    """Per value of ``x`` (sorted): ``mean``, ``low``, ``high`` (the t-interval over the finite
    values of ``y``, clipped to the range of ``y``; NaN where fewer than
    :data:`MIN_RUNS_FOR_BAND` values) and ``n`` (the number of finite values). With ``log`` a
    lower edge at or below 0 is replaced by the smallest positive value at that ``x``."""
    rng = bounds_of(y, bounds)
    rows = []
    for xv, s in sub.groupby(x, sort=True):
        v = _num(s[y])
        v = v[np.isfinite(v)]
        m, lo, hi = mean_ci(v, level, bounds=rng)
        if v.size < MIN_RUNS_FOR_BAND:
            lo = hi = math.nan
        elif log and not lo > 0:
            positive = v[v > 0]
            lo = float(positive.min()) if positive.size else math.nan
        rows.append({x: xv, "mean": m, "low": lo, "high": hi, "n": int(v.size)})
    return pd.DataFrame(rows, columns=[x, "mean", "low", "high", "n"]).set_index(x)


def draw_spread(ax, sub: pd.DataFrame, x: str, y: str, *, color, ls="-", label=None, ci: bool = True,
                units: str | None = "seed", bounds: tuple[float, float] | None = None, log: bool = False,
                lw: float = 1.5, band_alpha: float = 0.18):
    """One line: the mean of ``y`` over the rows of ``sub`` at each ``x``. With ``ci``: where at
    least :data:`MIN_RUNS_FOR_BAND` values meet at an ``x``, their 95 % t-band (clipped to the
    range of ``y``, :func:`bounds_of`); where fewer but more than one, the runs themselves -- one
    thin unlabelled line per value of ``units`` (e.g. the seed; a ``LineCollection`` in
    ``ax.collections``, so ``ax.lines`` holds the means only), or the values as dots when ``sub``
    has no such column. Returns the :func:`spread` table."""
    st = spread(sub, x, y, bounds, log=log)
    xs = st.index.to_numpy()
    ax.plot(xs, st["mean"].to_numpy(dtype=float), color=color, ls=ls, lw=lw,
            marker="o" if len(xs) < 12 else None, ms=3, label=label)
    if not ci or st.empty:
        return st
    few = (st["n"] > 1) & (st["n"] < MIN_RUNS_FOR_BAND)
    if few.any():  # the runs themselves: a LineCollection (or dots), unlabelled, not in ax.lines
        if units is not None and units in sub:
            segments = []
            for _, one in sub.groupby(units, sort=False):
                one = one.sort_values(x)
                xy = np.column_stack([_num(one[x]), _num(one[y])])
                segments.append(xy[np.isfinite(xy).all(axis=1)])
            ax.add_collection(LineCollection(segments, colors=color, linestyles=ls, linewidths=0.7,
                                             alpha=0.5, label="_runs"), autolim=True)
            ax.autoscale_view()
        else:
            pts = sub[sub[x].isin(st.index[few])]
            ax.scatter(_num(pts[x]), _num(pts[y]), s=6, color=color, alpha=0.6, label="_runs")
    lo, hi = st["low"].to_numpy(dtype=float), st["high"].to_numpy(dtype=float)
    if np.isfinite(lo).any() and (np.nan_to_num(hi - lo) > 0).any():
        ax.fill_between(xs, lo, hi, color=color, alpha=band_alpha, lw=0)
    return st


def colour(key, index: int = 0) -> str:
    """The colour of a rule name (fixed), else the ``index``-th palette colour."""
    return RULE_COLOURS.get(key, PALETTE[index % len(PALETTE)])


def _axis(ax):
    if ax is None:
        _, ax = plt.subplots(figsize=(5.2, 3.4))
    return ax


def _label(ax, xlabel, ylabel, title, grid_axis: str = "both") -> None:
    ax.set(xlabel=xlabel, ylabel=ylabel, **({"title": title} if title else {}))
    ax.grid(alpha=0.3, axis=grid_axis)


def _num(values) -> np.ndarray:
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)


def _needs_log(values: Iterable[float]) -> bool:
    """True when positive values span more than two decades."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x) and x > 0], dtype=float)
    return v.size > 1 and v.max() / v.min() > 100.0


def plot_curves(df: pd.DataFrame, x: str, y: str, *, hue: str | None = None, ax=None,
                logy: bool | None = None, ci: bool = True, title: str | None = None,
                ylabel: str | None = None, colours: Mapping[str, str] | None = None,
                styles: Mapping[str, str] | None = None, bounds: tuple[float, float] | None = None):
    """Lines of ``y`` against ``x``, one per value of ``hue``; several seeds (rows with the same
    ``hue`` and ``x``) are drawn as their mean with a 95 % confidence band when there are at least
    :data:`MIN_RUNS_FOR_BAND` of them, else as their mean and one thin line per run (per
    ``seed``). The band is clipped to the range of ``y`` (``bounds``, default
    :func:`bounds_of` ``(y)``: accuracies in [0, 1], cosines in [-1, 1], norms above 0 on a log axis).

    ``logy=None`` chooses a log axis when the values span more than two decades. ``colours``
    (``{hue value: colour}``) fixes each line's colour and the drawing and legend order, and
    draws only those values; ``styles`` (``{hue value: line style}``) sets a line's style (default:
    solid, then dashed, ... once the palette's colours are used up).
    """
    ax = _axis(ax)
    if y not in df or x not in df or (hue is not None and hue not in df):
        df = pd.DataFrame(columns=list(dict.fromkeys([x, y] + ([hue] if hue else []))))
    log = bool(logy or (logy is None and _needs_log(df[y])))
    groups = [(None, df)] if hue is None else list(df.groupby(hue, sort=False))
    if colours is not None:
        by_key = dict(groups)
        groups = [(k, by_key[k]) for k in colours if k in by_key]
    for i, (key, sub) in enumerate(groups):
        c = colours[key] if colours is not None else colour(key, i)
        ls = (styles or {}).get(key, LINESTYLES[i // len(PALETTE) % len(LINESTYLES)])
        draw_spread(ax, sub, x, y, color=c, ls=ls, ci=ci, bounds=bounds, log=log,
                    label=f"{key}" if key is not None else y)
    if log:
        ax.set_yscale("log")
    if pd.api.types.is_integer_dtype(df[x]):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    _label(ax, x, ylabel or y, title)
    if hue is not None and groups:
        ax.legend(fontsize=8, frameon=False)
    return ax


def plot_layers(df: pd.DataFrame, prefix: str, *, hue: str | None = None, ax=None,
                logy: bool | None = None, title: str | None = None, ylabel: str | None = None):
    """Per-layer profile: columns ``<prefix>0, <prefix>1, ...`` against the layer index, one line
    per ``hue`` (mean and 95 % band over the rows of each group, e.g. seeds)."""
    if not layer_columns(df, prefix):
        raise ValueError(f"no columns named {prefix}<layer> in the frame; columns: {list(df.columns)}")
    ids = tuple(c for c in dict.fromkeys([hue, "seed"]) if c is not None)
    long = layer_long(df, prefix, ids, dropna=False)
    return plot_curves(long, "layer", prefix, hue=hue, ax=ax, logy=logy, title=title,
                       ylabel=ylabel or prefix.rstrip("_"))


def layer_columns(df: pd.DataFrame, prefix: str) -> list[tuple[str, int]]:
    """``[(column, layer index)]`` for columns named ``<prefix><int>``, sorted by layer."""
    n = len(prefix)
    cols = [c for c in df.columns if isinstance(c, str) and c.startswith(prefix) and c[n:].isdigit()]
    return sorted(((c, int(c[n:])) for c in cols), key=lambda t: t[1])


def layer_long(frame: pd.DataFrame, prefix: str, id_vars: tuple[str, ...] = ("arm", "seed"), *,
               dropna: bool = True) -> pd.DataFrame:
    """Columns ``<prefix>0..<prefix>L`` as rows: ``id_vars`` (those present), ``layer`` (int),
    ``<prefix>``; rows without a value dropped unless ``dropna`` is False."""
    cols = layer_columns(frame, prefix)
    ids = [c for c in id_vars if c in frame]
    long = frame.melt(id_vars=ids, value_vars=[c for c, _ in cols], var_name="_col", value_name=prefix)
    long["layer"] = long.pop("_col").map(dict(cols))
    return long.dropna(subset=[prefix]) if dropna else long


def plot_bars(table: pd.DataFrame, value: str, *, group: str, ax=None, err: str | None = None,
              reference: float | None = None, reference_label: str = "reference",
              ylabel: str | None = None, title: str | None = None, n: str | None = None,
              points: pd.DataFrame | None = None, bounds: tuple[float, float] | None = None):
    """Bars of ``value`` per ``group`` with optional error half-widths ``err`` and a dashed
    horizontal ``reference`` line (e.g. the frozen-blocks baseline).

    The error bars are cut at the range of ``value`` (``bounds``, default :func:`bounds_of`),
    and drawn only for bars over at least :data:`MIN_RUNS_FOR_BAND` runs when the table says how
    many (column ``n``, default ``<value>_n`` when present). ``points`` (one row per run, with
    the columns ``group`` and ``value``) draws every run as a dot on its bar: the runs
    themselves where there are too few for an interval."""
    ax = _axis(ax)
    keys = list(table[group])
    vals = table[value].to_numpy(dtype=float)
    ax.bar(range(len(keys)), np.nan_to_num(vals, nan=0.0), color=[colour(k, i) for i, k in enumerate(keys)],
           alpha=0.9)
    if err:
        half = table[err].to_numpy(dtype=float)
        count = n if n is not None else (f"{value}_n" if f"{value}_n" in table else None)
        if count is not None:
            half = np.where(np.nan_to_num(_num(table[count])) >= MIN_RUNS_FOR_BAND, half, np.nan)
        show = np.isfinite(half) & np.isfinite(vals)
        if show.any():
            ax.errorbar(np.arange(len(keys))[show], vals[show], fmt="none", ecolor="k", capsize=3, lw=1,
                        yerr=clipped_yerr(vals[show], half[show], bounds_of(value, bounds)))
    if points is not None and len(points):
        for i, k in enumerate(keys):
            v = _num(points.loc[points[group] == k, value])
            if (v := v[~np.isnan(v)]).size:
                ax.plot(i + np.linspace(-0.15, 0.15, v.size) if v.size > 1 else [i], v, ls="none",
                        marker="o", ms=3.5, mfc="white", mec="k", mew=0.8, zorder=3)
    ax.set_xticks(range(len(keys)), [str(k) for k in keys], rotation=0)
    if reference is not None and math.isfinite(reference):
        ax.axhline(reference, color="k", ls="--", lw=1, label=reference_label)
        ax.legend(fontsize=8, frameon=False)
    _label(ax, None, ylabel or value, title, "y")
    return ax


def plot_grouped_bars(frame: pd.DataFrame, x: str, y: str, *, hue: str, ax=None, logy: bool = False,
                      reference: float | None = None, reference_label: str = "reference",
                      reference_style: str = "--", xlabel: str | None = None,
                      ylabel: str | None = None, title: str | None = None, tick_format: str = "{}"):
    """Bars of ``y`` for each value of ``x`` (e.g. a layer), one bar per ``hue`` value side by
    side (rule colours as everywhere), with an optional horizontal ``reference`` line (e.g. a
    threshold; line style ``reference_style``). One row per (``x``, ``hue``): aggregate seeds
    before. ``tick_format`` writes each ``x`` tick (``"h_{}"``). Rows with a missing ``y`` leave
    their slot empty."""
    ax = _axis(ax)
    xs = sorted(frame[x].dropna().unique())
    keys = list(dict.fromkeys(frame[hue]))
    width = 0.8 / max(len(keys), 1)
    for i, key in enumerate(keys):
        sub = frame[frame[hue] == key].set_index(x)[y]
        vals = np.array([float(sub.get(v, np.nan)) for v in xs])
        pos = np.arange(len(xs)) + (i - (len(keys) - 1) / 2) * width
        ax.bar(pos, vals, width=width, color=colour(key, i), label=str(key), alpha=0.9)
    ax.set_xticks(range(len(xs)), [tick_format.format(v) for v in xs])
    if logy:
        ax.set_yscale("log")
    if reference is not None and math.isfinite(reference):
        ax.axhline(reference, color="k", ls=reference_style, lw=1, label=reference_label)
    _label(ax, xlabel or x, ylabel or y, title, "y")
    ax.legend(fontsize=8, frameon=False)
    return ax


def annotate_source(fig_or_ax, source: str | Sequence[str]) -> None:
    """Write the data source under a figure, loudly when it is a stand-in."""
    fig = fig_or_ax.figure if hasattr(fig_or_ax, "figure") and not isinstance(fig_or_ax, plt.Figure) \
        else fig_or_ax
    sources = sorted({source} if isinstance(source, str) else set(source))
    sources = [s for s in sources if isinstance(s, str) and s]  # a failed run has no data source
    if not sources:
        return
    standin = [s for s in sources if s != "torchvision"]
    text = "data: " + ", ".join(sources) + ("  (stand-in data: not a result about the real dataset)"
                                            if standin else "")
    fig.text(0.01, 0.005, text, fontsize=7, color="#D55E00" if standin else "#555555",
             ha="left", va="bottom")


def failed_runs(runs: pd.DataFrame | None) -> list[tuple[str, str]]:
    """``[(run, error)]`` for the runs of ``runs`` (a ``Results.runs`` frame) that raised
    (``status == "error"``): ``("fa (seed 3)", "RuntimeError: ...")``, the model first when the
    runs hold several."""
    if runs is None or not len(runs) or "status" not in runs:
        return []
    several_models = "model" in runs and runs["model"].nunique() > 1
    return [((f"{r.get('model')} " if several_models else "") + f"{r.get('arm', r.get('rule', '?'))} (seed "
             f"{r.get('seed', '?')})", (str(r.get("error", "") or "error").splitlines() or ["error"])[0])
            for r in runs[runs["status"] == "error"].to_dict("records")]


def failed_runs_text(runs: pd.DataFrame | None, limit: int = 150) -> str:
    """One line naming the runs of ``runs`` (a ``Results.runs`` frame) that raised
    (``status == "error"``) with their errors, in at most ``limit`` characters: the runs with
    their errors when that fits, else the runs alone, else how many failed; ``""`` when none did."""
    failed = failed_runs(runs)
    if not failed:
        return ""
    names, errors = zip(*failed)
    k = len(names)
    candidates = ["failed, not drawn: " + "; ".join(f"{n}: {e}" for n, e in zip(names, errors)),
                  "failed, not drawn: " + ", ".join(names) + " (errors in the notes and the table)",
                  "failed, not drawn: " + ", ".join(names),
                  f"{k} run{'' if k == 1 else 's'} failed (see the notes)"]
    return next((text for text in candidates if len(text) <= limit), candidates[-1])


def annotate_failures(fig_or_ax, runs: pd.DataFrame | None) -> str:
    """Write under a figure, on the right, which runs failed (raised) and why, as much as fits
    next to the data-source line (:func:`annotate_source`; the notes and the table give every
    message in full). Returns the text written."""
    fig = fig_or_ax if isinstance(fig_or_ax, plt.Figure) else fig_or_ax.figure
    taken = max((len(t.get_text()) for t in fig.texts if t.get_position()[1] < 0.02), default=0)
    room = int(fig.get_figwidth() * 17) - taken - 6  # about 17 characters an inch at 7 points
    text = failed_runs_text(runs, limit=max(room, 0))
    if text:
        fig.text(0.99, 0.005, text, fontsize=7, color="#D55E00", ha="right", va="bottom")
    return text


def no_data(ax, text: str = "no run finished: nothing to draw") -> None:
    """An empty panel that says why it is empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9)
    ax.set_axis_off()


def finish(fig, runs: pd.DataFrame | None = None, sources=None, bottom: float = 0.04):
    """Close a study's figure: the data source (``sources``, default the ``data_source`` of
    ``runs``) and the runs that failed written under it, the layout tightened above them."""
    if sources is None and runs is not None and "data_source" in runs:
        sources = runs["data_source"].dropna().unique().tolist()
    annotate_source(fig, sources or [])
    annotate_failures(fig, runs)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    plt.close(fig)
    return fig


class LivePlot:
    """Redraw a small figure every ``every`` steps while a run trains.

    ``update(record)`` takes a dict with ``step`` and any numeric keys (scalars or lists, a
    list giving one line per entry, e.g. per-layer alignment). Every ``every`` calls the
    figure is redrawn and handed to ``sink`` (default: an updating IPython display), unless
    the last redraw is less than ``min_seconds`` old (by ``clock``; a group's last state is
    always drawn when the next group starts): a redraw costs about 0.1 s,
    and a unit computed by a worker is replayed here in one burst of records, so without the
    limit the live plot took 13 s of notebook 00's 72 s panel run. In the ``quick`` profile the
    helper does nothing, so CI and headless runs stay fast.
    """

    def __init__(self, keys: Sequence[str], *, every: int = 20, title: str = "",
                 sink: Callable | None = None, profile: str | None = None,
                 logy: Sequence[str] = (), group: str | None = None, min_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.keys, self.every, self.title, self.logy = list(keys), max(1, int(every)), title, set(logy)
        self.min_seconds, self._clock, self._last_draw = float(min_seconds), clock, -math.inf
        self.group = group  # a record key (e.g. "arm"): a new value starts a fresh history
        self.enabled = get_profile(profile) != "quick"
        self.history: list[dict] = []
        self._group_value, self._calls, self._sink, self._handle, self.redraws = None, 0, sink, None, 0

    def __call__(self, record: dict) -> None:
        self.update(record)

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.group is not None and record.get(self.group) != self._group_value:
            if self.history:  # not limited: the finished group's last state stays visible until replaced
                self.draw()
            self._group_value = record.get(self.group)
            self.history, self._calls = [], 0
        self.history.append({k: record.get(k) for k in ["step", *self.keys]})
        self._calls += 1
        if self._calls % self.every == 0 and self._due():
            self.draw()

    def _due(self) -> bool:
        return self._clock() - self._last_draw >= self.min_seconds

    def figure(self) -> plt.Figure:
        fig, axes = plt.subplots(1, len(self.keys), figsize=(3.6 * len(self.keys), 2.6), squeeze=False)
        steps = [h["step"] for h in self.history]
        for ax, key in zip(axes[0], self.keys):
            vals = [h[key] for h in self.history]
            if vals and isinstance(vals[-1], (list, tuple)):
                for j in range(len(vals[-1])):
                    ax.plot(steps, [v[j] if v is not None else np.nan for v in vals],
                            color=PALETTE[j % len(PALETTE)], label=f"layer {j}", lw=1.2)
                ax.legend(fontsize=6, frameon=False)
            else:
                ax.plot(steps, vals, color=PALETTE[0], lw=1.2)
            ax.set_yscale("log" if key in self.logy else "linear")  # a fresh axis: linear unless asked
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
        title = self.title if self.group is None else f"{self.title} {self.group}={self._group_value}".strip()
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        plt.close(fig)  # shown through the sink only, never twice by the inline backend
        return fig

    def draw(self) -> None:
        if not self.enabled or not self.history:
            return
        fig = self.figure()
        self.redraws += 1
        self._last_draw = self._clock()
        if self._sink is not None:
            return self._sink(fig)
        from IPython.display import display

        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)


def figure_png(fig, dpi: int = 90):
    """An ``IPython.display.Image`` (PNG) of ``fig``: displays the same under any matplotlib
    backend, in a notebook, an Output widget or an nbconvert HTML export."""
    import io

    from IPython.display import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return Image(data=buf.getvalue(), format="png")


def use_inline_friendly_defaults() -> None:
    """Matplotlib settings the notebooks share: readable small figures, no clipping."""
    matplotlib.rcParams.update({"figure.dpi": 100, "axes.spines.top": False,
                                "axes.spines.right": False, "axes.titlesize": 10,
                                "axes.labelsize": 9, "legend.fontsize": 8,
                                "axes.prop_cycle": matplotlib.cycler(color=PALETTE)})
