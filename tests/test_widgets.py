"""The notebook panels (fa_study.widgets): controls generated from a study's settings, a run
rendered with its figure and table, errors and failed runs shown inside the panel."""
from fa_study import experiments, widgets
from study_helpers import html_outputs, output_mimes, run_panel


def _ra_panel():
    return widgets.ControlPanel(experiments.RAStudy, experiments.ra_view, profile="quick")


def test_controls_are_generated_from_the_config():
    panel = _ra_panel()
    c = panel.controls
    assert {"rules", "depth", "hidden", "activation", "ln", "lr", "lr_b", "lam", "epochs", "seeds"} <= set(c)
    assert list(c["rules"].options) == list(experiments.RAStudy.rule_choices())
    sliders = [w for w in c.values() if hasattr(w, "continuous_update")]
    assert sliders and all(w.continuous_update is False for w in sliders)
    assert panel.study() == experiments.RAStudy.for_profile("quick")  # defaults = the baseline run


def test_panel_run_renders_figure_and_table_and_second_run_is_cached(cache):
    panel = _ra_panel()
    run_panel(panel, rules=("bp", "ra_fa"), epochs=1, hidden=32, seeds="3")
    res = panel.last_result
    assert res.config.epochs == 1 and res.config.hidden == 32 and res.config.seeds == (3,)
    assert set(res.results["arm"]) == {"bp", "ra_fa"} and set(res.results["seed"]) == {3}
    mimes = output_mimes(panel.output)
    assert "image/png" in mimes and "text/html" in mimes
    html = html_outputs(panel.output)
    assert any("ra_fa" in h and "test_acc" in h for h in html)
    assert res.from_cache == 0
    panel.run_button.click()
    assert panel.last_result.from_cache == panel.last_result.units == 2
    assert "2/2 runs from the cache" in panel.status.value


def test_panel_shows_errors_inside_its_output(cache):
    panel = _ra_panel()
    panel.controls["seeds"].value = "forty-two"
    panel.run_button.click()
    assert isinstance(panel.last_error, ValueError)
    texts = [o.get("text", "") + str(o.get("data", {}).get("text/html", "")) for o in panel.output.outputs]
    assert any("comma-separated integers" in t for t in texts)
    assert panel.run_button.disabled is False
    panel.controls["seeds"].value = "4, 4"
    panel.run_button.click()
    assert isinstance(panel.last_error, ValueError) and "must not repeat a seed" in str(panel.last_error)


def test_panel_names_a_failed_run_in_its_status_and_table(cache, fail_runs):
    fail_runs("ra_fa")
    panel = _ra_panel()
    panel.controls["rules"].value = ("bp", "ra_fa")
    panel.controls["epochs"].value = 1
    panel.controls["hidden"].value = 32
    panel.run_button.click()
    assert panel.last_error is None, panel.last_error  # rendered, not an exception
    assert "1 run failed" in panel.status.value
    html = html_outputs(panel.output)
    assert any("injected failure of ra_fa" in h for h in html)
    assert "image/png" in output_mimes(panel.output)
