"""A layer rule is one class (fa_study.rules.layer): its options, its layers' backward, its
feedback state per layer, its after-step update, and a rule written in a notebook."""
import copy
import pathlib
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fa_study.feedback import (
    LocalConv2d, LocalLinear, capture_output_error, feedback_step, has_feedback_step, local_layers,
)
from fa_study.fields import Option, positive
from fa_study.rules import LAYER_RULES, RULES, LayerRule, build_rule, convert, register
from fa_study.rules import layer as layer_module
from fa_study.rules.layer import LayerFA

NAMES = tuple(cls.name for cls in LAYER_RULES)
# every layer rule with its default options, and ungated DFA (seed 000's form)
RULE_CASES = [(name, {}) for name in NAMES] + [("layer_dfa", {"gated": False})]
D64 = torch.float64


def _id(case):
    return case if isinstance(case, str) else ",".join(f"{k}={v}" for k, v in case.items()) or "default"


def test_one_class_per_rule_and_the_rule_attributes():
    assert NAMES == ("layer_fa", "sign_sym", "frsf", "brsf", "layer_grape", "kolen_pollack",
                     "weight_mirror", "layer_dfa", "layer_dfa_block")
    for cls in LAYER_RULES:
        assert issubclass(cls, LayerRule) and RULES[cls.name] is cls
        assert cls.family == "layer" and cls.summary
        assert cls.needs_blocks == (cls.name == "layer_dfa_block")
    options = {name: tuple(RULES[name].OPTIONS) for name in NAMES}
    assert options == {
        "layer_fa": ("init", "sparse_k", "init_std"), "sign_sym": (), "frsf": ("init_std",),
        "brsf": ("init_std",), "layer_grape": ("lr_b", "n_probe", "scale_free", "normalize_columns"),
        "kolen_pollack": ("lr_b", "b_decay"), "weight_mirror": ("lr_b", "sigma", "n_noise"),
        "layer_dfa": ("gated", "init_std"), "layer_dfa_block": ()}
    rules = {name if not o else f"{name}({_id(o)})": build_rule(name, **o) for name, o in RULE_CASES}
    assert {n for n, r in rules.items() if r.needs_output_error} == {"layer_dfa", "layer_dfa(gated=False)"}
    assert {n for n, r in rules.items() if r.stores_b} == {"layer_fa", "layer_grape", "kolen_pollack",
                                                          "weight_mirror"}
    assert {n for n, r in rules.items() if not r.has_conv_form} == {"layer_dfa(gated=False)",
                                                                    "layer_dfa_block"}
    assert {n for n, r in rules.items() if r.has_after_backward} == {
        "layer_grape", "kolen_pollack", "weight_mirror", "layer_dfa(gated=False)", "layer_dfa_block"}
    assert {n: RULES[n].layer_buffers for n in NAMES} == {
        "layer_fa": ("B",), "sign_sym": (), "frsf": ("B_abs",), "brsf": ("B_abs",), "layer_grape": ("B",),
        "kolen_pollack": ("B",), "weight_mirror": ("B",), "layer_dfa": ("B_dfa",),
        "layer_dfa_block": ("B_dfa_block",)}


@pytest.mark.parametrize("name, options", RULE_CASES, ids=_id)
def test_layer_holds_its_rule_and_method_is_a_read_only_name(name, options):
    rule = build_rule(name, **options)
    layer = LocalLinear(4, 3, rule=rule)
    assert layer.rule is rule and layer.method == name
    assert f"rule={name}(" in repr(layer) and repr(rule).startswith(f"{name}(")
    with pytest.raises(AttributeError):
        layer.method = "layer_fa"
    # a layer holds only the buffers of its rule (None until drawn: then out of the state_dict)
    assert all(hasattr(layer, b) for b in rule.layer_buffers)
    unused = {"B", "B_abs", "B_dfa", "B_dfa_block"} - set(rule.layer_buffers)
    assert not any(hasattr(layer, b) for b in unused)
    assert set(layer.state_dict()) <= {"weight", "bias", *rule.layer_buffers}


BAD_OPTIONS = [
    ("kolen_pollack", "lr_b", float("inf"), r"lr_b must be a finite number > 0 or None.*got inf"),
    ("kolen_pollack", "lr_b", float("nan"), r"lr_b must be a finite number > 0 or None.*got nan"),
    ("kolen_pollack", "lr_b", "0.1", r"lr_b must be a finite number > 0 or None.*got '0.1'"),
    ("layer_grape", "lr_b", -1.0, r"lr_b must be a finite number >= 0, got -1.0"),
    ("weight_mirror", "sigma", float("inf"), r"sigma must be a finite number > 0, got inf"),
    ("weight_mirror", "sigma", 0.0, r"sigma must be a finite number > 0, got 0.0"),
    ("layer_grape", "n_probe", 2.5, r"n_probe must be an integer >= 1, got 2.5"),
    ("layer_grape", "n_probe", 0, r"n_probe must be an integer >= 1, got 0"),
    ("weight_mirror", "n_noise", "3", r"n_noise must be an integer >= 1, got '3'"),
    ("weight_mirror", "n_noise", True, r"n_noise must be an integer >= 1, got True"),
    ("layer_fa", "sparse_k", 0, r"sparse_k must be an integer >= 1.*got 0"),
    ("layer_fa", "init_std", -0.1, r"init_std must be a finite number > 0 or None.*got -0.1"),
    ("frsf", "init_std", float("inf"), r"init_std must be a finite number > 0 or None.*got inf"),
    ("kolen_pollack", "b_decay", 1.0, r"b_decay must be a finite number >= 0 and < 1.*got 1.0"),
    ("layer_grape", "scale_free", 1, r"scale_free must be True or False, got 1"),
    ("layer_grape", "normalize_columns", "yes", r"normalize_columns must be True or False, got 'yes'"),
    ("layer_dfa", "gated", "no", r"gated must be True or False, got 'no'"),
    ("layer_fa", "init", "xavier", r"unknown init 'xavier'; allowed values: 'gaussian'"),
]


@pytest.mark.parametrize("name, option, value, message", BAD_OPTIONS, ids=lambda v: str(v))
def test_each_rule_checks_its_own_options(name, option, value, message):
    with pytest.raises(ValueError, match=message):
        build_rule(name, **{option: value})
    with pytest.raises(ValueError, match=message):
        convert(nn.Linear(3, 2), name, **{option: value})


def test_unknown_and_foreign_options_name_the_allowed_ones():
    with pytest.raises(ValueError, match="rule 'layer_fa' has no option 'lr_bb'; allowed options: "
                                         "'init', 'sparse_k', 'init_std'"):
        build_rule("layer_fa", lr_bb=0.1)
    # an option of another rule is not this rule's: one name, one rule
    with pytest.raises(ValueError, match="rule 'frsf' has no option 'lr_b'; allowed options: 'init_std'"):
        build_rule("frsf", lr_b=0.1)
    with pytest.raises(ValueError, match="'sign_sym' has no option 'init_std'; allowed options: none"):
        build_rule("sign_sym", init_std=0.1)
    with pytest.raises(ValueError, match="keyword options only: build_rule\\('layer_fa', init='gaussian'\\)"):
        RULES["layer_fa"]("sparse")
    with pytest.raises(ValueError, match="unknown rule 'hebb'; allowed values: .*'layer_fa'"):
        build_rule("hebb")
    # good values are normalised: ints where counts, floats where rates
    rule = build_rule("layer_grape", lr_b=1, n_probe=8)
    assert rule.lr_b == 1.0 and isinstance(rule.lr_b, float) and rule.n_probe == 8
    assert build_rule("layer_fa", init_std=1).options() == build_rule("layer_fa", init_std=1.0).options()


def _feedback(layer):
    """Every feedback tensor the layer holds."""
    return {n: b.clone() for n, b in layer.named_buffers() if b is not None}


class TinyBlocks(nn.Module):
    """Linear(6, 8) -> one residual block of width 8 -> Linear(8, 3)."""

    def __init__(self):
        super().__init__()
        self.width = 8
        self.embed = nn.Linear(6, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh())])
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        h = h + self.blocks[0](h)
        return self.head(h)


@pytest.mark.parametrize("name, options", RULE_CASES, ids=_id)
def test_reset_feedback_redraws_random_feedback_for_every_rule(name, options):
    torch.manual_seed(0)
    model, _ = convert(TinyBlocks(), name, num_classes=3, generator=torch.Generator().manual_seed(0),
                       **options)
    random_rule = name in ("layer_fa", "frsf", "brsf", "layer_grape", "kolen_pollack",
                           "weight_mirror", "layer_dfa")
    for layer_name, layer in local_layers(model):
        expected = (random_rule and not (options == {"gated": False} and layer_name == "head")  # I
                    or (name == "layer_dfa_block" and layer_name.startswith("blocks")))  # in a block
        assert layer.has_random_feedback == expected, layer_name
        before = _feedback(layer)
        assert layer.reset_feedback(generator=torch.Generator().manual_seed(1)) == expected
        after = _feedback(layer)
        assert before.keys() == after.keys()
        changed = [n for n in before if not torch.equal(before[n], after[n])]
        assert bool(changed) == expected, (layer_name, changed)
        assert all(before[n].shape == after[n].shape for n in before)
        if expected:  # reproducible from the generator
            again = copy.deepcopy(layer)
            layer.reset_feedback(generator=torch.Generator().manual_seed(1))
            again.reset_feedback(generator=torch.Generator().manual_seed(1))
            assert all(torch.equal(a, b) for a, b in zip(_feedback(layer).values(),
                                                         _feedback(again).values()))


def test_direct_feedback_is_absent_before_convert_draws_it():
    layer = LocalLinear(4, 3, rule=build_rule("layer_dfa"))
    assert layer.B_dfa is None and not layer.has_random_feedback and layer.reset_feedback() is False
    assert layer.feedback_matrix() is None  # direct: no W-shaped matrix
    layer, _ = convert(nn.Linear(4, 3), "layer_dfa", init_std=0.5, num_classes=5)
    assert layer.has_random_feedback and layer.B_dfa.shape == (5, 4)
    layer.reset_feedback(generator=torch.Generator().manual_seed(0))
    assert 0.3 < float(layer.B_dfa.std()) < 0.7  # redrawn at the scale it was drawn with
    block = LocalLinear(4, 4, rule=build_rule("layer_dfa_block"))
    assert not block.has_random_feedback
    model = nn.Module()
    model.width, model.blocks = 4, nn.ModuleList([nn.Sequential(nn.Linear(4, 4))])
    model, _ = convert(model, "layer_dfa_block")
    assert model.blocks[0][0].has_random_feedback and model.blocks[0][0].B_dfa_block.shape == (4, 4)


CONV_CASES = [name for name in NAMES if build_rule(name).has_conv_form]


def _conv(name):
    if name == "layer_dfa":  # its B_dfa is drawn by convert
        return convert(nn.Conv2d(3, 4, 3), name, num_classes=5)[0]
    return LocalConv2d(3, 4, 3, rule=build_rule(name))


@pytest.mark.parametrize("name", CONV_CASES)
def test_feedback_state_travels_with_to_state_dict_and_deepcopy(name):
    torch.manual_seed(0)
    layer = _conv(name)
    names = {n for n, b in layer.named_buffers() if b is not None}
    assert names == set(layer.rule.layer_buffers)
    state = layer.state_dict()
    assert names <= set(state)
    fresh = _conv(name)
    fresh.load_state_dict(state)
    for n in names:
        assert torch.equal(getattr(fresh, n), getattr(layer, n))
    twin = copy.deepcopy(layer)
    assert type(twin.rule) is type(layer.rule) and twin.rule.options() == layer.rule.options()
    for n in names:
        assert torch.equal(getattr(twin, n), getattr(layer, n))
        assert getattr(twin, n).data_ptr() != getattr(layer, n).data_ptr()
    layer.to(torch.float64)
    assert all(getattr(layer, n).dtype == torch.float64 for n in names)
    fm = layer.feedback_matrix()
    assert fm is None if name == "layer_dfa" else fm.dtype == torch.float64


def test_the_layer_machinery_dispatches_on_no_rule_name():
    # A rule's behaviour lives in its class: no `method == "..."` / `name in (...)` anywhere else
    # (conv_rule="bp", keeping convolutions plain, is a setting, not a rule).
    pkg = pathlib.Path(layer_module.__file__).parents[1]
    files = [*(pkg / "feedback").glob("*.py"), pkg / "rules" / "layer.py"]
    pattern = re.compile(r"""(method|\.name|conv_rule|rule)\s*(==|!=|in)\s*\(?["']""")
    offenders = [f"{p.name}:{i}" for p in files
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line.replace('conv_rule == "bp"', ""))]
    assert offenders == []


# ------------------------------------------------------------------------------------------------
# Every registered layer rule trains a small MLP; the W-shaped ones against grad_out @ B
# ------------------------------------------------------------------------------------------------

def _record_grads(model):
    """grad_out and grad_in of every local layer in the next backward, by layer name."""
    seen = {}
    for name, m in local_layers(model):
        m.register_full_backward_hook(
            lambda mod, gin, gout, name=name: seen.__setitem__(name, (gout[0], gin[0])))
    return seen


@pytest.mark.parametrize("name, options", RULE_CASES, ids=_id)
def test_every_layer_rule_trains_a_step_with_its_own_input_gradient(name, options):
    assert all(RULES[n] is cls for n, cls in zip(NAMES, LAYER_RULES))  # all registered
    torch.manual_seed(0)
    model, report = convert(TinyBlocks().double(), name, num_classes=3,
                            generator=torch.Generator().manual_seed(1), **options)
    assert set(report.loc[report.action == "converted", "method"]) == {name}
    seen = _record_grads(model)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 6, generator=g, dtype=D64, requires_grad=True)
    y = torch.randint(0, 3, (10,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(x)
    capture_output_error(model, out)
    F.cross_entropy(out, y).backward()
    assert set(seen) == {"embed", "blocks.0.0", "head"}
    rule = model.embed.rule
    for layer_name, layer in local_layers(model):
        B = rule.feedback_matrix(layer)
        if B is None:
            continue
        go, gx = seen[layer_name]
        torch.testing.assert_close(gx, go @ B, rtol=1e-12, atol=1e-14, msg=layer_name)
    if name in ("layer_fa", "sign_sym", "frsf", "brsf", "layer_grape", "kolen_pollack", "weight_mirror"):
        assert rule.feedback_matrix(model.embed).shape == model.embed.weight.shape
    if name == "layer_dfa" and rule.gated:  # the first layer's input gradient is e @ B_dfa
        e = (torch.softmax(out.detach(), -1) - F.one_hot(y, 3).to(D64)) / 10
        torch.testing.assert_close(x.grad, e @ model.embed.B_dfa, rtol=1e-12, atol=1e-14)
    counts = feedback_step(model, generator=torch.Generator().manual_seed(3))
    assert bool(counts) == has_feedback_step(model) and set(counts) <= {name}
    opt.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all() and not torch.equal(p, before[n]), n


# ------------------------------------------------------------------------------------------------
# A new layer rule is one class
# ------------------------------------------------------------------------------------------------

class ScaledFA(LayerFA):
    """layer_fa through ``scale * B``, B halved after every backward (a test rule)."""

    name = "test_scaled_fa"
    summary = "layer_fa through scale * B (a test rule)"
    has_after_backward = True
    OPTIONS = {**LayerFA.OPTIONS, "scale": Option(2.0, positive, "factor on B in the backward")}

    def feedback_matrix(self, layer):
        return self.scale * layer.B

    def layer_forward(self, layer, x):
        return layer._feedback_forward(x, self.feedback_matrix(layer))

    @torch.no_grad()
    def after_backward(self, layer, *, e=None, generator=None):
        layer.B.mul_(0.5)
        return True


@pytest.fixture
def scaled_fa():
    register(ScaledFA, replace=True)
    try:
        yield ScaledFA
    finally:
        del RULES[ScaledFA.name]


def test_a_new_layer_rule_is_one_class(scaled_fa):
    assert RULES["test_scaled_fa"] is scaled_fa
    with pytest.raises(ValueError, match="scale must be a finite number > 0, got -1"):
        build_rule("test_scaled_fa", scale=-1)
    with pytest.raises(ValueError, match="'test_scaled_fa' has no option 'lr_b'.*'scale'"):
        build_rule("test_scaled_fa", lr_b=0.1)
    model = nn.Sequential(nn.Linear(5, 4, dtype=D64), nn.Tanh(), nn.Linear(4, 3, dtype=D64))
    model, report = convert(model, "test_scaled_fa", scale=3.0, generator=torch.Generator().manual_seed(0))
    assert set(report.method.dropna()) == {"test_scaled_fa"} and model[0].rule.scale == 3.0
    assert has_feedback_step(model)
    B = model[2].B.clone()
    x = torch.randn(6, 5, dtype=D64)
    h = model[1](model[0](x)).detach().requires_grad_(True)
    go = torch.randn(6, 3, dtype=D64)
    model[2](h).backward(go)
    torch.testing.assert_close(h.grad, go @ (3.0 * B), rtol=1e-12, atol=1e-14)  # its backward
    assert feedback_step(model) == {"test_scaled_fa": 2}  # its after-step
    torch.testing.assert_close(model[2].B, 0.5 * B)
    # the trainer's route: the same name builds, sets up and steps it on another model
    other = nn.Sequential(nn.Linear(5, 4, dtype=D64), nn.Tanh(), nn.Linear(4, 3, dtype=D64))
    rule = build_rule("test_scaled_fa", scale=3.0)
    rule.setup(other, 3, torch.Generator().manual_seed(0))
    assert [m.rule for _, m in local_layers(other)] == [rule, rule]
    B = other[2].B.clone()
    loss, _ = rule.fill_grads(other, x, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert torch.isfinite(loss) and torch.equal(other[2].B, 0.5 * B)
    # the registry knows it like any package rule
    from fa_study.rules import rule_table

    assert "test_scaled_fa" in set(rule_table(()).rule)


class GainedTranspose(LayerRule):
    """A rule written from the base class: the input gradient through ``gain * W`` (a test rule)."""

    name = "test_gained_transpose"
    summary = "input gradient through gain * W (a test rule)"
    OPTIONS = {"gain": Option(1.0, positive, "factor on W in the backward")}

    def feedback_matrix(self, layer):
        return self.gain * layer.weight.detach()

    def layer_forward(self, layer, x):
        return layer._feedback_forward(x, self.feedback_matrix(layer))


@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_a_rule_from_the_base_class_needs_only_its_backward(gain):
    register(GainedTranspose, replace=True)
    try:
        torch.manual_seed(0)
        plain = nn.Sequential(nn.Linear(5, 4, dtype=D64), nn.Tanh(), nn.Linear(4, 3, dtype=D64))
        model, _ = convert(copy.deepcopy(plain), "test_gained_transpose", gain=gain)
        assert not has_feedback_step(model) and not model[0].has_random_feedback
        assert model[0].reset_feedback() is False and feedback_step(model) == {}
        x = torch.randn(6, 5, dtype=D64, requires_grad=True)
        go = torch.randn(6, 3, dtype=D64)
        model(x).backward(go)
        xp = x.detach().clone().requires_grad_(True)
        plain(xp).backward(go)  # BP: the same forward, the input gradient through W
        torch.testing.assert_close(model[2].weight.grad, plain[2].weight.grad)  # BP's at the top
        expected = gain ** 2 * xp.grad  # two layers, each passing gain * W
        torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=1e-14)
    finally:
        del RULES[GainedTranspose.name]
    with pytest.raises(ValueError, match="unknown rule 'test_gained_transpose'"):
        build_rule("test_gained_transpose")


def test_what_a_rule_is_follows_its_options_on_the_instance():
    # the class says what the default options give; an instance with other options says its own
    assert RULES["layer_dfa"].has_conv_form is True and RULES["layer_dfa"].has_after_backward is False
    ungated = build_rule("layer_dfa", gated=False)
    assert ungated.has_conv_form is False and ungated.has_after_backward is True
    # Kolen-Pollack without a trainer: matched_step(None), 0.01 and no decay; with options, those
    kp = build_rule("kolen_pollack")
    assert (kp.step_size, kp.decay) == (0.01, 0.0)
    kp = build_rule("kolen_pollack", lr_b=0.2, b_decay=0.1)
    assert (kp.step_size, kp.decay) == (0.2, 0.1)
