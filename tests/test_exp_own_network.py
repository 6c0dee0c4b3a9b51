"""Notebook 07's study: networks the package did not build (the reference's ViTMini and
SmallResNet, torchvision's ViT and ResNet-18), trained by a plain PyTorch loop under BP and
under rules put in by ``convert``, then audited, read for direction quality and update
alignment; and the panel whose callback is ``own_network_view``."""
import inspect
import math

import matplotlib
import pytest
import pandas as pd
import torch
import torch.nn.functional as F

matplotlib.use("Agg")

from fa_study.diagnostics import audit, find_hidden_states  # noqa: E402
from fa_study.experiments import own_network as on  # noqa: E402
from study_helpers import output_mimes, run_panel

# two ViTs of width 8 and two blocks, 25 steps on 256 digits: a few seconds for all four runs
TINY = dict(networks=("vit_mini", "torchvision_vit"), rules=("bp", "layer_fa"), width=8, depth=2, steps=25,
            batch_size=32, n_train=256, n_test=128, n_eval=64, n_direction=64, seed=0)
EXACT = 1 - 1e-6  # "is BP's": cosines of two computations of the same gradient


@pytest.fixture(scope="module")
def tiny():
    """The four TINY runs, trained once (offline stand-in MNIST), with the frozen baseline."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FA_STUDY_OFFLINE", "1")
        mp.setenv("FA_STUDY_DATA_KNOWN", "0")
        mp.delenv("FA_STUDY_DATA", raising=False)
        return on.run_own_network(on.OwnNetworkStudy.for_profile("quick", **TINY))


# ---------------------------------------------------------------------------- config

def test_config_rejects_bad_values_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="'vit_mini', 'torchvision_vit', 'small_resnet', 'resnet18'"):
        on.OwnNetworkStudy(networks=("vgg11",))
    with pytest.raises(ValueError, match="'bp', 'layer_fa', 'sign_sym'"):
        # no Conv2d form: convert would refuse the patch embedding
        on.OwnNetworkStudy(rules=("layer_dfa_block",))
    with pytest.raises(ValueError, match="non-empty tuple"):
        on.OwnNetworkStudy(rules=())
    with pytest.raises(ValueError, match="must not repeat"):
        on.OwnNetworkStudy(networks=("vit_mini", "vit_mini"))
    with pytest.raises(ValueError, match="'mnist', 'fashion_mnist', 'cifar10'"):
        on.OwnNetworkStudy(dataset="svhn")
    with pytest.raises(ValueError, match="steps"):
        on.OwnNetworkStudy(steps=0)
    with pytest.raises(ValueError, match="unknown setting"):
        on.OwnNetworkStudy.for_profile("quick", epochs=3)
    assert on.OwnNetworkStudy.for_profile("paper").width == 128  # the reference ViTMini's d_model
    assert on.OwnNetworkStudy.for_profile("default") == on.OwnNetworkStudy()
    assert on.OwnNetworkStudy().arms() == [("vit_mini", "bp"), ("vit_mini", "layer_fa"),
                                           ("torchvision_vit", "bp"), ("torchvision_vit", "layer_fa")]


def test_every_rule_offered_converts_every_network():
    """The panel offers exactly the rules convert runs on Linear and Conv2d layers alike (every
    network has a Conv2d)."""
    from fa_study.rules import LAYER_RULES, build_rule

    assert set(on.own_rules()) == {"bp"} | {c.name for c in LAYER_RULES if build_rule(c.name).has_conv_form}
    assert on.OwnNetworkStudy.rule_choices() == on.own_rules()


def test_frozen_config_takes_as_many_steps_as_the_plain_loop():
    for steps, batch, n_train in ((120, 64, 4000), (300, 64, 10000), (2000, 128, 60000), (5, 64, 10000)):
        study = on.OwnNetworkStudy(steps=steps, batch_size=batch)
        cfg, n = on.frozen_config(study, n_train)
        assert n <= n_train and cfg.batch_size == batch and cfg.schedule == "constant"
        assert abs(cfg.epochs * n - steps * batch) < cfg.epochs + batch  # one batch of slack


# ---------------------------------------------------------------------------- the user's code

def test_the_training_loop_is_plain_pytorch():
    source = inspect.getsource(on.train_plain)
    assert "torch.optim.AdamW" in source and "loss.backward()" in source and "optimizer.step()" in source
    assert "fa_study.train" not in source and "fa_study.rules" not in source


def test_train_plain_lowers_the_loss_of_a_converted_network():
    torch.manual_seed(0)
    x = torch.randn(128, 3, 28, 28)
    y = (x[:, 0, :14].mean((1, 2)) > 0).long()  # top half brighter: learnable by a ViT
    from fa_study.rules import convert

    model, _ = convert(on.build_network("vit_mini", width=8, depth=1, num_classes=2), "layer_fa",
                       generator=torch.Generator().manual_seed(1))
    losses = on.train_plain(model, x, y, steps=60, batch_size=32, lr=3e-3)
    assert len(losses) == 60 and sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


def test_dfa_trains_through_the_plain_loop():
    """The loop's capture_output_error call is what DFA layers need: without it their backward
    raises."""
    from fa_study.rules import convert

    x, y = torch.randn(16, 3, 28, 28), torch.randint(0, 10, (16,))
    model, _ = convert(on.build_network("vit_mini", width=8, depth=1), "layer_dfa", num_classes=10,
                       generator=torch.Generator().manual_seed(1))
    losses = on.train_plain(model, x, y, steps=2, batch_size=8)
    assert all(math.isfinite(v) for v in losses)
    with pytest.raises(RuntimeError):
        F.cross_entropy(model(x), y).backward()  # a loop without the call


def test_the_reference_vit_returns_its_hidden_states_where_the_audit_reads_them():
    """ViTMini's own forward(return_hidden=True) states are what the audit reads by hooks (its
    blocks add their own skip: h_{l+1} is block l's output, never h_l + block(h_l))."""
    torch.manual_seed(0)
    model = on.build_network("vit_mini", width=8, depth=3).eval()
    x = torch.randn(6, 3, 28, 28)
    states = find_hidden_states(model, x)
    _, hooked = states.run(model, x)
    _, own = model(x, return_hidden=True)
    assert len(hooked) == len(own) == 4
    for a, b in zip(hooked, own):
        torch.testing.assert_close(a, b)
    assert states.pool(own[1]).shape == (6, 8)  # the class token


@pytest.mark.parametrize("network, expected", [
    ("vit_mini", ["input of blocks.0", "output of blocks.0", "output of blocks.1"]),
    ("small_resnet", ["input of blocks.0", "output of blocks.0", "output of blocks.1"]),
    ("torchvision_vit", ["input of encoder.layers.encoder_layer_0",
                         "output of encoder.layers.encoder_layer_0",
                         "output of encoder.layers.encoder_layer_1"]),
    ("resnet18", ["input of layer1", "output of layer1", "output of layer2", "output of layer3",
                  "output of layer4"]),
])
def test_the_audit_reads_the_documented_modules(network, expected):
    torch.manual_seed(0)
    model = on.build_network(network, width=8, depth=2)
    x, y = torch.randn(8, 3, 28, 28), torch.randint(0, 10, (8,))
    report = audit(model, x, y)
    assert list(report.hidden_read) == expected == on.documented_states(network, 2)
    assert on.EXPECTED_CONTAINER[network] in report.hidden_how
    assert report.twin == "the model itself (plain torch layers only)"


# ---------------------------------------------------------------------------- the readings

def test_bp_credit_and_updates_are_bps_on_every_weight_and_state(tiny):
    for network in TINY["networks"]:
        r = tiny[network, "bp"]
        assert (r.updates["cos_update_bp"] > EXACT).all(), r.updates
        assert (r.direction["cos_mean"] > EXACT).all(), r.direction
        assert r.report.twin.startswith("the model itself") and r.conversion is None


def test_fa_updates_leave_bps_direction_below_the_head(tiny):
    for network in TINY["networks"]:
        r = tiny[network, "layer_fa"]
        hidden = r.hidden_updates()["cos_update_bp"]
        assert len(hidden) == len(r.updates) - 1
        assert hidden.min() < 0.9, r.updates  # a hidden weight far from BP's direction
        # the output layer's error is exact: its update is BP's
        assert r.updates["cos_update_bp"].iloc[-1] > EXACT and r.head.endswith("head.weight")
        assert (r.direction["cos_mean"] < 0.99).all(), r.direction


def test_fa_twin_puts_every_converted_layer_back_on_bp(tiny):
    for network in TINY["networks"]:
        r = tiny[network, "layer_fa"]
        converted = int((r.conversion["action"] == "converted").sum())
        assert converted > 0
        assert r.report.twin.startswith(f"a copy with {converted} layer(s) on plain BP")
        assert r.report.unvouched == ()


def test_runs_read_the_documented_states_and_decide_d3(tiny):
    for (network, rule), r in tiny.runs.items():
        assert list(r.report.hidden_read) == on.documented_states(network, TINY["depth"])
        assert len(r.report.hidden_read) == TINY["depth"] + 1 == len(r.direction)
        assert len(r.losses) == TINY["steps"] and 0 <= r.test_acc <= 1
        assert r.report.test_acc == r.test_acc and r.report.test_acc_source == "given"
    assert set(tiny.frozen_acc) == set(TINY["networks"])
    for network, acc in tiny.frozen_acc.items():
        assert 0 <= acc <= 1
        for rule in TINY["rules"]:
            rep = tiny[network, rule].report
            assert rep.frozen_acc == acc and rep.d3 == (rep.test_acc < acc + 0.02)
    assert "frozen_baseline" in tiny.d3_note
    table = tiny.table()
    assert list(zip(table["network"], table["rule"])) == list(tiny.runs)
    assert (table.loc[table["rule"] == "bp", "update_cos_hidden_min"] > EXACT).all()


def test_two_line_audit_of_a_trained_network_matches_the_runs_report(tiny):
    r = tiny["vit_mini", "layer_fa"]
    again = audit(r.model, tiny.x_eval, tiny.y_eval, frozen_acc=tiny.frozen_acc["vit_mini"],
                  test_acc=r.test_acc)
    assert again == r.report
    named = audit(r.model, tiny.x_eval, tiny.y_eval,
                  hidden=["blocks.0:input", "blocks.0", "blocks.1"])
    assert named.hidden_norms == r.report.hidden_norms and named.grad_norms == r.report.grad_norms


def test_without_frozen_baseline_d3_is_not_evaluated():
    study = on.OwnNetworkStudy(**dict(TINY, networks=("vit_mini",), rules=("bp",), steps=3))
    res = on.run_own_network(study, frozen=False)
    assert res["vit_mini", "bp"].report.d3 is None and "not evaluated" in res.d3_note
    assert res.frozen_acc == {} and "switched off" in res.d3_note


# ---------------------------------------------------------------------------- view and panel

def test_view_draws_one_row_per_network_and_notes_what_was_read(monkeypatch):
    monkeypatch.setitem(on.OwnNetworkStudy.PROFILES, "quick",
                        dict(TINY, networks=("vit_mini",), rules=("bp", "sign_sym"), steps=3))
    seen = []
    result = on.own_network_view(profile="quick", live=seen.append)
    assert list(result.table["rule"]) == ["bp", "sign_sym"]
    assert len(result.figures) == 1 and len(result.figures[0].axes) == 4
    assert {r["arm"] for r in seen} == {"vit_mini:bp", "vit_mini:sign_sym"} and len(seen) == 6
    assert any(n.startswith("vit_mini: h_l read as h_0 = input of blocks.0") for n in result.notes)
    assert any("stand-in" in n for n in result.notes)  # the tests see no real data


def test_panel_offers_networks_and_rules_and_runs_the_view(monkeypatch):
    from fa_study.widgets import ControlPanel

    monkeypatch.setitem(on.OwnNetworkStudy.PROFILES, "quick",
                        dict(TINY, networks=("vit_mini",), rules=("bp",), steps=3, frozen=False))
    panel = ControlPanel(on.OwnNetworkStudy, on.own_network_view, profile="quick", live_keys=("loss",))
    assert tuple(panel.controls["networks"].options) == on.NETWORKS
    assert tuple(panel.controls["rules"].options) == on.own_rules()
    assert {"dataset", "steps", "lr", "width", "depth", "seed"} <= set(panel.controls)
    run_panel(panel, networks=("small_resnet",), rules=("bp", "layer_fa"), width=8)
    res = panel.last_result
    assert res.config.networks == ("small_resnet",) and list(res.table["rule"]) == ["bp", "layer_fa"]
    assert panel.status.value == "done"
    mimes = output_mimes(panel.output)
    assert mimes.count("image/png") == 1 and "text/html" in mimes
    panel.controls["rules"].value = ()
    panel.run_button.click()
    assert isinstance(panel.last_error, ValueError)


def test_tick_labels_shorten_torchvision_names():
    long = "encoder.layers.encoder_layer_2.self_attention.in_proj_weight"
    assert on.short_name(long) == "L2.attn.in_proj_weight"
    assert on.short_name("encoder.layers.encoder_layer_0.mlp.0.weight") == "L0.mlp.0"
    assert on.short_name("blocks.3.mlp.3.weight") == "b3.mlp.3"
    assert on.short_name("class_token") == "class_token"



@pytest.mark.parametrize("network, rule", [(n, r) for n in ("vit_mini", "small_resnet")
                                           for r in on.own_rules()]
                         + [("torchvision_vit", "layer_dfa"), ("resnet18", "layer_fa")])
def test_every_rule_offered_trains_and_is_read_on_the_networks(network, rule):
    """What the panel offers runs: converted (except bp), trained two steps by the plain loop,
    audited, read for direction quality and update alignment."""
    from fa_study.feedback import local_layers
    from fa_study.rules import convert

    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 28, 28), torch.randint(0, 10, (16,))
    model = on.build_network(network, width=8, depth=2)
    if rule != "bp":
        model, _ = convert(model, rule, generator=torch.Generator().manual_seed(1), num_classes=10)
    learned = rule in ("layer_grape", "kolen_pollack", "weight_mirror")
    before = [m.feedback_matrix().clone() for _, m in local_layers(model)] if learned else None
    losses = on.train_plain(model, x, y, steps=2, batch_size=8)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    report, direction, updates = on.read_network(model, x, y, x, y, x[:8], y[:8])
    assert list(report.hidden_read) == on.documented_states(network, 2)
    assert len(direction) == len(report.hidden_read) and direction["cos_mean"].notna().all()
    assert updates["cos_update_bp"].notna().all()
    assert (updates["cos_update_bp"] > EXACT).all() == (rule == "bp")
    if learned:  # the loop's feedback_step moved the learned feedback B
        after = [m.feedback_matrix() for _, m in local_layers(model)]
        assert any(not torch.equal(a, b) for a, b in zip(before, after))


# ---------------------------------------------------------------------------- over the cores

def test_runs_over_two_workers_equal_the_runs_in_this_process(tiny, monkeypatch):
    """The frozen baselines and the runs spread over two worker processes give the same
    losses, accuracies, readings and weights, bit for bit, in the study's order; the live
    callback still receives every run's curve, once the run is done."""
    monkeypatch.setenv("FA_STUDY_OFFLINE", "1")
    monkeypatch.setenv("FA_STUDY_DATA_KNOWN", "0")
    monkeypatch.delenv("FA_STUDY_DATA", raising=False)
    monkeypatch.setenv("FA_STUDY_JOBS", "2")
    # fresh workers: a reused one may carry another test's monkeypatches (e.g. pickle refused)
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True, kill_workers=True)
    seen, done = [], []
    par = on.run_own_network(on.OwnNetworkStudy.for_profile("quick", **TINY), live=seen.append,
                             progress=lambda d, t, c: done.append((d, t)))
    assert list(par.runs) == list(tiny.runs) and par.frozen_acc == tiny.frozen_acc
    assert done[-1] == (4, 4) and len(seen) == sum(len(r.losses) for r in tiny.runs.values())
    for key, run in tiny.runs.items():
        other = par.runs[key]
        assert other.losses == run.losses and other.test_acc == run.test_acc
        assert other.report.verdict == run.report.verdict
        pd.testing.assert_frame_equal(other.updates, run.updates)
        pd.testing.assert_frame_equal(other.direction, run.direction)
        for (n, p), q in zip(run.model.state_dict().items(), other.model.state_dict().values()):
            assert torch.equal(p, q), (key, n)


def test_a_layer_rule_registered_later_is_offered_and_accepted(monkeypatch):
    """own_rules() is read when asked: a layer rule registered after import (as in a notebook)
    is one of the study's choices and passes its check."""
    from fa_study.rules import RULES, register
    from fa_study.rules.layer import LayerFA

    class PlainCopyFA(LayerFA):
        name = "plain_copy_fa_later"

    monkeypatch.setitem(RULES, PlainCopyFA.name, PlainCopyFA)  # recorded as absent: removed after
    register(PlainCopyFA)
    assert PlainCopyFA.name in on.OwnNetworkStudy.rule_choices()
    study = on.OwnNetworkStudy.for_profile("quick", rules=("bp", PlainCopyFA.name))
    assert study.rules == ("bp", PlainCopyFA.name)


def test_a_rule_that_cannot_convert_the_networks_is_neither_offered_nor_accepted(monkeypatch):
    """A layer rule without a Conv2d form cannot convert the networks (each has a Conv2d): asked
    of the rule (its fits, as convert() asks), it is not offered, and a study naming it is
    refused when built, not after the frozen baselines have trained."""
    from fa_study.rules import RULES, register
    from fa_study.rules.layer import LayerFA

    class LinearOnlyFA(LayerFA):
        name = "linear_only_fa"
        has_conv_form = False

    monkeypatch.setitem(RULES, LinearOnlyFA.name, LinearOnlyFA)  # recorded as absent: removed after
    register(LinearOnlyFA)
    assert LinearOnlyFA.name not in on.OwnNetworkStudy.rule_choices() and "layer_fa" in on.own_rules()
    with pytest.raises(ValueError, match="linear_only_fa"):
        on.OwnNetworkStudy.for_profile("quick", networks=("small_resnet",), rules=("bp", LinearOnlyFA.name))


def test_runs_from_workers_end_with_every_curve_drawn_on_the_live_plot(monkeypatch):
    """A worker's run reaches the live plot as one burst when it is done; the plot draws a burst
    at most once a second, so each replay ends with a draw: the last figure shows the last run's
    whole curve (before, it stopped at the first record of the burst)."""
    import types

    from fa_study import plots, units

    study = on.OwnNetworkStudy.for_profile("quick", networks=("small_resnet",), rules=("bp", "layer_fa"),
                                           frozen=False)
    runs = {r: types.SimpleNamespace(losses=[1.0 / (s + 1) for s in range(40)]) for r in study.rules}
    monkeypatch.setattr(units, "workers_for", lambda n_jobs, todo: 2)  # as on a machine with 2 cores
    monkeypatch.setattr(on, "_spread", lambda fn, tasks: [(t, runs[t[2]]) for t in tasks])
    seen = []
    live = plots.LivePlot(["loss"], every=5, sink=seen.append, profile="default", group="arm",
                          min_seconds=3600.0)
    on.run_own_network(study, live=live)
    last = seen[-1]
    assert last.get_suptitle().endswith("arm=small_resnet:layer_fa")
    assert len(last.axes[0].lines[0].get_xdata()) == 40
