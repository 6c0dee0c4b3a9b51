"""Control panels: sliders generated from a study config -> Run -> view function -> Output.

``ControlPanel(RAStudy, ra_view)`` builds one control per configurable field of the study
(ranges and choices from the study's ``CONTROLS``; every slider has
``continuous_update=False``, so nothing runs while a slider is dragged), a Run button and one
``Output`` widget. Clicking Run reads the controls into a new study config and calls the view
function — a plain, tested function of the package whose defaults are the baseline run — and
renders everything inside the Output: a progress bar, the live plot, the final figures, the
results table, and any exception with its message. Nothing goes to the log console.

The panel writes its outputs from the kernel side (``Output.outputs``), so it behaves the same
in JupyterLab, under nbval and in a plain pytest process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import traceback
from html import escape as html_escape
from typing import Callable

import ipywidgets as W
import pandas as pd
from IPython.display import HTML, display

from .config import get_profile
from .plots import LivePlot, failed_runs, figure_png as _png

LAYOUT = W.Layout(width="330px")
STYLE = {"description_width": "95px"}


def build_control(name: str, default, spec, study_cls=None) -> W.Widget | None:
    """One widget for config field ``name`` with value ``default`` and ``spec`` from CONTROLS:
    a tuple of choices (or a function returning them, asked when the panel is built, so a model
    registered in the notebook is offered too), ``(min, max, step)``, ``("log", min, max)``,
    ``"seeds"``, or ``"rules"`` (the registered rules the study can run, asked of
    ``study_cls.rule_choices()`` when the panel is built)."""
    common = dict(description=name.replace("_", " "), style=STYLE, layout=LAYOUT)
    spec = tuple(spec()) if callable(spec) else spec
    if spec == "rules":
        choices = list(study_cls.rule_choices()) if study_cls is not None else []
        choices += [r for r in default if r not in choices]
        return W.SelectMultiple(options=choices, value=tuple(default), rows=min(8, len(choices)), **common)
    if spec == "seeds":
        return W.Text(value=", ".join(map(str, default)), continuous_update=False,
                      placeholder="comma-separated integers", **common)
    if isinstance(default, bool):
        return W.Checkbox(value=default, indent=False, description=common["description"])
    if isinstance(spec, tuple) and spec and spec[0] == "log":
        lo, hi = math.log10(spec[1]), math.log10(spec[2])
        val = min(max(float(default), spec[1]), spec[2])
        return W.FloatLogSlider(value=val, base=10, min=lo, max=hi, step=0.1,
                                continuous_update=False, readout_format=".1e", **common)
    if isinstance(spec, tuple) and spec and all(isinstance(s, str) for s in spec):
        if isinstance(default, tuple):
            return W.SelectMultiple(options=list(spec), value=tuple(default), rows=min(6, len(spec)),
                                    **common)
        return W.Dropdown(options=list(spec), value=default, **common)
    if isinstance(spec, tuple) and len(spec) == 3:
        lo, hi, step = spec
        ints = isinstance(default, int) and all(isinstance(v, int) for v in spec)
        slider, kind = (W.IntSlider, int) if ints else (W.FloatSlider, float)
        return slider(value=min(max(kind(default), lo), hi), min=lo, max=hi, step=step,
                      continuous_update=False, **common)
    return None


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"42, 7"`` -> ``(42, 7)``; anything else is a ValueError saying what is allowed."""
    parts = [p.strip() for p in str(text).replace(";", ",").split(",") if p.strip()]
    try:
        seeds = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"seeds must be comma-separated integers (e.g. '42, 123'), got {text!r}") from None
    if not seeds:
        raise ValueError("seeds must hold at least one integer (e.g. '42')")
    return seeds


class ControlPanel:
    """Controls for every field of ``study_cls`` listed in its ``CONTROLS``, a Run button and an
    Output. ``view_fn(study, live=..., progress=...)`` must return a
    :class:`fa_study.experiments.StudyResult`.

    Attributes a test (or a curious reader) can use: ``controls`` (name -> widget),
    ``run_button``, ``output``, ``progress``, ``last_result``, ``last_error``.
    """

    def __init__(self, study_cls, view_fn: Callable, *, profile: str | None = None,
                 title: str = "", live_keys: tuple[str, ...] = ("loss",), live_every: int = 10,
                 live_logy: tuple[str, ...] = ()):
        self.study_cls = study_cls
        self.view_fn = view_fn
        self.profile = get_profile(profile)
        self.defaults = study_cls.for_profile(self.profile)
        self.live_keys, self.live_every, self.live_logy = live_keys, live_every, live_logy
        self.controls: dict[str, W.Widget] = {}
        for f in dataclasses.fields(self.defaults):
            spec = study_cls.CONTROLS.get(f.name)
            w = build_control(f.name, getattr(self.defaults, f.name), spec, study_cls)
            if w is not None:  # fields without a range (in CONTROLS, or a bool) stay at the profile's value
                self.controls[f.name] = w
        self.run_button = W.Button(description="Run", button_style="primary", icon="play",
                                   tooltip="train with these settings (cached runs return at once)")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="runs",
                                      layout=W.Layout(width="330px"), style=STYLE)
        self.status = W.HTML(value="")
        self.output = W.Output(layout=W.Layout(border="1px solid #ddd", min_height="60px"))
        self.live = W.Output()
        self.last_result = None
        self.last_error: BaseException | None = None
        self.run_button.on_click(lambda _button: self.run())
        header = W.HTML(f"<b>{title}</b> <span style='color:#777'>(profile: {self.profile})</span>")
        grid = W.GridBox(list(self.controls.values()),
                         layout=W.Layout(grid_template_columns="repeat(2, 340px)"))
        self.widget = W.VBox([header, grid, W.HBox([self.run_button, self.status]), self.output])

    # ---------------------------------------------------------------- reading the controls
    def values(self) -> dict:
        """The controls' current values, converted to the study's field types."""
        return {name: parse_seeds(w.value) if name == "seeds" else tuple(w.value) if isinstance(w.value, list)
                else w.value for name, w in self.controls.items()}

    def study(self):
        """The study config the Run button would use."""
        return dataclasses.replace(self.defaults, **self.values())

    # ---------------------------------------------------------------- running
    def run(self):
        """What the Run button does; returns the StudyResult (None after an error)."""
        self.output.outputs = ()
        self.live.outputs = ()
        self.last_error = None
        self.progress.value = 0
        self.run_button.disabled = True
        self.status.value = "<i>running…</i>"
        self.output.append_display_data(W.VBox([self.progress, self.live]))
        buffer = io.StringIO()
        result = None
        try:
            with contextlib.redirect_stdout(buffer):
                study = self.study()
                live = LivePlot(self.live_keys, every=self.live_every, sink=self._show_live,
                                profile=self.profile, logy=self.live_logy, group="arm")
                result = self.view_fn(study, live=live, progress=self._on_progress)
            self._render(result, buffer.getvalue())
            cached = (f", {result.from_cache}/{result.units} runs from the cache"
                      if result.units else "")
            bad = getattr(result, "cache_notes", None) or []
            recomputed = (f"; {len(bad)} cache entr{'y' if len(bad) == 1 else 'ies'} recomputed: "
                          + "; ".join(html_escape(n) for n in bad)) if bad else ""
            failed = len(failed_runs(getattr(getattr(result, "extra", None), "runs", None)))
            failures = (f"; <span style='color:#D55E00'>{failed} run{'' if failed == 1 else 's'} failed "
                        "(the table and the notes give the error)</span>") if failed else ""
            self.status.value = f"done{cached}{recomputed}{failures}"
        except Exception as exc:  # shown in the panel, never lost in the log console
            self.last_error = exc
            if buffer.getvalue():
                self.output.append_stdout(buffer.getvalue())
            self.output.append_display_data(_error_html(exc))
            self.output.append_stderr("".join(traceback.format_exception(exc)))
            self.status.value = f"<span style='color:#D55E00'>error: {type(exc).__name__}</span>"
        finally:
            self.run_button.disabled = False
        self.last_result = result
        return result

    def _on_progress(self, done: int, total: int, from_cache: bool) -> None:
        self.progress.max = max(total, 1)
        self.progress.value = done

    def _show_live(self, fig) -> None:
        self.live.outputs = ()
        self.live.append_display_data(_png(fig))

    def _render(self, result, printed: str) -> None:
        self.live.outputs = ()
        if printed:
            self.output.append_stdout(printed)
        for fig in result.figures:
            self.output.append_display_data(_png(fig))
        for note in result.notes:
            self.output.append_stdout(note + "\n")
        self.output.append_display_data(readable_table(result.table))

    def _ipython_display_(self):
        display(self.widget)


def readable_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table with its ``*_text`` (mean ± CI) columns in place of the raw numbers."""
    text = [c for c in table.columns if c.endswith("_text")]
    if not text:
        return table
    raw = {c[: -len("_text")] for c in text}
    keep = [c for c in table.columns if c not in raw and not (c.endswith("_ci") and c[:-3] in raw)]
    return table[keep].rename(columns={c: c[: -len("_text")] for c in text})


def _error_html(exc: BaseException):
    return HTML(f"<div style='color:#D55E00;border-left:3px solid #D55E00;padding-left:6px'>"
                f"<b>{type(exc).__name__}</b>: {html_escape(str(exc))}</div>")
