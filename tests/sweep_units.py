"""Observable units of work for the sweep tests, importable by subprocesses and dask workers.

Every execution leaves marker files in ``spec.markers``: ``unit<i>-<pid>-<ns>`` when it starts
and ``done<i>-<pid>-<ns>`` when it has its result, so a test can count how often each unit ran
and which process ran it.
"""
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


def _mark(markers: str, what: str, i: int) -> None:
    Path(markers, f"{what}{i}-{os.getpid()}-{time.time_ns()}").touch()


@dataclass(frozen=True)
class SlowSpec:
    i: int
    markers: str
    delay: float


def slow_unit(spec: SlowSpec, fingerprint: str, callback=None) -> pd.DataFrame:
    """Leaves one marker file per execution, then takes ``spec.delay`` seconds."""
    _mark(spec.markers, "unit", spec.i)
    time.sleep(spec.delay)
    return pd.DataFrame({"i": [spec.i], "value": [spec.i ** 2]})


def sweep(markers: str, n: int, delay: float) -> pd.DataFrame:
    from fa_study.experiments import run_units

    specs = [SlowSpec(i, markers, delay) for i in range(n)]
    frames, stats = run_units(slow_unit, specs)
    out = pd.concat(frames, ignore_index=True)
    out.attrs["hits"] = stats.hits
    return out


@dataclass(frozen=True)
class TrainSpec:
    """A tiny deterministic training run: an MLP on a fixed random regression task."""

    i: int  # the unit's index; also its seed
    markers: str  # where the execution markers go
    steps: int = 300  # full-batch Adam steps (about a second on one CPU thread)
    width: int = 64
    n: int = 256
    lr: float = 1e-2


def train_unit(spec: TrainSpec, fingerprint: str, callback=None) -> dict:
    """Train and return the loss curve (a frame), the final parameters' sum and a summary."""
    import torch

    _mark(spec.markers, "unit", spec.i)
    g = torch.Generator().manual_seed(1000 + spec.i)
    x = torch.randn(spec.n, 16, generator=g)
    y = torch.sin(x @ torch.randn(16, 1, generator=g))
    torch.manual_seed(spec.i)
    net = torch.nn.Sequential(torch.nn.Linear(16, spec.width), torch.nn.Tanh(),
                              torch.nn.Linear(spec.width, spec.width), torch.nn.Tanh(),
                              torch.nn.Linear(spec.width, 1))
    opt = torch.optim.Adam(net.parameters(), lr=spec.lr)
    losses = []
    for _ in range(spec.steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    curve = pd.DataFrame({"step": range(spec.steps), "loss": losses})
    curve["unit"] = spec.i
    param_sum = float(sum(p.detach().double().sum() for p in net.parameters()))
    _mark(spec.markers, "done", spec.i)
    return {"curve": curve, "param_sum": param_sum, "final_loss": losses[-1]}


def study_sweep(n: int = 6):
    """A study of ``n`` small runs (BP on the explicit-matrix MLP, one per seed, a second or two
    each on one CPU thread), the same in every process that builds it."""
    from fa_study.experiments import RAStudy

    return RAStudy.for_profile("quick", rules=("bp",), seeds=tuple(range(n)), epochs=2, n_train=2000,
                               n_test=500, hidden=64)


@dataclass(frozen=True)
class TorchSpec:
    i: int
    markers: str


def torch_unit(spec: TorchSpec, fingerprint: str, callback=None) -> dict:
    """A small torch fit (least squares by gradient descent, 64 x 16 weights) whose float64
    losses and weights show any difference in arithmetic bit for bit; one marker per run."""
    import torch

    _mark(spec.markers, "unit", spec.i)
    g = torch.Generator().manual_seed(spec.i)
    x, y = torch.randn(512, 64, generator=g), torch.randn(512, 16, generator=g)
    w = torch.zeros(64, 16, requires_grad=True)
    losses = []
    for _ in range(40):
        loss = ((torch.tanh(x @ w) - y) ** 2).mean()
        loss.backward()
        with torch.no_grad():
            w -= 0.1 * w.grad
        w.grad = None
        losses.append(float(loss.detach()))
    return {"history": pd.DataFrame({"epoch": range(len(losses)), "train_loss": losses}),
            "w": w.detach().double().flatten().tolist(), "threads": torch.get_num_threads()}
