"""``make study``: execute every notebook headless with one profile and write a report.

For each ``notebooks/NN_*.ipynb`` the runner executes a copy with papermill (the profile is
injected into the cell tagged ``parameters`` and exported as ``FA_STUDY_PROFILE``), writes the
executed notebook and its HTML rendering into the report directory, and collects the key
numbers each notebook records with :func:`record`. It ends by printing a one-screen summary
and writing it to ``summary.md``. A notebook that fails is reported and the others still run;
the command then exits non-zero.

Run it as ``python -m fa_study.study --profile quick --out reports``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .config import PROFILES, check_choice

REPORT_ENV = "FA_STUDY_REPORT_DIR"


def record(notebook: str, values: dict, *, display: bool = True) -> dict:
    """Record a notebook's key numbers for the study summary.

    Writes ``<report dir>/<notebook>.keys.json`` when the notebook runs under ``make study``
    (``$FA_STUDY_REPORT_DIR`` set); always returns ``values`` with floats rounded for reading,
    and prints them when ``display`` is true so an interactive reader sees the same numbers.
    """
    clean = {str(k): _plain(v) for k, v in values.items()}
    target = os.environ.get(REPORT_ENV)
    if target:
        path = Path(target) / f"{notebook}.keys.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(clean, indent=2))
    if display:
        width = max((len(k) for k in clean), default=0)
        print(f"Key numbers ({notebook}):")
        for k, v in clean.items():
            print(f"  {k:<{width}}  {v}")
    return clean


def _plain(v):
    """JSON-friendly, rounded for a one-screen summary."""
    import numpy as np

    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return float(f"{v:.4g}") if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (int, str, bool)) or v is None:
        return v
    return str(v)


def find_notebooks(folder: Path) -> list[Path]:
    """The numbered study notebooks, in order (checkpoints and executed copies excluded)."""
    return sorted(p for p in folder.glob("[0-9][0-9]_*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def execute(nb_path: Path, out_dir: Path, profile: str, timeout: int | None = None) -> dict:
    """Execute one notebook into ``out_dir`` (ipynb + html). Returns a status record."""
    import papermill as pm
    from nbconvert import HTMLExporter
    import nbformat

    out_nb = out_dir / nb_path.name
    started = time.time()
    error = None
    try:
        pm.execute_notebook(
            str(nb_path), str(out_nb), parameters={"PROFILE": profile}, kernel_name="python3",
            language="python", cwd=str(nb_path.parent), progress_bar=False, log_output=False,
            execution_timeout=timeout,
        )
    except Exception as exc:  # the executed copy is still written by papermill
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    seconds = time.time() - started
    html = None
    if out_nb.exists():
        body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(out_nb), as_version=4))
        html = out_nb.with_suffix(".html")
        html.write_text(body, encoding="utf-8")
    return {"notebook": nb_path.stem, "ok": error is None, "error": error,
            "seconds": round(seconds, 1), "ipynb": str(out_nb), "html": str(html) if html else None}


def _execute_reporting(nb: Path, out_dir: Path, profile: str, timeout: int | None) -> dict:
    print(f"[study] executing {nb.name} (profile {profile}) ...", flush=True)
    r = execute(nb, out_dir, profile, timeout)
    print(f"[study]   {nb.stem}: {'ok' if r['ok'] else 'FAILED: ' + str(r['error'])} in {r['seconds']} s",
          flush=True)
    return r


def _positive_int(name: str, value) -> int:
    try:
        number = int(str(value))
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{name} must be a positive integer (notebooks executed at once), got {value!r}")
    return number


def summarize(results: list[dict], out_dir: Path, profile: str) -> str:
    lines = [f"# fa_study report (profile: {profile})", ""]
    for r in results:
        state = "ok" if r["ok"] else f"FAILED — {r['error']}"
        lines.append(f"## {r['notebook']}  ({state}, {r['seconds']} s)")
        keys = out_dir / f"{r['notebook']}.keys.json"
        if keys.exists():
            lines += [f"- {k}: {v}" for k, v in json.loads(keys.read_text()).items()]
        lines += [f"- html: {r['html']}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=os.environ.get("FA_STUDY_PROFILE", "default"))
    parser.add_argument("--out", default="reports", help="report directory (created)")
    parser.add_argument("--notebooks", default="notebooks", help="folder holding the notebooks")
    parser.add_argument("--only", nargs="*", default=None, help="run only notebooks whose name starts so")
    parser.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    parser.add_argument("--jobs", default="1", help="notebooks executed at once, each kernel with an "
                        "equal share of the cores ($FA_STUDY_CORES) for its units of work")
    args = parser.parse_args(argv)
    check_choice("profile", args.profile, PROFILES)
    jobs = _positive_int("--jobs", args.jobs)

    nb_dir, out_dir = Path(args.notebooks).resolve(), Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = find_notebooks(nb_dir)
    if args.only:
        notebooks = [p for p in notebooks if any(p.name.startswith(o) for o in args.only)]
    if not notebooks:
        print(f"No notebooks found in {nb_dir}; nothing to execute. Report directory: {out_dir}")
        (out_dir / "summary.md").write_text(f"# fa_study report (profile: {args.profile})\n\n"
                                            "No notebooks yet.\n")
        return 0

    os.environ["FA_STUDY_PROFILE"] = args.profile
    os.environ[REPORT_ENV] = str(out_dir)
    # the kernels draw inline whatever backend the calling shell chose
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    # Each kernel spreads its units over its share of the cores and no more, so that J notebooks
    # at once keep every core busy without oversubscribing them (fa_study.units.core_budget).
    from .units import CORES_ENV, core_budget

    share = max(1, core_budget() // jobs)
    os.environ[CORES_ENV] = str(share)
    os.environ.setdefault("OMP_NUM_THREADS", str(share))  # a thread count the caller set is kept
    started = time.time()
    if jobs == 1:
        results = [_execute_reporting(nb, out_dir, args.profile, args.timeout) for nb in notebooks]
    else:
        with ProcessPoolExecutor(max_workers=min(jobs, len(notebooks))) as pool:
            futures = [pool.submit(_execute_reporting, nb, out_dir, args.profile, args.timeout)
                       for nb in notebooks]
            results = [f.result() for f in futures]  # in notebook order, whatever finished first
    text = summarize(results, out_dir, args.profile)
    text += f"\nWall time: {time.time() - started:.0f} s with {jobs} notebook(s) at a time.\n"
    (out_dir / "summary.md").write_text(text)
    print()
    print(text)
    print(f"Executed notebooks and HTML are in {out_dir}; summary: {out_dir / 'summary.md'}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
