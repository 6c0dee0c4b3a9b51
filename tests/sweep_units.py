"""A slow, observable unit of work for the sweep-resumption test (importable by a subprocess)."""
import os
import time
from pathlib import Path

import pandas as pd


def slow_unit(cfg: dict, fingerprint: str, callback=None) -> pd.DataFrame:
    """Leaves one marker file per execution, then takes ``cfg['delay']`` seconds."""
    Path(cfg["markers"], f"unit{cfg['i']}-{os.getpid()}-{time.time_ns()}").touch()
    time.sleep(cfg["delay"])
    return pd.DataFrame({"i": [cfg["i"]], "value": [cfg["i"] ** 2]})


def sweep(markers: str, n: int, delay: float) -> pd.DataFrame:
    from fa_study.experiments import run_units

    configs = [{"i": i, "markers": markers, "delay": delay} for i in range(n)]
    frames, hits = run_units(slow_unit, configs)
    out = pd.concat(frames, ignore_index=True)
    out.attrs["hits"] = hits
    return out

