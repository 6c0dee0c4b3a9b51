"""Wall time of each notebook's control-panel run in the default profile, with a fresh results
cache: before (units in sequence, ``FA_STUDY_JOBS=1``) and after (units spread over the cores,
the default), side by side.

A panel run is what the notebook's Run button does: ``ControlPanel(study, view).run()`` with the
study's default settings for the profile. Each run is a fresh Python process with its own empty
``FA_STUDY_CACHE`` (a temporary directory; the converted data tensors are shared, so the time is
training and reading, not unpacking the data files). Before and after alternate for each
notebook and the median over ``--repeats`` rounds is reported.

Two times per run: ``cold``, the first Run in a fresh process (worker processes started, data
loaded in each); ``again``, a second Run in the same process with another empty results cache,
i.e. what the next slider move costs in an open notebook (loky keeps its workers, and each
worker its loaded data, between runs).

    python benchmarks/bench_panels.py [00 02 ...|all] [--profile default] [--repeats 1]
    python benchmarks/bench_panels.py --child 02 --profile default   (one run, prints seconds)
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fa_study.config import TENSOR_CACHE_ENV, tensor_cache_dir

ROOT = Path(__file__).resolve().parent.parent

# notebook -> (module, study class, view function): what each notebook's ControlPanel calls
PANELS = {
    "00": ("fa_study.experiments", "FeedbackTour", "tour_view"),
    "01": ("fa_study.experiments", "RAStudy", "ra_view"),
    "02": ("fa_study.experiments.audit", "AuditStudy", "audit_view"),
    "03": ("fa_study.experiments.penalty", "PenaltyStudy", "penalty_view"),
    "04": ("fa_study.experiments.direction", "DirectionStudy", "direction_view"),
    "05": ("fa_study.experiments.learned", "LearnedStudy", "learned_view"),
    "07": ("fa_study.experiments.own_network", "OwnNetworkStudy", "own_network_view"),
}
DEFAULT = ("00", "02")


def child(notebook: str, profile: str) -> None:
    """Two panel runs in this process, each with an empty results cache; prints their wall
    seconds and the units (the last line of stdout)."""
    import importlib

    from fa_study.widgets import ControlPanel

    module, study, view = PANELS[notebook]
    mod = importlib.import_module(module)
    panel = ControlPanel(getattr(mod, study), getattr(mod, view), profile=profile)
    seconds = []
    for _ in range(2):
        with tempfile.TemporaryDirectory(prefix="fa_study_bench_cache_") as cache:
            os.environ["FA_STUDY_CACHE"] = cache
            start = time.perf_counter()
            result = panel.run()
            seconds.append(time.perf_counter() - start)
        if panel.last_error is not None:
            raise SystemExit(f"notebook {notebook}'s panel run failed: {panel.last_error!r}")
        if result.from_cache:  # a served unit would pass for a fast one
            raise SystemExit(f"notebook {notebook}'s panel run served {result.from_cache} unit(s) "
                             "from a cache that should have been empty")
    print(f"{seconds[0]:.3f} {seconds[1]:.3f} {result.units}")


def timed_run(notebook: str, profile: str, jobs_one: bool) -> tuple[float, float, str]:
    """``(cold seconds, again seconds, units)`` of a fresh process's two panel runs."""
    env = dict(os.environ)
    env.setdefault("FA_STUDY_DATA", str(ROOT / "data"))
    # the converted data tensors where this checkout keeps them, whatever results cache a run uses
    env.setdefault(TENSOR_CACHE_ENV, str(tensor_cache_dir()))
    env.pop("FA_STUDY_JOBS", None)
    if jobs_one:
        env["FA_STUDY_JOBS"] = "1"
    out = subprocess.run([sys.executable, __file__, "--child", notebook, "--profile", profile],
                         env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"notebook {notebook} ({'before' if jobs_one else 'after'}) failed:\n"
                         f"{out.stderr[-3000:]}")
    cold, again, units = out.stdout.strip().splitlines()[-1].split()
    return float(cold), float(again), units


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebooks", nargs="*", help=f"notebook numbers ({', '.join(PANELS)}) or 'all'; "
                   f"default: {' '.join(DEFAULT)}")
    p.add_argument("--profile", default="default")
    p.add_argument("--repeats", type=int, default=1, help="rounds of before/after; the median counts")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.profile)
        return
    chosen = list(PANELS) if a.notebooks == ["all"] else (a.notebooks or list(DEFAULT))
    unknown = [n for n in chosen if n not in PANELS]
    if unknown:
        raise SystemExit(f"unknown notebook(s) {', '.join(unknown)}; allowed: {', '.join(PANELS)} or all")
    print(f"panel runs, profile {a.profile}, fresh results cache, median of {a.repeats} round(s); "
          f"before: FA_STUDY_JOBS=1 (units in sequence), after: the default (cores: "
          f"{os.environ.get('FA_STUDY_CORES', os.cpu_count())})")
    print(f"{'notebook':<10}{'units':>6}{'':>4}{'before s':>10}{'after s':>10}{'before/after':>14}")
    for nb in chosen:
        rounds = {True: [], False: []}
        for _ in range(a.repeats):  # alternate, so that load from other processes hits both alike
            for jobs_one in (True, False):
                *times, units = timed_run(nb, a.profile, jobs_one)
                rounds[jobs_one].append(times)
        for i, label in enumerate(("cold", "again")):
            b = statistics.median(t[i] for t in rounds[True])
            f = statistics.median(t[i] for t in rounds[False])
            print(f"{nb if i == 0 else '':<10}{units if i == 0 else '':>6}{label:>6}{b:>8.1f}{f:>10.1f}"
                  f"{b / f:>13.2f}x", flush=True)


if __name__ == "__main__":
    main()
