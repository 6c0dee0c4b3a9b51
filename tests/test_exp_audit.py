"""The FA/DFA audit study of notebook 02: config, architectures, reports, verdict table, panel."""
import dataclasses
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from study_helpers import assert_not_drawn, diverge, html_outputs, output_mimes, run_panel  # noqa: E402

from fa_study.experiments import core  # noqa: E402
from fa_study.experiments.audit import (BEYOND_REFERENCE, AuditStudy,  # noqa: E402
                                        audit_rules, audit_spec, audit_view, blind_spot_figure,
                                        blind_spot_view, init_growth_layers, init_growth_table,
                                        run_audit, verdict_table)
from fa_study.diagnostics import PROTOCOL_EVAL, verdict_from_flags  # noqa: E402
from fa_study.runs import Results, RunSpec  # noqa: E402

TINY = dict(rules=("bp", "dfa"), seeds=(0,), d=16, num_blocks=2, epochs=1, n_train=256, n_test=128,
            null_draws=2)


# ---------------------------------------------------------------------------- config

@pytest.mark.parametrize("field, value, message", [
    ("archs", ("resmlp_d1024",), "resmlp_d512_L2"),
    ("rules", ("backprop",), "unknown rule 'backprop'; allowed values: 'bp', 'frozen'"),
    ("rules", ("ra_fa",), "rule 'ra_fa' cannot train a 'resmlp' model"),  # refused before training
    ("rules", (), "rules must be a non-empty tuple"),
    ("dataset", "svhn", "cifar100"),
    ("seeds", (), "non-empty tuple"),
    ("seeds", (1.5,), "integers"),
    ("seeds", (42, 42), "must not repeat a seed"),
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
    from fa_study.models import VARIANTS, audit_archs, audit_models

    with pytest.raises(ValueError, match="unknown setting"):
        AuditStudy.for_profile("quick", epoch=3)
    paper = AuditStudy.for_profile("paper")
    # the reference's run_all.sh inventory
    assert paper.archs == ("resmlp", "resmlp_d512_L2", "vit", "resnet")
    assert paper.seeds == (42, 123, 456) and paper.epochs == 100 and paper.augment
    assert paper.spec("dfa", "vit", 42).train.epochs == 60  # ViT: 60 of 100 epochs
    assert paper.spec("dfa", "resnet", 42).train.epochs == 100
    assert len(paper.specs()) == 4 * 3 * 4  # archs x seeds x (bp, fa, dfa, frozen)
    # the panel offers the audit's models: the reference's architectures and the named variant
    assert set(AuditStudy.CONTROLS["archs"]()) == set(audit_models()) == set(audit_archs()) | set(VARIANTS)


def test_named_variant_fixes_width_and_depth_and_keeps_its_name():
    study = AuditStudy.for_profile("quick", d=64, num_blocks=4)
    m = study.spec("dfa", "resmlp_d512_L2", 1).model
    assert (m.arch, m.d, m.num_blocks, m.name) == ("resmlp", 512, 2, "resmlp_d512_L2")
    plain = study.spec("dfa", "resmlp", 1).model
    assert (plain.arch, plain.d, plain.num_blocks, plain.name) == ("resmlp", 64, 4, "resmlp")
    # the frozen baseline is added once per architecture and seed
    rules = [s.rule for s in dataclasses.replace(study, archs=("resmlp", "resmlp_d512_L2")).specs()]
    assert rules.count("frozen") == 2 * len(study.seeds)
    given = dataclasses.replace(study, rules=("frozen", "bp")).specs()
    assert [s.rule for s in given].count("frozen") == len(study.seeds)


def test_audit_spec_defaults_are_the_reference_run():
    # notebooks 03 and 04 build their runs through audit_spec too: its defaults are 003's
    s = audit_spec("dfa", "resmlp", 42)
    assert isinstance(s, RunSpec) and (s.rule, s.options, s.seed) == ("dfa", (), 42)
    assert (s.model.arch, s.model.d, s.model.num_blocks) == ("resmlp", 256, 4)
    assert (s.data.dataset, s.data.n_train, s.data.n_test) == ("cifar10", None, None)
    t = s.train
    assert (t.epochs, t.batch_size, t.optimizer, t.lr, t.schedule, t.grad_clip, t.augment, t.seed) == \
        (10, 128, "adamw", 1e-3, "cosine", None, False, 42)
    assert t.eval_batch == PROTOCOL_EVAL
    assert (s.read.audit, s.read.direction, s.read.null_draws) == (True, True, 0)
    # the null only for rules with random feedback
    assert audit_spec("dfa", "resmlp", 42, null_draws=5).read.null_draws == 5
    assert audit_spec("bp", "resmlp", 42, null_draws=5).read.null_draws == 0
    # the study's runs are audit_spec's, the penalty only for rules that take one
    study = AuditStudy(rules=("bp", "dfa"), penalty=0.01, seeds=(42,), epochs=3)
    assert study.spec("dfa", "resmlp", 42) == audit_spec("dfa", "resmlp", 42, options={"penalty": 0.01},
                                                         epochs=3)
    assert study.spec("bp", "resmlp", 42) == audit_spec("bp", "resmlp", 42, epochs=3)
    assert study.spec("dfa", "resmlp", 42).label == "dfa λ=0.01"


# ---------------------------------------------------------------------------- verdict table

def _fake_results() -> Results:
    """Two seeds of bp, dfa and frozen on one architecture, with known numbers."""
    rows = []
    for seed, (bp, dfa, frozen, d1) in enumerate([(0.80, 0.50, 0.60, True), (0.90, 0.64, 0.62, False)]):
        for rule, acc, growth in (("bp", bp, 1.1), ("dfa", dfa, 80.0 if d1 else 2.0),
                                  ("frozen", frozen, 1.0)):
            rows.append(dict(rule=rule, arm=rule, arch="resmlp", model="resmlp", seed=seed, penalty=0.0,
                             dataset="cifar10", d=256, num_blocks=4, status="ok", test_acc=acc,
                             max_growth=growth, g_L=1e-3, h_L=5.0, d1=growth > 50, d2=False,
                             h0_init_ratio=3.0 if rule == "dfa" else 1.0,
                             hL_init_ratio=3.0 * growth, max_init_ratio=3.0 * growth,
                             data_source="synthetic"))
    runs = pd.DataFrame(rows)
    runs["frozen_acc"] = 0.61
    runs["depth_margin_pp"] = 100 * (runs["test_acc"] - 0.61)
    runs["d3"] = [None if m == "frozen" else bool(v < 2)
                  for m, v in zip(runs["rule"], runs["depth_margin_pp"])]
    runs["verdict"] = [verdict_from_flags(a, b, c) for a, b, c in zip(runs["d1"], runs["d2"], runs["d3"])]
    empty = pd.DataFrame()
    return Results([], empty, empty, runs, empty, empty)


def test_verdict_table_rows_margins_and_mixed_verdicts():
    from scipy import stats as st

    t = verdict_table(_fake_results()).set_index("rule")
    assert list(t.index) == ["bp", "dfa", "frozen"] and (t["n"] == 2).all()
    half = st.t.ppf(0.975, 1) * np.std([0.80, 0.90], ddof=1) / math.sqrt(2)
    assert t.loc["bp", "test_acc"] == pytest.approx(0.85)
    assert t.loc["bp", "test_acc_ci"] == pytest.approx(half)
    assert t.loc["bp", "test_acc_text"] == f"0.8500 ± {half:.4f}"
    assert t.loc["bp", "depth_margin_pp_text"].startswith("+24.0 ± ")
    assert t.loc["bp", "verdict"] == "PASS"
    # seed 0: D1 and D3 fire; seed 1: +3 pp over frozen and a stable stream -> passes
    assert t.loc["dfa", "verdict"] == "FAIL(D1+D3) 1/2, PASS 1/2"
    assert t.loc["dfa", "d1_fired"] == "1/2" and t.loc["dfa", "d3_fired"] == "1/2"
    assert t.loc["frozen", "verdict"] == "baseline" and t.loc["frozen", "depth_margin_pp_text"] == "—"
    assert t.loc["frozen", "d3_fired"] == "—" and (t["arch"] == "resmlp").all()
    # beyond the reference, next to D1's statistic: the growth since initialisation
    text = [c for c in t.columns if c.endswith("_text")]
    i = text.index("max_growth_text")
    assert text[i + 1:i + 3] == ["h0_init_ratio_text", "max_init_ratio_text"]
    assert t.loc["dfa", "h0_init_ratio"] == pytest.approx(3.0)
    assert t.loc["dfa", "max_init_ratio"] == pytest.approx(3.0 * (80.0 + 2.0) / 2)
    # results without the columns (an older frame) read n/a there
    old = _fake_results()
    old.runs = old.runs.drop(columns=["h0_init_ratio", "hL_init_ratio", "max_init_ratio"])
    assert (verdict_table(old)["max_init_ratio_text"] == "n/a").all()


def test_verdict_table_counts_diverged_runs():
    res = _fake_results()
    i = res.runs.index[(res.runs["rule"] == "dfa") & (res.runs["seed"] == 1)][0]
    cols = ["status", "verdict", "test_acc", "max_growth"]
    res.runs.loc[i, cols] = ["diverged", "DIVERGED", np.nan, np.nan]
    t = verdict_table(res).set_index("rule")
    # n counts the finished runs (finite accuracy), as stats.aggregate documents; n_rows all runs
    assert t.loc["dfa", "diverged"] == 1 and t.loc["dfa", "n"] == 1 and t.loc["dfa", "n_rows"] == 2
    assert t.loc["dfa", "test_acc"] == pytest.approx(0.50)  # the mean of the finished run
    assert t.loc["dfa", "d1_fired"] == "1/1"  # counted over the finished runs
    assert "DIVERGED 1/2" in t.loc["dfa", "verdict"]


def test_verdict_table_of_no_runs_says_so():
    empty = pd.DataFrame()
    with pytest.raises(ValueError, match="no runs"):
        verdict_table(Results([], empty, empty, empty, empty, empty))


# ---------------------------------------------------------------------------- running

def test_run_audit_tidy_reports_and_per_architecture_baseline(cache):
    study = AuditStudy.for_profile("quick", archs=("resmlp", "resmlp_d512_L2"), **TINY)
    res = run_audit(study)
    runs = res.runs
    assert isinstance(res, Results) and res.units == 6 and res.from_cache == 0 and len(runs) == 6
    assert res.cache.computed == 6 and res.attrs["study"] is study
    assert {"model", "rule", "arm", "data_source", "verdict", "frozen_acc", "depth_margin_pp", "max_growth",
            "g_L", "d1", "d2", "d3", "status", "test_acc"} <= set(runs.columns)
    assert set(runs["data_source"]) == {"synthetic"} and set(runs["status"]) == {"ok"}
    assert set(runs["model"]) == {"resmlp", "resmlp_d512_L2"}
    assert set(res.history["model"]) == set(res.layers["model"]) == {"resmlp", "resmlp_d512_L2"}
    for name in ("resmlp", "resmlp_d512_L2"):  # each architecture against its own frozen run
        sub = runs[runs["model"] == name]
        frozen = sub.loc[sub["rule"] == "frozen", "test_acc"].iloc[0]
        assert np.allclose(sub["frozen_acc"], frozen)
    for r in runs.itertuples():
        rep = res.report(r.arm, r.seed, r.model)
        assert rep.verdict == r.verdict and rep.max_growth == pytest.approx(r.max_growth)
        assert rep.d3 == (None if r.rule == "frozen" else r.d3)
        if r.rule != "frozen":
            assert rep.frozen_acc == pytest.approx(r.frozen_acc)
            assert rep.depth_margin == pytest.approx(r.depth_margin_pp / 100)
    with pytest.raises(ValueError, match="pass model="):
        res.report("bp", 0)
    with pytest.raises(ValueError, match="no run"):
        res.report("fa", 0, "resmlp")
    # the null only for the rule with random feedback, one row per run
    assert len(res.null) == 2 and set(res.null["arm"]) == {"dfa"}
    # direction quality of every trained rule (not of the frozen baseline)
    assert set(res.layers["arm"]) == {"bp", "dfa"}
    again = run_audit(study)
    assert again.from_cache == 6
    pd.testing.assert_frame_equal(again.runs, runs)


def test_audit_view_returns_runs_table_figures_and_the_results(cache):
    study = AuditStudy.for_profile("quick", **TINY)
    out = audit_view(study)
    assert isinstance(out, core.StudyResult) and isinstance(out.extra, Results)
    assert isinstance(out.results, pd.DataFrame) and out.results.equals(out.extra.runs)
    assert list(out.table["rule"]) == ["bp", "dfa", "frozen"]
    assert len(out.figures) == 3 and out.units == 3
    assert any("stand-in" in n for n in out.notes) and out.cache_notes == []
    # norms are on log axes; the bar chart carries the frozen-baseline line
    norm_axes = out.figures[1].axes[:2]
    assert all(ax.get_yscale() == "log" for ax in norm_axes)
    assert any(line.get_linestyle() == "--" for line in out.figures[0].axes[0].lines)


def test_audit_view_labels_the_growth_since_init_as_beyond_the_reference(cache):
    out = audit_view(AuditStudy.for_profile("quick", **TINY))
    assert BEYOND_REFERENCE in out.notes and "not in the verdict" in BEYOND_REFERENCE
    runs = out.extra.runs
    assert runs[["h0_init_ratio", "hL_init_ratio", "max_init_ratio"]].notna().all().all()
    for r in runs.itertuples():
        rep = out.extra.report(r.arm, r.seed, r.model)
        assert rep.init_ratio[0] == pytest.approx(r.h0_init_ratio)
        assert max(rep.init_ratio) == pytest.approx(r.max_init_ratio)
        assert "Beyond the reference (not in the verdict)" in str(rep)


# ---------------------------------------------------------------------------- D1's blind spot

def test_blind_spot_study_is_one_small_run_in_every_profile():
    quick, default, paper = (AuditStudy.for_profile(p).blind_spot(p) for p in ("quick", "default", "paper"))
    for s in (quick, default, paper):
        assert (s.rules, s.archs, s.dataset) == (("bp", "dfa"), ("resmlp",), "fashion_mnist")
        assert (s.d, s.num_blocks, s.epochs, s.n_train, s.lr, s.augment) == \
            (None, None, 3, 12000, 1e-3, False)
        assert s.null_draws == 0 and s.penalty == 0.0
        m = s.spec("dfa", "resmlp", 42).model
        assert (m.d, m.num_blocks) == (256, 4)  # the reference ResidualMLP, whatever the profile's width
    assert quick.specs() == default.specs()  # one cache entry for both profiles
    assert quick.seeds == (42,) and paper.seeds == (42, 123, 456)
    assert [s.rule for s in default.specs()] == ["bp", "dfa", "frozen"]


def _scale_embedding_of(monkeypatch, rule_name: str, factor: float) -> None:
    """Runs of ``rule_name`` end with their embedding scaled by ``factor`` after training."""
    from fa_study import train as train_module

    real = train_module.train

    def train(model, rule, *args, **kw):
        out = real(model, rule, *args, **kw)
        if rule.name == rule_name:
            with torch.no_grad():
                model.embed_linear.weight.mul_(factor)
                model.embed_linear.bias.mul_(factor)
        return out

    monkeypatch.setattr(train_module, "train", train)


def test_init_growth_table_reads_a_scaled_embedding_as_d1_blind(cache, monkeypatch):
    _scale_embedding_of(monkeypatch, "dfa", 5000.0)
    study = AuditStudy.for_profile("quick", **dict(TINY, null_draws=0))
    res = run_audit(study)
    table = init_growth_table(res).set_index("arm")
    assert list(table.index) == ["bp", "dfa", "frozen"]
    runs = res.runs.set_index("arm")
    for col in ("max_growth", "h0_init_ratio", "hL_init_ratio", "max_init_ratio"):
        assert table[col].to_numpy() == pytest.approx(runs.loc[table.index, col].to_numpy())
    dfa = table.loc["dfa"]
    # the stream is thousands of times its initial size from h_0 on, and no block grew it
    assert dfa["hL_init_ratio"] > 1000 and dfa["h0_init_ratio"] > 1000 and not dfa["d1"]
    assert dfa["d1_blind"] and not table.loc["bp", "d1_blind"]
    assert dfa["h0_share"] == pytest.approx(math.log(dfa["h0_init_ratio"]) / math.log(dfa["hL_init_ratio"]))
    assert dfa["d1_share"] == pytest.approx(math.log(dfa["max_growth"]) / math.log(dfa["hL_init_ratio"]))
    assert dfa["h0_share"] > 0.9 and dfa["d1_share"] < 0.1
    assert dfa["hL_vs_bp"] == pytest.approx(runs.loc["dfa", "h_L"] / runs.loc["bp", "h_L"])
    assert table.loc["bp", "hL_vs_bp"] == pytest.approx(1.0) and table.loc["frozen", "verdict"] == "baseline"
    # per layer: the report's readings, growth NaN at h_0 (no block-to-block ratio sees it)
    lay = init_growth_layers(res)
    one = lay[lay["arm"] == "dfa"].sort_values("layer")
    rep = res.report("dfa", 0)
    assert one["init_ratio"].tolist() == pytest.approx(list(rep.init_ratio))
    assert math.isnan(one["growth"].iloc[0])
    assert one["growth"].iloc[1:].tolist() == pytest.approx(list(rep.growth))


def test_blind_spot_view_draws_init_ratio_next_to_block_growth(cache):
    from fa_study.diagnostics import D1_THRESHOLD

    study = AuditStudy.for_profile("quick", **dict(TINY, null_draws=0))
    out = blind_spot_view(study)
    assert isinstance(out.table, pd.DataFrame) and set(out.table["arm"]) == {"bp", "dfa", "frozen"}
    assert BEYOND_REFERENCE in out.notes and len(out.figures) == 1
    left, right = out.figures[0].axes
    assert left.get_yscale() == right.get_yscale() == "log" and left.get_ylim() == right.get_ylim()
    assert "beyond the reference" in left.get_title() and "what D1 reads" in right.get_title()
    # bars: (L + 1) states x 3 rules on the left, L blocks x 3 rules on the right
    assert len(left.patches) == 3 * 3 and len(right.patches) == 2 * 3
    assert [t.get_text() for t in left.get_xticklabels()] == ["h_0", "h_1", "h_2"]
    assert any(np.allclose(line.get_ydata(), D1_THRESHOLD) for line in right.lines)
    assert any(np.allclose(line.get_ydata(), 1000.0) for line in left.lines)
    fig = blind_spot_figure(out.extra)  # the same figure from the results alone
    assert len(fig.axes) == 2


def test_init_growth_readings_of_results_without_an_audit_say_so():
    empty = pd.DataFrame()
    res = Results([], empty, empty, pd.DataFrame({"status": ["ok"], "model": ["resmlp"]}),
                  empty, empty, [None])
    with pytest.raises(ValueError, match="no audited run"):
        init_growth_layers(res)
    with pytest.raises(ValueError, match="no audited run"):
        init_growth_table(res)


def test_audit_view_leaves_a_diverged_run_out_of_the_plots_and_counts_it(cache, monkeypatch):
    diverge(monkeypatch, "dfa")
    out = audit_view(AuditStudy.for_profile("quick", **TINY))
    runs = out.extra.runs.set_index("arm")
    assert runs["status"].to_dict() == {"bp": "ok", "dfa": "diverged", "frozen": "ok"}
    assert runs.loc["dfa", "verdict"] == "DIVERGED" and out.extra.reports[1] is None
    assert any(n.startswith("Diverged runs") and "dfa (seed 0)" in n for n in out.notes)
    assert_not_drawn(out.figures, "dfa")
    t = out.table.set_index("rule")
    assert t.loc["dfa", "verdict"] == "DIVERGED" and t.loc["dfa", "diverged"] == 1
    assert t.loc["bp", "diverged"] == 0 and t.loc["dfa", "test_acc_text"] == "n/a"


# ---------------------------------------------------------------------------- panel

def _html(panel):
    return html_outputs(panel.output)


def test_panel_run_renders_new_figures_and_table_and_reruns_from_cache(cache, monkeypatch):
    from fa_study.widgets import ControlPanel

    monkeypatch.setitem(AuditStudy.PROFILES, "quick", dict(TINY, rules=("bp", "fa", "dfa"), seeds=(42,)))
    panel = ControlPanel(AuditStudy, audit_view, profile="quick", live_keys=("loss",))
    assert {"rules", "archs", "seeds", "dataset", "penalty", "epochs", "lr"} <= set(panel.controls)
    run_panel(panel, rules=("bp",), seeds="3")
    res = panel.last_result
    assert res.config.rules == ("bp",) and res.config.seeds == (3,) and res.from_cache == 0
    mimes = output_mimes(panel.output)
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
    assert panel.status.value.startswith("<span") and "error: ValueError" in panel.status.value


def test_panel_status_line_names_a_cache_entry_that_was_recomputed(cache, monkeypatch, capsys):
    from fa_study.widgets import ControlPanel

    monkeypatch.setitem(AuditStudy.PROFILES, "quick", dict(TINY, rules=("bp",), null_draws=0))
    panel = ControlPanel(AuditStudy, audit_view, profile="quick")
    panel.run_button.click()
    assert panel.last_error is None, panel.last_error
    assert panel.last_result.units == 2 and "recomputed" not in panel.status.value
    # damage one entry: its file truncated to half its size
    frames = sorted((cache / "results").glob("*/[!.]*.json"))
    assert len(frames) == 2
    data = frames[0].read_bytes()
    frames[0].write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    panel.run_button.click()
    assert panel.last_error is None, panel.last_error
    res = panel.last_result
    assert res.from_cache == 1 and res.extra.cache.recomputed == 1
    assert len(res.cache_notes) == 1 and "recomputed" in res.cache_notes[0]
    status = panel.status.value
    assert "1/2 runs from the cache" in status and "1 cache entry recomputed: unit RunSpec(" in status
    printed = capsys.readouterr()
    assert "recomputed" not in printed.out and "recomputed" not in printed.err  # not on the console
    # the entry was replaced: the next run serves both
    panel.run_button.click()
    assert panel.last_result.from_cache == 2 and "recomputed" not in panel.status.value


def test_rules_control_offers_a_rule_registered_at_runtime(request):
    from fa_study import rules
    from fa_study.experiments import FeedbackTour, LearnedStudy, RAStudy
    from fa_study.widgets import ControlPanel

    class MyDFA(rules.DFA):
        name = "my_dfa"
        summary = "block DFA under another name (a rule of the notebook's own)"

    class MyLayerFA(rules.RULES["layer_fa"]):
        name = "my_layer_fa"

    for name in ("my_dfa", "my_layer_fa"):  # registered for this test only
        request.addfinalizer(lambda name=name: rules.RULES.pop(name, None))
    assert "my_dfa" not in audit_rules()
    rules.register(MyDFA)
    rules.register(MyLayerFA)
    assert "my_dfa" in AuditStudy.rule_choices() and "my_dfa" in LearnedStudy.rule_choices()
    assert "my_layer_fa" in FeedbackTour.rule_choices() and "my_layer_fa" in AuditStudy.rule_choices()
    assert "my_dfa" not in FeedbackTour.rule_choices() and "my_dfa" not in RAStudy.rule_choices()
    panel = ControlPanel(AuditStudy, audit_view, profile="quick")
    assert "my_dfa" in panel.controls["rules"].options
    panel.controls["rules"].value = ("bp", "my_dfa")
    study = panel.study()
    assert study.rules == ("bp", "my_dfa")
    assert [s.label for s in study.specs()] == ["bp", "my_dfa", "frozen"] * 2
    tour = ControlPanel(FeedbackTour, lambda *a, **k: None, profile="quick")
    assert "my_layer_fa" in tour.controls["rules"].options
