"""The run spec (fa_study.runs): validation when built, keys, labels, execute, collect, Results."""
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from fa_study import runs
from fa_study.cache import spec_json, spec_key
from fa_study.runs import DataSpec, ModelSpec, ReadSpec, Results, RunSpec, collect, execute
from fa_study.train import TrainConfig

# a tiny run: 1 epoch of 64 synthetic-CIFAR images on a d=8, L=1 ResidualMLP
TINY_MODEL = ModelSpec("resmlp", 8, 1)
TINY_DATA = DataSpec("cifar10", 64, 32)
TINY_TRAIN = TrainConfig(epochs=1, batch_size=32, eval_batch=32)


def tiny(rule="dfa", seed=0, **kw):
    base = dict(rule=rule, model=TINY_MODEL, data=TINY_DATA, train=TINY_TRAIN, seed=seed)
    base.update(kw)
    return RunSpec(**base)


# ---------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kw, message", [
    (dict(rule="backprop"), "unknown rule 'backprop'"),
    (dict(rule="dfa", options={"lam": 0.1}), "rule 'dfa' has no option 'lam'; allowed options: 'penalty'"),
    (dict(rule="dfa", options={"penalty": -1.0}), "penalty"),
    (dict(rule="layer_fa", options={"init": "uniform"}), "gaussian"),
    (dict(rule="ra_fa", model=ModelSpec("resmlp")),
     "rule 'ra_fa' cannot train a 'resmlp' model; it supports: 'matrix_mlp'"),
    (dict(rule="layer_dfa_block", model=ModelSpec("resnet")), "cannot train a 'resnet' model"),
    (dict(rule="bp", read=ReadSpec(null_draws=5)), "rule 'bp' has no random feedback"),
    (dict(rule="sign_sym", model=ModelSpec("mlp"), read=ReadSpec(null_draws=5)), "null_draws must be 0"),
    (dict(model="resmlp"), "RunSpec.model must be a ModelSpec"),
    (dict(train=dict(epochs=1)), "RunSpec.train must be a TrainConfig"),
    (dict(seed=1.5), "seed"),
    # kolen_pollack's decay of B is W's own under SGD: lr * wd / (1 - momentum) = 1.25 >= 1
    (dict(rule="kolen_pollack", model=ModelSpec("mlp", 8, 0), data=DataSpec("mnist", 64, 32),
          train=TrainConfig(epochs=1, optimizer="sgd", lr=0.05, momentum=0.98, weight_decay=0.5)),
     "kolen_pollack's derived decay of B is 1.25"),
])
def test_run_spec_is_validated_when_built(kw, message):
    with pytest.raises(ValueError, match=message):
        RunSpec(**kw)


@pytest.mark.parametrize("build, message", [
    (lambda: ModelSpec("resmlp_d1024"), "resmlp_d512_L2"),
    (lambda: ModelSpec("resmlp", d=0), "d"),
    (lambda: ModelSpec("resmlp", num_blocks=-1), "num_blocks"),
    (lambda: DataSpec("svhn"), "cifar100"),
    (lambda: DataSpec("cifar10", n_train=0), "n_train"),
    (lambda: ReadSpec(null_draws=1), "null_draws must be 0"),
    (lambda: ReadSpec(probe_every=-1), "probe_every"),
    (lambda: ReadSpec(audit="yes"), "audit"),
])
def test_parts_of_a_spec_are_validated_when_built(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_model_spec_resolves_named_variants_and_reference_sizes():
    v = ModelSpec("resmlp_d512_L2")
    assert (v.arch, v.d, v.num_blocks, v.name) == ("resmlp", 512, 2, "resmlp_d512_L2")
    assert ModelSpec("resmlp_d512_L2", d=64, num_blocks=4) == v  # the variant fixes d and L
    assert ModelSpec("resmlp", 512, 2) == v  # the same model, whatever it was called
    plain = ModelSpec("resmlp")
    assert (plain.arch, plain.d, plain.num_blocks, plain.name) == ("resmlp", 256, 4, "resmlp")
    assert (ModelSpec("vit").d, ModelSpec("mlp").num_blocks) == (128, 1)
    assert ModelSpec("mlp", options={"activation": "tanh"}).options == (("activation", "tanh"),)


def test_shallow_builds_its_model_without_blocks():
    s = RunSpec(rule="shallow", model=ModelSpec("resmlp", 64, 4))
    assert s.model.num_blocks == 0 and s.model.d == 64
    model = s.model.build((3, 32, 32), 10)
    assert model.num_blocks == 0


def test_train_seed_follows_the_run_seed():
    s = RunSpec(seed=7, train=TrainConfig(seed=0, epochs=3))
    assert s.train.seed == 7 and s.train.epochs == 3
    assert RunSpec(seed=7) == RunSpec(seed=7, train=TrainConfig(seed=123))


def test_options_equal_to_the_default_are_left_out_of_the_key():
    plain = RunSpec(rule="dfa")
    for same in (RunSpec(rule="dfa", options={"penalty": 0.0}),
                 RunSpec(rule="dfa", options=(("penalty", 0),))):
        assert same == plain and same.options == ()
        assert spec_json(same) == spec_json(plain) and spec_key(same) == spec_key(plain)
    lam = RunSpec(rule="dfa", options={"penalty": 0.01})
    assert lam.options == (("penalty", 0.01),) and spec_key(lam) != spec_key(plain)
    # a dict and sorted pairs are the same options
    a = RunSpec(rule="stiefel_dfa", options={"tau": 0.5, "eta_B": 0.2})
    b = RunSpec(rule="stiefel_dfa", options=(("eta_B", 0.2), ("tau", 0.5)))
    assert a == b and a.options == (("eta_B", 0.2), ("tau", 0.5))
    assert hash(a) == hash(b)  # frozen: usable as a dict key


def test_label_is_derived_from_the_rule_class():
    assert RunSpec(rule="dfa").label == "dfa"
    assert RunSpec(rule="dfa", options={"penalty": 0.01}).label == "dfa λ=0.01"
    assert RunSpec(rule="fa", options={"penalty": 1e-4}).label == "fa λ=0.0001"
    mlp = ModelSpec("mlp")
    assert RunSpec(rule="layer_fa", model=mlp, options={"init": "sparse"}).label == "layer_fa init=sparse"
    assert RunSpec(rule="layer_fa", model=mlp, options={"init": "gaussian"}).label == "layer_fa"
    assert RunSpec(rule="layer_dfa", model=mlp, options={"gated": False}).label == "layer_dfa gated=False"
    assert RunSpec(rule="stiefel_dfa", options={"eta_B": 0.3}).label == "stiefel_dfa"  # not a label option


def test_baseline_key_is_model_data_and_training_without_the_seed():
    a, b = tiny("dfa", seed=0), tiny("frozen", seed=5)
    assert a.baseline_key() == b.baseline_key()
    assert tiny("dfa", options={"penalty": 0.5}).baseline_key() == a.baseline_key()
    assert tiny("dfa", model=ModelSpec("resmlp", 16, 1)).baseline_key() != a.baseline_key()
    assert tiny("dfa", data=DataSpec("cifar100", 64, 32)).baseline_key() != a.baseline_key()
    other_lr = tiny("dfa", train=dataclasses.replace(TINY_TRAIN, lr=0.01))
    assert other_lr.baseline_key() != a.baseline_key()


# ---------------------------------------------------------------------------- execute

def test_execute_returns_a_data_payload_for_one_run():
    seen = []
    p = execute(tiny("dfa", seed=3, read=ReadSpec(null_draws=2)), "fp", callback=seen.append)
    assert set(p) == {"history", "probes", "run", "layers", "null", "report"}
    run = p["run"].iloc[0]
    assert (run["status"], run["arm"], run["rule"], run["seed"], run["model"], run["code"]) == \
        ("ok", "dfa", "dfa", 3, "resmlp", "fp")
    assert run["data_source"] == "synthetic" and run["error"] == ""
    assert list(p["history"]["epoch"]) == [0, 1] and set(p["history"]["arm"]) == {"dfa"}
    assert (p["history"]["seed"] == 3).all() and (p["history"]["lr"] == TINY_TRAIN.lr).all()
    # the audit's raw values are the report's; D3 is left to collect()
    rep = p["report"]
    assert rep["frozen_acc"] is None and rep["d3"] is None
    assert run["max_growth"] == rep["max_growth"] and run["g_L"] == rep["g_L"]
    assert sorted(p["layers"]["layer"]) == [0, 1] and set(p["layers"]["arm"]) == {"dfa"}
    assert len(p["null"]) == 1 and {"training_deep_cos", "fresh_deep_mean", "z_score"} <= set(p["null"])
    assert p["probes"].empty
    # the live callback gets the trainer's records, tagged with the arm (every 20 steps: none here)
    assert seen == []


def test_execute_relays_live_records_and_reads_probes():
    seen = []
    spec = RunSpec(rule="layer_fa", model=ModelSpec("mlp", 8, 0), data=DataSpec("mnist", 640, 64),
                   train=TrainConfig(epochs=1, batch_size=32, optimizer="sgd", schedule="constant",
                                     log_every=5),
                   seed=1, read=ReadSpec(audit=False, direction=False, probe_every=5, probe_size=32))
    p = execute(spec, "", callback=seen.append)
    assert p["run"].iloc[0]["status"] == "ok" and p["report"] is None and p["layers"].empty
    assert [r["step"] for r in seen] == [20] and seen[0]["arm"] == "layer_fa"
    assert seen[0]["loss"] == seen[0]["train_loss"]
    probes = p["probes"]
    assert list(probes["step"]) == [0, 5, 10, 15, 20]
    assert {"test_acc", "cos_0", "angle_0", "ratio_0", "cos_1", "arm", "seed"} <= set(probes)
    assert probes["cos_1"].sub(1.0).abs().max() < 1e-5  # the output layer's update is BP's


def test_execute_records_a_run_that_raises_as_an_error(monkeypatch):
    # what a spec can know is refused when it is built (test_bad_inputs); a rule that fails while
    # it trains is recorded, and the sweep goes on
    from fa_study.rules import DFA

    def broken(self, model, ctx):
        raise RuntimeError("feedback exploded")

    monkeypatch.setattr(DFA, "signals", broken)
    spec = tiny("dfa", read=ReadSpec(audit=False, direction=False))
    p = execute(spec, "fp")
    run = p["run"].iloc[0]
    assert run["status"] == "error" and math.isnan(run["test_acc"])
    assert run["error"] == "RuntimeError: feedback exploded"
    assert "Traceback" in run["traceback"]
    assert p["report"] is None and p["history"].empty and p["probes"].empty
    assert all(math.isnan(run[c]) for c in runs.INIT_RATIO_COLUMNS)  # not audited: NaN


def test_a_reading_that_raises_marks_the_run_and_keeps_its_history(monkeypatch):
    # the run trained; reading it failed: status "error" naming the reading, the history kept
    import fa_study.diagnostics as diagnostics

    def broken(*args, **kwargs):
        raise RuntimeError("reading exploded")

    monkeypatch.setattr(diagnostics, "direction_quality", broken)
    spec = tiny("dfa", read=ReadSpec(audit=True, direction=True))
    p = execute(spec, "fp")
    run = p["run"].iloc[0]
    assert run["status"] == "error"
    assert run["error"] == "reading the trained network: RuntimeError: reading exploded"
    assert not p["history"].empty and p["history"]["status"].iloc[-1] == "ok"
    assert math.isfinite(run["test_acc"]) and math.isfinite(run["max_growth"])  # the audit before it


# ---------------------------------------------------------------------------- growth since init

def _capture_training(monkeypatch, after=None) -> dict:
    """Patch the trainer execute() calls: keep a copy of the model it is handed (the network at
    initialisation) and the trained model; ``after(model)`` runs on the trained model."""
    import copy

    from fa_study import train as train_module

    real, seen = train_module.train, {}

    def train(model, rule, *args, **kw):
        seen["init"] = copy.deepcopy(model)
        out = real(model, rule, *args, **kw)
        if after is not None:
            with torch.no_grad():
                after(model)
        seen["model"] = model
        return out

    monkeypatch.setattr(train_module, "train", train)
    return seen


def test_growth_since_init_columns_are_the_audit_of_the_model_over_its_initial_copy(monkeypatch):
    from fa_study.diagnostics import PROTOCOL_EVAL, audit

    seen = _capture_training(monkeypatch)
    spec = tiny("dfa", seed=4, model=ModelSpec("resmlp", 8, 2))
    p = execute(spec)
    run, rep = p["run"].iloc[0], p["report"]
    assert run["status"] == "ok"
    _, test_ds = spec.data.load()
    n = min(PROTOCOL_EVAL, len(test_ds))
    x, y = test_ds.x[:n], test_ds.y[:n]
    trained = audit(seen["model"], x, y).hidden_norms
    initial = audit(seen["init"], x, y).hidden_norms
    by_hand = [a / b for a, b in zip(trained, initial)]
    assert len(by_hand) == 3 and rep["init_ratio"] == pytest.approx(by_hand, rel=1e-9)
    assert run["h0_init_ratio"] == pytest.approx(by_hand[0], rel=1e-9)
    assert run["hL_init_ratio"] == pytest.approx(by_hand[-1], rel=1e-9)
    assert run["max_init_ratio"] == pytest.approx(max(by_hand), rel=1e-9)
    assert not np.allclose(by_hand, 1.0, rtol=1e-4)  # training moved the states
    # the copy execute() keeps is the network before training: its norms are the trainer's
    # epoch-0 row (the same eval batch here: TINY_TRAIN.eval_batch == n_test)
    epoch0 = p["history"].query("epoch == 0").iloc[0]
    assert initial == pytest.approx([epoch0[f"h_norm_{l}"] for l in range(3)], rel=1e-6)
    # D1 is still the reference's block-to-block statistic
    growth = [b / a for a, b in zip(trained, trained[1:])]
    assert run["max_growth"] == pytest.approx(max(growth), rel=1e-9)


def test_a_run_whose_embedding_is_scaled_up_shows_it_at_h0_while_d1_stays_quiet(monkeypatch):
    def scale_embedding(model):
        model.embed_linear.weight.mul_(1000.0)
        model.embed_linear.bias.mul_(1000.0)

    _capture_training(monkeypatch, after=scale_embedding)
    p = execute(tiny("bp", seed=1, model=ModelSpec("resmlp", 8, 2)))
    run, rep = p["run"].iloc[0], p["report"]
    assert run["status"] == "ok"
    # the whole stream is ~1000x larger than at init, from h_0 on ...
    assert run["h0_init_ratio"] > 300 and run["hL_init_ratio"] > 300
    assert run["max_init_ratio"] >= run["h0_init_ratio"] * 0.5
    assert rep["init_ratio"][0] == pytest.approx(run["h0_init_ratio"])
    # ... but no block grows it: the pre-LN blocks add a branch whose scale ignores h's, so
    # every block-to-block ratio stays near 1 and D1 stays quiet
    assert run["max_growth"] < 2.0 and not run["d1"] and not rep["d1"]
    from fa_study.diagnostics import report_from_dict

    text = str(report_from_dict(rep))
    assert "D1 scale stability" in text and "-> quiet" in text
    assert "Beyond the reference (not in the verdict)" in text


# ---------------------------------------------------------------------------- collect

def _report(acc: float) -> dict:
    from fa_study.models import build_model
    from fa_study.diagnostics import audit

    torch.manual_seed(0)
    model = build_model("resmlp", d=8, num_blocks=1, input_shape=(3, 4, 4))
    return audit(model, torch.randn(16, 3, 4, 4), torch.arange(16) % 10, test_acc=acc).to_dict()


def _payload(spec: RunSpec, status: str, acc: float) -> dict:
    run = {"arm": spec.label, "rule": spec.rule, "seed": spec.seed, "model": spec.model.name,
           "status": status, "test_acc": acc if status == "ok" else math.nan,
           "error": "boom" if status == "error" else "", "data_source": "synthetic"}
    history = pd.DataFrame({"epoch": [0, 1], "arm": spec.label, "seed": spec.seed,
                            "status": ["ok", status if status != "error" else "ok"]})
    return {"history": history if status != "error" else pd.DataFrame(), "probes": pd.DataFrame(),
            "run": pd.DataFrame([run]), "layers": pd.DataFrame(), "null": pd.DataFrame(),
            "report": _report(acc) if status == "ok" else None}


def test_collect_decides_d3_against_the_matching_frozen_run():
    wide = ModelSpec("resmlp_d512_L2")
    slow = dataclasses.replace(TINY_TRAIN, lr=1e-4)
    cases = [  # spec, status, accuracy
        (tiny("frozen", seed=0), "ok", 0.50),
        (tiny("frozen", seed=1), "ok", 0.70),  # the baseline: the mean over seeds, 0.60
        (tiny("bp", seed=0), "ok", 0.90),
        (tiny("dfa", seed=0), "ok", 0.61),  # +1 pp over frozen: D3 fires
        (tiny("dfa", seed=1), "diverged", math.nan),
        (tiny("fa", seed=0), "error", math.nan),
        (tiny("frozen", seed=0, model=wide), "ok", 0.20),  # another model's baseline
        (tiny("dfa", seed=0, model=wide), "ok", 0.30),
        (tiny("dfa", seed=2, train=slow), "ok", 0.10),  # no frozen run with these settings
    ]
    specs = [s for s, _, _ in cases]
    res = collect(specs, [_payload(*c) for c in cases])
    r = res.runs
    assert list(r["status"]) == [c[1] for c in cases] and res.units == len(cases)
    assert r["frozen_acc"].iloc[:6].tolist() == pytest.approx([0.6] * 6)
    assert r["frozen_acc"].iloc[6:8].tolist() == pytest.approx([0.2, 0.2])
    assert math.isnan(r["frozen_acc"].iloc[8])
    assert r["depth_margin_pp"].iloc[2:4].tolist() == pytest.approx([30.0, 1.0])
    assert list(r["d3"]) == [None, None, False, True, None, None, None, False, None]
    assert list(r["verdict"])[2:6] == ["PASS", "FAIL(D3)", "DIVERGED", "ERROR"]
    assert r["verdict"].iloc[8] == "PASS"  # no baseline: D1 and D2 only
    # the reports carry the same decision
    rep = res.report("dfa", 0, "resmlp")
    assert rep.d3 is True and rep.frozen_acc == pytest.approx(0.6) and rep.depth_margin == pytest.approx(0.01)
    assert res.report("dfa", 0, "resmlp_d512_L2").frozen_acc == pytest.approx(0.2)
    assert res.report("dfa", 2).d3 is None  # no matching baseline: D3 not evaluated
    assert res.report("frozen", 1, "resmlp").d3 is None  # a baseline is not judged
    with pytest.raises(ValueError, match=r"2 runs \(pass model=\)"):
        res.report("frozen", 0)
    with pytest.raises(ValueError, match="has no report \\(status 'diverged'\\)"):
        res.report("dfa", 1)
    with pytest.raises(ValueError, match="no run for arm='oracle'"):
        res.report("oracle", 0)
    assert len(res.ok()) == 7
    notes = res.notes()
    assert any("Diverged runs" in n and "dfa (seed 1)" in n for n in notes)
    assert any("Failed runs" in n and "fa (seed 0): boom" in n for n in notes)
    assert any("synthetic is a stand-in" in n for n in notes)
    assert len(res.history) == 2 * 8  # the failed run has no history


def test_collect_without_an_audit_reads_n_a():
    spec = tiny("dfa", read=ReadSpec(audit=False))
    p = _payload(spec, "ok", 0.4)
    p["report"] = None
    res = collect([spec], [p])
    assert res.runs["verdict"].tolist() == ["n/a"] and res.reports == [None]


def test_with_baseline_decides_d3_exactly_as_the_audit_would():
    from fa_study.models import build_model
    from fa_study.diagnostics import audit, report_from_dict, with_baseline

    torch.manual_seed(0)
    model = build_model("resmlp", d=8, num_blocks=2, input_shape=(3, 4, 4))
    x, y = torch.randn(16, 3, 4, 4), torch.arange(16) % 10
    for frozen in (0.05, 0.60):
        direct = audit(model, x, y, test_acc=0.3, frozen_acc=frozen)
        later = with_baseline(report_from_dict(audit(model, x, y, test_acc=0.3).to_dict()), frozen)
        assert later == direct


def test_run_specs_refuses_an_empty_list():
    with pytest.raises(ValueError, match="no runs to do"):
        runs.run_specs([])


def test_results_counts_units_and_cache_hits():
    from fa_study.units import CacheStats

    res = Results([tiny()], pd.DataFrame(), pd.DataFrame(), pd.DataFrame({"status": ["ok"]}),
                  pd.DataFrame(), pd.DataFrame(), [None], CacheStats(hits=1))
    assert res.units == 1 and res.from_cache == 1


# ---------------------------------------------------------------------------- determinism

def test_run_specs_is_bitwise_reproducible_in_one_process_and_across_workers(tmp_path, monkeypatch):
    """Holds: ``run_specs`` computes every unit under one intra-op thread (``one_cpu_thread``), in
    this process or in a joblib worker (``n_jobs=2``), from the spec's seed alone."""
    from fa_study.experiments import RAStudy
    from fa_study.runs import run_specs

    specs = RAStudy.for_profile("quick", rules=("bp", "ra_rev"), seeds=(5,), epochs=1,
                                n_train=300, n_test=200, hidden=32).specs()
    out = {}
    for name, jobs in (("first", 1), ("again", 1), ("workers", 2)):
        monkeypatch.setenv("FA_STUDY_CACHE", str(tmp_path / name))  # an empty cache: computed each time
        out[name] = run_specs(specs, n_jobs=jobs)
        assert out[name].from_cache == 0
    for name in ("again", "workers"):
        pd.testing.assert_frame_equal(out["first"].history, out[name].history, check_exact=True)
        pd.testing.assert_frame_equal(out["first"].runs, out[name].runs, check_exact=True)
