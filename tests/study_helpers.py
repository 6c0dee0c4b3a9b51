"""Helpers of the study tests: make chosen runs of a sweep blow up, and read what a figure drew."""
import dataclasses

import numpy as np


def diverge(monkeypatch, *labels: str, lr: float = 1e6) -> None:
    """Runs whose label is one of ``labels`` train with learning rate ``lr`` (they blow up); the
    others are trained as specified. Patches :func:`fa_study.runs.execute`, which
    :func:`fa_study.runs.run_specs` dispatches (cache entries go under the wrapper's name)."""
    from fa_study import runs

    original = runs.execute

    def execute_with_blow_ups(spec, fingerprint="", callback=None):
        if spec.label in labels:
            spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, lr=lr))
        return original(spec, fingerprint, callback)

    monkeypatch.setattr(runs, "execute", execute_with_blow_ups)


def drawn(figures) -> list[tuple[str, str, bool]]:
    """``(axis title, label, has a finite value)`` of every labelled line and legend entry."""
    out = []
    for fig in figures:
        for ax in fig.axes:
            title = ax.get_title()
            for line in ax.lines:
                label = str(line.get_label())
                if label.startswith("_"):
                    continue
                y = np.asarray(line.get_ydata(), dtype=float)
                out.append((title, label, bool(np.isfinite(y).any())))
            legend = ax.get_legend()
            if legend is not None:
                out += [(title, f"legend:{t.get_text()}", True) for t in legend.get_texts()]
    return out


def assert_not_drawn(figures, label: str) -> None:
    """No line and no legend entry for ``label``, and no labelled line without a finite value."""
    items = drawn(figures)
    assert items, "the figures draw nothing"
    bad = [i for i in items if i[1] in (label, f"legend:{label}")]
    assert not bad, f"{label!r} is drawn: {bad}"
    empty = [i for i in items if not i[2]]
    assert not empty, f"labelled lines without a finite value: {empty}"


def output_mimes(output) -> list[str]:
    """The MIME types of every item an ipywidgets ``Output`` holds, in order."""
    return [k for o in output.outputs for k in o.get("data", {})]


def html_outputs(output) -> list[str]:
    """The ``text/html`` items of an ipywidgets ``Output``."""
    return [o["data"]["text/html"] for o in output.outputs if "text/html" in o.get("data", {})]


def run_panel(panel, **values) -> None:
    """Set ``panel``'s controls to ``values`` (control name -> value), press Run, and fail
    with the panel's error if the run raised."""
    for name, value in values.items():
        panel.controls[name].value = value
    panel.run_button.click()
    assert panel.last_error is None, panel.last_error
