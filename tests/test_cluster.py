"""A sweep on a real dask.distributed cluster (two worker processes on the loopback interface),
one worker killed with SIGKILL mid-unit: every unit ends up in the shared cache exactly once, a
rerun recomputes nothing that had finished, and the results equal a local run's bit for bit."""
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from fa_study.cache import ResultsCache, code_fingerprint, spec_key, unit_name
from fa_study.units import run_units

pytestmark = pytest.mark.cluster

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
N_UNITS = 7
WAIT_S = 240  # bound on every wait; the whole test takes well under a minute when all is well


def _markers(folder: Path, what: str) -> dict[int, list[tuple[int, int]]]:
    """``{unit: [(pid, start_ns), ...]}`` of the ``what`` markers (``unit`` or ``done``)."""
    out: dict[int, list[tuple[int, int]]] = {}
    for f in folder.iterdir():
        if f.name.startswith(what):
            i, pid, ns = f.name[len(what):].split("-")
            out.setdefault(int(i), []).append((int(pid), int(ns)))
    return out


def _worker_env(name: str):
    return os.environ.get(name)


def test_sweep_survives_a_killed_worker_on_a_dask_cluster(tmp_path, monkeypatch):
    pytest.importorskip("distributed", reason="dask.distributed is not installed "
                        "(pip install 'fa_study[cluster]'); the cluster test needs it")
    from distributed import Client, LocalCluster
    from joblib import parallel_backend
    from sweep_units import TrainSpec, train_unit

    t_start = time.perf_counter()
    # the local n_jobs=1 reference, in its own cache
    monkeypatch.setenv("FA_STUDY_CACHE", str(tmp_path / "local_cache"))
    (tmp_path / "local_markers").mkdir()
    local, local_stats = run_units(train_unit, [TrainSpec(i, str(tmp_path / "local_markers"))
                                                for i in range(N_UNITS)], n_jobs=1)
    assert local_stats.computed == N_UNITS
    t_local = time.perf_counter() - t_start

    shared = tmp_path / "shared_cache"  # the shared file system of a real cluster
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("FA_STUDY_CACHE", str(shared))  # inherited by the workers (and restarts)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(HERE)]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    specs = [TrainSpec(i, str(markers)) for i in range(N_UNITS)]
    story: list[str] = []

    cluster = client = None
    try:
        cluster = LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                               dashboard_address=None, timeout=WAIT_S)
        client = Client(cluster, timeout=WAIT_S)
        client.wait_for_workers(2, timeout=WAIT_S)
        assert all(a.startswith("tcp://127.0.0.1:") for a in client.scheduler_info()["workers"])
        assert set(client.run(code_fingerprint).values()) == {code_fingerprint()}  # same code
        assert set(client.run(_worker_env, "FA_STUDY_CACHE").values()) == {str(shared)}
        worker_pids = set(client.run(os.getpid).values())
        assert len(worker_pids) == 2 and os.getpid() not in worker_pids

        first: dict = {}

        def sweep():
            try:
                with parallel_backend("dask", client=client):
                    first["result"] = run_units(train_unit, specs, n_jobs=-1)
            except BaseException as exc:  # noqa: BLE001 - reported below
                first["error"] = exc

        t_cluster = time.perf_counter()
        thread = threading.Thread(target=sweep, daemon=True)
        thread.start()

        # once a unit is in the cache, kill a worker in the middle of its unit
        victim = killed_unit = None
        deadline = time.time() + WAIT_S
        while time.time() < deadline and thread.is_alive():
            written = len(ResultsCache(shared, quiet=True).entries(unit_name(train_unit)))
            if written >= 1:
                started, done = _markers(markers, "unit"), _markers(markers, "done")
                now = time.time_ns()
                running = [(ns, i, pid) for i, runs in started.items() for pid, ns in runs
                           if i not in done and pid in worker_pids and now - ns < 400_000_000]
                if running:
                    _, killed_unit, victim = max(running)
                    break
            time.sleep(0.02)
        assert victim is not None, f"no unit caught in flight; markers {_markers(markers, 'unit')}"
        finished_at_kill = len(ResultsCache(shared, quiet=True).entries(unit_name(train_unit)))
        assert victim in worker_pids  # only ever a worker process of this cluster
        os.kill(victim, signal.SIGKILL)
        t_kill = time.perf_counter()
        story.append(f"killed worker pid {victim} while it ran unit {killed_unit}, "
                     f"{finished_at_kill} unit(s) already in the cache")

        thread.join(timeout=WAIT_S)
        assert not thread.is_alive(), "the sweep did not end after the worker was killed"
        if "result" in first:
            stats1 = first["result"][1]
            story.append(f"dask rescheduled the lost unit; the first call returned all {N_UNITS} "
                         f"units ({stats1}) {time.perf_counter() - t_kill:.1f} s after the kill")
        else:
            story.append(f"the first call failed: {first['error']!r}")
        t_first = time.perf_counter() - t_cluster

        # the same sweep again: only what had not finished is computed
        in_cache = len(ResultsCache(shared, quiet=True).entries(unit_name(train_unit)))
        starts_before = _markers(markers, "unit")
        with parallel_backend("dask", client=client):
            out, stats = run_units(train_unit, specs, n_jobs=-1)
        starts_after = _markers(markers, "unit")
        story.append(f"rerun: {stats}")
        assert stats.hits == in_cache and stats.computed == N_UNITS - in_cache and not stats.recomputed
        for i in range(N_UNITS):
            if len(starts_before.get(i, [])) and i in _markers(markers, "done"):
                assert starts_after[i] == starts_before[i], f"unit {i} was recomputed on the rerun"

        # every unit exactly once in the cache, and finished exactly once
        entries = ResultsCache(shared, quiet=True).entries(unit_name(train_unit))
        assert len(entries) == N_UNITS
        assert sorted(e.stem for e in entries) == sorted(spec_key(s) for s in specs)
        done = _markers(markers, "done")
        assert {i: len(v) for i, v in done.items()} == {i: 1 for i in range(N_UNITS)}, done
        starts = {i: len(v) for i, v in _markers(markers, "unit").items()}
        assert starts[killed_unit] == 2 and all(starts[i] == 1 for i in starts if i != killed_unit), starts
        story.append(f"unit starts {starts}; each unit finished once")

        # the cluster's results equal the local run's, bit for bit
        for a, b in zip(local, out):
            pd.testing.assert_frame_equal(a["curve"], b["curve"], check_exact=True)
            assert (a["param_sum"], a["final_loss"]) == (b["param_sum"], b["final_loss"])
        if "result" in first:
            for a, b in zip(local, first["result"][0]):
                pd.testing.assert_frame_equal(a["curve"], b["curve"], check_exact=True)
    finally:
        t_close = time.perf_counter()
        if client is not None:
            client.close(timeout=30)
        if cluster is not None:
            cluster.close(timeout=30)
        story.append(f"cluster shut down in {time.perf_counter() - t_close:.1f} s")
    total = time.perf_counter() - t_start
    story.insert(0, f"local reference {t_local:.1f} s; cluster sweep with the kill {t_first:.1f} s; "
                    f"whole test {total:.1f} s")
    print("\n[cluster test] " + "\n[cluster test] ".join(story), file=sys.stderr)
