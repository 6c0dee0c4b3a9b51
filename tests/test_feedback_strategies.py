"""The strategy interface: one class per rule, validated options, per-layer feedback state."""
import copy

import pytest
import torch
from torch import nn

from fa_study.feedback import (
    CONV_METHODS, METHODS, RULES, LayerStrategy, LocalConv2d, LocalLinear, RuleOptions, convert,
    initialize_dfa_block_targets, initialize_dfa_targets, make_strategy,
)
from fa_study.feedback.options import RULE_OPTION_NAMES
from fa_study.feedback import strategies as S

RANDOM_FEEDBACK = {"fa", "frsf", "brsf", "kolen_pollack", "weight_mirror"}  # drawn at set-up
TARGETED = {"dfa", "dfa_ungated"}  # drawn by initialize_dfa_targets


def test_one_strategy_class_per_rule_and_the_rule_attributes():
    assert tuple(RULES) == METHODS
    assert CONV_METHODS == tuple(n for n, c in RULES.items() if c.has_conv_form)
    for name, cls in RULES.items():
        assert issubclass(cls, LayerStrategy) and cls.name == name and cls.summary
        assert set(cls.option_names) <= set(RULE_OPTION_NAMES)
        assert set(cls.switches) <= set(cls.option_names)
    assert {n for n, c in RULES.items() if c.needs_output_error} == {"dfa", "dfa_ungated"}
    assert {n for n, c in RULES.items() if c.direct} == {"dfa", "dfa_ungated"}
    assert {n for n, c in RULES.items() if c.stores_b} == {"fa", "kolen_pollack", "weight_mirror"}
    assert not RULES["dfa_ungated"].has_conv_form and not RULES["dfa_block"].has_conv_form
    steps = {n for n, c in RULES.items() if c().has_step}
    assert steps == {"dfa_ungated", "dfa_block", "kolen_pollack", "weight_mirror"}
    assert make_strategy("fa", RuleOptions(fa_grape=True)).has_step
    assert make_strategy("fa", RuleOptions(fa_grape=True)).label == "fa+grape"
    assert RULES["fa"].option_names[:3] == ("init_std", "fa_init_mode", "fa_sparse_k")
    assert "lr_b" not in RULES["frsf"].option_names and RULES["brsf"].option_names == ("init_std",)


@pytest.mark.parametrize("method", METHODS)
def test_layer_holds_its_strategy_and_method_is_a_read_only_name(method):
    layer = LocalLinear(4, 3, method=method)
    assert type(layer.strategy) is RULES[method]
    assert layer.method == method and layer.rule is layer.strategy.options
    assert f"method={method}" in repr(layer)
    with pytest.raises(AttributeError):
        layer.method = "bp"


def test_options_validation_names_option_value_and_range():
    with pytest.raises(ValueError, match="unknown feedback option.*'lr_bb'.*allowed options: "
                                         "init_std, fa_init_mode.*mirror_n"):
        RuleOptions(lr_bb=0.1)
    with pytest.raises(ValueError, match="unknown feedback option.*'lr_bb'.*allowed options"):
        LocalLinear(3, 2, method="fa", lr_bb=0.1)
    with pytest.raises(ValueError, match="unknown feedback option.*allowed options"):
        LocalConv2d(3, 2, 3, method="fa", lr_bb=0.1)
    bad = [
        ("lr_b", float("inf"), r"lr_b must be a finite number >= 0, got inf"),
        ("lr_b", float("nan"), r"lr_b must be a finite number >= 0, got nan"),
        ("lr_b", "0.1", r"lr_b must be a finite number >= 0, got '0.1'"),
        ("lr_b", -1.0, r"lr_b must be a finite number >= 0, got -1.0"),
        ("mirror_sigma", float("inf"), r"mirror_sigma must be a finite number > 0, got inf"),
        ("mirror_sigma", 0.0, r"mirror_sigma must be a finite number > 0, got 0.0"),
        ("grape_n_probe", 2.5, r"grape_n_probe must be an integer >= 1, got 2.5"),
        ("grape_n_probe", 0, r"grape_n_probe must be an integer >= 1, got 0"),
        ("mirror_n", "3", r"mirror_n must be an integer >= 1, got '3'"),
        ("mirror_n", True, r"mirror_n must be an integer >= 1, got True"),
        ("fa_sparse_k", 0, r"fa_sparse_k must be an integer >= 1 or None.*got 0"),
        ("init_std", -0.1, r"init_std must be a finite number > 0 or None.*got -0.1"),
        ("init_std", float("inf"), r"init_std must be a finite number > 0 or None.*got inf"),
        ("b_decay", 1.0, r"b_decay must be a finite number >= 0 and < 1 or None.*got 1.0"),
        ("fa_grape", "yes", r"fa_grape must be True or False, got 'yes'"),
        ("grape_scale_free", 1, r"grape_scale_free must be True or False, got 1"),
        ("fa_init_mode", "xavier", r"unknown fa_init_mode 'xavier'; allowed values: 'gaussian'"),
    ]
    for name, value, message in bad:
        with pytest.raises(ValueError, match=message):
            RuleOptions(**{name: value})
        with pytest.raises(ValueError, match=message):
            LocalLinear(3, 2, method="kolen_pollack", **{name: value})
    # good values are normalised: ints where counts, floats where rates
    o = RuleOptions(lr_b=1, grape_n_probe=8, init_std=1)
    assert o.lr_b == 1.0 and isinstance(o.lr_b, float) and o.grape_n_probe == 8
    assert o == RuleOptions(lr_b=1.0, grape_n_probe=8, init_std=1.0)


def test_options_against_the_rule():
    RuleOptions(fa_grape=True).validate("fa")
    with pytest.raises(ValueError, match="fa_grape=True is not an option of method 'frsf'"):
        RuleOptions(fa_grape=True).validate("frsf")
    with pytest.raises(ValueError, match="unknown method 'hebb'; allowed values: 'bp'"):
        RuleOptions().validate("hebb")
    with pytest.raises(ValueError, match="must be a RuleOptions"):
        RULES["fa"]({"lr_b": 0.1})
    assert RULES["sign_sym"].restrict(RuleOptions(fa_grape=True, lr_b=0.3)) == RuleOptions(lr_b=0.3)


def _feedback(layer):
    """Every random feedback tensor the layer holds."""
    return {n: b.clone() for n, b in layer.named_buffers() if b is not None}


@pytest.mark.parametrize("method", METHODS)
def test_reset_feedback_redraws_random_feedback_for_every_rule(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    model.blocks = nn.ModuleList([model[0]])
    convert(model, method, generator=torch.Generator().manual_seed(0),
            dfa_target_dim=3 if method in TARGETED else None,
            dfa_block_dim=8 if method == "dfa_block" else None)
    for i in (0, 2):
        layer = model[i]
        expected = (method in RANDOM_FEEDBACK or method == "dfa"
                    or (method == "dfa_ungated" and i == 0)  # the output layer gets I
                    or (method == "dfa_block" and i == 0))   # only layers inside a block
        assert layer.has_random_feedback == expected, (method, i)
        before = _feedback(layer)
        assert layer.reset_feedback(generator=torch.Generator().manual_seed(1)) == expected
        after = _feedback(layer)
        assert before.keys() == after.keys()
        changed = [n for n in before if not torch.equal(before[n], after[n])]
        assert bool(changed) == expected, (method, i, changed)
        assert all(before[n].shape == after[n].shape for n in before)
        if expected:  # reproducible from the generator
            again = copy.deepcopy(layer)
            layer.reset_feedback(generator=torch.Generator().manual_seed(1))
            again.reset_feedback(generator=torch.Generator().manual_seed(1))
            assert all(torch.equal(a, b) for a, b in zip(_feedback(layer).values(),
                                                         _feedback(again).values()))


def test_direct_feedback_is_absent_before_its_targets():
    layer = LocalLinear(4, 3, method="dfa")
    assert not layer.has_random_feedback and layer.reset_feedback() is False
    initialize_dfa_targets(layer, 5, init_std=0.5)
    assert layer.has_random_feedback and layer.B_dfa.shape == (5, 4)
    layer.reset_feedback(generator=torch.Generator().manual_seed(0))
    assert 0.3 < float(layer.B_dfa.std()) < 0.7  # redrawn at the scale it was drawn with
    block = LocalLinear(4, 4, method="dfa_block")
    assert not block.has_random_feedback
    initialize_dfa_block_targets(nn.Sequential(block), 4, blocks=[block])
    assert block.has_random_feedback


@pytest.mark.parametrize("method", CONV_METHODS)
def test_feedback_state_travels_with_to_state_dict_and_deepcopy(method):
    torch.manual_seed(0)
    layer = LocalConv2d(3, 4, 3, method=method)
    if method == "dfa":
        initialize_dfa_targets(layer, 5)
    names = {n for n, b in layer.named_buffers() if b is not None}
    assert names == {"fa": {"B"}, "kolen_pollack": {"B"}, "weight_mirror": {"B"},
                     "frsf": {"B_abs"}, "brsf": {"B_abs"}, "dfa": {"B_dfa"}}.get(method, set())
    state = layer.state_dict()
    assert names <= set(state)
    fresh = LocalConv2d(3, 4, 3, method=method)
    if method == "dfa":
        initialize_dfa_targets(fresh, 5)
    fresh.load_state_dict(state)
    for n in names:
        assert torch.equal(getattr(fresh, n), getattr(layer, n))
    twin = copy.deepcopy(layer)
    assert type(twin.strategy) is type(layer.strategy) and twin.strategy is not layer.strategy
    for n in names:
        assert torch.equal(getattr(twin, n), getattr(layer, n))
        assert getattr(twin, n).data_ptr() != getattr(layer, n).data_ptr()
    layer.to(torch.float64)
    assert all(getattr(layer, n).dtype == torch.float64 for n in names)
    fm = layer.feedback_matrix()
    assert fm is None if method == "dfa" else fm.dtype == torch.float64


def test_the_feedback_package_dispatches_on_no_rule_name():
    # Names are matched only in the name -> class table: no `method == "..."` elsewhere.
    import pathlib
    import re

    pkg = pathlib.Path(S.__file__).parent
    pattern = re.compile(r"""(method|\.name|conv_rule|m)\s*(==|!=|in)\s*\(?["']""")
    offenders = [f"{p.name}:{i}" for p in pkg.glob("*.py") if p.name != "strategies.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
