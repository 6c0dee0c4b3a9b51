"""The results cache: data on disk, never code; every fault written here and survived."""
import dataclasses
import json
import math
import os
import pickle
import shutil
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fa_study import cache as fc
from fa_study.cache import (
    CacheWarning,
    ResultsCache,
    clear_cache,
    code_fingerprint,
    spec_json,
    spec_key,
    unit_name,
)
from fa_study.units import CacheStats, run_units
from fa_study.units import compute_unit
from io_helpers import within

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclasses.dataclass(frozen=True)
class Inner:
    a: float = 0.5
    tag: str | None = None


@dataclasses.dataclass(frozen=True)
class Spec:
    i: int = 0
    lr: float = 1e-4
    arms: tuple = ("bp", "fa")
    inner: Inner = Inner()
    opts: dict | None = None


CALLS: list = []


def _objects(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def rich_frame(i: int) -> pd.DataFrame:
    """Every column type the studies' results use."""
    return pd.DataFrame({
        "i": np.arange(3, dtype="int64") + i,
        "x": [0.1 + 0.2, -0.0, 5e-324],  # exact bits, signed zero, a subnormal
        "y": [math.nan, math.inf, -math.inf],
        "arm": ["bp", "fa", "dfa"],  # str dtype
        "arm_or_none": ["bp", None, "fa"],
        "n": pd.array([1, None, 3], dtype="Int64"),
        "ok": [True, False, True],
        "maybe": pd.array([True, None, False], dtype="boolean"),
        "d1": _objects([True, False, None]),  # True/False/None in one column
        "mixed": _objects([1, "two", 3.5]),
        "cells": _objects([(1, 2), [3.0], {"k": None}]),
        "cat": pd.Categorical(["a", "b", "a"]),
    }, index=pd.Index([10, 20, 30], name="row"))


def unit(spec: Spec, fingerprint: str, callback=None) -> dict:
    CALLS.append(spec)
    df = rich_frame(spec.i)
    df.attrs["note"] = "attrs are not stored"
    return {"history": df, "empty": pd.DataFrame(), "acc": 0.1 * spec.i, "nan": math.nan,
            "flags": {"d1": None, "d2": True, "draws": [1, 2.5, None], "pair": (1, "a")},
            "fingerprint": fingerprint}


def frame_unit(spec: Spec, fingerprint: str, callback=None) -> pd.DataFrame:
    CALLS.append(spec)
    return pd.DataFrame({"i": [spec.i], "v": [spec.lr]})


@pytest.fixture(autouse=True)
def _reset(monkeypatch):
    monkeypatch.setenv("FA_STUDY_JOBS", "1")  # CALLS counts the units computed in this process
    CALLS.clear()
    yield
    CALLS.clear()


def assert_payload_equal(a, b):
    if isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=True)
        return
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], pd.DataFrame):
            pd.testing.assert_frame_equal(a[k], b[k], check_exact=True)
        else:
            assert json.dumps(a[k], allow_nan=True) == json.dumps(b[k], allow_nan=True) and \
                type(a[k]) is type(b[k]), k


def entry(root: Path, fn, spec) -> Path:
    return root / "results" / unit_name(fn) / f"{spec_key(spec)}.json"


def header_and_body(p: Path) -> tuple[dict, bytes]:
    head, _, body = p.read_bytes().partition(b"\n")
    return json.loads(head), body


# ------------------------------------------------------------------------------ keys

def test_spec_key_is_canonical_and_tells_types_apart():
    assert spec_key(Spec(lr=1e-4)) == spec_key(Spec(lr=0.0001)) == spec_key(Spec())
    assert spec_key(Spec(lr=0.1 + 0.2)) != spec_key(Spec(lr=0.3))  # floats written exactly
    assert spec_key(Spec(i=1)) != spec_key(Spec(i=True))
    assert spec_key(Spec(lr=1)) != spec_key(Spec(lr=1.0))
    assert spec_key(Spec(opts={"a": 1, "b": 2})) == spec_key(Spec(opts={"b": 2, "a": 1}))
    assert spec_key(Spec(inner=Inner(tag="x"))) != spec_key(Spec())
    assert spec_key(Spec(i=np.int64(3))) == spec_key(Spec(i=3))
    text = spec_json(Spec())
    assert json.loads(text)["__class__"] == "Spec" and '"lr":0.0001' in text
    assert len(spec_key(Spec())) == 64
    assert spec_key(Spec(lr=math.nan)) == spec_key(Spec(lr=float("nan")))


def test_spec_key_refuses_what_is_not_a_frozen_spec():
    @dataclasses.dataclass
    class Mutable:
        a: int = 1

    with pytest.raises(TypeError, match="frozen"):
        spec_key(Mutable())
    with pytest.raises(TypeError, match="frozen dataclass"):
        spec_key({"i": 1})
    with pytest.raises(TypeError, match=r"Spec\.arms.*list"):
        spec_key(Spec(arms=["bp"]))
    with pytest.raises(TypeError, match="non-str keys"):
        spec_key(Spec(opts={1: 2}))


# ------------------------------------------------------------------------------ round trip

def test_payloads_round_trip_exactly_and_the_entry_holds_only_data(cache):
    specs = [Spec(i=0), Spec(i=1)]
    first, stats = run_units(unit, specs)
    assert isinstance(stats, CacheStats)
    assert (stats.hits, stats.computed, stats.recomputed, stats.notes) == (0, 2, 0, [])
    again, stats = run_units(unit, specs)
    assert (stats.hits, stats.computed, stats.recomputed) == (2, 0, 0) and len(CALLS) == 2
    assert str(stats) == "2/2 from the cache"
    for a, b in zip(first, again):
        assert_payload_equal(a, b)
        assert b["history"].attrs == {}  # documented: .attrs are not stored
        assert [type(v) for v in b["history"]["d1"]] == [bool, bool, type(None)]
        assert list(b["history"]["cells"]) == [(1, 2), [3.0], {"k": None}]
        assert b["flags"]["pair"] == (1, "a")
        assert str(b["history"]["n"].dtype) == "Int64" and b["history"]["d1"].dtype == object
        assert np.signbit(b["history"]["x"].iloc[1]) and b["history"]["x"].iloc[0] == 0.1 + 0.2
        assert list(b["history"]["mixed"]) == [1, "two", 3.5] and type(b["history"]["mixed"].iloc[2]) is float
        assert list(b["history"].index) == [10, 20, 30] and b["history"].index.name == "row"
    p = entry(cache, unit, specs[1])
    assert sorted(q.name for q in p.parent.iterdir()) == sorted(f"{spec_key(s)}.json" for s in specs)
    man, body = header_and_body(p)  # a JSON header line, then the payload as JSON: data only
    assert man["spec"] == spec_json(specs[1]) and p.name == f"{spec_key(specs[1])}.json"
    assert man["fingerprint"] == code_fingerprint() and man["fa_study_version"]
    assert man["created"].endswith("+00:00") and man["unit"] == unit_name(unit)
    import hashlib

    assert hashlib.sha256(body).hexdigest() == man["sha256"] and len(body) == man["bytes"]
    assert json.loads(body)["history"]["__frame__"]["columns"][0]["dtype"] == "int64"


def test_a_frame_payload_round_trips(cache):
    frames, _ = run_units(frame_unit, [Spec(i=4)])
    back, stats = run_units(frame_unit, [Spec(i=4)])
    assert stats.hits == 1
    pd.testing.assert_frame_equal(frames[0], back[0], check_exact=True)


def test_loading_never_unpickles(cache, monkeypatch):
    run_units(unit, [Spec(i=2)])
    # modules that copy ``pickle.loads`` when first imported must be imported before the patch,
    # or they keep the refusing stand-in after the test (joblib's array reducer then ships it to
    # every later worker, which fails to unpickle its tasks)
    import joblib._memmapping_reducer  # noqa: F401
    import joblib.externals.loky.backend.reduction  # noqa: F401

    def refuse(*a, **k):
        raise AssertionError("the cache unpickled something")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    import joblib

    monkeypatch.setattr(joblib, "load", refuse)
    out, stats = run_units(unit, [Spec(i=2)])
    assert stats.hits == 1 and out[0]["acc"] == 0.2
    monkeypatch.undo()
    assert joblib._memmapping_reducer.loads is pickle.loads  # nothing kept the stand-in


def test_identical_specs_are_computed_once_and_progress_follows_each_unit(cache):
    seen = []
    out, stats = run_units(frame_unit, [Spec(i=1), Spec(i=2), Spec(i=1)],
                           progress=lambda *a: seen.append(a))
    assert len(CALLS) == 2 and stats.computed == 3 and stats.total == 3
    assert [s[0] for s in seen] == [1, 2, 3] and all(s[1] == 3 and s[2] is False for s in seen)
    assert out[0] is not out[2]
    pd.testing.assert_frame_equal(out[0], out[2])
    seen.clear()
    run_units(frame_unit, [Spec(i=1), Spec(i=3)], progress=lambda *a: seen.append(a))
    assert seen == [(1, 2, True), (2, 2, False)]


def test_parallel_units_are_written_by_the_workers(cache):
    from joblib import parallel_backend

    specs = [Spec(i=i) for i in range(4)]
    seen = []
    with parallel_backend("threading"):
        out, stats = run_units(frame_unit, specs, n_jobs=2, progress=lambda *a: seen.append(a))
    assert stats.computed == 4 and len(seen) == 4 and [s[0] for s in seen] == [1, 2, 3, 4]
    assert [int(o["i"].iloc[0]) for o in out] == [0, 1, 2, 3]  # in spec order
    assert len(ResultsCache().entries(unit_name(frame_unit))) == 4
    _, stats = run_units(frame_unit, specs, n_jobs=2)
    assert stats.hits == 4 and len(CALLS) == 4


def test_a_payload_that_cannot_be_stored_is_returned_with_a_note(cache):
    def odd_unit(spec, fingerprint, callback=None):
        return {"frame": pd.DataFrame({"a": [1]}), "report": object()}

    out, stats = run_units(odd_unit, [Spec()])
    assert "report" in out[0] and stats.computed == 1
    assert len(stats.notes) == 1 and "not cached" in stats.notes[0] and "'report'" in stats.notes[0]
    assert not ResultsCache().entries(unit_name(odd_unit))

    def multi_unit(spec, fingerprint, callback=None):
        return pd.DataFrame([[1, 2]], columns=pd.MultiIndex.from_tuples([("a", "b"), ("a", "c")]))

    out, stats = run_units(multi_unit, [Spec()])
    assert out[0].shape == (1, 2) and "not cached" in stats.notes[0]


# ------------------------------------------------------------------------------ faults

class Planted:
    """Unpickling this writes ``marker``: proof that something executed a pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_an_old_joblib_pickle_is_never_executed(cache, tmp_path):
    marker = tmp_path / "EXECUTED"
    old = cache / "joblib" / "fa_study" / "experiments" / "core" / "unit" / "0123abcd"
    old.mkdir(parents=True)
    (old / "output.pkl").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.warns(CacheWarning, match="joblib.*never unpickled"):
        _, stats = run_units(frame_unit, [Spec(i=1)])
    assert stats.computed == 1 and not marker.exists()
    clear_cache()  # forgets the old cache too
    assert not (cache / "joblib").exists()


def test_a_pickle_dropped_into_the_cache_is_never_opened(cache, tmp_path):
    marker = tmp_path / "EXECUTED"
    run_units(frame_unit, [Spec(i=1), Spec(i=2)])
    p = entry(cache, frame_unit, Spec(i=1))
    (p.parent / "result.pkl").write_bytes(pickle.dumps(Planted(marker)))
    (cache / "results" / "stray.pkl").write_bytes(pickle.dumps(Planted(marker)))
    # and a pickle in place of an entry: not JSON, never unpickled
    entry(cache, frame_unit, Spec(i=2)).write_bytes(pickle.dumps(Planted(marker)))
    out, stats = run_units(frame_unit, [Spec(i=1), Spec(i=2)])
    assert not marker.exists()
    assert stats.hits == 1 and stats.recomputed == 1  # the intact entry is served, the other redone
    assert "not JSON" in stats.notes[0]
    assert list(out[1]["i"]) == [2]


def _damage_and_rerun(cache, damage):
    first, _ = run_units(unit, [Spec(i=3), Spec(i=4)])
    damage(entry(cache, unit, Spec(i=3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bad entries are notes, never console output
        out, stats = run_units(unit, [Spec(i=3), Spec(i=4)])
    assert (stats.hits, stats.computed, stats.recomputed) == (1, 0, 1)
    assert len(stats.notes) == 1 and stats.notes[0].startswith("unit Spec(i=3): ")
    assert stats.notes[0].endswith(", recomputed")
    assert len(CALLS) == 3
    for a, b in zip(first, out):
        assert_payload_equal(a, b)
    _, again = run_units(unit, [Spec(i=3), Spec(i=4)])  # the replaced entry is valid
    assert again.hits == 2 and not again.notes
    return stats.notes[0]


def test_a_truncated_entry_is_recomputed(cache):
    def truncate(p):
        p.write_bytes(p.read_bytes()[:-100])

    assert "truncated" in _damage_and_rerun(cache, truncate)


def test_an_altered_entry_is_recomputed(cache):
    def alter(p):
        data = bytearray(p.read_bytes())
        data[-len(data) // 3] ^= 0x01
        p.write_bytes(bytes(data))

    assert "sha256" in _damage_and_rerun(cache, alter)


def test_altered_json_values_are_recomputed(cache):
    def alter(p):
        p.write_text(p.read_text().replace("0.30000000000000004", "0.99999999999999999"))

    assert "altered" in _damage_and_rerun(cache, alter)


def test_a_header_that_is_not_json_is_recomputed(cache):
    def garble(p):
        p.write_bytes(b"{\"format\": \"fa_study.results/2\", \x00\xff\n" + p.read_bytes().partition(b"\n")[2])

    assert "not JSON" in _damage_and_rerun(cache, garble)


def test_an_entry_of_another_run_is_detected_through_its_spec(cache):
    def swap(p):  # a valid entry of Spec(i=4) copied to Spec(i=3)'s place
        shutil.copyfile(p.with_name(f"{spec_key(Spec(i=4))}.json"), p)

    assert "another run" in _damage_and_rerun(cache, swap)


@pytest.mark.parametrize("size", [-1, True, 1.5, "2111", None])
def test_a_header_declaring_a_size_that_is_not_a_count_is_refused(cache, size):
    def forge(p):
        man, body = header_and_body(p)
        man["bytes"] = size
        p.write_bytes(json.dumps(man).encode() + b"\n" + body)

    assert "incomplete" in _damage_and_rerun(cache, forge)


def test_an_entry_written_by_other_code_is_not_served(cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fc, "code_fingerprint", lambda: "0.0.0+otherc0de")
        run_units(frame_unit, [Spec(i=1), Spec(i=2)])
    assert header_and_body(entry(cache, frame_unit, Spec(i=1)))[0]["fingerprint"] == "0.0.0+otherc0de"
    _, stats = run_units(frame_unit, [Spec(i=1), Spec(i=2)])
    # counted as computed (the normal result of editing the code), not as a damaged entry
    assert (stats.hits, stats.computed, stats.recomputed) == (0, 2, 0) and len(CALLS) == 4
    assert len(stats.notes) == 1 and "other code" in stats.notes[0]
    assert header_and_body(entry(cache, frame_unit, Spec(i=1)))[0]["fingerprint"] == code_fingerprint()
    assert run_units(frame_unit, [Spec(i=1), Spec(i=2)])[1].hits == 2


def test_a_cache_path_that_is_a_file_falls_back_to_memory(tmp_path, monkeypatch):
    path = tmp_path / "not_a_dir"
    path.write_text("I am a file")
    monkeypatch.setenv("FA_STUDY_CACHE", str(path))
    with pytest.warns(CacheWarning, match=rf"FA_STUDY_CACHE={path}.*in memory"):
        out, stats = run_units(frame_unit, [Spec(i=7)])
    assert stats.computed == 1 and "FA_STUDY_CACHE" in stats.notes[0] and str(path) in stats.notes[0]
    back, stats = run_units(frame_unit, [Spec(i=7)])  # served from memory in this process
    assert stats.hits == 1 and len(CALLS) == 1 and "in memory" in stats.notes[0]
    pd.testing.assert_frame_equal(out[0], back[0])
    back[0].loc[0, "i"] = 99  # a served copy, not the cache's own
    assert int(run_units(frame_unit, [Spec(i=7)])[0][0]["i"].iloc[0]) == 7
    assert path.read_text() == "I am a file"
    clear_cache()
    assert run_units(frame_unit, [Spec(i=7)])[1].computed == 1


READ_ONLY_SCRIPT = r"""
import json, sys, warnings
import pandas as pd
sys.path.insert(0, {tests!r})
from test_cache import Spec, frame_unit
from fa_study.cache import CacheWarning
from fa_study.units import run_units
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    out1, s1 = run_units(frame_unit, [Spec(i=1), Spec(i=2)])
out2, s2 = run_units(frame_unit, [Spec(i=1), Spec(i=2)])
print(json.dumps({{"warnings": [str(x.message) for x in w if x.category is CacheWarning],
                  "s1": [s1.hits, s1.computed, s1.notes], "s2": [s2.hits, s2.computed],
                  "v": [int(o["i"].iloc[0]) for o in out2]}}))
"""


def _drop_root_file_powers():
    """In a child about to exec: give up the capabilities that let root write into read-only
    directories (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER), so that permissions bind."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_a_read_only_cache_serves_what_it_has_and_keeps_new_results_in_memory(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("FA_STUDY_CACHE", str(root))
    run_units(frame_unit, [Spec(i=1)])  # one entry on disk before the cache turns read-only
    modes = {p: p.stat().st_mode for p in [root, *root.rglob("*")]}
    for p in modes:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        env = dict(os.environ, FA_STUDY_CACHE=str(root), PYTHONPATH=str(ROOT))
        code = READ_ONLY_SCRIPT.format(tests=str(HERE))
        try:
            proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(ROOT), text=True,
                                  capture_output=True, timeout=300, check=False,
                                  preexec_fn=_drop_root_file_powers if os.geteuid() == 0 else None)
        except subprocess.SubprocessError as exc:
            pytest.skip(f"cannot make a read-only directory binding for root here: {exc}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        assert len(res["warnings"]) == 1
        assert f"FA_STUDY_CACHE={root}" in res["warnings"][0] and "in memory" in res["warnings"][0]
        hits, computed, notes = res["s1"]
        assert (hits, computed) == (1, 1) and f"FA_STUDY_CACHE={root}" in notes[0]
        assert res["s2"] == [2, 0] and res["v"] == [1, 2]
        assert len(list((root / "results" / unit_name(frame_unit)).iterdir())) == 1  # nothing written
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


CONCURRENT_SCRIPT = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from sweep_units import SlowSpec, slow_unit
from fa_study.units import run_units
go = Path({go!r})
deadline = time.time() + 120
while not go.exists() and time.time() < deadline:
    time.sleep(0.01)
out, stats = run_units(slow_unit, [SlowSpec(5, {markers!r}, 1.0)])
print(json.dumps({{"computed": stats.computed, "frame": out[0].to_dict("list")}}))
"""


def test_concurrent_writers_leave_one_valid_entry(cache, tmp_path):
    sys.path.insert(0, str(HERE))
    try:
        from sweep_units import SlowSpec, slow_unit
    finally:
        sys.path.remove(str(HERE))
    markers = tmp_path / "markers"
    markers.mkdir()
    go = tmp_path / "go"
    code = CONCURRENT_SCRIPT.format(tests=str(HERE), go=str(go), markers=str(markers))
    env = dict(os.environ, FA_STUDY_CACHE=str(cache), PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=str(ROOT), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    try:
        time.sleep(0.5)
        go.touch()  # both start computing the same spec at (nearly) the same moment
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    res = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert res[0]["frame"] == res[1]["frame"] == {"i": [5], "value": [25]}
    # Usually both compute and both write; on a loaded machine one may start after the other
    # published and be served instead. Either way: every computation left its marker, at least
    # one computed, and one valid entry remains.
    computed = [r["computed"] for r in res]
    assert sum(computed) >= 1 and len(list(markers.iterdir())) == sum(computed)
    unit_dir = cache / "results" / unit_name(slow_unit)
    key = spec_key(SlowSpec(5, str(markers), 1.0))
    assert [p.name for p in unit_dir.iterdir()] == [f"{key}.json"]  # no temporary file left
    out, stats = run_units(slow_unit, [SlowSpec(5, str(markers), 1.0)])
    assert stats.hits == 1 and out[0].to_dict("list") == res[0]["frame"]


def test_a_second_write_replaces_the_entry_and_a_bad_one(cache):
    rc = ResultsCache()
    text, fp, name = spec_json(Spec(i=1)), code_fingerprint(), unit_name(frame_unit)
    payload = frame_unit(Spec(i=1), fp)
    assert rc.store(name, text, fp, payload) == ""
    final = entry(cache, frame_unit, Spec(i=1))
    assert rc.store(name, text, fp, payload) == ""  # e.g. two processes computed the same spec
    assert rc.load(name, text, fp).status == "hit"
    final.write_bytes(b"junk")  # a bad entry is replaced
    assert rc.store(name, text, fp, payload) == ""
    assert rc.load(name, text, fp).status == "hit"
    final.unlink()
    final.mkdir()  # a directory in its place (not an entry of ours) too
    (final / "x").write_text("x")
    assert rc.store(name, text, fp, payload) == "" and final.is_file()
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_clear_cache_forgets_everything(cache):
    run_units(frame_unit, [Spec(i=1), Spec(i=2)])
    assert len(ResultsCache().entries()) == 2
    clear_cache()
    assert ResultsCache().entries() == []
    _, stats = run_units(frame_unit, [Spec(i=1), Spec(i=2)])
    assert stats.computed == 2 and len(CALLS) == 4


def test_code_fingerprint_is_version_plus_source_hash():
    from fa_study import __version__

    fp = code_fingerprint()
    version, digest = fp.rsplit("+", 1)
    assert version == __version__ and len(digest) == 12 and int(digest, 16) >= 0
    from fa_study.experiments import core

    assert core.code_fingerprint is code_fingerprint and core.run_units is run_units


def test_one_cpu_thread_restores_the_setting():
    import torch

    from fa_study.cache import one_cpu_thread

    before = torch.get_num_threads()
    with one_cpu_thread("cpu"):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_a_worker_serves_a_unit_written_meanwhile_and_leaves_other_code_to_the_caller(cache):
    fp, text, name = code_fingerprint(), spec_json(Spec(i=5)), unit_name(frame_unit)
    first = compute_unit(frame_unit, Spec(i=5), fp, str(cache), name, text)
    assert first[0] == text and first[2] == "stored" and len(CALLS) == 1
    again = compute_unit(frame_unit, Spec(i=5), fp, str(cache), name, text)  # e.g. a dask retry
    assert again[2] == "hit" and len(CALLS) == 1
    pd.testing.assert_frame_equal(first[1], again[1])
    # a worker running other code (e.g. the package edited since the caller imported it)
    # computes nothing: the caller computes the unit with the code its key names
    assert compute_unit(frame_unit, Spec(i=5), "0.0.0+otherc0de", str(cache), name, text) == (
        text, None, "other code", "")
    assert len(CALLS) == 1


# ------------------------------------------------------------------------------ links, pipes, sizes

SENTINEL = -999  # the frame a link would serve: never seen in a result


def _stash_entry(root: Path, spec) -> Path:
    """A valid entry of ``frame_unit(spec)`` under ``root`` (another cache), whose frame says
    ``i == SENTINEL``: what a link to it would serve."""
    sentinel = pd.DataFrame({"i": [SENTINEL], "v": [spec.lr]})
    rc = ResultsCache(root, quiet=True)
    assert rc.store(unit_name(frame_unit), spec_json(spec), code_fingerprint(), sentinel) == ""
    return entry(root, frame_unit, spec)


class Watched:
    """A tree the cache must neither read, list, write nor remove anything in: its content is
    remembered, and every access time set far in the past (with relatime or strictatime, any
    read or listing moves it; mtimes move with any write)."""

    def __init__(self, root: Path):
        self.root = root
        self.paths = [root, *sorted(root.rglob("*"))]
        self.before = self._content()
        self._arm()
        self.inodes = {(os.lstat(p).st_dev, os.lstat(p).st_ino) for p in self.paths}

    def _arm(self):
        for p in self.paths:
            if not p.is_symlink():
                os.utime(p, (1000, 2000), follow_symlinks=False)

    def _content(self):
        return {str(p.relative_to(self.root)): p.read_bytes() if p.is_file() else "dir"
                for p in sorted(self.root.rglob("*"))}

    def assert_untouched(self, io=None):
        times = {str(p): (os.lstat(p).st_atime, os.lstat(p).st_mtime) for p in self.paths
                 if not p.is_symlink()}
        assert all(t == (1000, 2000) for t in times.values()), times  # before reading it here
        assert self._content() == self.before
        if io is not None:
            assert not ({k[:2] for k in io.opened} & self.inodes)  # never opened
        self._arm()  # reading it here moved the access times


@pytest.fixture
def io_spy(monkeypatch):
    """Every file the code opens with ``os.open``, and the bytes asked for (at most, in one
    call) and read from each with ``os.read``; files by (device, inode, ctime), since a deleted
    file's inode is soon reused."""
    import types

    spy = types.SimpleNamespace(opened=set(), asked={}, read={})

    def key(st):
        return st.st_dev, st.st_ino, st.st_ctime_ns
    real_open, real_read = os.open, os.read

    def spy_open(path, flags, mode=0o777, *, dir_fd=None):
        fd = real_open(path, flags, mode, dir_fd=dir_fd)
        spy.opened.add(key(os.fstat(fd)))
        return fd

    def spy_read(fd, n):
        data = real_read(fd, n)
        k = key(os.fstat(fd))
        spy.asked[k] = max(spy.asked.get(k, 0), n)
        spy.read[k] = spy.read.get(k, 0) + len(data)
        return data

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "read", spy_read)
    return spy


def _inode(p: Path):
    st = os.lstat(p)
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _link_entry(cache, stash):
    p = entry(cache, frame_unit, Spec(i=3))
    p.unlink()
    p.symlink_to(entry(stash, frame_unit, Spec(i=3)))
    return 1, f"cache entry results/{unit_name(frame_unit)}/{p.name} is a symbolic link"


def _link_unit(cache, stash):  # Spec(i=4) is not behind the link: it would be written there
    u = cache / "results" / unit_name(frame_unit)
    shutil.rmtree(u)
    u.symlink_to(stash / "results" / unit_name(frame_unit), target_is_directory=True)
    return 2, f"cache unit directory results/{unit_name(frame_unit)} is a symbolic link"


def _link_results(cache, stash):
    r = cache / "results"
    shutil.rmtree(r)
    r.symlink_to(stash / "results", target_is_directory=True)
    return 2, "cache directory results/ is a symbolic link"


def _link_dangling(cache, stash):
    p = entry(cache, frame_unit, Spec(i=3))
    p.unlink()
    p.symlink_to(stash / "nothing-here")
    return 1, f"cache entry results/{unit_name(frame_unit)}/{p.name} is a symbolic link"


@pytest.mark.parametrize("where", ["outside", "inside"])
@pytest.mark.parametrize("plant", [_link_entry, _link_unit, _link_results, _link_dangling],
                         ids=lambda f: f.__name__[6:])
def test_a_link_in_the_cache_is_a_fault_never_followed(cache, tmp_path, io_spy, where, plant):
    run_units(frame_unit, [Spec(i=3), Spec(i=4)])
    stash = tmp_path / "outside" if where == "outside" else cache / "stash"
    _stash_entry(stash, Spec(i=3))
    # a leftover of a killed writer behind the link: not to be removed through it
    (stash / "results" / unit_name(frame_unit) / ".tmp-leftover").mkdir()
    faults, fault = plant(cache, stash)
    watch = Watched(stash)
    io_spy.opened.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # faults are notes, never console output
        out, stats = run_units(frame_unit, [Spec(i=3), Spec(i=4)])
    watch.assert_untouched(io_spy)  # nothing read, listed, written or removed through the link
    assert [int(o["i"].iloc[0]) for o in out] == [3, 4]  # the stash's SENTINEL is not served
    assert (stats.hits, stats.computed, stats.recomputed) == (2 - faults, 0, faults)
    assert len(stats.notes) == faults
    for i, note in zip((3, 4), stats.notes):
        assert note == f"unit Spec(i={i}): {fault}, recomputed"
    for spec in (Spec(i=3), Spec(i=4)):  # replaced by real directories of real files
        p = entry(cache, frame_unit, spec)
        for q in (cache / "results", p.parent, p):
            assert not q.is_symlink() and q.exists(), q
    _, again = run_units(frame_unit, [Spec(i=3), Spec(i=4)])
    assert again.hits == 2 and not again.notes and len(CALLS) == 2 + faults
    watch.assert_untouched(io_spy)


def test_a_unit_directory_linked_outside_gets_nothing_written_there(cache, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    old = outside / ".tmp-0123-killed-writer"  # a stale leftover, as the cache would remove it
    old.mkdir()
    os.utime(old, (1000, 2000))
    (cache / "results").mkdir(parents=True)
    unit_dir = cache / "results" / unit_name(frame_unit)
    unit_dir.symlink_to(outside, target_is_directory=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, stats = run_units(frame_unit, [Spec(i=1)])
    assert [p.name for p in outside.iterdir()] == [old.name]  # nothing written nor removed there
    assert stats.recomputed == 1 and "unit directory" in stats.notes[0]
    assert "symbolic link" in stats.notes[0] and int(out[0]["i"].iloc[0]) == 1
    assert not unit_dir.is_symlink()
    assert [p.name for p in unit_dir.iterdir()] == [f"{spec_key(Spec(i=1))}.json"]
    # a link in place of results/ itself: clear_cache() removes the link, not what it points at
    shutil.rmtree(cache / "results")
    (cache / "results").symlink_to(outside, target_is_directory=True)
    (outside / "some.unit" / "0123abcd").mkdir(parents=True)  # what would pass for an entry
    assert ResultsCache().entries() == []  # not listed through the link
    clear_cache()
    assert not (cache / "results").exists() and (outside / "some.unit" / "0123abcd").is_dir()
    assert sorted(p.name for p in outside.iterdir()) == [old.name, "some.unit"]


def test_nothing_is_written_where_the_root_no_longer_resolves(tmp_path):
    root = tmp_path / "cache"
    rc = ResultsCache(root, quiet=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    root.rename(tmp_path / "moved")  # the root swapped for a link after the cache was opened
    root.symlink_to(outside, target_is_directory=True)
    text, fp = spec_json(Spec(i=1)), code_fingerprint()
    note = rc.store(unit_name(frame_unit), text, fp, frame_unit(Spec(i=1), fp))
    assert note.startswith("result kept in memory only") and "outside the cache root" in note
    assert list(outside.iterdir()) == []
    assert rc.load(unit_name(frame_unit), text, fp).status == "hit"  # kept in memory


def _unix_socket(path: Path):
    import socket

    here = os.getcwd()
    os.chdir(path.parent)  # a socket's path may hold ~100 characters: bind a relative name
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(path.name)
    finally:
        os.chdir(here)
    return sock


@pytest.mark.parametrize("kind", ["named pipe", "socket", "character device", "directory"])
def test_only_regular_files_are_read_from_the_cache(cache, io_spy, kind):
    run_units(frame_unit, [Spec(i=3), Spec(i=4)])
    p = entry(cache, frame_unit, Spec(i=3))
    p.unlink()
    sock = None
    if kind == "named pipe":
        os.mkfifo(p)
    elif kind == "socket":
        sock = _unix_socket(p)
    elif kind == "character device":  # /dev/null's numbers (not /dev/zero's: a regression
        try:                             # would then fail, not exhaust the memory)
            os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except OSError as exc:
            pytest.skip(f"cannot make a device node here ({exc})")
    else:
        p.mkdir()
    inode = _inode(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out, stats = within(60, lambda: run_units(frame_unit, [Spec(i=3), Spec(i=4)]),
                                 p if kind == "named pipe" else None)
    finally:
        if sock is not None:
            sock.close()
    assert (stats.hits, stats.computed, stats.recomputed) == (1, 0, 1)
    assert stats.notes == [f"unit Spec(i=3): cache entry results/{unit_name(frame_unit)}/{p.name} "
                           f"is a {kind}, recomputed"]
    if kind != "directory":  # (removing the replaced directory opens it to empty it)
        assert inode not in io_spy.opened  # never opened, let alone read
    assert [int(o["i"].iloc[0]) for o in out] == [3, 4]
    assert p.is_file() and not p.is_symlink()  # the entry was replaced
    assert run_units(frame_unit, [Spec(i=3), Spec(i=4)])[1].hits == 2


def test_an_oversized_entry_is_refused_before_it_is_read(cache, io_spy):
    run_units(frame_unit, [Spec(i=3), Spec(i=4)])
    big = entry(cache, frame_unit, Spec(i=3))
    with open(big, "r+b") as f:  # 3 GiB, sparse: costs no disk
        f.truncate(3 * 2**30)
    inode = _inode(big)
    out, stats = run_units(frame_unit, [Spec(i=3), Spec(i=4)])
    assert (stats.hits, stats.recomputed) == (1, 1) and len(stats.notes) == 1
    assert stats.notes[0].startswith(f"unit Spec(i=3): cache entry results/{unit_name(frame_unit)}/"
                                      f"{big.name} is larger (3,221,225,472 bytes) than a cache entry may be")
    assert io_spy.asked.get(inode, 0) == 0  # never read
    assert [int(o["i"].iloc[0]) for o in out] == [3, 4] and big.stat().st_size < 2**20


def test_a_hit_reads_the_entry_once_and_no_more(cache, io_spy):
    run_units(frame_unit, [Spec(i=3)])
    p = entry(cache, frame_unit, Spec(i=3))
    io_spy.asked.clear()
    io_spy.read.clear()
    out, stats = run_units(frame_unit, [Spec(i=3)])
    assert stats.hits == 1 and int(out[0]["i"].iloc[0]) == 3
    assert io_spy.read[_inode(p)] == p.stat().st_size
    assert io_spy.asked[_inode(p)] == p.stat().st_size + 1  # one byte more, to see the end


def test_the_size_limit_is_checked_when_reading_and_writing(cache, monkeypatch):
    run_units(frame_unit, [Spec(i=3)])
    p = entry(cache, frame_unit, Spec(i=3))
    monkeypatch.setattr(fc, "PAYLOAD_MAX_BYTES", p.stat().st_size)  # exactly the limit: served
    assert run_units(frame_unit, [Spec(i=3)])[1].hits == 1
    body = header_and_body(p)[0]["bytes"]
    monkeypatch.setattr(fc, "PAYLOAD_MAX_BYTES", body - 1)  # over: refused, and not stored
    out, stats = run_units(frame_unit, [Spec(i=3)])
    assert stats.recomputed == 1 and "larger" in stats.notes[0]
    assert "result not cached" in stats.notes[1] and int(out[0]["i"].iloc[0]) == 3


@pytest.mark.parametrize("swap", ["named pipe", "symbolic link"])
def test_an_entry_swapped_between_the_check_and_the_open_is_still_refused(
        cache, tmp_path, monkeypatch, swap):
    """The second line of defence: an entry replaced by a pipe or a link after it was checked
    (lstat) and before it is opened is refused by the open itself (O_NONBLOCK, O_NOFOLLOW) and
    its fstat."""
    run_units(frame_unit, [Spec(i=3)])
    p = entry(cache, frame_unit, Spec(i=3))
    outside = tmp_path / "outside"
    s = _stash_entry(outside, Spec(i=3))
    watch = Watched(outside)
    swapped = []
    real_lstat = os.lstat

    def racing_lstat(path, *a, **k):  # swaps the entry right after its check
        st = real_lstat(path, *a, **k)
        if Path(path) == p and not swapped:
            p.unlink()
            os.mkfifo(p) if swap == "named pipe" else p.symlink_to(s)
            swapped.append(p)
        return st

    monkeypatch.setattr(os, "lstat", racing_lstat)
    out, stats = within(60, lambda: run_units(frame_unit, [Spec(i=3)]), p if swap == "named pipe" else None)
    monkeypatch.undo()
    assert swapped  # the race happened
    assert stats.recomputed == 1 and int(out[0]["i"].iloc[0]) == 3
    assert stats.notes == [f"unit Spec(i=3): cache entry results/{unit_name(frame_unit)}/{p.name} is a "
                           f"{swap}, recomputed"]
    watch.assert_untouched()


def test_files_are_created_never_written_through_a_link(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        fc._write_new(link, b"overwritten")
    assert target.read_bytes() == b"keep"
    fc._write_new(tmp_path / "new", b"data")
    assert (tmp_path / "new").read_bytes() == b"data"


def test_an_entry_that_grows_after_its_size_was_checked_is_refused(cache, monkeypatch):
    run_units(frame_unit, [Spec(i=3)])
    p = entry(cache, frame_unit, Spec(i=3))
    monkeypatch.setattr(fc, "PAYLOAD_MAX_BYTES", p.stat().st_size)
    real, grown = fc._read_fd, []

    def growing(fd, limit):  # between the fstat and the read: one byte too long
        if not grown:
            with open(p, "ab") as f:
                f.write(b" ")
            grown.append(p)
        return real(fd, limit)

    monkeypatch.setattr(fc, "_read_fd", growing)
    out, stats = run_units(frame_unit, [Spec(i=3)])
    assert grown and int(out[0]["i"].iloc[0]) == 3
    assert stats.recomputed == 1 and "is larger" in stats.notes[0]
