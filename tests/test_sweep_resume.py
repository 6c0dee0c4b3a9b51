"""An interrupted sweep, restarted, recomputes only the units that had not finished: units of
the cache (run_units) and a study's runs (Study.run -> run_specs -> run_units(execute, ...))."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _executions(markers: Path) -> dict[int, int]:
    counts: dict[int, int] = {}
    for f in markers.iterdir():
        i = int(f.name.split("-")[0][len("unit"):])
        counts[i] = counts.get(i, 0) + 1
    return counts


def test_killed_sweep_resumes_without_recomputing_finished_units(tmp_path, monkeypatch):
    markers = tmp_path / "markers"
    markers.mkdir()
    # one unit at a time, so that "every unit before the one in flight" has finished
    env = dict(os.environ, FA_STUDY_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(HERE), FA_STUDY_JOBS="1")
    n, delay = 6, 0.6
    code = f"from sweep_units import sweep; sweep({str(markers)!r}, {n}, {delay})"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(_executions(markers)) < 4:  # unit 3 has started
            time.sleep(0.05)
        assert len(_executions(markers)) >= 4, "the sweep did not get going"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no clean-up chance: as a crash or a closed laptop
        proc.wait()
    before = _executions(markers)
    finished_before = {i for i in before if i < max(before)}  # every unit before the one in flight
    assert finished_before and max(before) < n - 1, before

    monkeypatch.setenv("FA_STUDY_CACHE", str(tmp_path / "cache"))
    sys.path.insert(0, str(HERE))
    try:
        from sweep_units import sweep

        result = sweep(str(markers), n, delay)  # the same sweep, restarted
    finally:
        sys.path.remove(str(HERE))
    after = _executions(markers)
    assert sorted(result["i"]) == list(range(n)) and list(result["value"]) == [i * i for i in range(n)]
    assert result.attrs["hits"] >= len(finished_before)
    for i in finished_before:  # finished before the kill: served from the cache, not run again
        assert after[i] == 1, (i, after)
    for i in range(n):
        assert after.get(i, 0) >= 1


def _entries(cache: Path) -> dict[str, tuple[int, bytes]]:
    """Published cache entries of the study's runs: spec key -> (mtime, content); a writer's
    temporary file (``.tmp-...``, published by one rename) is not one."""
    return {m.stem: (m.stat().st_mtime_ns, m.read_bytes())
            for m in (cache / "results" / "fa_study.runs.execute").glob("[!.]*.json")}


def test_killed_study_resumes_without_recomputing_finished_runs(tmp_path, monkeypatch):
    from fa_study.cache import spec_key

    cache = tmp_path / "cache"
    env = dict(os.environ, FA_STUDY_CACHE=str(cache), PYTHONPATH=str(HERE), FA_STUDY_OFFLINE="1",
               FA_STUDY_PROFILE="quick", OMP_NUM_THREADS="1", FA_STUDY_JOBS="1")
    n = 6
    code = f"from sweep_units import study_sweep; study_sweep({n}).run()"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(_entries(cache)) < 2 and proc.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # no clean-up chance: as a crash or a closed laptop
        proc.wait()
    before = _entries(cache)
    assert 2 <= len(before) < n, f"{len(before)} of {n} runs finished before the kill"

    monkeypatch.setenv("FA_STUDY_CACHE", str(cache))
    monkeypatch.setenv("FA_STUDY_OFFLINE", "1")
    sys.path.insert(0, str(HERE))
    try:
        from sweep_units import study_sweep

        study = study_sweep(n)
        res = study.run()  # the same study, restarted
    finally:
        sys.path.remove(str(HERE))
    assert res.units == n and sorted(res.runs["seed"]) == list(range(n))
    assert set(res.runs["status"]) == {"ok"} and len(res.history) == n * 3
    # the runs finished before the kill were served, the others computed; nothing was bad
    assert (res.cache.hits, res.cache.computed, res.cache.recomputed) == (len(before), n - len(before), 0)
    after = _entries(cache)
    assert len(after) == n and set(after) == {spec_key(s) for s in study.specs()}
    for name, entry in before.items():  # not written again
        assert after[name] == entry, name
