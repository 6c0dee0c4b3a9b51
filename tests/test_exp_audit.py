"""The FA/DFA audit study of notebook 02: config, architectures, reports, verdict table, panel."""
import dataclasses
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from fa_study.experiments import core  # noqa: E402
from fa_study.experiments.audit import (ARCH_VARIANTS, AUDIT_ARCHS, AuditResults, AuditStudy,  # noqa: E402
                                        AuditUnit, _with_d3, arch_name, audit_view, run_audit,
                                        verdict_table)
from fa_study.protocol import verdict_from_flags  # noqa: E402

TINY = dict(rules=("bp", "dfa"), seeds=(0,), d=16, num_blocks=2, epochs=1, n_train=256, n_test=128,
            null_draws=2)


# ---------------------------------------------------------------------------- config

@pytest.mark.parametrize("field, value, message", [
    ("archs", ("resmlp_d1024",), "resmlp_d512_L2"),
    ("rules", ("backprop",), "'bp', 'fa', 'dfa'"),
    ("dataset", "svhn", "cifar100"),
    ("seeds", (), "non-empty tuple"),
    ("seeds", (1.5,), "integers"),
    ("epochs", 0, "epochs must be an integer >= 1"),
    ("lr", -1e-3, "lr must be a finite number > 0"),
    ("penalty", float("nan"), "penalty"),
    ("n_train", 0, "n_train must be an integer >= 1 or None"),
    ("null_draws", 1, "null_draws must be 0"),
])
def test_config_rejects_bad_values_naming_field_and_allowed(field, value, message):
    with pytest.raises(ValueError, match=message):
        AuditStudy.for_profile("quick", **{field: value})


def test_profiles_and_unknown_settings():
    with pytest.raises(ValueError, match="unknown setting"):
        AuditStudy.for_profile("quick", epoch=3)
    paper = AuditStudy.for_profile("paper")
    # the reference's run_all.sh inventory
    assert paper.archs == ("resmlp", "resmlp_d512_L2", "vit", "resnet")
    assert paper.seeds == (42, 123, 456) and paper.epochs == 100 and paper.augment
    assert paper.unit("dfa", "vit", 42).epochs == 60  # ViT: 60 of 100 epochs
    assert len(paper.units()) == 4 * 3 * 4  # archs x seeds x (bp, fa, dfa, frozen)
    assert set(AuditStudy.CONTROLS["archs"]) == set(AUDIT_ARCHS)
    from fa_study.models import ARCHS

    assert set(AUDIT_ARCHS) == set(ARCHS) | set(ARCH_VARIANTS)


def test_named_variant_fixes_width_and_depth_and_keeps_its_name():
    study = AuditStudy.for_profile("quick", d=64, num_blocks=4)
    u = study.unit("dfa", "resmlp_d512_L2", 1)
    assert (u.arch, u.d, u.num_blocks) == ("resmlp", 512, 2)
    assert arch_name(u) == "resmlp_d512_L2"
    plain = study.unit("dfa", "resmlp", 1)
    assert (plain.arch, plain.d, plain.num_blocks) == ("resmlp", 64, 4) and arch_name(plain) == "resmlp"
    # the frozen baseline is added once per architecture and seed
    methods = [v.method for v in dataclasses.replace(study, archs=("resmlp", "resmlp_d512_L2")).units()]
    assert methods.count("frozen") == 2 * len(study.seeds)


def test_audit_unit_defaults_are_unchanged():
    # other studies (notebooks 03, 04) build AuditUnit directly
    u = AuditUnit()
    assert (u.method, u.arch, u.d, u.num_blocks, u.penalty, u.dataset, u.epochs, u.batch_size,
            u.lr, u.seed, u.null_draws) == ("dfa", "resmlp", None, None, 0.0, "cifar10", 10, 128,
                                            1e-3, 42, 0)


# ---------------------------------------------------------------------------- verdict table

def _fake_results() -> AuditResults:
    """Two seeds of bp, dfa and frozen on one architecture, with known numbers."""
    rows = []
    for seed, (bp, dfa, frozen, d1) in enumerate([(0.80, 0.50, 0.60, True), (0.90, 0.64, 0.62, False)]):
        for method, acc, growth in (("bp", bp, 1.1), ("dfa", dfa, 80.0 if d1 else 2.0), ("frozen", frozen, 1.0)):
            rows.append(dict(method=method, arm=method, arch="resmlp", arch_name="resmlp", seed=seed,
                             dataset="cifar10", d=None, num_blocks=None, status="ok", test_acc=acc,
                             max_growth=growth, g_L=1e-3, h_L=5.0, d1=growth > 50, d2=False,
                             data_source="synthetic"))
    runs = pd.DataFrame(rows)
    runs["frozen_acc"] = 0.61
    runs["depth_margin_pp"] = 100 * (runs["test_acc"] - 0.61)
    runs["d3"] = [None if m == "frozen" else bool(v < 2) for m, v in zip(runs["method"], runs["depth_margin_pp"])]
    runs["verdict"] = [verdict_from_flags(a, b, c) for a, b, c in zip(runs["d1"], runs["d2"], runs["d3"])]
    return AuditResults(pd.DataFrame(), runs, pd.DataFrame(), pd.DataFrame())


def test_verdict_table_rows_margins_and_mixed_verdicts():
    from scipy import stats as st

    t = verdict_table(_fake_results()).set_index("rule")
    assert list(t.index) == ["bp", "dfa", "frozen"] and (t["n"] == 2).all()
    half = st.t.ppf(0.975, 1) * np.std([0.80, 0.90], ddof=1) / math.sqrt(2)
    assert t.loc["bp", "test_acc"] == pytest.approx(0.85) and t.loc["bp", "test_acc_ci"] == pytest.approx(half)
    assert t.loc["bp", "test_acc_text"] == f"0.8500 ± {half:.4f}"
    assert t.loc["bp", "depth_margin_pp_text"].startswith("+24.0 ± ")
    assert t.loc["bp", "verdict"] == "PASS"
    # seed 0: D1 and D3 fire; seed 1: +3 pp over frozen and a stable stream -> passes
    assert t.loc["dfa", "verdict"] == "FAIL(D1+D3) 1/2, PASS 1/2"
    assert t.loc["dfa", "d1_fired"] == "1/2" and t.loc["dfa", "d3_fired"] == "1/2"
    assert t.loc["frozen", "verdict"] == "baseline" and t.loc["frozen", "depth_margin_pp_text"] == "—"


def test_verdict_table_counts_diverged_runs():
    res = _fake_results()
    i = res.runs.index[(res.runs["method"] == "dfa") & (res.runs["seed"] == 1)][0]
    res.runs.loc[i, ["status", "verdict", "test_acc", "max_growth"]] = ["diverged", "DIVERGED", np.nan, np.nan]
    t = verdict_table(res).set_index("rule")
    assert t.loc["dfa", "diverged"] == 1 and t.loc["dfa", "n"] == 2
    assert t.loc["dfa", "test_acc"] == pytest.approx(0.50)  # the mean of the finished run
    assert "DIVERGED 1/2" in t.loc["dfa", "verdict"]


def test_with_d3_matches_the_protocol_audit():
    import torch

    from fa_study.models import build_model
    from fa_study.protocol import audit

    torch.manual_seed(0)
    model = build_model("resmlp", d=8, num_blocks=2, input_shape=(3, 4, 4))
    x, y = torch.randn(16, 3, 4, 4), torch.arange(16) % 10
    for frozen in (0.05, 0.60):
        direct = audit(model, x, y, test_acc=0.3, frozen_acc=frozen)
        later = _with_d3(audit(model, x, y, test_acc=0.3), frozen, direct.d3, 2.0)
        assert later == direct


# ---------------------------------------------------------------------------- running

def test_run_audit_tidy_reports_and_per_architecture_baseline(cache):
    study = AuditStudy.for_profile("quick", archs=("resmlp", "resmlp_d512_L2"), **TINY)
    res = run_audit(study)
    runs = res.runs
    assert res.units == 6 and res.from_cache == 0 and len(runs) == 6
    assert {"arch_name", "data_source", "verdict", "frozen_acc", "depth_margin_pp", "max_growth",
            "g_L", "d1", "d2", "d3", "status", "test_acc"} <= set(runs.columns)
    assert set(runs["data_source"]) == {"synthetic"}
    assert set(runs["arch_name"]) == {"resmlp", "resmlp_d512_L2"}
    assert set(res.history["arch_name"]) == set(res.layers["arch_name"]) == {"resmlp", "resmlp_d512_L2"}
    for name in ("resmlp", "resmlp_d512_L2"):  # each architecture against its own frozen run
        sub = runs[runs["arch_name"] == name]
        frozen = sub.loc[sub["method"] == "frozen", "test_acc"].iloc[0]
        assert np.allclose(sub["frozen_acc"], frozen)
    for r in runs.itertuples():
        rep = res.report(r.arm, r.seed, r.arch_name)
        assert rep.verdict == r.verdict and rep.max_growth == pytest.approx(r.max_growth)
        assert rep.d3 == (None if r.method == "frozen" else r.d3)
        if r.method != "frozen":
            assert rep.frozen_acc == pytest.approx(r.frozen_acc)
            assert rep.depth_margin == pytest.approx(r.depth_margin_pp / 100)
    with pytest.raises(ValueError, match="pass arch="):
        res.report("bp", 0)
    with pytest.raises(ValueError, match="no run"):
        res.report("fa", 0, "resmlp")
    assert len(res.null) == 2 and set(res.null["arm"]) == {"dfa"}
    again = run_audit(study)
    assert again.from_cache == 6
    pd.testing.assert_frame_equal(again.runs, runs)


def test_audit_view_returns_runs_table_figures_and_the_results(cache):
    study = AuditStudy.for_profile("quick", **TINY)
    out = audit_view(study)
    assert isinstance(out, core.StudyResult) and isinstance(out.extra, AuditResults)
    assert isinstance(out.results, pd.DataFrame) and out.results.equals(out.extra.runs)
    assert list(out.table["rule"]) == ["bp", "dfa", "frozen"]
    assert len(out.figures) == 3 and out.units == 3
    assert any("stand-in" in n for n in out.notes)
    # norms are on log axes; the bar chart carries the frozen-baseline line
    norm_axes = out.figures[1].axes[:2]
    assert all(ax.get_yscale() == "log" for ax in norm_axes)
    assert any(line.get_linestyle() == "--" for line in out.figures[0].axes[0].lines)


# ---------------------------------------------------------------------------- panel

def _html(panel):
    return [o["data"]["text/html"] for o in panel.output.outputs if "text/html" in o.get("data", {})]


def test_panel_run_renders_new_figures_and_table_and_reruns_from_cache(cache, monkeypatch):
    from fa_study.widgets import ControlPanel

    monkeypatch.setitem(AuditStudy.PROFILES, "quick", dict(TINY, rules=("bp", "fa", "dfa"), seeds=(42,)))
    panel = ControlPanel(AuditStudy, audit_view, profile="quick", live_keys=("loss",))
    assert {"rules", "archs", "seeds", "dataset", "penalty", "epochs", "lr"} <= set(panel.controls)
    panel.controls["rules"].value = ("bp",)
    panel.controls["seeds"].value = "3"
    panel.run_button.click()
    assert panel.last_error is None, panel.last_error
    res = panel.last_result
    assert res.config.rules == ("bp",) and res.config.seeds == (3,) and res.from_cache == 0
    mimes = [k for o in panel.output.outputs for k in o.get("data", {})]
    assert mimes.count("image/png") == 3 and "text/html" in mimes
    first_html = _html(panel)
    assert any("frozen" in h and "baseline" in h and "test_acc" in h for h in first_html)
    panel.run_button.click()
    assert panel.last_result.from_cache == panel.last_result.units == 2
    assert "2/2 runs from the cache" in panel.status.value
    panel.controls["epochs"].value = 2
    panel.run_button.click()
    assert panel.last_result.config.epochs == 2 and panel.last_result.from_cache == 0
    assert set(panel.last_result.extra.history["epoch"]) == {0, 1, 2}
    assert _html(panel) != first_html  # the table changed with the new setting


def test_panel_shows_bad_values_inside_its_output(cache):
    from fa_study.widgets import ControlPanel

    panel = ControlPanel(AuditStudy, audit_view, profile="quick")
    panel.controls["rules"].value = ()
    panel.run_button.click()
    assert isinstance(panel.last_error, ValueError)
    assert any("rules must be a non-empty tuple" in h for h in _html(panel))
