"""Plot helpers: each takes ``ax=None``, draws, and returns the axis.

Colours come from the Okabe-Ito palette (safe for the common colour-vision deficiencies) and
are assigned to learning rules consistently across notebooks. Values that span decades
(hidden-state and gradient norms) go on log axes. :class:`LivePlot` redraws a figure every N
steps during training and is silent in the ``quick`` profile.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping, Sequence

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
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
    "oracle": PALETTE[2], "grape_fa": PALETTE[4], "stiefel_dfa": PALETTE[5],
    "ra_fa": PALETTE[1], "ra_rev": PALETTE[2], "ra_recon": PALETTE[4], "ra_comb": PALETTE[5],
    "layer_fa": PALETTE[1], "sign_sym": PALETTE[2], "frsf": "#117733", "brsf": "#88CCEE",
    "layer_grape": PALETTE[4], "kolen_pollack": PALETTE[6], "weight_mirror": PALETTE[7],
    "layer_dfa": PALETTE[3], "layer_dfa_block": "#AA4499",
    "grape": PALETTE[4], "stiefel": PALETTE[5],
}
LINESTYLES: tuple = ("-", "--", ":", "-.")


def colour(key, index: int = 0) -> str:
    """The colour of a rule name (fixed), else the ``index``-th palette colour."""
    if isinstance(key, str) and key in RULE_COLOURS:
        return RULE_COLOURS[key]
    return PALETTE[index % len(PALETTE)]


def _axis(ax):
    if ax is None:
        _, ax = plt.subplots(figsize=(5.2, 3.4))
    return ax


def _needs_log(values: Iterable[float]) -> bool:
    """True when positive values span more than two decades."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x) and x > 0], dtype=float)
    return v.size > 1 and v.max() / v.min() > 100.0


def plot_curves(df: pd.DataFrame, x: str, y: str, *, hue: str | None = None, ax=None,
                logy: bool | None = None, label_prefix: str = "", ci: bool = True,
                style: str | None = None, title: str | None = None, ylabel: str | None = None,
                colours: Mapping[str, str] | None = None, styles: Mapping[str, str] | None = None):
    """Lines of ``y`` against ``x``, one per value of ``hue``; several seeds (rows with the same
    ``hue`` and ``x``) are drawn as their mean with a 95 % confidence band.

    ``logy=None`` chooses a log axis when the values span more than two decades. ``colours``
    (``{hue value: colour}``) fixes each line's colour and the drawing and legend order, and
    draws only those values; ``styles`` (``{hue value: line style}``) overrides ``style`` per line.
    """
    ax = _axis(ax)
    groups = [(None, df)] if hue is None else list(df.groupby(hue, sort=False))
    if colours is not None:
        by_key = dict(groups)
        groups = [(k, by_key[k]) for k in colours if k in by_key]
    for i, (key, sub) in enumerate(groups):
        stats = sub.groupby(x)[y].apply(lambda s: mean_ci(s.to_numpy(dtype=float)))
        xs = stats.index.to_numpy()
        mean = np.array([m for m, _, _ in stats])
        lo = np.array([a for _, a, _ in stats])
        hi = np.array([b for _, _, b in stats])
        c = colours[key] if colours is not None else colour(key, i)
        ls = LINESTYLES[i // len(PALETTE) % len(LINESTYLES)] if style is None else style
        ls = (styles or {}).get(key, ls)
        ax.plot(xs, mean, color=c, ls=ls, marker="o" if len(xs) < 12 else None, ms=3,
                label=f"{label_prefix}{key}" if key is not None else (label_prefix or y))
        if ci and np.isfinite(lo).any() and (hi > lo).any():
            ax.fill_between(xs, lo, hi, color=c, alpha=0.18, lw=0)
    if logy or (logy is None and _needs_log(df[y])):
        ax.set_yscale("log")
    if pd.api.types.is_integer_dtype(df[x]):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    if hue is not None:
        ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return ax


def plot_layers(df: pd.DataFrame, prefix: str, *, hue: str | None = None, ax=None,
                logy: bool | None = None, title: str | None = None, ylabel: str | None = None):
    """Per-layer profile: columns ``<prefix>0, <prefix>1, ...`` against the layer index, one line
    per ``hue`` (mean and 95 % band over the rows of each group, e.g. seeds)."""
    cols = layer_columns(df, prefix)
    if not cols:
        raise ValueError(f"no columns named {prefix}<layer> in the frame; columns: {list(df.columns)}")
    long = df.melt(id_vars=[hue] if hue else [], value_vars=[c for c, _ in cols],
                   var_name="_col", value_name=prefix)
    long["layer"] = long["_col"].map(dict(cols))
    return plot_curves(long, "layer", prefix, hue=hue, ax=ax, logy=logy, title=title,
                       ylabel=ylabel or prefix.rstrip("_"))


def layer_columns(df: pd.DataFrame, prefix: str) -> list[tuple[str, int]]:
    """``[(column, layer index)]`` for columns named ``<prefix><int>``, sorted by layer."""
    out = []
    for c in df.columns:
        if isinstance(c, str) and c.startswith(prefix) and c[len(prefix):].isdigit():
            out.append((c, int(c[len(prefix):])))
    return sorted(out, key=lambda t: t[1])


def plot_bars(table: pd.DataFrame, value: str, *, group: str, ax=None, err: str | None = None,
              reference: float | None = None, reference_label: str = "reference",
              ylabel: str | None = None, title: str | None = None):
    """Bars of ``value`` per ``group`` with optional error half-widths ``err`` and a dashed
    horizontal ``reference`` line (e.g. the frozen-blocks baseline)."""
    ax = _axis(ax)
    keys = list(table[group])
    vals = table[value].to_numpy(dtype=float)
    yerr = table[err].to_numpy(dtype=float) if err else None
    ax.bar(range(len(keys)), vals, yerr=yerr, color=[colour(k, i) for i, k in enumerate(keys)],
           capsize=3, alpha=0.9)
    ax.set_xticks(range(len(keys)), [str(k) for k in keys], rotation=0)
    if reference is not None and math.isfinite(reference):
        ax.axhline(reference, color="k", ls="--", lw=1, label=reference_label)
        ax.legend(fontsize=8, frameon=False)
    ax.set_ylabel(ylabel or value)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
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
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3, axis="y")
    return ax


def annotate_source(fig_or_ax, source: str | Sequence[str]) -> None:
    """Write the data source under a figure, loudly when it is a stand-in."""
    fig = fig_or_ax.figure if hasattr(fig_or_ax, "figure") and not isinstance(fig_or_ax, plt.Figure) else fig_or_ax
    sources = sorted({source} if isinstance(source, str) else set(source))
    standin = [s for s in sources if s != "torchvision"]
    text = "data: " + ", ".join(sources)
    if standin:
        text += "  (stand-in data: not a result about the real dataset)"
    fig.text(0.01, 0.005, text, fontsize=7, color="#D55E00" if standin else "#555555",
             ha="left", va="bottom")


class LivePlot:
    """Redraw a small figure every ``every`` steps while a run trains.

    ``update(record)`` takes a dict with ``step`` and any numeric keys (scalars or lists, a
    list giving one line per entry, e.g. per-layer alignment). Every ``every`` calls the
    figure is redrawn and handed to ``sink`` (default: an updating IPython display). In the
    ``quick`` profile the helper does nothing, so CI and headless runs stay fast.
    """

    def __init__(self, keys: Sequence[str], *, every: int = 20, title: str = "",
                 sink: Callable | None = None, profile: str | None = None,
                 logy: Sequence[str] = (), group: str | None = None):
        self.keys = list(keys)
        self.group = group  # a record key (e.g. "arm"): a new value starts a fresh history
        self._group_value = None
        self.every = max(1, int(every))
        self.enabled = get_profile(profile) != "quick"
        self.title = title
        self.logy = set(logy)
        self.history: list[dict] = []
        self._calls = 0
        self._sink = sink
        self._handle = None
        self.redraws = 0

    def __call__(self, record: dict) -> None:
        self.update(record)

    def update(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.group is not None and record.get(self.group) != self._group_value:
            if self.history:
                self.draw()  # the finished group's last state stays visible until replaced
            self._group_value = record.get(self.group)
            self.history, self._calls = [], 0
        self.history.append({k: record.get(k) for k in ["step", *self.keys]})
        self._calls += 1
        if self._calls % self.every == 0:
            self.draw()

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
            if key in self.logy:
                ax.set_yscale("log")
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.grid(alpha=0.3)
        title = self.title
        if self.group is not None:
            title = f"{title} {self.group}={self._group_value}".strip()
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
        if self._sink is not None:
            self._sink(fig)
            return
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
